#pragma once
// Device helpers shared by the kernel templates (compiled by nvcc only).

#include <cstdint>

#include "packed.cuh"
#include "quant/quant_math.h"

namespace gradq::kernels {

// ---- Device helpers shared by the kernels -------------------------------------------------------

/// Compile-time checks every kernel template makes on its format arguments.
template <int kBits, int kGroupSize>
struct PackedFormatTraits {
  static_assert(quant_bits_supported(kBits), "kBits must be 2, 3, 4, 5, 6 or 8");
  static_assert(kGroupSize == kWholeRowGroup || (kGroupSize >= 16 && kGroupSize <= 128 && kGroupSize % 8 == 0),
                "kGroupSize must be a multiple of 8 in [16, 128], or 0 (whole row)");
  // Eight codes fill exactly kBits bytes, and every group starts at a multiple of 8 codes, so a
  // chunk of 8 codes is byte-aligned and never straddles two groups: chunks are the unit of work.
  static constexpr int kChunkCodes = 8;
  static constexpr int kChunkBytes = kBits;
};

/// Stored scale at `index` ([out, n_groups] row-major) as a float; fp16 -> fp32 is exact.
__device__ __forceinline__ float load_scale(const void* scales, bool fp16_scale, int64_t index) {
  return fp16_scale ? half_bits_to_float(static_cast<const uint16_t*>(scales)[index])
                    : static_cast<const float*>(scales)[index];
}

/// Zero point of the group at `index` ([out, n_groups] row-major): stored (asymmetric; a bit stream
/// of zero_bits-wide fields over the tensor, quant_spec.h) or the fixed 2^(bits-1) (symmetric).
__device__ __forceinline__ float load_zero(const uint8_t* zeros, int bits, int zero_bits, int64_t index) {
  return zeros ? static_cast<float>(quant_unpack_code(zeros, index, zero_bits)) : quant_sym_zero(bits);
}

}  // namespace gradq::kernels
