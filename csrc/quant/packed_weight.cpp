#include "quant/packed_weight.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>

#include <algorithm>

#include "quant/cpu_clones.h"
#include "quant/quant_math.h"

namespace gradq {
namespace {

std::string shape_str(int64_t a, int64_t b) { return fmt::format("[{}, {}]", a, b); }

std::string shape_str(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

void check_tensor(const at::Tensor& t, const char* what, at::ScalarType dtype, int64_t rows,
                  int64_t cols, const QuantSpec& spec) {
  const bool ok = t.defined() && t.scalar_type() == dtype && t.dim() == 2 && t.size(0) == rows &&
                  t.size(1) == cols;
  TORCH_CHECK(ok, "packed weight ", spec.name(), ": ", what, " must be ", c10::toString(dtype), " ",
              shape_str(rows, cols), ", got ", t.defined() ? c10::toString(t.scalar_type()) : "",
              " ", shape_str(t));
  TORCH_CHECK(t.is_contiguous(), "packed weight ", spec.name(), ": ", what, " must be contiguous");
}

// A side-information stream: uint8 [bytes].
void check_stream(const at::Tensor& t, const char* what, int64_t bytes, const QuantSpec& spec) {
  const bool ok = t.defined() && t.scalar_type() == at::kByte && t.dim() == 1 && t.size(0) == bytes;
  TORCH_CHECK(ok, "packed weight ", spec.name(), ": ", what, " must be Byte [", bytes, "], got ",
              t.defined() ? c10::toString(t.scalar_type()) : "", " ", shape_str(t));
  TORCH_CHECK(t.is_contiguous(), "packed weight ", spec.name(), ": ", what, " must be contiguous");
}

// The loops below are instantiated per bit width so that the shifts and masks inside
// quant_unpack_code become constants (4- and 8-bit codes never straddle a byte).
template <int kBits>
GRADQ_ALWAYS_INLINE void dequantize_row_bits(const PackedView& v, int64_t r, float* out) {
  const uint8_t* row = v.codes + r * v.row_bytes;
  for (int64_t g = 0; g < v.n_groups; ++g) {
    const float s = v.scale(r, g);
    const float z = v.zero(r, g);
    const int64_t begin = g * v.group_len;
    const int64_t end = std::min(begin + v.group_len, v.in_features);
    // Codes are unpacked in blocks into a small buffer first, so that the float loop after it
    // has no bit twiddling and vectorizes. Blocks start at multiples of 8 codes (groups start at
    // multiples of 16), so whole chunks of 8 codes are kBits aligned bytes.
    constexpr int64_t kBlock = 64;
    uint32_t codes[kBlock];
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t n = std::min(kBlock, end - b);
      const int64_t whole = n / 8 * 8;
      if constexpr (8 % kBits == 0) {  // byte by byte: vectorizes, unlike quant_unpack8's 64-bit shifts
        constexpr int64_t kPerByte = 8 / kBits;
        const uint8_t* bytes = row + b * kBits / 8;
        for (int64_t j = 0; j < whole / kPerByte; ++j) quant_unpack_byte(bytes[j], kBits, codes + j * kPerByte);
      } else {
        for (int64_t i = 0; i < whole; i += 8) quant_unpack8(row + (b + i) * kBits / 8, kBits, codes + i);
      }
      for (int64_t i = whole; i < n; ++i) codes[i] = quant_unpack_code(row, b + i, kBits);
      for (int64_t i = 0; i < n; ++i) out[b + i] = quant_dequant(codes[i], s, z);
    }
  }
}

}  // namespace

int64_t PackedWeight::storage_bytes() const { return spec.storage_bytes(out_features, in_features); }

double PackedWeight::bits_per_weight() const { return spec.bits_per_weight(out_features, in_features); }

void PackedWeight::validate() const {
  TORCH_CHECK(spec.is_integer(), "packed weight: expected an integer level (", quant_integer_level_names(), "), got ",
              quant_level_name(spec.level));
  spec.validate();
  TORCH_CHECK(in_features > 0 && out_features >= 0, "packed weight ", spec.name(),
              ": expected in_features > 0 and out_features >= 0, got ", shape_str(out_features, in_features));
  const int64_t groups = spec.n_groups(in_features);
  check_tensor(codes, "codes", at::kByte, out_features, quant_row_bytes(in_features, spec.bits()), spec);
  check_tensor(scales, spec.sub_scale_bits ? "super-scales" : "scales", spec.fp16_scale ? at::kHalf : at::kFloat,
               out_features, spec.scale_cols(in_features), spec);
  if (spec.sub_scale_bits == 0) {
    TORCH_CHECK(!sub_scales.defined(), "packed weight ", spec.name(),
                ": formats with direct scales store no sub-scales, got sub_scales ", shape_str(sub_scales));
  } else {
    check_stream(sub_scales, "sub_scales", quant_row_bytes(out_features * groups, spec.sub_scale_bits), spec);
  }
  if (spec.symmetric) {
    TORCH_CHECK(!zeros.defined(), "packed weight ", spec.name(),
                ": symmetric formats store no zero points, got zeros ", shape_str(zeros));
  } else if (spec.zero_bits() == kZeroBits8) {
    check_tensor(zeros, "zeros", at::kByte, out_features, groups, spec);
  } else {
    check_stream(zeros, "zeros", quant_row_bytes(out_features * groups, spec.zero_bits()), spec);
  }
  const int64_t held = codes.nbytes() + scales.nbytes() + (sub_scales.defined() ? sub_scales.nbytes() : 0) +
                       (zeros.defined() ? zeros.nbytes() : 0);
  TORCH_INTERNAL_ASSERT(held == storage_bytes(), "tensors hold ", held, " bytes, spec says ", storage_bytes());
}

PackedWeight allocate_packed_weight(int64_t out, int64_t in, const QuantSpec& spec, bool zero_fill) {
  PackedWeight p;
  const int64_t groups = spec.n_groups(in);
  const int64_t row_bytes = quant_row_bytes(in, spec.bits());
  p.codes = zero_fill ? at::zeros({out, row_bytes}, at::kByte) : at::empty({out, row_bytes}, at::kByte);
  p.scales = at::empty({out, spec.scale_cols(in)}, spec.fp16_scale ? at::kHalf : at::kFloat);
  if (spec.sub_scale_bits != 0) p.sub_scales = at::zeros({quant_row_bytes(out * groups, spec.sub_scale_bits)}, at::kByte);
  if (!spec.symmetric) {
    p.zeros = spec.zero_bits() == kZeroBits8 ? at::zeros({out, groups}, at::kByte)
                                             : at::zeros({quant_row_bytes(out * groups, spec.zero_bits())}, at::kByte);
  }
  p.out_features = out;
  p.in_features = in;
  p.spec = spec;
  return p;
}

void pack_side_fields(const uint8_t* fields, int64_t n, int bits, uint8_t* stream) {
  if (bits == 8) {
    std::copy(fields, fields + n, stream);
    return;
  }
  for (int64_t k = 0; k < n; ++k) quant_pack_code(stream, k, bits, fields[k]);
}

PackedWeight packed_weight_from_tensors(const at::Tensor& codes, const at::Tensor& scales,
                                        const c10::optional<at::Tensor>& zeros, int64_t bits,
                                        int64_t group_size, int64_t in_features, int64_t zero_bits,
                                        const c10::optional<at::Tensor>& sub_scales, int64_t sub_scale_bits) {
  TORCH_CHECK(quant_bits_supported(bits), "bits must be one of ", quant_integer_bits_names(), ", got ", bits);
  TORCH_CHECK(codes.defined() && codes.dim() == 2, "codes must be a 2-D uint8 tensor [out, row_bytes], got ",
              shape_str(codes));
  TORCH_CHECK(scales.defined() && (scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat),
              "scales must be float16 or float32, got ",
              scales.defined() ? c10::toString(scales.scalar_type()) : "undefined");
  TORCH_CHECK(!zeros.has_value() || zero_bits == kZeroBits8 || zero_bits == bits,
              "zero_bits must be 8 or bits (", bits, "), got ", zero_bits);
  TORCH_CHECK(sub_scales.has_value() == (sub_scale_bits != 0),
              "sub_scales and sub_scale_bits go together: got sub_scales ", sub_scales.has_value() ? "present" : "absent",
              " and sub_scale_bits ", sub_scale_bits);
  PackedWeight w;
  w.codes = codes;
  w.scales = scales;
  w.zeros = zeros.has_value() ? *zeros : at::Tensor();
  w.sub_scales = sub_scales.has_value() ? *sub_scales : at::Tensor();
  w.out_features = codes.size(0);
  w.in_features = in_features;
  w.spec.level = quant_level_for_bits(static_cast<int>(bits));
  w.spec.group_size = group_size;
  w.spec.symmetric = !w.zeros.defined();
  w.spec.zero_8bit = w.zeros.defined() && zero_bits == kZeroBits8 && bits != kZeroBits8;
  w.spec.sub_scale_bits = static_cast<int>(sub_scale_bits);
  w.spec.fp16_scale = scales.scalar_type() == at::kHalf;
  w.validate();
  return w;
}

PackedView::PackedView(const PackedWeight& w)
    : codes(w.codes.data_ptr<uint8_t>()),
      sub_scales(w.sub_scales.defined() ? w.sub_scales.data_ptr<uint8_t>() : nullptr),
      zeros(w.zeros.defined() ? w.zeros.data_ptr<uint8_t>() : nullptr),
      row_bytes(w.codes.size(1)),
      n_groups(w.spec.n_groups(w.in_features)),
      group_len(w.spec.group_len(w.in_features)),
      in_features(w.in_features),
      scale_cols(w.spec.scale_cols(w.in_features)),
      groups_per_super(w.spec.sub_scale_bits ? kSuperGroup / w.spec.group_len(w.in_features) : 0),
      bits(w.spec.bits()),
      sub_bits(w.spec.sub_scale_bits),
      zero_bits(w.spec.zero_bits()),
      sym_zero(quant_sym_zero(w.spec.bits())) {
  TORCH_CHECK(w.codes.device().is_cpu() && w.scales.device().is_cpu() &&
                  (!w.zeros.defined() || w.zeros.device().is_cpu()) &&
                  (!w.sub_scales.defined() || w.sub_scales.device().is_cpu()),
              "packed weight ", w.spec.name(), ": the CPU path needs CPU tensors, got codes on ",
              w.codes.device(), ", scales on ", w.scales.device());
  if (w.spec.fp16_scale) {
    static_assert(sizeof(at::Half) == sizeof(uint16_t), "fp16 scales are read as their bits");
    scales_h = reinterpret_cast<const uint16_t*>(w.scales.data_ptr<at::Half>());
  } else {
    scales_f = w.scales.data_ptr<float>();
  }
}

float PackedView::scale(int64_t r, int64_t g) const {
  if (sub_scales) {
    const float d = half_bits_to_float(scales_h[r * scale_cols + g / groups_per_super]);
    return quant_sub_scale_value(quant_unpack_code(sub_scales, r * n_groups + g, sub_bits), d);
  }
  const int64_t i = r * n_groups + g;
  return scales_h ? half_bits_to_float(scales_h[i]) : scales_f[i];
}

void dequantize_rows(const PackedView& v, int64_t first, int64_t count, float* out) {
  at::parallel_for(0, count, parallel_row_grain(v.in_features), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) dequantize_row(v, first + r, out + r * v.in_features);
  });
}

GRADQ_CPU_CLONES void dequantize_row(const PackedView& v, int64_t r, float* out) {
  switch (v.bits) {
    case 2: return dequantize_row_bits<2>(v, r, out);
    case 3: return dequantize_row_bits<3>(v, r, out);
    case 4: return dequantize_row_bits<4>(v, r, out);
    case 5: return dequantize_row_bits<5>(v, r, out);
    case 6: return dequantize_row_bits<6>(v, r, out);
    case 8: return dequantize_row_bits<8>(v, r, out);
    default: TORCH_INTERNAL_ASSERT(false, "unsupported bits ", v.bits);
  }
}

}  // namespace gradq
