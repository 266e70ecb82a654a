#pragma once
// CandidateCache: the search's quantized candidates by (weight, spec, method), kept for reuse up to a
// byte budget in memory (least recently used dropped first). The allocator asks for the points on each
// weight's hull again in every whole-plan pass, and drops the others once the weight's curve is
// measured (a point above the hull is never chosen); a sweep's points ask for the same candidates
// again (trained rounding above all), so a sweep shares one cache between its points. Memory is
// bounded because keeping every candidate of a large model costs about twice its fp32 bytes.
//
// What memory drops goes to a spill file on disk (up to its own byte budget) and is read back byte for
// byte when asked for again. Without it a dropped candidate is quantized again, with the same result,
// but for GPTQ only after the full-precision inputs of every block up to its own are computed again:
// at 22 layers of TinyLlama's width the allocator's whole-plan passes took 15.4 minutes that way and
// 14 seconds with the spill (docs/BENCHMARKS.md).

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "common/byte_lru.h"
#include "quant/quantized_tensor.h"

namespace gradq {

/// Bytes of the tensors a QuantizedTensor holds (codes, side information, float values).
int64_t held_bytes(const QuantizedTensor& q);

/// Where dropped candidates go: a file in `dir` that is unlinked as soon as it is opened, so nothing is
/// left behind however the process ends, appended to and read back with positioned I/O.
class CandidateSpill;

struct CandidateSpillOptions {
  std::string dir;         ///< directory of the spill file; empty: $TMPDIR, else /var/tmp (on disk where /tmp is in memory)
  int64_t max_bytes = 0;   ///< bytes the file may reach; 0: no spill (dropped candidates are quantized again)
};

class CandidateCache {
 public:
  /// 4 MiB: with the spill, memory only saves reading a candidate back (from the page cache, as a
  /// rule), while what it holds is peak memory that grows with the model up to the bound: at 512
  /// wide, 64 -> 16 MiB took 41 MiB off the peak for 58 reads back instead of 20, and at 256 wide
  /// 16 -> 4 MiB took 10 MiB off it for 62 reads back instead of 24, the same output both times
  /// (docs/BENCHMARKS.md; 256 MiB before the spill, when a dropped candidate was quantized again).
  static constexpr int64_t kDefaultMaxBytes = int64_t{4} << 20;
  static constexpr int64_t kDefaultSpillBytes = int64_t{64} << 30;

  /// Throws gradq::Error naming the directory and the system's reason when the spill file cannot be
  /// made there.
  explicit CandidateCache(int64_t max_bytes = kDefaultMaxBytes, const CandidateSpillOptions& spill = {});
  ~CandidateCache();
  CandidateCache(const CandidateCache&) = delete;
  CandidateCache& operator=(const CandidateCache&) = delete;

  /// The candidate under `key` from memory, or read back from the spill (and kept in memory again), or
  /// null.
  const QuantizedTensor* find(const std::string& key);
  /// Keeps `q` under `key` within the memory budget (held_bytes), moving what that drops to the spill.
  void insert(const std::string& key, const QuantizedTensor& q);
  /// Drops the candidate under `key`, if any, from memory and the spill.
  void erase(const std::string& key);

  /// Bytes and entries in memory.
  int64_t bytes() const { return entries_.bytes(); }
  int64_t max_bytes() const { return entries_.max_bytes(); }
  size_t size() const { return entries_.size(); }
  /// Bytes written to the spill file (erased entries' included: the file is only appended to), and
  /// candidates read back from it.
  int64_t spilled_bytes() const;
  int64_t spill_reads() const { return spill_reads_; }

 private:
  void spill(const std::string& key, QuantizedTensor&& q);

  std::unique_ptr<CandidateSpill> spill_;
  int64_t spill_reads_ = 0;
  ByteLru<std::string, QuantizedTensor> entries_;
};

}  // namespace gradq
