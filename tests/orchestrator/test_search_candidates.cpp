// The search's candidate list: every group size in every side-information encoding, cheapest first
// for the weight's shape (precision_optimizer.h), and the k formats kept from trained rounding.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "optimizer/precision_optimizer.h"
#include "quant/trained_rounding.h"
#include "support/test_helpers.h"
#include "support/test_support.h"

namespace gradq {
namespace {

std::vector<std::string> names(const std::vector<QuantSpec>& specs) {
  std::vector<std::string> n;
  for (const QuantSpec& s : specs) n.push_back(s.name());
  return n;
}

TEST(SearchCandidates, EveryGroupSizeInEveryEncodingCheapestFirst) {
  SearchOptions o;
  o.group_sizes = {64, 32, 16};
  o.encodings = {"asym", "k6"};
  o.validate();
  // Rows of 64: b4g64 4.3125, b4g64k6 4.40625 (a fp16 super-scale per row), b4g32k6 4.5625,
  // b4g32 4.625, b4g16k6 4.875, b4g16 5.25 bits per weight.
  EXPECT_EQ(names(o.candidates(4, 64, 64)),
            (std::vector<std::string>{"b4g64", "b4g64k6", "b4g32k6", "b4g32", "b4g16k6", "b4g16"}));
  const std::vector<QuantSpec> c = o.candidates(4, 64, 64);
  for (size_t i = 1; i < c.size(); ++i) EXPECT_LE(c[i - 1].storage_bytes(64, 64), c[i].storage_bytes(64, 64));
  // 8-bit codes: z8 is the default layout, listed once.
  o.encodings = {"asym", "z8"};
  EXPECT_EQ(names(o.candidates(8, 4, 64)), (std::vector<std::string>{"b8g64", "b8g32", "b8g16"}));
}

TEST(SearchCandidates, GroupSizesSpanningTheRowAreOneCandidate) {
  SearchOptions o;  // group sizes 128, 64, 32, 16
  o.encodings = {"asym", "s"};
  // A row of 64 inputs is one group at 128 and at 64: the same stored values, listed once, as the
  // first group size.
  EXPECT_EQ(names(o.candidates(4, 8, 64)),
            (std::vector<std::string>{"b4g128s", "b4g128", "b4g32s", "b4g32", "b4g16s", "b4g16"}));
  // A row of 172 inputs is two groups at 128 and three at 64: both are candidates.
  EXPECT_EQ(o.candidates(4, 8, 172).size(), 8u);
  // The same row at 128 and 64 in different encodings is not the same format.
  o.encodings = {"asym"};
  o.group_sizes = {128, 64};
  EXPECT_EQ(names(o.candidates(2, 8, 64)), (std::vector<std::string>{"b2g128"}));
  EXPECT_EQ(names(o.candidates(2, 8, 128)), (std::vector<std::string>{"b2g128", "b2g64"}));
}

TEST(SearchCandidates, UnknownOrImpossibleEncodingsAreRejected) {
  SearchOptions o;
  o.encodings = {"asym", "q4"};
  GRADQ_EXPECT_THROW_MSG(o.validate(), "expected asym, z8, s, k6 or k8");
  o.encodings = {};
  GRADQ_EXPECT_THROW_MSG(o.validate(), "at least one side-information encoding");
  GRADQ_EXPECT_THROW_MSG(search_spec(4, 32, "sk6"), "unknown side-information encoding 'sk6'");
}

TEST(SearchCandidates, TrainedRoundingRejectsSubScaleFormats) {
  GRADQ_EXPECT_THROW_MSG(train_rounding(at::randn({4, 64}), parse_quant_spec("b4g16k6"), at::eye(64), {}),
                         "expected a format with direct scales");
}

}  // namespace
}  // namespace gradq
