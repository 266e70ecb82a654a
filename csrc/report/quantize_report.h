#pragma once
// The report of a quantization run: JSON for machines, a readable summary for people, and three
// SVG images (bits per block, stacked by precision level; the level distribution; each weight's format).

#include <string>

#include "model/quantizable_model.h"
#include "orchestrator/gradual_quantizer.h"

namespace gradq {

/// What the report says about the files around the run.
struct ReportFiles {
  std::string model, output;      ///< paths
  int64_t model_bytes = 0;        ///< input checkpoint file size
  int64_t output_bytes = 0;       ///< packed output file size (0 when none was written)
  std::string budget;             ///< Budget::describe()
};

/// Per level of the ladder (in ladder order, only levels present): units, % of units, parameters,
/// % of parameters, bytes.
struct LevelShare {
  QuantLevel level;
  int64_t units = 0, parameters = 0, bytes = 0;
};
std::vector<LevelShare> level_distribution(const QuantizableModel& model, const QuantizeOutcome& outcome);

std::string quantize_report_json(const QuantizableModel& model, const QuantizeOutcome& outcome,
                                 const ReportFiles& files);
std::string format_quantize_summary(const QuantizableModel& model, const QuantizeOutcome& outcome,
                                    const ReportFiles& files);
// Every chart names under its title the model and the budget (`files`) and what the run achieved:
// bits per weight, size against fp16 and, when validated, the held-out perplexity change and KL.
/// Stacked bars: per block (and "other" for weights outside blocks), parameters at each level.
std::string bits_per_block_svg(const QuantizableModel& model, const QuantizeOutcome& outcome, const ReportFiles& files);
/// Bars: share of the quantizable parameters at each level.
std::string level_distribution_svg(const QuantizableModel& model, const QuantizeOutcome& outcome,
                                   const ReportFiles& files);
/// One bar per quantized weight, block by block: its bits per weight, labelled with its block, name
/// and format (bits and group size, e.g. b4g32), coloured by level. Weights left in floating point
/// are named in a note.
std::string weight_formats_svg(const QuantizableModel& model, const QuantizeOutcome& outcome, const ReportFiles& files);

}  // namespace gradq
