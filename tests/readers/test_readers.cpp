// The readers of untrusted input refuse malformed input with gradq::Error and a message, never with
// another exception type (tests/fuzz checks the same on generated input). One test per case a
// reader let through before: each threw nlohmann's or torch's exception, or accepted a reference
// that later indexed out of range.

#include <gtest/gtest.h>

#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/serialize.h>

#include <sstream>
#include <string>
#include <vector>

#include "common/archive_check.h"
#include "common/error.h"
#include "data/dataset.h"
#include "eval/evaluator.h"
#include "importance/analyzer.h"
#include "model/causal_lm.h"
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
    check_pickle(reinterpret_cast<const uint8_t*>(pickle.data()), pickle.size(), "p.pkl");
  };
  EXPECT_NO_THROW(check(std::string("\x80\x02X\x02\x00\x00\x00" "ab.", 10)));
  GRADQ_EXPECT_THROW_MSG(check(std::string("\x80\x02X\x00\x00\x00\xc0" "ab.", 10)),
                         "p.pkl is corrupt: the pickle opcode 0x58 at byte 2 declares 3221225472 bytes, 3 are left");
  GRADQ_EXPECT_THROW_MSG(check(std::string("\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\xff.", 12)),
                         "declares 18446744073709551615 bytes, 1 are left");
  // GLOBAL's lines without their newline: libtorch 1.13's unpickler appends its last chunk to the line
  // forever (reference-global-without-newline.ref, fuzz_reference on ebc8c2b's reader, 539,354
  // executions in: out-of-memory at 1.4 GB in Unpickler::readString).
  EXPECT_NO_THROW(check(std::string("\x80\x02" "ctorch\nFloatStorage\n.", 23)));
  GRADQ_EXPECT_THROW_MSG(check(std::string("\x80\x02" "ctorch\nFloatStorage", 21)),
                         "p.pkl is corrupt: the pickle opcode 0x63 at byte 2 has an argument line that runs to the "
                         "pickle's end without a newline");
  GRADQ_EXPECT_THROW_MSG(check(std::string("\x80\x02" "ctorch", 8)), "opcode 0x63 at byte 2 has an argument line");
  GRADQ_EXPECT_THROW_MSG(Reference::load(std::string(GRADQ_TEST_SOURCE_DIR) +
                                         "/tests/fuzz/regressions/reference-global-without-newline.ref"),
                         "(record data.pkl) is corrupt: the pickle opcode 0x63 at byte");
  // After a valid string, and after GLOBAL's two lines: the walk follows the opcodes.
  GRADQ_EXPECT_THROW_MSG(check(std::string("\x80\x02X\x01\x00\x00\x00" "a" "ctorch\nT\n" "B\x0a\x00\x00\x00" "12345678.", 31)),
                         "opcode 0x42 at byte 17 declares 10 bytes, 9 are left");
  GRADQ_EXPECT_THROW_MSG(Reference::load(std::string(GRADQ_TEST_SOURCE_DIR) + "/tests/fuzz/regressions/reference-long-string.ref"),
                         "(record data.pkl) is corrupt");
  // reference-slow.ref (fuzz_reference: past the 20 s timeout) was the same fault: a 4.29 GB string.
  GRADQ_EXPECT_THROW_MSG(Reference::load(std::string(GRADQ_TEST_SOURCE_DIR) + "/tests/fuzz/regressions/reference-long-string-4g.ref"),
                         "opcode 0x58 at byte 204 declares 4294966791 bytes, 162 are left");
  // The same fault in a record named data.pkL: libtorch's reader finds names ignoring case, the
  // check looked only at names ending in ".pkl" (fuzz_reference: a 4 GB allocation in the unpickler).
  GRADQ_EXPECT_THROW_MSG(Reference::load(std::string(GRADQ_TEST_SOURCE_DIR) + "/tests/fuzz/regressions/reference-record-name-case.ref"),
                         "(record data.pkL) is corrupt: the pickle opcode 0x58 at byte 204 declares 4278190087 bytes");
}

// Before: libtorch 1.13's unpickler grew its memo table to whatever index LONG_BINPUT named (27 GB,
// 16 bytes an entry, for reference-memo-index.ref, found by fuzz_reference; std::bad_alloc outside
// the fuzzer, 64 GiB at most from the 4-byte index).
TEST(Readers, PickleMemoIndicesBeyondThePickleAreErrors) {
  auto check = [](const std::string& pickle) {
    check_pickle(reinterpret_cast<const uint8_t*>(pickle.data()), pickle.size(), "p.pkl");
  };
  EXPECT_NO_THROW(check(std::string("\x80\x02Nr\x00\x00\x00\x00.", 9)));
  GRADQ_EXPECT_THROW_MSG(check(std::string("\x80\x02Nr\x00\x00\x00\x80.", 9)),
                         "p.pkl is corrupt: the pickle opcode 0x72 at byte 3 stores memo entry 2147483648, beyond the 9 "
                         "entries a pickle of 9 bytes can make");
  GRADQ_EXPECT_THROW_MSG(Reference::load(std::string(GRADQ_TEST_SOURCE_DIR) + "/tests/fuzz/regressions/reference-memo-index.ref"),
                         "stores memo entry");
}

