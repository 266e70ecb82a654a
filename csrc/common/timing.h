#pragma once
// Wall-clock timing of passes and phases, on the steady clock (immune to clock adjustments).

#include <chrono>

namespace gradq {

using Clock = std::chrono::steady_clock;

/// Seconds elapsed since `start`.
inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace gradq
