#pragma once
// gemv_kernel: one warp per output row. Lanes take chunks of 8 codes (kBits bytes, one group) in
// turn, so a warp reads 32 * kBits consecutive code bytes and 512 consecutive bytes of x per step;
// dequantized values never leave registers. Partial sums are fp32 and reduced with shuffles.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "gemv.cuh"
#include "packed_kernel.cuh"

namespace gradq::kernels {

constexpr int kGemvWarpsPerBlock = 8;

template <int kBits, int kGroupSize>
__global__ void __launch_bounds__(kGemvWarpsPerBlock * 32) gemv_kernel(GemvParams p) {
  using Traits = PackedFormatTraits<kBits, kGroupSize>;
  const PackedWeightView& w = p.weight;
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kGemvWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= w.out_features) return;
  const int64_t in = w.in_features;
  const int64_t n_groups = kGroupSize == kWholeRowGroup ? 1 : (in + kGroupSize - 1) / kGroupSize;
  const uint8_t* row = w.codes + r * quant_row_bytes(in, kBits);
  const int64_t n_chunks = (in + Traits::kChunkCodes - 1) / Traits::kChunkCodes;
  // 16-byte loads of x need a 16-byte aligned x; chunk starts are multiples of 8 halves.
  const bool x_vec = (reinterpret_cast<uintptr_t>(p.x) & 15u) == 0;

  float acc = 0.f;
  for (int64_t c = lane; c < n_chunks; c += 32) {
    const int64_t first = c * Traits::kChunkCodes;
    const int64_t g = kGroupSize == kWholeRowGroup ? 0 : first / kGroupSize;
    const float scale = load_scale(w.scales, w.fp16_scale, r * n_groups + g);
    const float zero = load_zero(w.zeros, kBits, w.zero_bits, r * n_groups + g);
    const bool full = first + Traits::kChunkCodes <= in;

    uint8_t bytes[Traits::kChunkBytes];
    const uint8_t* src = row + first * kBits / 8;
#pragma unroll
    for (int b = 0; b < Traits::kChunkBytes; ++b) {
      // The row's last chunk may own fewer bytes; its missing codes are never read.
      bytes[b] = (full || first * kBits / 8 + b < quant_row_bytes(in, kBits)) ? src[b] : 0;
    }
    alignas(16) __half xs[Traits::kChunkCodes];  // the target of one 16-byte load
    if (full && x_vec) {
      *reinterpret_cast<uint4*>(xs) = *reinterpret_cast<const uint4*>(p.x + first);
    } else {
#pragma unroll
      for (int k = 0; k < Traits::kChunkCodes; ++k) xs[k] = first + k < in ? p.x[first + k] : __float2half(0.f);
    }
#pragma unroll
    for (int k = 0; k < Traits::kChunkCodes; ++k) {
      const float v = quant_dequant(quant_unpack_code(bytes, k, kBits), scale, zero);
      acc = fmaf(v, __half2float(xs[k]), acc);
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (lane == 0) {
    if (p.y_fp32) {
      p.y_fp32[r] = acc;
    } else {
      p.y_fp16[r] = __float2half_rn(acc);
    }
  }
}

}  // namespace gradq::kernels
