#pragma once
// The contract every fuzzer checks: a reader of untrusted bytes either accepts them or throws
// gradq::Error with a message. Any other exception escaping (the JSON library's, torch's, the
// standard library's) ends the run through std::terminate and is a finding, like a crash, a leak
// or undefined behaviour (the fuzzers are built with ASan and UBSan).

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/error.h"

namespace gradq::fuzz {

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
