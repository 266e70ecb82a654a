// Tests of the CPU quantizers (csrc/quant/quantize.h): the parallel path against the scalar
// reference bit for bit, group parameters against an independent min/max, the half-step error
// bound, packing layout and round trips, storage accounting, and the clipping search.

#include <ATen/ATen.h>
#include <c10/util/Half.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "quant/packed_weight.h"
#include "quant/quant_math.h"
#include "quant/quant_spec.h"
#include "quant/quantize.h"

using namespace gradq;

#include "support/near_ties.h"
#include "support/test_helpers.h"

using test::bitwise_equal;
using test::gaussian;

namespace {

/// Gaussian weights with about 1% outliers 10x larger: the case clipping exists for.
inline at::Tensor gaussian_with_outliers(int64_t rows, int64_t cols, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  at::Tensor w = at::randn({rows, cols}, gen, at::kFloat) * 0.02;
  at::Tensor outlier = at::rand({rows, cols}, gen, at::kFloat) < 0.01;
  return at::where(outlier, w * 10, w);
}

}  // namespace

namespace {

QuantSpec make_spec(int bits, int64_t group, bool symmetric, bool fp16_scale) {
  QuantSpec s;
  s.level = quant_level_for_bits(bits);
  s.group_size = group;
  s.symmetric = symmetric;
  s.fp16_scale = fp16_scale;
  return s;
}

// Stored scale of group g of row r as a float, decoded from the tensors as quant_spec.h draws them
// (k formats: fp16 super-scale of the group's super-group times its packed sub-scale).
float stored_scale(const PackedWeight& p, int64_t r, int64_t g) {
  const at::Tensor scales = p.scales.to(at::kFloat);
  if (p.spec.sub_scale_bits == 0) return scales[r][g].item<float>();
  const int64_t super = g * p.spec.group_size / kSuperGroup;
  const int64_t k = r * p.spec.n_groups(p.in_features) + g;  // streams run over the tensor in (row, group) order
  const uint32_t q = quant_unpack_code(p.sub_scales.data_ptr<uint8_t>(), k, p.spec.sub_scale_bits);
  return scales[r][super].item<float>() * static_cast<float>(q);
}

// Zero point of group g of row r (the fixed 2^(bits-1) for symmetric formats).
float stored_zero(const PackedWeight& p, int64_t r, int64_t g) {
  if (p.spec.symmetric) return static_cast<float>(1 << (p.spec.bits() - 1));
  const int zb = p.spec.zero_bits();
  const int64_t k = r * p.spec.n_groups(p.in_features) + g;
  return static_cast<float>(quant_unpack_code(p.zeros.data_ptr<uint8_t>(), k, zb));
}

// ---- Format x shape sweep -----------------------------------------------------------------------

// How a case stores its side information (quant_spec.h).
enum class Side { kZeroB, kZero8, kSym, kSub6, kSub8 };

const char* side_name(Side s) {
  switch (s) {
    case Side::kZeroB: return "asym";
    case Side::kZero8: return "asymz8";
    case Side::kSym: return "sym";
    case Side::kSub6: return "k6";
    case Side::kSub8: return "k8";
  }
  return "?";
}

struct FormatCase {
  int bits;
  int64_t group;
  Side side;
  bool fp16_scale;
  int64_t out;
  int64_t in;

