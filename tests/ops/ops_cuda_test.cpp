// The CUDA implementations of gradq::dequantize and gradq::linear (csrc/ops/ops_cuda.cpp), called
// through the dispatcher as a packed checkpoint on the GPU calls them, against the CPU reference:
// dequantization bit-exact, the linear within a bound derived from its fp16 roundings. Built only
// against a CUDA-enabled libtorch. The registration test needs no device and always runs; the
// others skip themselves without a GPU, saying why.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "quant/packed_weight.h"
#include "quant/quant_spec.h"
#include "quant/quantize.h"

using namespace gradq;

#include "support/test_helpers.h"

using test::bitwise_equal;
using test::gaussian;

namespace {

#define GRADQ_REQUIRE_GPU()                                                                    \
  do {                                                                                         \
    if (!torch::cuda::is_available())                                                          \
      GTEST_SKIP() << "no CUDA device (torch::cuda::is_available() is false)";                 \
  } while (0)

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                            const c10::optional<at::Tensor>&, int64_t, int64_t, int64_t, int64_t,
                            const c10::optional<at::Tensor>&, int64_t);
using DequantizeFn = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, int64_t,
                                int64_t, int64_t, int64_t, const c10::optional<at::Tensor>&, int64_t);

c10::optional<at::Tensor> on(const at::Tensor& t, at::Device device) {
  return t.defined() ? c10::optional<at::Tensor>(t.to(device)) : c10::nullopt;
}

int64_t zero_bits_arg(const PackedWeight& w) { return w.spec.symmetric ? 8 : w.spec.zero_bits(); }

at::Tensor call_dequantize(const PackedWeight& w, at::Device device) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("gradq::dequantize", "").typed<DequantizeFn>();
  return op.call(w.codes.to(device), w.scales.to(device), on(w.zeros, device), w.spec.bits(), w.spec.group_size,
                 w.in_features, zero_bits_arg(w), on(w.sub_scales, device), w.spec.sub_scale_bits);
}

at::Tensor call_linear(const at::Tensor& x, const PackedWeight& w, const at::Tensor& bias, at::Device device) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("gradq::linear", "").typed<LinearFn>();
  return op.call(x.to(device), w.codes.to(device), w.scales.to(device), on(w.zeros, device), on(bias, device),
                 w.spec.bits(), w.spec.group_size, w.in_features, zero_bits_arg(w), on(w.sub_scales, device),
                 w.spec.sub_scale_bits);
}

TEST(OpsCudaRegistration, BothOpsHaveACudaKernel) {
  for (const char* name : {"gradq::dequantize", "gradq::linear"}) {
    const auto op = c10::Dispatcher::singleton().findOp({name, ""});
    ASSERT_TRUE(op.has_value()) << name << " is not registered";
    EXPECT_TRUE(op->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) << name << " has no CUDA kernel";
  }
}

// The formats the kernels read (kernels/packed.cuh): every kind of zero point, symmetric, fp32 scales.
const char* const kFormats[] = {"b4g32", "b3g128s", "b2grow-f32", "b8g16s-f32", "b4g64s", "b4g32z8", "b3g16z8-f32",
                                "b4g128"};
constexpr int64_t kOut = 33, kIn = 172;

TEST(OpsCuda, DequantizeIsBitExact) {
  GRADQ_REQUIRE_GPU();
  for (const char* f : kFormats) {
    SCOPED_TRACE(f);
    const QuantSpec spec = parse_quant_spec(f);
    const PackedWeight w = quantize(gaussian(kOut, kIn, 100 + spec.bits()), spec);
    const at::Tensor got = call_dequantize(w, at::kCUDA);
    ASSERT_TRUE(got.is_cuda());
    EXPECT_TRUE(bitwise_equal(got.cpu(), dequantize_ref(w)));
  }
}

