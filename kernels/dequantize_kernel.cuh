#pragma once
// dequantize_kernel: one thread per chunk of 8 codes (kBits bytes, all in one group), grid-stride
// over the weight. kGroupSize is a template argument so that the group of a chunk is a shift.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dequantize.cuh"
#include "packed_kernel.cuh"

namespace gradq::kernels {

constexpr int kDequantizeThreads = 256;

template <int kBits, int kGroupSize>
__global__ void __launch_bounds__(kDequantizeThreads) dequantize_kernel(DequantizeParams p) {
  using Traits = PackedFormatTraits<kBits, kGroupSize>;
  const PackedWeightView& w = p.weight;
  const int64_t in = w.in_features;
  const int64_t chunks_per_row = (in + Traits::kChunkCodes - 1) / Traits::kChunkCodes;
  const int64_t n_groups = kGroupSize == kWholeRowGroup ? 1 : (in + kGroupSize - 1) / kGroupSize;
  const int64_t row_bytes = quant_row_bytes(in, kBits);
  const int64_t total = w.out_features * chunks_per_row;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / chunks_per_row;
    const int64_t first = (t - r * chunks_per_row) * Traits::kChunkCodes;
    const int64_t g = kGroupSize == kWholeRowGroup ? 0 : first / kGroupSize;
    const float scale = load_scale(w.scales, w.fp16_scale, r * n_groups + g);
    const float zero = load_zero(w.zeros, kBits, w.zero_bits, r * n_groups + g);
    const uint8_t* row = w.codes + r * row_bytes;
    const int64_t out0 = r * in + first;
#pragma unroll
    for (int k = 0; k < Traits::kChunkCodes; ++k) {
      if (first + k < in) {
        const float v = quant_dequant(quant_unpack_code(row, first + k, kBits), scale, zero);
        if (p.out_fp32) {
          p.out_fp32[out0 + k] = v;
        } else {
          p.out_fp16[out0 + k] = __float2half_rn(v);
        }
      }
    }
  }
}

}  // namespace gradq::kernels
