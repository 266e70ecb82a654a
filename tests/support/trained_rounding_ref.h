#pragma once
// The scalar trained rounding that csrc/quant/trained_rounding.cpp replaced (gradq 5c8907e, a triple
// loop, O(out * in^2) per iteration), kept only as the tests' reference: same documented algorithm,
// written element by element with quant_math.h, serial, loss summed row by row in order. Never
// optimized; the tensor implementation is tested against it. Its input checks throw c10::Error
// (the quant suite links no fmt).

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <c10/util/Exception.h>
#include "quant/packed_weight.h"
#include "quant/quant_math.h"
#include "quant/trained_rounding.h"
#include "quant/row_params.h"

namespace gradq::test {
namespace trained_rounding_ref_detail {

// The weight, its grouping and XtX, fixed for the whole optimisation.
struct Problem {
  at::Tensor w_owner;  // float32 [out, in] contiguous
  at::Tensor h_owner;  // float64 [in, in] contiguous: (XtX + XtX^T) / 2
  const float* w = nullptr;
  const double* h = nullptr;
  int64_t out = 0, in = 0, glen = 0, groups = 0;
  int bits = 0;
  float max_code = 0.f;
  bool symmetric = false;
  bool fp16_scale = true;
  // Per group [out * groups]: the minimum and maximum of the weights, the range quantize() sees.
  std::vector<float> lo, hi;