// A zip archive of `records` (name, bytes), as torch.save writes one (torch.jit.save deflates the
// code records: `compress`).
std::string archive_of(const std::vector<std::pair<std::string, std::string>>& records, bool compress = false) {
  std::string out;
  caffe2::serialize::PyTorchStreamWriter writer([&](const void* buf, size_t n) {
    out.append(static_cast<const char*>(buf), n);
    return n;
  });
  for (const auto& [name, bytes] : records) writer.writeRecord(name, bytes.data(), bytes.size(), compress);
  writer.writeEndOfFile();
  return out;
}

std::string u32(uint32_t v) { return std::string(reinterpret_cast<const char*>(&v), 4); }  // little-endian host
std::string binint(int32_t v) { return "J" + u32(static_cast<uint32_t>(v)); }
std::string binunicode(const std::string& s) { return "X" + u32(static_cast<uint32_t>(s.size())) + s; }
std::string int_tuple(const std::vector<int32_t>& v) {
  std::string p = "(";
  for (int32_t x : v) p += binint(x);
  return p + "t";
}

// The pickle torch::pickle_save writes for {"t": tensor}: the tensor views (offset, sizes, strides)
// of float storage '0', whose persistent id declares `numel` elements.
std::string tensor_pickle(int32_t numel, int32_t offset, const std::vector<int32_t>& sizes,
                          const std::vector<int32_t>& strides) {
  return "\x80\x02}(" + binunicode("t") + "ctorch._utils\n_rebuild_tensor_v2\n((" + binunicode("storage") +
         "ctorch\nFloatStorage\n" + binunicode("0") + binunicode("cpu") + binint(numel) + "tQ" + binint(offset) +
         int_tuple(sizes) + int_tuple(strides) + "\x89" "ccollections\nOrderedDict\n)RtRu.";
}

std::string floats(int n) { return std::string(static_cast<size_t>(n) * 4, '\0'); }

// Before: libtorch 1.13's unpickler wrapped a storage record in a storage of the size its persistent
// id declared, and set a tensor's offset, sizes and strides on it unchecked: reading either read past
// the record. reference-view-beyond-storage.ref (found by fuzz_reference as reference-segv-storage-size.ref: a
// SEGV under ASan in Reference::from_bytes, garbage and a lucky range error outside it) holds targets
// of 39 elements with stride 91 in a storage of 39.
// Two records whose names match ignoring case: miniz finds records ignoring case, so which of them
// libtorch reads is up to its search, and no check could know that it judged those bytes.
TEST(Readers, RecordsWhoseNamesMatchIgnoringCaseAreErrors) {
  const std::vector<char> pickle = torch::jit::pickle(c10::IValue(int64_t{1}));
  const std::string one(pickle.begin(), pickle.end());
  EXPECT_NO_THROW(check_archive(std::make_shared<BytesReadAdapter>(archive_of({{"data.pkl", one}})), "d.ref"));
  const std::string twice = archive_of({{"data.pkl", one}, {"DATA.pkl", one}});
  GRADQ_EXPECT_THROW_MSG(check_archive(std::make_shared<BytesReadAdapter>(twice), "d.ref"),
                         "'d.ref' is corrupt: it holds two records named DATA.pkl (names match ignoring case)");
}

