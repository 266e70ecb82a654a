#include "data/dataset.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "common/error.h"
#include "common/files.h"

namespace gradq {
namespace {
namespace fs = std::filesystem;

/// Byte offset of the first invalid UTF-8 sequence in `s`, or -1. Strict (RFC 3629): rejects
/// overlong forms, surrogates, code points above U+10FFFF and truncated sequences.
int64_t first_invalid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len = 0;
    unsigned char lo = 0x80, hi = 0xbf;  // allowed range of the second byte
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;  // overlong
      if (c == 0xed) hi = 0x9f;  // surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;  // overlong
      if (c == 0xf4) hi = 0x8f;  // above U+10FFFF
    } else {
      return static_cast<int64_t>(i);
    }
    if (i + len > n) return static_cast<int64_t>(i);
    if (p[i + 1] < lo || p[i + 1] > hi) return static_cast<int64_t>(i);
    for (int k = 2; k < len; ++k) {
      if (p[i + k] < 0x80 || p[i + k] > 0xbf) return static_cast<int64_t>(i);
    }
    i += len;
  }
  return -1;
}

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

}  // namespace

std::string read_text_file(const std::string& path) {
  GRADQ_CHECK(fs::exists(path), "text file '{}' does not exist", path);
  GRADQ_CHECK(fs::is_regular_file(path), "text file '{}' is not a regular file", path);
  return validate_text(read_file(path), path);
}

std::string validate_text(std::string text, const std::string& path) {
  GRADQ_CHECK(!text.empty(), "text file '{}' is empty (expected UTF-8 text)", path);
  const size_t nul = text.find('\0');
  GRADQ_CHECK(nul == std::string::npos, "text file '{}' looks binary: NUL byte at byte offset {} (expected UTF-8 text)",
              path, nul);
  const int64_t bad = first_invalid_utf8(text);
  GRADQ_CHECK(bad < 0, "text file '{}' is not valid UTF-8: invalid byte 0x{:02x} at byte offset {}", path,
              static_cast<unsigned>(static_cast<unsigned char>(bad < 0 ? 0 : text[bad])), bad);
  // A UTF-8 byte order mark is an encoding marker, not text: the tokenizer would see it as a piece.
  if (text.compare(0, 3, "\xef\xbb\xbf") == 0) text.erase(0, 3);
  bool blank = true;
  for (char c : text) {
    if (!is_space(c)) {
      blank = false;
      break;
    }
  }
  GRADQ_CHECK(!blank, "text file '{}' contains only whitespace ({} bytes; expected text)", path, text.size());
  return text;
}

TokenSplit split_tokens(const std::vector<int64_t>& tokens, double calib_fraction) {
  GRADQ_CHECK(calib_fraction > 0.0 && calib_fraction < 1.0, "expected calib_fraction in (0, 1), got {}",
              calib_fraction);
  const auto n = static_cast<int64_t>(tokens.size());
  const auto cut = static_cast<int64_t>(std::llround(calib_fraction * static_cast<double>(n)));
  GRADQ_CHECK(cut > 0 && cut < n,
              "calib_fraction {} of {} tokens splits at {}, leaving an empty {} set (expected both sets non-empty)",
              calib_fraction, n, cut, cut <= 0 ? "calibration" : "evaluation");
  TokenSplit split;
  split.calibration.assign(tokens.begin(), tokens.begin() + cut);
  split.evaluation.assign(tokens.begin() + cut, tokens.end());
  return split;
}

int64_t Windows::scored_tokens() const {
  if (!score_from.defined() || size() == 0) return 0;
  return size() * inputs.size(1) - score_from.sum().item<int64_t>();
}

at::Tensor Windows::scored_mask() const {
  return at::arange(inputs.size(1), at::kLong).unsqueeze(0) >= score_from.unsqueeze(1);
}

Windows Windows::slice(int64_t begin, int64_t end) const {
  GRADQ_CHECK(0 <= begin && begin <= end && end <= size(), "expected a window range within [0, {}], got [{}, {})",
              size(), begin, end);
  return {inputs.slice(0, begin, end), targets.slice(0, begin, end), score_from.slice(0, begin, end)};
}

