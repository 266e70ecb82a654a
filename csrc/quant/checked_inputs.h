#pragma once
// Checks of the inputs that the calibration-driven quantizers (GPTQ, trained rounding) share: a
// weight and the X^T X of its inputs. Messages start with the caller's name, as every quantizer's do.

#include <ATen/ATen.h>

#include <string>

#include "common/error.h"

namespace gradq {

/// `w` as a contiguous float32 [out, in] with in > 0 and finite values; throws gradq::Error otherwise.
inline at::Tensor checked_weight(const at::Tensor& w, const char* who) {
  GRADQ_CHECK(w.defined() && w.dim() == 2, "{}: expected a 2-D weight [out_features, in_features], got {}", who,
              w.defined() ? std::to_string(w.dim()) + "-D" : std::string("an undefined tensor"));
  GRADQ_CHECK(w.is_floating_point(), "{}: expected a floating-point weight, got {}", who,
              c10::toString(w.scalar_type()));
  GRADQ_CHECK(w.size(1) > 0, "{}: expected in_features > 0, got [{}, {}]", who, w.size(0), w.size(1));
  at::Tensor wf = w.to(at::kFloat).contiguous();
  GRADQ_CHECK(at::isfinite(wf).all().item<bool>(), "{}: the weight holds NaN or inf values", who);
  return wf;
}

/// `xtx` [in, in] (float32 or float64, finite) as float64 on `device`; throws gradq::Error otherwise.
inline at::Tensor checked_xtx(const at::Tensor& xtx, int64_t in, const at::Device& device, const char* who) {
  GRADQ_CHECK(xtx.defined(), "{}: expected XtX [{}, {}], got an undefined tensor", who, in, in);
  GRADQ_CHECK(xtx.dim() == 2 && xtx.size(0) == in && xtx.size(1) == in,
              "{}: expected XtX [in_features, in_features] = [{}, {}], got {}", who, in, in, c10::str(xtx.sizes()));
  GRADQ_CHECK(xtx.scalar_type() == at::kFloat || xtx.scalar_type() == at::kDouble,
              "{}: expected XtX float32 or float64, got {}", who, c10::toString(xtx.scalar_type()));
  const at::Tensor h = xtx.to(device, at::kDouble);
  GRADQ_CHECK(at::isfinite(h).all().item<bool>(), "{}: XtX holds NaN or inf values", who);
  return h;
}

}  // namespace gradq