// Before: libtorch 1.13's getRecord handed back its buffer uninitialized when a deflated record's
// stream was corrupt (miniz fails without setting the error libtorch looks at), so the checks judged
// heap garbage: found by the fresh-clone test run (2026-12-03) on a fuzzer-made debug pickle of
// torchscript-code-record-4g.pt, which failed or passed by the heap's contents.
TEST(Readers, CompressedRecordsThatDoNotDecompressToTheirSizeAreErrors) {
  const std::vector<char> pickle = torch::jit::pickle(c10::IValue(std::string(300, 'a')));
  const std::string one(pickle.begin(), pickle.end());
  const std::string good = archive_of({{"data.pkl", one}}, /*compress=*/true);
  auto check = [](const std::string& bytes) { check_archive(std::make_shared<BytesReadAdapter>(bytes), "d.ref"); };
  auto u16_at = [&](size_t at) { return static_cast<uint8_t>(good[at]) | static_cast<uint8_t>(good[at + 1]) << 8; };
  // data.pkl's local header is the archive's first; its stream follows its name and extra field.
  ASSERT_EQ(good.compare(0, 4, "PK\x03\x04"), 0);
  ASSERT_EQ(u16_at(8), 8) << "the record is deflated";
  const size_t stream = 30 + u16_at(26) + u16_at(28);
  const size_t directory = good.find("PK\x01\x02");  // data.pkl's central directory entry
  ASSERT_NE(directory, std::string::npos);
  const size_t stream_size = u16_at(directory + 20) | static_cast<size_t>(u16_at(directory + 22)) << 16;
  ASSERT_LT(stream_size, one.size()) << "deflate compressed the repeated text";
  EXPECT_NO_THROW(check(good));
  std::string corrupt = good;
  corrupt[stream] = 0x07;  // a final block of the reserved block type
  GRADQ_EXPECT_THROW_MSG(check(corrupt), fmt::format("'d.ref' (record data.pkl) is corrupt: its deflate stream of {} "
                                                     "bytes fails after 0 of the {} bytes it declares",
                                                     stream_size, one.size()));
  // The central directory declares one byte more than the stream makes, then one byte less. libtorch
  // reads the first bytes of a stream that makes more, every one written, so the checks see those.
  auto declaring = [&](int change) {
    std::string bytes = good;
    bytes[directory + 24] = static_cast<char>(static_cast<uint8_t>(bytes[directory + 24]) + change);
    EXPECT_EQ(bytes[directory + 25], good[directory + 25]) << "no carry into the next byte";
    return bytes;
  };
  GRADQ_EXPECT_THROW_MSG(check(declaring(+1)), fmt::format("its deflate stream of {} bytes ends after {} of the {} "
                                                           "bytes it declares",
                                                           stream_size, one.size(), one.size() + 1));
  EXPECT_NO_THROW(check(declaring(-1)));
  // Before: libtorch's reader allocates the size a record declares, and its constructor reads the
  // `version` record: reference-version-record-4g.ref (fuzz_reference, 2026-12-03) declares
  // 4,177,526,529 bytes for 4 compressed ones (libFuzzer: out-of-memory in malloc(4177526529)).
  GRADQ_EXPECT_THROW_MSG(Reference::load(std::string(GRADQ_TEST_SOURCE_DIR) +
                                         "/tests/fuzz/regressions/reference-version-record-4g.ref"),
                         "(record version) is corrupt: it declares 4177526529 bytes, more than its 4 compressed bytes "
                         "can make (1032 per byte at most)");
}

// libtorch lists a record outside the first record's folder only when asked (getAllRecords throws),
// and torch::jit::load never asks: the check refuses it from the central directory, before any
// record is read (torchscript-stray-record-name.pt, below, is the fuzzer's case).
TEST(Readers, RecordsOutsideTheArchivesFolderAreErrors) {
  const std::vector<char> pickle = torch::jit::pickle(c10::IValue(int64_t{1}));
  const std::string good = archive_of({{"data.pkl", std::string(pickle.begin(), pickle.end())}, {"extra", "x"}});
  auto renamed = [&](const std::string& from, const std::string& to) {  // in the local header and the directory
    std::string bytes = good;
    for (size_t at = bytes.find(from); at != std::string::npos; at = bytes.find(from, at + 1))
      bytes.replace(at, from.size(), to);
    return bytes;
  };
  auto check = [](const std::string& bytes) { check_archive(std::make_shared<BytesReadAdapter>(bytes), "r.pt"); };
  EXPECT_NO_THROW(check(good));
  GRADQ_EXPECT_THROW_MSG(check(renamed("archive/extra", "archivX/extra")),
                         "'r.pt' is a corrupt archive: record 'archivX/extra' is not in the folder 'archive/' of its "
                         "first record");
  GRADQ_EXPECT_THROW_MSG(check(renamed("archive/data.pkl", "archive_data.pkl")),
                         "'r.pt' is not a PyTorch archive: its record 'archive_data.pkl' is in no folder");
}

