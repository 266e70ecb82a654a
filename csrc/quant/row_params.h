#pragma once
// The per-row group parameters of the CPU quantizer (quantize.cpp): the range of each group, the
// round-to-nearest parameters of all groups of a row, and their storage. In a file of their own
// because row_params.cpp is compiled with -fno-trapping-math (CMakeLists.txt): only then does GCC
// vectorize the loops over groups, whose fp16 rounding selects between values computed with
// floats. The flag would cost the code loop of quantize.cpp its SIMD max and min, so it stays
// here.

#include <cmath>
#include <cstdint>

#include "quant/cpu_clones.h"
#include "quant/quant_math.h"
#include "quant/quant_spec.h"

namespace gradq {

/// Min and max of a group, and whether it is all finite.
struct GroupRange {
  float lo, hi;
  bool finite;
};

/// The simd reduction lets the compiler reorder min and max across lanes (without it, it keeps
/// them in order, and scalar); the minimum and maximum of a set do not depend on that order, up to
/// the sign of zero, which the parameter functions normalise. `finite` is false when the group
/// holds a NaN (which the comparisons skip) or an inf (which becomes lo or hi).
GRADQ_ALWAYS_INLINE GroupRange group_range(const float* w, int64_t n) {
  float lo = w[0], hi = w[0];
  int nan = 0;
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    lo = w[i] < lo ? w[i] : lo;
    hi = w[i] > hi ? w[i] : hi;
    nan |= w[i] != w[i];
  }
  return {lo, hi, nan == 0 && std::isfinite(lo) && std::isfinite(hi)};
}

/// Round-to-nearest parameters of a group spanning [lo, hi].
GRADQ_ALWAYS_INLINE GroupParams rtn_params(float lo, float hi, bool symmetric, int bits, bool fp16_scale) {
  return symmetric ? quant_sym_params(quant_sym_signed_absmax(lo, hi), bits, fp16_scale)
                   : quant_asym_params(lo, hi, bits, fp16_scale);
}

inline GroupParams rtn_params(float lo, float hi, const QuantSpec& spec) {
  return rtn_params(lo, hi, spec.symmetric, spec.bits(), spec.fp16_scale);
}

/// rtn_params of every group of a row of `in` weights in groups of `glen` into params[groups];
/// `lo` and `hi` (as many) are scratch. False when a group is not finite. Cloned per ISA.
bool rtn_row_params(const float* w, int64_t in, int64_t glen, const QuantSpec& spec, float* lo, float* hi,
                    GroupParams* params);

/// Stores the parameters of a row's groups: scales as fp16 bits (`scales_h`) or fp32 (`scales_f`,
/// or neither: a k format, whose scales store_row_sub_scales wrote), zero points a byte each
/// (`zeros`, null for symmetric formats; pack_side_fields packs them to their width). The scales
/// are already rounded to their storage type, so the conversion is exact. Cloned per ISA.
void store_row_params(const GroupParams* params, int64_t groups, uint16_t* scales_h, float* scales_f,
                      uint8_t* zeros);

/// The spec with which a quantizer chooses each group's range and scale: `spec` itself, or for k
/// formats the same with fp32 scales, since a group's stored scale is known only once every group
/// of its super-group has its range (store_row_sub_scales).
QuantSpec group_choice_spec(const QuantSpec& spec);

/// k formats: turns the unrounded scales of a row's groups (params[g].scale, chosen with
/// group_choice_spec) into stored ones: per super-group of `groups_per_super` groups the fp16
/// super-scale (into super_h[]) and each group's sub-scale code (a byte each into sub_codes[]),
/// then params[g] = {stored scale, quant_asym_zero(lo[g], stored scale)}, lo[g] being the lower
/// end of the range the group's scale was chosen for. The scalar reference and the parallel
/// quantizer both call this.
void store_row_sub_scales(GroupParams* params, const float* lo, int64_t groups, int64_t groups_per_super,
                          const QuantSpec& spec, uint16_t* super_h, uint8_t* sub_codes);

}  // namespace gradq
