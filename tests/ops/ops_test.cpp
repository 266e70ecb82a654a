// Tests of the custom ops gradq::dequantize and gradq::linear: called through the dispatcher (as
// a packed TorchScript checkpoint calls them) and through TorchScript itself, against
// at::linear on the dequantized weight, on both CPU paths (fused GEMV for decode-sized batches,
// dequantize + BLAS above ops::kLinearFusedMaxRows).

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/script.h>

#include <cstring>
#include <memory>
#include <sstream>
#include <limits>
#include <string>
#include <vector>

#include "ops/ops.h"
#include "quant/packed_weight.h"
#include "quant/quant_spec.h"
#include "quant/quantize.h"

using namespace gradq;

#include "support/test_helpers.h"

using test::bitwise_equal;
using test::gaussian;

namespace {

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                            const c10::optional<at::Tensor>&, int64_t, int64_t, int64_t, int64_t,
                            const c10::optional<at::Tensor>&, int64_t);
using DequantizeFn = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, int64_t,
                                int64_t, int64_t, int64_t, const c10::optional<at::Tensor>&, int64_t);

c10::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// The zero_bits argument for w's format (8, the schema's default, for symmetric ones).
int64_t zero_bits_arg(const PackedWeight& w) { return w.spec.symmetric ? 8 : w.spec.zero_bits(); }

at::Tensor call_linear(const at::Tensor& x, const PackedWeight& w, const c10::optional<at::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("gradq::linear", "").typed<LinearFn>();
  return op.call(x, w.codes, w.scales, optional(w.zeros), bias, w.spec.bits(), w.spec.group_size, w.in_features,
                 zero_bits_arg(w), optional(w.sub_scales), w.spec.sub_scale_bits);
}

at::Tensor call_dequantize(const PackedWeight& w) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("gradq::dequantize", "").typed<DequantizeFn>();
  return op.call(w.codes, w.scales, optional(w.zeros), w.spec.bits(), w.spec.group_size, w.in_features,
                 zero_bits_arg(w), optional(w.sub_scales), w.spec.sub_scale_bits);
}

QuantSpec make_spec(int bits, int64_t group, bool symmetric, bool fp16_scale) {
  QuantSpec s;
  s.level = quant_level_for_bits(bits);
  s.group_size = group;
  s.symmetric = symmetric;
  s.fp16_scale = fp16_scale;
  return s;
}

// Both results sum `in` float products in different orders; each is within in * eps * sum|x w| of
// the exact value, so they differ by at most twice that (plus the rounding of the bias addition).
void expect_close_to_reference(const at::Tensor& y, const at::Tensor& x, const at::Tensor& wq,
                               const c10::optional<at::Tensor>& bias) {
  const at::Tensor want = at::linear(x, wq, bias.has_value() ? *bias : at::Tensor());
  ASSERT_EQ(y.sizes(), want.sizes());
  const int64_t in = wq.size(1);
  at::Tensor bound = at::matmul(x.abs(), wq.abs().t());
  if (bias.has_value()) bound = bound + bias->abs();
  bound = bound * (2.0 * static_cast<double>(in + 1) * std::numeric_limits<float>::epsilon());
  const at::Tensor excess = (y - want).abs() - bound;
  EXPECT_LE(excess.max().item<float>(), 0.f) << "largest difference " << (y - want).abs().max().item<float>();
  EXPECT_GT(y.abs().min().item<float>(), 0.f) << "an output was left zero";
  EXPECT_TRUE(at::isfinite(y).all().item<bool>());
}

struct LinearCase {
  std::string spec;
  int64_t batch;
  bool bias;
  std::string name() const {
    std::string n = spec + "_batch" + std::to_string(batch) + (bias ? "_bias" : "_nobias");
    for (char& ch : n)
      if (ch == '-') ch = '_';
    return n;
  }
};

