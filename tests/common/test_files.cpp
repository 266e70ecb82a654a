// Outputs as one set (OutputSet), stale and concurrent temporaries, mapped inputs, and the --threads bounds.

#include <gtest/gtest.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include <ATen/Parallel.h>

#include <csignal>
#include <filesystem>
#include <set>

#include "common/error.h"
#include "common/files.h"
#include "common/runtime.h"
#include "support/test_support.h"

namespace gradq {
namespace {
namespace fs = std::filesystem;

std::set<std::string> listing(const std::string& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(OutputSet, NothingVisibleUntilCommitAndNothingLeftWithoutIt) {
  const std::string dir = test::temp_dir("outset_commit");
  write_file_atomically(dir + "/a", "old");
  {
    OutputSet set({dir + "/a", dir + "/b"}, {});
    write_file_atomically(dir + "/a", "new a");
    write_file_atomically(dir + "/b", "new b");
    EXPECT_EQ(read_file(dir + "/a"), "old");
    EXPECT_FALSE(fs::exists(dir + "/b"));
  }  // destroyed without commit: a failed command
  EXPECT_EQ(listing(dir), std::set<std::string>{"a"});
  EXPECT_EQ(read_file(dir + "/a"), "old");

  OutputSet set({dir + "/a", dir + "/b", dir + "/never"}, {});
  write_file_atomically(dir + "/a", "new a");
  write_file_atomically(dir + "/b", "new b");
  EXPECT_EQ(set.commit(), (std::vector<std::string>{dir + "/a", dir + "/b"}));
  EXPECT_EQ(read_file(dir + "/a"), "new a");
  EXPECT_EQ(read_file(dir + "/b"), "new b");
  EXPECT_EQ(listing(dir), (std::set<std::string>{"a", "b"}));  // no temporary of the unwritten output
}

TEST(OutputSet, RejectsBadLocationsBeforeAnyWork) {
  const std::string dir = test::temp_dir("outset_bad");
  write_file_atomically(dir + "/input", "in");
  EXPECT_NE(error_of([&] { OutputSet s({dir + "/missing/x.pt"}, {}); }).find("does not exist"), std::string::npos);
  EXPECT_NE(error_of([&] { OutputSet s({dir}, {}); }).find("is a directory"), std::string::npos);
  EXPECT_NE(error_of([&] { OutputSet s({dir + "/x", dir + "/./x"}, {}); }).find("two different outputs"), std::string::npos);
  EXPECT_NE(error_of([&] { OutputSet s({dir + "/input"}, {dir + "/input"}); }).find("overwrite the input"), std::string::npos);
  // /proc takes no new files, not even from root (a read-only directory does not stop root).
  EXPECT_NE(error_of([&] { OutputSet s({"/proc/gradq_test.json"}, {}); }).find("cannot write"), std::string::npos);
  // A failed set leaves none of the reservations of its earlier, valid outputs.
  EXPECT_FALSE(error_of([&] { OutputSet s({dir + "/ok", dir + "/missing/x"}, {}); }).empty());
  EXPECT_EQ(listing(dir), std::set<std::string>{"input"});
}

TEST(OutputSet, StaleTemporariesOfDeadProcessesAreRemoved) {
  const std::string dir = test::temp_dir("outset_stale");
  write_file_atomically(dir + "/.q.pt.tmp.999999", "left by a killed run");  // nobody holds its lock
  write_file_atomically(dir + "/q.pt", "fresh");
  EXPECT_EQ(listing(dir), std::set<std::string>{"q.pt"});
}

TEST(OutputSet, AnotherLiveWriterIsRefused) {
  const std::string dir = test::temp_dir("outset_live");
  const std::string other = dir + "/.q.pt.tmp.12345";
  const int fd = ::open(other.c_str(), O_RDWR | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);  // as a live writer holds it
  EXPECT_NE(error_of([&] { write_file_atomically(dir + "/q.pt", "x"); }).find("another process (pid 12345) is writing"),
            std::string::npos);
  EXPECT_NE(error_of([&] { OutputSet s({dir + "/q.pt"}, {}); }).find("another process"), std::string::npos);
  EXPECT_FALSE(fs::exists(dir + "/q.pt"));
  EXPECT_TRUE(fs::exists(other));  // a live writer's file is not touched
  ::close(fd);
}

TEST(OutputSet, SignalLeavesNoNewFileAndEarlierFilesUntouched) {
  const std::string dir = test::temp_dir("outset_signal");
  write_file_atomically(dir + "/model.pt", "earlier model");
  for (int sig : {SIGINT, SIGTERM}) {
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      install_interrupt_cleanup();
      OutputSet set({dir + "/model.pt", dir + "/plan.json"}, {});
      write_file_atomically(dir + "/model.pt", "half of a new set");
      std::raise(sig);
      ::_exit(0);  // not reached: the handler re-raises with the default action
    }
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == sig) << status;
    EXPECT_EQ(listing(dir), std::set<std::string>{"model.pt"}) << sig;
    EXPECT_EQ(read_file(dir + "/model.pt"), "earlier model");
  }
}

TEST(MappedFile, HoldsTheFileBytesAndNamesWhatItCannotOpen) {
  const std::string dir = test::temp_dir("mapped_file");
  const std::string bytes("weights\0and more", 16);
  write_file_atomically(dir + "/f.bin", bytes);
  const MappedFile mapped(dir + "/f.bin");
  EXPECT_EQ(mapped.bytes(), bytes);
  mapped.release(0, bytes.size());  // resident pages dropped: the bytes are read again from the file
  EXPECT_EQ(mapped.bytes(), bytes);
  write_file_atomically(dir + "/empty.bin", "");
  EXPECT_TRUE(MappedFile(dir + "/empty.bin").bytes().empty());
  for (const std::string& bad : {dir + "/missing.bin", dir}) {
    try {
      MappedFile m(bad);
      ADD_FAILURE() << "expected an error for " << bad;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("'" + bad + "'"), std::string::npos) << e.what();
    }
  }
}

TEST(Threads, BoundsAndDefault) {
  const int cores = hardware_threads();
  for (int bad : {-1, kMaxThreadsPerCore * cores + 1, 100000})
    EXPECT_NE(error_of([&] { set_threads(bad); }).find("--threads must be between 1 and"), std::string::npos) << bad;
  EXPECT_EQ(set_threads(1), 1);
  EXPECT_EQ(at::get_num_threads(), 1);
  const int chosen = set_threads(0);
  EXPECT_GE(chosen, 1);
  EXPECT_LE(chosen, cores);
  EXPECT_EQ(chosen, at::get_num_threads());
  set_threads(1);
}

}  // namespace
}  // namespace gradq
