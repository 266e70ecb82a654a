#include "quant/quantized_tensor.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common/error.h"

namespace gradq {

const char* rounding_method_name(RoundingMethod method) {
  switch (method) {
    case RoundingMethod::kClip: return "clip";
    case RoundingMethod::kTrained: return "trained";
    case RoundingMethod::kGptq: return "gptq";
    default: return "rtn";
  }
}

RoundingMethod parse_rounding_method(const std::string& name) {
  for (RoundingMethod m : {RoundingMethod::kRtn, RoundingMethod::kClip, RoundingMethod::kTrained, RoundingMethod::kGptq})
    if (name == rounding_method_name(m)) return m;
  throw Error(fmt::format("rounding method must be rtn, clip, trained or gptq, got '{}'", name));
}

bool rounding_needs_xtx(RoundingMethod method) {
  return method == RoundingMethod::kTrained || method == RoundingMethod::kGptq;
}

at::Tensor QuantizedTensor::dequantize() const {
  if (spec.is_integer()) return gradq::dequantize(packed);
  if (spec.level == QuantLevel::kPrune) return at::zeros({out_features, in_features}, at::kFloat);
  return values.to(at::kFloat);
}

QuantizedTensor quantize_tensor(const at::Tensor& w, const QuantSpec& spec, RoundingMethod method,
                                const at::Tensor& act_sq_mean, at::Tensor xtx, const RoundingOptions& options) {
  spec.validate();
  GRADQ_CHECK(!spec.is_integer() || !rounding_needs_xtx(method) || xtx.defined(),
              "{} rounding needs the calibration X^T X of the weight's input, got none", rounding_method_name(method));
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
      switch (method) {
        case RoundingMethod::kRtn: q.packed = quantize(w, spec); break;
        case RoundingMethod::kClip: q.packed = quantize_clipped(w, spec, act_sq_mean, options.clip); break;
        case RoundingMethod::kTrained: q.packed = train_rounding(w, spec, xtx, options.trained).packed; break;
        case RoundingMethod::kGptq: q.packed = quantize_gptq(w, spec, std::move(xtx), options.gptq, options.clip); break;
      }
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
