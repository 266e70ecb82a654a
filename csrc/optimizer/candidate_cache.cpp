#include "optimizer/candidate_cache.h"

namespace gradq {

int64_t held_bytes(const QuantizedTensor& q) {
  int64_t total = 0;
  for (const at::Tensor* t : {&q.packed.codes, &q.packed.scales, &q.packed.zeros, &q.packed.sub_scales, &q.values})
    if (t->defined()) total += static_cast<int64_t>(t->nbytes());
  return total;
}

}  // namespace gradq
