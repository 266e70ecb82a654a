#include "eval/block_cache.h"

#include <algorithm>
#include <unordered_set>

#include "common/error.h"

namespace gradq {

namespace {

// Whether a state value is one of `rows` windows' own: a floating tensor batched over them. Tables that
// every window shares, such as rotary angles, pass through a block unchanged and carry no window's
// change.
bool per_window_value(const c10::IValue& v, int64_t rows) {
  if (!v.isTensor()) return false;
  const at::Tensor& t = v.toTensor();
  return t.is_floating_point() && t.dim() > 0 && t.size(0) == rows;
}

// `v` with every tensor made in inference mode (also inside tuples and lists, such as the rotary
// (cos, sin) pair a Hugging Face decoder layer takes) copied into a normal tensor.
c10::IValue out_of_inference_mode(const c10::IValue& v) {
  if (v.isTensor()) return v.toTensor().is_inference() ? c10::IValue(v.toTensor().clone()) : v;
  if (v.isTuple()) {
    std::vector<c10::IValue> elements;
    for (const c10::IValue& e : v.toTupleRef().elements()) elements.push_back(out_of_inference_mode(e));
    return c10::ivalue::Tuple::create(std::move(elements));
  }
  if (v.isTensorList()) {
    c10::List<at::Tensor> list;
    for (const at::Tensor& t : v.toTensorList().vec()) list.push_back(t.is_inference() ? t.clone() : t);
    return list;
  }
  if (v.isList()) {
    c10::impl::GenericList list(v.toList().elementType());
    for (const c10::IValue& e : v.toList()) list.push_back(out_of_inference_mode(e));
    return list;
  }
  return v;
}

}  // namespace

BlockInputCache::BlockInputCache(const ModelStages& stages, const at::Tensor& inputs, int64_t batch, Keep keep)
    : stages_(stages), inputs_(inputs), batch_(batch), windows_(inputs.size(0)), keep_(keep) {
  GRADQ_CHECK(batch > 0, "batch must be positive, got {}", batch);
  GRADQ_CHECK(inputs.dim() == 2 && windows_ > 0, "expected tokens [N, T] with N > 0, got {} dimensions", inputs.dim());
  c10::InferenceMode guard;
  states_.assign(num_blocks() + 1, {});
  const int64_t last = keep == Keep::kAll ? num_blocks() : std::min<int64_t>(1, num_blocks());
  for (int64_t b = 0; b < windows_; b += batch) {
    StageState s = stages_.embed(inputs.slice(0, b, std::min(windows_, b + batch)));
    if (b > 0) share_equal_tensors(s, states_[0][0]);
    for (int64_t i = 0; i < last; ++i) {
      StageState next = stages_.block(i, s);
      // A block can make what every batch shares (a llama2c model's first block makes its causal
      // mask and rotary tables), so each boundary's states share with the first batch's.
      if (b > 0) share_equal_tensors(next, states_[i + 1][0]);
      states_[i].push_back(std::move(s));
      s = std::move(next);
    }
    states_[last].push_back(std::move(s));
  }
}

void BlockInputCache::move_to(int64_t b) {
  GRADQ_CHECK(keep_ == Keep::kMoving, "move_to needs a cache that keeps a moving pair of boundaries");
  GRADQ_CHECK(b >= first_kept_ && b <= num_blocks(), "a moving cache only goes forward: expected a block in [{}, {}], got {}",
              first_kept_, num_blocks(), b);
  c10::InferenceMode guard;
  for (; first_kept_ < b; ++first_kept_) {
    const int64_t next = first_kept_ + 2;  // the boundary that comes into the pair
    std::vector<StageState>& dropped = states_[first_kept_];
    for (size_t c = 0; c < dropped.size(); ++c) {
      if (next <= num_blocks()) {
        states_[next].push_back(stages_.block(next - 1, states_[next - 1][c]));
        if (c > 0) share_equal_tensors(states_[next].back(), states_[next].front());
      }
      dropped[c] = {};  // batch by batch: at most one batch above two boundaries
    }
    std::vector<StageState>().swap(dropped);
  }
}

int64_t BlockInputCache::chunk_of(int64_t begin) const {
  GRADQ_CHECK(begin >= 0 && begin < windows_ && begin % batch_ == 0,
              "expected a batch start (a multiple of {} below {}), got window {}", batch_, windows_, begin);
  return begin / batch_;
}

bool BlockInputCache::keeps(int64_t boundary) const {
  return boundary >= 0 && boundary <= num_blocks() && !states_[boundary].empty();
}

const std::vector<StageState>& BlockInputCache::states(int64_t boundary) const {
  GRADQ_CHECK(boundary >= 0 && boundary <= num_blocks(), "expected a boundary in [0, {}], got {}", num_blocks(), boundary);
  GRADQ_CHECK(keeps(boundary), "the states entering block {} are not kept (this cache keeps {} to {})", boundary,
              first_kept_, std::min(first_kept_ + 1, num_blocks()));
  return states_[boundary];
}

const StageState& BlockInputCache::state(int64_t boundary, int64_t chunk) const {
  const std::vector<StageState>& kept = states(boundary);
  GRADQ_CHECK(chunk >= 0 && chunk < static_cast<int64_t>(kept.size()), "expected a batch in [0, {}), got {}",
              kept.size(), chunk);
  return kept[chunk];
}

at::Tensor BlockInputCache::logits_from(int64_t from, int64_t chunk) const {
  c10::InferenceMode guard;
  if (from < 0) {
    GRADQ_CHECK(from == -1, "expected a block in [-1, {}], got {}", num_blocks(), from);
    chunk_of(chunk * batch_);  // checks the batch
    return stages_.logits_from(0, stages_.embed(inputs_.slice(0, chunk * batch_, std::min(windows_, (chunk + 1) * batch_))));
  }
  return stages_.logits_from(from, state(from, chunk));
}

at::Tensor BlockInputCache::local_error(int64_t b) const {
  GRADQ_CHECK(b >= 0 && b < num_blocks(), "expected a block in [0, {}), got {}", num_blocks(), b);
  c10::InferenceMode guard;
  std::vector<at::Tensor> per_window;
  const int64_t batches = (windows_ + batch_ - 1) / batch_;
  for (int64_t c = 0; c < batches; ++c) {
    const StageState out = stages_.block(b, state(b, c));
    const StageState& ref = state(b + 1, c);
    const int64_t rows = std::min(batch_, windows_ - c * batch_);
    at::Tensor sum;  // float64 [rows], on the device of the values that carry the error
    int64_t per_row = 0;
    for (size_t k = 0; k < out.size(); ++k) {
      if (!per_window_value(out[k], rows)) continue;
      const at::Tensor x = out[k].toTensor();
      const at::Tensor d = (x.to(at::kDouble) - ref[k].toTensor().to(at::kDouble)).reshape({rows, -1});
      sum = sum.defined() ? sum + d.pow(2).sum(1) : d.pow(2).sum(1);
      per_row += d.size(1);
    }
    if (!sum.defined()) sum = at::zeros({rows}, at::kDouble);
    per_window.push_back((per_row ? sum / static_cast<double>(per_row) : sum).cpu());
  }
  return at::cat(per_window);
}

std::vector<std::vector<StageState>> output_gradients(const ModelStages& stages, const Windows& windows, int64_t batch) {
  GRADQ_CHECK(batch > 0, "batch must be positive, got {}", batch);
  const int64_t n = windows.size(), blocks = stages.num_blocks();
  const auto tokens = static_cast<double>(windows.scored_tokens());
  GRADQ_CHECK(n > 0 && tokens > 0, "output gradients need windows with scored targets, got {} windows, {} targets", n,
              windows.scored_tokens());
  c10::InferenceMode not_inference(false);
  at::AutoGradMode grad_mode(true);
  std::vector<std::vector<StageState>> gradients(blocks);
  for (int64_t begin = 0; begin < n; begin += batch) {
    const int64_t end = std::min(n, begin + batch), rows = end - begin;
    auto batched = [rows](const c10::IValue& v) { return per_window_value(v, rows); };
    StageState s = stages.embed(windows.inputs.slice(0, begin, end));
    // The stream entering block 0 is the leaf the gradients flow back to (the weights need none).
    for (c10::IValue& v : s)
      if (batched(v)) v = v.toTensor().detach().requires_grad_(true);
    std::vector<StageState> leaving(blocks);
    for (int64_t b = 0; b < blocks; ++b) {
      s = stages.block(b, s);
      for (c10::IValue& v : s)
        if (batched(v) && v.toTensor().requires_grad()) v.toTensor().retain_grad();
      leaving[b] = s;
    }
    const at::Tensor logits = stages.head(s).to(at::kFloat);
    const at::Tensor targets = windows.targets.slice(0, begin, end).to(logits.device());
    const at::Tensor scored = windows.slice(begin, end).scored_mask().to(targets.device());
    const at::Tensor nll = -at::log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1);
    (nll.masked_select(scored).sum() / tokens).backward();
    for (int64_t b = 0; b < blocks; ++b) {
      StageState g(leaving[b].size());  // None where no gradient is kept
      for (size_t k = 0; k < g.size(); ++k)
        if (batched(leaving[b][k]) && leaving[b][k].toTensor().grad().defined())
          g[k] = leaving[b][k].toTensor().grad().detach().to(at::kCPU);
      gradients[b].push_back(std::move(g));
    }
  }
  return gradients;
}

