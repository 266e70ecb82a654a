#include "quant/gptq.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "common/error.h"
#include "quant/checked_inputs.h"
#include "quant/quant_math.h"

namespace gradq {
namespace {

// H = 2 * the symmetric part of XtX, float64 on `device`.
at::Tensor checked_hessian(const at::Tensor& xtx, int64_t in, const at::Device& device) {
  const at::Tensor h = checked_xtx(xtx, in, device, "quantize_gptq");
  return h + h.t();
}

// Rows of W^T updated per product after each block of columns (see the loop in quantize_gptq).
constexpr int64_t kUpdateRows = 256;

// gptq_column_order from diag(XtX) alone.
at::Tensor column_order(const at::Tensor& diagonal, bool act_order) {
  if (!act_order) return at::arange(diagonal.size(0), diagonal.options().dtype(at::kLong));
  // Stable, so that equal diagonals (dead inputs, duplicated channels) keep index order on every
  // device.
  return std::get<1>(at::sort(diagonal.to(at::kDouble), /*stable=*/true, /*dim=*/0, /*descending=*/true));
}


void check_gptq_arguments(const QuantSpec& spec, const GptqOptions& options) {
  GRADQ_CHECK(spec.is_integer(), "quantize_gptq: expected an integer level (int2, int3, int4, int8), got {}",
              quant_level_name(spec.level));
  spec.validate();
  GRADQ_CHECK(std::isfinite(options.damp) && options.damp >= 0.0,
              "quantize_gptq: expected a dampening >= 0 (a fraction of the mean diagonal), got {}", options.damp);
  GRADQ_CHECK(options.block_size >= 1, "quantize_gptq: expected block_size >= 1, got {}", options.block_size);
}

PackedWeight quantize_with_factor(const at::Tensor& wf, const QuantSpec& spec, const GptqFactor& factor,
                                  const GptqOptions& options, const ClipSearchOptions& clip) {
  const int64_t out = wf.size(0), in = wf.size(1);
  const at::Tensor& perm = factor.order;
  const at::Tensor& u = factor.u;
  // Static groups: the stored parameters of every group, from the original weight. The search is
  // quantize_clipped's, weighted by diag(XtX) (proportional to the mean of x^2 that kClip uses).
  const at::Tensor w_cpu = wf.cpu();
  const PackedWeight grid = options.clip_search
                                ? quantize_clipped(w_cpu, spec, factor.diagonal.to(at::kFloat).cpu(), clip)
                                : quantize(w_cpu, spec);
  // Stored scales (exact in fp32; k formats' effective ones) and zero points, per group.
  auto [group_scales, group_zeros] = group_scales_and_zeros(grid);
  const at::Tensor scales = group_scales.to(wf.device());
  const at::Tensor zeros = group_zeros.to(wf.device());

  // Work on W^T [in, out] in column order, so that a column is a contiguous row.
  at::Tensor wt = wf.t().index_select(0, perm).to(at::kDouble).contiguous();
  // Group parameters as [groups, out] rows, looked up per column (not expanded to [in, out]: three
  // more copies of the weight's size in float32).
  const at::Tensor scale_t = scales.t().contiguous();
  const at::Tensor zero_t = zeros.t().contiguous();
  const at::Tensor inv_t = at::where(scale_t != 0, at::ones_like(scale_t) / scale_t, at::zeros_like(scale_t));
  const at::Tensor group_of = perm.div(spec.group_len(in), "floor").cpu();
  const auto group_at = group_of.accessor<int64_t, 1>();
  const double max_code = quant_max_code(spec.bits());
  at::Tensor codes_t = at::empty({in, out}, wf.options().dtype(at::kByte));  // codes are 0..255

  for (int64_t i1 = 0; i1 < in; i1 += options.block_size) {
    const int64_t count = std::min(options.block_size, in - i1);
    at::Tensor block = wt.narrow(0, i1, count).clone();  // [count, out]
    at::Tensor err = at::empty_like(block);
    const at::Tensor u_block = u.narrow(0, i1, count).narrow(1, i1, count);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t c = i1 + i;
      const int64_t g = group_at[c];
      const at::Tensor col = block[i];
      // quant_code of the float32 value, operation for operation; then quant_dequant.
      const at::Tensor code =
          at::clamp(at::round(col.to(at::kFloat) * inv_t[g]) + zero_t[g], 0.0, max_code);
      codes_t[c].copy_(code);
      const at::Tensor q = (scale_t[g] * (code - zero_t[g])).to(at::kDouble);
      const at::Tensor e = (col - q) / u_block[i][i];
      err[i].copy_(e);
      if (i + 1 < count) {
        block.narrow(0, i + 1, count - i - 1)
            .sub_(u_block[i].narrow(0, i + 1, count - i - 1).unsqueeze(1) * e.unsqueeze(0));
      }
    }
    // The block's error passed on to the columns after it, a slice of rows at a time: the product for
    // all of them at once is [rest, out] float64, 87 MB for TinyLlama's gate projection, on top of
    // GPTQ's other work matrices. The codes still equal the column-by-column reference's (tested),
    // and the output bytes the unsliced product's (stories260K and TinyLlama's shapes).
    const int64_t first = i1 + count;
    for (int64_t r = first; r < in; r += kUpdateRows) {
      const int64_t n = std::min(kUpdateRows, in - r);
      wt.narrow(0, r, n).sub_(u.narrow(0, i1, count).narrow(1, r, n).t().matmul(err));
    }
  }
  // Back to [out, in] in index order.
  const at::Tensor codes = at::empty_like(codes_t).index_copy_(0, perm, codes_t).t();
  return with_codes(grid, codes);
}

}  // namespace

