#include "quant/quantize.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "quant/checked_inputs.h"
#include "quant/cpu_clones.h"
#include "quant/quant_math.h"
#include "quant/row_params.h"

namespace gradq {
namespace {

void check_integer_spec(const QuantSpec& spec, const char* fn) {
  TORCH_CHECK(spec.is_integer(), fn, ": expected an integer level (", quant_integer_level_names(), "), got ",
              quant_level_name(spec.level));
  spec.validate();
}

constexpr const char* kNotFinite = ": the weight holds NaN or inf values";

// The weight as a contiguous float32 [out, in] CPU tensor (copied from any device: the packed
// format and its quantizers are CPU code); rejects what no format can represent.
// `check_finite` false: the caller checks finiteness in its own pass over the weights.
at::Tensor weight_as_float(const at::Tensor& w, const char* fn, bool check_finite = true) {
  TORCH_CHECK(w.defined() && w.dim() == 2, fn, ": expected a 2-D weight [out_features, in_features], got ",
              w.defined() ? std::to_string(w.dim()) + "-D" : "an undefined tensor");
  TORCH_CHECK(w.is_floating_point(), fn, ": expected a floating-point weight, got ", w.scalar_type());
  TORCH_CHECK(w.size(1) > 0, fn, ": expected in_features > 0, got [", w.size(0), ", ", w.size(1), "]");
  at::Tensor wf = w.to(at::kCPU, at::kFloat).contiguous();
  TORCH_CHECK(!check_finite || all_finite(wf), fn, kNotFinite);
  return wf;
}

// A scale that overflows fp16 becomes inf and would dequantize to NaN; say so instead.
void check_scale(float scale, int64_t r, int64_t g, const QuantSpec& spec) {
  TORCH_CHECK(std::isfinite(scale), "quantize ", spec.name(), ": group ", g, " of row ", r,
              " needs a scale beyond the fp16 range (weights too large); use fp32 scales (",
              spec.name(), "-f32)");
}

// ---- Scalar reference --------------------------------------------------------------------------

at::Tensor dequantize_ref_impl(const PackedWeight& w) {
  w.validate();
  const int bits = w.spec.bits();
  const int64_t glen = w.spec.group_len(w.in_features);
  const int64_t groups = w.spec.n_groups(w.in_features);
  const at::Tensor scales = w.scales.to(at::kFloat);  // fp16 -> fp32 is exact
  const auto S = scales.accessor<float, 2>();
  const int sub_bits = w.spec.sub_scale_bits, zero_bits = w.spec.zero_bits();
  at::Tensor out = at::empty({w.out_features, w.in_features}, at::kFloat);
  auto O = out.accessor<float, 2>();
  for (int64_t r = 0; r < w.out_features; ++r) {
    const uint8_t* row = w.codes.data_ptr<uint8_t>() + r * w.codes.size(1);
    for (int64_t i = 0; i < w.in_features; ++i) {
      const int64_t g = i / glen;
      // k formats: the group's scale is its sub-scale times the super-scale of its super-group.
      const float scale =
          sub_bits == 0 ? S[r][g]
                        : quant_sub_scale_value(quant_unpack_code(w.sub_scales.data_ptr<uint8_t>(), r * groups + g, sub_bits),
                                                S[r][i / kSuperGroup]);
      // Symmetric formats store no zero points: the fixed one for every group.
      const float zero =
          zero_bits == 0 ? quant_sym_zero(bits)
                         : static_cast<float>(quant_unpack_code(w.zeros.data_ptr<uint8_t>(), r * groups + g, zero_bits));
      O[r][i] = quant_dequant(quant_unpack_code(row, i, bits), scale, zero);
    }
  }
  return out;
}

// ---- Parallel path -----------------------------------------------------------------------------
// Hot loops are compiled per instruction set (cpu_clones.h); every clone gives the reference's
// codes: min/max do not depend on the order in which lanes visit a group, and no FMA fuses a
// rounding. The group parameters are in row_params.cpp.

// Where a row's per-group values go: its parameters, and scratch for its group ranges and codes.
struct RowBuffers {
  std::vector<GroupParams> params;
  std::vector<float> lo, hi;
  // 32-bit codes: narrowing them to bytes costs more than the wider buffer.
  std::vector<uint32_t> codes;