void BlockInputCache::refresh(int64_t from) {
  GRADQ_CHECK(keep_ == Keep::kAll, "refresh needs a cache that keeps every boundary");
  GRADQ_CHECK(from >= -1 && from < num_blocks(), "expected a block in [-1, {}), got {}", num_blocks(), from);
  std::vector<Trial> trials(states_[0].size());
  for (size_t c = 0; c < trials.size(); ++c) logits_from(from, static_cast<int64_t>(c), trials[c]);
  commit(std::move(trials));
}

at::Tensor BlockInputCache::logits_from(int64_t from, int64_t chunk, Trial& trial) const {
  GRADQ_CHECK(from >= -1 && from <= num_blocks(), "expected a block in [-1, {}], got {}", num_blocks(), from);
  c10::InferenceMode guard;
  trial.from = from;
  trial.states.clear();
  StageState s = from < 0 ? stages_.embed(inputs_.slice(0, chunk * batch_, std::min(windows_, (chunk + 1) * batch_)))
                          : state(from, chunk);
  if (from < 0) {  // the state entering block 0
    if (chunk > 0 && !states_[0].empty()) share_equal_tensors(s, states_[0].front());
    trial.states.push_back(s);
  }
  for (int64_t i = std::max<int64_t>(from, 0); i < num_blocks(); ++i) {
    s = stages_.block(i, s);
    // A trial of every batch is held until commit(): share with the first batch's kept state.
    if (chunk > 0 && !states_[i + 1].empty()) share_equal_tensors(s, states_[i + 1].front());
    trial.states.push_back(s);
  }
  return stages_.head(s);
}

