#pragma once
// Charts as standalone SVG files (no dependencies, viewable in any browser). Two layers:
//   SvgDocument   shapes and text in pixel coordinates (y down), escaped and formatted once;
//   charts        render_bar_chart (horizontal or vertical, one or more series side by side) and
//                 render_scatter_chart, built on SvgDocument, LinearScale and nice_ticks.
// Numbers are written with a fixed precision, so the same chart gives the same bytes.

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace gradq {

/// Colour cycle used for series (and for anything that needs distinct colours).
extern const std::vector<std::string> kChartPalette;

/// XML-escapes text for element content and attribute values.
std::string svg_escape(const std::string& text);

struct SvgText {
  double size = 12;
  std::string anchor = "start";  ///< "start", "middle", "end"
  std::string fill = "#222";
  bool bold = false;
  double rotate = 0;             ///< degrees, about the anchor point
};

class SvgDocument {
 public:
  SvgDocument(double width, double height, const std::string& background = "#ffffff");
  /// `tooltip` becomes a <title> child (shown on hover) when not empty.
  void rect(double x, double y, double w, double h, const std::string& fill, const std::string& tooltip = "");
  void line(double x1, double y1, double x2, double y2, const std::string& stroke, double width = 1,
            const std::string& dash = "");
  void circle(double cx, double cy, double r, const std::string& fill, const std::string& tooltip = "");
  void polyline(const std::vector<std::pair<double, double>>& points, const std::string& stroke, double width = 1);
  void text(double x, double y, const std::string& text, const SvgText& style = {});
  double width() const { return width_; }
  double height() const { return height_; }
  /// The complete document.
  std::string str() const;

 private:
  double width_, height_;
  std::string body_;
};

/// Linear map from the data interval [d0, d1] to the pixel interval [r0, r1].
struct LinearScale {
  double d0 = 0, d1 = 1, r0 = 0, r1 = 1;
  double operator()(double v) const;
};

/// About `target` round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]; the first tick is
/// <= lo and the last >= hi, so they also give a padded axis range.
std::vector<double> nice_ticks(double lo, double hi, int target = 5);
/// A tick label: at most 4 significant digits, no trailing zeros, scientific when very small or large.
std::string format_number(double v);

struct BarSeries {
  std::string name;
  std::vector<double> values;  ///< one per category
  std::string color;           ///< empty: kChartPalette by series index
};

struct BarChart {
  std::string title;
  std::vector<std::string> notes;  ///< lines under the title (what was run, its budget and result)
  std::string value_label;     ///< axis title of the values
  std::string category_label;  ///< axis title of the categories
  std::vector<std::string> categories;
  std::vector<BarSeries> series;  ///< several series are drawn side by side within each category
  /// Optional per-category bar colours (one per category; single-series charts, e.g. colour by group).
  std::vector<std::string> category_colors;
  /// Legend entries {label, colour}; empty: one per series when there are several series.
  std::vector<std::pair<std::string, std::string>> legend;
  bool horizontal = true;      ///< categories down the left side, values to the right
  bool stacked = false;        ///< series stacked in one bar per category (vertical charts, values >= 0)
  bool value_labels = true;    ///< print each value at the end of its bar
  double width = 900;          ///< pixels; the other side grows with the number of categories
  double bar_thickness = 14;   ///< pixels per bar
};

/// Renders a bar chart; throws gradq::Error when a series' length differs from the categories' or
/// a value is not finite.
std::string render_bar_chart(const BarChart& chart);

struct ScatterPoint {
  double x = 0, y = 0;
  std::string label;  ///< printed beside the point (and its tooltip); may be empty
};

struct ScatterSeries {
  std::string name;
  std::vector<ScatterPoint> points;
  std::string color;     ///< empty: kChartPalette by series index
  bool connect = false;  ///< join the points in the given order (a frontier)
  bool labels_below = false;  ///< labels under the points (another series' above: fewer collisions)
  bool markers = true;   ///< false: only the line (connect), e.g. a frontier through other series' points
};

struct ScatterChart {
  std::string title, x_label, y_label;
  std::vector<std::string> notes;     ///< lines under the title; each adds 16 pixels to the height
  std::vector<ScatterSeries> series;  ///< one legend entry each
  /// Top of the y axis when set: a point above it is drawn on the top edge, hollow, with its value
  /// in its label ("b2g32: 1500"), so that one outlier does not flatten the rest.
  std::optional<double> y_max;
  double width = 860, height = 520;   ///< pixels
};

/// Renders a scatter chart with a zero line when the y range spans zero; throws gradq::Error on a
/// non-finite coordinate or when there is no point at all.
std::string render_scatter_chart(const ScatterChart& chart);

/// Writes SVG text atomically (common/files.h).
void write_svg(const std::string& path, const std::string& svg);

}  // namespace gradq
