#pragma once
// Weights on which a fused multiply-add would change codes. quant_code rounds w * inv_scale to a
// float and then to an integer; an FMA contraction rounds the exact product once instead. The two
// differ exactly when the float product is k + 0.5 (a tie, which goes to the even neighbour) while
// the exact product lies just beside it, towards the odd neighbour. These weights are built to be
// such elements, so a quantizer that fuses (a SIMD clone with FMA, nvcc's default contraction)
// gets some of their codes wrong. Torch-free: the CUDA kernel tests use it too.

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "quant/quant_math.h"

namespace gradq::test {

// The format these weights are built for: 8-bit asymmetric, groups of 128, fp16 scales.
constexpr int kNearTieBits = 8;
constexpr int64_t kNearTieGroup = 128;

/// The code of w when w * inv_scale is rounded exactly once, as an FMA would: the code a fused
/// implementation produces.
inline uint32_t fused_code(float w, float inv_scale, float zero, int bits) {
  const double exact = static_cast<double>(w) * static_cast<double>(inv_scale);  // exact: 24 + 24 bits
  const double q = std::nearbyint(exact) + zero;
  const double max_code = quant_max_code(bits);
  return static_cast<uint32_t>(q < 0 ? 0 : (q > max_code ? max_code : q));
}

/// The parameters every group of near_tie_weights() gets: each holds -1 and +1.
inline GroupParams near_tie_params() { return quant_asym_params(-1.f, 1.f, kNearTieBits, /*fp16_scale=*/true); }

/// `rows` x 128 weights for b8g128: in every row, elements 0 and 1 are -1 and +1 (which fix the
/// group's parameters to near_tie_params()), and the other 126 are weights whose code differs
/// between quant_code and fused_code, for integer parts spread over the code range.
inline std::vector<float> near_tie_weights(int64_t rows) {
  const GroupParams gp = near_tie_params();
  const float inv = quant_inv_scale(gp.scale);
  std::vector<float> w(static_cast<size_t>(rows * kNearTieGroup));
  for (int64_t r = 0; r < rows; ++r) {
    float* row = w.data() + r * kNearTieGroup;
    row[0] = -1.f;
    row[1] = 1.f;
    int64_t k = -120 + (r * 37) % 240;  // integer part of the first tie of this row
    for (int64_t i = 2; i < kNearTieGroup; ++i) {
      bool found = false;
      for (int tries = 0; tries < 240 && !found; ++tries, k = k >= 119 ? -120 : k + 1) {
        const double tie = static_cast<double>(k) + 0.5;
        float x = static_cast<float>(tie / inv);
        for (int step = 0; step < 32; ++step) x = std::nextafter(x, -2.f);
        for (int step = 0; step < 64 && !found; ++step) {  // walk up the floats around tie / inv
          const double exact = static_cast<double>(x) * static_cast<double>(inv);
          if (static_cast<float>(exact) == static_cast<float>(tie) && exact != tie &&
              fused_code(x, inv, gp.zero, kNearTieBits) != quant_code(x, inv, gp.zero, kNearTieBits) &&
              std::fabs(x) < 1.f) {
            row[i] = x;
            found = true;
          }
          x = std::nextafter(x, 2.f);
        }
      }
      if (!found) throw std::logic_error("near_tie_weights: no near-tie weight found for element " + std::to_string(i));
    }
  }
  return w;
}

}  // namespace gradq::test
