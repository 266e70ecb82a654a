#pragma once
// Trainable rounding: the fallback a search takes when round-to-nearest (and the clipping search)
// loses too much at a bit width. SignRound-style (Cheng et al., "Optimize Weight Rounding via
// Signed Gradient Descent", 2023; intel/auto-round), for one weight at a time.
//
// What is learned, per weight W [out, in] in one integer QuantSpec:
//  * a rounding offset v in [-0.5, 0.5] per element, initialised to 0: the code becomes
//    round(w / scale + v) + zero instead of round(w / scale) + zero, so each element may round
//    up or down, but never by more than one step from round-to-nearest;
//  * when learn_clipping, clip factors per group in [min_clip, 1], initialised to 1 (as the
//    clipping search of quantize_clipped(), but learned jointly with the offsets):
//      asymmetric: two factors, the range is [c_lo * min, c_hi * max] -> quant_asym_params;
//      symmetric:  one factor on the signed absmax, c * signed_absmax -> quant_sym_params.
// Forward (exactly gradq's stored format, quant_math.h): per group the stored scale (fp16, or fp32
// for -f32 specs) and integer zero point of the clipped range, codes
//   q = clamp(rint(w * (1 / scale) + v) + zero, 0, 2^bits - 1),   W_q = scale * (q - zero),
// which is what gradq::dequantize() computes from the returned PackedWeight.
// Loss: the layer's output reconstruction error over the calibration rows x,
//   L = sum_x |x (W - W_q)^T|^2 = trace((W - W_q) XtX (W - W_q)^T),
// i.e. the error of this one linear layer's output, not of the whole transformer block's output
// (SignRound proper reconstructs the block). It needs only the layer's XtX, which
// QuantizableModel::capture_input_stats(..., with_xtx = true) provides, and no block forward.
// Backward: straight-through estimator for every rounding (the code rint, the zero point's rint and
// the fp16 rounding of the scale have derivative 1); clamps pass the gradient only inside their
// range, as torch.clamp does. The gradients are derived by hand (trained_rounding.cpp), not by
// autograd, so the loop has no graph overhead.
// Update: signed gradient descent, p -= lr_k * sign(dL/dp), then p is clamped to its range; lr_k
// decays linearly from lr to 0 (lr_k = lr * (1 - k / iterations)), SignRound's schedule, and
// lr = 1 / iterations by default, so an offset can travel about half its range in total.
// Best iterate: the loss of every iterate k = 0 .. iterations (iterate 0 is round-to-nearest,
// iterate k the parameters after k updates) is measured on the exact stored result described above
// (fp16 scales, integer zeros, the codes that get packed), never on a float surrogate, and the
// lowest one is returned (ties keep the earlier iterate). Hence result.loss <= result.rtn_loss,
// result.loss is the loss of gradq::dequantize(result.packed), and with iterations = 0 the result is
// bit-identical to quantize(w, spec). The rule matters: the loss is not monotone in k, because every
// offset moves by the same step at once and the straight-through gradient ignores the cost of a
// whole-step flip, so correlated flips overshoot; at 3-4 bits the best iterate is often an early one.
// Implementation: tensor operations on the weight's device (CPU, or CUDA when libtorch has it).
// The element math (group parameters, codes, W_q) is float32 with the operations of quant_math.h
// one by one (each ATen op rounds once, so nothing is fused; divisions are by tensors, never by a
// scalar, which CUDA would turn into a multiply by its reciprocal), so the iterates are exactly the
// stored format's. The loss and the gradients are float64: D = W - W_q, E = D XtX (one GEMM), loss =
// sum of the row sums of D * E, added up in row order on the host.
// Against the scalar loop this replaced (kept as tests/support/trained_rounding_ref.h), only the
// order of floating-point summation differs (BLAS GEMM, per-group sums), so losses agree to about
// 1e-12 relative; a signed step can still differ where a gradient is within rounding of 0, after
// which the trajectories part. tests/quant/trained_rounding_test.cpp states and checks the
// tolerance.
// Determinism: the same inputs on the same device give the same bits. On the CPU the thread count
// does not change them either (tested at 64x172): OpenBLAS partitions a GEMM's output, not its sums,
// and ATen reduces each row on one thread; only a weight with a single output row, whose one row sum
// ATen may split across threads, could differ in the last bit of its loss.
// Cost per iteration: one [out, in] x [in, in] GEMM in float64 plus O(out * in) element work.

#include <ATen/core/Tensor.h>

#include "quant/packed_weight.h"
#include "quant/quant_spec.h"

namespace gradq {

struct TrainedRoundingOptions {
  int iterations = 200;       ///< signed-gradient steps, >= 0 (0: round-to-nearest)
  double learning_rate = 0;   ///< initial step size, >= 0; 0: 1 / iterations (SignRound's default)
  bool learn_clipping = true; ///< learn the per-group clip factors as well as the offsets
  float min_clip = 0.5f;      ///< smallest clip factor, in (0, 1]
};

struct TrainedRoundingResult {
  PackedWeight packed;     ///< the best iterate in spec's stored format
  double rtn_loss = 0;     ///< loss of quantize(w, spec), round-to-nearest
  double loss = 0;         ///< loss of dequantize(packed); <= rtn_loss
  int best_iteration = 0;  ///< iterate that `packed` is (0: round-to-nearest)
};

/// Learned rounding (and clipping) for one weight, minimising trace((W - W_q) XtX (W - W_q)^T).
/// `w`: floating [out, in], finite, logical layout, on any device (the work runs there).
/// `spec`: an integer QuantSpec. `xtx`: float32 or float64 [in, in], finite, on any device: the sum
/// over calibration rows of x^T x of the layer's input (only its symmetric part matters). The
/// result's tensors are on the CPU, as every PackedWeight. Throws gradq::Error naming the expected and the
/// actual value for bad input, and when a group needs a scale beyond the fp16 range.
TrainedRoundingResult train_rounding(const at::Tensor& w, const QuantSpec& spec, const at::Tensor& xtx,
                                     const TrainedRoundingOptions& options = {});

}  // namespace gradq
