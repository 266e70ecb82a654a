#pragma once
// Checks of the inputs that the calibration-driven quantizers (GPTQ, trained rounding) share: a
// weight and the X^T X of its inputs. Messages start with the caller's name, as every quantizer's do.

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "common/error.h"

namespace gradq {

/// Whether every element of `t` is finite, checked a slice of rows at a time: at::isfinite(t) on the
/// whole tensor makes two temporaries of its size (|t| and the mask), 349 MB beside the X^T X of a
/// 5632-input weight (TinyLlama's down projection) that GPTQ is about to factor. Slices of about 256K
/// elements keep those at about 1 MB (at 1M elements, 4 MB of them were in a 256-wide model's heap peak).
inline bool all_finite(const at::Tensor& t) {
  if (t.dim() == 0 || t.numel() == 0) return t.numel() == 0 || at::isfinite(t).all().item<bool>();
  const int64_t row = t.numel() / t.size(0);
  const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(row, 1));
  for (int64_t i = 0; i < t.size(0); i += rows)
    if (!at::isfinite(t.narrow(0, i, std::min(rows, t.size(0) - i))).all().item<bool>()) return false;
  return true;
}

/// `w` as a contiguous float32 [out, in] with in > 0 and finite values; throws gradq::Error otherwise.
inline at::Tensor checked_weight(const at::Tensor& w, const char* who) {
  GRADQ_CHECK(w.defined() && w.dim() == 2, "{}: expected a 2-D weight [out_features, in_features], got {}", who,
              w.defined() ? std::to_string(w.dim()) + "-D" : std::string("an undefined tensor"));
  GRADQ_CHECK(w.is_floating_point(), "{}: expected a floating-point weight, got {}", who,
              c10::toString(w.scalar_type()));
  GRADQ_CHECK(w.size(1) > 0, "{}: expected in_features > 0, got [{}, {}]", who, w.size(0), w.size(1));
  at::Tensor wf = w.to(at::kFloat).contiguous();
  GRADQ_CHECK(all_finite(wf), "{}: the weight holds NaN or inf values", who);
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
  GRADQ_CHECK(all_finite(h), "{}: XtX holds NaN or inf values", who);
  return h;
}

}  // namespace gradq