  QuantSpec spec() const {
    QuantSpec s = make_spec(bits, group, side == Side::kSym, fp16_scale);
    s.zero_8bit = side == Side::kZero8;
    s.sub_scale_bits = side == Side::kSub6 ? 6 : side == Side::kSub8 ? 8 : 0;
    return s;
  }
  bool symmetric() const { return side == Side::kSym; }
  std::string name() const {
    return "b" + std::to_string(bits) + "_g" + (group == kWholeRow ? std::string("row") : std::to_string(group)) +
           "_" + side_name(side) + (fp16_scale ? "_f16" : "_f32") + "_" + std::to_string(out) + "x" +
           std::to_string(in);
  }
  // The symmetric and asymmetric cases keep the seeds they had before z8/k6/k8 cases existed.
  uint64_t seed() const {
    const int salt = side == Side::kZeroB ? 0 : side == Side::kSym ? 1 : 1 + static_cast<int>(side);
    return static_cast<uint64_t>(bits * 1000003 + group * 101 + out * 7 + in + salt);
  }
};

std::vector<FormatCase> all_format_cases() {
  // 300: a whole-row group long enough for the 2-bit packer's long-group loop (quantize.cpp), and
  // two super-groups of the k formats, the second partial.
  const int64_t shapes[][2] = {{1, 1}, {3, 7}, {17, 172}, {5, 64}, {64, 172}, {33, 17}, {6, 300}};
  std::vector<FormatCase> cases;
  for (int bits : {2, 3, 4, 5, 6, 8})
    for (int64_t group : {int64_t{16}, int64_t{32}, int64_t{64}, int64_t{128}, kWholeRow})
      for (Side side : {Side::kZeroB, Side::kZero8, Side::kSym, Side::kSub6, Side::kSub8})
        for (bool fp16 : {true, false}) {
          const bool sub = side == Side::kSub6 || side == Side::kSub8;
          if (side == Side::kZero8 && bits == 8) continue;  // the same layout as kZeroB
          if (sub && (group == kWholeRow || !fp16)) continue;  // not formats (QuantSpec::validate)
          for (const auto& s : shapes) cases.push_back({bits, group, side, fp16, s[0], s[1]});
        }
  return cases;
}

class QuantFormat : public ::testing::TestWithParam<FormatCase> {
 protected:
  // A per-row offset so that asymmetric groups are not centred on 0.
  at::Tensor weight() const {
    const FormatCase& c = GetParam();
    at::Tensor w = gaussian(c.out, c.in, c.seed());
    return w + at::arange(c.out, at::kFloat).unsqueeze(1) * 0.003;
  }
};

TEST_P(QuantFormat, ParallelMatchesReferenceBitExact) {
  const at::Tensor w = weight();
  const QuantSpec spec = GetParam().spec();
  const PackedWeight ref = quantize_ref(w, spec);
  const PackedWeight got = quantize(w, spec);
  EXPECT_TRUE(bitwise_equal(got.codes, ref.codes));
  EXPECT_TRUE(bitwise_equal(got.scales, ref.scales));
  EXPECT_TRUE(bitwise_equal(got.zeros, ref.zeros));
  EXPECT_TRUE(bitwise_equal(got.sub_scales, ref.sub_scales));
  EXPECT_EQ(got.zeros.defined(), !spec.symmetric);
  EXPECT_EQ(got.sub_scales.defined(), spec.sub_scale_bits != 0);
  EXPECT_TRUE(bitwise_equal(dequantize(got), dequantize_ref(ref)));
}

TEST_P(QuantFormat, GroupParamsMatchIndependentMinMax) {
  const FormatCase& c = GetParam();
  const QuantSpec spec = c.spec();
  const at::Tensor w = weight();
  const PackedWeight p = quantize(w, spec);
  const int64_t glen = spec.group_len(c.in), groups = spec.n_groups(c.in);
  ASSERT_EQ(groups, (c.in + glen - 1) / glen);
  const bool sub = spec.sub_scale_bits != 0;
  for (int64_t r = 0; r < c.out; ++r) {
    // k formats: the min-max scale of every group first (fp32), then the super-scale of each
    // super-group from their maximum.
    std::vector<float> lo(groups), hi(groups), raw(groups);
    for (int64_t g = 0; g < groups; ++g) {
      // The last group may be partial: its parameters come from its own elements only.
      const at::Tensor slice = w[r].slice(0, g * glen, std::min((g + 1) * glen, c.in));
      lo[g] = slice.min().item<float>();
      hi[g] = slice.max().item<float>();
      raw[g] = quant_asym_params(lo[g], hi[g], c.bits, /*fp16_scale=*/false).scale;
    }
    for (int64_t g = 0; g < groups; ++g) {
      GroupParams want = c.symmetric() ? quant_sym_params(quant_sym_signed_absmax(lo[g], hi[g]), c.bits, c.fp16_scale)
                                       : quant_asym_params(lo[g], hi[g], c.bits, c.fp16_scale);
      if (sub) {
        const int64_t per_super = kSuperGroup / glen, first = g / per_super * per_super;
        float max_raw = 0.f;
        for (int64_t k = first; k < std::min(first + per_super, groups); ++k) max_raw = std::max(max_raw, raw[k]);
        const float d = quant_super_scale(max_raw, spec.sub_scale_bits);
        ASSERT_EQ(p.scales.to(at::kFloat)[r][g / per_super].item<float>(), d) << "row " << r << " group " << g;
        want.scale = d * static_cast<float>(quant_sub_scale_code(raw[g], d, spec.sub_scale_bits));
        want.zero = quant_asym_zero(lo[g], want.scale, c.bits);
        // A nonzero range keeps a nonzero scale, however small against its super-group.
        if (hi[g] > 0.f || lo[g] < 0.f) ASSERT_GT(want.scale, 0.f);
      }
      ASSERT_EQ(stored_scale(p, r, g), want.scale) << "row " << r << " group " << g;
      ASSERT_EQ(stored_zero(p, r, g), c.symmetric() ? quant_sym_zero(c.bits) : want.zero) << "row " << r << " group " << g;
    }
  }
}

TEST_P(QuantFormat, DequantizeWritesEveryElementFromItsCode) {
  const FormatCase& c = GetParam();
  const QuantSpec spec = c.spec();
  const PackedWeight p = quantize(gaussian(c.out, c.in, c.seed()) + 0.01, spec);
  const at::Tensor dq = dequantize(p);
  ASSERT_EQ(dq.scalar_type(), at::kFloat);
  ASSERT_EQ(dq.sizes(), (std::vector<int64_t>{c.out, c.in}));
  const int64_t glen = spec.group_len(c.in);
  for (int64_t r = 0; r < c.out; ++r) {
    const uint8_t* row = p.codes.data_ptr<uint8_t>() + r * p.codes.size(1);
    for (int64_t i = 0; i < c.in; ++i) {
      const int64_t g = i / glen;
      const float want = stored_scale(p, r, g) * (static_cast<float>(quant_unpack_code(row, i, c.bits)) - stored_zero(p, r, g));
      ASSERT_EQ(dq[r][i].item<float>(), want) << "element " << r << "," << i;
    }
  }
  EXPECT_GT(dq.abs().max().item<float>(), 0.f);
}

TEST_P(QuantFormat, ErrorWithinHalfStepInsideTheGrid) {
  const FormatCase& c = GetParam();
  const QuantSpec spec = c.spec();
  const at::Tensor w = weight();
  const PackedWeight p = quantize(w, spec);
  const at::Tensor dq = dequantize(p);
  const int64_t glen = spec.group_len(c.in);
  const float max_code = static_cast<float>((1 << c.bits) - 1);
  const auto W = w.accessor<float, 2>();
  const auto D = dq.accessor<float, 2>();
  const bool sub = spec.sub_scale_bits != 0;
  for (int64_t r = 0; r < c.out; ++r) {
    for (int64_t i = 0; i < c.in; ++i) {
      const float s = stored_scale(p, r, i / glen), z = stored_zero(p, r, i / glen);
      const float step = std::fabs(s);
      // Product and rounding of w * (1/scale) in float: a few ulps of the values involved.
      const float tol = 8 * std::numeric_limits<float>::epsilon() * (std::fabs(W[r][i]) + step * max_code);
      const float a = s * (0.f - z), b = s * (max_code - z);
      const float grid_lo = std::min(a, b), grid_hi = std::max(a, b);
      const float err = std::fabs(W[r][i] - D[r][i]);
      if (W[r][i] >= grid_lo && W[r][i] <= grid_hi) {
        ASSERT_LE(err, step / 2 + tol) << "element " << r << "," << i << " w=" << W[r][i];
      } else {
        // Outside the grid (fp16 scale rounding, the short side of a symmetric grid, or a k
        // format's sub-scale rounded below the group's range): the code is clamped to the
        // nearest end. With a direct scale that end is at most one step away; a sub-scale may
        // be off by half a super-scale step, which is many code steps for a small group.
        const float end = W[r][i] < grid_lo ? grid_lo : grid_hi;
        ASSERT_LE(std::fabs(D[r][i] - end), tol) << "element " << r << "," << i;
        if (!sub) ASSERT_LE(err, step + tol) << "element " << r << "," << i;
      }
    }
  }
}

TEST_P(QuantFormat, StorageMatchesSpec) {
  const FormatCase& c = GetParam();
  const QuantSpec spec = c.spec();
  const PackedWeight p = quantize(weight(), spec);
  const int64_t held = p.codes.nbytes() + p.scales.nbytes() + (p.zeros.defined() ? p.zeros.nbytes() : 0) +
                       (p.sub_scales.defined() ? p.sub_scales.nbytes() : 0);
  EXPECT_EQ(held, spec.storage_bytes(c.out, c.in));
  // Zero points and sub-scales are packed at their width over the whole tensor: ceil(out * groups *
  // width / 8) bytes; 8-bit zero points keep the [out, groups] shape of earlier checkpoints.
  const int64_t fields = c.out * spec.n_groups(c.in);
  const int zero_width = c.side == Side::kZero8 || c.bits == 8 ? 8 : c.bits;
  if (!spec.symmetric) EXPECT_EQ(p.zeros.numel(), (fields * zero_width + 7) / 8);
  if (!spec.symmetric) EXPECT_EQ(p.zeros.dim(), zero_width == 8 ? 2 : 1);
  if (spec.sub_scale_bits) {
    EXPECT_EQ(p.sub_scales.numel(), (fields * spec.sub_scale_bits + 7) / 8);
    EXPECT_EQ(p.scales.size(1), (c.in + 255) / 256);
  }
  EXPECT_EQ(p.storage_bytes(), spec.storage_bytes(c.out, c.in));
  EXPECT_DOUBLE_EQ(p.bits_per_weight(), 8.0 * static_cast<double>(held) / static_cast<double>(c.out * c.in));
  EXPECT_EQ(p.codes.size(1), (c.in * c.bits + 7) / 8);
}

TEST_P(QuantFormat, CodesRoundTrip) {
  // Random codes with 0 and the largest code in every group make a weight whose quantization has
  // scale 1 (k formats: see below; zero 0 asymmetric; the fixed 2^(bits-1) symmetric), so codes -> dequantize ->
  // quantize must reproduce the codes exactly, through both paths.
  const FormatCase& c = GetParam();
  const QuantSpec spec = c.spec();
  const int max_code = (1 << c.bits) - 1;
  const int64_t glen = spec.group_len(c.in), groups = spec.n_groups(c.in);
  at::Generator gen = at::detail::createCPUGenerator(c.seed());
  at::Tensor raw = at::randint(0, max_code + 1, {c.out, c.in}, gen, at::kInt);
  for (int64_t g = 0; g < groups; ++g) {
    raw.select(1, g * glen).fill_(0);
    if (g * glen + 1 < std::min((g + 1) * glen, c.in)) raw.select(1, g * glen + 1).fill_(max_code);
  }
  PackedWeight p;
  p.out_features = c.out;
  p.in_features = c.in;
  p.spec = spec;
  p.codes = at::zeros({c.out, (c.in * c.bits + 7) / 8}, at::kByte);
  for (int64_t r = 0; r < c.out; ++r)
    for (int64_t i = 0; i < c.in; ++i)
      quant_pack_code(p.codes.data_ptr<uint8_t>() + r * p.codes.size(1), i, c.bits,
                      static_cast<uint32_t>(raw[r][i].item<int>()));
  // k formats: super-scale 1 and every sub-scale at its largest code m, so each group's scale is m,
  // which its min-max range (m * max_code) reproduces exactly (d = m / m = 1).
  float scale = 1.f;
  if (spec.sub_scale_bits) {
    const int m = (1 << spec.sub_scale_bits) - 1;
    scale = static_cast<float>(m);
    p.scales = at::ones({c.out, spec.n_super_groups(c.in)}, at::kHalf);
    p.sub_scales = at::zeros({(c.out * groups * spec.sub_scale_bits + 7) / 8}, at::kByte);
    for (int64_t k = 0; k < c.out * groups; ++k) quant_pack_code(p.sub_scales.data_ptr<uint8_t>(), k, spec.sub_scale_bits, m);
  } else {
    p.scales = at::ones({c.out, groups}, c.fp16_scale ? at::kHalf : at::kFloat);
  }
  if (!c.symmetric()) {
    p.zeros = spec.zero_bits() == 8 ? at::zeros({c.out, groups}, at::kByte)
                                    : at::zeros({(c.out * groups * spec.zero_bits() + 7) / 8}, at::kByte);
  }
  const float zero = c.symmetric() ? static_cast<float>(1 << (c.bits - 1)) : 0.f;

  const at::Tensor dq = dequantize(p);
  ASSERT_TRUE(at::equal(dq, (raw.to(at::kFloat) - zero) * scale));
  EXPECT_TRUE(bitwise_equal(quantize(dq, spec).codes, p.codes));
  EXPECT_TRUE(bitwise_equal(quantize_ref(dq, spec).codes, p.codes));
}

TEST_P(QuantFormat, FakeQuantizeEqualsDequantizeOfQuantize) {
  const at::Tensor w = weight();
  const QuantSpec spec = GetParam().spec();
  EXPECT_TRUE(bitwise_equal(fake_quantize(w, spec), dequantize(quantize(w, spec))));
}

INSTANTIATE_TEST_SUITE_P(Sweep, QuantFormat, ::testing::ValuesIn(all_format_cases()),
                         [](const ::testing::TestParamInfo<FormatCase>& info) { return info.param.name(); });

// ---- Fixed cases --------------------------------------------------------------------------------

TEST(QuantPacking, ThreeBitLayoutMatchesTheDrawing) {
  // Codes 0..7 in one row: quant_math.h draws where each 3-bit code lands in the 3 bytes.
  const at::Tensor w = at::arange(8, at::kFloat).unsqueeze(0);
  const PackedWeight p = quantize(w, make_spec(3, kWholeRow, false, true));
  ASSERT_EQ(p.codes.size(1), 3);
  EXPECT_EQ(stored_scale(p, 0, 0), 1.f);
  EXPECT_EQ(p.codes[0][0].item<int>(), 0x88);  // c2[1:0]=10 c1=001 c0=000
  EXPECT_EQ(p.codes[0][1].item<int>(), 0xC6);  // c5[0]=1 c4=100 c3=011 c2[2]=0
  EXPECT_EQ(p.codes[0][2].item<int>(), 0xFA);  // c7=111 c6=110 c5[2:1]=10
}

TEST(QuantPacking, FourBitLowNibbleFirst) {
  const at::Tensor w = at::tensor({0.f, 15.f, 3.f, 12.f}).unsqueeze(0);
  const PackedWeight p = quantize(w, make_spec(4, kWholeRow, false, true));
  EXPECT_EQ(p.codes[0][0].item<int>(), 0xF0);
  EXPECT_EQ(p.codes[0][1].item<int>(), 0xC3);
}

// The quantizer vectorizes its fp16 rounding of scales across groups, which is why
// float_to_half_bits is written with selects, not branches; c10's conversion (an independent
// implementation, round to nearest even) is the oracle, on every one of the 2^32 floats.
TEST(QuantMath, HalfConversionsMatchC10OnEveryFloat) {
  const unsigned n_threads = std::max(1u, std::thread::hardware_concurrency());
  std::vector<uint64_t> mismatches(n_threads, 0);
  std::vector<uint32_t> first_mismatch(n_threads, 0);
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < n_threads; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t u = t; u <= 0xffffffffull; u += n_threads) {
        const uint32_t bits = static_cast<uint32_t>(u);
        const float f = quant_bits_float(bits);
        if (float_to_half_bits(f) != c10::detail::fp16_ieee_from_fp32_value(f) && mismatches[t]++ == 0)
          first_mismatch[t] = bits;
      }
    });
  }
  for (std::thread& th : threads) th.join();
  for (unsigned t = 0; t < n_threads; ++t)
    EXPECT_EQ(mismatches[t], 0u) << "first float bits 0x" << std::hex << first_mismatch[t];
  for (uint32_t h = 0; h <= 0xffffu; ++h) {
    const float got = half_bits_to_float(static_cast<uint16_t>(h));
    const float want = c10::detail::fp16_ieee_to_fp32_value(static_cast<uint16_t>(h));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << "half bits 0x" << std::hex << h;
    } else {
      ASSERT_EQ(quant_float_bits(got), quant_float_bits(want)) << "half bits 0x" << std::hex << h;
    }
  }
}

