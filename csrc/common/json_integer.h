#pragma once
// Integers from untrusted JSON.

#include <nlohmann/json.hpp>

#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "common/error.h"

namespace gradq {

/// `j` as the integer type T; gradq::Error naming `name` when it is not an integer in T's range.
/// nlohmann's get<T>() casts a float to T unchecked, which is undefined behaviour beyond T's range
/// (fuzz_plan: a plan version of 5.6e49), and wraps an integer beyond it.
template <typename T>
T json_integer(const nlohmann::json& j, const std::string& name) {
  static_assert(std::is_integral<T>::value && !std::is_same<T, bool>::value, "an integer type");
  using Limits = std::numeric_limits<T>;
  bool fits = false;
  if (j.is_number_unsigned()) {
    fits = j.get<uint64_t>() <= static_cast<uint64_t>(Limits::max());
  } else if (j.is_number_integer()) {
    const int64_t v = j.get<int64_t>();
    fits = v >= 0 ? static_cast<uint64_t>(v) <= static_cast<uint64_t>(Limits::max())
                  : std::is_signed<T>::value && v >= static_cast<int64_t>(Limits::min());
  }
  GRADQ_CHECK(fits, "'{}' must be an integer in [{}, {}], got {}", name, +Limits::min(), +Limits::max(), j.dump());
  return j.is_number_unsigned() ? static_cast<T>(j.get<uint64_t>()) : static_cast<T>(j.get<int64_t>());
}

/// json_integer of `j[key]`, or `absent` when `j` has no `key`.
template <typename T>
T json_integer_or(const nlohmann::json& j, const std::string& key, T absent) {
  return j.contains(key) ? json_integer<T>(j.at(key), key) : absent;
}

}  // namespace gradq
