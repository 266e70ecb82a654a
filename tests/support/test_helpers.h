#pragma once
// Header-only helpers shared by the test suites (header-only so the quant and ops suites, which
// link only libgradq_ops, can use them too).

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <string>

#include "common/error.h"

/// Expects `stmt` to throw a std::exception whose message contains `substr`.
#define GRADQ_EXPECT_THROW_MSG(stmt, substr)                                                  \
  do {                                                                                        \
    try {                                                                                     \
      stmt;                                                                                   \
      ADD_FAILURE() << "expected an exception containing \"" << (substr) << "\"";             \
    } catch (const std::exception& e) {                                                       \
      EXPECT_NE(std::string(e.what()).find(substr), std::string::npos) << "message: " << e.what(); \
    }                                                                                         \
  } while (0)

namespace gradq::test {

/// Exact equality of dtype, shape and bits (so -0.0 != 0.0 and NaN == NaN of the same payload).
inline bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.defined() != b.defined()) return false;
  if (!a.defined()) return true;
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  return std::memcmp(ac.data_ptr(), bc.data_ptr(), ac.nbytes()) == 0;
}

/// Gaussian weights like an LLM layer's (std 0.02), from a fixed seed.
inline at::Tensor gaussian(int64_t rows, int64_t cols, uint64_t seed, double std = 0.02) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::randn({rows, cols}, gen, at::kFloat) * std;
}

/// The message of the gradq::Error that `fn` throws; records a failure when it throws none.
inline std::string expect_error(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected gradq::Error";
  return "";
}

}  // namespace gradq::test
