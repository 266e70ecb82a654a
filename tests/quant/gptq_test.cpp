// Tests of GPTQ (csrc/quant/gptq.h) on synthetic layers: its codes are exactly those of a
// straightforward column-by-column GPTQ (tests/support/gptq_ref.h), whatever the lazy-batch size;
// the zero points are the static ones of the clipping search on the original weight, and so are
// the scales without the refit; with it, every row's scales are the least-squares ones for GPTQ's
// codes (a plain per-row solve here) or the grid's, and no row's error rises; its layer output
// error is below round-to-nearest's and the clipping search's; dead inputs, the options and bad
// input.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "quant/gptq.h"
#include "quant/quantize.h"
#include "support/gptq_ref.h"
#include "support/test_helpers.h"

namespace gradq {
namespace {

using test::bitwise_equal;
using test::expect_error;
using test::gaussian;
using test::gptq_ref;
using test::unpack_codes;

// sum over calibration rows x of |x (W - W_q)^T|^2 = trace(dW X^T X dW^T), in double.
double output_error(const at::Tensor& w, const at::Tensor& w_q, const at::Tensor& xtx) {
  const at::Tensor dw = w.to(at::kDouble) - w_q.to(at::kDouble);
  return (dw.matmul(xtx.to(at::kDouble)) * dw).sum().item<double>();
}

// XtX of 512 rows with unequal channel magnitudes and correlated channels, as LLM activations:
// correlation is what GPTQ's error feedback exploits.
at::Tensor synthetic_xtx(int64_t in, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const at::Tensor channel_scale = at::exp(at::randn({in}, gen, at::kFloat) * 0.7);
  const at::Tensor mix = at::eye(in) + at::randn({in, in}, gen, at::kFloat) * (0.3 / std::sqrt(double(in)));
  const at::Tensor x = (at::randn({512, in}, gen, at::kFloat).matmul(mix) * channel_scale).to(at::kDouble);
  return x.t().matmul(x);
}

// The dampened H in index order, as gptq.h defines it (dead inputs at 1).
at::Tensor dampened_hessian(const at::Tensor& xtx, double damp) {
  at::Tensor h = xtx.to(at::kDouble) + xtx.to(at::kDouble).t();
  h.diagonal().masked_fill_(h.diagonal() == 0, 1.0);
  h.diagonal().add_(damp * h.diagonal().mean().item<double>());
  return h;
}

// Each row's trace error d H d^T, [out].
at::Tensor row_errors(const at::Tensor& w, const at::Tensor& w_q, const at::Tensor& h) {
  const at::Tensor d = w.to(at::kDouble) - w_q.to(at::kDouble);
  return (d.matmul(h) * d).sum(1);
}

struct Case {
  std::string spec;
  int64_t out;
  int64_t in;
};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  std::string name = info.param.spec + "_" + std::to_string(info.param.out) + "x" + std::to_string(info.param.in);
  std::replace(name.begin(), name.end(), '-', '_');
  return name;
}

class GptqFormat : public ::testing::TestWithParam<Case> {};

TEST_P(GptqFormat, CodesAreTheReferenceGptqsForEveryBlockSize) {
  const Case& c = GetParam();
  const QuantSpec spec = parse_quant_spec(c.spec);
  const at::Tensor w = gaussian(c.out, c.in, 71);
  const at::Tensor xtx = synthetic_xtx(c.in, 72);
  const test::GptqRef ref = gptq_ref(w, spec, xtx);
  for (int64_t block : {int64_t{1}, int64_t{5}, int64_t{128}}) {
    GptqOptions opt;
    opt.block_size = block;
    for (bool refit : {false, true}) {
      opt.refit_scales = refit;
      const PackedWeight p = quantize_gptq(w, spec, xtx, opt);
      p.validate();
      EXPECT_TRUE(at::equal(unpack_codes(p), ref.codes)) << "block " << block << ", refit " << refit << ": "
          << (unpack_codes(p) != ref.codes).sum().item<int64_t>() << " codes differ";
      // Static groups: the stored zero points are the clipping search's on the original weight, and
      // so are the scales without the refit (and in the k formats, which it leaves alone).
      EXPECT_TRUE(bitwise_equal(p.zeros, ref.grid.zeros));
      if (!refit || spec.sub_scale_bits != 0) EXPECT_TRUE(bitwise_equal(p.scales, ref.grid.scales));
    }
  }
}

// The refit's scales, row by row against a plain least-squares solve of the same objective:
// minimise (w - A s) H (w - A s)^T over s, A the row's (code - zero) per group. A row either keeps
// the grid's scales (its error would not fall) or takes the solution rounded to its storage type;
// no row's error rises, and layers of some size gain.
TEST_P(GptqFormat, RefitScalesAreEachRowsLeastSquaresSolution) {
  const Case& c = GetParam();
  const QuantSpec spec = parse_quant_spec(c.spec);
  const at::Tensor w = gaussian(c.out, c.in, 161);
  const at::Tensor xtx = synthetic_xtx(c.in, 162);
  GptqOptions off, on;
  on.refit_scales = true;
  const PackedWeight plain = quantize_gptq(w, spec, xtx, off);
  const PackedWeight refit = quantize_gptq(w, spec, xtx, on);
  const at::Tensor h = dampened_hessian(xtx, off.damp);
  const at::Tensor before = row_errors(w, dequantize(plain), h), after = row_errors(w, dequantize(refit), h);
  // The refit's error is computed from its normal equations, in another order of additions.
  EXPECT_TRUE((after <= before * (1 + 1e-9)).all().item<bool>()) << (after - before).max().item<double>();
  if (spec.sub_scale_bits != 0) return;  // k formats keep the grid (checked above)
  if (c.in >= 64 && spec.bits() < 8) EXPECT_LT(after.sum().item<double>(), before.sum().item<double>());
  const auto [grid_scales, zeros] = group_scales_and_zeros(plain);
  const auto [scales, refit_zeros] = group_scales_and_zeros(refit);
  EXPECT_TRUE(bitwise_equal(zeros, refit_zeros));
  const at::Tensor codes = unpack_codes(plain).to(at::kDouble);
  const int64_t groups = spec.n_groups(c.in), group_len = spec.group_len(c.in);
  int64_t refitted_rows = 0;
  for (int64_t r = 0; r < c.out; ++r) {
    if (at::equal(scales[r], grid_scales[r])) continue;
    ++refitted_rows;
    at::Tensor a = at::zeros({c.in, groups}, at::kDouble);
    for (int64_t i = 0; i < c.in; ++i) a[i][i / group_len] = codes[r][i] - zeros[r][i / group_len].item<double>();
    const at::Tensor normal = a.t().matmul(h).matmul(a);
    const at::Tensor rhs = a.t().matmul(h).matmul(w[r].to(at::kDouble));
    const at::Tensor solution = at::linalg_solve(normal, rhs);
    // fp16 rounding is half a unit in the 11th bit, and at most 2^-25 among the subnormals (a
    // small group's scale); the two solves differ in their last bits only.
    const double rtol = spec.fp16_scale ? 1.0 / 1024 : 1e-5, atol = spec.fp16_scale ? std::ldexp(1.0, -25) : 0.0;
    EXPECT_TRUE(at::allclose(scales[r].to(at::kDouble), solution, rtol, atol))
        << "row " << r << ": " << scales[r].to(at::kDouble) - solution << " from " << solution;
  }
  if (c.in >= 64 && spec.bits() < 8) EXPECT_GT(refitted_rows, c.out / 2);
}

TEST_P(GptqFormat, WithoutActOrderOrClipSearchStillTheReferences) {
  const Case& c = GetParam();
  const QuantSpec spec = parse_quant_spec(c.spec);
  const at::Tensor w = gaussian(c.out, c.in, 81);
  const at::Tensor xtx = synthetic_xtx(c.in, 82).to(at::kFloat);  // float32 XtX is accepted too
  GptqOptions opt;
  opt.act_order = false;
  opt.clip_search = false;
  opt.damp = 0.1;
  opt.refit_scales = false;
  const PackedWeight p = quantize_gptq(w, spec, xtx, opt);
  const test::GptqRef ref = gptq_ref(w, spec, xtx, 0.1, false, false);
  EXPECT_TRUE(at::equal(unpack_codes(p), ref.codes));
  EXPECT_TRUE(bitwise_equal(p.scales, quantize(w, spec).scales));
  opt.refit_scales = true;
  EXPECT_TRUE(at::equal(unpack_codes(quantize_gptq(w, spec, xtx, opt)), ref.codes));
}

TEST_P(GptqFormat, LowerOutputErrorThanRoundToNearestAndClipping) {
  const Case& c = GetParam();
  const QuantSpec spec = parse_quant_spec(c.spec);
  const at::Tensor w = gaussian(c.out, c.in, 91);
  const at::Tensor xtx = synthetic_xtx(c.in, 92);
  const PackedWeight p = quantize_gptq(w, spec, xtx);
  const at::Tensor w_q = dequantize(p);
  EXPECT_GT(w_q.abs().sum().item<double>(), 0.0);
  const double e_gptq = output_error(w, w_q, xtx);
  const double e_rtn = output_error(w, dequantize(quantize(w, spec)), xtx);
  const double e_clip = output_error(w, dequantize(quantize_clipped(w, spec, xtx.diagonal().to(at::kFloat))), xtx);
  // One row of few inputs leaves GPTQ little to trade; layers of some size always gain.
  if (c.in >= 64 && spec.bits() < 8) {
    EXPECT_LT(e_gptq, 0.9 * e_rtn);
    EXPECT_LT(e_gptq, e_clip);
  } else {
    EXPECT_LE(e_gptq, 1.0001 * e_rtn);
  }
}

INSTANTIATE_TEST_SUITE_P(Specs, GptqFormat,
                         ::testing::Values(Case{"b4g128", 17, 172}, Case{"b4g32", 17, 172}, Case{"b3g32", 7, 172},
                                           Case{"b2g64", 5, 172}, Case{"b8g16", 3, 17}, Case{"b4grow", 3, 7},
                                           Case{"b4g32s", 17, 172}, Case{"b3g32s-f32", 7, 172},
                                           Case{"b4g64-f32", 9, 172}, Case{"b2g16s", 1, 3}, Case{"b3g128", 1, 1},
                                           Case{"b4g16", 16, 256}, Case{"b3g32k6", 9, 172},
                                           // more columns after a block than one update slice (256 rows)
                                           Case{"b4g64", 9, 600}),
                         case_name);

TEST(Gptq, DeadInputsAreRoundedToNearestAndPassNoError) {
  const int64_t in = 96;
  const at::Tensor w = gaussian(24, in, 101);
  at::Tensor xtx = synthetic_xtx(in, 102);
  for (int64_t j : {3, 40, 95}) {  // inputs that are always 0 in calibration
    xtx.select(0, j).zero_();
    xtx.select(1, j).zero_();
  }
  const QuantSpec spec = parse_quant_spec("b3g32");
  const PackedWeight p = quantize_gptq(w, spec, xtx);
  EXPECT_TRUE(at::equal(unpack_codes(p), gptq_ref(w, spec, xtx).codes));
  // A dead column keeps its own weights (GPTQ does not zero it) and gets round-to-nearest's codes
  // with the static parameters.
  const at::Tensor codes = unpack_codes(p);
  const PackedWeight grid = quantize_clipped(w, spec, xtx.diagonal().to(at::kFloat));
  for (int64_t j : {3, 40, 95}) EXPECT_TRUE(at::equal(codes.select(1, j), unpack_codes(grid).select(1, j))) << j;
  EXPECT_TRUE(at::isfinite(dequantize(p)).all().item<bool>());
}

TEST(Gptq, DeterministicAcrossRunsAndThreadCounts) {
  const at::Tensor w = gaussian(64, 172, 111);
  const at::Tensor xtx = synthetic_xtx(172, 112);
  const QuantSpec spec = parse_quant_spec("b3g32");
  GptqOptions options;
  options.refit_scales = true;  // its batched solves too
  const PackedWeight a = quantize_gptq(w, spec, xtx, options);
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const PackedWeight b = quantize_gptq(w, spec, xtx, options);
  at::set_num_threads(threads);
  EXPECT_TRUE(bitwise_equal(a.codes, b.codes));
  EXPECT_TRUE(bitwise_equal(a.scales, b.scales));
  EXPECT_TRUE(bitwise_equal(a.zeros, b.zeros));
}

// The search makes a weight's factor once and quantizes every candidate spec with it: the codes must
// be the ones GPTQ gives from X^T X itself, bit for bit, or plans would depend on the search's order.
TEST(Gptq, FactorMadeOnceGivesTheSameCodesAsXtxForEverySpec) {
  const at::Tensor w = gaussian(48, 172, 131);
  at::Tensor xtx = synthetic_xtx(172, 132).to(at::kFloat);  // float32 X^T X is accepted too
  xtx[5].zero_();
  xtx.select(1, 5).zero_();  // a dead input: diag 0, set to 1 inside
  GptqOptions options;
  options.damp = 0.02;
  for (bool refit : {false, true}) {
    options.refit_scales = refit;
    const GptqFactor made = gptq_factor(xtx, options);
    EXPECT_EQ(made.u.sizes(), (std::vector<int64_t>{172, 172}));
    EXPECT_TRUE(at::equal(made.order, gptq_column_order(xtx, true)));
    for (const char* name : {"b8g128", "b4g32", "b3g16s", "b2grow"}) {
      const QuantSpec spec = parse_quant_spec(name);
      const PackedWeight direct = quantize_gptq(w, spec, xtx, options);
      const PackedWeight reused = quantize_gptq(w, spec, made, options);
      EXPECT_TRUE(bitwise_equal(direct.codes, reused.codes)) << name << ", refit " << refit;
      EXPECT_TRUE(bitwise_equal(direct.scales, reused.scales)) << name << ", refit " << refit;
      if (direct.zeros.defined()) EXPECT_TRUE(bitwise_equal(direct.zeros, reused.zeros)) << name;
    }
  }
  options.refit_scales = true;
  const GptqFactor factor = gptq_factor(xtx, options);
  // A factor made with other options, or for another width, is refused with both values named.
  std::string msg = expect_error([&] { quantize_gptq(w, parse_quant_spec("b4g32"), factor); });
  EXPECT_NE(msg.find("dampening 0.02"), std::string::npos) << msg;
  GptqOptions no_refit = options;
  no_refit.refit_scales = false;
  msg = expect_error([&] { quantize_gptq(w, parse_quant_spec("b4g32"), factor, no_refit); });
  EXPECT_NE(msg.find("refit_scales true, the options ask for 0.02, true and false"), std::string::npos) << msg;
  msg = expect_error([&] { quantize_gptq(gaussian(8, 64, 133), parse_quant_spec("b4g32"), factor, options); });
  EXPECT_NE(msg.find("a factor for 64 inputs, got one for 172"), std::string::npos) << msg;
}

// gptq_factor works in place, a panel of 256 at a time (permutation, Cholesky factor, triangular
// inverse, reversal): U must be the upper Cholesky factor of the inverse of the dampened, permuted H
// as the plain route computes it, at a width of several panels, odd, with dead inputs.
TEST(Gptq, FactorIsTheUpperCholeskyFactorOfTheInverseHessian) {
  const int64_t in = 601;
  at::Tensor xtx = synthetic_xtx(in, 141);
  for (int64_t j : {0, 300, 600}) {
    xtx.select(0, j).zero_();
    xtx.select(1, j).zero_();
  }
  const at::Tensor order = gptq_column_order(xtx, true);
  at::Tensor h = (xtx + xtx.t()).index_select(0, order).index_select(1, order);
  h.diagonal().masked_fill_(h.diagonal() == 0, 1.0);
  h.diagonal().add_(0.01 * h.diagonal().mean().item<double>());
  const at::Tensor expected = at::linalg_cholesky(at::inverse(h)).t();
  // Passed as a copy: factored from a copy, the caller's X^T X unchanged.
  const at::Tensor before = xtx.clone();
  const GptqFactor copied = gptq_factor(xtx);
  EXPECT_TRUE(bitwise_equal(xtx, before));
  EXPECT_TRUE(at::equal(copied.order, order));
  EXPECT_TRUE(at::allclose(copied.u, expected, /*rtol=*/1e-9, /*atol=*/1e-12 * expected.abs().max().item<double>()))
      << (copied.u - expected).abs().max().item<double>();
  EXPECT_TRUE(at::equal(copied.u, copied.u.triu()));
  // H itself, kept for the scale refit only, in index order: the dampened H's entries (the
  // dampening's mean is summed in another order), and the same U.
  EXPECT_FALSE(copied.hessian.defined());
  GptqOptions refit;
  refit.refit_scales = true;
  const GptqFactor with_h = gptq_factor(xtx, refit);
  const at::Tensor hessian = dampened_hessian(xtx, 0.01);
  EXPECT_TRUE(at::allclose(with_h.hessian, hessian, 1e-14, 0.0)) << (with_h.hessian - hessian).abs().max().item<double>();
  EXPECT_TRUE(bitwise_equal(with_h.u, copied.u));
  // Moved in: U is made in its place, with the same values; also when X^T X was made under
  // InferenceMode, as the search makes it.
  {
    c10::InferenceMode inference;
    xtx = xtx.clone();
  }
  ASSERT_TRUE(xtx.is_inference());
  const void* storage = xtx.data_ptr();
  const GptqFactor moved = gptq_factor(std::move(xtx));
  EXPECT_EQ(moved.u.data_ptr(), storage);
  EXPECT_TRUE(bitwise_equal(moved.u, copied.u));
}

// The search screens GPTQ's candidates by the error GPTQ minimises: gptq_output_error must be
// trace(D Hp D^T) with Hp the dampened H the factor was made from (dead inputs at 1), computed here
// directly, for a quantized weight and for an arbitrary one, and refuse a mismatched shape.
TEST(Gptq, OutputErrorIsTheDampenedHessiansQuadraticForm) {
  const int64_t in = 172;
  at::Tensor xtx = synthetic_xtx(in, 151);
  xtx.select(0, 7).zero_();
  xtx.select(1, 7).zero_();
  GptqOptions options;
  options.damp = 0.03;
  const GptqFactor factor = gptq_factor(xtx, options);
  const at::Tensor order = gptq_column_order(xtx, true);
  at::Tensor h = (xtx + xtx.t()).index_select(0, order).index_select(1, order);
  h.diagonal().masked_fill_(h.diagonal() == 0, 1.0);
  h.diagonal().add_(options.damp * h.diagonal().mean().item<double>());
  const at::Tensor w = gaussian(24, in, 152);
  const at::Tensor quantized = dequantize(quantize_gptq(w, parse_quant_spec("b3g32"), factor, options));
  for (const at::Tensor& w_q : {quantized, w + gaussian(24, in, 153) * 0.1}) {
    const at::Tensor d = (w.to(at::kDouble) - w_q.to(at::kDouble)).index_select(1, order);
    const double expected = (d.matmul(h) * d).sum().item<double>();
    EXPECT_NEAR(gptq_output_error(w, w_q, factor), expected, 1e-9 * expected);
  }
  EXPECT_EQ(gptq_output_error(w, w, factor), 0.0);
  const std::string msg = expect_error([&] { gptq_output_error(w, w.narrow(1, 0, 64), factor); });
  EXPECT_NE(msg.find("[out, 172], got [24, 172] and [24, 64]"), std::string::npos) << msg;
}

TEST(Gptq, ColumnOrderIsDescendingDiagonalWithTiesInIndexOrder) {
  at::Tensor xtx = at::zeros({5, 5}, at::kDouble);
  xtx.diagonal().copy_(at::tensor({2.0, 7.0, 2.0, 0.0, 7.0}, at::kDouble));
  EXPECT_TRUE(at::equal(gptq_column_order(xtx, true), at::tensor({1, 4, 0, 2, 3}, at::kLong)));
  EXPECT_TRUE(at::equal(gptq_column_order(xtx, false), at::arange(5, at::kLong)));
}

TEST(Gptq, BadInputsNameExpectedAndActual) {
  const at::Tensor w = gaussian(8, 172, 121);
  const at::Tensor xtx = synthetic_xtx(172, 122);
  const QuantSpec b4 = parse_quant_spec("b4g32");
  auto has = [](const std::string& msg, const std::string& part) {
    EXPECT_NE(msg.find(part), std::string::npos) << "message: " << msg;
  };
  std::string msg = expect_error([&] { quantize_gptq(w, parse_quant_spec("bf16"), xtx); });
  has(msg, "integer level");
  msg = expect_error([&] { quantize_gptq(w, b4, synthetic_xtx(64, 123)); });
  has(msg, "[172, 172]");
  has(msg, "[64, 64]");
  msg = expect_error([&] { quantize_gptq(w, b4, xtx.to(at::kHalf)); });
  has(msg, "Half");
  at::Tensor bad = xtx.clone();
  bad[1][2] = std::nan("");
  msg = expect_error([&] { quantize_gptq(w, b4, bad); });
  has(msg, "NaN");
  // XtX is checked a slice of rows at a time: a NaN in its last element is found too.
  bad = at::eye(1100, at::kDouble);
  bad[1099][1099] = std::nan("");
  msg = expect_error([&] { quantize_gptq(gaussian(2, 1100, 124), b4, bad); });
  has(msg, "XtX holds NaN");
  msg = expect_error([&] { quantize_gptq(w.reshape({8, 172, 1}), b4, xtx); });
  has(msg, "3-D");
  GptqOptions opt;
  opt.damp = -0.5;
  msg = expect_error([&] { quantize_gptq(w, b4, xtx, opt); });
  has(msg, "got -0.5");
  opt = {};
  opt.block_size = 0;
  msg = expect_error([&] { quantize_gptq(w, b4, xtx, opt); });
  has(msg, "block_size >= 1, got 0");
  // Not positive definite without dampening: an indefinite XtX.
  opt = {};
  opt.damp = 0.0;
  at::Tensor indefinite = at::eye(172, at::kDouble);
  indefinite[0][1] = indefinite[1][0] = 2.0;
  msg = expect_error([&] { quantize_gptq(w, b4, indefinite, opt); });
  has(msg, "not positive definite");
}

}  // namespace
}  // namespace gradq
