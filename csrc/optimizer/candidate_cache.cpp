#include "optimizer/candidate_cache.h"

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <vector>

#include "common/error.h"

namespace gradq {

namespace {

// The tensors of a QuantizedTensor (const or not), in one fixed order: what held_bytes counts and the
// spill stores.
template <class Q>
auto tensors_of(Q& q) {
  return std::array{&q.packed.codes, &q.packed.scales, &q.packed.zeros, &q.packed.sub_scales, &q.values};
}

// /var/tmp rather than /tmp: on many systems /tmp is a tmpfs, memory again, while /var/tmp is on disk
// for large temporary files by convention.
std::string spill_dir_or_default(const std::string& dir) {
  if (!dir.empty()) return dir;
  const char* tmp = std::getenv("TMPDIR");
  if (tmp && *tmp) return tmp;
  return std::filesystem::is_directory("/var/tmp") ? "/var/tmp" : "/tmp";
}

}  // namespace

int64_t held_bytes(const QuantizedTensor& q) {
  int64_t total = 0;
  for (const at::Tensor* t : tensors_of(q))
    if (t->defined()) total += static_cast<int64_t>(t->nbytes());
  return total;
}

class CandidateSpill {
 public:
  explicit CandidateSpill(const CandidateSpillOptions& options) : max_bytes_(options.max_bytes) {
    const std::string dir = spill_dir_or_default(options.dir);
    std::string path = dir + "/gradq_candidates.XXXXXX";
    fd_ = mkstemp(path.data());
    GRADQ_CHECK(fd_ >= 0, "cannot make the candidate spill file in '{}': {}", dir, std::strerror(errno));
    unlink(path.c_str());  // the open descriptor keeps it; the system frees it when the process ends
  }
  ~CandidateSpill() { close(fd_); }

  bool contains(const std::string& key) const { return stored_.count(key) > 0; }
  int64_t bytes() const { return end_; }

  /// Appends `q`'s tensors; false (and nothing recorded) when the file would pass its budget or the
  /// write fails, as on a full disk: the candidate is then dropped as without a spill.
  bool write(const std::string& key, QuantizedTensor&& q) {
    if (failed_) return false;
    Stored stored;
    stored.shell = std::move(q);
    int64_t offset = end_;
    const auto tensors = tensors_of(stored.shell);
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (!tensors[i]->defined()) continue;
      const at::Tensor host = tensors[i]->cpu().contiguous();
      const int64_t n = static_cast<int64_t>(host.nbytes());
      if (offset + n > max_bytes_ || !write_at(host.data_ptr(), n, offset)) return false;
      stored.slots[i] = Slot{true, host.scalar_type(), host.sizes().vec(), tensors[i]->device(), offset, n};
      offset += n;
      tensors[i]->reset();  // the shell keeps the spec and shape only
    }
    end_ = offset;
    stored_[key] = std::move(stored);
    return true;
  }

  /// The candidate under `key` read back, byte for byte, on the device it was on.
  QuantizedTensor read(const std::string& key) const {
    const Stored& stored = stored_.at(key);
    QuantizedTensor q = stored.shell;
    const auto tensors = tensors_of(q);
    for (size_t i = 0; i < tensors.size(); ++i) {
      const Slot& slot = stored.slots[i];
      if (!slot.defined) continue;
      at::Tensor host = at::empty(slot.sizes, at::TensorOptions().dtype(slot.dtype));
      GRADQ_CHECK(static_cast<int64_t>(host.nbytes()) == slot.bytes,
                  "internal: a spilled tensor of {} bytes reads back as {}", slot.bytes, host.nbytes());
      read_at(host.data_ptr(), slot.bytes, slot.offset);
      *tensors[i] = host.to(slot.device);
    }
    return q;
  }

  void erase(const std::string& key) { stored_.erase(key); }

 private:
  struct Slot {
    bool defined = false;
    at::ScalarType dtype = at::kByte;
    std::vector<int64_t> sizes;
    at::Device device = at::kCPU;
    int64_t offset = 0, bytes = 0;
  };
  struct Stored {
    QuantizedTensor shell;
    std::array<Slot, 5> slots;
  };

  bool write_at(const void* data, int64_t n, int64_t offset) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      const ssize_t done = pwrite(fd_, p, static_cast<size_t>(n), offset);
      if (done < 0 && errno == EINTR) continue;
      if (done <= 0) {
        failed_ = true;  // no space, or a broken disk: stop spilling rather than fail the search
        return false;
      }
      p += done, n -= done, offset += done;
    }
    return true;
  }

  void read_at(void* data, int64_t n, int64_t offset) const {
    char* p = static_cast<char*>(data);
    while (n > 0) {
      const ssize_t done = pread(fd_, p, static_cast<size_t>(n), offset);
      if (done < 0 && errno == EINTR) continue;
      GRADQ_CHECK(done > 0, "cannot read a candidate back from the spill file: {}",
                  done < 0 ? std::strerror(errno) : "the file ends early");
      p += done, n -= done, offset += done;
    }
  }

  int fd_ = -1;
  int64_t max_bytes_ = 0, end_ = 0;
  bool failed_ = false;
  std::map<std::string, Stored> stored_;
};

CandidateCache::CandidateCache(int64_t max_bytes, const CandidateSpillOptions& spill)
    : entries_(max_bytes, [this](const std::string& key, QuantizedTensor&& q) { this->spill(key, std::move(q)); }) {
  GRADQ_CHECK(spill.max_bytes >= 0, "a spill's byte budget must be >= 0, got {}", spill.max_bytes);
  if (spill.max_bytes > 0) spill_ = std::make_unique<CandidateSpill>(spill);
}

CandidateCache::~CandidateCache() = default;

const QuantizedTensor* CandidateCache::find(const std::string& key) {
  if (const QuantizedTensor* q = entries_.find(key)) return q;
  if (!spill_ || !spill_->contains(key)) return nullptr;
  QuantizedTensor q = spill_->read(key);
  ++spill_reads_;
  const int64_t bytes = held_bytes(q);
  entries_.insert(key, std::move(q), bytes);  // still in the spill: dropping it again writes nothing
  return entries_.find(key);
}

void CandidateCache::insert(const std::string& key, const QuantizedTensor& q) {
  if (spill_) spill_->erase(key);  // a new value under an old key
  entries_.insert(key, q, held_bytes(q));
}

void CandidateCache::erase(const std::string& key) {
  entries_.erase(key);
  if (spill_) spill_->erase(key);
}

int64_t CandidateCache::spilled_bytes() const { return spill_ ? spill_->bytes() : 0; }

void CandidateCache::spill(const std::string& key, QuantizedTensor&& q) {
  if (spill_ && !spill_->contains(key)) spill_->write(key, std::move(q));
}

}  // namespace gradq
