#include "report/svg_chart.h"

#include <algorithm>
#include <cmath>

#include "common/error.h"
#include "common/files.h"

namespace gradq {
namespace {
// Fixed-precision coordinates: deterministic bytes, and 0.01 px is below anything visible.
std::string num(double v) {
  std::string s = fmt::format("{:.2f}", v);
  while (s.back() == '0') s.pop_back();
  if (s.back() == '.') s.pop_back();
  return s == "-0" ? "0" : s;
}

double text_width(const std::string& s, double size) { return 0.6 * size * static_cast<double>(s.size()); }
}  // namespace

const std::vector<std::string> kChartPalette = {"#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2",
                                                "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"};

std::string svg_escape(const std::string& text) {
  std::string out;
  for (char c : text) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default: out += c;
    }
  }
  return out;
}

SvgDocument::SvgDocument(double width, double height, const std::string& background) : width_(width), height_(height) {
  GRADQ_CHECK(width > 0 && height > 0, "an SVG document needs a positive size, got {} x {}", width, height);
  rect(0, 0, width, height, background);
}

void SvgDocument::rect(double x, double y, double w, double h, const std::string& fill, const std::string& tooltip) {
  body_ += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{}\"", num(x), num(y), num(std::max(0.0, w)),
                       num(std::max(0.0, h)), svg_escape(fill));
  body_ += tooltip.empty() ? "/>\n" : fmt::format("><title>{}</title></rect>\n", svg_escape(tooltip));
}

void SvgDocument::line(double x1, double y1, double x2, double y2, const std::string& stroke, double width,
                       const std::string& dash) {
  body_ += fmt::format("<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{}\" stroke-width=\"{}\"{}/>\n", num(x1),
                       num(y1), num(x2), num(y2), svg_escape(stroke), num(width),
                       dash.empty() ? "" : fmt::format(" stroke-dasharray=\"{}\"", svg_escape(dash)));
}

void SvgDocument::circle(double cx, double cy, double r, const std::string& fill, const std::string& tooltip) {
  body_ += fmt::format("<circle cx=\"{}\" cy=\"{}\" r=\"{}\" fill=\"{}\"", num(cx), num(cy), num(r), svg_escape(fill));
  body_ += tooltip.empty() ? "/>\n" : fmt::format("><title>{}</title></circle>\n", svg_escape(tooltip));
}

void SvgDocument::polyline(const std::vector<std::pair<double, double>>& points, const std::string& stroke,
                           double width) {
  std::string pts;
  for (const auto& [x, y] : points) pts += (pts.empty() ? "" : " ") + num(x) + "," + num(y);
  body_ += fmt::format("<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"{}\"/>\n", pts,
                       svg_escape(stroke), num(width));
}

void SvgDocument::text(double x, double y, const std::string& text, const SvgText& style) {
  body_ += fmt::format("<text x=\"{}\" y=\"{}\" font-size=\"{}\" text-anchor=\"{}\" fill=\"{}\"{}{}>{}</text>\n", num(x),
                       num(y), num(style.size), svg_escape(style.anchor), svg_escape(style.fill),
                       style.bold ? " font-weight=\"bold\"" : "",
                       style.rotate != 0 ? fmt::format(" transform=\"rotate({} {} {})\"", num(style.rotate), num(x), num(y)) : "",
                       svg_escape(text));
}

std::string SvgDocument::str() const {
  return fmt::format(
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" "
      "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n{2}</svg>\n",
      num(width_), num(height_), body_);
}

double LinearScale::operator()(double v) const {
  if (d1 == d0) return (r0 + r1) / 2;
  return r0 + (v - d0) / (d1 - d0) * (r1 - r0);
}

