#pragma once
// Turning a (torch) error message into the one line the CLI prints.

#include <algorithm>
#include <string>
#include <vector>

namespace gradq {

/// The line of an error message that says what went wrong: the last one of a TorchScript traceback
/// ("RuntimeError: index out of range in self"), the first non-blank one otherwise.
inline std::string essential_error_line(const std::string& message) {
  std::vector<std::string> lines;
  size_t start = 0;
  while (start <= message.size()) {
    const size_t end = std::min(message.find('\n', start), message.size());
    const std::string line = message.substr(start, end - start);
    if (line.find_first_not_of(" \t") != std::string::npos) lines.push_back(line);
    start = end + 1;
  }
  if (lines.empty()) return "(no message)";
  return message.find("Traceback") != std::string::npos ? lines.back() : lines.front();
}

}  // namespace gradq
