#pragma once
// y = x W^T for a packed W (quant_spec.h layout) and any batch. Batch 1 runs the fused GEMV;
// batch > 1 dequantizes W to an fp16 workspace and calls cuBLAS (fp16 inputs, fp32 accumulation):
// a first version that is exact in the weights up to their fp16 rounding and fast for large batches.

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda_check.cuh"
#include "packed.cuh"

namespace gradq::kernels {

struct LinearParams {
  PackedWeightView weight;
  const __half* x = nullptr;     // [batch, in_features] fp16, row-major
  __half* y_fp16 = nullptr;      // [batch, out_features]; exactly one of y_fp16 / y_fp32
  float* y_fp32 = nullptr;       // [batch, out_features]
  int64_t batch = 1;
  __half* workspace = nullptr;   // [out_features, in_features] fp16; needed when batch > 1
};

/// Bytes of LinearParams::workspace for this shape (0 for batch 1).
size_t linear_workspace_bytes(int64_t batch, int64_t out_features, int64_t in_features);

/// y = x W^T on `stream`. `cublas` is only used for batch > 1 (may be null for batch 1); its
/// stream is set to `stream`.
KernelStatus linear_launch(const LinearParams& p, cublasHandle_t cublas, cudaStream_t stream);

}  // namespace gradq::kernels