  RowBuffers(int64_t groups, int64_t glen)
      : params(static_cast<size_t>(groups)), lo(params.size()), hi(params.size()), codes(static_cast<size_t>(glen)) {}
};

// Codes of 16 weights of one group, 2, 4 or 8 bits each, packed into 16 * kBits / 8 bytes at `out`. A fixed count, so
// that the compiler keeps the codes in one vector register and packs them there, whatever the
// group size (a loop over a group of 32 codes is too short to vectorize).
template <int kBits>
GRADQ_ALWAYS_INLINE void encode16(const float* w, float inv, float zero, uint8_t* out) {
  static_assert(8 % kBits == 0, "whole codes per byte (2, 4 or 8 bits)");
  constexpr int kPerByte = 8 / kBits;
  uint32_t codes[16];
  for (int i = 0; i < 16; ++i) codes[i] = quant_code(w[i], inv, zero, kBits);
  for (int j = 0; j < 16 / kPerByte; ++j) out[j] = quant_pack_byte(codes + j * kPerByte, kBits);
}

// Codes of a row with the stored parameters of its groups, packed into `row`. Groups start at
// multiples of 16 codes, so every group starts on a byte boundary. Three packers, the fastest that
// fits (measured in docs/BENCHMARKS.md):
//  * 2/4/8-bit groups of at least 64 packed bytes: one loop over the group's bytes, straight from
//    the weights, which GCC vectorizes a full vector of bytes at a time;
//  * shorter 2/4/8-bit groups: encode16, 16 codes at a time;
//  * 3-, 5- and 6-bit groups, and whatever the above leave: codes into `codes`, then 8 at a time
//    into kBits bytes (quant_pack8), and the row's last codes that do not fill 8 one by one.
// `next_row` (or null): the weights that the caller reads next. Each group asks for its part of
// them ahead, so that their load from memory overlaps this row's arithmetic instead of following
// it (quantize is otherwise a read stall, then compute, row after row).
template <int kBits>
GRADQ_ALWAYS_INLINE void encode_row_bits(const float* w, int64_t in, int64_t glen, const GroupParams* params,
                                         const float* next_row, uint32_t* codes, uint8_t* row) {
  constexpr int64_t kFloatsPerLine = 64 / sizeof(float);
  for (int64_t g = 0, begin = 0; begin < in; ++g, begin += glen) {
    const int64_t len = std::min(glen, in - begin);
    if (next_row) {
      for (int64_t i = 0; i < len; i += kFloatsPerLine) __builtin_prefetch(next_row + begin + i, 0, 3);
    }
    const float* wg = w + begin;
    const float inv = quant_inv_scale(params[g].scale), zero = params[g].zero;
    uint8_t* out = row + begin * kBits / 8;
    const int64_t full = len / 8 * 8;  // codes that fill whole bytes
    int64_t done = 0;                  // codes packed by one of the vector packers
    if constexpr (8 % kBits == 0) {
      constexpr int kPerByte = 8 / kBits;
      constexpr int64_t kLongGroupBytes = 64;  // an AVX-512 vector of bytes
      if (len * kBits / 8 >= kLongGroupBytes) {
        for (int64_t j = 0; j < full / kPerByte; ++j) {
          uint32_t byte_codes[kPerByte];
          for (int k = 0; k < kPerByte; ++k) byte_codes[k] = quant_code(wg[j * kPerByte + k], inv, zero, kBits);
          out[j] = quant_pack_byte(byte_codes, kBits);
        }
        done = full;
      } else {
        done = len / 16 * 16;
        for (int64_t i = 0; i < done; i += 16) encode16<kBits>(wg + i, inv, zero, out + i * kBits / 8);
      }
    }
    for (int64_t i = done; i < len; ++i) codes[i] = quant_code(wg[i], inv, zero, kBits);
    for (int64_t c = done / 8; c < full / 8; ++c) quant_pack8(codes + 8 * c, kBits, out + c * kBits);
    if (full < len) {  // the row's last codes: clear their bytes, then OR them in
      uint8_t* tail = out + full * kBits / 8;
      std::fill(tail, tail + quant_row_bytes(len - full, kBits), uint8_t{0});
      for (int64_t i = full; i < len; ++i) quant_pack_code(out, i, kBits, codes[i]);
    }
  }
}

GRADQ_CPU_CLONES void encode_row(const float* w, int64_t in, int64_t glen, int bits, const GroupParams* params,
                                 const float* next_row, uint32_t* codes, uint8_t* row) {
  switch (bits) {
    case 2: return encode_row_bits<2>(w, in, glen, params, next_row, codes, row);
    case 3: return encode_row_bits<3>(w, in, glen, params, next_row, codes, row);
    case 4: return encode_row_bits<4>(w, in, glen, params, next_row, codes, row);
    case 5: return encode_row_bits<5>(w, in, glen, params, next_row, codes, row);
    case 6: return encode_row_bits<6>(w, in, glen, params, next_row, codes, row);
    case 8: return encode_row_bits<8>(w, in, glen, params, next_row, codes, row);
    default: TORCH_INTERNAL_ASSERT(false, "unsupported bits ", bits);
  }
}

// Quantizes every row of w [out, in] into p. `choose(row, w_row, buf)` sets the parameters of
// each group of the row in buf.params; checking and storing them and the codes are shared. Row by
// row, so that a row's weights are still in cache when its codes are computed.
template <typename ChooseRowParams>
void quantize_rows(const float* w, PackedWeight& p, const ChooseRowParams& choose) {
  const int64_t in = p.in_features;
  const int64_t glen = p.spec.group_len(in);
  const int64_t groups = p.spec.n_groups(in);
  const int64_t row_bytes = p.codes.size(1);
  const int64_t scale_cols = p.spec.scale_cols(in);
  const bool sub = p.spec.sub_scale_bits != 0;
  uint8_t* codes = p.codes.data_ptr<uint8_t>();
  uint16_t* scales_h = p.spec.fp16_scale ? reinterpret_cast<uint16_t*>(p.scales.data_ptr<at::Half>()) : nullptr;
  float* scales_f = p.spec.fp16_scale ? nullptr : p.scales.data_ptr<float>();
  // Zero points and sub-scale codes a byte per group first: rows share the bytes of the packed
  // streams, so they are packed after the parallel loop (pack_side_fields).
  const int zero_bits = p.spec.zero_bits();
  std::vector<uint8_t> zero_codes(zero_bits != 0 && zero_bits != kZeroBits8 ? p.out_features * groups : 0);
  uint8_t* zeros = zero_bits == 0 ? nullptr : zero_bits == kZeroBits8 ? p.zeros.data_ptr<uint8_t>() : zero_codes.data();
  std::vector<uint8_t> sub_codes(sub ? p.out_features * groups : 0);
  at::parallel_for(0, p.out_features, parallel_row_grain(in), [&](int64_t r0, int64_t r1) {
    RowBuffers buf(groups, glen);
    for (int64_t r = r0; r < r1; ++r) {
      const float* wr = w + r * in;
      choose(wr, buf);
      if (sub) {
        store_row_sub_scales(buf.params.data(), buf.lo.data(), groups, kSuperGroup / glen, p.spec,
                             scales_h + r * scale_cols, sub_codes.data() + r * groups);
      }
      for (int64_t g = 0; g < groups; ++g) check_scale(buf.params[g].scale, r, g, p.spec);
      store_row_params(buf.params.data(), groups, scales_h && !sub ? scales_h + r * scale_cols : nullptr,
                       scales_f ? scales_f + r * scale_cols : nullptr, zeros ? zeros + r * groups : nullptr);
      encode_row(wr, in, glen, p.spec.bits(), buf.params.data(), r + 1 < r1 ? wr + in : nullptr, buf.codes.data(),
                 codes + r * row_bytes);
    }
  });
  if (!zero_codes.empty()) pack_side_fields(zero_codes.data(), p.out_features * groups, zero_bits, p.zeros.data_ptr<uint8_t>());
  if (sub) pack_side_fields(sub_codes.data(), p.out_features * groups, p.spec.sub_scale_bits, p.sub_scales.data_ptr<uint8_t>());
}

// Weighted squared error of quantizing one group with `gp`. Accumulated in double, in index
// order, so that a caller recomputing it the same way gets the same number.
double group_error(const float* w, const float* act, int64_t n, GroupParams gp, int bits) {
  const float inv = quant_inv_scale(gp.scale);
  double err = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float dq = quant_dequant(quant_code(w[i], inv, gp.zero, bits), gp.scale, gp.zero);
    const double d = static_cast<double>(w[i]) - static_cast<double>(dq);
    err += (act ? static_cast<double>(act[i]) : 1.0) * d * d;
  }
  return err;
}

// The clipped parameters of one group, chosen with `spec` (group_choice_spec: fp32 scales for k
// formats, whose stored scale store_row_sub_scales sets afterwards from `*chosen_lo`, the lower end
// of the chosen range).
GroupParams search_clip(const float* w, const float* act, int64_t n, const QuantSpec& spec,
                        const ClipSearchOptions& opt, float* chosen_lo) {
  const GroupRange range = group_range(w, n);  // finiteness: quantize_clipped checked it
  const float lo = range.lo, hi = range.hi;
  const float signed_absmax = quant_sym_signed_absmax(lo, hi);
  GroupParams best{};
  double best_err = std::numeric_limits<double>::infinity();
  for (int k = 0; k <= opt.n_grid; ++k) {
    const float ratio = opt.n_grid == 0 ? 1.f : 1.f - (1.f - opt.min_ratio) * static_cast<float>(k) / static_cast<float>(opt.n_grid);
    const GroupParams gp = spec.symmetric
                               ? quant_sym_params(signed_absmax * ratio, spec.bits(), spec.fp16_scale)
                               : quant_asym_params(lo * ratio, hi * ratio, spec.bits(), spec.fp16_scale);
    const double err = group_error(w, act, n, gp, spec.bits());
    // Strictly lower only: ties keep the larger range, so ratio 1 (round to nearest) wins them.
    if (err < best_err) {
      best_err = err;
      best = gp;
      *chosen_lo = lo * ratio;
    }
  }
  return best;
}

}  // namespace

