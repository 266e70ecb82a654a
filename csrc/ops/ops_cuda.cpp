// CUDA implementations of gradq::dequantize and gradq::linear: the tensors are validated as the CPU
// ops validate them (packed_weight_from_tensors), then the launchers of kernels/ run on the current
// stream. Compiled only against a CUDA-enabled libtorch (GRADQ_CUDA_OPS in CMakeLists.txt).

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_fp16.h>

#include <vector>

#include "dequantize.cuh"
#include "linear.cuh"
#include "ops/ops.h"

namespace gradq::ops {
namespace {

void check_on(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(!t.defined() || t.device() == device, "gradq (CUDA): ", name, " must be on ", device, " like the other ",
              "inputs, got ", t.device());
}

/// Raw device pointers into a validated, contiguous PackedWeight whose tensors are on `device`.
kernels::PackedWeightView device_view(const PackedWeight& w, const at::Device& device) {
  check_on(w.codes, "codes", device);
  check_on(w.scales, "scales", device);
  check_on(w.zeros, "zeros", device);
  check_on(w.sub_scales, "sub_scales", device);
  kernels::PackedWeightView v;
  v.codes = w.codes.data_ptr<uint8_t>();
  v.scales = w.scales.data_ptr();
  v.zeros = w.zeros.defined() ? w.zeros.data_ptr<uint8_t>() : nullptr;
  v.out_features = w.out_features;
  v.in_features = w.in_features;
  v.bits = w.spec.bits();
  v.group_size = w.spec.group_size;  // kWholeRow and kWholeRowGroup are both 0
  v.fp16_scale = w.spec.fp16_scale;
  v.zero_bits = w.zeros.defined() ? w.spec.zero_bits() : w.spec.bits();  // unread when symmetric
  v.sub_scale_bits = w.spec.sub_scale_bits;  // the launchers reject k formats, naming what they support
  return v;
}

void check_status(const kernels::KernelStatus& status) { TORCH_CHECK(status.ok(), status.message); }

at::Tensor dequantize_cuda(const at::Tensor& codes, const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                           int64_t bits, int64_t group_size, int64_t in_features, int64_t zero_bits,
                           const c10::optional<at::Tensor>& sub_scales, int64_t sub_scale_bits) {
  // Any input on the GPU selects this implementation; the others must be there too.
  TORCH_CHECK(codes.is_cuda(), "gradq::dequantize (CUDA): codes must be on the GPU like the other inputs, got ",
              codes.device());
  const c10::cuda::CUDAGuard guard(codes.device());
  const PackedWeight w = detail::packed_weight_from_op_args(codes, scales, zeros, bits, group_size, in_features,
                                                            zero_bits, sub_scales, sub_scale_bits);
  at::Tensor out = at::empty({w.out_features, w.in_features}, codes.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  kernels::DequantizeParams p;
  p.weight = device_view(w, codes.device());
  p.out_fp32 = out.data_ptr<float>();
  check_status(kernels::dequantize_launch(p, at::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                       int64_t group_size, int64_t in_features, int64_t zero_bits,
                       const c10::optional<at::Tensor>& sub_scales, int64_t sub_scale_bits) {
  // Any input on the GPU selects this implementation; the others must be there too.
  TORCH_CHECK(x.is_cuda(), "gradq::linear (CUDA): x must be on the GPU like the weight, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const PackedWeight w = detail::packed_weight_from_op_args(codes, scales, zeros, bits, group_size, in_features,
                                                            zero_bits, sub_scales, sub_scale_bits);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.in_features,
              "gradq::linear: x must be [..., in_features] with in_features = ", w.in_features, ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "gradq::linear: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.out_features && bias->is_floating_point(),
                "gradq::linear: bias must be a floating tensor [", w.out_features, "], got ", bias->scalar_type(), " ",
                bias->sizes());
    check_on(*bias, "bias", x.device());
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = w.out_features;
  const int64_t rows = x.numel() / w.in_features;
  if (rows == 0 || w.out_features == 0) return at::zeros(out_shape, x.options());
  // The kernels read fp16 activations (half loads in the GEMV, fp16 cuBLAS GEMM for batches) and
  // accumulate in float32: float32 and bf16 inputs are rounded to fp16 here, so a CUDA linear
  // differs from the CPU one by that rounding (and overflows past fp16's 65504).
  const at::Tensor xh = x.reshape({rows, w.in_features}).to(at::kHalf).contiguous();
  at::Tensor y = at::empty({rows, w.out_features}, x.options().dtype(at::kFloat));
  const size_t workspace_bytes = kernels::linear_workspace_bytes(rows, w.out_features, w.in_features);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>((workspace_bytes + 1) / 2)}, x.options().dtype(at::kHalf));
  }
  kernels::LinearParams p;
  p.weight = device_view(w, x.device());
  p.x = reinterpret_cast<const __half*>(xh.data_ptr<at::Half>());
  p.y_fp32 = y.data_ptr<float>();
  p.batch = rows;
  p.workspace = workspace.defined() ? reinterpret_cast<__half*>(workspace.data_ptr<at::Half>()) : nullptr;
  check_status(kernels::linear_launch(p, at::cuda::getCurrentCUDABlasHandle(), at::cuda::getCurrentCUDAStream()));
  if (bias.has_value()) y.add_(*bias);
  return y.reshape(out_shape).to(x.scalar_type());
}

}  // namespace
}  // namespace gradq::ops

TORCH_LIBRARY_IMPL(gradq, CUDA, m) {
  m.impl("dequantize", &gradq::ops::dequantize_cuda);
  m.impl("linear", &gradq::ops::linear_cuda);
}