TEST(Readers, StoragesAndViewsBeyondTheirRecordsAreErrors) {
  auto read = [](const std::string& pickle, int record_floats) {
    return Reference::from_bytes(archive_of({{"data.pkl", pickle}, {"data/0", floats(record_floats)}}), "c.ref");
  };
  // Checked, unpickled, then refused for what a reference lacks: the check let it through.
  GRADQ_EXPECT_THROW_MSG(read(tensor_pickle(6, 0, {2, 3}, {3, 1}), 6), "key 'log_probs' missing");
  GRADQ_EXPECT_THROW_MSG(read(tensor_pickle(6, 5, {2, 3}, {0, 0}), 6), "key 'log_probs' missing");
  GRADQ_EXPECT_THROW_MSG(read(tensor_pickle(0, 0, {0}, {1}), 0), "key 'log_probs' missing");
  {
    const std::string pickle = tensor_pickle(9, 1, {3, 2}, {2, 3});  // elements 1 + {0, 2, 4} + {0, 3}: up to 8
    const std::string bytes = archive_of({{"data.pkl", pickle}, {"data/0", floats(9)}});
    EXPECT_NO_THROW(check_archive(std::make_shared<BytesReadAdapter>(bytes), "c.ref"));
    const at::Tensor t = torch::pickle_load(std::vector<char>(bytes.begin(), bytes.end())).toGenericDict().at("t").toTensor();
    EXPECT_EQ(t.sizes(), at::IntArrayRef({3, 2})) << "the crafted pickle is one libtorch reads";
  }
  GRADQ_EXPECT_THROW_MSG(read(tensor_pickle(1000, 0, {3}, {1}), 3),
                         "'c.ref' (record data.pkl) is corrupt: storage data/0 declares 1000 Float elements (4000 bytes) "
                         "but its record holds 12 bytes");
  GRADQ_EXPECT_THROW_MSG(Reference::from_bytes(archive_of({{"data.pkl", tensor_pickle(3, 0, {3}, {1})}}), "c.ref"),
                         "storage data/0 declares 3 Float elements but the archive has no readable record data/0");
  GRADQ_EXPECT_THROW_MSG(read(tensor_pickle(-1, 0, {0}, {1}), 0), "declares -1 elements");
  GRADQ_EXPECT_THROW_MSG(read(tensor_pickle(6, 0, {2, 3}, {3, 2}), 6),
                         "the tensor at byte 156 (offset 0, sizes [2, 3], strides [3, 2]) reaches outside storage data/0, "
                         "which holds 6 elements");
  GRADQ_EXPECT_THROW_MSG(read(tensor_pickle(6, 6, {1}, {1}), 6), "(offset 6, sizes [1], strides [1]) reaches outside");
  GRADQ_EXPECT_THROW_MSG(read(tensor_pickle(6, 1, {2}, {-2}), 6), "(offset 1, sizes [2], strides [-2]) reaches outside");
  GRADQ_EXPECT_THROW_MSG(read(tensor_pickle(6, 0, {65536, 65536, 65536}, {65536, 65536, 65536}), 6), "reaches outside");
  GRADQ_EXPECT_THROW_MSG(read(tensor_pickle(6, 0, {-1}, {1}), 6), "has size -1 in dimension 0");
  GRADQ_EXPECT_THROW_MSG(read(tensor_pickle(6, -1, {0}, {1}), 6), "has storage offset -1");
  // TorchScript archives: constants.pkl's storages are records constants/<key>, and CausalLM::load
  // checks them before torch::jit::load.
  std::string constants = tensor_pickle(1000, 0, {3}, {1});
  std::istringstream in(archive_of({{"constants.pkl", constants}, {"constants/0", floats(3)}}));
  GRADQ_EXPECT_THROW_MSG(CausalLM::load(in, "c.pt"),
                         "'c.pt' (record constants.pkl) is corrupt: storage constants/0 declares 1000 Float elements");
  GRADQ_EXPECT_THROW_MSG(Reference::load(std::string(GRADQ_TEST_SOURCE_DIR) +
                                         "/tests/fuzz/regressions/reference-view-beyond-storage.ref"),
                         "(offset 0, sizes [39], strides [91]) reaches outside storage data/2, which holds 39 elements");
  // An empty storage record: its size was read into no buffer (libtorch passes a null one), which
  // BytesReadAdapter::read handed to memcpy (UBSan under fuzz_reference; the file is also in the
  // fuzzer's corpus, so every fuzz run starts with it).
  GRADQ_EXPECT_THROW_MSG(Reference::load(std::string(GRADQ_TEST_SOURCE_DIR) +
                                         "/tests/fuzz/regressions/reference-empty-record-read.ref"),
                         "storage data/2 declares 39 Long elements (312 bytes) but its record holds 0 bytes");
}