PackedWeight quantize_ref(const at::Tensor& w, const QuantSpec& spec) {
  check_integer_spec(spec, "quantize_ref");
  const at::Tensor wf = weight_as_float(w, "quantize_ref");
  const int64_t out = wf.size(0), in = wf.size(1);
  const int bits = spec.bits();
  const int64_t glen = spec.group_len(in);
  const int64_t groups = spec.n_groups(in);
  const QuantSpec choice = group_choice_spec(spec);
  PackedWeight p = allocate_packed_weight(out, in, spec, /*zero_fill=*/true);
  const auto W = wf.accessor<float, 2>();
  at::Tensor scales = at::empty({out, groups}, at::kFloat);
  auto S = scales.accessor<float, 2>();
  std::vector<GroupParams> params(static_cast<size_t>(groups));
  std::vector<float> los(params.size());
  std::vector<uint8_t> sub_codes(params.size());
  for (int64_t r = 0; r < out; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t begin = g * glen;
      const int64_t end = std::min(begin + glen, in);
      float lo = W[r][begin], hi = W[r][begin];
      for (int64_t i = begin; i < end; ++i) {
        lo = std::min(lo, W[r][i]);
        hi = std::max(hi, W[r][i]);
      }
      params[g] = rtn_params(lo, hi, choice);
      los[g] = lo;
    }
    if (spec.sub_scale_bits != 0) {
      store_row_sub_scales(params.data(), los.data(), groups, kSuperGroup / glen, spec,
                           reinterpret_cast<uint16_t*>(p.scales.data_ptr<at::Half>()) + r * p.scales.size(1),
                           sub_codes.data());
      for (int64_t g = 0; g < groups; ++g)
        quant_pack_code(p.sub_scales.data_ptr<uint8_t>(), r * groups + g, spec.sub_scale_bits, sub_codes[g]);
    }
    uint8_t* row = p.codes.data_ptr<uint8_t>() + r * p.codes.size(1);
    for (int64_t g = 0; g < groups; ++g) {
      const GroupParams gp = params[g];
      check_scale(gp.scale, r, g, spec);
      S[r][g] = gp.scale;
      if (!spec.symmetric) {
        quant_pack_code(p.zeros.data_ptr<uint8_t>(), r * groups + g, spec.zero_bits(), static_cast<uint32_t>(gp.zero));
      }
      const float inv = quant_inv_scale(gp.scale);
      const int64_t begin = g * glen;
      const int64_t end = std::min(begin + glen, in);
      for (int64_t i = begin; i < end; ++i) quant_pack_code(row, i, bits, quant_code(W[r][i], inv, gp.zero, bits));
    }
  }
  // The scales are already rounded to fp16, so this conversion is exact. k formats wrote their
  // super-scales and sub-scales above.
  if (spec.sub_scale_bits == 0) p.scales.copy_(scales);
  return p;
}

