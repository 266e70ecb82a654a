#include "quantize.cuh"

#include <string>

#include "quantize_kernel.cuh"

namespace gradq::kernels {

KernelStatus quantize_launch(const QuantizeParams& p, cudaStream_t stream) {
  KernelStatus s = check_packed_format("quantize", p.bits, p.group_size, p.out_features, p.in_features);
  if (!s.ok()) return s;
  s = check_side_info("quantize", p.bits, p.zero_bits, p.sub_scale_bits);
  if (!s.ok()) return s;
  if (!p.symmetric && p.zero_bits != 8) {
    return KernelStatus::invalid("quantize: the CUDA quantizer writes zero points of 8 bits (z8 formats, 8-bit "
                                 "codes, or symmetric formats), got zero_bits " + std::to_string(p.zero_bits) +
                                 "; quantize b-bit zero point formats (e.g. b4g32) on the CPU, or use b" +
                                 std::to_string(p.bits) + "g<size>z8");
  }
  if (p.weight == nullptr || p.codes == nullptr || p.scales == nullptr) {
    return KernelStatus::invalid("quantize: expected non-null weight, codes and scales pointers");
  }
  if (p.symmetric != (p.zeros == nullptr)) {
    return KernelStatus::invalid(std::string("quantize: expected zeros ") +
                                 (p.symmetric ? "null for a symmetric format" : "set for an asymmetric format") +
                                 ", got " + (p.zeros ? "a pointer" : "null"));
  }
  const int64_t work = p.out_features * packed_n_groups(p.in_features, p.group_size);
  const auto blocks = static_cast<unsigned>((work + kQuantizeWarpsPerBlock - 1) / kQuantizeWarpsPerBlock);
  return dispatch_packed_format(p.bits, p.group_size, [&](auto bits, auto group) -> KernelStatus {
    quantize_kernel<decltype(bits)::value, decltype(group)::value>
        <<<blocks, kQuantizeWarpsPerBlock * 32, 0, stream>>>(p);
    GRADQ_LAUNCH_CHECK();
    return KernelStatus::success();
  });
}

}  // namespace gradq::kernels
