#include "report/analysis_chart.h"

#include <algorithm>
#include <fmt/format.h>
#include <map>

#include "report/svg_chart.h"

namespace gradq {

std::string analysis_chart_svg(const ImportanceAnalysis& a) {
  BarChart chart;
  chart.title = "Per-layer importance (combined score)";
  chart.value_label = fmt::format("combined score ({}-normalized, weighted)", score_normalization_name(a.options.config.normalization));
  BarSeries series;
  series.name = "score";
  std::map<std::string, size_t> block_color;
  for (const auto& u : a.units) {
    if (u.unit.kind != UnitKind::kLayer) continue;
    chart.categories.push_back(fmt::format("#{} {}", u.rank, u.unit.name));
    series.values.push_back(u.score);
    auto it = block_color.emplace(u.unit.block, block_color.size()).first;
    chart.category_colors.push_back(kChartPalette[it->second % kChartPalette.size()]);
  }
  if (chart.categories.empty()) {  // a model without layer units: chart the blocks
    chart.category_colors.clear();
    for (const auto& u : a.units) {
      chart.categories.push_back(fmt::format("#{} {}", u.rank, u.unit.name));
      series.values.push_back(u.score);
    }
  }
  chart.series.push_back(std::move(series));
  if (block_color.size() > 1 && block_color.size() <= 8)
    for (const auto& [block, index] : block_color)
      chart.legend.emplace_back(block.empty() ? "(no block)" : block, kChartPalette[index % kChartPalette.size()]);
  std::sort(chart.legend.begin(), chart.legend.end(), [&](const auto& x, const auto& y) {
    return block_color.at(x.first == "(no block)" ? "" : x.first) < block_color.at(y.first == "(no block)" ? "" : y.first);
  });
  return render_bar_chart(chart);
}

}  // namespace gradq
