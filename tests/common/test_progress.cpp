// The progress display: a steady rate of timestamped lines without a terminal, a bar and ETA on one.

#include <gtest/gtest.h>

#include <algorithm>
#include <sstream>

#include "common/progress.h"

namespace gradq {
namespace {

struct Fixture {
  std::ostringstream out;
  double now = 0;
  ProgressDisplay display;
  explicit Fixture(bool tty)
      : display(out, [&] {
          ProgressDisplay::Options o;
          o.tty = tty;
          o.interval_seconds = 10;
          o.clock = [this] { return now; };
          o.wall_time = [] { return std::string("12:00:00"); };
          return o;
        }()) {}
  int lines() const {
    const std::string text = out.str();
    return static_cast<int>(std::count(text.begin(), text.end(), '\n'));
  }
};

TEST(Progress, WithoutATerminalOneLineAtLeastEveryIntervalAndNoneBetween) {
  Fixture f(false);
  // 100 steps, one per second: the first, every 10 s, and the last.
  for (int i = 0; i <= 100; ++i, f.now += 1) f.display.update("analysis", i, 100, "probe");
  const std::string text = f.out.str();
  EXPECT_EQ(f.lines(), 11) << text;  // t = 0, 10, ..., 100; the last (done == total) is the one at 100
  EXPECT_NE(text.find("12:00:00 [ 10.0 s] analysis [##..................] 10/100  10% ETA 1m30s: probe\n"),
            std::string::npos) << text;
  EXPECT_NE(text.find("100/100 100% ETA 0 s"), std::string::npos) << text;
  EXPECT_EQ(text.find('\r'), std::string::npos);
}

TEST(Progress, MilestonesAndNewPhasesAlwaysPrint) {
  Fixture f(false);
  f.display("search", 1, 50, "layers.0.wq b4g128 kept");
  f.display("search", 2, 50, "layers.0.wk b2g128 rolled back");  // routine, within the interval: silent
  f.display("search", 3, 50, "layers.0.wk b4g128 kept");
  f.display("validation", 0, 0, "held-out");
  EXPECT_EQ(f.lines(), 3) << f.out.str();
  EXPECT_EQ(f.out.str().find("rolled back"), std::string::npos);
}

TEST(Progress, EtaIsUnknownUntilThePhaseHasProgressed) {
  Fixture f(false);
  f.display.update("analysis", 1, 244, "reference");  // the first report already counts one unit
  f.now = 10;
  f.display.update("analysis", 11, 244, "probe");  // 10 units in 10 s: 233 s left
  const std::string text = f.out.str();
  EXPECT_NE(text.find("1/244   0% ETA ?: reference"), std::string::npos) << text;
  EXPECT_NE(text.find("11/244   5% ETA 3m53s: probe"), std::string::npos) << text;
}

TEST(Progress, OnATerminalTheLineIsRedrawnInPlace) {
  Fixture f(true);
  f.display.update("analysis", 5, 10, "probe");
  f.now = 5;
  f.display.update("analysis", 6, 10, "probe");
  f.display.finish();
  const std::string text = f.out.str();
  EXPECT_EQ(std::count(text.begin(), text.end(), '\r'), 2);
  EXPECT_EQ(f.lines(), 1);
  EXPECT_NE(text.find("6/10  60% ETA 20.0 s"), std::string::npos) << text;  // 1 unit in 5 s, 4 left
}

}  // namespace
}  // namespace gradq
