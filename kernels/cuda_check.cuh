#pragma once
// Error handling shared by the kernel launchers. Launchers never abort: they return a
// KernelStatus that the torch glue in csrc/ turns into an exception with the message as is.

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>
#include <utility>

namespace gradq::kernels {

/// Result of a launcher. `ok()` when every CUDA call and launch succeeded; otherwise `message`
/// names the operation, what was expected and what was got (or the CUDA error string).
struct KernelStatus {
  cudaError_t code = cudaSuccess;
  std::string message;

  bool ok() const { return code == cudaSuccess && message.empty(); }
  static KernelStatus success() { return {}; }
  /// A rejected argument (bad size, unsupported format): reported as cudaErrorInvalidValue.
  static KernelStatus invalid(std::string what) { return {cudaErrorInvalidValue, std::move(what)}; }
  static KernelStatus cuda(cudaError_t code, const char* expr, const char* file, int line) {
    return {code, std::string(expr) + " failed at " + file + ":" + std::to_string(line) + ": " +
                      cudaGetErrorName(code) + ": " + cudaGetErrorString(code)};
  }
};

inline const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "CUBLAS_STATUS_UNKNOWN";
  }
}

}  // namespace gradq::kernels

/// Returns a KernelStatus from the enclosing launcher when a CUDA runtime call fails.
#define GRADQ_CUDA_RETURN_IF_ERROR(expr)                                                   \
  do {                                                                                     \
    const cudaError_t gradq_err_ = (expr);                                                 \
    if (gradq_err_ != cudaSuccess) {                                                       \
      return ::gradq::kernels::KernelStatus::cuda(gradq_err_, #expr, __FILE__, __LINE__); \
    }                                                                                      \
  } while (0)

/// Follows every kernel launch: reports a bad launch configuration (and any earlier sticky error).
#define GRADQ_LAUNCH_CHECK() GRADQ_CUDA_RETURN_IF_ERROR(cudaGetLastError())

/// Returns a KernelStatus from the enclosing launcher when a cuBLAS call fails.
#define GRADQ_CUBLAS_RETURN_IF_ERROR(expr)                                                           \
  do {                                                                                               \
    const cublasStatus_t gradq_st_ = (expr);                                                         \
    if (gradq_st_ != CUBLAS_STATUS_SUCCESS) {                                                        \
      return ::gradq::kernels::KernelStatus{cudaErrorUnknown,                                        \
                                            std::string(#expr) + " failed at " + __FILE__ + ":" +    \
                                                std::to_string(__LINE__) + ": " +                    \
                                                ::gradq::kernels::cublas_status_name(gradq_st_)};    \
    }                                                                                                \
  } while (0)