void BlockInputCache::commit(std::vector<Trial>&& trials) {
  GRADQ_CHECK(keep_ == Keep::kAll, "commit needs a cache that keeps every boundary");
  GRADQ_CHECK(trials.size() == states_[0].size(), "expected a trial for each of the {} batches, got {}",
              states_[0].size(), trials.size());
  for (size_t c = 0; c < trials.size(); ++c) {
    Trial& t = trials[c];
    GRADQ_CHECK(static_cast<int64_t>(t.states.size()) == num_blocks() - t.from,
                "a trial from block {} must hold {} states, batch {} holds {}", t.from, num_blocks() - t.from, c,
                t.states.size());
    for (size_t k = 0; k < t.states.size(); ++k) states_[t.from + 1 + k][c] = std::move(t.states[k]);
  }
  // A trial shared with the first batch's state it replaces: share with the new one instead.
  int64_t first_changed = num_blocks();
  for (const Trial& t : trials) first_changed = std::min(first_changed, t.from + 1);
  for (int64_t k = first_changed; k <= num_blocks(); ++k)
    for (size_t c = 1; c < states_[k].size(); ++c) share_equal_tensors(states_[k][c], states_[k][0]);
}

double token_weighted_mean(const at::Tensor& per_window, const at::Tensor& tokens, int64_t begin, int64_t end) {
  GRADQ_CHECK(per_window.dim() == 1 && per_window.sizes() == tokens.sizes() && begin >= 0 && begin < end &&
                  end <= per_window.size(0),
              "token_weighted_mean: expected [N] errors and token counts and 0 <= begin < end <= N, got {} and {}, "
              "[{}, {})", per_window.size(0), tokens.size(0), begin, end);
  const at::Tensor t = tokens.slice(0, begin, end);
  return (per_window.slice(0, begin, end) * t).sum().item<double>() / t.sum().item<double>();
}