std::vector<LinearCase> all_linear_cases() {
  // Every kind of side information: b-bit and 8-bit zero points, symmetric, fp32 scales, k sub-scales.
  const char* formats[] = {"b4g32", "b3g128s", "b2grow-f32", "b8g16s-f32", "b4g64s", "b4g32z8", "b3g16z8-f32",
                           "b4g16k6", "b3g32k8", "b2g64k6"};
  std::vector<LinearCase> cases;
  for (const char* f : formats)
    for (int64_t batch : {1, 2, 3, 4, 5, 17, 64})
      for (bool bias : {false, true}) cases.push_back({f, batch, bias});
  return cases;
}

constexpr int64_t kOut = 33, kIn = 172;

class OpsLinear : public ::testing::TestWithParam<LinearCase> {
 protected:
  void SetUp() override {
    const LinearCase& c = GetParam();
    const QuantSpec spec = parse_quant_spec(c.spec);
    w_ = quantize(gaussian(kOut, kIn, 100 + spec.bits()), spec);
    x_ = gaussian(c.batch, kIn, 200 + c.batch, 1.0);
    // Bias large enough that every output is clearly nonzero.
    if (c.bias) bias_ = gaussian(1, kOut, 300, 1.0).squeeze(0).sign() * 3.0;
  }
  PackedWeight w_;
  at::Tensor x_;
  c10::optional<at::Tensor> bias_;
};

TEST_P(OpsLinear, MatchesLinearOnDequantizedWeight) {
  const at::Tensor y = call_linear(x_, w_, bias_);
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{GetParam().batch, kOut}));
  expect_close_to_reference(y, x_, dequantize(w_), bias_);
}

TEST_P(OpsLinear, CppEntryPointIsTheSameCode) {
  EXPECT_TRUE(bitwise_equal(ops::linear(x_, w_, bias_), call_linear(x_, w_, bias_)));
}

TEST_P(OpsLinear, DequantizeOpIsBitExact) {
  EXPECT_TRUE(bitwise_equal(call_dequantize(w_), dequantize_ref(w_)));
}

INSTANTIATE_TEST_SUITE_P(Sweep, OpsLinear, ::testing::ValuesIn(all_linear_cases()),
                         [](const ::testing::TestParamInfo<LinearCase>& info) { return info.param.name(); });

TEST(OpsLinearShapes, ThreeDimensionalInputOnBothPaths) {
  const PackedWeight w = quantize(gaussian(kOut, kIn, 1), make_spec(4, 32, false, true));
  const at::Tensor bias = at::full({kOut}, 0.5f);
  // [1, 2, in]: 2 rows, fused; [3, 5, in]: 15 rows, BLAS.
  for (const auto& shape : {std::vector<int64_t>{1, 2, kIn}, std::vector<int64_t>{3, 5, kIn}}) {
    const at::Tensor x = gaussian(shape[0] * shape[1], kIn, 2, 1.0).reshape(shape);
    const at::Tensor y = call_linear(x, w, bias);
    ASSERT_EQ(y.sizes(), (std::vector<int64_t>{shape[0], shape[1], kOut}));
    expect_close_to_reference(y, x, dequantize(w), bias);
  }
}

// The batched path dequantizes a block of output rows at a time. linear() sizes the blocks by the
// BLAS build (one block with a pthreads OpenBLAS), so set them here: blocks of 7 rows over 33 outputs
// leave a partial last block of 5.
TEST(OpsLinearShapes, BatchedPathInBlocks) {
  const PackedWeight w = quantize(gaussian(kOut, kIn, 4), make_spec(4, 32, false, true));
  const at::Tensor x = gaussian(9, kIn, 5, 1.0);
  for (int64_t block_rows : {int64_t{1}, int64_t{7}, kOut, kOut + 10}) {
    SCOPED_TRACE("block_rows " + std::to_string(block_rows));
    expect_close_to_reference(ops::detail::linear_batched(x, w, block_rows), x, dequantize(w), c10::nullopt);
  }
  GRADQ_EXPECT_THROW_MSG(ops::detail::linear_batched(x, w, 0), "block_rows must be >= 1, got 0");
}

TEST(OpsLinearShapes, NonContiguousInput) {
  const PackedWeight w = quantize(gaussian(kOut, kIn, 1), make_spec(3, 64, true, true));
  const at::Tensor x = gaussian(kIn, 2, 3, 1.0).t();  // [2, in], transposed view
  ASSERT_FALSE(x.is_contiguous());
  expect_close_to_reference(call_linear(x, w, c10::nullopt), x, dequantize(w), c10::nullopt);
}

