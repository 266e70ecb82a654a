#include "eval/evaluator.h"

#include <torch/serialize.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "common/archive_check.h"
#include "common/error.h"
#include "common/files.h"
#include "common/timing.h"
#include "eval/block_cache.h"

namespace gradq {

const std::vector<double> kKlPercentiles = {99.9, 99, 95, 90, 10, 5, 1, 0.1};

namespace {

Estimate mean_estimate(const at::Tensor& x) {
  const int64_t n = x.numel();
  const double mean = x.mean().item<double>();
  const double se = n > 1 ? x.std().item<double>() / std::sqrt(static_cast<double>(n)) : 0.0;
  return {mean, se};
}

// Percentile with linear interpolation between closest ranks (numpy's default).
double percentile(const at::Tensor& sorted, double p) {
  const int64_t n = sorted.numel();
  const double pos = p / 100.0 * static_cast<double>(n - 1);
  const int64_t lo = static_cast<int64_t>(std::floor(pos));
  const int64_t hi = std::min(n - 1, lo + 1);
  const double a = sorted[lo].item<double>(), b = sorted[hi].item<double>();
  return a + (b - a) * (pos - static_cast<double>(lo));
}

// Per-token quantities gathered batch by batch, reduced to statistics at the end.
struct TokenRecords {
  std::vector<at::Tensor> nll, nll_ref, kl, delta_p, same_top;
};

// Per-token records are summarized on the CPU in float64, whatever device computed them.
at::Tensor cat(const std::vector<at::Tensor>& parts) { return at::cat(parts).to(at::kCPU, at::kDouble); }
}  // namespace

ReferenceStorage ReferenceStorage::top_k(int64_t k) {
  GRADQ_CHECK(k >= 1, "expected a top-k reference storage with k >= 1, got k = {}", k);
  return {Kind::kTopK, k};
}

ReferenceStorage ReferenceStorage::parse(const std::string& name) {
  if (name == "fp32") return float32();
  if (name == "fp16") return float16();
  if (name == "head") return head();
  if (name == "auto") return automatic();
  if (name.size() > 3 && name.compare(0, 3, "top") == 0 && name.size() <= 12 &&
      std::all_of(name.begin() + 3, name.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    const int64_t k = std::stoll(name.substr(3));
    if (k >= 1) return top_k(k);
  }
  throw Error(fmt::format("unknown reference storage '{}': expected fp32, fp16, top<K> with K >= 1 (e.g. top64), head or auto", name));
}

std::string ReferenceStorage::name() const {
  switch (kind) {
    case Kind::kFloat32: return "fp32";
    case Kind::kFloat16: return "fp16";
    case Kind::kTopK: return fmt::format("top{}", k);
    case Kind::kHead: return "head";
    case Kind::kAuto: return "auto";
  }
  return "?";
}

int64_t ReferenceStorage::bytes_per_token(int64_t vocab) const {
  // targets (int64), target log-probability (float32), top token (int64)
  const int64_t extras = 8 + 4 + 8;
  switch (kind) {
    case Kind::kFloat32: return 4 * vocab + extras;
    case Kind::kFloat16: return 2 * vocab + extras;
    case Kind::kTopK: return (4 + 4) * std::min(k, vocab) + 4 + extras;  // values, int32 indices, log tail
    case Kind::kHead: return extras;
    case Kind::kAuto: TORCH_INTERNAL_ASSERT(false, "reference storage auto is resolved before anything is kept");
  }
  return 0;
}

Reference Reference::from_log_probs(const at::Tensor& lp, const at::Tensor& targets, ReferenceStorage storage) {
  TORCH_INTERNAL_ASSERT(lp.dim() == 2 && lp.scalar_type() == at::kFloat && targets.dim() == 1 &&
                        targets.size(0) == lp.size(0));
  Reference r;
  r.storage = storage;
  r.vocab = lp.size(1);
  r.targets = targets;
  r.target_log_probs = lp.gather(1, targets.unsqueeze(1)).squeeze(1);
  r.top_tokens = lp.argmax(-1);
  switch (storage.kind) {
    case ReferenceStorage::Kind::kFloat32: r.log_probs = lp.contiguous(); break;
    case ReferenceStorage::Kind::kFloat16: r.log_probs = lp.to(at::kHalf); break;
    case ReferenceStorage::Kind::kHead: break;  // recomputed from the head's inputs when needed
    case ReferenceStorage::Kind::kAuto:
      TORCH_INTERNAL_ASSERT(false, "reference storage auto is resolved before anything is kept");
      break;
    case ReferenceStorage::Kind::kTopK: {
      GRADQ_CHECK(storage.k <= r.vocab, "reference storage top{} keeps more tokens than the vocabulary has ({})",
                  storage.k, r.vocab);
      auto [values, indices] = lp.topk(storage.k, -1, /*largest=*/true, /*sorted=*/true);
      // Column 0 is made the argmax (the first index of the maximum), so the same-top rate is exact even
      // when more than k tokens tie for the top: topk's choice among equal values is unspecified. The
      // values stay as they are: the swapped index holds the same (maximal) value.
      const at::Tensor top = r.top_tokens.unsqueeze(1);
      const at::Tensor column = (indices == top).to(at::kByte).argmax(1, /*keepdim=*/true);  // 0 when absent
      indices.scatter_(1, column, indices.narrow(1, 0, 1).clone());
      indices.narrow(1, 0, 1).copy_(top);
      // The tail mass summed from the tokens outside the top k, not 1 - sum(kept): no cancellation when
      // the tail is tiny.
      r.log_tail = lp.scatter(1, indices, -std::numeric_limits<float>::infinity()).logsumexp(-1);
      r.log_probs = values.contiguous();
      r.top_indices = indices.to(at::kInt).contiguous();
      break;
    }
  }
  return r;
}

Reference Reference::to_storage(ReferenceStorage to) const {
  if (to == storage) return *this;
  GRADQ_CHECK(to.kind != ReferenceStorage::Kind::kHead && to.kind != ReferenceStorage::Kind::kAuto,
              "a saved reference converts to fp32, fp16 or top<K>, not {}: {} needs the model", to.name(), to.name());
  GRADQ_CHECK(storage.kind == ReferenceStorage::Kind::kFloat32,
              "a {} reference cannot be converted to {}: only a float32 reference converts", storage.name(), to.name());
  Reference r = from_log_probs(log_probs, targets, to);
  r.windows_fingerprint = windows_fingerprint;
  return r;
}

int64_t Reference::bytes() const {
  int64_t total = 0;
  for (const at::Tensor* t : {&log_probs, &top_indices, &log_tail, &target_log_probs, &top_tokens, &targets,
                              &windows_fingerprint})
    if (t->defined()) total += t->numel() * static_cast<int64_t>(t->element_size());
  if (head) total += head->bytes();
  return total;
}

at::Tensor Reference::token_kl(int64_t begin, const at::Tensor& lp) const {
  const int64_t n = lp.size(0);
  GRADQ_CHECK(lp.dim() == 2 && lp.size(1) == vocab && begin >= 0 && begin + n <= tokens(),
              "the model's log-probabilities [{}] for reference rows {}..{} do not fit the reference ({} positions of "
              "a vocabulary of {})", fmt::join(lp.sizes(), ", "), begin, begin + n, tokens(), vocab);
  GRADQ_CHECK(storage.kind != ReferenceStorage::Kind::kHead,
              "a head reference has no stored rows: the evaluator recomputes it batch by batch");
  // A reference read from a file is on the CPU; the model's log-probabilities may be on a GPU.
  const at::Tensor rows = log_probs.slice(0, begin, begin + n).to(lp.device());
  switch (storage.kind) {
    case ReferenceStorage::Kind::kFloat32: return rows_kl(rows, lp);
    case ReferenceStorage::Kind::kFloat16: {
      // Rounding log p_ref to fp16 moves each value by up to 2^-11 of itself, so the rounded
      // probabilities no longer sum to 1; used as they are, a model against its own fp16 reference
      // showed a mean KL of 3.2e-5 on stories260K (the first-order term sum p * rounding). Renormalized,
      // only the second-order term is left. Measured errors in docs/BENCHMARKS.md ("Compact reference
      // log-probabilities").
      const at::Tensor ref = at::log_softmax(rows.to(at::kFloat), -1);
      return rows_kl(ref, lp);
    }
    case ReferenceStorage::Kind::kTopK: {
      // KL of P_ref and P_model coarsened to the k kept tokens plus one bucket holding everything else
      // (P_tail from the reference pass, Q_tail = the model's mass outside the kept tokens). By the
      // log-sum inequality, merging outcomes never raises a KL, so this is a lower bound of the full KL
      // (up to float rounding); the gap is the KL the tail's internal shape contributes. Measured on
      // stories260K (vocab 512, b4g32 against the full model, docs/BENCHMARKS.md): 6.5% of the mean KL
      // at top16, 2.1% at top32, 0.32% at top64, 0.013% at top128. The gap grows with the tail's mass,
      // so flat distributions (large vocabularies, random-init models) lose more. The reference is scattered into a dense row so that the kept terms are summed in
      // vocabulary order, as float32 storage sums them: with k = vocab the result is float32's bit for bit.
      const at::Tensor idx = top_indices.slice(0, begin, begin + n).to(lp.device(), at::kLong);
      const at::Tensor kept = at::zeros_like(lp, lp.options().dtype(at::kBool)).scatter_(1, idx, true);
      const at::Tensor ref = at::zeros_like(lp).scatter_(1, idx, rows);
      const at::Tensor kept_terms = (ref.exp() * (ref - lp)).masked_fill(~kept, 0).sum(-1);
      const at::Tensor p_tail_log = log_tail.slice(0, begin, begin + n).to(lp.device());
      const at::Tensor q_tail_log = lp.masked_fill(kept, -std::numeric_limits<float>::infinity()).logsumexp(-1);
      // 0 log 0 = 0: an empty reference tail adds nothing, whatever the model's tail.
      const at::Tensor tail_term = at::where(p_tail_log > -std::numeric_limits<float>::infinity(),
                                             p_tail_log.exp() * (p_tail_log - q_tail_log), at::zeros_like(p_tail_log));
      return (kept_terms + tail_term).clamp_min(0);
    }
    case ReferenceStorage::Kind::kHead:
    case ReferenceStorage::Kind::kAuto: break;
  }
  TORCH_INTERNAL_ASSERT(false, "unknown reference storage");
}

at::Tensor Reference::rows_kl(const at::Tensor& ref, const at::Tensor& lp) {
  return (ref.exp() * (ref - lp)).sum(-1).clamp_min(0);
}

at::Tensor HeadInputs::logits(int64_t begin) const {
  return cache->logits_from(cache->num_blocks(), cache->chunk_of(begin)).to(at::kFloat);
}

int64_t HeadInputs::bytes() const { return cache->bytes(); }

namespace {
constexpr int64_t kStorageCodeFloat32 = 0, kStorageCodeFloat16 = 1, kStorageCodeTopK = 2;
}  // namespace

void Reference::save(const std::string& path) const {
  GRADQ_CHECK(storage.kind != ReferenceStorage::Kind::kHead,
              "a head reference cannot be saved: it holds the model's states, not log-probabilities; save one "
              "kept as fp32, fp16 or top<K>");
  c10::Dict<std::string, at::Tensor> dict;
  const int64_t code = storage.kind == ReferenceStorage::Kind::kFloat32   ? kStorageCodeFloat32
                       : storage.kind == ReferenceStorage::Kind::kFloat16 ? kStorageCodeFloat16
                                                                          : kStorageCodeTopK;
  // [kind, k, vocab]; files without it are the float32 references of earlier versions.
  dict.insert("storage", at::tensor(std::vector<int64_t>{code, storage.k, vocab}, at::kLong));
  // Written from the CPU (a file that loads anywhere), whatever device computed it.
  dict.insert("log_probs", log_probs.cpu());
  dict.insert("targets", targets.cpu());
  dict.insert("windows", windows_fingerprint.cpu());
  if (storage.kind != ReferenceStorage::Kind::kFloat32) {  // float32 derives them from log_probs
    dict.insert("target_log_probs", target_log_probs.cpu());
    dict.insert("top_tokens", top_tokens.cpu());
  }
  if (storage.kind == ReferenceStorage::Kind::kTopK) {
    dict.insert("top_indices", top_indices.cpu());
    dict.insert("log_tail", log_tail.cpu());
  }
  std::vector<char> bytes = torch::pickle_save(c10::IValue(dict));
  write_file_atomically(path, std::string(bytes.begin(), bytes.end()));
}

Reference Reference::load(const std::string& path) { return from_bytes(read_file(path), path); }

Reference Reference::from_bytes(const std::string& bytes, const std::string& path) {
  c10::IValue value;
  try {
    check_archive(std::make_shared<BytesReadAdapter>(bytes), path);
    value = torch::pickle_load(std::vector<char>(bytes.begin(), bytes.end()));
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& e) {
    throw Error(fmt::format("'{}' is not a gradq reference file: {}", path, std::string(e.what_without_backtrace()).substr(0, 200)));
  } catch (const std::exception& e) {  // the unpickler also throws std:: exceptions on some bad input
    throw Error(fmt::format("'{}' is not a gradq reference file: {}", path, std::string(e.what()).substr(0, 200)));
  }
  GRADQ_CHECK(value.isGenericDict(), "'{}' is not a gradq reference file (expected a dict)", path);
  std::map<std::string, at::Tensor> entries;
  for (const auto& item : value.toGenericDict()) {
    GRADQ_CHECK(item.key().isString() && item.value().isTensor(),
                "'{}' is not a gradq reference file: expected a dict of str to tensor, got an entry {} -> {}", path,
                item.key().tagKind(), item.value().tagKind());
    entries[item.key().toStringRef()] = item.value().toTensor();
  }
  for (const char* key : {"log_probs", "targets", "windows"})
    GRADQ_CHECK(entries.count(key), "'{}' is not a gradq reference file: key '{}' missing", path, key);
  auto shape = [](const at::Tensor& t) { return fmt::format("{} [{}]", c10::toString(t.scalar_type()), fmt::join(t.sizes(), ", ")); };

  Reference r;
  r.log_probs = entries["log_probs"];
  r.targets = entries["targets"];
  r.windows_fingerprint = entries["windows"];
  int64_t code = kStorageCodeFloat32;
  if (entries.count("storage")) {
    const at::Tensor& s = entries["storage"];
    GRADQ_CHECK(s.scalar_type() == at::kLong && s.dim() == 1 && s.numel() == 3,
                "'{}' is a corrupt gradq reference file: expected storage Long [3], got {}", path, shape(s));
    code = s[0].item<int64_t>();
    r.vocab = s[2].item<int64_t>();
    GRADQ_CHECK(code >= kStorageCodeFloat32 && code <= kStorageCodeTopK,
                "'{}' is a corrupt gradq reference file: storage kind {}, expected 0 (fp32), 1 (fp16) or 2 (top-k)", path, code);
    GRADQ_CHECK(r.vocab >= 1, "'{}' is a corrupt gradq reference file: vocabulary {}, expected >= 1", path, r.vocab);
    if (code == kStorageCodeTopK) {
      const int64_t k = s[1].item<int64_t>();
      GRADQ_CHECK(k >= 1 && k <= r.vocab, "'{}' is a corrupt gradq reference file: top-k storage with k = {}, expected "
                  "1 <= k <= vocabulary {}", path, k, r.vocab);
      r.storage = ReferenceStorage::top_k(k);
    } else if (code == kStorageCodeFloat16) {
      r.storage = ReferenceStorage::float16();
    }
  }
  const bool dense = code != kStorageCodeTopK;
  const at::ScalarType value_type = code == kStorageCodeFloat16 ? at::kHalf : at::kFloat;
  const int64_t columns = dense ? (r.vocab ? r.vocab : (r.log_probs.dim() == 2 ? r.log_probs.size(1) : -1)) : r.storage.k;
  GRADQ_CHECK(r.log_probs.scalar_type() == value_type && r.log_probs.dim() == 2 && r.log_probs.size(1) > 0 &&
                  r.log_probs.size(1) == columns && r.targets.scalar_type() == at::kLong && r.targets.dim() == 1 &&
                  r.targets.size(0) == r.log_probs.size(0) && r.windows_fingerprint.scalar_type() == at::kLong &&
                  r.windows_fingerprint.dim() == 2,
              "'{}' is a corrupt gradq {} reference file: expected log_probs {} [tokens, {}], targets Long [tokens] "
              "and windows Long [windows, ctx], got {}, {} and {}",
              path, r.storage.name(), c10::toString(value_type), dense ? "vocab" : std::to_string(r.storage.k),
              shape(r.log_probs), shape(r.targets), shape(r.windows_fingerprint));
  if (dense && r.vocab == 0) r.vocab = r.log_probs.size(1);
  const int64_t tokens = r.targets.size(0);
  auto check_range = [&](const at::Tensor& t, const char* name) {
    if (t.numel() == 0) return;
    const int64_t lo = t.min().item<int64_t>(), hi = t.max().item<int64_t>();
    GRADQ_CHECK(lo >= 0 && hi < r.vocab, "'{}' is a corrupt gradq reference file: {} in [{}, {}], expected [0, {})", path,
                name, lo, hi, r.vocab);
  };
  check_range(r.targets, "targets");
  if (code == kStorageCodeFloat32) {
    r.target_log_probs = r.log_probs.gather(1, r.targets.unsqueeze(1)).squeeze(1);
    r.top_tokens = r.log_probs.argmax(-1);
    return r;
  }
  // The compact kinds carry what their log_probs cannot give exactly.
  std::vector<std::pair<const char*, std::string>> expected = {{"target_log_probs", "Float [tokens]"},
                                                               {"top_tokens", "Long [tokens]"}};
  if (!dense) {
    expected.push_back({"top_indices", fmt::format("Int [tokens, {}]", r.storage.k)});
    expected.push_back({"log_tail", "Float [tokens]"});
  }
  for (const auto& [key, what] : expected) {
    GRADQ_CHECK(entries.count(key), "'{}' is a corrupt gradq {} reference file: key '{}' ({}) missing", path,
                r.storage.name(), key, what);
    const at::Tensor& t = entries[key];
    const bool is_index = std::string(key) == "top_tokens" || std::string(key) == "top_indices";
    const at::ScalarType type = std::string(key) == "top_tokens" ? at::kLong : is_index ? at::kInt : at::kFloat;
    const bool matrix = std::string(key) == "top_indices";
    GRADQ_CHECK(t.scalar_type() == type && t.dim() == (matrix ? 2 : 1) && t.size(0) == tokens &&
                    (!matrix || t.size(1) == r.storage.k),
                "'{}' is a corrupt gradq {} reference file: expected {} {} with tokens = {}, got {}", path,
                r.storage.name(), key, what, tokens, shape(t));
  }
  r.target_log_probs = entries["target_log_probs"];
  r.top_tokens = entries["top_tokens"];
  check_range(r.top_tokens, "top_tokens");
  if (!dense) {
    r.top_indices = entries["top_indices"];
    r.log_tail = entries["log_tail"];
    check_range(r.top_indices, "top_indices");
    if (tokens > 0 && r.storage.k > 1) {
      // A repeated index would count a token twice in the KL.
      const at::Tensor sorted = std::get<0>(r.top_indices.sort(1));
      const int64_t repeats = (sorted.slice(1, 1) == sorted.slice(1, 0, -1)).any(1).sum().item<int64_t>();
      GRADQ_CHECK(repeats == 0, "'{}' is a corrupt gradq {} reference file: {} positions keep a token twice, expected "
                  "distinct top_indices per position", path, r.storage.name(), repeats);
    }
  }
  return r;
}

GradualEvaluator::GradualEvaluator(Windows windows, EvaluatorOptions options)
    : windows_(std::move(windows)), options_(options) {
  GRADQ_CHECK(windows_.size() > 0, "the evaluator needs at least one window");
  GRADQ_CHECK(options_.batch > 0, "batch must be positive, got {}", options_.batch);
  scored_mask_ = windows_.scored_mask();
}

LogitsSource GradualEvaluator::whole_model(const QuantizableModel& model) const {
  return [this, &model](int64_t begin, int64_t end) { return model.logits(windows_.inputs.slice(0, begin, end)); };
}

at::Tensor GradualEvaluator::scored(int64_t begin, const at::Tensor& logits) const {
  const at::Tensor mask = scored_mask_.slice(0, begin, begin + logits.size(0)).to(logits.device());
  return at::log_softmax(logits.index({mask}), -1);
}

at::Tensor GradualEvaluator::reference_kl(int64_t begin, int64_t offset, const at::Tensor& lp) const {
  if (reference_->head) return Reference::rows_kl(scored(begin, reference_->head->logits(begin)).to(lp.device()), lp);
  return reference_->token_kl(offset, lp);
}

void GradualEvaluator::for_each_batch(
    const LogitsSource& source, double* forward_seconds, bool check_finite,
    const std::function<void(int64_t, const at::Tensor&, const at::Tensor&)>& consume) const {
  double forward = 0;
  int64_t vocab = -1;
  for (int64_t b = 0; b < windows_.size(); b += options_.batch) {
    const int64_t e = std::min(windows_.size(), b + options_.batch);
    auto t0 = Clock::now();
    at::Tensor logits = source(b, e).to(at::kFloat);
    forward += seconds_since(t0);
    GRADQ_CHECK(logits.dim() == 3 && logits.size(0) == e - b && logits.size(1) == windows_.inputs.size(1) &&
                    (vocab < 0 || logits.size(-1) == vocab),
                "forward returned logits of shape {} for windows {}..{}, expected [{}, {}, {}]",
                fmt::to_string(fmt::join(logits.sizes(), "x")), b, e - 1, e - b, windows_.inputs.size(1),
                vocab < 0 ? std::string("vocab") : std::to_string(vocab));
    vocab = logits.size(-1);
    if (check_finite) {
      const at::Tensor bad = (~at::isfinite(logits)).any(2).any(1).nonzero();
      GRADQ_CHECK(bad.numel() == 0, "the model's logits hold NaN or infinite values in window {} (of {}): expected "
                  "finite logits", b + (bad.numel() ? bad[0][0].item<int64_t>() : 0), windows_.size());
    }
    const at::Tensor mask = scored_mask_.slice(0, b, e).to(logits.device());
    consume(b, scored(b, logits), windows_.targets.slice(0, b, e).to(logits.device()).index({mask}));
  }
  if (forward_seconds) *forward_seconds = forward;
}

at::Tensor GradualEvaluator::scored_log_probs(const QuantizableModel& model, double* forward_seconds) const {
  return scored_log_probs(whole_model(model), forward_seconds);
}

at::Tensor GradualEvaluator::scored_log_probs(const LogitsSource& source, double* forward_seconds) const {
  return gather_log_probs(source, forward_seconds, options_.check_finite);
}

at::Tensor GradualEvaluator::gather_log_probs(const LogitsSource& source, double* forward_seconds,
                                              bool check_finite) const {
  // Written batch by batch into one tensor: gathering the batches and concatenating them would hold
  // the [tokens, vocab] log-probabilities twice (1.6 GB of a 2.7 GB peak over all of stories260K's
  // held-out text).
  at::Tensor out;
  int64_t offset = 0;
  const int64_t tokens = scored_mask_.sum().item<int64_t>();
  for_each_batch(source, forward_seconds, check_finite, [&](int64_t, const at::Tensor& lp, const at::Tensor&) {
    if (!out.defined()) out = at::empty({tokens, lp.size(1)}, lp.options());
    out.slice(0, offset, offset + lp.size(0)).copy_(lp);
    offset += lp.size(0);
  });
  GRADQ_CHECK(offset == tokens, "internal: scored {} tokens, the windows score {}", offset, tokens);
  return out;
}

GradualEvaluator::TokenScores GradualEvaluator::token_scores(const LogitsSource& source, double* forward_seconds) const {
  GRADQ_CHECK(reference_, "token scores need a reference; set one first");
  std::vector<at::Tensor> kl, nll;
  int64_t offset = 0;
  for_each_batch(source, forward_seconds, options_.check_finite,
                 [&](int64_t begin, const at::Tensor& lp, const at::Tensor& targets) {
    kl.push_back(reference_kl(begin, offset, lp).to(at::kCPU, at::kDouble));
    nll.push_back(-lp.gather(1, targets.unsqueeze(1)).squeeze(1).to(at::kCPU, at::kDouble));
    offset += lp.size(0);
  });
  GRADQ_CHECK(offset == reference_->tokens(), "internal: scored {} tokens, the reference has {}", offset,
              reference_->tokens());
  return {at::cat(kl), at::cat(nll)};
}

namespace {
// Why a head reference cannot be kept for `model`; empty when it can.
std::string head_reference_unavailable(const QuantizableModel& model) {
  if (!model.shared_stages())
    return fmt::format("reference storage head recomputes the reference from the model's stages, and this model has "
                       "none: {}", model.stages_unavailable_reason());
  for (const WeightInfo& w : model.weights())
    if (model.block_position(w.block) < 0)
      return fmt::format("reference storage head recomputes the reference with the model's own head, so only weights "
                         "inside blocks may be quantized; '{}' is outside them (use fp16 or top<K>)", w.name);
  return {};
}
}  // namespace

ReferenceStorage GradualEvaluator::resolve_storage(const QuantizableModel& reference) const {
  const ReferenceStorage asked = options_.reference_storage;
  if (asked.kind != ReferenceStorage::Kind::kAuto) return asked;
  const int64_t fp16_bytes = scored_mask_.sum().item<int64_t>() * ReferenceStorage::float16().bytes_per_token(reference.vocab_size());
  return fp16_bytes > options_.auto_head_above_bytes && head_reference_unavailable(reference).empty()
             ? ReferenceStorage::head()
             : ReferenceStorage::float16();
}

void GradualEvaluator::set_reference(const QuantizableModel& reference, std::shared_ptr<const BlockInputCache> cache,
                                     double* forward_seconds) {
  const ReferenceStorage storage = resolve_storage(reference);
  if (storage.kind == ReferenceStorage::Kind::kHead) {
    const std::string unavailable = head_reference_unavailable(reference);
    GRADQ_CHECK(unavailable.empty(), "{}", unavailable);
    if (!cache) {
      // A cache moved past every block keeps only the head's inputs, one boundary at a time on the way.
      auto moving = std::make_shared<BlockInputCache>(*reference.stages(), windows_.inputs, options_.batch,
                                                      BlockInputCache::Keep::kMoving);
      moving->move_to(moving->num_blocks());
      cache = std::move(moving);
    }
    auto head = std::make_shared<HeadInputs>();
    head->stages = reference.shared_stages();
    head->cache = std::move(cache);
    set_reference_from(storage, [&](int64_t b, int64_t) { return head->logits(b); }, forward_seconds, head);
  } else if (cache) {
    set_reference_from(storage, [&](int64_t b, int64_t) { return cache->logits_from(cache->num_blocks(), cache->chunk_of(b)); },
                       forward_seconds, nullptr);
  } else {
    set_reference_from(storage, whole_model(reference), forward_seconds, nullptr);
  }
}

void GradualEvaluator::set_reference(const LogitsSource& source, double* forward_seconds) {
  GRADQ_CHECK(options_.reference_storage.kind != ReferenceStorage::Kind::kHead,
              "reference storage head needs the model itself (set_reference(model)), not only its logits");
  const ReferenceStorage storage = options_.reference_storage.kind == ReferenceStorage::Kind::kAuto
                                       ? ReferenceStorage::float16()
                                       : options_.reference_storage;
  set_reference_from(storage, source, forward_seconds, nullptr);
}

void GradualEvaluator::set_reference_from(ReferenceStorage storage, const LogitsSource& source,
                                          double* forward_seconds, std::shared_ptr<const HeadInputs> head) {
  TORCH_INTERNAL_ASSERT(storage.kind != ReferenceStorage::Kind::kAuto);
  const at::Tensor targets = windows_.targets.index({scored_mask_});
  const int64_t tokens = targets.size(0);
  // Each batch is compacted as it comes and written into tensors of the final size: the float32
  // [tokens, vocab] log-probabilities exist whole only when they are the storage, and batches are
  // never concatenated (that held the reference twice: 1.6 GB of a 2.7 GB peak over all of
  // stories260K's held-out text).
  Reference ref;
  int64_t offset = 0;
  // The reference pass is every run's first look at the model's outputs: always checked.
  for_each_batch(source, forward_seconds, true, [&](int64_t, const at::Tensor& lp, const at::Tensor& batch_targets) {
    Reference part = Reference::from_log_probs(lp, batch_targets, storage);
    if (!ref.target_log_probs.defined()) {
      ref.storage = storage;
      ref.vocab = part.vocab;
      auto rows_like = [&](const at::Tensor& t) {
        std::vector<int64_t> sizes = t.sizes().vec();
        sizes[0] = tokens;
        return at::empty(sizes, t.options());
      };
      if (part.log_probs.defined()) ref.log_probs = rows_like(part.log_probs);
      ref.target_log_probs = rows_like(part.target_log_probs);
      ref.top_tokens = rows_like(part.top_tokens);
      if (part.top_indices.defined()) ref.top_indices = rows_like(part.top_indices);
      if (part.log_tail.defined()) ref.log_tail = rows_like(part.log_tail);
    }
    const int64_t n = lp.size(0);
    if (part.log_probs.defined()) ref.log_probs.slice(0, offset, offset + n).copy_(part.log_probs);
    ref.target_log_probs.slice(0, offset, offset + n).copy_(part.target_log_probs);
    ref.top_tokens.slice(0, offset, offset + n).copy_(part.top_tokens);
    if (part.top_indices.defined()) ref.top_indices.slice(0, offset, offset + n).copy_(part.top_indices);
    if (part.log_tail.defined()) ref.log_tail.slice(0, offset, offset + n).copy_(part.log_tail);
    offset += n;
  });
  GRADQ_CHECK(offset == tokens, "internal: scored {} tokens, the windows score {}", offset, tokens);
  ref.targets = targets;
  ref.windows_fingerprint = windows_.inputs;
  ref.head = std::move(head);
  reference_ = std::move(ref);
}

void GradualEvaluator::set_reference(Reference reference) {
  const at::Tensor& fp = reference.windows_fingerprint;
  GRADQ_CHECK(fp.sizes() == windows_.inputs.sizes() && fp.scalar_type() == windows_.inputs.scalar_type() &&
                  at::equal(fp, windows_.inputs),
              "the reference was computed on other windows ({} windows of {} tokens) than this evaluation ({} of {}): "
              "recompute it with the same text, --ctx and --stride",
              fp.dim() > 0 ? fp.size(0) : 0, fp.dim() > 1 ? fp.size(1) : 0, windows_.inputs.size(0), windows_.inputs.size(1));
  // Same windows, so its rows must be this evaluation's scored positions with their targets.
  const at::Tensor scored_targets = windows_.targets.index({scored_mask_});
  GRADQ_CHECK(reference.log_probs.dim() == 2 && reference.log_probs.size(0) == scored_targets.size(0) &&
                  reference.targets.sizes() == scored_targets.sizes() && at::equal(reference.targets, scored_targets),
              "the reference holds {} scored positions with other targets than this evaluation's {}: it is corrupt or "
              "made with another --stride; recompute it with the same text, --ctx and --stride",
              reference.targets.numel(), scored_targets.size(0));
  reference_ = std::move(reference);
}

EvalResult GradualEvaluator::evaluate(const QuantizableModel& model) const { return evaluate(whole_model(model)); }

EvalResult GradualEvaluator::evaluate(const LogitsSource& source) const {
  const auto start = Clock::now();
  c10::InferenceMode guard;
  TokenRecords rec;
  double forward = 0;
  int64_t offset = 0;
  for_each_batch(source, &forward, options_.check_finite,
                 [&](int64_t begin, const at::Tensor& lp, const at::Tensor& scored_targets) {
    at::Tensor targets = scored_targets.unsqueeze(1);
    at::Tensor lp_target = lp.gather(1, targets).squeeze(1);
    rec.nll.push_back(-lp_target);
    if (reference_) {
      const int64_t n = lp.size(0);
      at::Tensor ref_target = reference_->target_log_probs.slice(0, offset, offset + n).to(lp.device());
      rec.nll_ref.push_back(-ref_target);
      rec.kl.push_back(reference_kl(begin, offset, lp));
      rec.delta_p.push_back(lp_target.exp() - ref_target.exp());
      rec.same_top.push_back(
          (lp.argmax(-1) == reference_->top_tokens.slice(0, offset, offset + n).to(lp.device())).to(at::kDouble));
    }
    offset += lp.size(0);
  });

  EvalResult r;
  at::Tensor nll = cat(rec.nll);
  r.tokens = nll.numel();
  r.nll = mean_estimate(nll);
  r.ppl = {std::exp(r.nll.value), std::exp(r.nll.value) * r.nll.stderr_};
  if (reference_) {
    GRADQ_CHECK(offset == reference_->tokens(), "internal: scored {} tokens, reference has {}", offset,
                reference_->tokens());
    at::Tensor nll_ref = cat(rec.nll_ref), kl = cat(rec.kl), dp = cat(rec.delta_p);
    const double n = static_cast<double>(r.tokens);
    const Estimate ref_nll = mean_estimate(nll_ref);
    r.reference_ppl = Estimate{std::exp(ref_nll.value), std::exp(ref_nll.value) * ref_nll.stderr_};
    KlStats k;
    k.storage = reference_->storage;
    k.mean = mean_estimate(kl);
    at::Tensor sorted = std::get<0>(kl.sort());
    k.min = sorted[0].item<double>();
    k.max = sorted[-1].item<double>();
    k.median = percentile(sorted, 50);
    for (double p : kKlPercentiles) k.percentiles.push_back(percentile(sorted, p));
    k.same_top_rate = cat(rec.same_top).mean().item<double>();
    k.delta_p_mean = mean_estimate(dp);
    k.delta_p_rms = dp.pow(2).mean().sqrt().item<double>();
    k.ln_ppl_ratio = mean_estimate(nll - nll_ref);
    const double ratio = std::exp(k.ln_ppl_ratio.value);
    k.ppl_ratio = {ratio, ratio * k.ln_ppl_ratio.stderr_};
    // Delta method: Var(PPL_q - PPL_r) from the variances and covariance of the two mean NLLs.
    const double pq = r.ppl.value, pr = r.reference_ppl->value;
    const double cov = n > 1 ? ((nll - nll.mean()) * (nll_ref - nll_ref.mean())).sum().item<double>() / (n - 1) / n : 0;
    const double var = pq * pq * r.nll.stderr_ * r.nll.stderr_ + pr * pr * ref_nll.stderr_ * ref_nll.stderr_ - 2 * pq * pr * cov;
    k.delta_ppl = {pq - pr, std::sqrt(std::max(0.0, var))};
    const double sd = r.nll.stderr_ * ref_nll.stderr_ * n;
    k.ln_ppl_correlation = sd > 0 ? cov * n / sd : 1.0;
    r.kl = std::move(k);
  }
  r.forward_seconds = forward;
  r.seconds = seconds_since(start);
  return r;
}

std::string format_eval_table(const EvalResult& r) {
  std::string out;
  auto row = [&](const std::string& name, const std::string& value) { out += fmt::format("{:<28} {}\n", name, value); };
  auto pm = [](const Estimate& e, int prec) { return fmt::format("{:.{}f} ± {:.{}f}", e.value, prec, e.stderr_, prec); };
  row("scored tokens", std::to_string(r.tokens));
  row("PPL", pm(r.ppl, 4));
  row("mean NLL (nats)", pm(r.nll, 6));
  if (r.kl) {
    const KlStats& k = *r.kl;
    row("reference PPL", pm(*r.reference_ppl, 4));
    row("PPL ratio", pm(k.ppl_ratio, 6));
    row("delta PPL", pm(k.delta_ppl, 6));
    row("mean ln(PPL/PPL_ref)", pm(k.ln_ppl_ratio, 6));
    row("cor(ln PPL, ln PPL_ref)", fmt::format("{:.4f}", k.ln_ppl_correlation));
    if (k.storage.kind != ReferenceStorage::Kind::kFloat32)
      row("reference storage", k.storage.kind == ReferenceStorage::Kind::kTopK
                                   ? k.storage.name() + " (KL rows: lower bounds, top tokens + tail)"
                               : k.storage.kind == ReferenceStorage::Kind::kHead
                                   ? k.storage.name() + " (recomputed from the head's inputs: float32's KL)"
                                   : k.storage.name() + " (KL rows from fp16 log-probabilities)");
    row("mean KL (nats)", pm(k.mean, 6));
    row("max KL", fmt::format("{:.6f}", k.max));
    for (size_t i = 0; i < kKlPercentiles.size(); ++i) {
      if (i == 4) row("median KL", fmt::format("{:.6f}", k.median));
      row(fmt::format("{}% KL", kKlPercentiles[i]), fmt::format("{:.6f}", k.percentiles[i]));
    }
    row("min KL", fmt::format("{:.6f}", k.min));
    row("same top token", fmt::format("{:.3f} %", 100 * k.same_top_rate));
    row("mean delta p (correct)", fmt::format("{:.4f} ± {:.4f} %", 100 * k.delta_p_mean.value, 100 * k.delta_p_mean.stderr_));
    row("RMS delta p (correct)", fmt::format("{:.4f} %", 100 * k.delta_p_rms));
  }
  row("seconds (forward)", fmt::format("{:.3f} ({:.3f})", r.seconds, r.forward_seconds));
  return out;
}

std::string eval_result_json(const EvalResult& r) {
  using nlohmann::json;
  auto est = [](const Estimate& e) { return json{{"value", e.value}, {"stderr", e.stderr_}}; };
  json j{{"tokens", r.tokens}, {"ppl", est(r.ppl)}, {"nll", est(r.nll)}, {"seconds", r.seconds},
         {"forward_seconds", r.forward_seconds}};
  if (r.kl) {
    const KlStats& k = *r.kl;
    json pct = json::object();
    for (size_t i = 0; i < kKlPercentiles.size(); ++i) pct[fmt::format("{}", kKlPercentiles[i])] = k.percentiles[i];
    j["reference_ppl"] = est(*r.reference_ppl);
    j["reference_storage"] = k.storage.name();
    j["kl"] = {{"mean", est(k.mean)}, {"median", k.median}, {"max", k.max}, {"min", k.min}, {"percentiles", pct}};
    j["same_top_rate"] = k.same_top_rate;
    j["delta_p"] = {{"mean", est(k.delta_p_mean)}, {"rms", k.delta_p_rms}};
    j["ppl_ratio"] = est(k.ppl_ratio);
    j["ln_ppl_ratio"] = est(k.ln_ppl_ratio);
    j["delta_ppl"] = est(k.delta_ppl);
    j["ln_ppl_correlation"] = k.ln_ppl_correlation;
  }
  return j.dump(2) + "\n";
}

}  // namespace gradq
