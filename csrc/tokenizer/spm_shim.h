#pragma once
// The C ABI between libgradq and libgradq_spm.so, the only code that links SentencePiece.
//
// Why a C ABI: the shim is loaded into a link-map namespace of its own (dlmopen, tokenizer.cpp) so
// that Debian's libsentencepiece (which exports its bundled protobuf) never binds to the protobuf
// libtorch loads; the namespace has its own libc and libstdc++. Nothing C++ crosses the
// boundary: no exceptions, no std:: types, and memory the shim allocates is freed by the shim.
// Every function that can fail returns 0 on success, or non-zero with a NUL-terminated message in
// the caller's `err` buffer (truncated to `err_len`).

#include <stddef.h>
#include <stdint.h>

/// Bumped whenever a signature below changes; tokenizer.cpp refuses a shim of another version.
#define GRADQ_SPM_ABI_VERSION 1

#ifdef __cplusplus
extern "C" {
#endif

typedef struct gradq_spm gradq_spm;

/// GRADQ_SPM_ABI_VERSION of the shim.
int gradq_spm_abi_version(void);

/// Loads a SentencePiece model file; null on failure with the reason in `err`.
gradq_spm* gradq_spm_load(const char* model_path, char* err, size_t err_len);

/// Frees a handle from gradq_spm_load (null is allowed).
void gradq_spm_free(gradq_spm* spm);

/// Ids of `text[0 .. text_len)` without BOS/EOS, in a malloc'd array freed with gradq_spm_free_ids.
int gradq_spm_encode(const gradq_spm* spm, const char* text, size_t text_len, int32_t** ids,
                     size_t* n_ids, char* err, size_t err_len);
void gradq_spm_free_ids(int32_t* ids);

/// Text of `ids` in a malloc'd buffer (NUL-terminated, length in `text_len`) freed with
/// gradq_spm_free_text. Ids outside [0, vocab) are an error.
int gradq_spm_decode(const gradq_spm* spm, const int32_t* ids, size_t n_ids, char** text,
                     size_t* text_len, char* err, size_t err_len);
void gradq_spm_free_text(char* text);

int gradq_spm_vocab_size(const gradq_spm* spm);
/// -1 when the model has no such token.
int gradq_spm_bos_id(const gradq_spm* spm);
int gradq_spm_eos_id(const gradq_spm* spm);

#ifdef __cplusplus
}  // extern "C"
#endif
