#include "gemv.cuh"

#include <string>

#include "gemv_kernel.cuh"

namespace gradq::kernels {

KernelStatus gemv_launch(const GemvParams& p, cudaStream_t stream) {
  KernelStatus s = check_packed_view("gemv", p.weight);
  if (!s.ok()) return s;
  if (p.x == nullptr) return KernelStatus::invalid("gemv: expected a non-null x");
  if ((p.y_fp16 == nullptr) == (p.y_fp32 == nullptr)) {
    return KernelStatus::invalid("gemv: expected exactly one of y_fp16 and y_fp32, got " +
                                 std::string(p.y_fp16 ? "both" : "neither"));
  }
  const auto blocks = static_cast<unsigned>((p.weight.out_features + kGemvWarpsPerBlock - 1) / kGemvWarpsPerBlock);
  return dispatch_packed_format(p.weight.bits, p.weight.group_size, [&](auto bits, auto group) -> KernelStatus {
    gemv_kernel<decltype(bits)::value, decltype(group)::value><<<blocks, kGemvWarpsPerBlock * 32, 0, stream>>>(p);
    GRADQ_LAUNCH_CHECK();
    return KernelStatus::success();
  });
}

}  // namespace gradq::kernels