// The group parameters are computed in a vectorized loop (row_params.cpp); at the ends of the fp16
// range (subnormal scales, scales that round to zero) it must still agree with the reference.
TEST(QuantGroups, TinyWeightsMatchReferenceBitExact) {
  for (double magnitude : {1e-3, 1e-5, 1e-7, 1e-9}) {
    const at::Tensor w = gaussian(8, 300, 5) * magnitude;
    for (int bits : {2, 4, 5, 6, 8}) {
      for (bool sym : {false, true}) {
        const QuantSpec spec = make_spec(bits, 32, sym, /*fp16_scale=*/true);
        const PackedWeight ref = quantize_ref(w, spec);
        const PackedWeight got = quantize(w, spec);
        EXPECT_TRUE(bitwise_equal(got.codes, ref.codes)) << spec.name() << " at " << magnitude;
        EXPECT_TRUE(bitwise_equal(got.scales, ref.scales)) << spec.name() << " at " << magnitude;
        EXPECT_TRUE(bitwise_equal(got.zeros, ref.zeros)) << spec.name() << " at " << magnitude;
      }
    }
  }
}

// A k-format super-group of weights so small that its super-scale rounds to 0 in fp16 would zero
// every group; the smallest fp16 subnormal keeps each group's scale nonzero and its largest weight
// nonzero once dequantized.
TEST(QuantGroups, TinySuperGroupsKeepNonzeroScales) {
  const at::Tensor w = gaussian(4, 256, 11) * 1e-5;
  for (int sub_bits : {kSubScaleBits6, kSubScaleBits8}) {
    QuantSpec spec = make_spec(6, 32, /*symmetric=*/false, /*fp16_scale=*/true);
    spec.sub_scale_bits = sub_bits;
    const PackedWeight p = quantize(w, spec);
    EXPECT_EQ(p.scales.to(at::kFloat).min().item<float>(), 5.9604644775390625e-8f) << spec.name();
    for (int64_t r = 0; r < 4; ++r)
      for (int64_t g = 0; g < 8; ++g) ASSERT_GT(stored_scale(p, r, g), 0.f) << spec.name() << " row " << r << " group " << g;
    EXPECT_GT(dequantize(p).abs().max().item<float>(), 0.f) << spec.name();
  }
}

