// The search's candidate cache (optimizer/candidate_cache.h): memory within its byte budget, what it
// drops kept in the spill file and read back byte for byte.

#include <gtest/gtest.h>

#include <torch/torch.h>

#include <string>
#include <vector>

#include "optimizer/candidate_cache.h"
#include "quant/quant_spec.h"
#include "support/test_helpers.h"

namespace gradq {
namespace {

// Candidates of several formats, so that every tensor a QuantizedTensor can hold is spilled once:
// b-bit zero point streams, 8-bit zero points, symmetric (none), k6 sub-scales.
std::vector<QuantizedTensor> candidates() {
  torch::manual_seed(3);
  const at::Tensor w = torch::randn({48, 128});
  std::vector<QuantizedTensor> qs;
  for (const char* spec : {"b4g32", "b3g64z8", "b4g32s", "b4g32k6"})
    qs.push_back(quantize_tensor(w, parse_quant_spec(spec), RoundingMethod::kRtn));
  return qs;
}

void expect_same_tensors(const QuantizedTensor& a, const QuantizedTensor& b) {
  EXPECT_EQ(a.spec, b.spec);
  EXPECT_EQ(a.out_features, b.out_features);
  EXPECT_EQ(a.in_features, b.in_features);
  const std::vector<std::pair<const at::Tensor*, const at::Tensor*>> pairs = {
      {&a.packed.codes, &b.packed.codes}, {&a.packed.scales, &b.packed.scales},
      {&a.packed.zeros, &b.packed.zeros}, {&a.packed.sub_scales, &b.packed.sub_scales}, {&a.values, &b.values}};
  for (const auto& [x, y] : pairs) {
    ASSERT_EQ(x->defined(), y->defined());
    if (!x->defined()) continue;
    EXPECT_EQ(x->scalar_type(), y->scalar_type());
    EXPECT_EQ(x->sizes(), y->sizes());
    EXPECT_TRUE(torch::equal(*x, *y));
  }
  EXPECT_TRUE(torch::equal(a.dequantize(), b.dequantize()));
}

TEST(CandidateCache, WhatMemoryDropsIsReadBackFromTheSpillByteForByte) {
  const std::vector<QuantizedTensor> qs = candidates();
  const int64_t one = held_bytes(qs[0]);
  CandidateCache cache(one + one / 2, {"", int64_t{1} << 30});
  for (size_t i = 0; i < qs.size(); ++i) cache.insert("w" + std::to_string(i), qs[i]);
  EXPECT_LE(cache.bytes(), one + one / 2);
  EXPECT_EQ(cache.size(), 1u);
  EXPECT_GT(cache.spilled_bytes(), 0);
  // Each read back takes the memory and drops the one before to the file: w3, the last one, too.
  for (size_t i = 0; i < qs.size(); ++i) {
    const QuantizedTensor* q = cache.find("w" + std::to_string(i));
    ASSERT_NE(q, nullptr) << i;
    expect_same_tensors(*q, qs[i]);
  }
  EXPECT_EQ(cache.spill_reads(), static_cast<int64_t>(qs.size()));
  int64_t all = 0;
  for (const QuantizedTensor& q : qs) all += held_bytes(q);
  EXPECT_EQ(cache.spilled_bytes(), all);
  // Dropped again, what is already in the file is not written twice.
  for (size_t i = 0; i < qs.size(); ++i) ASSERT_NE(cache.find("w" + std::to_string(i)), nullptr);
  EXPECT_EQ(cache.spilled_bytes(), all);
  // Erased is gone from both tiers.
  cache.erase("w0");
  EXPECT_EQ(cache.find("w0"), nullptr);
  // A new value under a spilled key replaces the old one.
  cache.insert("w1", qs[3]);
  cache.insert("w2", qs[2]);
  expect_same_tensors(*cache.find("w1"), qs[3]);
}

TEST(CandidateCache, WithoutRoomInTheSpillADroppedCandidateIsGone) {
  const std::vector<QuantizedTensor> qs = candidates();
  const int64_t one = held_bytes(qs[0]);
  CandidateCache no_spill(one);
  no_spill.insert("a", qs[0]);
  no_spill.insert("b", qs[1]);
  EXPECT_EQ(no_spill.find("a"), nullptr);
  EXPECT_EQ(no_spill.spilled_bytes(), 0);
  CandidateCache small_spill(one, {"", one / 2});  // the spill cannot take a whole candidate
  small_spill.insert("a", qs[0]);
  small_spill.insert("b", qs[1]);
  EXPECT_EQ(small_spill.find("a"), nullptr);
  EXPECT_EQ(small_spill.spilled_bytes(), 0);
  EXPECT_NE(small_spill.find("b"), nullptr);
}

TEST(CandidateCache, BadSpillOptionsAreRejected) {
  GRADQ_EXPECT_THROW_MSG(CandidateCache(16, {"/nonexistent/gradq_spill", 1024}),
                         "cannot make the candidate spill file in '/nonexistent/gradq_spill'");
  GRADQ_EXPECT_THROW_MSG(CandidateCache(16, {"", -1}), "spill's byte budget must be >= 0, got -1");
}

}  // namespace
}  // namespace gradq