// The kernels round x to fp16, and the batched path also the weight (an fp16 GEMM with float32
// accumulation); the GEMV keeps float32 weights. Each rounding moves a product by at most 2^-11 of
// its size, and the sums of `in` products are within (in + 1) * eps * sum |x w| of exact in float32.
TEST(OpsCuda, LinearWithinItsRoundingOfTheReference) {
  GRADQ_REQUIRE_GPU();
  for (const char* f : kFormats) {
    for (int64_t batch : {1, 2, 5, 64}) {
      for (bool with_bias : {false, true}) {
        SCOPED_TRACE(std::string(f) + " batch " + std::to_string(batch) + (with_bias ? " bias" : ""));
        const QuantSpec spec = parse_quant_spec(f);
        const PackedWeight w = quantize(gaussian(kOut, kIn, 100 + spec.bits()), spec);
        const at::Tensor x = gaussian(batch, kIn, 200 + batch, 1.0);
        const at::Tensor bias = with_bias ? gaussian(1, kOut, 300, 1.0).squeeze(0).sign() * 3.0 : at::Tensor();
        const at::Tensor wq = dequantize_ref(w);
        const at::Tensor y = call_linear(x, w, bias, at::kCUDA);
        ASSERT_TRUE(y.is_cuda());
        ASSERT_EQ(y.scalar_type(), at::kFloat);
        ASSERT_EQ(y.sizes(), (std::vector<int64_t>{batch, kOut}));
        const at::Tensor want = at::linear(x, wq, bias);
        const double unit = 2.0 * std::ldexp(1.0, -11) + (kIn + 1) * std::numeric_limits<float>::epsilon();
        at::Tensor bound = at::matmul(x.abs(), wq.abs().t()) * unit;
        if (with_bias) bound = bound + bias.abs() * std::numeric_limits<float>::epsilon();
        const at::Tensor err = (y.cpu() - want).abs();
        EXPECT_LE((err - bound).max().item<float>(), 0.f) << "largest difference " << err.max().item<float>();
        EXPECT_GT(y.abs().min().item<float>(), 0.f) << "an output was left zero";
      }
    }
  }
}

TEST(OpsCuda, HalfInputReturnsHalfAndThreeDimensionalShapes) {
  GRADQ_REQUIRE_GPU();
  const PackedWeight w = quantize(gaussian(kOut, kIn, 7), parse_quant_spec("b4g32"));
  const at::Tensor x = gaussian(6, kIn, 8, 1.0).view({2, 3, kIn});
  const at::Tensor y = call_linear(x.to(at::kHalf), w, at::Tensor(), at::kCUDA);
  EXPECT_EQ(y.scalar_type(), at::kHalf);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 3, kOut}));
  const at::Tensor y2 = call_linear(x, w, at::Tensor(), at::kCUDA);
  EXPECT_TRUE(at::allclose(y.cpu().to(at::kFloat), y2.cpu(), 1e-2, 1e-2));
}

TEST(OpsCuda, RejectsWhatTheKernelsCannotDo) {
  GRADQ_REQUIRE_GPU();
  const PackedWeight k = quantize(gaussian(kOut, 256, 9), parse_quant_spec("b4g16k6"));
  try {
    call_linear(gaussian(1, 256, 10, 1.0), k, at::Tensor(), at::kCUDA);
    FAIL() << "a k6 weight was accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("sub-scale"), std::string::npos) << e.what();
  }
  const PackedWeight w = quantize(gaussian(kOut, kIn, 11), parse_quant_spec("b4g32"));
  try {
    // Weight on the GPU, x on the CPU: the dispatcher picks CUDA, the op names the device.
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("gradq::linear", "").typed<LinearFn>();
    op.call(gaussian(1, kIn, 12, 1.0), w.codes.cuda(), w.scales.cuda(), on(w.zeros, at::kCUDA), c10::nullopt,
            w.spec.bits(), w.spec.group_size, w.in_features, zero_bits_arg(w), c10::nullopt, 0);
    FAIL() << "x on the CPU was accepted with a weight on the GPU";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("x must be on the GPU"), std::string::npos) << e.what();
  }
}

}  // namespace
