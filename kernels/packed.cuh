#pragma once
// The packed weight format of csrc/quant/quant_spec.h as raw device pointers, its validation, and
// the one runtime-to-template switch (bits x group size) that every op's launcher goes through.

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "cuda_check.cuh"
#include "quant/quant_math.h"

namespace gradq::kernels {

/// Group size meaning "one group per row" (quant_spec.h kWholeRow); the kernels then take the group
/// length from in_features at run time.
constexpr int kWholeRowGroup = 0;

/// The bit widths and group sizes the kernels are compiled for.
inline constexpr const char* kSupportedFormats =
    "bits 2, 3, 4, 5, 6, 8 x group size 16, 32, 64, 128, 0 (whole row), with direct fp16/fp32 scales (no k6/k8 "
    "sub-scales) and zero points of 8 bits or of the code width";

/// A quantized weight W [out_features, in_features] on the device, laid out as quant_spec.h says.
struct PackedWeightView {
  const uint8_t* codes = nullptr;  // [out_features, quant_row_bytes(in_features, bits)] bit stream per row
  const void* scales = nullptr;    // [out_features, n_groups] fp16 bits (uint16_t) if fp16_scale, else fp32
  const uint8_t* zeros = nullptr;  // [quant_row_bytes(out_features * n_groups, zero_bits)] stream; null:
                                   // symmetric, fixed zero 2^(bits-1)
  int64_t out_features = 0;
  int64_t in_features = 0;
  int bits = 4;
  int64_t group_size = 128;  // 16, 32, 64, 128 or kWholeRowGroup
  bool fp16_scale = true;
  int zero_bits = 8;       // 8 (z8 formats, checkpoints before b-bit zero points) or bits (the default formats)
  int sub_scale_bits = 0;  // k6/k8 formats (6, 8) are not supported by the kernels: must be 0
};

inline int64_t packed_n_groups(int64_t in_features, int64_t group_size) {
  return group_size == kWholeRowGroup ? 1 : (in_features + group_size - 1) / group_size;
}

inline bool packed_format_supported(int bits, int64_t group_size) {
  const bool bits_ok = quant_bits_supported(bits);
  const bool group_ok = group_size == 16 || group_size == 32 || group_size == 64 || group_size == 128 ||
                        group_size == kWholeRowGroup;
  return bits_ok && group_ok;
}

/// Checks what every op needs of a format and its shape: a supported combination and sizes that
/// the kernels' launch grids can hold. `op` prefixes the message.
inline KernelStatus check_packed_format(const char* op, int bits, int64_t group_size, int64_t out_features,
                                        int64_t in_features) {
  if (!packed_format_supported(bits, group_size)) {
    return KernelStatus::invalid(std::string(op) + ": unsupported format bits " + std::to_string(bits) +
                                 ", group size " + std::to_string(group_size) + "; supported: " +
                                 kSupportedFormats);
  }
  if (out_features <= 0 || in_features <= 0) {
    return KernelStatus::invalid(std::string(op) + ": expected out_features > 0 and in_features > 0, got " +
                                 std::to_string(out_features) + " x " + std::to_string(in_features));
  }
  // Rows and groups are indexed by blockIdx.x (at most 2^31 - 1); element offsets stay int64.
  const int64_t groups = out_features * packed_n_groups(in_features, group_size);
  if (groups > INT_MAX || in_features > INT_MAX) {
    return KernelStatus::invalid(std::string(op) + ": expected at most " + std::to_string(INT_MAX) +
                                 " groups and in_features, got " + std::to_string(groups) + " groups and " +
                                 std::to_string(in_features) + " in_features");
  }
  return KernelStatus::success();
}

/// The side information the kernels read: zero points of 8 bits or of the code width, direct scales.
inline KernelStatus check_side_info(const char* op, int bits, int zero_bits, int sub_scale_bits) {
  if (sub_scale_bits != 0) {
    return KernelStatus::invalid(std::string(op) + ": k" + std::to_string(sub_scale_bits) +
                                 " sub-scale formats are not supported by the CUDA kernels; supported: " +
                                 kSupportedFormats);
  }
  if (zero_bits != 8 && zero_bits != bits) {
    return KernelStatus::invalid(std::string(op) + ": zero_bits must be 8 or bits (" + std::to_string(bits) +
                                 "), got " + std::to_string(zero_bits) + "; supported: " + kSupportedFormats);
  }
  return KernelStatus::success();
}

inline KernelStatus check_packed_view(const char* op, const PackedWeightView& w) {
  KernelStatus s = check_packed_format(op, w.bits, w.group_size, w.out_features, w.in_features);
  if (!s.ok()) return s;
  s = check_side_info(op, w.bits, w.zero_bits, w.sub_scale_bits);
  if (!s.ok()) return s;
  if (w.codes == nullptr || w.scales == nullptr) {
    return KernelStatus::invalid(std::string(op) + ": expected non-null codes and scales pointers");
  }
  return KernelStatus::success();
}

/// The one switch from runtime (bits, group_size) to template arguments. Calls
/// `launch(std::integral_constant<int, kBits>, std::integral_constant<int, kGroupSize>)` and returns
/// its status; the combination must have passed check_packed_format.
template <typename Launch>
KernelStatus dispatch_packed_format(int bits, int64_t group_size, Launch&& launch) {
  auto with_group = [&](auto b) -> KernelStatus {
    switch (group_size) {
      case 16: return launch(b, std::integral_constant<int, 16>{});
      case 32: return launch(b, std::integral_constant<int, 32>{});
      case 64: return launch(b, std::integral_constant<int, 64>{});
      case 128: return launch(b, std::integral_constant<int, 128>{});
      case kWholeRowGroup: return launch(b, std::integral_constant<int, kWholeRowGroup>{});
      default: break;
    }
    return KernelStatus::invalid("unsupported group size " + std::to_string(group_size) + "; supported: " +
                                 kSupportedFormats);
  };
  switch (bits) {
    case 2: return with_group(std::integral_constant<int, 2>{});
    case 3: return with_group(std::integral_constant<int, 3>{});
    case 4: return with_group(std::integral_constant<int, 4>{});
    case 5: return with_group(std::integral_constant<int, 5>{});
    case 6: return with_group(std::integral_constant<int, 6>{});
    case 8: return with_group(std::integral_constant<int, 8>{});
    default: break;
  }
  return KernelStatus::invalid("unsupported bits " + std::to_string(bits) + "; supported: " + kSupportedFormats);
}

}  // namespace gradq::kernels
