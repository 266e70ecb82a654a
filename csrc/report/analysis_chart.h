#pragma once
// The importance analysis as a picture: `gradq analyze --chart`.

#include <string>

#include "importance/analyzer.h"

namespace gradq {

/// SVG bar chart of the per-layer combined scores in model order, labelled with their ranks and
/// coloured by block (the blocks' scores for a model without layer units).
std::string analysis_chart_svg(const ImportanceAnalysis& analysis);

}  // namespace gradq