Windows make_windows(const std::vector<int64_t>& tokens, const WindowSpec& spec) {
  const int64_t ctx = spec.ctx;
  GRADQ_CHECK(ctx >= 2, "expected a context length ctx >= 2, got {}", ctx);
  GRADQ_CHECK(spec.stride >= 1 && spec.stride <= ctx, "expected a stride in [1, ctx = {}], got {}", ctx, spec.stride);
  GRADQ_CHECK(spec.max_windows >= 0, "expected max_windows >= 0 (0: all), got {}", spec.max_windows);
  const bool bos = spec.bos_id >= 0;
  const auto n = static_cast<int64_t>(tokens.size());
  const int64_t need = bos ? ctx : ctx + 1;
  GRADQ_CHECK(n >= need, "too few tokens for one window: expected at least {} (ctx {}{}), got {}", need, ctx,
              bos ? " with BOS" : " + 1 without BOS", n);

  // Windows index the target stream: with BOS every token is a target; without, t[0] is input only.
  // Window starts s = 0, stride, 2*stride, ... while s + ctx fits, plus one aligned to the end.
  const int64_t offset = bos ? 0 : 1;
  const int64_t n_targets = n - offset;
  std::vector<int64_t> starts;
  for (int64_t s = 0; s + ctx <= n_targets; s += spec.stride) starts.push_back(s);
  if (starts.back() + ctx < n_targets) starts.push_back(n_targets - ctx);
  if (spec.max_windows > 0 && static_cast<int64_t>(starts.size()) > spec.max_windows) starts.resize(spec.max_windows);

  const auto count = static_cast<int64_t>(starts.size());
  Windows w;
  w.inputs = at::empty({count, ctx}, at::kLong);
  w.targets = at::empty({count, ctx}, at::kLong);
  w.score_from = at::empty({count}, at::kLong);
  auto* in = w.inputs.data_ptr<int64_t>();
  auto* tg = w.targets.data_ptr<int64_t>();
  auto* sf = w.score_from.data_ptr<int64_t>();
  int64_t scored_end = 0;  // first target position no earlier window scored
  for (int64_t i = 0; i < count; ++i) {
    const int64_t s = starts[i];
    int64_t* row_in = in + i * ctx;
    int64_t* row_tg = tg + i * ctx;
    // Target j of the window is stream token s + offset + j; its input is the token before it
    // (BOS for the very first position of a BOS window).
    for (int64_t j = 0; j < ctx; ++j) {
      row_tg[j] = tokens[s + offset + j];
      const int64_t prev = s + offset + j - 1;
      row_in[j] = (bos && j == 0) ? spec.bos_id : tokens[prev];
    }
    sf[i] = scored_end - s > 0 ? scored_end - s : 0;
    scored_end = s + ctx;
  }
  return w;
}

DataSplit make_data_split(const std::vector<int64_t>& tokens, int64_t bos_id, const DataOptions& options) {
  const TokenSplit split = split_tokens(tokens, options.calib_fraction);
  WindowSpec spec;
  spec.ctx = options.ctx;
  spec.stride = options.ctx;
  spec.bos_id = bos_id;
  spec.max_windows = options.calib_windows;
  DataSplit out;
  out.calibration = make_windows(split.calibration, spec);
  spec.max_windows = options.eval_windows;
  out.evaluation = make_windows(split.evaluation, spec);
  GRADQ_CHECK(options.fit_windows >= 0, "expected fit_windows >= 0 (0: none), got {}", options.fit_windows);
  if (options.fit_windows > 0) {
    // The tokens after the calibration windows' targets (without BOS, the last target is also the
    // first input: a shared input token, no shared target).
    const int64_t bos = bos_id >= 0;
    const auto n = static_cast<int64_t>(split.calibration.size());
    const int64_t used = out.calibration.size() * options.ctx + (bos ? 0 : 1);
    const int64_t first = used - (bos ? 0 : 1);
    const int64_t need = bos ? options.ctx : options.ctx + 1;
    // used > n: the calibration windows include one aligned to the end of the part, so no token is left.
    GRADQ_CHECK(used <= n && n - first >= need,
                "no text left for fit windows: the calibration part has {} tokens and its {} calibration windows of {} "
                "use {}; expected at least {} more (raise the calibration fraction, lower the calibration windows, or "
                "fit on the calibration windows with 0 fit windows)",
                n, out.calibration.size(), options.ctx, std::min(used, n), need);
    spec.max_windows = options.fit_windows;
    spec.stride = options.ctx;
    const std::vector<int64_t> rest(split.calibration.begin() + first, split.calibration.end());
    out.fit = make_windows(rest, spec);
    // make_windows aligns a last window to the end of `rest`; it stays within `rest`, so it shares
    // no token with the calibration windows either.
  }
  return out;
}