// quant_rint and quant_code avoid rintf so that they vectorize; they must agree with it exactly.
TEST(QuantMath, RoundingAndCodesMatchRintf) {
  std::vector<float> xs = {0.f, -0.f, 0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 0.49999997f, 1e-30f, -1e-30f,
                           511.5f, -511.5f, 4194303.5f, -4194303.5f, 4194304.f};
  at::Generator gen = at::detail::createCPUGenerator(11);
  const at::Tensor random = (at::rand({20000}, gen, at::kFloat) - 0.5f) * 1200.f;
  for (int64_t i = 0; i < random.numel(); ++i) xs.push_back(random[i].item<float>());
  for (float x : xs) {
    EXPECT_EQ(quant_rint(x), rintf(x)) << x;
    for (int bits : {2, 3, 4, 5, 6, 8}) {
      const float max_code = static_cast<float>(quant_max_code(bits));
      for (float zero : {0.f, quant_sym_zero(bits), max_code}) {
        float want = rintf(x) + zero;
        want = want < 0.f ? 0.f : (want > max_code ? max_code : want);
        ASSERT_EQ(quant_code(x, 1.f, zero, bits), static_cast<uint32_t>(want)) << x << " bits " << bits << " zero " << zero;
      }
    }
  }
  for (float big : {1e6f, -1e6f, 3e38f, -3e38f, INFINITY, -INFINITY})
    EXPECT_EQ(quant_code(big, 1.f, 1.f, 4), big > 0 ? 15u : 0u) << big;
}

