#pragma once
// Unpacking and dequantization on the GPU: codes, scales, zeros -> W [out, in]. Each element is
// quant_dequant(quant_unpack_code(...)) of quant_math.h, so the fp32 output is bit-identical to
// gradq::dequantize_ref; the fp16 output is that value rounded to nearest even.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_check.cuh"
#include "packed.cuh"

namespace gradq::kernels {

struct DequantizeParams {
  PackedWeightView weight;
  float* out_fp32 = nullptr;   // [out_features, in_features]; exactly one of out_fp32 / out_fp16
  __half* out_fp16 = nullptr;  // [out_features, in_features]
};

/// Dequantizes `p.weight` on `stream` into whichever output is set.
KernelStatus dequantize_launch(const DequantizeParams& p, cudaStream_t stream);

}  // namespace gradq::kernels
