#pragma once
// One weight in the format a plan chose for it: what the search evaluates (dequantize()) and what
// export stores (the packed tensors, or the values in a float type). Every level of the ladder
// (quant_spec.h) has one representation here, so accounting, fake-quant and export agree.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "quant/packed_weight.h"
#include "quant/quant_spec.h"
#include "quant/quantize.h"

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

/// How integer codes are chosen.
enum class RoundingMethod {
  kRtn,   ///< round to nearest over the min-max range
  kClip,  ///< quantize_clipped: per-group range search, activation-weighted when statistics exist
  kTrained,  ///< learned rounding offsets and ranges (optimizer/trained_rounding.h); needs X^T X
};
const char* rounding_method_name(RoundingMethod method);
/// Inverse of rounding_method_name; throws c10::Error listing the names.
RoundingMethod parse_rounding_method(const std::string& name);

/// Quantizes a logical [out, in] float weight to `spec`. `act_sq_mean` (float [in], or undefined)
/// weights the clipping search; it is ignored by kRtn and by non-integer levels. kTrained needs the
/// calibration X^T X and lives in libgradq: see apply_plan (optimizer/plan.h).
QuantizedTensor quantize_tensor(const at::Tensor& w, const QuantSpec& spec, RoundingMethod method = RoundingMethod::kRtn,
                                const at::Tensor& act_sq_mean = {}, const ClipSearchOptions& clip = {});

/// Wraps integer codes computed elsewhere (e.g. by trained rounding) as a QuantizedTensor.
QuantizedTensor quantized_tensor_from_packed(PackedWeight packed);

}  // namespace gradq