// Before: a MARK above the stack's top, an odd count of dict items or a stack too short for the
// opcode made libtorch 1.13's unpickler index or pop its stack out of bounds (Unpickler::readInstruction: DICT from a MARK above the top is a
// SEGV under ASan; an odd count reads one slot past the stack's end).
TEST(Readers, PickleMarksAboveTheStackAndOddDictsAreErrors) {
  auto check = [](const std::string& pickle) {
    check_pickle(reinterpret_cast<const uint8_t*>(pickle.data()), pickle.size(), "p.pkl");
  };
  EXPECT_NO_THROW(check(std::string("\x80\x02(KaKbd.", 8)));
  GRADQ_EXPECT_THROW_MSG(check(std::string("\x80\x02(Kad.", 6)),
                         "p.pkl is corrupt: the pickle opcode 0x64 at byte 5 builds a dict from 1 values");
  // MARK at depth 2; REDUCE pops two and pushes one; TUPLE or DICT then starts above the top (the
  // DICT: a SEGV in the unpickler under ASan).
  GRADQ_EXPECT_THROW_MSG(check("\x80\x02" "ccollections\nOrderedDict\n" ")(Rt."),
                         "builds from a MARK at stack depth 2, above the stack's top (1 values)");
  GRADQ_EXPECT_THROW_MSG(check("\x80\x02" "ccollections\nOrderedDict\n" ")(Rd."),
                         "the pickle opcode 0x64 at byte 30 builds from a MARK at stack depth 2");
  // reference-tuple3-empty-stack.ref (fuzz_reference, 2026-12-02): TUPLE3 on a stack of one value;
  // libtorch 1.13 popped an empty std::vector and freed an address it never allocated (ASan).
  GRADQ_EXPECT_THROW_MSG(Reference::load(std::string(GRADQ_TEST_SOURCE_DIR) +
                                         "/tests/fuzz/regressions/reference-tuple3-empty-stack.ref"),
                         "(record data.pkl) is corrupt: the pickle opcode 0x87 at byte 40 takes 3 values from a stack of 1");
  GRADQ_EXPECT_THROW_MSG(check(std::string("\x80\x02t.", 4)), "takes 0 values and a MARK from a stack of 0 without a MARK");
  GRADQ_EXPECT_THROW_MSG(check(std::string("\x80\x02(]e.", 6)), "adds to a container below its MARK, and there is none");
}

// Before: torchscript-slow.pt (found by fuzz_torchscript; 40 s and past 2.5 GiB under ASan, 2.5 s
// without ASan's quarantine) failed to compile, and libtorch 1.13 then unpickled the source's
// code/__torch__.py.debug_pkl to highlight the error, which declared a 2.27 GB string: the unpickler
// zero-filled it before finding the record too short. gradq checked only records named *.pkl. The
// file's code/__torch__.py has a corrupt deflate stream too, refused first since 2026-12-03 (what
// libtorch compiled there was an uninitialized buffer); the debug pickle's check, on its own:
TEST(Readers, TorchScriptDebugPicklesAreChecked) {
  GRADQ_EXPECT_THROW_MSG(CausalLM::load(std::string(GRADQ_TEST_SOURCE_DIR) +
                                        "/tests/fuzz/regressions/torchscript-debug-pkl-string.pt"),
                         "(record code/__torch__.py) is corrupt: its deflate stream of 234 bytes fails after 0 of the "
                         "465 bytes it declares");
  const std::string long_string("\x80\x02X\x00\x00\x00\xc0" "ab.", 10);
  for (const bool compress : {false, true})
    GRADQ_EXPECT_THROW_MSG(
        check_archive(std::make_shared<BytesReadAdapter>(archive_of({{"code/m.py.debug_pkl", long_string}}, compress)),
                      "m.pt"),
        "'m.pt' (record code/m.py.debug_pkl) is corrupt: the pickle opcode 0x58 at byte 2 declares 3221225472 bytes");
  // torchscript-stray-record-name.pt (fuzz_torchscript, 2026-12-02): a record named outside the
  // archive's folder made listing the records throw, which skipped every check (4 s, then
  // "Unexpected end of pickler archive" from libtorch).
  GRADQ_EXPECT_THROW_MSG(CausalLM::load(std::string(GRADQ_TEST_SOURCE_DIR) +
                                        "/tests/fuzz/regressions/torchscript-stray-record-name.pt"),
                         "is a corrupt archive");
}

