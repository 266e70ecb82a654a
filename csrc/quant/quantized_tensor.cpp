#include "quant/quantized_tensor.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace gradq {

const char* rounding_method_name(RoundingMethod method) {
  switch (method) {
    case RoundingMethod::kClip: return "clip";
    case RoundingMethod::kTrained: return "trained";
    default: return "rtn";
  }
}

RoundingMethod parse_rounding_method(const std::string& name) {
  for (RoundingMethod m : {RoundingMethod::kRtn, RoundingMethod::kClip, RoundingMethod::kTrained})
    if (name == rounding_method_name(m)) return m;
  TORCH_CHECK(false, "rounding method must be rtn, clip or trained, got '", name, "'");
}

at::Tensor QuantizedTensor::dequantize() const {
  if (spec.is_integer()) return gradq::dequantize(packed);
  if (spec.level == QuantLevel::kPrune) return at::zeros({out_features, in_features}, at::kFloat);
  return values.to(at::kFloat);
}

QuantizedTensor quantize_tensor(const at::Tensor& w, const QuantSpec& spec, RoundingMethod method,
                                const at::Tensor& act_sq_mean, const ClipSearchOptions& clip) {
  spec.validate();
  TORCH_CHECK(method != RoundingMethod::kTrained || !spec.is_integer(),
              "quantize_tensor: trained rounding needs calibration statistics; use apply_plan or train_rounding");
  TORCH_CHECK(w.dim() == 2, "quantize_tensor: weight must be 2-D [out, in], got ", w.sizes());
  QuantizedTensor q;
  q.spec = spec;
  q.out_features = w.size(0);
  q.in_features = w.size(1);
  switch (spec.level) {
    case QuantLevel::kPrune: break;
    case QuantLevel::kFp16: q.values = w.to(at::kHalf).contiguous(); break;
    case QuantLevel::kBf16: q.values = w.to(at::kBFloat16).contiguous(); break;
    case QuantLevel::kFp32: q.values = w.to(at::kFloat).contiguous().clone(); break;
    default:
      q.packed = method == RoundingMethod::kClip ? quantize_clipped(w, spec, act_sq_mean, clip) : quantize(w, spec);
  }
  return q;
}

QuantizedTensor quantized_tensor_from_packed(PackedWeight packed) {
  packed.validate();
  QuantizedTensor q;
  q.spec = packed.spec;
  q.out_features = packed.out_features;
  q.in_features = packed.in_features;
  q.packed = std::move(packed);
  return q;
}

}  // namespace gradq
