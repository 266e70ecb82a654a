#pragma once
// The custom ops gradq::dequantize and gradq::linear (registered in ops.cpp), callable from C++
// without the dispatcher. A packed checkpoint calls the same code through torch.ops.gradq.*.

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "quant/packed_weight.h"

namespace gradq::ops {

/// Batches of at most this many rows take the fused dequantize-GEMV loop in linear(); larger
/// batches dequantize once and call BLAS. See ops.cpp for why.
constexpr int64_t kLinearFusedMaxRows = 4;

/// gradq::dequantize: float32 [out, in_features] from the packed tensors.
/// Tensors as quant_spec.h lays them out: codes uint8 [out, row_bytes]; scales fp16/fp32
/// [out, n_groups] (k formats: fp16 super-scales [out, n_super_groups]); zeros uint8
/// [out, quant_row_bytes(n_groups, zero_bits)] or none (symmetric); bits in {2, 3, 4, 5, 6, 8};
/// group_size in {16, 32, 64, 128} or 0 (whole row); zero_bits 8 (checkpoints before b-bit zero
/// points, z8 formats) or bits; sub_scales uint8 [out, quant_row_bytes(n_groups, sub_scale_bits)]
/// with sub_scale_bits 6 or 8 for k formats, none and 0 otherwise.
at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                      int64_t bits, int64_t group_size, int64_t in_features, int64_t zero_bits = kZeroBits8,
                      const c10::optional<at::Tensor>& sub_scales = c10::nullopt, int64_t sub_scale_bits = 0);

/// gradq::linear: x float32 [..., in_features] -> [..., out]; equals
/// at::linear(x, dequantize(codes, scales, zeros, ...), bias) up to float summation order.
/// bias: none or float32 [out].
at::Tensor linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                  const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                  int64_t group_size, int64_t in_features, int64_t zero_bits = kZeroBits8,
                  const c10::optional<at::Tensor>& sub_scales = c10::nullopt, int64_t sub_scale_bits = 0);

/// linear() on a PackedWeight.
at::Tensor linear(const at::Tensor& x, const PackedWeight& w, const c10::optional<at::Tensor>& bias = c10::nullopt);

namespace detail {
/// The ops' tensor arguments as a validated PackedWeight of contiguous tensors, on any device (the
/// CPU and the CUDA implementations read it).
PackedWeight packed_weight_from_op_args(const at::Tensor& codes, const at::Tensor& scales,
                                        const c10::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                                        int64_t in_features, int64_t zero_bits,
                                        const c10::optional<at::Tensor>& sub_scales, int64_t sub_scale_bits);

/// linear()'s path for batches above kLinearFusedMaxRows, without bias: x [rows, in] contiguous;
/// the weight is dequantized `block_rows` output rows at a time into one reused buffer, and each
/// block's GEMM writes its columns of y. linear() picks the block size (ops.cpp); tests set it.
at::Tensor linear_batched(const at::Tensor& x, const PackedWeight& w, int64_t block_rows);
}  // namespace detail

}  // namespace gradq::ops
