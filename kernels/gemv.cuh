#pragma once
// Fused dequantize + GEMV for batch 1: y = W x with W packed (quant_spec.h layout), x and y fp16
// (y may be fp32), fp32 accumulation. The weight is never materialised: each element is
// quant_dequant(quant_unpack_code(...)) in registers.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_check.cuh"
#include "packed.cuh"

namespace gradq::kernels {

struct GemvParams {
  PackedWeightView weight;
  const __half* x = nullptr;  // [in_features] fp16
  __half* y_fp16 = nullptr;   // [out_features]; exactly one of y_fp16 / y_fp32
  float* y_fp32 = nullptr;    // [out_features]
};

/// y = W x on `stream`.
KernelStatus gemv_launch(const GemvParams& p, cudaStream_t stream);

}  // namespace gradq::kernels
