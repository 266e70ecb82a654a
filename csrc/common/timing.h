#pragma once
// Wall-clock timing of passes and phases, on the steady clock (immune to clock adjustments), and the
// process's CPU time (what benchmarks on a shared machine compare).

#include <chrono>
#include <ctime>

namespace gradq {

using Clock = std::chrono::steady_clock;

/// Seconds elapsed since `start`.
inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

/// CPU seconds used so far by this process, all threads together.
inline double process_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

}  // namespace gradq
