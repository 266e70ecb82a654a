#pragma once
// Two GEMV kernels; dequantized values never leave registers, partial sums are fp32 and reduced
// with shuffles.
// gemv_kernel (any format and shape): one warp per output row. Lanes take chunks of 8 codes (kBits
// bytes, one group) in turn, so a warp reads 32 * kBits consecutive code bytes and 512 consecutive
// bytes of x per step, one byte load per code byte.
// gemv_vec_kernel (2, 4 and 8 bits, rows of whole 16-byte vectors, 16-byte aligned codes and x):
// kGemvVecRows rows per warp, so that each load of x and its conversion to float32 serves them all;
// 16-byte loads of codes and x; 2 vectors per lane (1 at 2 bits) loaded, with their groups' scales
// and zero points, before any is used, so that more bytes are in flight against the memory latency
// (4 per lane spilled registers at 2 and 8 bits); codes made floats by bit operations and an add, each
// 8-code chunk's sum scaled once. docs/BENCHMARKS.md has each version's H200 measurements.

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

constexpr int kGemvVecBytes = 16;
constexpr int kGemvVecRows = 4;
constexpr int kGemvVecWarpsPerBlock = 4;
// The float 2^23 and its bits: 2^23 + c for an integer c < 2^23 has c as its mantissa.
constexpr float kCodeBias = 8388608.f;
constexpr uint32_t kCodeBiasBits = 0x4B000000u;

/// Codes per 16-byte vector of a format, or 0 when the vector kernel does not take it (3 bits: a
/// vector is not a whole number of 8-code chunks).
__host__ __device__ constexpr int gemv_vec_codes(int bits) {
  return bits == 2 || bits == 4 || bits == 8 ? kGemvVecBytes * 8 / bits : 0;
}

template <int kBits, int kGroupSize>
__global__ void __launch_bounds__(kGemvVecWarpsPerBlock * 32) gemv_vec_kernel(GemvParams p) {
  using Traits = PackedFormatTraits<kBits, kGroupSize>;
  constexpr int kVecCodes = gemv_vec_codes(kBits);
  static_assert(kVecCodes > 0, "gemv_vec_kernel takes 2, 4 and 8 bits");
  constexpr int kChunks = kVecCodes / Traits::kChunkCodes;  // 8-code chunks per vector
  constexpr int kXVecs = kVecCodes / 8;                     // 16-byte loads of x per vector
  constexpr int kUnroll = kXVecs == 8 ? 1 : 2;               // vectors per lane per step
  // A vector lies in one group when groups are whole multiples of it (or the whole row): one scale
  // and zero per vector instead of one per chunk.
  constexpr bool kOneGroup = kGroupSize == kWholeRowGroup || kGroupSize % kVecCodes == 0;
  const PackedWeightView& w = p.weight;
  const int lane = threadIdx.x & 31;
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) * kGemvVecWarpsPerBlock + (threadIdx.x >> 5)) * kGemvVecRows;
  if (r0 >= w.out_features) return;
  const int64_t in = w.in_features;
  const int64_t n_groups = kGroupSize == kWholeRowGroup ? 1 : (in + kGroupSize - 1) / kGroupSize;
  const int64_t row_bytes = in * kBits / 8;  // whole vectors: the launcher checks in % kVecCodes == 0
  const int64_t n_vecs = in / kVecCodes;
  const uint4* x_vecs = reinterpret_cast<const uint4*>(p.x);

  float acc[kGemvVecRows];
  int64_t row_of[kGemvVecRows];
  const uint4* rows[kGemvVecRows];
