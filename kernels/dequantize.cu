#include "dequantize.cuh"

#include <algorithm>

#include "dequantize_kernel.cuh"

namespace gradq::kernels {

KernelStatus dequantize_launch(const DequantizeParams& p, cudaStream_t stream) {
  KernelStatus s = check_packed_view("dequantize", p.weight);
  if (!s.ok()) return s;
  if ((p.out_fp32 == nullptr) == (p.out_fp16 == nullptr)) {
    return KernelStatus::invalid("dequantize: expected exactly one of out_fp32 and out_fp16, got " +
                                 std::string(p.out_fp32 ? "both" : "neither"));
  }
  const int64_t chunks = p.weight.out_features * ((p.weight.in_features + 7) / 8);
  // Grid-stride loop: enough blocks to fill any current GPU, capped so the grid always fits.
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((chunks + kDequantizeThreads - 1) / kDequantizeThreads,
                                                              int64_t{1} << 16));
  return dispatch_packed_format(p.weight.bits, p.weight.group_size, [&](auto bits, auto group) -> KernelStatus {
    dequantize_kernel<decltype(bits)::value, decltype(group)::value><<<blocks, kDequantizeThreads, 0, stream>>>(p);
    GRADQ_LAUNCH_CHECK();
    return KernelStatus::success();
  });
}

}  // namespace gradq::kernels