// No quantizer may fuse w * inv_scale into the rounding (quant_math.h): on these weights a fused
// one gets every code but the first two of a row wrong. quantize() runs the x86-64-v4/v3 clone
// where the CPU has one, and those have FMA.
TEST(QuantMath, NoFusedMultiplyAddOnNearTies) {
  const int64_t rows = 64, in = test::kNearTieGroup;
  std::vector<float> host = test::near_tie_weights(rows);
  const at::Tensor w = at::from_blob(host.data(), {rows, in}, at::kFloat).clone();
  const QuantSpec spec = make_spec(test::kNearTieBits, test::kNearTieGroup, /*symmetric=*/false, /*fp16_scale=*/true);
  const PackedWeight ref = quantize_ref(w, spec);
  const PackedWeight got = quantize(w, spec);
  EXPECT_TRUE(bitwise_equal(got.codes, ref.codes));
  ClipSearchOptions round_to_nearest;
  round_to_nearest.n_grid = 0;
  EXPECT_TRUE(bitwise_equal(quantize_clipped(w, spec, at::Tensor(), round_to_nearest).codes, ref.codes));

  const GroupParams gp = test::near_tie_params();
  const float inv = quant_inv_scale(gp.scale);
  const auto codes = got.codes.accessor<uint8_t, 2>();
  int64_t unfused = 0, fused_would_differ = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 2; i < in; ++i) {
      const float x = host[r * in + i];
      unfused += codes[r][i] == quant_code(x, inv, gp.zero, test::kNearTieBits);
      fused_would_differ += codes[r][i] != test::fused_code(x, inv, gp.zero, test::kNearTieBits);
    }
  }
  EXPECT_EQ(unfused, rows * (in - 2));
  EXPECT_EQ(fused_would_differ, rows * (in - 2));  // the construction discriminates
}

TEST(QuantPacking, PackAndUnpackEightMatchCodeByCode) {
  at::Generator gen = at::detail::createCPUGenerator(12);
  for (int bits : {2, 3, 4, 5, 6, 8}) {
    const at::Tensor random = at::randint(0, quant_max_code(bits) + 1, {8}, gen, at::kInt);
    uint32_t codes[8];
    for (int k = 0; k < 8; ++k) codes[k] = static_cast<uint32_t>(random[k].item<int>());
    uint8_t one_by_one[8] = {}, eight[8] = {};
    for (int k = 0; k < 8; ++k) quant_pack_code(one_by_one, k, bits, codes[k]);
    quant_pack8(codes, bits, eight);
    EXPECT_EQ(std::memcmp(one_by_one, eight, 8), 0) << bits;
    if (8 % bits == 0) {  // the byte-wise form of the same layout, both ways
      for (int j = 0; j < bits; ++j) {
        EXPECT_EQ(quant_pack_byte(codes + j * 8 / bits, bits), one_by_one[j]) << bits << " byte " << j;
        uint32_t unpacked[8] = {};
        quant_unpack_byte(one_by_one[j], bits, unpacked);
        for (int k = 0; k < 8 / bits; ++k) EXPECT_EQ(unpacked[k], codes[j * 8 / bits + k]) << bits << " byte " << j;
      }
    }
    uint32_t back[8];
    quant_unpack8(eight, bits, back);
    for (int k = 0; k < 8; ++k) EXPECT_EQ(back[k], codes[k]) << bits << " " << k;
  }
}

TEST(QuantGroups, PartialLastGroupUsesOnlyItsOwnElements) {
  // 172 inputs in groups of 32: five full groups and a last one of 12. The last 12 weights are
  // 100x smaller, so a last group that saw any earlier element would get a 100x larger scale.
  at::Tensor w = gaussian(3, 172, 7);
  w.slice(1, 160, 172).mul_(0.01);
  const QuantSpec spec = make_spec(4, 32, false, false);
  const PackedWeight p = quantize(w, spec);
  ASSERT_EQ(p.scales.size(1), 6);
  for (int64_t r = 0; r < 3; ++r) {
    const at::Tensor last = w[r].slice(0, 160, 172);
    const GroupParams want = quant_asym_params(last.min().item<float>(), last.max().item<float>(), 4, false);
    EXPECT_EQ(stored_scale(p, r, 5), want.scale);
    EXPECT_LT(stored_scale(p, r, 5), stored_scale(p, r, 4) / 20);
    const at::Tensor err = (dequantize(p)[r].slice(0, 160, 172) - last).abs().max();
    EXPECT_LE(err.item<float>(), want.scale / 2 * 1.0001f);
  }
}

