#pragma once
// The one progress display of every long command (analyze, quantize, sweep): a bar with ETA
// redrawn in place on a terminal; timestamped lines at a steady rate when stderr is a file or a
// pipe (nightly logs), so a long phase is never silent for more than `interval_seconds`.

#include <chrono>
#include <functional>
#include <ostream>
#include <string>

namespace gradq {

class ProgressDisplay {
 public:
  struct Options {
    bool tty = false;               ///< redraw one line in place (a terminal) or print lines
    double interval_seconds = 10;   ///< without a terminal: at most one routine line per interval
    std::function<double()> clock;  ///< seconds; default: steady clock since construction
    std::function<std::string()> wall_time;  ///< line stamp; default: local time HH:MM:SS
  };
  /// On `out` with `options`.
  ProgressDisplay(std::ostream& out, Options options);
  /// On stderr; a terminal when stderr is one.
  ProgressDisplay();

  /// `done` of `total` units of `phase` (total 0: unknown). A new phase restarts the bar and its
  /// ETA. Without a terminal a line is printed for the first and the last update of a phase, for a
  /// `milestone`, and otherwise once `interval_seconds` have passed since the last line.
  void update(const std::string& phase, int64_t done, int64_t total, const std::string& detail,
              bool milestone = false);
  /// The CLI's callback shape (QuantizerOptions::on_progress): sweep points and accepted search
  /// steps are milestones.
  void operator()(const std::string& phase, int64_t done, int64_t total, const std::string& detail);
  /// Ends an in-place line so that what follows starts on its own line.
  void finish();

 private:
  std::ostream& out_;
  Options options_;
  bool open_ = false;
  std::string phase_;
  double phase_start_ = 0;
  int64_t phase_start_done_ = 0;
  double last_line_ = -1e300;
  int64_t last_done_ = -1;
};

/// "12.3 s", "4m05s"; "?" when unknown.
std::string format_duration(double seconds);

}  // namespace gradq
