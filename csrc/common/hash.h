#pragma once
// 64-bit FNV-1a: a fast, stable hash to tell inputs apart (noise seeds by weight name, a sweep's
// configuration fingerprint). Not a defence against deliberate collisions.

#include <cstddef>
#include <cstdint>

namespace gradq {

class Fnv1a {
 public:
  Fnv1a& bytes(const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; ++i) state_ = (state_ ^ p[i]) * 0x100000001b3ULL;
    return *this;
  }
  uint64_t value() const { return state_; }

 private:
  uint64_t state_ = 0xcbf29ce484222325ULL;
};

}  // namespace gradq
