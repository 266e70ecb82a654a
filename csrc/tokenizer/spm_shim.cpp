// libgradq_spm.so: SentencePiece behind the C ABI of spm_shim.h. Built as a MODULE and only ever
// dlopen()ed (see tokenizer.cpp); it must not include torch or any gradq library header that would.

#include "tokenizer/spm_shim.h"

#include <sentencepiece_processor.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

struct gradq_spm {
  sentencepiece::SentencePieceProcessor processor;
};

namespace {

int fail(char* err, size_t err_len, const std::string& message) {
  if (err && err_len > 0) {
    const size_t n = message.size() < err_len - 1 ? message.size() : err_len - 1;
    std::memcpy(err, message.data(), n);
    err[n] = '\0';
  }
  return 1;
}

}  // namespace

extern "C" {

int gradq_spm_abi_version(void) { return GRADQ_SPM_ABI_VERSION; }

gradq_spm* gradq_spm_load(const char* model_path, char* err, size_t err_len) {
  try {
    auto spm = std::make_unique<gradq_spm>();
    const auto status = spm->processor.Load(model_path);
    if (!status.ok()) {
      fail(err, err_len, status.ToString());
      return nullptr;
    }
    if (spm->processor.GetPieceSize() <= 0) {
      fail(err, err_len, "the model has no pieces");
      return nullptr;
    }
    return spm.release();
  } catch (const std::exception& e) {
    fail(err, err_len, e.what());
  } catch (...) {
    fail(err, err_len, "unknown exception in SentencePiece");
  }
  return nullptr;
}

void gradq_spm_free(gradq_spm* spm) { delete spm; }

int gradq_spm_encode(const gradq_spm* spm, const char* text, size_t text_len, int32_t** ids,
                     size_t* n_ids, char* err, size_t err_len) {
  *ids = nullptr;
  *n_ids = 0;
  try {
    std::vector<int> out;
    const auto status = spm->processor.Encode(std::string_view(text, text_len), &out);
    if (!status.ok()) return fail(err, err_len, status.ToString());
    if (out.empty()) return 0;
    auto* buf = static_cast<int32_t*>(std::malloc(out.size() * sizeof(int32_t)));
    if (!buf) return fail(err, err_len, "out of memory for " + std::to_string(out.size()) + " ids");
    for (size_t i = 0; i < out.size(); ++i) buf[i] = out[i];
    *ids = buf;
    *n_ids = out.size();
    return 0;
  } catch (const std::exception& e) {
    return fail(err, err_len, e.what());
  } catch (...) {
    return fail(err, err_len, "unknown exception in SentencePiece");
  }
}

void gradq_spm_free_ids(int32_t* ids) { std::free(ids); }

int gradq_spm_decode(const gradq_spm* spm, const int32_t* ids, size_t n_ids, char** text,
                     size_t* text_len, char* err, size_t err_len) {
  *text = nullptr;
  *text_len = 0;
  try {
    // SentencePiece's own range check is a CHECK (abort) in some versions: check here instead.
    const int vocab = spm->processor.GetPieceSize();
    std::vector<int> in(n_ids);
    for (size_t i = 0; i < n_ids; ++i) {
      if (ids[i] < 0 || ids[i] >= vocab) {
        return fail(err, err_len, "id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                                      " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
      }
      in[i] = ids[i];
    }
    std::string out;
    const auto status = spm->processor.Decode(in, &out);
    if (!status.ok()) return fail(err, err_len, status.ToString());
    auto* buf = static_cast<char*>(std::malloc(out.size() + 1));
    if (!buf) return fail(err, err_len, "out of memory for " + std::to_string(out.size()) + " bytes");
    std::memcpy(buf, out.data(), out.size());
    buf[out.size()] = '\0';
    *text = buf;
    *text_len = out.size();
    return 0;
  } catch (const std::exception& e) {
    return fail(err, err_len, e.what());
  } catch (...) {
    return fail(err, err_len, "unknown exception in SentencePiece");
  }
}

void gradq_spm_free_text(char* text) { std::free(text); }

int gradq_spm_vocab_size(const gradq_spm* spm) { return spm->processor.GetPieceSize(); }
int gradq_spm_bos_id(const gradq_spm* spm) { return spm->processor.bos_id(); }
int gradq_spm_eos_id(const gradq_spm* spm) { return spm->processor.eos_id(); }

}  // extern "C"