// TorchScript compiled from C++ resolves only `torch` (to aten::); this resolver adds `gradq` so that
// a script can name gradq.linear. A saved module prints the calls as ops.gradq.*, which
// torch::jit::load resolves itself, as it will for a packed checkpoint.
struct GradqResolver : torch::jit::NativeResolver {
  std::shared_ptr<torch::jit::SugaredValue> resolveValue(const std::string& name, torch::jit::GraphFunction& f,
                                                         const torch::jit::SourceRange& loc) override {
    if (name == "gradq") return std::make_shared<torch::jit::BuiltinModule>("gradq");
    return NativeResolver::resolveValue(name, f, loc);
  }
};

TEST(OpsTorchScript, SavedModuleCallsTheOpsAfterLoad) {
  // The calls of a checkpoint written before zero_bits and sub-scales existed: 8-bit zero points
  // (z8) through the schema's defaults.
  const PackedWeight w = quantize(gaussian(kOut, kIn, 4), parse_quant_spec("b4g32z8"));
  torch::jit::Module m("m");
  m.define(R"(
def forward(self, x, c, s, z):
    return gradq.linear(x, c, s, z, None, 4, 32, 172)

def dequantize(self, c, s, z):
    return gradq.dequantize(c, s, z, 4, 32, 172)
)",
           std::make_shared<GradqResolver>());
  std::stringstream saved;
  m.save(saved);
  torch::jit::Module loaded = torch::jit::load(saved);
  const at::Tensor x = gaussian(3, kIn, 5, 1.0);
  const at::Tensor y = loaded.forward({x, w.codes, w.scales, w.zeros}).toTensor();
  EXPECT_TRUE(bitwise_equal(y, ops::linear(x, w)));
  const at::Tensor dq = loaded.get_method("dequantize")({w.codes, w.scales, w.zeros}).toTensor();
  EXPECT_TRUE(bitwise_equal(dq, dequantize(w)));
  GRADQ_EXPECT_THROW_MSG(loaded.forward({gaussian(3, 100, 5), w.codes, w.scales, w.zeros}), "in_features = 172");
  // The same weight in the default format (4-bit zero points) gives the same values from fewer bytes.
  const PackedWeight wb = quantize(gaussian(kOut, kIn, 4), parse_quant_spec("b4g32"));
  EXPECT_LT(wb.zeros.nbytes(), w.zeros.nbytes());
  EXPECT_TRUE(bitwise_equal(call_dequantize(wb), dq));
  // An old-style call on the new layout names the mismatch.
  GRADQ_EXPECT_THROW_MSG(loaded.forward({x, wb.codes, wb.scales, wb.zeros}), "zeros must be Byte [33, 6], got Byte [99]");
}

TEST(OpsTorchScript, SubScaleFormatThroughTheSchema) {
  const PackedWeight w = quantize(gaussian(kOut, kIn, 9), parse_quant_spec("b4g16k6"));
  torch::jit::Module m("m");
  m.define(R"(
def forward(self, x, c, s, z, q):
    return gradq.linear(x, c, s, z, None, 4, 16, 172, 4, q, 6)
)",
           std::make_shared<GradqResolver>());
  std::stringstream saved;
  m.save(saved);
  torch::jit::Module loaded = torch::jit::load(saved);
  const at::Tensor x = gaussian(2, kIn, 5, 1.0);
  EXPECT_TRUE(bitwise_equal(loaded.forward({x, w.codes, w.scales, w.zeros, w.sub_scales}).toTensor(), ops::linear(x, w)));
}

