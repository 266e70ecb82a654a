#include "linear.cuh"

#include <climits>
#include <string>

#include "dequantize.cuh"
#include "gemv.cuh"

namespace gradq::kernels {

size_t linear_workspace_bytes(int64_t batch, int64_t out_features, int64_t in_features) {
  if (batch <= 1 || out_features <= 0 || in_features <= 0) return 0;
  return static_cast<size_t>(out_features) * static_cast<size_t>(in_features) * sizeof(__half);
}

KernelStatus linear_launch(const LinearParams& p, cublasHandle_t cublas, cudaStream_t stream) {
  KernelStatus s = check_packed_view("linear", p.weight);
  if (!s.ok()) return s;
  if (p.batch < 1) return KernelStatus::invalid("linear: expected batch >= 1, got " + std::to_string(p.batch));
  if (p.x == nullptr) return KernelStatus::invalid("linear: expected a non-null x");
  if ((p.y_fp16 == nullptr) == (p.y_fp32 == nullptr)) {
    return KernelStatus::invalid("linear: expected exactly one of y_fp16 and y_fp32, got " +
                                 std::string(p.y_fp16 ? "both" : "neither"));
  }
  if (p.batch == 1) {
    GemvParams g;
    g.weight = p.weight;
    g.x = p.x;
    g.y_fp16 = p.y_fp16;
    g.y_fp32 = p.y_fp32;
    return gemv_launch(g, stream);
  }

  const int64_t out = p.weight.out_features, in = p.weight.in_features;
  if (p.workspace == nullptr) {
    return KernelStatus::invalid("linear: batch " + std::to_string(p.batch) + " needs a workspace of " +
                                 std::to_string(linear_workspace_bytes(p.batch, out, in)) + " bytes, got null");
  }
  if (cublas == nullptr) return KernelStatus::invalid("linear: batch > 1 needs a cuBLAS handle, got null");
  // cuBLAS takes int sizes and leading dimensions.
  if (p.batch > INT_MAX || out > INT_MAX || in > INT_MAX) {
    return KernelStatus::invalid("linear: expected batch, out_features and in_features <= " + std::to_string(INT_MAX) +
                                 ", got " + std::to_string(p.batch) + ", " + std::to_string(out) + ", " +
                                 std::to_string(in));
  }
  DequantizeParams d;
  d.weight = p.weight;
  d.out_fp16 = p.workspace;
  s = dequantize_launch(d, stream);
  if (!s.ok()) return s;

  // Row-major y [batch, out] = x [batch, in] . W^T [in, out] is, in cuBLAS's column-major terms,
  // y^T (out x batch, ld out) = op_T(W^T stored in x out, ld in) . x^T (in x batch, ld in).
  GRADQ_CUBLAS_RETURN_IF_ERROR(cublasSetStream(cublas, stream));
  const float alpha = 1.f, beta = 0.f;
  const bool out_fp32 = p.y_fp32 != nullptr;
  GRADQ_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(
      cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(p.batch), static_cast<int>(in), &alpha,
      p.workspace, CUDA_R_16F, static_cast<int>(in), p.x, CUDA_R_16F, static_cast<int>(in), &beta,
      out_fp32 ? static_cast<void*>(p.y_fp32) : static_cast<void*>(p.y_fp16), out_fp32 ? CUDA_R_32F : CUDA_R_16F,
      static_cast<int>(out), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return KernelStatus::success();
}

}  // namespace gradq::kernels
