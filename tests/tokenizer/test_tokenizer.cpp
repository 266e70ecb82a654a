// Tokenizer: the real stories260K SentencePiece model (third_party/assets/SOURCES.md facts) loaded
// through the dlopen()ed shim, in the same process as libtorch.

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/files.h"
#include "support/test_helpers.h"
#include "support/test_support.h"
#include "tokenizer/tokenizer.h"

namespace gradq {
using test::expect_error;

namespace {

const Tokenizer& tok512() {
  static const std::unique_ptr<Tokenizer> tok = Tokenizer::load_sentencepiece(test::tokenizer_model());
  return *tok;
}

/// The first story of the TinyStories text: everything up to the first blank line.
std::string first_story() {
  const std::string text = read_file(test::tinystories_text());
  const size_t end = text.find("\n\n");
  return text.substr(0, end);
}

TEST(Tokenizer, VocabularyFactsOfTok512) {
  EXPECT_EQ(tok512().vocab_size(), 512);
  EXPECT_EQ(tok512().bos_id(), 1);
  EXPECT_EQ(tok512().eos_id(), 2);
}

TEST(Tokenizer, GoldenStartRoundTrips) {
  const std::string golden = "Once upon a time, there was a little girl named Lily.";
  const std::vector<int64_t> ids = tok512().encode(golden);
  ASSERT_FALSE(ids.empty());
  // Merged pieces, not bytes: far fewer ids than characters.
  EXPECT_LT(ids.size(), golden.size() / 2);
  for (int64_t id : ids) {
    EXPECT_GE(id, 3) << "no control or unknown tokens in plain English";
    EXPECT_LT(id, 512);
  }
  EXPECT_EQ(tok512().decode(ids), golden);
}

TEST(Tokenizer, FirstStoryRoundTrips) {
  const std::string story = first_story();
  ASSERT_GT(story.size(), 100u);
  const std::vector<int64_t> ids = tok512().encode(story);
  ASSERT_GT(ids.size(), 20u);
  EXPECT_EQ(tok512().decode(ids), story);
}

/// What tok512's normalizer does to text: it was trained with remove_extra_whitespaces, so runs of
/// spaces collapse to one and spaces at the start and end of the input are dropped. Newlines and
/// every other character pass through (identity normalization, byte fallback).
std::string normalize_spaces(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == ' ' && (out.empty() || out.back() == ' ')) continue;
    out += c;
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

TEST(Tokenizer, WholeTextRoundTripsUpToSpaceNormalization) {
  const std::string text = read_file(test::tinystories_text());
  const std::vector<int64_t> ids = tok512().encode(text);
  // Merged pieces, not bytes.
  EXPECT_LT(ids.size(), text.size() / 2);
  EXPECT_GT(ids.size(), text.size() / 8);
  const std::string decoded = tok512().decode(ids);
  EXPECT_EQ(decoded, normalize_spaces(text));
  EXPECT_EQ(text.size() - decoded.size(), 6u) << "the text has six double spaces and nothing else to normalize";
  // Decoded text is a fixed point.
  EXPECT_EQ(tok512().encode(decoded), ids);
}

TEST(Tokenizer, ByteFallbackRoundTripsNonAscii) {
  const std::string text = "Café — naïve 日本 🙂";
  const std::vector<int64_t> ids = tok512().encode(text);
  bool used_byte_piece = false;
  for (int64_t id : ids) used_byte_piece |= (id >= 3 && id <= 258);
  EXPECT_TRUE(used_byte_piece);
  EXPECT_EQ(tok512().decode(ids), text);
}

TEST(Tokenizer, EncodeAddsNoControlTokensAndDecodeDropsThem) {
  const std::vector<int64_t> ids = tok512().encode("Lily");
  ASSERT_FALSE(ids.empty());
  EXPECT_NE(ids.front(), 1);
  EXPECT_NE(ids.back(), 2);
  std::vector<int64_t> framed = {1};
  framed.insert(framed.end(), ids.begin(), ids.end());
  framed.push_back(2);
  EXPECT_EQ(tok512().decode(framed), "Lily");
  EXPECT_TRUE(tok512().encode("").empty());
}

TEST(Tokenizer, DecodeRejectsIdsOutsideVocabulary) {
  const std::string msg = expect_error([] { tok512().decode({5, 512}); });
  EXPECT_NE(msg.find("512"), std::string::npos) << msg;
  EXPECT_NE(msg.find("position 1"), std::string::npos) << msg;
  expect_error([] { tok512().decode({-1}); });
}

TEST(Tokenizer, MissingModelFileNamesThePath) {
  const std::string path = test::temp_dir("tok_missing") + "/nope.model";
  const std::string msg = expect_error([&] { Tokenizer::load_sentencepiece(path); });
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("does not exist"), std::string::npos) << msg;
}

TEST(Tokenizer, CorruptModelFileIsAnError) {
  const std::string dir = test::temp_dir("tok_corrupt");
  const std::string model = read_file(test::tokenizer_model());
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"garbage.model", "this is not a sentencepiece model\n"},
      {"truncated.model", model.substr(0, model.size() / 3)},
      {"empty.model", ""},
  };
  for (const auto& [name, bytes] : cases) {
    const std::string path = dir + "/" + name;
    std::ofstream(path, std::ios::binary) << bytes;
    const std::string msg = expect_error([&] { Tokenizer::load_sentencepiece(path); });
    EXPECT_NE(msg.find(path), std::string::npos) << name << ": " << msg;
  }
}

TEST(Tokenizer, ConcurrentLoadsAndEncodesAgree) {
  const std::string text = first_story();
  const std::vector<int64_t> expected = tok512().encode(text);
  std::vector<std::vector<int64_t>> got(4);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < got.size(); ++i) {
    threads.emplace_back([&, i] { got[i] = Tokenizer::load_sentencepiece(test::tokenizer_model())->encode(text); });
  }
  for (auto& t : threads) t.join();
  for (const auto& ids : got) EXPECT_EQ(ids, expected);
}

// The shim is loaded once per process, so the failure is checked in a fresh child process that
// re-runs only this test with GRADQ_SPM_LIBRARY pointing nowhere.
TEST(Tokenizer, ShimNotFoundListsTriedPaths) {
  const char* self = std::getenv("GRADQ_TEST_SELF");
  if (self) {
    // Child process: the shim has not been loaded yet in this process.
    const std::string msg = expect_error([] { Tokenizer::load_sentencepiece(test::tokenizer_model()); });
    EXPECT_NE(msg.find("/nonexistent/libgradq_spm.so"), std::string::npos) << msg;
    EXPECT_NE(msg.find("GRADQ_SPM_LIBRARY"), std::string::npos) << msg;
    return;
  }
  const std::string exe = std::filesystem::read_symlink("/proc/self/exe").string();
  const auto [code, out] = test::run("GRADQ_TEST_SELF=1 GRADQ_SPM_LIBRARY=/nonexistent/libgradq_spm.so " + exe +
                                     " --gtest_filter=Tokenizer.ShimNotFoundListsTriedPaths");
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("[  PASSED  ] 1 test"), std::string::npos) << out;
}

}  // namespace
}  // namespace gradq