// fp16 and bf16 models: the op computes in float32 and returns the input's dtype, so its result is
// the float32 result rounded once to that dtype, on both CPU paths (decode-sized and batched).
TEST(OpsLinear, HalfAndBfloat16InputsReturnTheirDtype) {
  const PackedWeight w = quantize(gaussian(kOut, kIn, 8), make_spec(4, 32, false, true));
  const at::Tensor bias = gaussian(1, kOut, 9).view({kOut});
  for (at::ScalarType dtype : {at::kHalf, at::kBFloat16}) {
    for (int64_t rows : {int64_t{1}, ops::kLinearFusedMaxRows + 5}) {
      const at::Tensor x = gaussian(rows, kIn, 10).to(dtype);
      const at::Tensor y = call_linear(x, w, bias.to(dtype));
      ASSERT_EQ(y.scalar_type(), dtype);
      const at::Tensor want = call_linear(x.to(at::kFloat), w, bias.to(dtype).to(at::kFloat)).to(dtype);
      EXPECT_TRUE(bitwise_equal(y, want)) << c10::toString(dtype) << " rows " << rows;
      EXPECT_GT(y.to(at::kFloat).abs().sum().item<double>(), 0.0);
    }
  }
}

// Scripted and traced nn.Modules run with parameters that require grad: the op must accept such
// inputs on both CPU paths (the batched one's out= GEMM refuses them unless run without grad).
TEST(OpsLinear, InputThatRequiresGrad) {
  const PackedWeight w = quantize(gaussian(kOut, kIn, 11), make_spec(4, 32, false, true));
  for (int64_t rows : {int64_t{1}, ops::kLinearFusedMaxRows + 5}) {
    const at::Tensor x = gaussian(rows, kIn, 12);
    const at::Tensor y = call_linear(x.clone().requires_grad_(), w, c10::nullopt);
    EXPECT_TRUE(bitwise_equal(y, call_linear(x, w, c10::nullopt))) << "rows " << rows;
  }
}

TEST(OpsErrors, MismatchedTensorsNameWhatWasExpected) {
  const PackedWeight w = quantize(gaussian(kOut, kIn, 6), make_spec(4, 32, false, true));
  const at::Tensor x = gaussian(2, kIn, 7);
  GRADQ_EXPECT_THROW_MSG(call_linear(gaussian(2, 100, 7), w, c10::nullopt),
                         "x must be [..., in_features] with in_features = 172, got [2, 100]");
  GRADQ_EXPECT_THROW_MSG(call_linear(x.to(at::kDouble), w, c10::nullopt),
                         "x must be float32, float16 or bfloat16, got Double");
  GRADQ_EXPECT_THROW_MSG(call_linear(x, w, at::ones({kOut + 1})), "bias must be float32 [33]");
  PackedWeight bad = w;
  bad.scales = w.scales.slice(1, 0, 5);
  GRADQ_EXPECT_THROW_MSG(call_linear(x, bad, c10::nullopt), "scales must be Half [33, 6], got Half [33, 5]");
  bad = w;
  bad.zeros = w.zeros.to(at::kInt);
  GRADQ_EXPECT_THROW_MSG(call_dequantize(bad), "zeros must be Byte [99], got Int [99]");
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("gradq::linear", "").typed<LinearFn>();
  GRADQ_EXPECT_THROW_MSG(op.call(x, w.codes, w.scales, w.zeros, c10::nullopt, 7, 32, kIn, 4, c10::nullopt, 0),
                         "bits must be one of 2, 3, 4, 5, 6, 8, got 7");
  GRADQ_EXPECT_THROW_MSG(op.call(x, w.codes, w.scales, w.zeros, c10::nullopt, 4, 32, 170, 4, c10::nullopt, 0),
                         "codes must be Byte [33, 85], got Byte [33, 86]");
  GRADQ_EXPECT_THROW_MSG(op.call(x, w.codes, w.scales, w.zeros, c10::nullopt, 4, 48, kIn, 4, c10::nullopt, 0),
                         "group size must be one of");
  GRADQ_EXPECT_THROW_MSG(op.call(x, w.codes, w.scales, w.zeros, c10::nullopt, 4, 32, kIn, 5, c10::nullopt, 0),
                         "zero_bits must be 8 or bits (4), got 5");
  GRADQ_EXPECT_THROW_MSG(op.call(x, w.codes, w.scales, w.zeros, c10::nullopt, 4, 32, kIn, 4, c10::nullopt, 6),
                         "sub_scales and sub_scale_bits go together");
}

}  // namespace
