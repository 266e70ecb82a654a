#pragma once
// Turning a (torch) error message into the one line the CLI prints.

#include <c10/util/Exception.h>

#include <algorithm>
#include <exception>
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

/// The essential line of any exception: a c10::Error's message without libtorch's C++ backtrace;
/// any other's what(), which for the TorchScript interpreter's std::runtime_error (an operator
/// failing inside forward) and torch::jit::JITException is a multi-line traceback.
inline std::string essential_error_line(const std::exception& e) {
  const auto* torch_error = dynamic_cast<const c10::Error*>(&e);
  return essential_error_line(torch_error ? torch_error->what_without_backtrace() : e.what());
}

}  // namespace gradq
