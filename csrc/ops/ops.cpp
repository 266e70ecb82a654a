#include "ops/ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <vector>

#include "quant/quantize.h"

namespace gradq::ops {
namespace {

c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

// Dot product in eight independent lanes: GCC vectorizes independent accumulators without
// -ffast-math (it may not reorder one accumulator).
float dot(const float* a, const float* b, int64_t n) {
  constexpr int kLanes = 8;
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) acc[k] += a[i + k] * b[i + k];
  }
  for (; i < n; ++i) acc[0] += a[i] * b[i];
  float s = 0.f;
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

// y [rows, out] = x [rows, in] * W^T + bias, dequantizing each weight row once into a per-task
// buffer and using it for every batch row. Reads only the packed weight (about bits/32 of the float
// matrix), which is what decode is bound by.
void linear_fused(const float* x, int64_t rows, const PackedWeight& w, const float* bias, float* y) {
  const PackedView v(w);
  const int64_t in = w.in_features, out = w.out_features;
  at::parallel_for(0, out, parallel_row_grain(in), [&](int64_t o0, int64_t o1) {
    std::vector<float> wrow(static_cast<size_t>(in));
    for (int64_t o = o0; o < o1; ++o) {
      dequantize_row(v, o, wrow.data());
      const float b = bias ? bias[o] : 0.f;
      for (int64_t r = 0; r < rows; ++r) y[r * out + o] = dot(x + r * in, wrow.data(), in) + b;
    }
  });
}

// Weights per block of the batched path: 2^20 floats (4 MiB, 256 rows of 4096) stay in the
// last-level cache from being dequantized to being read by the GEMM.
constexpr int64_t kBatchedBlockElems = int64_t{1} << 20;

// Whether BLAS runs its threads in the OpenMP pool that at::parallel_for uses (OpenBLAS built for
// OpenMP, or a sequential one). OpenBLAS built with pthreads keeps a pool of its own whose threads
// spin after each call, so alternating it with OpenMP loops block by block made the batched linear
// 2-7x slower than one dequantization and one GEMM (docs/BENCHMARKS.md). Other BLAS libraries are
// not identified and are treated like pthreads OpenBLAS.
bool blas_shares_openmp_pool() {
  static const bool shares = [] {
    using GetParallel = int (*)();
    const auto get_parallel = reinterpret_cast<GetParallel>(dlsym(RTLD_DEFAULT, "openblas_get_parallel"));
    return get_parallel != nullptr && get_parallel() != 1;  // 0: sequential, 1: pthreads, 2: OpenMP
  }();
  return shares;
}

}  // namespace

namespace detail {

PackedWeight packed_weight_from_op_args(const at::Tensor& codes, const at::Tensor& scales,
                                        const c10::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                                        int64_t in_features, int64_t zero_bits,
                                        const c10::optional<at::Tensor>& sub_scales, int64_t sub_scale_bits) {
  return packed_weight_from_tensors(codes.contiguous(), scales.contiguous(), contiguous(zeros), bits, group_size,
                                    in_features, zero_bits, contiguous(sub_scales), sub_scale_bits);
}

// Blocks keep the float matrix from being materialised: as a fresh tensor per call it costs page
// faults on every call (4096x4096 on this project's VM: 4 ms to dequantize into reused memory, over
// 100 ms into fresh memory).
at::Tensor linear_batched(const at::Tensor& x, const PackedWeight& w, int64_t block_rows) {
  TORCH_CHECK(block_rows >= 1, "linear_batched: block_rows must be >= 1, got ", block_rows);
  const PackedView v(w);
  const int64_t in = w.in_features, out = w.out_features;
  const int64_t block = std::min(out, block_rows);
  at::Tensor y = at::empty({x.size(0), out}, x.options());
  at::Tensor buffer = at::empty({block, in}, at::kFloat);
  for (int64_t o0 = 0; o0 < out; o0 += block) {
    const int64_t n = std::min(block, out - o0);
    dequantize_rows(v, o0, n, buffer.data_ptr<float>());
    at::Tensor y_block = y.narrow(1, o0, n);  // strides (out, 1): BLAS writes it with ldc = out
    at::mm_out(y_block, x, buffer.narrow(0, 0, n).t());
  }
  return y;
}

}  // namespace detail

at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                      int64_t bits, int64_t group_size, int64_t in_features, int64_t zero_bits,
                      const c10::optional<at::Tensor>& sub_scales, int64_t sub_scale_bits) {
  return gradq::dequantize(detail::packed_weight_from_op_args(codes, scales, zeros, bits, group_size, in_features,
                                                            zero_bits, sub_scales, sub_scale_bits));
}