// Before: a class body whose statement lacks the field libtorch 1.13's importer reads unchecked
// crashed the load (torchscript-class-constant-without-type.pt, fuzz_torchscript, found 2026-12-01:
// `__pardmeters__ = ["weight", ]` taken for a class constant without its `Final[T]` type; SEGV in
// ScriptTypeParser::parseClassConstant).
TEST(Readers, TorchScriptClassStatementsLibtorchReadsUncheckedAreErrors) {
  GRADQ_EXPECT_THROW_MSG(
      CausalLM::load(std::string(GRADQ_TEST_SOURCE_DIR) +
                     "/tests/fuzz/regressions/torchscript-class-constant-without-type.pt"),
      "(record code/__torch__/___torch_mangle_1.py) is corrupt: line 2 declares '__pardmeters__' in class Block "
      "without a type");
  // torchscript-code-record-4g.pt (fuzz_torchscript, 2026-12-02, on the first version of this check):
  // a code record declaring 4,143,972,630 bytes for 173 compressed ones; the reader hands that many
  // back, and scanning them took 54 s and 8 GB.
  GRADQ_EXPECT_THROW_MSG(
      CausalLM::load(std::string(GRADQ_TEST_SOURCE_DIR) + "/tests/fuzz/regressions/torchscript-code-record-4g.pt"),
      "(record code/__torch__/___torch_mangle_0.py) declares 4143972630 bytes of TorchScript source; gradq reads at "
      "most 67108864");
  // torchscript-unreadable-record-first.pt (fuzz_torchscript, 2026-12-02, the next run): a record the
  // reader cannot read ended the checks unnoticed, and a debug pickle after it, REDUCE on a stack of one,
  // made libtorch free an address it never allocated (ASan). An unreadable record is now an error;
  // skipping it instead let torch::pickle_load read past the end of reference-record-past-end.ref
  // (fuzz_reference, the same day: a heap overflow in libtorch's unchecked reader). Both are refused
  // by the central directory since 2026-12-03, before the reader reads them (libtorch's own error
  // was "PytorchStreamReader failed reading file"); the reader's errors stay errors (below).
  GRADQ_EXPECT_THROW_MSG(
      CausalLM::load(std::string(GRADQ_TEST_SOURCE_DIR) +
                     "/tests/fuzz/regressions/torchscript-unreadable-record-first.pt"),
      "(record code/__torch__/___torch_mangle_0.py.debug.pkl) is corrupt: its deflate stream of 269 bytes ends after "
      "335 of the 336 bytes it declares");
  GRADQ_EXPECT_THROW_MSG(
      Reference::load(std::string(GRADQ_TEST_SOURCE_DIR) + "/tests/fuzz/regressions/reference-record-past-end.ref"),
      "(record data.pkl) is corrupt: it declares 3000003 bytes, more than the 2932 bytes it stores");
  {
    // A stored record whose local header names a 65535-byte extra field: its bytes start past the
    // archive's end, which only the reader finds.
    const std::vector<char> pickle = torch::jit::pickle(c10::IValue(int64_t{1}));
    std::string bytes = archive_of({{"data.pkl", std::string(pickle.begin(), pickle.end())}});
    bytes[28] = bytes[29] = '\xff';
    GRADQ_EXPECT_THROW_MSG(check_archive(std::make_shared<BytesReadAdapter>(bytes), "d.ref"),
                           "'d.ref' (record data.pkl) is corrupt: PytorchStreamReader failed reading file data.pkl");
  }
  auto check = [](const std::string& code) { check_torchscript_source(code, "m.py"); };
  // As torch.jit.save writes a module, with what the scan must see through: strings holding = and :,
  // a comment, a list across lines, assignments inside methods, a decorator, a constant with its type.
  const std::string module =
      "class M(Module):\n"
      "  __parameters__ = [\"w = 1\", # a comment\n"
      "    \"b:c\", ]\n"
      "  __buffers__ = []\n"
      "  __annotations__[\"0\"] = Tensor\n"
      "  w : Tensor\n"
      "  K : Final[int] = 3\n"
      "  @torch.jit.export\n"
      "  def forward(self: __torch__.M,\n"
      "    x: Tensor) -> Tensor:\n"
      "    y = torch.relu(x)\n"
      "    return y\n"
      "class T(NamedTuple):\n"
      "  a : int\n"
      "class E(Enum):\n"
      "  A = \"a\"\n"
      "def free(x: int) -> int:\n"
      "  z = x\n"
      "  return z\n";
  EXPECT_NO_THROW(check(module));
  EXPECT_NO_THROW(check("class I(Interface):\n  x = 1\n"));  // libtorch throws: interfaces hold methods only
  GRADQ_EXPECT_THROW_MSG(check("class M(Module):\n  w : Tensor\n  K = 3\n"),
                         "m.py is corrupt: line 3 declares 'K' in class M without a type");
  GRADQ_EXPECT_THROW_MSG(check("class M:\n  w : Tensor; K = 3\n"), "line 2 declares 'K' in class M without a type");
  GRADQ_EXPECT_THROW_MSG(check("class M(Module):\n  __parameters__ : List[str]\n"),
                         "declares '__parameters__' in class M without a value");
  GRADQ_EXPECT_THROW_MSG(check("class M(Module):\n  __annotations__[\"0\"] : Tensor\n"),
                         "declares '__annotations__[\"\"]' in class M without a value");
  GRADQ_EXPECT_THROW_MSG(check("class T(NamedTuple):\n  a = 1\n"), "declares 'a' in class T without a type");
  GRADQ_EXPECT_THROW_MSG(check("class E(Enum):\n  A : int\n"), "declares 'A' in class E without a value");
  GRADQ_EXPECT_THROW_MSG(check("class E(Enum):\n  \"\"\"a\n  B : int\"\"\"\n  C : int\n"), "line 4 declares 'C'");
}