TEST(QuantStorage, HandCountedBytes) {
  // 17x172 b4g32: rows of 86 bytes, 6 groups of fp16 scale + 4-bit zero (24 bits: 3 bytes a row).
  EXPECT_EQ(make_spec(4, 32, false, true).storage_bytes(17, 172), 17 * 86 + 17 * 6 * 2 + 17 * 3);
  // The same with 8-bit zero points (z8): a byte per group.
  EXPECT_EQ(parse_quant_spec("b4g32z8").storage_bytes(17, 172), 17 * 86 + 17 * 6 * 2 + 17 * 6);
  // 3x7 b3, one group, symmetric, fp32 scales: ceil(21 / 8) = 3 bytes a row.
  EXPECT_EQ(make_spec(3, 128, true, false).storage_bytes(3, 7), 3 * 3 + 3 * 4);
  // 5x64 b2 whole row: 16 bytes a row, one fp16 scale and one 2-bit zero (10 bits in all: 2 bytes).
  EXPECT_EQ(make_spec(2, kWholeRow, false, true).storage_bytes(5, 64), 5 * 16 + 5 * 2 + 2);
  EXPECT_DOUBLE_EQ(make_spec(4, 128, true, true).bits_per_weight(1, 128), 4.125);
  // The row drawn in quant_spec.h: b3g32k6, 172 inputs: 65 + 2 + 5 + 3 bytes.
  EXPECT_EQ(parse_quant_spec("b3g32k6").storage_bytes(1, 172), 75);
  // 2x600 b4g16k8: 300 bytes of codes and 3 super-scales a row, 76 groups of 8-bit sub-scale and
  // 4-bit zero.
  EXPECT_EQ(parse_quant_spec("b4g16k8").storage_bytes(2, 600), 2 * (300 + 3 * 2) + 76 + 38);
  // Odd counts pad once per tensor: 3x40 b3g16 has 9 groups, 27 bits of zero points: 4 bytes.
  EXPECT_EQ(parse_quant_spec("b3g16").storage_bytes(3, 40), 3 * 15 + 9 * 2 + 4);
  // A row of 64 (stories260K): b4g64 = 4 + (16 + 4) / 64 = 4.3125 bits; z8 4.375; k6 4 + 10/64 + 16/64.
  EXPECT_DOUBLE_EQ(parse_quant_spec("b4g64").bits_per_weight(8, 64), 4.3125);
  EXPECT_DOUBLE_EQ(parse_quant_spec("b4g64z8").bits_per_weight(8, 64), 4.375);
  EXPECT_DOUBLE_EQ(parse_quant_spec("b4g64k6").bits_per_weight(8, 64), 4.40625);
  for (const char* name : {"b4g32", "b4g32z8", "b4g32s", "b4g16k6", "b3g32k8"}) {
    const QuantSpec spec = parse_quant_spec(name);
    const PackedWeight p = quantize(gaussian(17, 172, 1), spec);
    EXPECT_EQ(p.storage_bytes(), spec.storage_bytes(17, 172)) << name;
  }
}

TEST(QuantSpecNames, SideInformationSuffixesRoundTrip) {
  for (const char* name : {"b4g32", "b4g32z8", "b3g16s", "b2g128z8-f32", "b4g16k6", "b3g64k8", "b8g128k6", "b4grow"}) {
    EXPECT_EQ(parse_quant_spec(name).name(), name);
  }
  EXPECT_EQ(parse_quant_spec("b4g32z8").zero_bits(), 8);
  EXPECT_EQ(parse_quant_spec("b4g32").zero_bits(), 4);
  EXPECT_EQ(parse_quant_spec("b3g32k6").zero_bits(), 3);
  EXPECT_EQ(parse_quant_spec("b3g32s").zero_bits(), 0);
  EXPECT_NE(parse_quant_spec("b4g32"), parse_quant_spec("b4g32z8"));
  EXPECT_NE(parse_quant_spec("b4g32k6"), parse_quant_spec("b4g32k8"));
  GRADQ_EXPECT_THROW_MSG(parse_quant_spec("b4g32sk6"), "need an asymmetric format");
  GRADQ_EXPECT_THROW_MSG(parse_quant_spec("b4g32k6-f32"), "-f32 does not combine");
  GRADQ_EXPECT_THROW_MSG(parse_quant_spec("b4growk6"), "whole-row groups");
  GRADQ_EXPECT_THROW_MSG(parse_quant_spec("b8g32z8"), "write b8g32 without z8");
  GRADQ_EXPECT_THROW_MSG(parse_quant_spec("b4g32k4"), "expected b<bits>g<16|32|64|128|row>[s|z8|k6|k8][-f32]");
}

TEST(QuantGroups, BitZeroPointsGiveTheValuesOfByteZeroPoints) {
  // Groups whose range does not include 0 (all positive, all negative, far from 0) and mixed ones:
  // the zero point stays a code (0 .. max_code), so b bits hold the z8 value exactly.
  at::Tensor w = gaussian(9, 172, 21);
  w[0] += 5.f;
  w[1] -= 5.f;
  w[2] = w[2].abs() + 0.5f;
  for (int bits : {2, 3, 4, 5, 6}) {
    for (int64_t group : {int64_t{16}, int64_t{32}, kWholeRow}) {
      const QuantSpec b = make_spec(bits, group, false, true);
      QuantSpec z8 = b;
      z8.zero_8bit = true;
      const PackedWeight pb = quantize(w, b), p8 = quantize(w, z8);
      EXPECT_TRUE(bitwise_equal(pb.codes, p8.codes));
      EXPECT_TRUE(bitwise_equal(dequantize(pb), dequantize(p8))) << b.name();
      EXPECT_LT(pb.storage_bytes(), p8.storage_bytes());  // 9 rows: a byte per row saved at least
      for (int64_t g = 0; g < b.n_groups(172); ++g) {
        EXPECT_EQ(stored_zero(pb, 0, g), 0.f);                               // all positive: lowest code
        EXPECT_EQ(stored_zero(pb, 1, g), static_cast<float>((1 << bits) - 1));  // all negative: highest
      }
    }
  }
}

