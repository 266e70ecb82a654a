#pragma once
// CandidateCache: the search's quantized candidates by (weight, spec, method), kept for reuse up to a
// byte budget (least recently used dropped first). The allocator asks for the points on each weight's
// hull again in every whole-plan pass, and drops the others once the weight's curve is measured (a
// point above the hull is never chosen); a sweep's points ask for the same candidates again (trained
// rounding above all), so a sweep shares one cache between its points. Bounded because keeping every
// candidate of a large model costs about twice its fp32 bytes; one dropped is quantized again, with
// the same result (for GPTQ after the input statistics of its block are collected again).

#include <cstdint>
#include <string>

#include "common/byte_lru.h"
#include "quant/quantized_tensor.h"

namespace gradq {

/// Bytes of the tensors a QuantizedTensor holds (codes, side information, float values).
int64_t held_bytes(const QuantizedTensor& q);

class CandidateCache {
 public:
  static constexpr int64_t kDefaultMaxBytes = int64_t{256} << 20;
  explicit CandidateCache(int64_t max_bytes = kDefaultMaxBytes) : entries_(max_bytes) {}

  /// The candidate under `key`, or null.
  const QuantizedTensor* find(const std::string& key) { return entries_.find(key); }
  /// Keeps `q` under `key` within the budget (held_bytes).
  void insert(const std::string& key, const QuantizedTensor& q) { entries_.insert(key, q, held_bytes(q)); }
  /// Drops the candidate under `key`, if any.
  void erase(const std::string& key) { entries_.erase(key); }

  int64_t bytes() const { return entries_.bytes(); }
  int64_t max_bytes() const { return entries_.max_bytes(); }
  size_t size() const { return entries_.size(); }

 private:
  ByteLru<std::string, QuantizedTensor> entries_;
};

}  // namespace gradq
