// Data pipeline: text validation, the calibration/evaluation split and the window semantics of
// csrc/data/dataset.h, on hand-written streams and on the real TinyStories text.

#include <gtest/gtest.h>

#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "common/error.h"
#include "data/dataset.h"
#include "support/test_helpers.h"
#include "support/test_support.h"
#include "tokenizer/tokenizer.h"

namespace gradq {
using test::expect_error;

namespace {

void expect_contains(const std::string& haystack, const std::string& needle) {
  EXPECT_NE(haystack.find(needle), std::string::npos) << "'" << needle << "' not in: " << haystack;
}

std::vector<int64_t> iota_stream(int64_t n, int64_t first = 10) {
  std::vector<int64_t> t(n);
  for (int64_t i = 0; i < n; ++i) t[i] = first + i;
  return t;
}

std::vector<int64_t> row(const at::Tensor& t, int64_t i) {
  at::Tensor r = t[i].contiguous();
  return std::vector<int64_t>(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + r.numel());
}

std::vector<int64_t> to_vector(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

using Rows = std::vector<std::vector<int64_t>>;

// ---- read_text_file ----------------------------------------------------------------------------

class TextFile : public ::testing::Test {
 protected:
  std::string write(const std::string& name, const std::string& bytes) {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }
  std::string dir_ = test::temp_dir("dataset_text");
};

TEST_F(TextFile, ReadsRealTinyStories) {
  const std::string text = read_text_file(test::tinystories_text());
  EXPECT_EQ(text.size(), 794375u);  // SOURCES.md
  expect_contains(text, "Once upon a time");
}

TEST_F(TextFile, KeepsValidMultibyteUtf8) {
  const std::string body = "Caf\xc3\xa9 \xe6\x97\xa5 \xf0\x9f\x99\x82 end\n";
  EXPECT_EQ(read_text_file(write("ok.txt", body)), body);
}

TEST_F(TextFile, StripsUtf8ByteOrderMark) {
  EXPECT_EQ(read_text_file(write("bom.txt", "\xef\xbb\xbfHello")), "Hello");
}

TEST_F(TextFile, MissingFileNamesThePath) {
  const std::string path = dir_ + "/missing.txt";
  const std::string msg = expect_error([&] { read_text_file(path); });
  expect_contains(msg, path);
  expect_contains(msg, "does not exist");
}

TEST_F(TextFile, DirectoryIsRejected) {
  expect_contains(expect_error([&] { read_text_file(dir_); }), "not a regular file");
}

TEST_F(TextFile, EmptyFileIsRejected) {
  const std::string path = write("empty.txt", "");
  const std::string msg = expect_error([&] { read_text_file(path); });
  expect_contains(msg, path);
  expect_contains(msg, "empty");
}

TEST_F(TextFile, WhitespaceOnlyFileIsRejected) {
  const std::string path = write("blank.txt", " \n\t\r\n  \n");
  const std::string msg = expect_error([&] { read_text_file(path); });
  expect_contains(msg, path);
  expect_contains(msg, "only whitespace");
}

TEST_F(TextFile, NulByteIsBinaryWithOffset) {
  const std::string path = write("nul.txt", std::string("hello\0world", 11));
  const std::string msg = expect_error([&] { read_text_file(path); });
  expect_contains(msg, path);
  expect_contains(msg, "NUL byte at byte offset 5");
}

TEST_F(TextFile, InvalidUtf8ReportsByteOffset) {
  const std::map<std::string, std::pair<std::string, int>> cases = {
      {"lone_continuation", {"abc\x80xyz", 3}},
      {"invalid_lead", {"ab\xffz", 2}},
      {"overlong_slash", {"a\xc0\xaf", 1}},
      {"overlong_3byte", {"ok \xe0\x80\xaf", 3}},
      {"surrogate", {"\xed\xa0\x80x", 0}},
      {"above_max", {"1234\xf4\x90\x80\x80", 4}},
      {"truncated_at_end", {"Lily\xe2\x82", 4}},
      {"bad_continuation", {"\xc3\xa9\xc3(", 2}},
  };
  for (const auto& [name, c] : cases) {
    const std::string path = write(name + ".txt", c.first);
    const std::string msg = expect_error([&] { read_text_file(path); });
    expect_contains(msg, "not valid UTF-8");
    expect_contains(msg, "byte offset " + std::to_string(c.second));
  }
}

// ---- split_tokens ------------------------------------------------------------------------------

// ---- token ids from the user's own tokenizer (--tokens) -----------------------------------------

void fails_with(const std::function<void()>& fn, const std::string& message_part) {
  expect_contains(expect_error(fn), message_part);
}

TEST(TokenIds, WhitespaceCommasAndAJsonList) {
  const std::vector<int64_t> want = {1, 0, 345, 2147483647};
  for (const char* text : {"1 0 345 2147483647", "1\n0\t345\r\n2147483647\n", "[1, 0, 345, 2147483647]",
                           "  [1,0,345,2147483647]\n", "1,0,,345, 2147483647,"}) {
    EXPECT_EQ(parse_token_ids(text, "token file 'ids.txt'"), want) << text;
  }
}

TEST(TokenIds, AnythingElseNamesTheFileAndTheByte) {
  const std::string prefix = "token file 'ids.txt': ";
  const std::string expected = "expected non-negative integer token ids separated by whitespace or commas, got ";
  fails_with([] { parse_token_ids("1 -2 3", "token file 'ids.txt'"); }, prefix + expected + "'-2' at byte offset 2");
  fails_with([] { parse_token_ids("1 2x 3", "token file 'ids.txt'"); }, prefix + expected + "'2x' at byte offset 2");
  fails_with([] { parse_token_ids("1.5", "token file 'ids.txt'"); }, prefix + expected + "'1.5' at byte offset 0");
  fails_with([] { parse_token_ids("[[1, 2]]", "token file 'ids.txt'"); }, prefix + expected + "'[1' at byte offset 1");
  fails_with([] { parse_token_ids(std::string("7 \x01\xff\0", 5), "token file 'ids.txt'"); },
               prefix + expected + "'???' at byte offset 2");
  fails_with([] { parse_token_ids("[1, 2", "token file 'ids.txt'"); }, "a list that opens with '[' at byte offset 0 must end with ']'");
  fails_with([] { parse_token_ids("2147483648", "token file 'ids.txt'"); }, "the id at byte offset 0 is 2^31 or more");
  fails_with([] { parse_token_ids("99999999999999999999999", "token file 'ids.txt'"); }, "2^31 or more");
  for (const char* empty : {"", " \n ", "[]", ",,,"})
    fails_with([&] { parse_token_ids(empty, "token file 'ids.txt'"); }, "token file 'ids.txt' holds no token ids");
  fails_with([] { read_token_file("/nonexistent/ids.txt"); }, "token file '/nonexistent/ids.txt' does not exist");
}

TEST(TokenIds, MustFitTheModel) {
  check_token_ids_fit_model({0, 511, 3}, 1, 512);
  check_token_ids_fit_model({0, 511, 3}, -1, 512);
  fails_with([] { check_token_ids_fit_model({0, 512, 3}, 1, 512); },
               "token id 512 (token 1 of 3) is not a token of the model: expected ids below its vocabulary (512)");
  fails_with([] { check_token_ids_fit_model({0, 1}, 512, 512); },
               "--bos-id 512 is not a token of the model: expected an id below its vocabulary (512)");
}

TEST(Split, NeverOverlapsAndCoversEverything) {
  for (int64_t n : {2, 3, 7, 100, 1001}) {
    for (double f : {0.1, 0.5, 0.9}) {
      const std::vector<int64_t> tokens = iota_stream(n);
      const int64_t cut = std::llround(f * static_cast<double>(n));
      if (cut <= 0 || cut >= n) continue;
      const TokenSplit s = split_tokens(tokens, f);
      EXPECT_EQ(static_cast<int64_t>(s.calibration.size()), cut) << "n " << n << " f " << f;
      std::vector<int64_t> joined = s.calibration;
      joined.insert(joined.end(), s.evaluation.begin(), s.evaluation.end());
      EXPECT_EQ(joined, tokens);  // distinct values: equal sequences mean disjoint and complete
    }
  }
}

TEST(Split, ExactCutPoints) {
  EXPECT_EQ(split_tokens(iota_stream(100), 0.3).calibration.size(), 30u);
  EXPECT_EQ(split_tokens(iota_stream(7), 0.5).calibration.size(), 4u);  // round(3.5)
  EXPECT_EQ(split_tokens(iota_stream(10), 0.9).evaluation.size(), 1u);
}

TEST(Split, RejectsBadFractionsAndEmptySides) {
  expect_contains(expect_error([] { split_tokens(iota_stream(10), 0.0); }), "(0, 1)");
  expect_contains(expect_error([] { split_tokens(iota_stream(10), 1.0); }), "got 1");
  expect_contains(expect_error([] { split_tokens(iota_stream(10), -0.5); }), "got -0.5");
  expect_contains(expect_error([] { split_tokens(iota_stream(10), 0.99); }), "empty evaluation");
  expect_contains(expect_error([] { split_tokens(iota_stream(10), 0.01); }), "empty calibration");
  expect_error([] { split_tokens({}, 0.5); });
}

// ---- make_windows: exact contents --------------------------------------------------------------

TEST(Windows, ExactWithBos) {
  const Windows w = make_windows(iota_stream(10), {/*ctx=*/4, /*stride=*/4, /*bos_id=*/1, 0});
  ASSERT_EQ(w.size(), 3);
  EXPECT_EQ(w.inputs.sizes().vec(), (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(w.inputs.scalar_type(), at::kLong);
  const Rows in = {row(w.inputs, 0), row(w.inputs, 1), row(w.inputs, 2)};
  const Rows tg = {row(w.targets, 0), row(w.targets, 1), row(w.targets, 2)};
  EXPECT_EQ(in, (Rows{{1, 10, 11, 12}, {1, 14, 15, 16}, {1, 16, 17, 18}}));
  EXPECT_EQ(tg, (Rows{{10, 11, 12, 13}, {14, 15, 16, 17}, {16, 17, 18, 19}}));
  // The last window is aligned to the end; its first two targets were scored by window 1.
  EXPECT_EQ(to_vector(w.score_from), (std::vector<int64_t>{0, 0, 2}));
  EXPECT_EQ(w.scored_tokens(), 10);
}

TEST(Windows, ExactWithoutBos) {
  const Windows w = make_windows(iota_stream(10), {4, 4, -1, 0});
  ASSERT_EQ(w.size(), 3);
  const Rows in = {row(w.inputs, 0), row(w.inputs, 1), row(w.inputs, 2)};
  const Rows tg = {row(w.targets, 0), row(w.targets, 1), row(w.targets, 2)};
  EXPECT_EQ(in, (Rows{{10, 11, 12, 13}, {14, 15, 16, 17}, {15, 16, 17, 18}}));
  EXPECT_EQ(tg, (Rows{{11, 12, 13, 14}, {15, 16, 17, 18}, {16, 17, 18, 19}}));
  EXPECT_EQ(to_vector(w.score_from), (std::vector<int64_t>{0, 0, 3}));
  EXPECT_EQ(w.scored_tokens(), 9);  // t[0] is never a target without BOS
}

TEST(Windows, ExactOverlappingStride) {
  const Windows w = make_windows(iota_stream(10), {4, 2, 1, 0});
  ASSERT_EQ(w.size(), 4);  // starts 0, 2, 4, 6; the last already ends at the stream's end
  EXPECT_EQ(row(w.inputs, 1), (std::vector<int64_t>{1, 12, 13, 14}));
  EXPECT_EQ(row(w.targets, 3), (std::vector<int64_t>{16, 17, 18, 19}));
  EXPECT_EQ(to_vector(w.score_from), (std::vector<int64_t>{0, 2, 2, 2}));
  EXPECT_EQ(w.scored_tokens(), 10);
}

// ---- make_windows: invariants over many shapes -------------------------------------------------

struct WindowCase {
  int64_t n, ctx, stride;
  bool bos;
};

std::string case_name(const ::testing::TestParamInfo<WindowCase>& info) {
  const WindowCase& c = info.param;
  return "n" + std::to_string(c.n) + "_ctx" + std::to_string(c.ctx) + "_s" + std::to_string(c.stride) +
         (c.bos ? "_bos" : "_nobos");
}

class WindowInvariants : public ::testing::TestWithParam<WindowCase> {};

TEST_P(WindowInvariants, EveryTokenScoredOnceAndInputsShiftTargets) {
  const WindowCase c = GetParam();
  const int64_t bos = 1;
  const std::vector<int64_t> tokens = iota_stream(c.n, 100);  // distinct, never equal to BOS
  const Windows w = make_windows(tokens, {c.ctx, c.stride, c.bos ? bos : -1, 0});
  ASSERT_GE(w.size(), 1);
  EXPECT_EQ(w.inputs.sizes().vec(), (std::vector<int64_t>{w.size(), c.ctx}));
  EXPECT_EQ(w.targets.sizes().vec(), (std::vector<int64_t>{w.size(), c.ctx}));
  EXPECT_EQ(w.score_from.sizes().vec(), (std::vector<int64_t>{w.size()}));

  std::map<int64_t, int> scored;  // stream token value -> times scored
  for (int64_t i = 0; i < w.size(); ++i) {
    const std::vector<int64_t> in = row(w.inputs, i), tg = row(w.targets, i);
    const int64_t from = w.score_from[i].item<int64_t>();
    ASSERT_GE(from, 0);
    ASSERT_LT(from, c.ctx);
    // Targets are consecutive stream tokens; each input is the token before its target.
    for (int64_t j = 0; j < c.ctx; ++j) {
      if (j > 0) {
        EXPECT_EQ(tg[j], tg[j - 1] + 1);
      }
      EXPECT_EQ(in[j], (c.bos && j == 0) ? bos : tg[j] - 1);
    }
    if (i > 0) {
      if (i + 1 < w.size()) {
        EXPECT_EQ(tg[0] - row(w.targets, i - 1)[0], c.stride) << "window " << i;
      }
      EXPECT_GT(tg[0], row(w.targets, i - 1)[0]);
    }
    for (int64_t j = from; j < c.ctx; ++j) ++scored[tg[j]];
  }
  // Every possible target scored exactly once: t[0..n) with BOS, t[1..n) without.
  const int64_t first = c.bos ? 0 : 1;
  EXPECT_EQ(w.scored_tokens(), c.n - first);
  EXPECT_EQ(static_cast<int64_t>(scored.size()), c.n - first);
  for (int64_t k = first; k < c.n; ++k) EXPECT_EQ(scored[tokens[k]], 1) << "token index " << k;
  // The last window ends at the end of the stream.
  EXPECT_EQ(row(w.targets, w.size() - 1).back(), tokens.back());
}

INSTANTIATE_TEST_SUITE_P(Shapes, WindowInvariants,
                         ::testing::Values(WindowCase{10, 4, 4, true}, WindowCase{10, 4, 4, false},
                                           WindowCase{10, 4, 3, true}, WindowCase{10, 4, 1, true},
                                           WindowCase{10, 4, 1, false}, WindowCase{4, 4, 4, true},
                                           WindowCase{5, 4, 4, false}, WindowCase{4, 4, 1, true},
                                           WindowCase{5, 4, 2, false}, WindowCase{17, 7, 3, true},
                                           WindowCase{172, 32, 32, false}, WindowCase{172, 32, 13, true},
                                           WindowCase{1000, 256, 128, true}, WindowCase{257, 256, 256, true},
                                           WindowCase{258, 256, 200, false}, WindowCase{3, 2, 1, false}),
                         case_name);

TEST(Windows, CtxEqualToStreamIsOneWindow) {
  const Windows with_bos = make_windows(iota_stream(8), {8, 8, 1, 0});
  ASSERT_EQ(with_bos.size(), 1);
  EXPECT_EQ(with_bos.scored_tokens(), 8);
  const Windows without = make_windows(iota_stream(9), {8, 3, -1, 0});
  ASSERT_EQ(without.size(), 1);
  EXPECT_EQ(row(without.inputs, 0), iota_stream(8));
  EXPECT_EQ(row(without.targets, 0), iota_stream(8, 11));
}

TEST(Windows, StrideOneSlidesByOne) {
  const Windows w = make_windows(iota_stream(6), {3, 1, 1, 0});
  ASSERT_EQ(w.size(), 4);
  EXPECT_EQ(to_vector(w.score_from), (std::vector<int64_t>{0, 2, 2, 2}));
  EXPECT_EQ(row(w.inputs, 3), (std::vector<int64_t>{1, 13, 14}));
  EXPECT_EQ(row(w.targets, 3), (std::vector<int64_t>{13, 14, 15}));
}

TEST(Windows, TooFewTokensSaysHowManyAreNeeded) {
  std::string msg = expect_error([] { make_windows(iota_stream(7), {8, 8, 1, 0}); });
  expect_contains(msg, "expected at least 8");
  expect_contains(msg, "got 7");
  msg = expect_error([] { make_windows(iota_stream(8), {8, 8, -1, 0}); });
  expect_contains(msg, "expected at least 9");
  expect_contains(msg, "without BOS");
  expect_contains(msg, "got 8");
  expect_contains(expect_error([] { make_windows({}, {8, 8, 1, 0}); }), "got 0");
}

TEST(Windows, RejectsBadCtxAndStride) {
  expect_contains(expect_error([] { make_windows(iota_stream(10), {1, 1, 1, 0}); }), "ctx >= 2, got 1");
  expect_contains(expect_error([] { make_windows(iota_stream(10), {4, 0, 1, 0}); }), "got 0");
  expect_contains(expect_error([] { make_windows(iota_stream(10), {4, 5, 1, 0}); }), "[1, ctx = 4], got 5");
  expect_error([] { make_windows(iota_stream(10), {4, 4, 1, -1}); });
}

TEST(Windows, MaxWindowsKeepsTheFirst) {
  const std::vector<int64_t> tokens = iota_stream(100);
  const Windows all = make_windows(tokens, {8, 4, 1, 0});
  const Windows two = make_windows(tokens, {8, 4, 1, 2});
  ASSERT_EQ(two.size(), 2);
  ASSERT_GT(all.size(), 2);
  EXPECT_TRUE(at::equal(two.inputs, all.inputs.slice(0, 0, 2)));
  EXPECT_TRUE(at::equal(two.targets, all.targets.slice(0, 0, 2)));
  EXPECT_EQ(two.scored_tokens(), 8 + 4);
  EXPECT_EQ(make_windows(tokens, {8, 4, 1, 1000}).size(), all.size());
}

TEST(Windows, SliceIsAViewOfARange) {
  const Windows w = make_windows(iota_stream(40), {8, 8, 1, 0});
  ASSERT_EQ(w.size(), 5);
  const Windows s = w.slice(1, 3);
  ASSERT_EQ(s.size(), 2);
  EXPECT_TRUE(at::equal(s.targets, w.targets.slice(0, 1, 3)));
  EXPECT_EQ(s.scored_tokens(), 16);
  EXPECT_EQ(w.slice(2, 2).size(), 0);
  EXPECT_EQ(w.slice(2, 2).scored_tokens(), 0);
  expect_error([&] { w.slice(3, 6); });
  expect_error([&] { w.slice(3, 2); });
  EXPECT_EQ(Windows{}.size(), 0);
  EXPECT_EQ(Windows{}.scored_tokens(), 0);
}

// ---- fit windows -------------------------------------------------------------------------------

// Stream values of every target in `w`.
std::set<int64_t> targets_of(const Windows& w) {
  const at::Tensor t = w.targets.contiguous();
  return {t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel()};
}

TEST(DataSplit, FitWindowsFollowTheCalibrationWindowsWithoutSharingATarget) {
  // 1000 distinct tokens 10..1009: the calibration part is 10..509.
  for (const int64_t bos : {int64_t{1}, int64_t{-1}}) {
    SCOPED_TRACE(bos >= 0 ? "with BOS" : "without BOS");
    DataOptions o;
    o.calib_fraction = 0.5;
    o.ctx = 16;
    o.calib_windows = 4;
    o.eval_windows = 2;
    o.fit_windows = 3;
    const DataSplit d = make_data_split(iota_stream(1000), bos, o);
    ASSERT_EQ(d.fit.size(), 3);
    ASSERT_EQ(d.calibration.size(), 4);
    const std::set<int64_t> calibration = targets_of(d.calibration), fit = targets_of(d.fit);
    EXPECT_EQ(fit.size(), 48u);  // strided: every fit window scores new tokens
    for (int64_t t : fit) EXPECT_EQ(calibration.count(t), 0u) << "target " << t << " is also a calibration target";
    // The first fit target is the token after the last calibration target, and all are in the
    // calibration part.
    EXPECT_EQ(*fit.begin(), *calibration.rbegin() + 1);
    EXPECT_LT(*fit.rbegin(), 510);
  }
}

TEST(DataSplit, FitWindowsTakeWhatTheCalibrationPartHolds) {
  DataOptions o;
  o.calib_fraction = 0.5;
  o.ctx = 16;
  o.calib_windows = 4;
  o.fit_windows = 100;
  const DataSplit d = make_data_split(iota_stream(1000), 1, o);
  // 500 - 64 = 436 tokens left: 27 strided windows and one aligned to the end.
  EXPECT_EQ(d.fit.size(), 28);
  EXPECT_EQ(*targets_of(d.fit).rbegin(), 509);
  o.fit_windows = 0;
  EXPECT_EQ(make_data_split(iota_stream(1000), 1, o).fit.size(), 0);
}

TEST(DataSplit, FitWindowsWithoutTextLeftAreRefused) {
  DataOptions o;
  o.calib_fraction = 0.5;
  o.ctx = 16;
  o.calib_windows = 0;  // all of the calibration part
  o.fit_windows = 2;
  const std::string msg = expect_error([&] { make_data_split(iota_stream(1000), 1, o); });
  expect_contains(msg, "no text left for fit windows");
  expect_contains(msg, "500 tokens");
  expect_contains(msg, "0 fit windows");
  o.calib_windows = 31;  // 496 of 500 tokens: 4 left, a window needs 16
  expect_contains(expect_error([&] { make_data_split(iota_stream(1000), 1, o); }), "at least 16 more");
  o.fit_windows = -1;
  o.calib_windows = 4;
  expect_contains(expect_error([&] { make_data_split(iota_stream(1000), 1, o); }), "got -1");
}

// ---- vocabulary check and the real pipeline ----------------------------------------------------

TEST(Vocabulary, TokenizerMustFitModel) {
  check_tokenizer_fits_model(512, 512);
  check_tokenizer_fits_model(512, 1024);  // padded model vocabularies are common
  const std::string msg = expect_error([] { check_tokenizer_fits_model(32000, 512); });
  expect_contains(msg, "32000");
  expect_contains(msg, "512");
  expect_error([] { check_tokenizer_fits_model(0, 512); });
}

TEST(Pipeline, TinyStoriesSplitsIntoCalibrationAndEvaluationWindows) {
  const auto tok = Tokenizer::load_sentencepiece(test::tokenizer_model());
  const std::vector<int64_t> tokens = tok->encode(read_text_file(test::tinystories_text()));
  const TokenSplit split = split_tokens(tokens, 0.5);
  EXPECT_EQ(split.calibration.size() + split.evaluation.size(), tokens.size());
  for (const auto* part : {&split.calibration, &split.evaluation}) {
    const Windows w = make_windows(*part, {256, 128, tok->bos_id(), 0});
    EXPECT_EQ(w.scored_tokens(), static_cast<int64_t>(part->size()));
    EXPECT_EQ(w.inputs.select(1, 0).eq(1).all().item<bool>(), true);
    EXPECT_LT(w.targets.max().item<int64_t>(), tok->vocab_size());
    EXPECT_GE(w.targets.min().item<int64_t>(), 3);
  }
  check_tokenizer_fits_model(tok->vocab_size(), 512);
}

}  // namespace
}  // namespace gradq
