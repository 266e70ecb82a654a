#pragma once
// quantize_kernel: one warp per (row, group). The warp reduces the group's min and max, every lane
// derives the same parameters from them with quant_math.h, and each lane then packs chunks of 8
// codes (exactly kBits bytes, byte-aligned) into registers with quant_pack_code and stores them,
// so no two lanes ever write the same byte.

#include <cuda_runtime.h>

#include <cstdint>

#include "packed_kernel.cuh"
#include "quantize.cuh"

namespace gradq::kernels {

constexpr int kQuantizeWarpsPerBlock = 4;

template <int kBits, int kGroupSize>
__global__ void __launch_bounds__(kQuantizeWarpsPerBlock * 32) quantize_kernel(QuantizeParams p) {
  using Traits = PackedFormatTraits<kBits, kGroupSize>;
  const int lane = threadIdx.x & 31;
  const int64_t n_groups = kGroupSize == kWholeRowGroup ? 1 : (p.in_features + kGroupSize - 1) / kGroupSize;
  const int64_t work = static_cast<int64_t>(blockIdx.x) * kQuantizeWarpsPerBlock + (threadIdx.x >> 5);
  if (work >= p.out_features * n_groups) return;
  const int64_t r = work / n_groups;
  const int64_t g = work - r * n_groups;
  const int64_t glen = kGroupSize == kWholeRowGroup ? p.in_features : kGroupSize;
  const int64_t begin = g * glen;
  const int64_t len = begin + glen <= p.in_features ? glen : p.in_features - begin;
  const float* w = p.weight + r * p.in_features + begin;  // [len]

  // min/max of a finite set do not depend on visiting order (up to the sign of zero, which the
  // parameter functions normalise), so this matches the CPU's lane-wise reduction.
  float lo = w[0], hi = w[0];
  for (int64_t i = lane; i < len; i += 32) {
    const float v = w[i];
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float olo = __shfl_xor_sync(0xffffffffu, lo, offset);
    const float ohi = __shfl_xor_sync(0xffffffffu, hi, offset);
    lo = olo < lo ? olo : lo;
    hi = ohi > hi ? ohi : hi;
  }
  const GroupParams gp = p.symmetric ? quant_sym_params(quant_sym_signed_absmax(lo, hi), kBits, p.fp16_scale)
                                     : quant_asym_params(lo, hi, kBits, p.fp16_scale);
  if (lane == 0) {
    const int64_t pi = r * n_groups + g;
    if (p.fp16_scale) {
      static_cast<uint16_t*>(p.scales)[pi] = float_to_half_bits(gp.scale);  // exact: already fp16
    } else {
      static_cast<float*>(p.scales)[pi] = gp.scale;
    }
    if (p.zeros) p.zeros[pi] = static_cast<uint8_t>(gp.zero);
    if (p.nonfinite_scale && !isfinite(gp.scale)) atomicExch(p.nonfinite_scale, 1);
  }

  const float inv = quant_inv_scale(gp.scale);
  const int64_t row_bytes = quant_row_bytes(p.in_features, kBits);
  uint8_t* row = p.codes + r * row_bytes;
  const int64_t n_chunks = (len + Traits::kChunkCodes - 1) / Traits::kChunkCodes;
  for (int64_t c = lane; c < n_chunks; c += 32) {
    const int64_t first = c * Traits::kChunkCodes;  // within the group
    uint8_t packed[Traits::kChunkCodes] = {0};
#pragma unroll
    for (int k = 0; k < Traits::kChunkCodes; ++k) {
      if (first + k < len) quant_pack_code(packed, k, kBits, quant_code(w[first + k], inv, gp.zero, kBits));
    }
    // Byte offset of this chunk in the row; the row's last chunk may need fewer than kBits bytes.
    const int64_t byte0 = (begin + first) * kBits / 8;
    const int64_t n_bytes = byte0 + Traits::kChunkBytes <= row_bytes ? Traits::kChunkBytes : row_bytes - byte0;
#pragma unroll
    for (int b = 0; b < Traits::kChunkBytes; ++b) {
      if (b < n_bytes) row[byte0 + b] = packed[b];
    }
  }
}

}  // namespace gradq::kernels
