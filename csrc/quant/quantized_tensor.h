#pragma once
// One weight in the format a plan chose for it: what the search evaluates (dequantize()) and what
// export stores (the packed tensors, or the values in a float type). Every level of the ladder
// (quant_spec.h) has one representation here, so accounting, fake-quant and export agree.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>

#include "quant/gptq.h"
#include "quant/packed_weight.h"
#include "quant/quant_spec.h"
#include "quant/quantize.h"
#include "quant/trained_rounding.h"

namespace gradq {

struct QuantizedTensor {
  QuantSpec spec;
  int64_t out_features = 0;
  int64_t in_features = 0;
  PackedWeight packed;  ///< integer levels
  at::Tensor values;    ///< float levels: logical [out, in] in fp16, bf16 or fp32; undefined for prune

  /// float32 [out, in]: the weight the quantized model computes with (zeros for prune).
  at::Tensor dequantize() const;
  /// Bytes as stored: spec.storage_bytes(out_features, in_features).
  int64_t storage_bytes() const { return spec.storage_bytes(out_features, in_features); }
};

/// Quantized weights by parameter name (QuantizableModel::weights() names).
using QuantizedWeights = std::map<std::string, QuantizedTensor>;

/// How integer codes are chosen. The quantizers all live in csrc/quant; the search only picks one.
enum class RoundingMethod {
  kRtn,      ///< round to nearest over the min-max range (quantize)
  kClip,     ///< per-group range search, activation-weighted when statistics exist (quantize_clipped)
  kTrained,  ///< learned rounding offsets and ranges (trained_rounding.h); needs X^T X
  kGptq,     ///< GPTQ with static groups and clipped ranges (gptq.h); needs X^T X
};
const char* rounding_method_name(RoundingMethod method);
/// Inverse of rounding_method_name; throws gradq::Error listing the names.
RoundingMethod parse_rounding_method(const std::string& name);
/// Whether `method` needs the calibration X^T X of the weight's input (kTrained, kGptq).
bool rounding_needs_xtx(RoundingMethod method);

/// The options of the methods that take any.
struct RoundingOptions {
  ClipSearchOptions clip;          ///< kClip, and kGptq's group ranges
  TrainedRoundingOptions trained;  ///< kTrained
  GptqOptions gptq;                ///< kGptq
};

/// Quantizes a logical [out, in] float weight to `spec` with `method`. Non-integer levels ignore the
/// method. `act_sq_mean` (float [in], or undefined: unweighted) weights kClip's search. `xtx`
/// (float [in, in], the calibration sum of x^T x) is needed by kTrained and kGptq (gradq::Error
/// without it) and ignored by the others; moved in, it is freed as early as kGptq allows
/// (quantize_gptq).
QuantizedTensor quantize_tensor(const at::Tensor& w, const QuantSpec& spec, RoundingMethod method = RoundingMethod::kRtn,
                                const at::Tensor& act_sq_mean = {}, at::Tensor xtx = {},
                                const RoundingOptions& options = {});

/// Wraps integer codes computed elsewhere (e.g. by trained rounding) as a QuantizedTensor.
QuantizedTensor quantized_tensor_from_packed(PackedWeight packed);

}  // namespace gradq