// Before: libtorch 1.13's reader of a code record's debug information (read when a compile error
// highlights its source) indexes its text table and tuples unchecked: torchscript-debug-text-index.pt
// (fuzz_torchscript, 2026-12-02) names file 116 of a table of 4, a SEGV copying that string.
TEST(Readers, TorchScriptDebugInformationIsCheckedForSizesAndIndices) {
  GRADQ_EXPECT_THROW_MSG(
      CausalLM::load(std::string(GRADQ_TEST_SOURCE_DIR) + "/tests/fuzz/regressions/torchscript-debug-text-index.pt"),
      "(record code/__torch__/___torch_mangle_1.py.debug_pkl) is corrupt: a file name index is 116, outside its text "
      "table of 4");
  using c10::IValue;
  using c10::ivalue::Tuple;
  // (FORMAT_WITH_STRING_TABLE, texts, rows), a row (byte offset, range, tag), a range (source, start, end), a
  // source (text indices, file name index, first line), as torch.jit.save writes them.
  auto debug_info = [](std::vector<int64_t> text_indices, int64_t file_index, size_t row_size) {
    const IValue source = Tuple::create({IValue(c10::List<int64_t>(text_indices)), IValue(file_index), IValue(1)});
    const IValue range = Tuple::create({source, IValue(0), IValue(4)});
    std::vector<IValue> row{IValue(0), range, IValue(-1)};
    row.resize(row_size);
    const IValue texts = Tuple::create({IValue(std::string("")), IValue(std::string("def f(x):")), IValue(std::string("m.py"))});
    return Tuple::create({IValue(std::string("FORMAT_WITH_STRING_TABLE")), texts, Tuple::create({Tuple::create(row)})});
  };
  auto check = [](const IValue& value) {
    const std::vector<char> pickle = torch::jit::pickle(value);
    const std::string bytes = archive_of({{"code/m.py.debug_pkl", std::string(pickle.begin(), pickle.end())}});
    check_archive(std::make_shared<BytesReadAdapter>(bytes), "m.pt");
  };
  EXPECT_NO_THROW(check(debug_info({1}, 2, 3)));
  GRADQ_EXPECT_THROW_MSG(check(debug_info({1, 3}, 2, 3)),
                         "'m.pt' (record code/m.py.debug_pkl) is corrupt: a text index is 3, outside its text table of 3");
  GRADQ_EXPECT_THROW_MSG(check(debug_info({-1}, 2, 3)), "a text index is -1");
  GRADQ_EXPECT_THROW_MSG(check(debug_info({1}, 3, 3)), "a file name index is 3");
  GRADQ_EXPECT_THROW_MSG(check(debug_info({1}, 2, 1)), "its row has 1 elements, expected at least 2");
  GRADQ_EXPECT_THROW_MSG(check(Tuple::create({IValue(std::string("FORMAT_WITH_STRING_TABLE"))})),
                         "its debug information has 1 elements, expected 3");
}

// Before: torchscript-unknown-quantizer.pt (fuzz_torchscript, 2026-12-03) holds a quantized embedding
// whose quantizer libtorch cannot name; the probe forward failed inside torch.embedding, and the
// interpreter's std::runtime_error left the library (the fuzzer: std::terminate).
TEST(Readers, TorchScriptWhoseForwardFailsInsideAnOperatorIsAnError) {
  GRADQ_EXPECT_THROW_MSG(
      CausalLM::load(std::string(GRADQ_TEST_SOURCE_DIR) + "/tests/fuzz/regressions/torchscript-unknown-quantizer.pt"),
      "the module's forward fails on int64 tokens [1, 2]: RuntimeError: false INTERNAL ASSERT FAILED");
}

// Before: the walk's model kept every tuple, so a pickle of a million TUPLE1s nested a million deep
// and destroying it overflowed the stack (gradq's own code, 8bac950 to e197dfa; found by a crafted
// archive, `gradq eval --load-reference`: SEGV). Deeper tuples are now kept as unknown values, and the
// walk itself never recurses (this pickle is refused for its nesting, below).
TEST(Readers, DeeplyNestedPickleTuplesAreWalkedWithoutRecursion) {
  const std::string pickle = std::string("\x80\x02N", 3) + std::string(1000000, '\x85') + ".";
  GRADQ_EXPECT_THROW_MSG(check_pickle(reinterpret_cast<const uint8_t*>(pickle.data()), pickle.size(), "p.pkl"),
                         "p.pkl is corrupt: its containers nest more than 1000 deep");
}

