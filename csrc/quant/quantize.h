#pragma once
// CPU group quantizers. Every function here computes codes, scales and zero points with the
// element math of quant_math.h, so all paths (and the CUDA kernels) agree bit for bit:
//   quantize_ref / dequantize_ref   scalar reference loops, kept simple, never optimized
//   quantize / dequantize           parallel over rows, loops specialised per bit width
//   quantize_clipped                per-group range search (AWQ auto_clip style)
// Weights are float [out_features, in_features]; groups run along in_features (quant_spec.h).

#include <ATen/core/Tensor.h>

#include "quant/packed_weight.h"
#include "quant/quant_spec.h"

namespace gradq {

/// Scalar reference quantizer (round to nearest). Asymmetric groups use quant_asym_params(min, max);
/// symmetric groups use quant_sym_params(quant_sym_signed_absmax(min, max)).
/// `w`: floating [out, in] on any device (copied to the CPU), finite. `spec`: an integer level. Throws c10::Error on bad input.
PackedWeight quantize_ref(const at::Tensor& w, const QuantSpec& spec);

/// Scalar reference dequantizer: float32 [out, in], element = scale * (code - zero).
at::Tensor dequantize_ref(const PackedWeight& w);

/// Same result as quantize_ref, bit for bit; parallel over rows.
PackedWeight quantize(const at::Tensor& w, const QuantSpec& spec);

/// Same result as dequantize_ref, bit for bit; parallel over rows. float32 [out, in].
at::Tensor dequantize(const PackedWeight& w);

/// dequantize(quantize(w, spec)) in w's dtype and shape: the weights a search evaluates.
/// Float levels round through their type (fp16, bf16; fp32 is a copy); prune gives zeros.
at::Tensor fake_quantize(const at::Tensor& w, const QuantSpec& spec);

/// Options of quantize_clipped's per-group range search.
struct ClipSearchOptions {
  int n_grid = 20;         ///< candidate ratios r_k = 1 - (1 - min_ratio) * k / n_grid, k = 0..n_grid
  float min_ratio = 0.5f;  ///< smallest shrink of the range tried, in (0, 1]
};

/// Quantizer with clipping search. For each group it tries the ranges [r*min, r*max] (asymmetric)
/// or the signed absmax r*a (symmetric) for the ratios of `opt`, and keeps the one that minimizes
///   sum_j act_sq_mean[j] * (w_j - dequant(quant(w_j)))^2
/// over the group (weight 1 when `act_sq_mean` is undefined). Ratio 1.0 (round to nearest) is tried
/// first and only a strictly lower error replaces it, so the result is never worse than quantize().
/// `act_sq_mean`: undefined, or float [in] >= 0, the per-input-channel mean of x^2 over calibration.
PackedWeight quantize_clipped(const at::Tensor& w, const QuantSpec& spec, const at::Tensor& act_sq_mean,
                              const ClipSearchOptions& opt = {});

/// Packs codes chosen elsewhere (trained rounding) into spec's layout, with quant_math.h.
/// `codes`: uint8 [out, in], each at most quant_max_code(bits); `scales`: float32 [out, n_groups],
/// already rounded to their storage type (quant_round_scale), finite; `zeros`: float32 [out,
/// n_groups] integer zero points (read only for asymmetric specs), stored at spec.zero_bits(). Not for
/// k formats (their scales are not free per group: use with_codes on a grid). Any device; the result
/// is on the CPU. Throws c10::Error naming the expected and the actual shape or value.
PackedWeight pack_codes(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                        const QuantSpec& spec);

/// `grid` with its codes replaced by `codes` (uint8 [out, in], each at most quant_max_code(bits)):
/// codes chosen elsewhere (GPTQ) on the scales, sub-scales and zero points `grid` already stores.
PackedWeight with_codes(const PackedWeight& grid, const at::Tensor& codes);

/// The stored scale and zero point of every group of `w`, as float32 [out, n_groups] each (the
/// effective scale of k formats; the fixed zero of symmetric ones), on the CPU.
std::pair<at::Tensor, at::Tensor> group_scales_and_zeros(const PackedWeight& w);

}  // namespace gradq