#pragma unroll
  for (int j = 0; j < kGemvVecRows; ++j) {
    acc[j] = 0.f;
    // A missing last row reads the first one again and is not written.
    row_of[j] = r0 + j < w.out_features ? r0 + j : r0;
    rows[j] = reinterpret_cast<const uint4*>(w.codes + row_of[j] * row_bytes);
  }
  // The scale and the zero point of the group holding chunk q of vector v in row j.
  auto group_params = [&](int64_t v, int q, int j, float& scale, float& biased_zero) {
    const int64_t first = v * kVecCodes + q * Traits::kChunkCodes;
    const int64_t g = kGroupSize == kWholeRowGroup ? 0 : first / kGroupSize;
    scale = load_scale(w.scales, w.fp16_scale, row_of[j] * n_groups + g);
    biased_zero = kCodeBias + load_zero(w.zeros, kBits, w.zero_bits, row_of[j] * n_groups + g);
  };

  for (int64_t v0 = lane; v0 < n_vecs; v0 += 32 * kUnroll) {
    uint4 codes[kUnroll][kGemvVecRows];
    uint4 xs[kUnroll][kXVecs];
    // Where a vector lies in one group, its scale and zero point too (loaded after the codes had
    // arrived, their latency came on top of the codes': no faster than converting per code).
    float scales[kUnroll][kGemvVecRows], zeros[kUnroll][kGemvVecRows];
    // Every load of the step first, then the arithmetic.
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + u * 32;
      if (v < n_vecs) {
#pragma unroll
        for (int j = 0; j < kGemvVecRows; ++j) codes[u][j] = __ldg(rows[j] + v);
#pragma unroll
        for (int k = 0; k < kXVecs; ++k) xs[u][k] = __ldg(x_vecs + v * kXVecs + k);
        if constexpr (kOneGroup) {
#pragma unroll
          for (int j = 0; j < kGemvVecRows; ++j) group_params(v, 0, j, scales[u][j], zeros[u][j]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + u * 32;
      if (v >= n_vecs) break;
      // x in float32 once for all the rows: a half -> float conversion issues at a quarter of the
      // FMA rate, and converting per code (and each code with I2F) bound the first version.
      float xf[kVecCodes];
      const __half2* xh2 = reinterpret_cast<const __half2*>(xs[u]);
#pragma unroll
      for (int i = 0; i < kVecCodes / 2; ++i) {
        const float2 f = __half22float2(xh2[i]);
        xf[2 * i] = f.x;
        xf[2 * i + 1] = f.y;
      }
#pragma unroll
      for (int j = 0; j < kGemvVecRows; ++j) {
        const uint32_t* words = reinterpret_cast<const uint32_t*>(&codes[u][j]);
        float scale = 0.f, biased_zero = 0.f;
        if constexpr (kOneGroup) {
          scale = scales[u][j];
          biased_zero = zeros[u][j];
        }
#pragma unroll
        for (int q = 0; q < kChunks; ++q) {
          if constexpr (!kOneGroup) group_params(v, q, j, scale, biased_zero);
          // sum (code - zero) x over the chunk, then times its group's scale: one multiply per chunk
          // instead of per code (the error stays of the order of the terms' absolute sum).
          float chunk = 0.f;
#pragma unroll
          for (int k = 0; k < Traits::kChunkCodes; ++k) {
            const int i = q * Traits::kChunkCodes + k;
            const uint32_t code = (words[i * kBits / 32] >> (i * kBits % 32)) & ((1u << kBits) - 1u);
            // 2^23 + code as a float (code in the low mantissa bits), minus 2^23 + zero: code - zero
            // exactly, without a conversion instruction.
            const float centred = __uint_as_float(code | kCodeBiasBits) - biased_zero;
            chunk = fmaf(centred, xf[i], chunk);
          }
          acc[j] = fmaf(scale, chunk, acc[j]);
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kGemvVecRows; ++j) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], offset);
    if (lane == 0 && r0 + j < w.out_features) {
      if (p.y_fp32) {
        p.y_fp32[r0 + j] = acc[j];
      } else {
        p.y_fp16[r0 + j] = __float2half_rn(acc[j]);
      }
    }
  }
}

}  // namespace gradq::kernels
