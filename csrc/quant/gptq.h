#pragma once
// GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
// Transformers", 2023; IST-DASLab/gptq) for one weight W [out, in] in one integer QuantSpec.
//
// It minimises the layer's output error over the calibration rows x,
//   L = sum_x |x (W - W_q)^T|^2 = trace((W - W_q) XtX (W - W_q)^T),
// by quantizing W one input column at a time and moving each column's rounding error onto the
// columns not yet quantized, weighted by the inverse Hessian H^-1, H = 2 XtX:
//  * dampening: H += damp * mean(diag(H)) * I, so that H is positive definite even when some inputs
//    are (nearly) collinear; an input that is always 0 (diag 0) gets diag 1 first, so its column is
//    rounded to nearest with no error passed on (GPTQ also zeroes such a column of W; gradq keeps
//    it, since nothing in the calibration data says it is unused elsewhere);
//  * activation order: columns in descending diag(H) (stable sort), the most used inputs first,
//    while their errors can still be absorbed by many columns;
//  * static groups: every group's scale and zero point are chosen from the ORIGINAL weight's
//    contiguous group along in_features, before any error feedback, so the stored format is the
//    ordinary one (quant_spec.h) whatever the column order; the range of each group comes from
//    quantize_clipped's search (weighted by diag(XtX), as the clip method weights it by the mean
//    of x^2) or, with clip_search off, from the min-max range as quantize() takes it;
//  * codes: column c is rounded with quant_code of its current (error-corrected) values, as float32,
//    and the group's stored parameters, so dequantize(result) is exactly the W_q that GPTQ feeds
//    back and the exported codes are exactly GPTQ's;
//  * scale refit (refit_scales, off by default): with the codes and zero points fixed, every row's
//    group scales are refitted by least squares on the same objective, trace((W - W_q) H (W -
//    W_q)^T): the clipping search chose them for round to nearest before any error feedback, and
//    GPTQ's codes are not the codes they were chosen for. A row keeps its new scales (rounded to
//    their storage type) only when its error falls, so the error never rises; the codes stay exactly
//    GPTQ's. k formats keep their grid (their scales are not free per group). It lowers the layer
//    error 1-10% and the uniform formats' KL on stories260K and the zoo models, but not the
//    bits of the budgeted plans: under perplexity budgets meta_swiglu_gqa's grew 0.06-0.11 bits per
//    weight (perplexity rose where KL fell), stories260K's and gpt2's fell up to 0.07
//    (docs/BENCHMARKS.md, "GPTQ's scales refitted to its codes");
//  * lazy batches: the Cholesky factor U of H^-1 (H^-1 = U^T U, upper) gives the updates; within a
//    block of block_size columns the updates are rank-1, the rest of W is updated once per block with
//    one GEMM (mathematically the same as updating it after every column).
// Everything runs as tensor operations in float64 on the weight's device; the parameter search of
// the static groups (quantize_clipped) runs on the CPU. Cost: O(in^3) for the factorisations plus
// O(out * in^2) for the updates, once (no iterations).
// Determinism: the same inputs on the same device give the same bits.

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "quant/packed_weight.h"
#include "quant/quant_spec.h"
#include "quant/quantize.h"

namespace gradq {

struct GptqOptions {
  double damp = 0.01;           ///< added to diag(H), as a fraction of its mean, >= 0
  int64_t block_size = 128;     ///< columns per lazy batch, >= 1 (speed only)
  bool act_order = true;        ///< columns in descending diag(H); false: in index order
  bool clip_search = true;      ///< group ranges from quantize_clipped's search (`clip`); false: min-max
  bool refit_scales = false;    ///< least-squares refit of the group scales to GPTQ's codes (above)
};

/// What GPTQ derives from X^T X alone, the same whatever spec the weight is quantized in: made once per
/// weight, it spares every further candidate the O(in^3) factorisations (most of GPTQ's work on a
/// wide layer), and U is made in the place of the caller's X^T X when it is moved in. With
/// refit_scales it also keeps H, a second [in, in] float64 matrix (the refit needs H itself, and
/// making it from U would cost every candidate more than GPTQ does).
struct GptqFactor {
  at::Tensor diagonal;  ///< float64 [in]: diag(X^T X), which weights the groups' range search
  at::Tensor order;     ///< int64 [in]: the column order (gptq_column_order)
  at::Tensor u;         ///< float64 [in, in]: upper Cholesky factor of the dampened H^-1, rows and columns in `order`
  at::Tensor hessian;   ///< float64 [in, in]: the dampened H itself, in `order`; refit_scales only (undefined otherwise)
  double damp = 0;      ///< the options it was made with, checked against quantize_gptq's
  bool act_order = true;
  bool refit_scales = false;
};

/// The factor of `xtx` (float32 or float64 [in, in], finite, diagonal >= 0) with `options`' damp and
/// act_order, on `device`. Throws gradq::Error as quantize_gptq does for a bad X^T X or when H plus
/// the dampening is not positive definite. Moved in as float64 on `device`, `xtx` is factored in
/// place (one [in, in] float64 matrix, 242 MiB at 5632 inputs, and H with refit_scales); otherwise it
/// is copied first and the caller's stays as it was.
GptqFactor gptq_factor(at::Tensor xtx, const GptqOptions& options = {}, const at::Device& device = at::kCPU);

/// GPTQ of `w` (floating [out, in], finite, any device) in `spec` (an integer level) with the
/// calibration `xtx` (float32 or float64 [in, in], finite, the sum of x^T x over the layer's input
/// rows). Throws gradq::Error naming the expected and the actual value for bad input, when H plus
/// the dampening is not positive definite, and when a group needs a scale beyond the fp16 range.
/// `clip`: the grid of the range search (options.clip_search only). `xtx` is taken by value: a
/// caller that moves it in spares a copy (gptq_factor).
PackedWeight quantize_gptq(const at::Tensor& w, const QuantSpec& spec, at::Tensor xtx,
                           const GptqOptions& options = {}, const ClipSearchOptions& clip = {});

/// The same with the factor of the weight's X^T X made beforehand (on the weight's device, with the
/// same damp and act_order as `options`): the same codes, bit for bit.
PackedWeight quantize_gptq(const at::Tensor& w, const QuantSpec& spec, const GptqFactor& factor,
                           const GptqOptions& options = {}, const ClipSearchOptions& clip = {});

/// The error GPTQ minimises for `w` quantized to `w_q` (both floating [out, in], on the factor's
/// device): trace((W - W_q) H (W - W_q)^T) with H the dampened Hessian `factor` was made from, that is
/// the calibration rows' squared output error of the layer plus the dampening's share.
double gptq_output_error(const at::Tensor& w, const at::Tensor& w_q, const GptqFactor& factor);

/// The column order GPTQ uses for `xtx` (int64 [in], a permutation, on xtx's device): descending
/// diag(xtx), ties in index order, or 0 .. in-1 without act_order.
at::Tensor gptq_column_order(const at::Tensor& xtx, bool act_order);

}  // namespace gradq
