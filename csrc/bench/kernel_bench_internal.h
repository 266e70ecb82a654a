#pragma once
// Pieces of `gradq bench kernels` shared by the CPU part (kernel_bench.cpp) and the GPU part
// (kernel_bench_gpu.cpp): the byte accounting, the statistics and the test weights.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <iosfwd>
#include <vector>

#include "bench/kernel_bench.h"

namespace gradq::bench::detail {

// ---- Compulsory bytes of one call (kernel_bench.h) ---------------------------------------------

inline int64_t weight_elems(const BenchShape& s) { return s.out_features * s.in_features; }

/// fp32 weights read + packed weight written.
inline int64_t quantize_bytes(const QuantSpec& spec, const BenchShape& s) {
  return 4 * weight_elems(s) + spec.storage_bytes(s.out_features, s.in_features);
}
/// Packed weight read + `out_elem_bytes` per weight written.
inline int64_t dequantize_bytes(const QuantSpec& spec, const BenchShape& s, int64_t out_elem_bytes) {
  return spec.storage_bytes(s.out_features, s.in_features) + out_elem_bytes * weight_elems(s);
}
/// x [batch, in] read + y [batch, out] written, `elem_bytes` per activation.
inline int64_t activation_bytes(const BenchShape& s, int64_t batch, int64_t elem_bytes) {
  return batch * (s.in_features + s.out_features) * elem_bytes;
}
/// Packed weight + activations.
inline int64_t linear_bytes(const QuantSpec& spec, const BenchShape& s, int64_t batch, int64_t act_elem_bytes) {
  return spec.storage_bytes(s.out_features, s.in_features) + activation_bytes(s, batch, act_elem_bytes);
}
/// Float weight of `elem_bytes` per element + activations of the same type.
inline int64_t float_linear_bytes(const BenchShape& s, int64_t batch, int64_t elem_bytes) {
  return elem_bytes * weight_elems(s) + activation_bytes(s, batch, elem_bytes);
}

// ---- Statistics ----------------------------------------------------------------------------------

/// Median (mean of the middle two for an even count); `v` must not be empty.
double median(std::vector<double> v);

/// Input copies that consecutive calls cycle through so that together they span `rotate_bytes`
/// (at least 1, at most kMaxRotationCopies).
int rotation_copies(int64_t bytes_per_copy, int64_t rotate_bytes);
constexpr int kMaxRotationCopies = 256;

/// Fills an OpResult's statistics from its timed calls and its byte count (fraction_of_copy is
/// left to set_copy_reference).
OpResult make_op_result(std::string device, std::string op, std::string spec, const BenchShape& shape, int64_t batch,
                        int64_t packed_bytes, int64_t bytes, int copies, const std::vector<double>& seconds);

/// A CopyResult from the timed copies of a `buffer_bytes` buffer.
CopyResult make_copy_result(int64_t buffer_bytes, const std::vector<double>& seconds, std::string method);

/// Sets d.copy_gb_per_s to the higher of d.copy and d.copy_after, and every op's fraction_of_copy.
void set_copy_reference(DeviceBench& d);

/// Gaussian weights like an LLM layer's (std 0.02), float32 [out, in], from `seed`.
at::Tensor bench_weight(const BenchShape& shape, uint64_t seed);
/// Gaussian activations (std 1), float32 [batch, in], from `seed`.
at::Tensor bench_activations(int64_t batch, int64_t in_features, uint64_t seed);

/// The GPU part: fills `out` (ran, or skipped_reason when gradq was built without its CUDA kernels,
/// their module cannot be loaded, or no device is present). Throws gradq::Error on a CUDA error once
/// a device was found. It runs in libgradq_cuda_bench.so, loaded on the first call
/// (gpu_bench_module.cpp).
void run_gpu_kernel_bench(const KernelBenchOptions& options, DeviceBench& out, std::ostream* log);

}  // namespace gradq::bench::detail