// Before: a million nested lists or one-element tuples (reference-deep-list.ref, reference-deep-tuple.ref,
// crafted) passed the check, and libtorch 1.13 overflowed its stack releasing them (SEGV in `gradq eval
// --load-reference`). Lists change after they are made, also through the memo after another container
// took them, so the depth is measured on which container holds which once the walk ends.
TEST(Readers, PicklesNestingDeeperThanAThousandAreErrors) {
  auto check = [](const std::string& pickle) {
    check_pickle(reinterpret_cast<const uint8_t*>(pickle.data()), pickle.size(), "p.pkl");
  };
  auto index = [](uint32_t k) { return std::string(reinterpret_cast<const char*>(&k), 4); };  // little-endian
  // n empty lists, each stored in the memo, then list k appended into list k - 1 through the memo:
  // no list holds another when it is made, yet list 0 ends n deep.
  auto chain = [&](uint32_t n) {
    std::string p("\x80\x02", 2);
    for (uint32_t k = 0; k < n; ++k) p += "]r" + index(k);
    for (uint32_t k = 1; k < n; ++k) p += "j" + index(k - 1) + "(j" + index(k) + "e";
    return p + ".";
  };
  EXPECT_NO_THROW(check(chain(1000)));
  GRADQ_EXPECT_THROW_MSG(check(chain(1001)), "p.pkl is corrupt: its containers nest more than 1000 deep");
  // The same through SETITEM into dicts, and through an object's state (BUILD).
  std::string dicts("\x80\x02", 2);
  for (uint32_t k = 0; k < 1001; ++k) dicts += "}r" + index(k);
  for (uint32_t k = 1; k < 1001; ++k) dicts += "j" + index(k - 1) + "Nj" + index(k) + "s";
  GRADQ_EXPECT_THROW_MSG(check(dicts + "."), "nest more than 1000 deep");
  std::string objects("\x80\x02", 2);
  for (int k = 0; k < 1001; ++k) objects += "c__torch__\nM\n)\x81";
  objects += "N";
  for (int k = 0; k < 1001; ++k) objects += "b";
  GRADQ_EXPECT_THROW_MSG(check(objects + "."), "nest more than 1000 deep");
  // A list holding itself: no longest chain, and no torch writer makes one.
  GRADQ_EXPECT_THROW_MSG(check(std::string("\x80\x02]q\x00(h\x00" "e.", 10)),
                         "p.pkl is corrupt: a container holds itself");
  // After an opcode the walk does not model, it bounds the depth by the containers made.
  EXPECT_NO_THROW(check(std::string("\x80\x02" "a") + std::string(1000, ']') + "."));
  GRADQ_EXPECT_THROW_MSG(check(std::string("\x80\x02" "a") + std::string(1001, ']') + "."),
                         "p.pkl cannot be checked: it makes up to 1001 containers, some after an opcode the walk does not follow");
  // Container ids are int32: a pickle of 2 GiB or more is refused before the walk reads a byte of it.
  const std::string tiny("\x80\x02.", 3);
  GRADQ_EXPECT_THROW_MSG(check_pickle(reinterpret_cast<const uint8_t*>(tiny.data()), size_t{1} << 31, "p.pkl"),
                         "p.pkl is a pickle of 2147483648 bytes, more than the 2 GiB gradq reads");
  // TorchScript archives: torch::jit::load unpickles data.pkl with the same unpickler.
  std::istringstream model(archive_of({{"data.pkl", chain(1001)}}));
  GRADQ_EXPECT_THROW_MSG(CausalLM::load(model, "m.pt"), "(record data.pkl) is corrupt: its containers nest more than");
  for (const char* file : {"reference-deep-list.ref", "reference-deep-tuple.ref"})
    GRADQ_EXPECT_THROW_MSG(Reference::load(std::string(GRADQ_TEST_SOURCE_DIR) + "/tests/fuzz/regressions/" + file),
                           "(record data.pkl) is corrupt: its containers nest more than 1000 deep");
}

// Before: nlohmann's get<int>() cast a float unchecked (undefined behaviour beyond int's range: fuzz_plan
// under UBSan, a plan version of 5.6e49) and wrapped an integer beyond it (4294967297 read as version 1).
TEST(Readers, IntegerFieldsThatAreFloatsOrOutOfRangeAreErrors) {
  auto plan = [](const std::string& version) {
    return Plan::from_json(R"({"format": "gradq-plan", "version": )" + version + R"(, "weights": []})");
  };
  EXPECT_NO_THROW(plan("1"));
  GRADQ_EXPECT_THROW_MSG(plan("5.5e49"), "'version' must be an integer in [-2147483648, 2147483647], got 5.5e+49");
  GRADQ_EXPECT_THROW_MSG(plan("4294967297"), "'version' must be an integer in [-2147483648, 2147483647], got 4294967297");
  GRADQ_EXPECT_THROW_MSG(plan("1.0"), "'version' must be an integer");
  GRADQ_EXPECT_THROW_MSG(analysis_from_json(R"({"format": "gradq-importance-analysis", "version": -1e300})"),
                         "'version' must be an integer");
}

}  // namespace
}  // namespace gradq