  int64_t group_begin(int64_t g) const { return g * glen; }
  int64_t group_end(int64_t g) const { return std::min(in, (g + 1) * glen); }
};

// Learned parameters. Symmetric formats use only clip_lo, the factor on the signed absmax.
struct Params {
  std::vector<float> v;        // [out * in] rounding offsets in [-0.5, 0.5]
  std::vector<float> clip_lo;  // [out * groups] asymmetric: factor on the minimum
  std::vector<float> clip_hi;  // [out * groups] asymmetric: factor on the maximum
};

// One iterate in stored form: what gets packed, and what its loss is measured on.
struct Iterate {
  std::vector<uint8_t> codes;        // [out * in], one code per byte
  std::vector<GroupParams> groups;   // [out * groups], scale as stored, integer zero point
};

inline at::Tensor checked_weight(const at::Tensor& w) {
  TORCH_CHECK(w.defined() && w.dim() == 2, "train_rounding: expected a 2-D weight [out_features, in_features], got {}",
              w.defined() ? std::to_string(w.dim()) + "-D" : std::string("an undefined tensor"));
  TORCH_CHECK(w.is_floating_point(), "train_rounding: expected a floating-point weight, got {}",
              c10::toString(w.scalar_type()));
  TORCH_CHECK(w.device().is_cpu(), "train_rounding: expected a CPU weight, got one on {}", w.device().str());
  TORCH_CHECK(w.size(1) > 0, "train_rounding: expected in_features > 0, got [{}, {}]", w.size(0), w.size(1));
  at::Tensor wf = w.to(at::kFloat).contiguous();
  TORCH_CHECK(at::isfinite(wf).all().item<bool>(), "train_rounding: the weight holds NaN or inf values");
  return wf;
}

inline at::Tensor checked_xtx(const at::Tensor& xtx, int64_t in) {
  TORCH_CHECK(xtx.defined(), "train_rounding: expected XtX [{}, {}], got an undefined tensor", in, in);
  TORCH_CHECK(xtx.dim() == 2 && xtx.size(0) == in && xtx.size(1) == in,
              "train_rounding: expected XtX [in_features, in_features] = [{}, {}], got {}", in, in,
              c10::str(xtx.sizes()));
  TORCH_CHECK(xtx.scalar_type() == at::kFloat || xtx.scalar_type() == at::kDouble,
              "train_rounding: expected XtX float32 or float64, got {}", c10::toString(xtx.scalar_type()));
  TORCH_CHECK(xtx.device().is_cpu(), "train_rounding: expected XtX on the CPU, got one on {}", xtx.device().str());
  const at::Tensor h = xtx.to(at::kDouble);
  TORCH_CHECK(at::isfinite(h).all().item<bool>(), "train_rounding: XtX holds NaN or inf values");
  // trace(D H D^T) = trace(D H_sym D^T) for any D, and the gradient of the loss is -2 D H_sym.
  return ((h + h.t()) * 0.5).contiguous();
}

inline Problem make_problem(const at::Tensor& w, const QuantSpec& spec, const at::Tensor& xtx) {
  Problem p;
  p.w_owner = checked_weight(w);
  p.out = p.w_owner.size(0);
  p.in = p.w_owner.size(1);
  p.h_owner = checked_xtx(xtx, p.in);
  p.w = p.w_owner.data_ptr<float>();
  p.h = p.h_owner.data_ptr<double>();
  p.glen = spec.group_len(p.in);
  p.groups = spec.n_groups(p.in);
  p.bits = spec.bits();
  p.max_code = static_cast<float>(quant_max_code(p.bits));
  p.symmetric = spec.symmetric;
  p.fp16_scale = spec.fp16_scale;
  p.lo.resize(p.out * p.groups);
  p.hi.resize(p.out * p.groups);
  for (int64_t r = 0; r < p.out; ++r) {
    for (int64_t g = 0; g < p.groups; ++g) {
      const float* wr = p.w + r * p.in;
      float lo = wr[p.group_begin(g)], hi = lo;
      for (int64_t i = p.group_begin(g); i < p.group_end(g); ++i) {
        lo = std::min(lo, wr[i]);
        hi = std::max(hi, wr[i]);
      }
      p.lo[r * p.groups + g] = lo;
      p.hi[r * p.groups + g] = hi;
    }
  }
  return p;
}

// Stored parameters of group `k` under the clip factors: with factors 1 exactly the parameters
// quantize() computes (quantize.cpp rtn_params), with others those quantize_clipped() would for
// the same shrunken range.
inline GroupParams clipped_params(const Problem& p, int64_t k, float clip_lo, float clip_hi) {
  return p.symmetric ? quant_sym_params(quant_sym_signed_absmax(p.lo[k], p.hi[k]) * clip_lo, p.bits, p.fp16_scale)
                     : quant_asym_params(p.lo[k] * clip_lo, p.hi[k] * clip_hi, p.bits, p.fp16_scale);
}

// The exact stored result of the parameters: group parameters, codes and W_q = dequant(codes).
// The code is quant_code(w * inv_scale + v, 1, zero): multiplying by 1 is exact, so with v = 0 it
// is bit for bit quant_code(w, inv_scale, zero), the round-to-nearest code. `in_range` marks the
// elements whose code was not clamped; only they pass a gradient to their offset.
inline void quantize_iterate(const Problem& p, const Params& params, Iterate& it, float* w_q, uint8_t* in_range) {
  {
    for (int64_t r = 0; r < p.out; ++r) {
      for (int64_t g = 0; g < p.groups; ++g) {
        const int64_t k = r * p.groups + g;
        const GroupParams gp = clipped_params(p, k, params.clip_lo[k], params.clip_hi[k]);
        TORCH_CHECK(std::isfinite(gp.scale),
                    "train_rounding: group {} of row {} needs a scale beyond the fp16 range (weights too large); "
                    "use fp32 scales",
                    g, r);
        it.groups[k] = gp;
        const float inv = quant_inv_scale(gp.scale);
        for (int64_t i = r * p.in + p.group_begin(g); i < r * p.in + p.group_end(g); ++i) {
          const float t = p.w[i] * inv + params.v[i];
          const uint32_t code = quant_code(t, 1.0f, gp.zero, p.bits);
          const float unclamped = rintf(t) + gp.zero;
          it.codes[i] = static_cast<uint8_t>(code);
          in_range[i] = unclamped >= 0.f && unclamped <= p.max_code;
          w_q[i] = quant_dequant(code, gp.scale, gp.zero);
        }
      }
    }
  }
}

// Loss trace(D H D^T) with D = W - W_q, and E = D H (the loss gradient is -2 E). Each row is
// computed serially and the row losses are summed in row order, so the result does not depend
// on the thread count.
inline double output_error(const Problem& p, const float* w_q, double* d, double* e) {
  std::vector<double> row_loss(p.out, 0.0);
  const int64_t in = p.in;
  {
    for (int64_t r = 0; r < p.out; ++r) {
      double* dr = d + r * in;
      double* er = e + r * in;
      for (int64_t j = 0; j < in; ++j) {
        dr[j] = static_cast<double>(p.w[r * in + j]) - static_cast<double>(w_q[r * in + j]);
        er[j] = 0.0;
      }
      for (int64_t j = 0; j < in; ++j) {
        const double dj = dr[j];
        if (dj == 0.0) continue;
        const double* hj = p.h + j * in;
        for (int64_t c = 0; c < in; ++c) er[c] += dj * hj[c];
      }
      double loss = 0.0;
      for (int64_t j = 0; j < in; ++j) loss += dr[j] * er[j];
      row_loss[r] = loss;
    }
  }
  double loss = 0.0;
  for (double l : row_loss) loss += l;
  return loss;
}

inline float sign_of(double g) { return g > 0.0 ? 1.f : (g < 0.0 ? -1.f : 0.f); }

// One signed-gradient step from the iterate `it` (whose E = D H is `e`), straight-through:
//   in range:  W_q = s * rint(w / s + v)            dW_q/dv = s, dW_q/ds = (q - z) - w / s
//   clamped:   W_q = s * (q - z), q fixed           dW_q/dv = 0, dW_q/ds = q - z, dW_q/dz = -s
// with s the stored scale (its fp16 rounding has derivative 1). The group's scale and zero then
// carry the gradient to the clip factors:
//   asymmetric: lo' = min(c_lo * lo, 0), hi' = max(c_hi * hi, 0), s = (hi' - lo') / max_code,
//               z = clamp(rint(-lo' / s), 0, max_code)
//   symmetric:  s = c * signed_absmax / -2^(bits-1), z fixed.
inline void signed_step(const Problem& p, const Iterate& it, const uint8_t* in_range, const double* e, float lr,
                 const TrainedRoundingOptions& options, Params& params) {
  {
    for (int64_t r = 0; r < p.out; ++r) {
      for (int64_t g = 0; g < p.groups; ++g) {
        const int64_t k = r * p.groups + g;
        const GroupParams gp = it.groups[k];
        // A zero scale (an all-zero group, or one below fp16's smallest subnormal) makes every
        // W_q of the group 0 whatever the parameters: no gradient.
        if (gp.scale == 0.f) continue;
        const double s = gp.scale;
        const double inv = quant_inv_scale(gp.scale);
        double g_scale = 0.0, g_zero = 0.0;
        for (int64_t i = r * p.in + p.group_begin(g); i < r * p.in + p.group_end(g); ++i) {
          const double g_wq = -2.0 * e[i];
          const double q_minus_z = static_cast<double>(it.codes[i]) - static_cast<double>(gp.zero);
          double g_v = 0.0;
          if (in_range[i]) {
            g_v = g_wq * s;
            g_scale += g_wq * (q_minus_z - static_cast<double>(p.w[i]) * inv);
          } else {
            g_scale += g_wq * q_minus_z;
            g_zero -= g_wq * s;
          }
          params.v[i] = std::clamp(params.v[i] - lr * sign_of(g_v), -0.5f, 0.5f);
        }
        if (!options.learn_clipping) continue;
        if (p.symmetric) {
          const double signed_absmax = quant_sym_signed_absmax(p.lo[k], p.hi[k]);
          const double g_clip = g_scale * signed_absmax / -static_cast<double>(quant_sym_zero(p.bits));
          params.clip_lo[k] = std::clamp(params.clip_lo[k] - lr * sign_of(g_clip), options.min_clip, 1.f);
          continue;
        }
        const float lo_c = p.lo[k] * params.clip_lo[k];
        const float hi_c = p.hi[k] * params.clip_hi[k];
        const double lo_w = lo_c < 0.f ? lo_c : 0.f;
        // The zero point passes its gradient only where its own clamp did not bind.
        const float zero_unclamped = rintf(-static_cast<float>(lo_w) / gp.scale);
        const double z_pass = zero_unclamped >= 0.f && zero_unclamped <= p.max_code ? 1.0 : 0.0;
        const double g_zero_pass = g_zero * z_pass;
        // s enters directly and through z = rint(-lo' / s): dz/ds = lo' / s^2, dz/dlo' = -1 / s.
        const double g_s_total = g_scale + g_zero_pass * lo_w / (s * s);
        const double g_lo = -g_s_total / p.max_code - g_zero_pass / s;
        const double g_hi = g_s_total / p.max_code;
        const double g_clip_lo = lo_c < 0.f ? g_lo * p.lo[k] : 0.0;
        const double g_clip_hi = hi_c > 0.f ? g_hi * p.hi[k] : 0.0;
        params.clip_lo[k] = std::clamp(params.clip_lo[k] - lr * sign_of(g_clip_lo), options.min_clip, 1.f);
        params.clip_hi[k] = std::clamp(params.clip_hi[k] - lr * sign_of(g_clip_hi), options.min_clip, 1.f);
      }
    }
  }
}

// The iterate in spec's stored layout (quant_spec.h), packed with quant_math.h.
inline PackedWeight pack_iterate(const Problem& p, const QuantSpec& spec, const Iterate& it) {
  // Zero-filled because quant_pack_code ORs codes into place.
  PackedWeight packed = allocate_packed_weight(p.out, p.in, spec, /*zero_fill=*/true);
  uint8_t* codes = packed.codes.data_ptr<uint8_t>();
  const int64_t row_bytes = packed.codes.size(1);
  std::vector<uint8_t> zeros(p.symmetric ? 0 : p.out * p.groups);  // a byte each, then packed
  for (int64_t r = 0; r < p.out; ++r) {
    for (int64_t i = 0; i < p.in; ++i) quant_pack_code(codes + r * row_bytes, i, p.bits, it.codes[r * p.in + i]);
    // The scales are already rounded to their storage type, so their conversion is exact.
    store_row_params(it.groups.data() + r * p.groups, p.groups,
                     p.fp16_scale ? reinterpret_cast<uint16_t*>(packed.scales.data_ptr<at::Half>()) + r * p.groups : nullptr,
                     p.fp16_scale ? nullptr : packed.scales.data_ptr<float>() + r * p.groups,
                     p.symmetric ? nullptr : zeros.data() + r * p.groups);
  }
  if (!p.symmetric) pack_side_fields(zeros.data(), p.out * p.groups, spec.zero_bits(), packed.zeros.data_ptr<uint8_t>());
  packed.validate();
  return packed;
}

}  // namespace trained_rounding_ref_detail

inline TrainedRoundingResult train_rounding_ref(const at::Tensor& w, const QuantSpec& spec, const at::Tensor& xtx,
                                              const TrainedRoundingOptions& options = {}) {
  using namespace trained_rounding_ref_detail;
  TORCH_CHECK(spec.is_integer(), "train_rounding: expected an integer level (int2, int3, int4, int5, int6, int8), got {}",
              quant_level_name(spec.level));
  spec.validate();
  // Its ranges are trained per group against a scale stored per group; a k format's scale also
  // depends on the other groups of its super-group.
  TORCH_CHECK(spec.sub_scale_bits == 0, "train_rounding: expected a format with direct scales (e.g. b4g32, b4g32s), got {}",
              spec.name());
  TORCH_CHECK(options.iterations >= 0, "train_rounding: expected iterations >= 0, got {}", options.iterations);
  TORCH_CHECK(std::isfinite(options.learning_rate) && options.learning_rate >= 0.0,
              "train_rounding: expected a learning rate >= 0 (0: 1 / iterations), got {}", options.learning_rate);
  TORCH_CHECK(options.min_clip > 0.f && options.min_clip <= 1.f, "train_rounding: expected min_clip in (0, 1], got {}",
              options.min_clip);
  const Problem p = make_problem(w, spec, xtx);

  const int64_t n = p.out * p.in;
  Params params{std::vector<float>(n, 0.f), std::vector<float>(p.out * p.groups, 1.f),
                std::vector<float>(p.out * p.groups, 1.f)};
  Iterate current{std::vector<uint8_t>(n), std::vector<GroupParams>(p.out * p.groups)};
  Iterate best;
  std::vector<float> w_q(n);
  std::vector<uint8_t> in_range(n);
  std::vector<double> d(n), e(n);
  const int iterations = options.iterations;
  const double lr = options.learning_rate > 0.0 ? options.learning_rate : (iterations > 0 ? 1.0 / iterations : 0.0);

  TrainedRoundingResult result;
  for (int k = 0; k <= iterations; ++k) {
    quantize_iterate(p, params, current, w_q.data(), in_range.data());
    const double loss = output_error(p, w_q.data(), d.data(), e.data());
    // Iterate 0 (offsets 0, clip factors 1) is round-to-nearest; strictly lower losses only, so a
    // tie keeps the earlier iterate and round-to-nearest wins when training never beats it.
    if (k == 0) {
      result.rtn_loss = result.loss = loss;
      best = current;
    } else if (loss < result.loss) {
      result.loss = loss;
      result.best_iteration = k;
      best = current;
    }
    if (k == iterations) break;
    const float lr_k = static_cast<float>(lr * (1.0 - static_cast<double>(k) / iterations));
    signed_step(p, current, in_range.data(), e.data(), lr_k, options, params);
  }
  result.packed = pack_iterate(p, spec, best);
  return result;
}

}  // namespace gradq::test
