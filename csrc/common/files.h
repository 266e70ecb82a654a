#pragma once
// File helpers shared by every writer: outputs appear whole or not at all, as one set per command,
// never over an input.

#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace gradq {

/// Calls `write(tmp_path)` to produce the file at a temporary path in the destination's directory
/// (`.<name>.tmp.<pid>`, held under an advisory flock while it exists), fsyncs it, then renames it
/// over `path` and fsyncs the directory. On any exception the temporary file is removed and the
/// exception propagates, so `path` is either the old file or the complete new one. Temporaries of
/// `path` left by dead processes (no lock held) are removed; a temporary locked by a live process
/// means another process is writing `path`, and this throws saying so.
/// While an OutputSet that names `path` is open, the rename is deferred to OutputSet::commit().
void write_file_atomically(const std::string& path, const std::function<void(const std::string&)>& write);

/// Convenience for text/binary payloads already in memory.
void write_file_atomically(const std::string& path, const std::string& contents);

/// The outputs of one command, written as one set. The constructor checks every output before any
/// expensive work (its directory exists and takes a new file, it is not a directory, not an input,
/// not listed twice, not being written by another live process) and reserves its temporary file.
/// write_file_atomically() to a listed path then only writes and fsyncs the temporary; commit()
/// renames all of them (SIGINT/SIGTERM held back meanwhile). Whatever was not committed when the
/// set is destroyed, or when SIGINT/SIGTERM arrives, is removed: a failed or interrupted command
/// leaves no new file and every earlier file untouched. One set is open at a time.
class OutputSet {
 public:
  OutputSet(const std::vector<std::string>& outputs, const std::vector<std::string>& inputs);
  ~OutputSet();
  OutputSet(const OutputSet&) = delete;
  OutputSet& operator=(const OutputSet&) = delete;

  /// Renames every output written since construction over its destination and returns their
  /// paths in the order given; outputs never written are dropped and leave nothing behind.
  std::vector<std::string> commit();

  /// Where the content written for output `path` is until commit() (its size, for a summary).
  /// Throws when `path` is not an output of this set or has not been written.
  std::string staged_path(const std::string& path) const;

 private:
  struct Entry;
  std::vector<Entry*> entries_;
  bool committed_ = false;
  friend void write_file_atomically(const std::string&, const std::function<void(const std::string&)>&);
};

/// Throws when `output` names the same file as any of `inputs` (same path or same inode).
void check_output_is_not_input(const std::string& output, const std::vector<std::string>& inputs);

/// Throws unless a new file can be created at `path`: its directory exists and is writable, and
/// `path` itself is not a directory. Creates (and removes) a probe file to be sure.
void check_output_location(const std::string& path);

/// Whole file into memory; throws naming the path when it cannot be read.
std::string read_file(const std::string& path);

/// A file mapped read-only: its bytes are the page cache's, read as they are touched, so a reader
/// that copies tensors out of a checkpoint holds no second copy of the file (read_file would, and
/// its stream copied it once more). Throws naming the path when it cannot be opened or mapped. Like
/// any mapping, it assumes the file is not truncated while mapped (reading past the new end raises
/// SIGBUS); checkpoints are read once, at load.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  std::string_view bytes() const { return {static_cast<const char*>(data_), size_}; }
  /// Drops the whole pages inside bytes [begin, end) from this process's memory (they stay in the
  /// page cache and are read again if touched): a reader that is done with a part of the file says
  /// so, and the process's resident memory does not grow to the file's size.
  void release(size_t begin, size_t end) const;

 private:
  void* data_ = nullptr;  // null for an empty file (nothing to map)
  size_t size_ = 0;
};

/// Removes every temporary file that write_file_atomically() or an OutputSet has open when a
/// signal arrives, then re-raises it. Installed once by the CLI for SIGINT and SIGTERM.
void install_interrupt_cleanup();

}  // namespace gradq