at::Tensor dequantize_ref(const PackedWeight& w) { return dequantize_ref_impl(w); }

PackedWeight quantize(const at::Tensor& w, const QuantSpec& spec) {
  check_integer_spec(spec, "quantize");
  const at::Tensor wf = weight_as_float(w, "quantize", /*check_finite=*/false);
  const int64_t in = wf.size(1), glen = spec.group_len(in);
  const QuantSpec choice = group_choice_spec(spec);
  PackedWeight p = allocate_packed_weight(wf.size(0), in, spec, /*zero_fill=*/false);
  quantize_rows(wf.data_ptr<float>(), p, [&](const float* wr, RowBuffers& buf) {
    TORCH_CHECK(rtn_row_params(wr, in, glen, choice, buf.lo.data(), buf.hi.data(), buf.params.data()), "quantize",
                kNotFinite);
  });
  return p;
}

at::Tensor dequantize(const PackedWeight& w) {
  w.validate();
  const PackedView v(w);
  at::Tensor out = at::empty({w.out_features, w.in_features}, at::kFloat);
  dequantize_rows(v, 0, w.out_features, out.data_ptr<float>());
  return out;
}

at::Tensor fake_quantize(const at::Tensor& w, const QuantSpec& spec) {
  switch (spec.level) {
    case QuantLevel::kPrune: return at::zeros_like(w);
    case QuantLevel::kFp16: return w.to(at::kHalf).to(w.scalar_type());
    case QuantLevel::kBf16: return w.to(at::kBFloat16).to(w.scalar_type());
    case QuantLevel::kFp32: return w.to(at::kFloat).to(w.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
    default: break;
  }
  return dequantize(quantize(w, spec)).to(w.device(), w.scalar_type());
}

PackedWeight quantize_clipped(const at::Tensor& w, const QuantSpec& spec, const at::Tensor& act_sq_mean,
                              const ClipSearchOptions& opt) {
  check_integer_spec(spec, "quantize_clipped");
  TORCH_CHECK(opt.n_grid >= 0 && opt.n_grid <= 1000, "quantize_clipped: n_grid must be in 0..1000, got ", opt.n_grid);
  TORCH_CHECK(opt.min_ratio > 0.f && opt.min_ratio <= 1.f, "quantize_clipped: min_ratio must be in (0, 1], got ",
              opt.min_ratio);
  const at::Tensor wf = weight_as_float(w, "quantize_clipped");
  const int64_t in = wf.size(1);
  at::Tensor act;
  if (act_sq_mean.defined()) {
    TORCH_CHECK(act_sq_mean.dim() == 1 && act_sq_mean.size(0) == in,
                "quantize_clipped: act_sq_mean must be [in_features] = [", in, "], got ", act_sq_mean.sizes());
    act = act_sq_mean.to(at::kCPU, at::kFloat).contiguous();
    TORCH_CHECK(at::isfinite(act).all().item<bool>() && (act >= 0).all().item<bool>(),
                "quantize_clipped: act_sq_mean must be finite and >= 0 (a mean of squares)");
  }
  const float* a = act.defined() ? act.data_ptr<float>() : nullptr;
  const int64_t glen = spec.group_len(in);
  const QuantSpec choice = group_choice_spec(spec);
  PackedWeight p = allocate_packed_weight(wf.size(0), in, spec, /*zero_fill=*/false);
  quantize_rows(wf.data_ptr<float>(), p, [&](const float* wr, RowBuffers& buf) {
    for (int64_t g = 0, begin = 0; begin < in; ++g, begin += glen)
      buf.params[g] = search_clip(wr + begin, a ? a + begin : nullptr, std::min(glen, in - begin), choice, opt, &buf.lo[g]);
  });
  return p;
}

namespace {

// Checks codes for spec and a [out, in] shape, and packs them into a zeroed codes tensor's rows.
void pack_code_rows(const at::Tensor& codes, const QuantSpec& spec, at::Tensor& packed_codes, const char* who) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte, who, ": expected uint8 codes [out, in], got ",
              codes.scalar_type(), " ", codes.sizes());
  const int64_t out = codes.size(0), in = codes.size(1);
  const at::Tensor c = codes.cpu().contiguous();
  TORCH_CHECK(c.max().item<int64_t>() <= quant_max_code(spec.bits()), who, ": expected codes <= ",
              quant_max_code(spec.bits()), ", got ", c.max().item<int64_t>());
  const uint8_t* cp = c.data_ptr<uint8_t>();
  uint8_t* row = packed_codes.data_ptr<uint8_t>();
  const int64_t row_bytes = packed_codes.size(1);
  for (int64_t r = 0; r < out; ++r)
    for (int64_t i = 0; i < in; ++i) quant_pack_code(row + r * row_bytes, i, spec.bits(), cp[r * in + i]);
}

}  // namespace

