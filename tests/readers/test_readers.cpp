// The readers of untrusted input refuse malformed input with gradq::Error and a message, never with
// another exception type (tests/fuzz checks the same on generated input). One test per case a
// reader let through before: each threw nlohmann's or torch's exception, or accepted a reference
// that later indexed out of range.

#include <gtest/gtest.h>

#include <torch/serialize.h>

#include <string>

#include "common/archive_check.h"
#include "common/error.h"
#include "data/dataset.h"
#include "eval/evaluator.h"
#include "importance/analyzer.h"
#include "optimizer/plan.h"
#include "optimizer/policy.h"
#include "quant/quant_spec.h"
#include "support/test_helpers.h"
#include "sweep/sweep.h"

namespace gradq {
namespace {

// EXPECT_THROW(..., Error) fails when another type (nlohmann::json::type_error) is thrown.
TEST(Readers, PlanFieldsOfTheWrongJsonTypeAreErrors) {
  EXPECT_THROW(Plan::from_json(R"({"format": "gradq-plan", "version": 1,
                                   "weights": [{"name": "w", "spec": "b4g32", "method": 3}]})"), Error);
  EXPECT_THROW(Plan::from_json(R"({"format": "gradq-plan", "version": "1", "weights": []})"), Error);
  EXPECT_THROW(Plan::from_json(R"({"format": 7, "version": 1, "weights": []})"), Error);
  GRADQ_EXPECT_THROW_MSG(Plan::from_json(R"({"format": "gradq-plan", "version": 1,
                                             "weights": [{"name": "w", "spec": "b4g32", "method": 3}]})"),
                         "malformed gradq plan");
}

TEST(Readers, FormatNamesWithHugeOrLongNumbersAreErrors) {
  // Before: std::out_of_range from std::stoi.
  GRADQ_EXPECT_THROW_MSG(parse_quant_spec("b99999999999g32"), "cannot parse quantization spec");
  EXPECT_THROW(Plan::from_json(R"({"format": "gradq-plan", "version": 1,
                                   "weights": [{"name": "w", "spec": "b4294967300g32"}]})"), Error);
  GRADQ_EXPECT_THROW_MSG(parse_quant_spec("b" + std::string(100000, '4') + "g32"), "cannot parse quantization spec");
  EXPECT_EQ(parse_quant_spec("b4g128k6").name(), "b4g128k6") << "valid names still parse";
}

TEST(Readers, PolicyFieldsOfTheWrongJsonTypeAreErrors) {
  EXPECT_THROW(PrecisionPolicy::from_json(R"({"format": "gradq-policy", "rules": [{"pattern": "x", "min": 4}]})"),
               Error);
  EXPECT_THROW(PrecisionPolicy::from_json(R"({"format": ["gradq-policy"], "rules": []})"), Error);
  EXPECT_THROW(DynamicPolicy::from_json(R"({"format": "gradq-dynamic-policy", "high_share": "0.2"})"), Error);
  GRADQ_EXPECT_THROW_MSG(DynamicPolicy::from_json(R"({"format": "gradq-dynamic-policy", "high": 16})"),
                         "malformed dynamic policy");
}

TEST(Readers, AnalysisHeaderOfTheWrongJsonTypeIsAnError) {
  EXPECT_THROW(analysis_from_json(R"({"format": 1})"), Error);
  EXPECT_THROW(analysis_from_json(R"({"format": "gradq-importance-analysis", "version": "2"})"), Error);
}

TEST(Readers, SweepReportWithoutTheConfigurationTheGateReadsIsAnError) {
  // Before: accepted, then the regression gate threw nlohmann's out_of_range (no "model" key).
  const std::string text = R"({"format": "gradq-sweep", "config": {}, "order_hash": "h", "shared_seconds": 0,
                               "points": [], "missing": []})";
  GRADQ_EXPECT_THROW_MSG(sweep_from_json(text), "malformed sweep report");
}

Windows small_windows() {
  std::vector<int64_t> tokens(40);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int64_t>(i % 7);
  WindowSpec spec;
  spec.ctx = 8;
  spec.stride = 8;
  return make_windows(tokens, spec);
}

std::string pickled(const c10::Dict<c10::IValue, c10::IValue>& dict) {
  const std::vector<char> bytes = torch::pickle_save(c10::IValue(dict));
  return std::string(bytes.begin(), bytes.end());
}