TEST(QuantGroups, SubScalesKeepSmallGroupsAndClampToTheirGrid) {
  // One row whose first group is 1000x smaller than the others: its 6-bit sub-scale rounds to the
  // smallest nonzero code, not to 0, and its values stay within the grid of that scale.
  at::Tensor w = gaussian(2, 128, 5);
  w[0].slice(0, 0, 16) *= 1e-3f;
  w[1] = w[1].abs() + 2.f;  // a row whose groups do not include 0
  const QuantSpec spec = parse_quant_spec("b4g16k6");
  const PackedWeight p = quantize(w, spec);
  EXPECT_TRUE(bitwise_equal(p.codes, quantize_ref(w, spec).codes));
  const uint32_t q0 = quant_unpack_code(p.sub_scales.data_ptr<uint8_t>(), 0, 6);  // row 0, group 0
  EXPECT_EQ(q0, 1u);
  EXPECT_GT(stored_scale(p, 0, 0), 0.f);
  const at::Tensor dq = dequantize(p);
  // Row 1: zero points clamped to code 0, every weight represented within half a step or, above
  // the grid of a sub-scale rounded down, at its top.
  for (int64_t g = 0; g < 8; ++g) {
    EXPECT_EQ(stored_zero(p, 1, g), 0.f);
    const float s = stored_scale(p, 1, g);
    for (int64_t i = g * 16; i < (g + 1) * 16; ++i) {
      const float wi = w[1][i].item<float>(), di = dq[1][i].item<float>();
      EXPECT_LE(std::fabs(wi - di), std::max(s / 2 * 1.0001f, wi - 15 * s + 1e-6f)) << i;
    }
  }
  EXPECT_GT(dq.abs().max().item<float>(), 0.f);
}

TEST(QuantFake, FloatLevelsAndDtype) {
  const at::Tensor w = gaussian(5, 33, 3).to(at::kHalf);
  const at::Tensor fq = fake_quantize(w, make_spec(4, 16, false, true));
  EXPECT_EQ(fq.scalar_type(), at::kHalf);
  EXPECT_EQ(fq.sizes(), w.sizes());
  EXPECT_TRUE(bitwise_equal(fq, dequantize(quantize(w, make_spec(4, 16, false, true))).to(at::kHalf)));
  QuantSpec prune, fp16;
  prune.level = QuantLevel::kPrune;
  fp16.level = QuantLevel::kFp16;
  const at::Tensor wf = gaussian(4, 9, 4);
  EXPECT_EQ(fake_quantize(wf, prune).abs().sum().item<float>(), 0.f);
  EXPECT_TRUE(bitwise_equal(fake_quantize(wf, fp16), wf.to(at::kHalf).to(at::kFloat)));
}

TEST(QuantErrors, BadInputsNameWhatWasExpected) {
  const QuantSpec b4 = make_spec(4, 32, false, true);
  GRADQ_EXPECT_THROW_MSG(quantize(at::ones({8}), b4), "expected a 2-D weight");
  GRADQ_EXPECT_THROW_MSG(quantize(at::ones({2, 0}), b4), "in_features > 0");
  GRADQ_EXPECT_THROW_MSG(quantize(at::full({2, 4}, NAN), b4), "NaN or inf");
  // A NaN or inf anywhere in a group, not only where min/max start from.
  for (float bad : {NAN, INFINITY, -INFINITY}) {
    at::Tensor w = gaussian(3, 200, 5);
    w[2][150] = bad;
    GRADQ_EXPECT_THROW_MSG(quantize(w, b4), "NaN or inf");
    GRADQ_EXPECT_THROW_MSG(quantize_clipped(w, b4, at::Tensor()), "NaN or inf");
  }
  // Large weights are checked a slice of rows at a time (all_finite): a bad value in the last row
  // of the last slice, and in the first row of a later slice, is found.
  for (int64_t row : {int64_t{2999}, int64_t{1048}}) {
    at::Tensor w = at::zeros({3000, 1000});
    w[row][row == 2999 ? 999 : 0] = INFINITY;
    GRADQ_EXPECT_THROW_MSG(quantize(w, b4), "NaN or inf");
  }
  GRADQ_EXPECT_THROW_MSG(quantize(at::ones({2, 4}, at::kInt), b4), "floating-point");
  QuantSpec fp16;
  fp16.level = QuantLevel::kFp16;
  GRADQ_EXPECT_THROW_MSG(quantize(at::ones({2, 4}), fp16), "integer level");
  GRADQ_EXPECT_THROW_MSG(quantize(at::ones({2, 4}), make_spec(4, 48, false, true)), "group size must be one of");
  GRADQ_EXPECT_THROW_MSG(quantize(at::full({1, 4}, 2e6f), b4), "fp32 scales");
  EXPECT_NO_THROW(quantize(at::full({1, 4}, 2e6f), make_spec(4, 32, false, false)));
  GRADQ_EXPECT_THROW_MSG(quantize_clipped(at::ones({2, 4}), b4, at::ones({5})), "[in_features] = [4]");
  GRADQ_EXPECT_THROW_MSG(quantize_clipped(at::ones({2, 4}), b4, -at::ones({4})), ">= 0");
  GRADQ_EXPECT_THROW_MSG(quantize_clipped(at::ones({2, 4}), b4, at::Tensor(), {20, 0.f}), "min_ratio");
}

TEST(QuantErrors, PackedWeightValidation) {
  PackedWeight p = quantize(gaussian(3, 40, 2), make_spec(4, 16, false, true));
  PackedWeight bad = p;
  bad.scales = p.scales.to(at::kFloat);
  GRADQ_EXPECT_THROW_MSG(dequantize(bad), "scales must be Half [3, 3], got Float [3, 3]");
  bad = p;
  bad.codes = p.codes.slice(1, 0, 19);
  GRADQ_EXPECT_THROW_MSG(dequantize(bad), "codes must be Byte [3, 20], got Byte [3, 19]");
  bad = p;
  bad.spec.symmetric = true;
  GRADQ_EXPECT_THROW_MSG(dequantize(bad), "symmetric formats store no zero points");
  bad = p;
  bad.zeros = at::Tensor();
  GRADQ_EXPECT_THROW_MSG(dequantize(bad), "zeros must be Byte [5], got  undefined");
  bad = p;
  bad.zeros = at::zeros({3, 3}, at::kByte);  // a byte per group: the z8 layout, not this spec's
  GRADQ_EXPECT_THROW_MSG(dequantize(bad), "zeros must be Byte [5], got Byte [3, 3]");
  PackedWeight k = quantize(gaussian(3, 40, 2), parse_quant_spec("b4g16k6"));
  bad = k;
  bad.sub_scales = at::Tensor();
  GRADQ_EXPECT_THROW_MSG(dequantize(bad), "sub_scales must be Byte [7]");
  bad = k;
  bad.scales = p.scales;
  GRADQ_EXPECT_THROW_MSG(dequantize(bad), "super-scales must be Half [3, 1], got Half [3, 3]");
}

