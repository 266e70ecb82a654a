#pragma once
// A quantized weight as the tensors that quant_spec.h lays out, and a raw view of it for CPU loops.

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>

#include "quant/quant_spec.h"

namespace gradq {

/// A weight W [out_features, in_features] stored in one integer QuantSpec (layout: quant_spec.h).
struct PackedWeight {
  at::Tensor codes;   ///< uint8 [out_features, quant_row_bytes(in_features, bits)], a bit stream per row
  at::Tensor scales;  ///< fp16 (spec.fp16_scale) or fp32 [out_features, n_groups]
  at::Tensor zeros;   ///< uint8 [out_features, n_groups]; undefined when spec.symmetric
  int64_t out_features = 0;
  int64_t in_features = 0;
  QuantSpec spec;

  /// Bytes of this weight, read from the spec (validate() checks that the tensors hold exactly that).
  int64_t storage_bytes() const;
  /// Storage bits per weight, read from the spec.
  double bits_per_weight() const;
  /// Throws c10::Error naming the expected and the actual dtype/shape when a tensor does not match
  /// the spec, or gradq::Error when the spec itself is not a supported combination.
  void validate() const;
};

/// Wraps the tensors that gradq::dequantize / gradq::linear receive into a validated PackedWeight.
/// group_size 0 means one group per row; zeros absent means symmetric; the scales' dtype (fp16 or
/// fp32) selects QuantSpec::fp16_scale.
PackedWeight packed_weight_from_tensors(const at::Tensor& codes, const at::Tensor& scales,
                                        const c10::optional<at::Tensor>& zeros, int64_t bits,
                                        int64_t group_size, int64_t in_features);

/// Raw pointers into a validated, contiguous CPU PackedWeight, for the loops in csrc/quant and
/// csrc/ops. Holds no references: the PackedWeight must outlive it.
struct PackedView {
  const uint8_t* codes = nullptr;     // [out, row_bytes]
  const uint16_t* scales_h = nullptr; // [out, n_groups] fp16 bits, or null
  const float* scales_f = nullptr;    // [out, n_groups] fp32, or null
  const uint8_t* zeros = nullptr;     // [out, n_groups], null when symmetric
  int64_t row_bytes = 0;
  int64_t n_groups = 0;
  int64_t group_len = 0;
  int64_t in_features = 0;
  int bits = 0;
  float sym_zero = 0.f;

  explicit PackedView(const PackedWeight& w);

  /// Stored scale of group g of row r, as a float.
  float scale(int64_t r, int64_t g) const;
  /// Zero point of group g of row r (the fixed 2^(bits-1) when symmetric).
  float zero(int64_t r, int64_t g) const {
    return zeros ? static_cast<float>(zeros[r * n_groups + g]) : sym_zero;
  }
};

/// Dequantizes row r of `v` into out[0 .. in_features). Calls quant_math.h per element, so it
/// gives the same bits as dequantize_ref.
void dequantize_row(const PackedView& v, int64_t r, float* out);

/// Dequantizes rows [first, first + count) of `v` into out (count x in_features floats), in
/// parallel.
void dequantize_rows(const PackedView& v, int64_t first, int64_t count, float* out);

/// Rows per at::parallel_for task for loops over rows of `in_features` weights: a task covers at
/// least 16384 weights, as fewer make the thread hand-off cost more than the work on small layers.
inline int64_t parallel_row_grain(int64_t in_features) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, in_features));
}

}  // namespace gradq
