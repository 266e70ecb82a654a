#include "eval/evaluator.h"

#include <torch/serialize.h>

#include <algorithm>
#include <cmath>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "common/archive_check.h"
#include "common/error.h"
#include "common/files.h"
#include "common/timing.h"

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

at::Tensor cat(const std::vector<at::Tensor>& parts) { return at::cat(parts).to(at::kDouble); }
}  // namespace

void Reference::save(const std::string& path) const {
  c10::Dict<std::string, at::Tensor> dict;
  dict.insert("log_probs", log_probs);
  dict.insert("targets", targets);
  dict.insert("windows", windows_fingerprint);
  std::vector<char> bytes = torch::pickle_save(c10::IValue(dict));
  write_file_atomically(path, std::string(bytes.begin(), bytes.end()));
}

Reference Reference::load(const std::string& path) { return from_bytes(read_file(path), path); }

Reference Reference::from_bytes(const std::string& bytes, const std::string& path) {
  c10::IValue value;
  try {
    {
      caffe2::serialize::PyTorchStreamReader archive(std::make_shared<BytesReadAdapter>(bytes));
      check_archive_pickles(archive, path);
    }
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
  Reference r{entries["log_probs"], entries["targets"], entries["windows"]};
  auto shape = [](const at::Tensor& t) { return fmt::format("{} [{}]", c10::toString(t.scalar_type()), fmt::join(t.sizes(), ", ")); };
  GRADQ_CHECK(r.log_probs.scalar_type() == at::kFloat && r.log_probs.dim() == 2 && r.log_probs.size(1) > 0 &&
                  r.targets.scalar_type() == at::kLong && r.targets.dim() == 1 &&
                  r.targets.size(0) == r.log_probs.size(0) && r.windows_fingerprint.scalar_type() == at::kLong &&
                  r.windows_fingerprint.dim() == 2,
              "'{}' is a corrupt gradq reference file: expected log_probs Float [tokens, vocab], targets Long [tokens] "
              "and windows Long [windows, ctx], got {}, {} and {}",
              path, shape(r.log_probs), shape(r.targets), shape(r.windows_fingerprint));
  if (r.targets.numel() > 0) {
    const int64_t lo = r.targets.min().item<int64_t>(), hi = r.targets.max().item<int64_t>();
    GRADQ_CHECK(lo >= 0 && hi < r.log_probs.size(1), "'{}' is a corrupt gradq reference file: targets in [{}, {}], expected "
                "[0, {})", path, lo, hi, r.log_probs.size(1));
  }
  return r;
}

GradualEvaluator::GradualEvaluator(Windows windows, EvaluatorOptions options)
    : windows_(std::move(windows)), options_(options) {
  GRADQ_CHECK(windows_.size() > 0, "the evaluator needs at least one window");
  GRADQ_CHECK(options_.batch > 0, "batch must be positive, got {}", options_.batch);
  const int64_t ctx = windows_.inputs.size(1);
  scored_mask_ = at::arange(ctx, at::kLong).unsqueeze(0) >= windows_.score_from.unsqueeze(1);
}

LogitsSource GradualEvaluator::whole_model(const CausalLM& model) const {
  return [this, &model](int64_t begin, int64_t end) { return model.logits(windows_.inputs.slice(0, begin, end)); };
}

void GradualEvaluator::for_each_batch(const LogitsSource& source, double* forward_seconds, bool check_finite,
                                      const std::function<void(const at::Tensor&, const at::Tensor&)>& consume) const {
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
    at::Tensor mask = scored_mask_.slice(0, b, e);
    consume(at::log_softmax(logits.index({mask}), -1), windows_.targets.slice(0, b, e).index({mask}));
  }
  if (forward_seconds) *forward_seconds = forward;
}

at::Tensor GradualEvaluator::scored_log_probs(const CausalLM& model, double* forward_seconds) const {
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
  for_each_batch(source, forward_seconds, check_finite, [&](const at::Tensor& lp, const at::Tensor&) {
    if (!out.defined()) out = at::empty({tokens, lp.size(1)}, lp.options());
    out.slice(0, offset, offset + lp.size(0)).copy_(lp);
    offset += lp.size(0);
  });
  GRADQ_CHECK(offset == tokens, "internal: scored {} tokens, the windows score {}", offset, tokens);
  return out;
}

void GradualEvaluator::set_reference(const CausalLM& reference) {
  Reference ref;
  // The reference pass is every run's first look at the model's outputs: always checked.
  ref.log_probs = gather_log_probs(whole_model(reference), nullptr, true);
  ref.targets = windows_.targets.index({scored_mask_});
  ref.windows_fingerprint = windows_.inputs;
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

EvalResult GradualEvaluator::evaluate(const CausalLM& model) const { return evaluate(whole_model(model)); }

EvalResult GradualEvaluator::evaluate(const LogitsSource& source) const {
  const auto start = Clock::now();
  c10::InferenceMode guard;
  TokenRecords rec;
  double forward = 0;
  int64_t offset = 0;
  for_each_batch(source, &forward, options_.check_finite, [&](const at::Tensor& lp, const at::Tensor& scored_targets) {
    at::Tensor targets = scored_targets.unsqueeze(1);
    at::Tensor lp_target = lp.gather(1, targets).squeeze(1);
    rec.nll.push_back(-lp_target);
    if (reference_) {
      at::Tensor ref = reference_->log_probs.slice(0, offset, offset + lp.size(0));
      at::Tensor ref_target = ref.gather(1, targets).squeeze(1);
      rec.nll_ref.push_back(-ref_target);
      rec.kl.push_back((ref.exp() * (ref - lp)).sum(-1).clamp_min(0));
      rec.delta_p.push_back(lp_target.exp() - ref_target.exp());
      rec.same_top.push_back((lp.argmax(-1) == ref.argmax(-1)).to(at::kDouble));
    }
    offset += lp.size(0);
  });

  EvalResult r;
  at::Tensor nll = cat(rec.nll);
  r.tokens = nll.numel();
  r.nll = mean_estimate(nll);
  r.ppl = {std::exp(r.nll.value), std::exp(r.nll.value) * r.nll.stderr_};
  if (reference_) {
    GRADQ_CHECK(offset == reference_->log_probs.size(0), "internal: scored {} tokens, reference has {}", offset,
                reference_->log_probs.size(0));
    at::Tensor nll_ref = cat(rec.nll_ref), kl = cat(rec.kl), dp = cat(rec.delta_p);
    const double n = static_cast<double>(r.tokens);
    const Estimate ref_nll = mean_estimate(nll_ref);
    r.reference_ppl = Estimate{std::exp(ref_nll.value), std::exp(ref_nll.value) * ref_nll.stderr_};
    KlStats k;
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