// ---- Clipping search ----------------------------------------------------------------------------

struct ClipCase {
  int bits;
  int64_t group;
  bool symmetric;
  bool with_act;
  std::string name() const {
    return "b" + std::to_string(bits) + "_g" + (group == kWholeRow ? std::string("row") : std::to_string(group)) +
           (symmetric ? "_sym" : "_asym") + (with_act ? "_act" : "_noact");
  }
};

std::vector<ClipCase> all_clip_cases() {
  std::vector<ClipCase> cases;
  for (int bits : {2, 3, 4, 6})
    for (int64_t group : {int64_t{32}, int64_t{128}, kWholeRow})
      for (bool sym : {false, true})
        for (bool act : {false, true}) cases.push_back({bits, group, sym, act});
  return cases;
}

// Per-group weighted squared error [out, n_groups], summed in index order in double as the
// search does, so that equal choices give equal numbers.
std::vector<double> group_errors(const at::Tensor& w, const PackedWeight& p, const at::Tensor& act) {
  const at::Tensor dq = dequantize(p);
  const int64_t out = w.size(0), in = w.size(1);
  const int64_t glen = p.spec.group_len(in), groups = p.spec.n_groups(in);
  const auto W = w.accessor<float, 2>();
  const auto D = dq.accessor<float, 2>();
  std::vector<double> err(static_cast<size_t>(out * groups), 0.0);
  for (int64_t r = 0; r < out; ++r) {
    for (int64_t i = 0; i < in; ++i) {
      const double d = static_cast<double>(W[r][i]) - static_cast<double>(D[r][i]);
      const double a = act.defined() ? static_cast<double>(act[i].item<float>()) : 1.0;
      err[static_cast<size_t>(r * groups + i / glen)] += a * d * d;
    }
  }
  return err;
}

class QuantClip : public ::testing::TestWithParam<ClipCase> {
 protected:
  void SetUp() override {
    const ClipCase& c = GetParam();
    spec_ = make_spec(c.bits, c.group, c.symmetric, true);
    w_ = gaussian_with_outliers(24, 300, 11 + c.bits);
    if (c.with_act) {
      // Heavy-tailed channel importance, like real activations.
      at::Generator gen = at::detail::createCPUGenerator(5);
      act_ = at::exp(at::randn({300}, gen, at::kFloat) * 1.5);
    }
  }
  QuantSpec spec_;
  at::Tensor w_, act_;
};

TEST_P(QuantClip, NeverWorseThanRoundToNearestPerGroup) {
  const std::vector<double> rtn = group_errors(w_, quantize(w_, spec_), act_);
  const std::vector<double> clip = group_errors(w_, quantize_clipped(w_, spec_, act_), act_);
  double rtn_total = 0, clip_total = 0;
  for (size_t i = 0; i < rtn.size(); ++i) {
    ASSERT_LE(clip[i], rtn[i]) << "group " << i;
    rtn_total += rtn[i];
    clip_total += clip[i];
  }
  if (GetParam().bits <= 3) EXPECT_LT(clip_total, 0.98 * rtn_total);
  else EXPECT_LE(clip_total, rtn_total);
}

TEST_P(QuantClip, Deterministic) {
  const PackedWeight a = quantize_clipped(w_, spec_, act_);
  const PackedWeight b = quantize_clipped(w_, spec_, act_);
  EXPECT_TRUE(bitwise_equal(a.codes, b.codes));
  EXPECT_TRUE(bitwise_equal(a.scales, b.scales));
  EXPECT_TRUE(bitwise_equal(a.zeros, b.zeros));
}

TEST_P(QuantClip, EmptyGridIsRoundToNearest) {
  const PackedWeight a = quantize_clipped(w_, spec_, act_, {0, 0.5f});
  const PackedWeight b = quantize(w_, spec_);
  EXPECT_TRUE(bitwise_equal(a.codes, b.codes));
  EXPECT_TRUE(bitwise_equal(a.scales, b.scales));
  EXPECT_TRUE(bitwise_equal(a.zeros, b.zeros));
}

TEST_P(QuantClip, ActivationWeightsChangeTheChoice) {
  // Both searches try the same ratios, so the activation-weighted one is at least as good under
  // the activation-weighted error, group by group.
  at::Generator gen = at::detail::createCPUGenerator(9);
  const at::Tensor act = act_.defined() ? act_ : at::exp(at::randn({w_.size(1)}, gen, at::kFloat) * 1.5);
  const std::vector<double> weighted = group_errors(w_, quantize_clipped(w_, spec_, act), act);
  const std::vector<double> plain = group_errors(w_, quantize_clipped(w_, spec_, at::Tensor()), act);
  int differ = 0;
  for (size_t i = 0; i < weighted.size(); ++i) {
    ASSERT_LE(weighted[i], plain[i]) << "group " << i;
    differ += weighted[i] < plain[i];
  }
  EXPECT_GT(differ, 0) << "the activation statistics never changed a choice";
}

INSTANTIATE_TEST_SUITE_P(Sweep, QuantClip, ::testing::ValuesIn(all_clip_cases()),
                         [](const ::testing::TestParamInfo<ClipCase>& info) { return info.param.name(); });

}  // namespace