PackedWeight pack_codes(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                        const QuantSpec& spec) {
  check_integer_spec(spec, "pack_codes");
  TORCH_CHECK(spec.sub_scale_bits == 0, "pack_codes: expected a format with a scale per group, got ", spec.name(),
              " (k formats: with_codes on a grid)");
  TORCH_CHECK(codes.dim() == 2, "pack_codes: expected codes [out, in], got ", codes.sizes());
  const int64_t out = codes.size(0), in = codes.size(1), groups = spec.n_groups(in);
  TORCH_CHECK(in > 0, "pack_codes: expected in_features > 0, got [", out, ", ", in, "]");
  TORCH_CHECK(scales.sizes() == at::IntArrayRef({out, groups}) && scales.scalar_type() == at::kFloat,
              "pack_codes: expected float32 scales [", out, ", ", groups, "], got ", scales.scalar_type(), " ",
              scales.sizes());
  TORCH_CHECK(spec.symmetric || (zeros.sizes() == at::IntArrayRef({out, groups}) && zeros.scalar_type() == at::kFloat),
              "pack_codes: expected float32 zero points [", out, ", ", groups, "]");
  const at::Tensor s = scales.cpu().contiguous();
  TORCH_CHECK(at::isfinite(s).all().item<bool>(), "pack_codes: the scales hold NaN or inf values");
  TORCH_CHECK(!spec.fp16_scale || at::equal(s, s.to(at::kHalf).to(at::kFloat)),
              "pack_codes: expected scales already rounded to fp16 for ", spec.name());
  PackedWeight p = allocate_packed_weight(out, in, spec, /*zero_fill=*/true);
  pack_code_rows(codes, spec, p.codes, "pack_codes");
  // The scales are already rounded to their storage type, so this conversion is exact.
  p.scales.copy_(s);
  if (!spec.symmetric) {
    const int64_t max_zero = (int64_t{1} << spec.zero_bits()) - 1;
    const at::Tensor z = zeros.cpu().contiguous();
    TORCH_CHECK(at::equal(z, z.round()) && (z >= 0).all().item<bool>() && (z <= max_zero).all().item<bool>(),
                "pack_codes: expected integer zero points in 0..", max_zero);
    const at::Tensor fields = z.to(at::kByte).contiguous();
    pack_side_fields(fields.data_ptr<uint8_t>(), out * groups, spec.zero_bits(), p.zeros.data_ptr<uint8_t>());
  }
  p.validate();
  return p;
}

PackedWeight with_codes(const PackedWeight& grid, const at::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.size(0) == grid.out_features && codes.size(1) == grid.in_features,
              "with_codes: expected codes [", grid.out_features, ", ", grid.in_features, "], got ", codes.sizes());
  PackedWeight p = grid;
  p.codes = at::zeros_like(grid.codes);
  pack_code_rows(codes, grid.spec, p.codes, "with_codes");
  p.validate();
  return p;
}

std::pair<at::Tensor, at::Tensor> group_scales_and_zeros(const PackedWeight& w) {
  w.validate();
  const PackedView v(w);
  const int64_t out = w.out_features, groups = v.n_groups;
  at::Tensor scales = at::empty({out, groups}, at::kFloat), zeros = at::empty({out, groups}, at::kFloat);
  float* s = scales.data_ptr<float>();
  float* z = zeros.data_ptr<float>();
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      s[r * groups + g] = v.scale(r, g);
      z[r * groups + g] = v.zero(r, g);
    }
  return {scales, zeros};
}

}  // namespace gradq
