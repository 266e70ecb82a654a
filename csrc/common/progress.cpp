#include "common/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <ctime>
#include <iostream>

namespace gradq {

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  if (s < 60) return fmt::format("{:.1f} s", s);
  return fmt::format("{}m{:02d}s", static_cast<int64_t>(s) / 60, static_cast<int>(std::fmod(s, 60.0)));
}

ProgressDisplay::ProgressDisplay(std::ostream& out, Options options) : out_(out), options_(std::move(options)) {
  if (!options_.clock) {
    const auto start = std::chrono::steady_clock::now();
    options_.clock = [start] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  }
  if (!options_.wall_time)
    options_.wall_time = [] {
      const std::time_t now = std::time(nullptr);
      std::tm local{};
      ::localtime_r(&now, &local);
      char buf[16];
      std::strftime(buf, sizeof buf, "%H:%M:%S", &local);
      return std::string(buf);
    };
}

ProgressDisplay::ProgressDisplay() : ProgressDisplay(std::cerr, [] {
  Options options;
  options.tty = ::isatty(STDERR_FILENO) == 1;
  return options;
}()) {}

void ProgressDisplay::finish() {
  if (open_) out_ << "\n" << std::flush;
  open_ = false;
}

void ProgressDisplay::operator()(const std::string& phase, int64_t done, int64_t total, const std::string& detail) {
  update(phase, done, total, detail, phase == "sweep" || detail.find("kept") != std::string::npos);
}

void ProgressDisplay::update(const std::string& phase, int64_t done, int64_t total, const std::string& detail,
                             bool milestone) {
  const double now = options_.clock();
  const bool new_phase = phase != phase_;
  if (new_phase) {
    finish();
    phase_ = phase;
    phase_start_ = now;
    phase_start_done_ = done;
    last_done_ = -1;
  }
  std::string line = phase;
  if (total > 0) {
    constexpr int kWidth = 20;
    const double frac = std::clamp(static_cast<double>(done) / static_cast<double>(total), 0.0, 1.0);
    const int filled = static_cast<int>(frac * kWidth);
    const double elapsed = now - phase_start_;
    // The rate since the phase's first update: a phase may first report with units already done.
    const int64_t progressed = done - phase_start_done_;
    const double eta = progressed > 0 && elapsed > 0
                           ? elapsed / static_cast<double>(progressed) * static_cast<double>(total - done)
                           : NAN;
    line += fmt::format(" [{}{}] {}/{} {:3.0f}% ETA {}", std::string(filled, '#'), std::string(kWidth - filled, '.'),
                        done, total, 100 * frac, done >= total ? "0 s" : format_duration(eta));
  }
  if (!detail.empty()) line += ": " + detail;
  if (options_.tty) {
    out_ << "\r\033[K" << fmt::format("[{:>7}] ", format_duration(now)) << line.substr(0, 150) << std::flush;
    open_ = true;
    return;
  }
  const bool last = total > 0 && done >= total && done != last_done_;
  if (new_phase || last || milestone || now - last_line_ >= options_.interval_seconds) {
    out_ << fmt::format("{} [{:>7}] ", options_.wall_time(), format_duration(now)) << line << "\n" << std::flush;
    last_line_ = now;
  }
  last_done_ = done;
}

}  // namespace gradq
