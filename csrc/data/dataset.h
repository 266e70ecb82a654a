#pragma once
// Text to token windows: the calibration and evaluation data every other component consumes.
//
// Split (documented in README "Data"): one text file is tokenized as a single stream; its first
// `calib_fraction` of tokens is the calibration set and the rest the evaluation set, so the two
// never overlap. With two files (calibration text, evaluation text) no split is made.
//
// Windows: a window covers `ctx` consecutive stream tokens t[s .. s+ctx) as prediction targets.
// With BOS (the default when the tokenizer has one) the model input is [BOS, t[s] .. t[s+ctx-2]],
// so every target, including the first, has a prediction; without BOS the input is t[s .. s+ctx)
// and the targets t[s+1 .. s+ctx+1). Windows start every `stride` tokens (1 <= stride <= ctx);
// a last window is aligned to the end of the stream so every token is covered. Each window scores
// only the targets no earlier window scored (`score_from`), so every stream token is scored once.

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace gradq {

/// Reads a UTF-8 text file. Throws gradq::Error naming the path for a missing file, an empty
/// (or whitespace-only) file, or binary content (NUL bytes or invalid UTF-8, with the byte offset).
std::string read_text_file(const std::string& path);

/// The checks of read_text_file on text already in memory (`path` names it in errors); returns the
/// text without a UTF-8 byte order mark.
std::string validate_text(std::string text, const std::string& path);

/// Token ids a user's own tokenizer made (`--tokens`, `--prompt-ids`): non-negative decimal integers
/// separated by whitespace or commas, optionally inside one pair of brackets (a JSON list). Throws
/// gradq::Error starting with `source` (e.g. "token file 'ids.txt'") and naming the byte offset for
/// anything else, for an id of 2^31 or more, or for no ids.
std::vector<int64_t> parse_token_ids(const std::string& text, const std::string& source);

/// parse_token_ids of a file's contents.
std::vector<int64_t> read_token_file(const std::string& path);

/// Throws gradq::Error naming the first id (and its position) the model has no logits for, or a
/// BOS id (>= 0) that it has none for.
void check_token_ids_fit_model(const std::vector<int64_t>& ids, int64_t bos_id, int64_t model_vocab);

struct TokenSplit {
  std::vector<int64_t> calibration;
  std::vector<int64_t> evaluation;
};

/// Splits one token stream at round(calib_fraction * size); calib_fraction in (0, 1).
TokenSplit split_tokens(const std::vector<int64_t>& tokens, double calib_fraction);

struct WindowSpec {
  int64_t ctx = 256;
  int64_t stride = 256;  ///< 1 <= stride <= ctx
  int64_t bos_id = -1;   ///< prepended when >= 0
  int64_t max_windows = 0;  ///< 0: all windows; otherwise the first max_windows
};

struct Windows {
  at::Tensor inputs;      ///< [N, ctx] int64: model inputs
  at::Tensor targets;     ///< [N, ctx] int64: the token each position predicts
  at::Tensor score_from;  ///< [N] int64: positions >= score_from[i] are scored in window i
  int64_t size() const { return inputs.defined() ? inputs.size(0) : 0; }
  /// Number of scored targets over all windows.
  int64_t scored_tokens() const;
  /// [N, ctx] bool: the targets each window scores (positions from its score_from on).
  at::Tensor scored_mask() const;
  /// Windows [begin, end) as a view.
  Windows slice(int64_t begin, int64_t end) const;
};

/// Builds windows over `tokens`. Throws gradq::Error when there are fewer tokens than one window
/// needs (ctx with BOS, ctx + 1 without), or for ctx < 2 or a stride outside [1, ctx].
Windows make_windows(const std::vector<int64_t>& tokens, const WindowSpec& spec);

/// Calibration and held-out evaluation windows from one token stream: split_tokens at
/// calib_fraction, then non-overlapping windows (stride = ctx) over each part, the first N of each.
/// Fit windows, when asked for, are the calibration part's next windows after the calibration
/// windows, sharing no token with them: the rounding is fitted on them (GPTQ's X^T X), so that
/// the calibration windows that judge its candidates are text it was not fitted to.
struct DataOptions {
  double calib_fraction = 0.1;
  int64_t ctx = 256;
  int64_t calib_windows = 16;  ///< 0: all
  int64_t eval_windows = 64;   ///< 0: all
  int64_t fit_windows = 0;     ///< 0: none (the rounding is fitted on the calibration windows)
};
struct DataSplit {
  Windows calibration;
  Windows evaluation;
  Windows fit;  ///< empty unless DataOptions::fit_windows > 0; then 1..fit_windows windows
};
/// Throws gradq::Error when fit windows are asked for and the calibration part has no full window
/// left after the calibration windows.
DataSplit make_data_split(const std::vector<int64_t>& tokens, int64_t bos_id, const DataOptions& options);

/// Throws gradq::Error when the tokenizer can emit ids the model has no logits for.
void check_tokenizer_fits_model(int64_t tokenizer_vocab, int64_t model_vocab);

}  // namespace gradq
