#include "common/files.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>

#include "common/error.h"

namespace gradq {
namespace fs = std::filesystem;

namespace {
// Temporary files in flight, so a signal handler can remove them. Guarded by a mutex for normal
// updates; the handler only reads, and accepts the (harmless) race of a file being added meanwhile.
std::mutex g_tmp_mutex;
std::set<std::string> g_tmp_files;

void on_signal(int sig) {
  for (const auto& p : g_tmp_files) ::unlink(p.c_str());
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

void track(const std::string& tmp, bool on) {
  std::lock_guard<std::mutex> lock(g_tmp_mutex);
  if (on)
    g_tmp_files.insert(tmp);
  else
    g_tmp_files.erase(tmp);
}

// The same file however the path is spelled (relative, with "./" or ".." parts).
std::string path_key(const std::string& path) {
  std::error_code ec;
  const fs::path abs = fs::absolute(path, ec);
  return ec ? path : abs.lexically_normal().string();
}

fs::path directory_of(const std::string& path) {
  const fs::path p(path);
  return p.has_parent_path() ? p.parent_path() : fs::path(".");
}

void fsync_path(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), flags | O_CLOEXEC);
  GRADQ_CHECK(fd >= 0, "cannot open '{}' to flush it to disk: {}", path, std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  // Some file systems cannot fsync a directory (EINVAL); the data itself was flushed already.
  GRADQ_CHECK(rc == 0 || (flags & O_DIRECTORY && err == EINVAL), "flushing '{}' to disk failed: {}", path,
              std::strerror(err));
}

// A temporary file of one output, locked with flock for as long as this process may write it: a
// lock that nobody holds marks the leftover of a dead process.
struct Reservation {
  std::string tmp;
  int fd = -1;
};

// Removes temporaries of `dest` whose writer died; throws when a live process holds one.
void clear_stale_temporaries(const std::string& dest, const std::string& own_tmp) {
  const fs::path dir = directory_of(dest);
  const std::string prefix = "." + fs::path(dest).filename().string() + ".tmp.";
  std::error_code ec;
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.compare(0, prefix.size(), prefix) != 0 || e.path().string() == own_tmp) continue;
    const std::string pid = name.substr(prefix.size());
    if (pid.empty() || pid.find_first_not_of("0123456789") != std::string::npos) continue;
    const int fd = ::open(e.path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;  // removed meanwhile
    const bool held = ::flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK;
    if (!held) ::unlink(e.path().c_str());
    ::close(fd);
    GRADQ_CHECK(!held, "another process (pid {}) is writing '{}' now: wait for it to finish or choose another output",
                pid, dest);
  }
}

Reservation reserve(const std::string& dest) {
  GRADQ_CHECK(!dest.empty(), "output path must not be empty");
  const fs::path dir = directory_of(dest);
  std::error_code ec;
  GRADQ_CHECK(fs::is_directory(dir, ec), "cannot write '{}': its directory '{}' does not exist", dest, dir.string());
  GRADQ_CHECK(!fs::is_directory(dest, ec), "cannot write '{}': it is a directory, expected a file name", dest);
  Reservation r;
  r.tmp = (dir / ("." + fs::path(dest).filename().string() + ".tmp." + std::to_string(::getpid()))).string();
  track(r.tmp, true);
  r.fd = ::open(r.tmp.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (r.fd < 0) {
    const int err = errno;
    track(r.tmp, false);
    throw Error(fmt::format("cannot write '{}': creating a file in '{}' failed: {}", dest, dir.string(), std::strerror(err)));
  }
  ::flock(r.fd, LOCK_EX | LOCK_NB);
  try {
    clear_stale_temporaries(dest, r.tmp);
  } catch (...) {
    ::unlink(r.tmp.c_str());
    ::close(r.fd);
    track(r.tmp, false);
    throw;
  }
  return r;
}

void release(Reservation& r, bool remove) {
  if (remove) ::unlink(r.tmp.c_str());
  if (r.fd >= 0) ::close(r.fd);
  r.fd = -1;
  track(r.tmp, false);
}

// Runs the writer on the reserved temporary and flushes it to disk.
void write_reserved(const std::string& dest, const Reservation& r, const std::function<void(const std::string&)>& write) {
  write(r.tmp);
  GRADQ_CHECK(fs::exists(r.tmp), "internal: writer produced no file for '{}'", dest);
  fsync_path(r.tmp, O_RDONLY);
}

void rename_into_place(const std::string& tmp, const std::string& dest) {
  GRADQ_CHECK(::rename(tmp.c_str(), dest.c_str()) == 0, "cannot move the finished '{}' into place: {}", dest,
              std::strerror(errno));
}

// Signals that would interrupt a commit half way are held back while it runs.
class SignalBlock {
 public:
  SignalBlock() {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    ::pthread_sigmask(SIG_BLOCK, &set, &old_);
  }
  ~SignalBlock() { ::pthread_sigmask(SIG_SETMASK, &old_, nullptr); }

 private:
  sigset_t old_;
};

OutputSet* g_open_set = nullptr;
}  // namespace

struct OutputSet::Entry {
  std::string dest;
  std::string key;  // path_key(dest)
  Reservation reservation;
  bool written = false;
};

void install_interrupt_cleanup() {
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
}

void write_file_atomically(const std::string& path, const std::function<void(const std::string&)>& write) {
  if (g_open_set)
    for (OutputSet::Entry* e : g_open_set->entries_) {
      if (e->key != path_key(path)) continue;
      e->written = false;
      write_reserved(path, e->reservation, write);
      e->written = true;
      return;
    }
  Reservation r = reserve(path);
  try {
    write_reserved(path, r, write);
    rename_into_place(r.tmp, path);
  } catch (...) {
    release(r, true);
    throw;
  }
  release(r, false);
  fsync_path(directory_of(path).string(), O_RDONLY | O_DIRECTORY);
}

void write_file_atomically(const std::string& path, const std::string& contents) {
  write_file_atomically(path, [&](const std::string& tmp) {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
    out.close();
    GRADQ_CHECK(out.good(), "failed writing {} bytes to '{}'", contents.size(), tmp);
  });
}

OutputSet::OutputSet(const std::vector<std::string>& outputs, const std::vector<std::string>& inputs) {
  GRADQ_CHECK(!g_open_set, "internal: only one OutputSet may be open at a time");
  try {
    std::set<std::string> seen;
    for (const std::string& out : outputs) {
      check_output_is_not_input(out, inputs);
      GRADQ_CHECK(seen.insert(path_key(out)).second, "'{}' is given as two different outputs", out);
      entries_.push_back(new Entry{out, path_key(out), {}, false});
      entries_.back()->reservation = reserve(out);
    }
  } catch (...) {
    for (Entry* e : entries_) {
      if (e->reservation.fd >= 0) release(e->reservation, true);
      delete e;
    }
    throw;
  }
  g_open_set = this;
}

OutputSet::~OutputSet() {
  for (Entry* e : entries_) {
    if (e->reservation.fd >= 0) release(e->reservation, true);
    delete e;
  }
  if (g_open_set == this) g_open_set = nullptr;
}

std::vector<std::string> OutputSet::commit() {
  GRADQ_CHECK(!committed_, "internal: an OutputSet is committed once");
  committed_ = true;
  g_open_set = nullptr;
  std::vector<std::string> written;
  std::set<std::string> dirs;
  {
    SignalBlock hold;
    for (Entry* e : entries_) {
      if (!e->written) {
        release(e->reservation, true);
        continue;
      }
      rename_into_place(e->reservation.tmp, e->dest);
      release(e->reservation, false);
      written.push_back(e->dest);
      dirs.insert(directory_of(e->dest).string());
    }
  }
  for (const std::string& dir : dirs) fsync_path(dir, O_RDONLY | O_DIRECTORY);
  return written;
}

std::string OutputSet::staged_path(const std::string& path) const {
  for (const Entry* e : entries_)
    if (e->key == path_key(path) && e->written && e->reservation.fd >= 0) return e->reservation.tmp;
  throw Error(fmt::format("internal: '{}' is not a written, uncommitted output", path));
}

void check_output_is_not_input(const std::string& output, const std::vector<std::string>& inputs) {
  for (const auto& in : inputs) {
    if (in.empty()) continue;
    std::error_code ec;
    bool same = fs::weakly_canonical(output, ec) == fs::weakly_canonical(in, ec) ||
                (fs::exists(output) && fs::exists(in) && fs::equivalent(output, in, ec));
    GRADQ_CHECK(!same, "output '{}' would overwrite the input '{}': choose another output path", output, in);
  }
}

void check_output_location(const std::string& path) {
  Reservation r = reserve(path);
  release(r, true);
}

MappedFile::MappedFile(const std::string& path) {
  GRADQ_CHECK(fs::exists(path), "file '{}' does not exist", path);
  GRADQ_CHECK(fs::is_regular_file(path), "'{}' is not a regular file", path);
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  GRADQ_CHECK(fd >= 0, "cannot open '{}' for reading: {}", path, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw Error(fmt::format("cannot read the size of '{}': {}", path, std::strerror(err)));
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    data_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (data_ == MAP_FAILED) {
      const int err = errno;
      data_ = nullptr;
      ::close(fd);
      throw Error(fmt::format("cannot map '{}' ({} bytes) for reading: {}", path, size_, std::strerror(err)));
    }
  }
  ::close(fd);  // the mapping keeps the file
}

void MappedFile::release(size_t begin, size_t end) const {
  const auto page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  begin = (begin + page - 1) / page * page;  // whole pages inside the range only
  end = std::min(end, size_) / page * page;
  // Advice only: a failure leaves the pages resident, which costs memory, not correctness.
  if (data_ && begin < end) ::madvise(static_cast<char*>(data_) + begin, end - begin, MADV_DONTNEED);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(data_, size_);
}

std::string read_file(const std::string& path) {
  GRADQ_CHECK(fs::exists(path), "file '{}' does not exist", path);
  GRADQ_CHECK(fs::is_regular_file(path), "'{}' is not a regular file", path);
  std::ifstream in(path, std::ios::binary);
  GRADQ_CHECK(in.good(), "cannot open '{}' for reading", path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace gradq
