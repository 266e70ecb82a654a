#include "quant/row_params.h"

#include <algorithm>

namespace gradq {
namespace {

// rtn_params of groups [lo[g], hi[g]], g < n, in a loop that vectorizes across groups. The format
// is a template argument: GCC does not vectorize the loop while it holds a branch on the scale
// type.
template <bool kSymmetric, bool kFp16Scale>
GRADQ_ALWAYS_INLINE void rtn_params_of_ranges(const float* lo, const float* hi, int64_t n, int bits,
                                              GroupParams* params) {
  for (int64_t g = 0; g < n; ++g) params[g] = rtn_params(lo[g], hi[g], kSymmetric, bits, kFp16Scale);
}

}  // namespace

// The ranges are found group by group; the parameters are then computed in one loop over the
// groups, which vectorizes across them (the division, roundings and fp16 round trip of one group
// cost more than its min and max otherwise).
GRADQ_CPU_CLONES bool rtn_row_params(const float* w, int64_t in, int64_t glen, const QuantSpec& spec, float* lo,
                                     float* hi, GroupParams* params) {
  const int64_t groups = spec.n_groups(in);
  bool finite = true;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t begin = g * glen;
    const GroupRange r = group_range(w + begin, std::min(glen, in - begin));
    lo[g] = r.lo;
    hi[g] = r.hi;
    finite = finite && r.finite;
  }
  const int bits = spec.bits();
  if (spec.symmetric) {
    if (spec.fp16_scale) rtn_params_of_ranges<true, true>(lo, hi, groups, bits, params);
    else rtn_params_of_ranges<true, false>(lo, hi, groups, bits, params);
  } else {
    if (spec.fp16_scale) rtn_params_of_ranges<false, true>(lo, hi, groups, bits, params);
    else rtn_params_of_ranges<false, false>(lo, hi, groups, bits, params);
  }
  return finite;
}

GRADQ_CPU_CLONES void store_row_params(const GroupParams* params, int64_t groups, uint16_t* scales_h,
                                       float* scales_f, uint8_t* zeros) {
  if (scales_h) {
    for (int64_t g = 0; g < groups; ++g) scales_h[g] = float_to_half_bits(params[g].scale);
  } else if (scales_f) {
    for (int64_t g = 0; g < groups; ++g) scales_f[g] = params[g].scale;
  }
  if (zeros) {
    for (int64_t g = 0; g < groups; ++g) zeros[g] = static_cast<uint8_t>(params[g].zero);
  }
}

QuantSpec group_choice_spec(const QuantSpec& spec) {
  QuantSpec s = spec;
  if (s.sub_scale_bits != 0) {
    s.sub_scale_bits = 0;
    s.fp16_scale = false;
  }
  return s;
}

void store_row_sub_scales(GroupParams* params, const float* lo, int64_t groups, int64_t groups_per_super,
                          const QuantSpec& spec, uint16_t* super_h, uint8_t* sub_codes) {
  const int bits = spec.bits(), sub_bits = spec.sub_scale_bits;
  for (int64_t first = 0, s = 0; first < groups; first += groups_per_super, ++s) {
    const int64_t last = std::min(first + groups_per_super, groups);
    float max_scale = 0.f;
    for (int64_t g = first; g < last; ++g) max_scale = std::max(max_scale, params[g].scale);
    const float d = quant_super_scale(max_scale, sub_bits);
    super_h[s] = float_to_half_bits(d);  // exact: d is already fp16
    for (int64_t g = first; g < last; ++g) {
      const uint32_t q = quant_sub_scale_code(params[g].scale, d, sub_bits);
      sub_codes[g] = static_cast<uint8_t>(q);
      const float scale = quant_sub_scale_value(q, d);
      params[g] = {scale, quant_asym_zero(lo[g], scale, bits)};
    }
  }
}

}  // namespace gradq
