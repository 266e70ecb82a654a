#include "common/files.h"

#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
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
}  // namespace

void install_interrupt_cleanup() {
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
}

void write_file_atomically(const std::string& path, const std::function<void(const std::string&)>& write) {
  GRADQ_CHECK(!path.empty(), "output path must not be empty");
  fs::path dest(path);
  fs::path dir = dest.has_parent_path() ? dest.parent_path() : fs::path(".");
  GRADQ_CHECK(fs::is_directory(dir), "output directory '{}' does not exist", dir.string());
  std::string tmp = (dir / ("." + dest.filename().string() + ".tmp." + std::to_string(::getpid()))).string();
  {
    std::lock_guard<std::mutex> lock(g_tmp_mutex);
    g_tmp_files.insert(tmp);
  }
  auto forget = [&] {
    std::lock_guard<std::mutex> lock(g_tmp_mutex);
    g_tmp_files.erase(tmp);
  };
  try {
    write(tmp);
    GRADQ_CHECK(fs::exists(tmp), "internal: writer produced no file for '{}'", path);
    fs::rename(tmp, dest);
  } catch (...) {
    std::error_code ec;
    fs::remove(tmp, ec);
    forget();
    throw;
  }
  forget();
}

void write_file_atomically(const std::string& path, const std::string& contents) {
  write_file_atomically(path, [&](const std::string& tmp) {
    std::ofstream out(tmp, std::ios::binary);
    out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
    out.close();
    GRADQ_CHECK(out.good(), "failed writing {} bytes to '{}'", contents.size(), tmp);
  });
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