std::vector<int64_t> parse_token_ids(const std::string& text, const std::string& source) {
  constexpr int64_t kLimit = int64_t{1} << 31;  // no vocabulary comes near; keeps every id an int32
  auto is_separator = [](char c) { return is_space(c) || c == ','; };
  size_t begin = 0, end = text.size();
  while (begin < end && is_space(text[begin])) ++begin;
  while (end > begin && is_space(text[end - 1])) --end;
  if (begin < end && text[begin] == '[') {
    GRADQ_CHECK(text[end - 1] == ']', "{}: a list that opens with '[' at byte offset {} must end with ']'",
                source, begin);
    ++begin;
    --end;
  }
  std::vector<int64_t> ids;
  for (size_t i = begin; i < end;) {
    if (is_separator(text[i])) {
      ++i;
      continue;
    }
    const size_t start = i;
    int64_t id = 0;
    while (i < end && text[i] >= '0' && text[i] <= '9') {
      id = id * 10 + (text[i] - '0');
      GRADQ_CHECK(id < kLimit, "{}: the id at byte offset {} is 2^31 or more (expected token ids)", source,
                  start);
      ++i;
    }
    if (i == start || (i < end && !is_separator(text[i]))) {
      size_t stop = i;
      while (stop < end && !is_separator(text[stop]) && stop - start < 16) ++stop;
      // Printable ASCII only in the message: a binary file's bytes would garble the one error line.
      std::string shown;
      for (size_t k = start; k < std::max(stop, start + 1) && k < end; ++k)
        shown += (text[k] >= 0x20 && text[k] < 0x7f) ? text[k] : '?';
      throw Error(fmt::format("{}: expected non-negative integer token ids separated by whitespace or "
                              "commas, got '{}' at byte offset {}",
                              source, shown, start));
    }
    ids.push_back(id);
  }
  GRADQ_CHECK(!ids.empty(), "{} holds no token ids (expected non-negative integers separated by "
              "whitespace or commas)", source);
  return ids;
}

std::vector<int64_t> read_token_file(const std::string& path) {
  GRADQ_CHECK(fs::exists(path), "token file '{}' does not exist", path);
  GRADQ_CHECK(fs::is_regular_file(path), "token file '{}' is not a regular file", path);
  return parse_token_ids(read_file(path), fmt::format("token file '{}'", path));
}

void check_token_ids_fit_model(const std::vector<int64_t>& ids, int64_t bos_id, int64_t model_vocab) {
  GRADQ_CHECK(bos_id < model_vocab, "--bos-id {} is not a token of the model: expected an id below its vocabulary ({})",
              bos_id, model_vocab);
  const auto largest = std::max_element(ids.begin(), ids.end());
  GRADQ_CHECK(largest == ids.end() || *largest < model_vocab,
              "token id {} (token {} of {}) is not a token of the model: expected ids below its vocabulary ({}); "
              "are these ids from the model's own tokenizer?",
              largest == ids.end() ? 0 : *largest, largest - ids.begin(), ids.size(), model_vocab);
}

void check_tokenizer_fits_model(int64_t tokenizer_vocab, int64_t model_vocab) {
  GRADQ_CHECK(tokenizer_vocab > 0 && model_vocab > 0, "expected positive vocabulary sizes, got tokenizer {} and model {}",
              tokenizer_vocab, model_vocab);
  GRADQ_CHECK(tokenizer_vocab <= model_vocab,
              "tokenizer vocabulary ({} ids) does not fit the model: expected at most {} (the model's vocabulary), "
              "got {}; is this the tokenizer the model was trained with?",
              tokenizer_vocab, model_vocab, tokenizer_vocab);
}

}  // namespace gradq