std::vector<double> nice_ticks(double lo, double hi, int target) {
  GRADQ_CHECK(std::isfinite(lo) && std::isfinite(hi) && lo <= hi, "expected a finite range lo <= hi, got [{}, {}]", lo, hi);
  target = std::max(target, 2);
  if (hi == lo) {
    const double pad = lo == 0 ? 1 : std::abs(lo) * 0.5;
    lo -= lo == 0 ? 0 : pad;
    hi += pad;
  }
  const double raw = (hi - lo) / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    step = m * mag;
    if (step >= raw) break;
  }
  const double first = std::floor(lo / step) * step, last = std::ceil(hi / step) * step;
  std::vector<double> ticks;
  const auto n = static_cast<int64_t>(std::llround((last - first) / step));
  for (int64_t i = 0; i <= n; ++i) {
    double t = first + static_cast<double>(i) * step;
    if (std::abs(t) < step * 1e-9) t = 0;
    ticks.push_back(t);
  }
  return ticks;
}

std::string format_number(double v) {
  if (v == 0) return "0";
  const double a = std::abs(v);
  if (a < 1e-3 || a >= 1e6) return fmt::format("{:.3g}", v);
  return fmt::format("{:.4g}", v);
}

namespace {
// Height of the title and its notes (one line each) above a chart.
double heading_height(const std::string& title, const std::vector<std::string>& notes, double pad) {
  return (title.empty() ? pad : 30) + 16 * static_cast<double>(notes.size());
}

void draw_heading(SvgDocument& doc, const std::string& title, const std::vector<std::string>& notes) {
  if (!title.empty()) doc.text(doc.width() / 2, 20, title, {15, "middle", "#222", true});
  const double first = title.empty() ? 12 : 36;
  for (size_t i = 0; i < notes.size(); ++i)
    doc.text(doc.width() / 2, first + 16 * static_cast<double>(i), notes[i], {11, "middle", "#444"});
}

// One row of swatches with their labels, from (x, y).
void draw_legend(SvgDocument& doc, const std::vector<std::pair<std::string, std::string>>& legend, double x, double y,
                 double font) {
  for (const auto& [label, colour] : legend) {
    doc.rect(x, y, 12, 12, colour);
    doc.text(x + 16, y + 10, label, {font});
    x += 16 + text_width(label, font) + 18;
  }
}
}  // namespace

