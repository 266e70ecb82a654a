#pragma once
// A quantized weight as the tensors that quant_spec.h lays out, and a raw view of it for CPU loops.

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>

#include "quant/quant_math.h"
#include "quant/quant_spec.h"

namespace gradq {

/// A weight W [out_features, in_features] stored in one integer QuantSpec (layout: quant_spec.h).
struct PackedWeight {
  at::Tensor codes;   ///< uint8 [out_features, quant_row_bytes(in_features, bits)], a bit stream per row
  at::Tensor scales;  ///< fp16 (spec.fp16_scale) or fp32 [out_features, spec.scale_cols(in_features)]
  at::Tensor sub_scales;  ///< uint8 [quant_row_bytes(out * n_groups, sub_scale_bits)] stream; k formats only
  at::Tensor zeros;   ///< uint8 [quant_row_bytes(out * n_groups, zero_bits)] stream, or [out, n_groups] when
                      ///< zero_bits is 8; undefined when symmetric (quant_spec.h)
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

/// Allocates the tensors of `spec` for a [out, in] weight. `zero_fill`: codes zeroed too, for
/// writers that OR codes into place (quant_pack_code); zero points and sub-scales are always zeroed
/// (pack_side_fields and quant_pack_code OR into them).
PackedWeight allocate_packed_weight(int64_t out, int64_t in, const QuantSpec& spec, bool zero_fill);

/// Packs n fields, one a byte in `fields` (zero points or sub-scale codes in (row, group) order),
/// `bits` wide into the zeroed stream `stream` (quant_spec.h). Writers that work row by row in
/// parallel keep a byte per field and pack once, since neighbouring rows share stream bytes.
void pack_side_fields(const uint8_t* fields, int64_t n, int bits, uint8_t* stream);

/// Wraps the tensors that gradq::dequantize / gradq::linear receive into a validated PackedWeight.
/// group_size 0 means one group per row; zeros absent means symmetric; the scales' dtype (fp16 or
/// fp32) selects QuantSpec::fp16_scale. `zero_bits`: width of the stored zero points, 8 (the
/// default: checkpoints written before b-bit zero points, and the z8 formats) or `bits`.
/// `sub_scales` present: a k format with `sub_scale_bits` (6 or 8) sub-scales, and `scales` are
/// its fp16 super-scales.
PackedWeight packed_weight_from_tensors(const at::Tensor& codes, const at::Tensor& scales,
                                        const c10::optional<at::Tensor>& zeros, int64_t bits,
                                        int64_t group_size, int64_t in_features, int64_t zero_bits = kZeroBits8,
                                        const c10::optional<at::Tensor>& sub_scales = c10::nullopt,
                                        int64_t sub_scale_bits = 0);

/// Raw pointers into a validated, contiguous CPU PackedWeight, for the loops in csrc/quant and
/// csrc/ops. Holds no references: the PackedWeight must outlive it.
struct PackedView {
  const uint8_t* codes = nullptr;     // [out, row_bytes]
  const uint16_t* scales_h = nullptr; // [out, scale_cols] fp16 bits (super-scales for k formats), or null
  const float* scales_f = nullptr;    // [out, n_groups] fp32, or null
  const uint8_t* sub_scales = nullptr;  // stream of sub_bits-wide codes, (row, group) order; null unless k
  const uint8_t* zeros = nullptr;     // stream of zero_bits-wide fields, (row, group) order; null when symmetric
  int64_t row_bytes = 0;
  int64_t n_groups = 0;
  int64_t group_len = 0;
  int64_t in_features = 0;
  int64_t scale_cols = 0;
  int64_t groups_per_super = 0;  // k formats: groups that share a super-scale
  int bits = 0;
  int sub_bits = 0;
  int zero_bits = 0;
  float sym_zero = 0.f;

  explicit PackedView(const PackedWeight& w);

  /// Stored scale of group g of row r, as a float.
  float scale(int64_t r, int64_t g) const;
  /// Zero point of group g of row r (the fixed 2^(bits-1) when symmetric).
  float zero(int64_t r, int64_t g) const {
    return zeros ? static_cast<float>(quant_unpack_code(zeros, r * n_groups + g, zero_bits)) : sym_zero;
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
