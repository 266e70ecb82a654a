#pragma once
// Errors that gradq's library code throws. The message always names what was expected and what was
// got, so the CLI can print it as one line and a harness can log it as is.

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace gradq {

/// The one exception type for user-facing errors (bad files, impossible options, unmet budgets).
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace gradq

/// Throws gradq::Error with a fmt-formatted message when `cond` is false.
#define GRADQ_CHECK(cond, ...)                               \
  do {                                                       \
    if (!(cond)) throw ::gradq::Error(fmt::format(__VA_ARGS__)); \
  } while (0)
