#pragma once
// The tokenizer interface gradq uses everywhere. The SentencePiece implementation lives behind a
// dlopen()ed shim (see docs/ARCHITECTURE.md: Debian's SentencePiece and libtorch cannot share a
// process image otherwise); nothing outside csrc/tokenizer/ knows about that.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace gradq {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  /// Loads a SentencePiece model file. Throws gradq::Error for a missing or invalid file, or when
  /// the shim library cannot be found (GRADQ_SPM_LIBRARY overrides its location).
  static std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_path);

  /// Token ids of `text`, without BOS/EOS.
  virtual std::vector<int64_t> encode(const std::string& text) const = 0;
  /// Text of `ids` (control tokens such as BOS/EOS decode to nothing).
  virtual std::string decode(const std::vector<int64_t>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  /// -1 when the vocabulary has no such token.
  virtual int64_t bos_id() const = 0;
  virtual int64_t eos_id() const = 0;
};

}  // namespace gradq