at::Tensor linear(const at::Tensor& x, const PackedWeight& w, const c10::optional<at::Tensor>& bias) {
  // The op has no derivative; a model whose parameters require grad (any scripted or traced
  // nn.Module) still runs it outside no_grad, and the out= GEMM below refuses inputs that require grad.
  at::NoGradGuard no_grad;
  w.validate();
  TORCH_CHECK(x.defined() && x.dim() >= 1 && x.size(-1) == w.in_features,
              "gradq::linear: x must be [..., in_features] with in_features = ", w.in_features, ", got ",
              x.defined() ? x.sizes() : c10::IntArrayRef{});
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "gradq::linear: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "gradq::linear (CPU): x must be on the CPU, got ", x.device());
  if (x.scalar_type() != at::kFloat) {
    // Models in fp16 or bf16: the kernels compute in float32 (the weight is dequantized to float32
    // anyway) and the result comes back in the model's dtype.
    const c10::optional<at::Tensor> bias_float =
        bias.has_value() ? c10::optional<at::Tensor>(bias->to(at::kFloat)) : c10::nullopt;
    return linear(x.to(at::kFloat), w, bias_float).to(x.scalar_type());
  }
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (b.defined()) {
    TORCH_CHECK(b.dim() == 1 && b.size(0) == w.out_features && b.scalar_type() == at::kFloat,
                "gradq::linear: bias must be float32 [", w.out_features, "], got ", b.scalar_type(), " ",
                b.sizes());
    TORCH_CHECK(b.device().is_cpu(), "gradq::linear (CPU): bias must be on the CPU, got ", b.device());
  }
  const int64_t rows = x.numel() / w.in_features;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = w.out_features;
  const at::Tensor xc = x.contiguous();
  // Decode (a handful of rows) is bound by reading the weight: the fused loop reads the packed
  // codes once and never materialises float weights, which would be 4 bytes per weight written
  // and read back. With more rows the arithmetic dominates and a float GEMM in BLAS (blocked,
  // SIMD, multi-threaded) beats any loop here, so each dequantized block amortises over the batch.
  if (rows > kLinearFusedMaxRows) {
    // With a BLAS that has its own thread pool the whole matrix is one block, so that the two pools
    // take turns once per call.
    const int64_t block_rows = blas_shares_openmp_pool() ? std::max<int64_t>(1, kBatchedBlockElems / w.in_features)
                                                         : w.out_features;
    at::Tensor y = detail::linear_batched(xc.reshape({rows, w.in_features}), w, block_rows);
    if (b.defined()) y.add_(b);
    return y.reshape(out_shape);
  }
  at::Tensor y = at::empty(out_shape, x.options());
  linear_fused(xc.data_ptr<float>(), rows, w, b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>());
  return y;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                  const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                  int64_t group_size, int64_t in_features, int64_t zero_bits,
                  const c10::optional<at::Tensor>& sub_scales, int64_t sub_scale_bits) {
  return linear(x,
                detail::packed_weight_from_op_args(codes, scales, zeros, bits, group_size, in_features, zero_bits,
                                                   sub_scales, sub_scale_bits),
                bias);
}

}  // namespace gradq::ops

TORCH_LIBRARY(gradq, m) {
  // zero_bits, sub_scales and sub_scale_bits came later: their defaults (8-bit zero points, direct
  // scales) are the layout of the checkpoints written before, which keep loading.
  m.def("dequantize(Tensor codes, Tensor scales, Tensor? zeros, int bits, int group_size, int in_features, "
        "int zero_bits=8, Tensor? sub_scales=None, int sub_scale_bits=0) -> Tensor");
  m.def("linear(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? bias, int bits, int group_size, "
        "int in_features, int zero_bits=8, Tensor? sub_scales=None, int sub_scale_bits=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(gradq, CPU, m) {
  m.impl("dequantize", &gradq::ops::dequantize);
  m.impl("linear", static_cast<at::Tensor (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                              int64_t, int64_t, int64_t, int64_t, const c10::optional<at::Tensor>&,
                                              int64_t)>(&gradq::ops::linear));
}

// The CUDA implementations are registered in ops_cuda.cpp, which is compiled only against a
// CUDA-enabled libtorch (Debian's LibTorch 1.13 and the CPU wheels have no ATen/cuda).
