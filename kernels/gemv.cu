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
  const int64_t out = p.weight.out_features;
  // The vector kernel needs rows of whole 16-byte vectors (then every row starts 16-byte aligned
  // when the codes do) and x aligned for 16-byte loads.
  const int vec_codes = gemv_vec_codes(p.weight.bits);
  const bool aligned = (reinterpret_cast<uintptr_t>(p.weight.codes) % kGemvVecBytes) == 0 &&
                       (reinterpret_cast<uintptr_t>(p.x) % kGemvVecBytes) == 0;
  const bool vec = vec_codes > 0 && p.weight.in_features % vec_codes == 0 && aligned;
  const int64_t rows_per_block = vec ? kGemvVecWarpsPerBlock * kGemvVecRows : kGemvWarpsPerBlock;
  const auto blocks = static_cast<unsigned>((out + rows_per_block - 1) / rows_per_block);
  return dispatch_packed_format(p.weight.bits, p.weight.group_size, [&](auto bits, auto group) -> KernelStatus {
    constexpr int kBits = decltype(bits)::value, kGroup = decltype(group)::value;
    if constexpr (gemv_vec_codes(kBits) > 0) {
      if (vec) {
        gemv_vec_kernel<kBits, kGroup><<<blocks, kGemvVecWarpsPerBlock * 32, 0, stream>>>(p);
        GRADQ_LAUNCH_CHECK();
        return KernelStatus::success();
      }
    }
    gemv_kernel<kBits, kGroup><<<blocks, kGemvWarpsPerBlock * 32, 0, stream>>>(p);
    GRADQ_LAUNCH_CHECK();
    return KernelStatus::success();
  });
}

}  // namespace gradq::kernels