TEST(Readers, ReferenceFilesAreCheckedForTypesShapesAndTargets) {
  const Windows w = small_windows();
  GradualEvaluator evaluator(w);
  const at::Tensor scored = at::arange(w.inputs.size(1)).unsqueeze(0) >= w.score_from.unsqueeze(1);
  const at::Tensor targets = w.targets.index({scored});
  auto dict = [&](c10::IValue log_probs, c10::IValue t, c10::IValue windows) {
    c10::Dict<c10::IValue, c10::IValue> d(c10::StringType::get(), c10::AnyType::get());
    d.insert("log_probs", log_probs);
    d.insert("targets", t);
    d.insert("windows", windows);
    return pickled(d);
  };
  const at::Tensor log_probs = at::log_softmax(at::randn({targets.size(0), 7}), -1);
  // A valid one is accepted.
  evaluator.set_reference(Reference::from_bytes(dict(log_probs, targets, w.inputs), "ok.ref"));
  // Before: c10::Error from toTypedDict, not gradq::Error.
  GRADQ_EXPECT_THROW_MSG(Reference::from_bytes(dict(c10::IValue(3), targets, w.inputs), "int.ref"),
                         "expected a dict of str to tensor");
  // Before: accepted; evaluation then gathered at targets beyond the vocabulary.
  GRADQ_EXPECT_THROW_MSG(Reference::from_bytes(dict(log_probs, targets + 100, w.inputs), "vocab.ref"),
                         "targets in [");
  GRADQ_EXPECT_THROW_MSG(Reference::from_bytes(dict(log_probs.slice(0, 1), targets, w.inputs), "rows.ref"),
                         "corrupt gradq fp32 reference file");
  // Same windows, other targets: refused by set_reference.
  const at::Tensor shifted = (targets + 1) % 7;
  GRADQ_EXPECT_THROW_MSG(evaluator.set_reference(Reference::from_bytes(dict(log_probs, shifted, w.inputs), "t.ref")),
                         "other targets");
}

// Before: libtorch 1.13's unpickler allocated and zero-filled whatever length a string's length field
// declared before finding the record too short (3 GB for reference-long-string.ref, found by
// fuzz_reference; up to 4 GiB from a 4-byte field, std::length_error from an 8-byte one).
TEST(Readers, PickleLengthsBeyondTheRecordAreErrors) {
  auto check = [](const std::string& pickle) {
    check_pickle_lengths(reinterpret_cast<const uint8_t*>(pickle.data()), pickle.size(), "p.pkl");
  };
  EXPECT_NO_THROW(check(std::string("\x80\x02X\x02\x00\x00\x00" "ab.", 10)));
  GRADQ_EXPECT_THROW_MSG(check(std::string("\x80\x02X\x00\x00\x00\xc0" "ab.", 10)),
                         "p.pkl is corrupt: the pickle opcode 0x58 at byte 2 declares 3221225472 bytes, 3 are left");
  GRADQ_EXPECT_THROW_MSG(check(std::string("\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\xff.", 12)),
                         "declares 18446744073709551615 bytes, 1 are left");
  // After a valid string, and after GLOBAL's two lines: the walk follows the opcodes.
  GRADQ_EXPECT_THROW_MSG(check(std::string("\x80\x02X\x01\x00\x00\x00" "a" "ctorch\nT\n" "B\x0a\x00\x00\x00" "12345678.", 31)),
                         "opcode 0x42 at byte 17 declares 10 bytes, 9 are left");
  GRADQ_EXPECT_THROW_MSG(Reference::load(std::string(GRADQ_TEST_SOURCE_DIR) + "/tests/fuzz/regressions/reference-long-string.ref"),
                         "(record data.pkl) is corrupt");
}

// Before: libtorch 1.13's unpickler grew its memo table to whatever index LONG_BINPUT named (27 GB,
// 16 bytes an entry, for reference-memo-index.ref, found by fuzz_reference; std::bad_alloc outside
// the fuzzer, 64 GiB at most from the 4-byte index).
TEST(Readers, PickleMemoIndicesBeyondThePickleAreErrors) {
  auto check = [](const std::string& pickle) {
    check_pickle_lengths(reinterpret_cast<const uint8_t*>(pickle.data()), pickle.size(), "p.pkl");
  };
  EXPECT_NO_THROW(check(std::string("\x80\x02Nr\x00\x00\x00\x00.", 9)));
  GRADQ_EXPECT_THROW_MSG(check(std::string("\x80\x02Nr\x00\x00\x00\x80.", 9)),
                         "p.pkl is corrupt: the pickle opcode 0x72 at byte 3 stores memo entry 2147483648, beyond the 9 "
                         "entries a pickle of 9 bytes can make");
  GRADQ_EXPECT_THROW_MSG(Reference::load(std::string(GRADQ_TEST_SOURCE_DIR) + "/tests/fuzz/regressions/reference-memo-index.ref"),
                         "stores memo entry");
}

}  // namespace
}  // namespace gradq