int64_t BlockInputCache::bytes() const {
  // Values handed on unchanged (rotary tables, masks) are one tensor in many states: count once.
  std::unordered_set<const void*> seen;
  int64_t total = 0;
  for (const auto& boundary : states_)
    for (const StageState& s : boundary)
      for (const c10::IValue& v : s)
        if (v.isTensor() && seen.insert(v.toTensor().storage().data()).second)
          total += static_cast<int64_t>(v.toTensor().storage().nbytes());
  return total;
}

void backward_through_block(const ModelStages& stages, int64_t b, const std::vector<StageState>& inputs,
                            const std::vector<StageState>& output_gradients) {
  GRADQ_CHECK(b >= 0 && b < stages.num_blocks(), "expected a block in [0, {}), got {}", stages.num_blocks(), b);
  GRADQ_CHECK(inputs.size() == output_gradients.size(), "expected the output gradients of {} batches, got {}",
              inputs.size(), output_gradients.size());
  c10::InferenceMode not_inference(false);
  at::AutoGradMode grad_mode(true);
  for (size_t c = 0; c < inputs.size(); ++c) {
    // The inputs of an inference-mode stream cannot be saved for backward: copied out of it.
    StageState in = inputs[c];
    for (c10::IValue& v : in) v = out_of_inference_mode(v);
    const StageState out = stages.block(b, in);
    GRADQ_CHECK(out.size() == output_gradients[c].size(), "block {} returned {} values, its output gradients have {}", b,
                out.size(), output_gradients[c].size());
    at::Tensor dot;  // <output gradient, output>: its gradient is the parameters'
    for (size_t k = 0; k < out.size(); ++k) {
      if (!output_gradients[c][k].isTensor() || !out[k].isTensor() || !out[k].toTensor().requires_grad()) continue;
      const at::Tensor& y = out[k].toTensor();
      const at::Tensor term = (y.to(at::kFloat) * output_gradients[c][k].toTensor().to(y.device(), at::kFloat)).sum();
      dot = dot.defined() ? dot + term : term;
    }
    if (dot.defined()) dot.backward();
  }
}

BlockInputStream::BlockInputStream(const ModelStages& stages, const at::Tensor& inputs, int64_t batch)
    : stages_(stages), inputs_(inputs), batch_(batch) {
  GRADQ_CHECK(batch > 0, "batch must be positive, got {}", batch);
  GRADQ_CHECK(inputs.dim() == 2 && inputs.size(0) > 0, "expected tokens [N, T] with N > 0, got {} dimensions",
              inputs.dim());
  rewind();
}

void BlockInputStream::rewind() {
  c10::InferenceMode guard;
  states_.clear();
  const int64_t windows = inputs_.size(0);
  for (int64_t b = 0; b < windows; b += batch_) {
    states_.push_back(stages_.embed(inputs_.slice(0, b, std::min(windows, b + batch_))));
    if (b > 0) share_equal_tensors(states_.back(), states_.front());
  }
  block_ = 0;
}

void BlockInputStream::advance() {
  GRADQ_CHECK(block_ < stages_.num_blocks(), "the stream is at the head already ({} blocks)", stages_.num_blocks());
  c10::InferenceMode guard;
  for (size_t c = 0; c < states_.size(); ++c) {
    states_[c] = stages_.block(block_, states_[c]);
    if (c > 0) share_equal_tensors(states_[c], states_.front());  // as the cache does
  }
  ++block_;
}

}  // namespace gradq
