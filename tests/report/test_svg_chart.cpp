// SVG charts (report/svg_chart.h): ticks, and the scatter chart the sweep's Pareto plot uses.

#include <gtest/gtest.h>

#include <string>

#include "report/svg_chart.h"
#include "support/test_helpers.h"

namespace gradq {
namespace {

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

ScatterChart frontier_chart() {
  ScatterChart chart;
  chart.title = "t";
  chart.series.push_back({"search", {{4.3, 17.4, "+20%"}, {5.0, 8.9, "+10%"}, {7.8, 0.4, "+1%"}}, "", true, true});
  chart.series.push_back({"uniform", {{4.35, 6.8, "b4g128"}, {2.77, 1500, "b2g32"}}, "", false, false});
  return chart;
}

TEST(NiceTicks, CoverTheRangeWithRoundSteps) {
  EXPECT_EQ(nice_ticks(0.3, 9.2, 5), (std::vector<double>{0, 2, 4, 6, 8, 10}));
  const std::vector<double> t = nice_ticks(-0.05, 17.4, 6);
  EXPECT_LE(t.front(), -0.05);
  EXPECT_GE(t.back(), 17.4);
}

TEST(ScatterChart, DrawsEveryPointAndItsLabel) {
  const std::string svg = render_scatter_chart(frontier_chart());
  EXPECT_EQ(count(svg, "<circle"), 5u);
  EXPECT_EQ(count(svg, "<polyline"), 1u) << "only the connected series";
  for (const char* label : {"+20%", "+10%", "+1%", "b4g128", "b2g32"}) EXPECT_NE(svg.find(label), std::string::npos) << label;
  EXPECT_EQ(svg, render_scatter_chart(frontier_chart())) << "same chart, same bytes";
}

TEST(ScatterChart, OutliersAboveTheAxisTopSitOnItsEdgeWithTheirValue) {
  ScatterChart chart = frontier_chart();
  chart.y_max = 40;
  const std::string svg = render_scatter_chart(chart);
  EXPECT_EQ(count(svg, "<circle"), 6u) << "the off-scale point is drawn hollow: two circles";
  EXPECT_NE(svg.find("b2g32: 1500"), std::string::npos);
  EXPECT_EQ(svg.find(">1500<"), std::string::npos) << "no tick reaches the outlier";
  EXPECT_NE(svg.find(">40<"), std::string::npos) << "the axis ends at y_max";
}

TEST(ScatterChart, RefusesNonFiniteOrEmpty) {
  ScatterChart chart;
  GRADQ_EXPECT_THROW_MSG(render_scatter_chart(chart), "at least one point");
  chart.series.push_back({"s", {{1, NAN, ""}}, "", false, false});
  GRADQ_EXPECT_THROW_MSG(render_scatter_chart(chart), "non-finite point");
}

}  // namespace
}  // namespace gradq
