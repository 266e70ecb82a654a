#pragma once
// A straightforward GPTQ, the tests' reference for csrc/quant/gptq.cpp: one column at a time in
// the order of descending diag(XtX) (std::stable_sort here), element by element with quant_math.h,
// every remaining column updated right after each column (no lazy batches), U from an explicit
// inverse of the dampened H (LU, not Cholesky) and its Cholesky factor. The static group parameters
// are quantize_clipped's (or quantize()'s without the clip search) on the original weight, as
// gptq.h defines them. Header-only: the quant suite links only libgradq_ops.

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "quant/quant_math.h"
#include "quant/quantize.h"

namespace gradq::test {

/// Codes [out, in] (int32) that GPTQ chooses, and the stored group parameters they go with.
struct GptqRef {
  at::Tensor codes;  // int32 [out, in]
  PackedWeight grid; // the static group parameters (its codes are round-to-nearest's, unused)
};

inline GptqRef gptq_ref(const at::Tensor& w, const QuantSpec& spec, const at::Tensor& xtx, double damp = 0.01,
                        bool act_order = true, bool clip_search = true) {
  const int64_t out = w.size(0), in = w.size(1);
  const at::Tensor diag = xtx.diagonal().to(at::kDouble).contiguous();
  std::vector<int64_t> order(in);
  std::iota(order.begin(), order.end(), 0);
  if (act_order) {
    const double* d = diag.data_ptr<double>();
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return d[a] > d[b]; });
  }
  at::Tensor h = xtx.to(at::kDouble) + xtx.to(at::kDouble).t();
  for (int64_t j = 0; j < in; ++j)
    if (h[j][j].item<double>() == 0.0) h[j][j] = 1.0;
  const at::Tensor perm = at::tensor(order, at::kLong);
  h = h.index_select(0, perm).index_select(1, perm);
  h += at::eye(in, at::kDouble) * (damp * h.diagonal().mean().item<double>());
  const at::Tensor u_t = at::linalg_cholesky(at::inverse(h)).t().contiguous();  // upper: H^-1 = U^T U
  const auto U = u_t.accessor<double, 2>();

  GptqRef r;
  r.grid = clip_search ? quantize_clipped(w, spec, xtx.diagonal().to(at::kFloat)) : quantize(w, spec);
  // The grid's stored scales and zero points, read per group by the format's own reader.
  const PackedView grid(r.grid);
  const auto S = [&](int64_t row, int64_t g) { return grid.scale(row, g); };
  const auto Z = [&](int64_t row, int64_t g) { return grid.zero(row, g); };
  at::Tensor wd = w.to(at::kDouble).contiguous();
  auto W = wd.accessor<double, 2>();
  r.codes = at::empty({out, in}, at::kInt);
  auto C = r.codes.accessor<int32_t, 2>();
  const int64_t glen = spec.group_len(in);
  for (int64_t i = 0; i < in; ++i) {
    const int64_t c = order[i], g = c / glen;
    for (int64_t row = 0; row < out; ++row) {
      const float s = S(row, g), z = Z(row, g);
      const uint32_t code = quant_code(static_cast<float>(W[row][c]), quant_inv_scale(s), z, spec.bits());
      C[row][c] = static_cast<int32_t>(code);
      const double err = (W[row][c] - static_cast<double>(quant_dequant(code, s, z))) / U[i][i];
      for (int64_t j = i + 1; j < in; ++j) W[row][order[j]] -= err * U[i][j];
    }
  }
  return r;
}

/// The codes of a packed weight, one per element: int32 [out, in].
inline at::Tensor unpack_codes(const PackedWeight& p) {
  at::Tensor out = at::empty({p.out_features, p.in_features}, at::kInt);
  auto O = out.accessor<int32_t, 2>();
  const int bits = p.spec.bits();
  for (int64_t r = 0; r < p.out_features; ++r) {
    const uint8_t* row = p.codes.data_ptr<uint8_t>() + r * p.codes.size(1);
    for (int64_t i = 0; i < p.in_features; ++i) O[r][i] = static_cast<int32_t>(quant_unpack_code(row, i, bits));
  }
  return out;
}

}  // namespace gradq::test