std::string render_bar_chart(const BarChart& chart) {
  const size_t n = chart.categories.size();
  GRADQ_CHECK(n > 0, "a bar chart needs at least one category");
  GRADQ_CHECK(!chart.series.empty(), "a bar chart needs at least one series");
  double lo = 0, hi = 0;
  for (const BarSeries& s : chart.series) {
    GRADQ_CHECK(s.values.size() == n, "series '{}' has {} values for {} categories", s.name, s.values.size(), n);
    for (double v : s.values) {
      GRADQ_CHECK(std::isfinite(v), "series '{}' has a non-finite value {}", s.name, v);
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
  }
  GRADQ_CHECK(chart.category_colors.empty() || chart.category_colors.size() == n,
              "expected {} category colours (one per category) or none, got {}", n, chart.category_colors.size());
  if (chart.stacked) {
    GRADQ_CHECK(!chart.horizontal && lo >= 0, "stacked bars are drawn vertically with values >= 0");
    for (size_t c = 0; c < n; ++c) {
      double total = 0;
      for (const BarSeries& s : chart.series) total += s.values[c];
      hi = std::max(hi, total);
    }
  }
  const std::vector<double> ticks = nice_ticks(lo, hi, 5);
  const size_t ns = chart.series.size();
  auto color = [&](size_t s, size_t c) {
    if (ns == 1 && !chart.category_colors.empty()) return chart.category_colors[c];
    return chart.series[s].color.empty() ? kChartPalette[s % kChartPalette.size()] : chart.series[s].color;
  };
  auto legend = chart.legend;
  if (legend.empty() && ns > 1)
    for (size_t s = 0; s < ns; ++s) legend.emplace_back(chart.series[s].name, color(s, 0));

  const double font = 12, pad = 12;
  const double title_h = heading_height(chart.title, chart.notes, pad);
  const double legend_h = legend.empty() ? 0 : 22;
  const double group = chart.bar_thickness * static_cast<double>(ns);
  const double step = group + std::max(4.0, chart.bar_thickness * 0.5);
  double label_extent = 0;
  for (const auto& c : chart.categories) label_extent = std::max(label_extent, text_width(c, font));
  const double value_label_room = chart.value_labels ? text_width("0.0000", font - 2) + 6 : 0;

  if (chart.horizontal) {
    const double left = pad + label_extent + 8 + (chart.category_label.empty() ? 0 : 20);
    const double right = pad + value_label_room;
    const double top = title_h + legend_h + 20;  // room for the tick labels above the plot
    const double plot_h = step * static_cast<double>(n);
    const double bottom = pad + (chart.value_label.empty() ? 0 : 24);
    const double width = std::max(chart.width, left + right + 200);
    SvgDocument doc(width, top + plot_h + bottom);
    const LinearScale x{ticks.front(), ticks.back(), left, width - right};
    draw_heading(doc, chart.title, chart.notes);
    draw_legend(doc, legend, left, title_h + 4, font);
    for (double t : ticks) {
      doc.line(x(t), top, x(t), top + plot_h, t == 0 ? "#888" : "#e0e0e0", 1);
      doc.text(x(t), top - 6, format_number(t), {font - 1, "middle", "#555"});
    }
    for (size_t c = 0; c < n; ++c) {
      const double y0 = top + step * static_cast<double>(c) + (step - group) / 2;
      doc.text(left - 6, y0 + group / 2 + font * 0.35, chart.categories[c], {font, "end"});
      for (size_t s = 0; s < ns; ++s) {
        const double v = chart.series[s].values[c];
        const double y = y0 + chart.bar_thickness * static_cast<double>(s);
        const double x0 = x(std::min(0.0, v)), x1 = x(std::max(0.0, v));
        doc.rect(x0, y + 1, x1 - x0, chart.bar_thickness - 2, color(s, c),
                 fmt::format("{} {}: {}", chart.categories[c], chart.series[s].name, format_number(v)));
        if (chart.value_labels)
          doc.text(x1 + 4, y + chart.bar_thickness / 2 + (font - 2) * 0.35, format_number(v), {font - 2, "start", "#444"});
      }
    }
    doc.line(x(0), top, x(0), top + plot_h, "#444", 1);
    if (!chart.value_label.empty()) doc.text((left + width - right) / 2, top + plot_h + 22, chart.value_label, {font, "middle"});
    if (!chart.category_label.empty())
      doc.text(pad + 6, top + plot_h / 2, chart.category_label, {font, "middle", "#222", false, -90});
    return doc.str();
  }

  // Vertical: categories along the bottom, labels rotated when they would collide.
  const bool rotate = label_extent > step - 4;
  const double left = pad + text_width("0.0000", font) + (chart.value_label.empty() ? 0 : 22);
  const double top = title_h + legend_h + (chart.value_labels ? 16 : 6);
  const double plot_h = 300;
  const double bottom = pad + (rotate ? label_extent * 0.71 + font : font + 6) + (chart.category_label.empty() ? 0 : 22);
  const double width = std::max(chart.width, left + pad + step * static_cast<double>(n));
  const double plot_w = width - left - pad;
  const double cstep = plot_w / static_cast<double>(n);
  SvgDocument doc(width, top + plot_h + bottom);
  const LinearScale y{ticks.front(), ticks.back(), top + plot_h, top};
  draw_heading(doc, chart.title, chart.notes);
  draw_legend(doc, legend, left, title_h + 4, font);
  for (double t : ticks) {
    doc.line(left, y(t), left + plot_w, y(t), t == 0 ? "#888" : "#e0e0e0", 1);
    doc.text(left - 6, y(t) + font * 0.35, format_number(t), {font - 1, "end", "#555"});
  }
  const double bar_w = chart.stacked ? std::min(chart.bar_thickness * 3, cstep * 0.8)
                                     : std::min(chart.bar_thickness, cstep * 0.8 / static_cast<double>(ns));
  for (size_t c = 0; c < n && chart.stacked; ++c) {
    const double cx = left + cstep * (static_cast<double>(c) + 0.5);
    double base = 0;
    for (size_t s = 0; s < ns; ++s) {
      const double v = chart.series[s].values[c];
      doc.rect(cx - bar_w / 2, y(base + v), bar_w, y(base) - y(base + v), color(s, c),
               fmt::format("{} {}: {}", chart.categories[c], chart.series[s].name, format_number(v)));
      base += v;
    }
    if (rotate)
      doc.text(cx, top + plot_h + 10, chart.categories[c], {font, "end", "#222", false, -45});
    else
      doc.text(cx, top + plot_h + font + 4, chart.categories[c], {font, "middle"});
  }
  for (size_t c = 0; c < n && !chart.stacked; ++c) {
    const double cx = left + cstep * (static_cast<double>(c) + 0.5);
    const double x0 = cx - bar_w * static_cast<double>(ns) / 2;
    for (size_t s = 0; s < ns; ++s) {
      const double v = chart.series[s].values[c];
      const double bx = x0 + bar_w * static_cast<double>(s);
      const double y0 = y(std::max(0.0, v)), y1 = y(std::min(0.0, v));
      doc.rect(bx + 0.5, y0, bar_w - 1, y1 - y0, color(s, c),
               fmt::format("{} {}: {}", chart.categories[c], chart.series[s].name, format_number(v)));
      if (chart.value_labels)
        doc.text(bx + bar_w / 2, y0 - 3, format_number(v), {font - 3, "middle", "#444"});
    }
    if (rotate)
      doc.text(cx, top + plot_h + 10, chart.categories[c], {font, "end", "#222", false, -45});
    else
      doc.text(cx, top + plot_h + font + 4, chart.categories[c], {font, "middle"});
  }
  doc.line(left, y(0), left + plot_w, y(0), "#444", 1);
  if (!chart.value_label.empty())
    doc.text(pad + 6, top + plot_h / 2, chart.value_label, {font, "middle", "#222", false, -90});
  if (!chart.category_label.empty())
    doc.text(left + plot_w / 2, top + plot_h + bottom - pad, chart.category_label, {font, "middle"});
  return doc.str();
}

std::string render_scatter_chart(const ScatterChart& chart) {
  double x_lo = INFINITY, x_hi = -INFINITY, y_lo = INFINITY, y_hi = -INFINITY;
  for (const ScatterSeries& s : chart.series)
    for (const ScatterPoint& p : s.points) {
      GRADQ_CHECK(std::isfinite(p.x) && std::isfinite(p.y), "series '{}' has a non-finite point ({}, {})", s.name, p.x,
                  p.y);
      x_lo = std::min(x_lo, p.x), x_hi = std::max(x_hi, p.x);
      y_lo = std::min(y_lo, p.y), y_hi = std::max(y_hi, p.y);
    }
  GRADQ_CHECK(std::isfinite(x_lo), "a scatter chart needs at least one point");
  if (chart.y_max) {
    y_hi = std::min(y_hi, *chart.y_max);
    y_lo = std::min(y_lo, y_hi);
  }
  // A single value still needs an interval to draw.
  if (x_hi - x_lo < 1e-9) x_lo -= 0.5, x_hi += 0.5;
  if (y_hi - y_lo < 1e-9) y_lo -= 0.5, y_hi += 0.5;
  const std::vector<double> x_ticks = nice_ticks(x_lo, x_hi, 8), y_ticks = nice_ticks(y_lo, y_hi, 6);
  auto color = [&](size_t s) {
    return chart.series[s].color.empty() ? kChartPalette[s % kChartPalette.size()] : chart.series[s].color;
  };
  std::vector<std::pair<std::string, std::string>> legend;
  for (size_t s = 0; s < chart.series.size(); ++s) legend.emplace_back(chart.series[s].name, color(s));

  const double font = 12, pad = 12;
  const double heading = heading_height(chart.title, chart.notes, pad);
  const double top = heading + (legend.empty() ? 0 : 22) + 8;
  const double left = pad + text_width("0.0000", font) + (chart.y_label.empty() ? 0 : 22);
  const double right = pad + 90;  // room for the labels of the rightmost points
  const double bottom = pad + font + 6 + (chart.x_label.empty() ? 0 : 22);
  // The notes add to the document's height: the plot keeps the size the chart asks for.
  SvgDocument doc(chart.width, chart.height + 16 * static_cast<double>(chart.notes.size()));
  const LinearScale x{x_ticks.front(), x_ticks.back(), left, chart.width - right};
  const LinearScale y{y_ticks.front(), y_ticks.back(), doc.height() - bottom, top};
  draw_heading(doc, chart.title, chart.notes);
  draw_legend(doc, legend, left, top - 26, font);
  for (double t : x_ticks) {
    doc.line(x(t), y.r0, x(t), y.r1, "#e0e0e0", 1);
    doc.text(x(t), y.r0 + font + 4, format_number(t), {font - 1, "middle", "#555"});
  }
  for (double t : y_ticks) {
    doc.line(x.r0, y(t), x.r1, y(t), t == 0 ? "#888" : "#e0e0e0", 1);
    doc.text(x.r0 - 6, y(t) + font * 0.35, format_number(t), {font - 1, "end", "#555"});
  }
  for (size_t s = 0; s < chart.series.size(); ++s) {
    const ScatterSeries& series = chart.series[s];
    const double top_value = y_ticks.back();
    auto shown_y = [&](double v) { return y(std::min(v, top_value)); };
    if (series.connect && series.points.size() > 1) {
      std::vector<std::pair<double, double>> line;
      for (const ScatterPoint& p : series.points) line.emplace_back(x(p.x), shown_y(p.y));
      doc.polyline(line, color(s), 1.5);
    }
    for (const ScatterPoint& p : series.points) {
      if (!series.markers) break;
      const bool off_scale = p.y > top_value;
      const std::string tooltip = fmt::format("{}{}{}: ({}, {})", series.name, p.label.empty() ? "" : " ", p.label,
                                              format_number(p.x), format_number(p.y));
      if (off_scale) doc.circle(x(p.x), shown_y(p.y), 4.5, "#ffffff", tooltip);
      doc.circle(x(p.x), shown_y(p.y), off_scale ? 2.5 : 4.5, color(s), tooltip);
      // Off-scale points sit on the top edge: their label (with the value) goes below it, clear of
      // the legend.
      const std::string label = off_scale ? fmt::format("{}: {}", p.label, format_number(p.y)) : p.label;
      if (!label.empty())
        doc.text(x(p.x) + (off_scale ? 0 : 7), shown_y(p.y) + (series.labels_below || off_scale ? 15 : -6), label,
                 {font - 2, off_scale ? "middle" : "start", "#444"});
    }
  }
  doc.line(x.r0, y.r0, x.r1, y.r0, "#444", 1);
  doc.line(x.r0, y.r0, x.r0, y.r1, "#444", 1);
  if (!chart.x_label.empty()) doc.text((x.r0 + x.r1) / 2, doc.height() - pad, chart.x_label, {font, "middle"});
  if (!chart.y_label.empty())
    doc.text(pad + 6, (y.r0 + y.r1) / 2, chart.y_label, {font, "middle", "#222", false, -90});
  return doc.str();
}

void write_svg(const std::string& path, const std::string& svg) { write_file_atomically(path, svg); }

}  // namespace gradq
