#include "tokenizer/tokenizer.h"

#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/runtime.h"
#include "tokenizer/spm_shim.h"

namespace gradq {
namespace {
namespace fs = std::filesystem;

constexpr size_t kErrLen = 1024;

/// The shim's entry points, resolved once per process. The library is never dlclose()d: tokenizers
/// may outlive any scope that could own it, and SentencePiece registers static state on load.
struct SpmApi {
  decltype(&gradq_spm_load) load = nullptr;
  decltype(&gradq_spm_free) free = nullptr;
  decltype(&gradq_spm_encode) encode = nullptr;
  decltype(&gradq_spm_free_ids) free_ids = nullptr;
  decltype(&gradq_spm_decode) decode = nullptr;
  decltype(&gradq_spm_free_text) free_text = nullptr;
  decltype(&gradq_spm_vocab_size) vocab_size = nullptr;
  decltype(&gradq_spm_bos_id) bos_id = nullptr;
  decltype(&gradq_spm_eos_id) eos_id = nullptr;
};

/// Where to look for the shim, in order. GRADQ_SPM_LIBRARY is an explicit choice and is the only
/// candidate when set, so a wrong override fails loudly instead of silently using another shim.
std::vector<std::string> shim_candidates() {
  if (const char* env = std::getenv("GRADQ_SPM_LIBRARY"); env && *env) return {env};
  return module_candidates(GRADQ_SPM_INSTALL_NAME, GRADQ_SPM_BUILD_PATH);
}

template <typename Fn>
void resolve(void* lib, const std::string& path, const char* name, Fn* fn) {
  *fn = reinterpret_cast<Fn>(dlsym(lib, name));
  GRADQ_CHECK(*fn != nullptr, "SentencePiece shim '{}' lacks symbol '{}' (expected a libgradq_spm.so built "
              "from this gradq version)", path, name);
}

SpmApi open_shim() {
  std::string tried;
  for (const std::string& path : shim_candidates()) {
    if (!fs::exists(path)) {
      tried += fmt::format("\n  {}: no such file", path);
      continue;
    }
    // A link-map namespace of its own (dlmopen LM_ID_NEWLM): the shim, libsentencepiece and its
    // bundled protobuf resolve symbols only among themselves and their own copies of libc and
    // libstdc++, so they never bind to the protobuf libtorch loads (plain dlopen aborts in
    // protobuf's version check) nor libtorch to theirs. This replaced RTLD_DEEPBIND, which gave the
    // same isolation but which AddressSanitizer refuses; the namespace works in every build. Nothing
    // but the C ABI crosses the boundary, and the shim frees what it allocates (spm_shim.h).
    void* lib = dlmopen(LM_ID_NEWLM, path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* why = dlerror();
      tried += fmt::format("\n  {}: {}", path, why ? why : "dlopen failed");
      continue;
    }
    using VersionFn = decltype(&gradq_spm_abi_version);
    VersionFn version = nullptr;
    resolve(lib, path, "gradq_spm_abi_version", &version);
    GRADQ_CHECK(version() == GRADQ_SPM_ABI_VERSION, "SentencePiece shim '{}' has ABI version {}, expected {}",
                path, version(), GRADQ_SPM_ABI_VERSION);
    SpmApi api;
    resolve(lib, path, "gradq_spm_load", &api.load);
    resolve(lib, path, "gradq_spm_free", &api.free);
    resolve(lib, path, "gradq_spm_encode", &api.encode);
    resolve(lib, path, "gradq_spm_free_ids", &api.free_ids);
    resolve(lib, path, "gradq_spm_decode", &api.decode);
    resolve(lib, path, "gradq_spm_free_text", &api.free_text);
    resolve(lib, path, "gradq_spm_vocab_size", &api.vocab_size);
    resolve(lib, path, "gradq_spm_bos_id", &api.bos_id);
    resolve(lib, path, "gradq_spm_eos_id", &api.eos_id);
    return api;
  }
  throw Error(fmt::format("cannot load the SentencePiece shim libgradq_spm.so (set GRADQ_SPM_LIBRARY to its "
                          "path); tried:{}", tried));
}

/// The shim, loaded on first use. A failed load is not cached, so a caller may fix the environment
/// and try again; a successful one is shared by every tokenizer in the process.
const SpmApi& spm_api() {
  static std::mutex mutex;
  static std::unique_ptr<SpmApi> api;
  std::lock_guard<std::mutex> lock(mutex);
  if (!api) api = std::make_unique<SpmApi>(open_shim());
  return *api;
}

class SentencePieceTokenizer final : public Tokenizer {
 public:
  SentencePieceTokenizer(const SpmApi& api, gradq_spm* handle)
      : api_(api),
        handle_(handle),
        vocab_size_(api.vocab_size(handle)),
        bos_id_(api.bos_id(handle)),
        eos_id_(api.eos_id(handle)) {}
  ~SentencePieceTokenizer() override { api_.free(handle_); }
  SentencePieceTokenizer(const SentencePieceTokenizer&) = delete;
  SentencePieceTokenizer& operator=(const SentencePieceTokenizer&) = delete;

  std::vector<int64_t> encode(const std::string& text) const override {
    int32_t* ids = nullptr;
    size_t n = 0;
    char err[kErrLen] = {0};
    GRADQ_CHECK(api_.encode(handle_, text.data(), text.size(), &ids, &n, err, sizeof(err)) == 0,
                "SentencePiece could not encode {} bytes of text: {}", text.size(), err);
    std::vector<int64_t> out(ids, ids + n);
    api_.free_ids(ids);
    return out;
  }

  std::string decode(const std::vector<int64_t>& ids) const override {
    std::vector<int32_t> narrow(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      GRADQ_CHECK(ids[i] >= 0 && ids[i] < vocab_size_, "expected token ids in [0, {}), got {} at position {}",
                  vocab_size_, ids[i], i);
      narrow[i] = static_cast<int32_t>(ids[i]);
    }
    char* text = nullptr;
    size_t len = 0;
    char err[kErrLen] = {0};
    GRADQ_CHECK(api_.decode(handle_, narrow.data(), narrow.size(), &text, &len, err, sizeof(err)) == 0,
                "SentencePiece could not decode {} ids: {}", ids.size(), err);
    std::string out(text, len);
    api_.free_text(text);
    return out;
  }

  int64_t vocab_size() const override { return vocab_size_; }
  int64_t bos_id() const override { return bos_id_; }
  int64_t eos_id() const override { return eos_id_; }

 private:
  const SpmApi& api_;
  gradq_spm* handle_;
  int64_t vocab_size_;
  int64_t bos_id_;
  int64_t eos_id_;
};

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::load_sentencepiece(const std::string& model_path) {
  GRADQ_CHECK(fs::exists(model_path), "tokenizer model '{}' does not exist", model_path);
  GRADQ_CHECK(fs::is_regular_file(model_path), "tokenizer model '{}' is not a regular file", model_path);
  const SpmApi& api = spm_api();
  char err[kErrLen] = {0};
  gradq_spm* handle = api.load(model_path.c_str(), err, sizeof(err));
  GRADQ_CHECK(handle != nullptr, "cannot load tokenizer model '{}' (expected a SentencePiece model file): {}",
              model_path, err);
  return std::make_unique<SentencePieceTokenizer>(api, handle);
}

}  // namespace gradq
