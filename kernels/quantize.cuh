#pragma once
// Group quantization and packing on the GPU: W fp32 [out, in] -> codes, scales, zeros in the
// layout of csrc/quant/quant_spec.h. Round to nearest with min-max (asymmetric) or signed-absmax
// (symmetric) parameters, computed with quant_math.h, so codes, scales and zero points are
// bit-identical to gradq::quantize_ref on the CPU.

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_check.cuh"
#include "packed.cuh"

namespace gradq::kernels {

struct QuantizeParams {
  const float* weight = nullptr;  // [out_features, in_features] fp32, row-major, finite
  uint8_t* codes = nullptr;       // [out_features, quant_row_bytes(in_features, bits)], fully written
  void* scales = nullptr;         // [out_features, n_groups] fp16 bits (uint16_t) if fp16_scale, else fp32
  uint8_t* zeros = nullptr;       // [out_features, n_groups] one byte each (zero_bits 8); must be null when
                                  // symmetric, set otherwise
  /// Optional device int, set to 1 when some group's scale is not finite (an fp16 scale overflow:
  /// the CPU quantizer rejects such weights; the caller checks this flag to do the same). Null: unchecked.
  int* nonfinite_scale = nullptr;
  int64_t out_features = 0;
  int64_t in_features = 0;
  int bits = 4;
  int64_t group_size = 128;  // 16, 32, 64, 128 or kWholeRowGroup (0)
  bool symmetric = false;
  bool fp16_scale = true;
  /// Zero points are written one byte each, by the warp of their group: 8 only (z8 formats, or
  /// 8-bit codes). b-bit zero points share bytes between groups that different warps write.
  int zero_bits = 8;
  int sub_scale_bits = 0;  // must be 0: k6/k8 formats are not supported
};

/// Quantizes `p.weight` on `stream`. Returns a failed status (nothing launched) for an unsupported
/// format or bad sizes/pointers, or the CUDA error of the launch.
KernelStatus quantize_launch(const QuantizeParams& p, cudaStream_t stream);

}  // namespace gradq::kernels
