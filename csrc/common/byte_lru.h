#pragma once
// ByteLru: values kept for reuse up to a byte budget, least recently used dropped first. The caches
// of quantized weights (the probes' WeightCache, the search's CandidateCache) hold tensors that are
// cheap to compute again compared with keeping every one for a whole run on a large model.

#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <utility>

#include "common/error.h"

namespace gradq {

template <class Key, class Value>
class ByteLru {
 public:
  /// Called with each entry that insert() drops to stay within the budget (not with erased ones), just
  /// before it is destroyed: a cache with a second tier moves it there.
  using OnEvict = std::function<void(const Key&, Value&&)>;

  explicit ByteLru(int64_t max_bytes, OnEvict on_evict = {}) : max_bytes_(max_bytes), on_evict_(std::move(on_evict)) {
    GRADQ_CHECK(max_bytes >= 0, "a cache's byte budget must be >= 0, got {}", max_bytes);
  }

  /// The value under `key` (now the most recently used), or null.
  const Value* find(const Key& key) {
    auto it = entries_.find(key);
    if (it == entries_.end()) return nullptr;
    recent_.splice(recent_.begin(), recent_, it->second.position);
    return &it->second.value;
  }

  /// Keeps `value` (counted as `bytes`) under `key`, dropping the least recently used entries until
  /// the total fits the budget. A value larger than the whole budget is kept alone, so that the
  /// caller's next find() of it still succeeds.
  void insert(const Key& key, Value value, int64_t bytes) {
    GRADQ_CHECK(bytes >= 0, "an entry's size must be >= 0 bytes, got {}", bytes);
    erase(key);
    while (!recent_.empty() && bytes_ + bytes > max_bytes_) {
      const Key oldest = recent_.back();
      if (on_evict_) on_evict_(oldest, std::move(entries_.at(oldest).value));
      erase(oldest);
    }
    recent_.push_front(key);
    entries_.emplace(key, Entry{std::move(value), bytes, recent_.begin()});
    bytes_ += bytes;
  }

  void erase(const Key& key) {
    auto it = entries_.find(key);
    if (it == entries_.end()) return;
    bytes_ -= it->second.bytes;
    recent_.erase(it->second.position);
    entries_.erase(it);
  }

  int64_t bytes() const { return bytes_; }
  int64_t max_bytes() const { return max_bytes_; }
  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    Value value;
    int64_t bytes = 0;
    typename std::list<Key>::iterator position;
  };
  int64_t max_bytes_ = 0, bytes_ = 0;
  OnEvict on_evict_;
  std::list<Key> recent_;  // most recently used first
  std::map<Key, Entry> entries_;
};

}  // namespace gradq