at::Tensor gptq_column_order(const at::Tensor& xtx, bool act_order) { return column_order(xtx.diagonal(), act_order); }

GptqFactor gptq_factor(at::Tensor xtx, const GptqOptions& options, const at::Device& device) {
  GRADQ_CHECK(std::isfinite(options.damp) && options.damp >= 0.0,
              "quantize_gptq: expected a dampening >= 0 (a fraction of the mean diagonal), got {}", options.damp);
  GRADQ_CHECK(xtx.defined() && xtx.dim() == 2, "quantize_gptq: expected XtX [in_features, in_features], got {}",
              xtx.defined() ? c10::str(xtx.sizes()) : std::string("an undefined tensor"));
  const int64_t in = xtx.size(1);
  at::Tensor h = checked_hessian(xtx, in, device);
  GRADQ_CHECK((h.diagonal() >= 0).all().item<bool>(),
              "quantize_gptq: expected XtX with a diagonal >= 0 (sums of squares), got {}",
              h.diagonal().min().item<double>());
  GptqFactor factor;
  factor.damp = options.damp;
  factor.act_order = options.act_order;
  // Everything further needs only diag(XtX) and H; a caller that moved XtX in frees it here.
  factor.diagonal = xtx.diagonal().to(at::kDouble).clone();
  xtx.reset();
  factor.order = column_order(factor.diagonal.to(device), options.act_order);
  // U: upper Cholesky factor of H^-1 (H^-1 = U^T U). Each [in, in] float64 matrix on the way is
  // released as soon as the next is made (at most two live at once): 242 MiB each for 5632 inputs
  // (a 1B model's down projection), where holding them all (H as given and permuted, its factor,
  // the inverse, U) was five.
  // An input that is always 0 gets diag 1: its column is rounded with no error passed on (H is
  // block diagonal there, so no error reaches it either, wherever it is in the order).
  h.diagonal().masked_fill_(h.diagonal() == 0, 1.0);
  h = h.index_select(0, factor.order);
  h = h.index_select(1, factor.order);
  h.diagonal().add_(options.damp * h.diagonal().mean().item<double>());
  auto [chol, info] = at::linalg_cholesky_ex(h);
  GRADQ_CHECK(info.item<int64_t>() == 0,
              "quantize_gptq: H + dampening is not positive definite (leading minor {} of {}); expected a larger "
              "dampening than {}",
              info.item<int64_t>(), in, options.damp);
  h.reset();
  at::Tensor inverse = at::cholesky_inverse(chol);
  chol.reset();
  factor.u = at::linalg_cholesky(inverse, /*upper=*/true);
  return factor;
}

PackedWeight quantize_gptq(const at::Tensor& w, const QuantSpec& spec, at::Tensor xtx,
                           const GptqOptions& options, const ClipSearchOptions& clip) {
  check_gptq_arguments(spec, options);
  const at::Tensor wf = checked_weight(w, "quantize_gptq");
  GRADQ_CHECK(!xtx.defined() || xtx.dim() != 2 || xtx.size(0) == wf.size(1),
              "quantize_gptq: expected XtX [in_features, in_features] = [{}, {}], got {}", wf.size(1), wf.size(1),
              c10::str(xtx.sizes()));
  return quantize_with_factor(wf, spec, gptq_factor(std::move(xtx), options, wf.device()), options, clip);
}

PackedWeight quantize_gptq(const at::Tensor& w, const QuantSpec& spec, const GptqFactor& factor,
                           const GptqOptions& options, const ClipSearchOptions& clip) {
  check_gptq_arguments(spec, options);
  const at::Tensor wf = checked_weight(w, "quantize_gptq");
  GRADQ_CHECK(factor.u.defined() && factor.u.size(0) == wf.size(1),
              "quantize_gptq: expected a factor for {} inputs, got one for {}", wf.size(1),
              factor.u.defined() ? factor.u.size(0) : 0);
  GRADQ_CHECK(factor.u.device() == wf.device(), "quantize_gptq: expected a factor on the weight's device {}, got {}",
              wf.device().str(), factor.u.device().str());
  GRADQ_CHECK(factor.damp == options.damp && factor.act_order == options.act_order,
              "quantize_gptq: the factor was made with dampening {} and act_order {}, the options ask for {} and {}",
              factor.damp, factor.act_order, options.damp, options.act_order);
  return quantize_with_factor(wf, spec, factor, options, clip);
}

}  // namespace gradq
