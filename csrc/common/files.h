#pragma once
// File helpers shared by every writer: outputs appear whole or not at all, never over an input.

#include <functional>
#include <string>
#include <vector>

namespace gradq {

/// Calls `write(tmp_path)` to produce the file at a temporary path in the destination's directory,
/// then renames it over `path`. On any exception the temporary file is removed and the exception
/// propagates, so `path` is either the old file or the complete new one.
void write_file_atomically(const std::string& path, const std::function<void(const std::string&)>& write);

/// Convenience for text/binary payloads already in memory.
void write_file_atomically(const std::string& path, const std::string& contents);

/// Throws when `output` names the same file as any of `inputs` (same path or same inode).
void check_output_is_not_input(const std::string& output, const std::vector<std::string>& inputs);

/// Whole file into memory; throws naming the path when it cannot be read.
std::string read_file(const std::string& path);

/// Removes every temporary file that write_file_atomically() has open when a signal arrives, then
/// re-raises it. Installed once by the CLI for SIGINT and SIGTERM.
void install_interrupt_cleanup();

}  // namespace gradq
