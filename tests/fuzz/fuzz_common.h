#pragma once
// The contract every fuzzer checks: a reader of untrusted bytes either accepts them or throws
// gradq::Error with a message. Any other exception escaping (the JSON library's, torch's, the
// standard library's) ends the run through std::terminate and is a finding, like a crash, a leak
// or undefined behaviour (the fuzzers are built with ASan and UBSan).

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include <c10/util/Logging.h>

#include "common/error.h"

namespace gradq::fuzz {

// libtorch 1.13 captures and symbolizes a C++ backtrace (dladdr on every frame) in each c10::Error
// it throws, and most fuzz inputs make libtorch throw: in fuzz_torchscript that was 82% of the
// CPU time (perf, 209 executions a second). gradq keeps only the message of a libtorch error, so
// the fuzzers record none.
inline const bool kTorchBacktracesOff = [] {
  c10::SetStackTraceFetcher([] { return std::string(); });
  return true;
}();

inline std::string as_string(const uint8_t* data, size_t size) {
  return std::string(reinterpret_cast<const char*>(data), size);
}

template <typename Fn>
void expect_only_gradq_errors(Fn&& fn) {
  try {
    fn();
  } catch (const gradq::Error& e) {
    if (*e.what() == '\0') std::abort();  // a rejection must say why
  }
}

}  // namespace gradq::fuzz
