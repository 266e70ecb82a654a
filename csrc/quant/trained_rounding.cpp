#include "quant/trained_rounding.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/error.h"
#include "quant/checked_inputs.h"
#include "quant/quant_math.h"
#include "quant/quantize.h"

namespace gradq {
namespace {

// The weight, its grouping and XtX, fixed for the whole optimisation. Element tensors are
// [out, groups, glen]: the last group of a row is padded with zeros to glen columns, so that a
// group is one slice of the last dimension (the padding's W, offsets and gradient are 0, and it is
// cut off before the GEMM and the packing).
struct Problem {
  at::Tensor w;       // float32 [out, groups, glen]
  at::Tensor w_d;     // float64, the same values
  at::Tensor h;       // float64 [in, in]: (XtX + XtX^T) / 2
  at::Tensor lo, hi;  // float32 [out, groups]: minimum and maximum of each group, the range quantize() sees
  at::Tensor signed_absmax;  // float32 [out, groups]: symmetric formats' quant_sym_signed_absmax(lo, hi)
  int64_t out = 0, in = 0, glen = 0, groups = 0;
  int bits = 0;
  float max_code = 0.f;
  bool symmetric = false;
  bool fp16_scale = true;

  // A float32 tensor shaped like `like` holding `value`: dividing by it is IEEE division, where
  // dividing by a scalar may become a multiply by its reciprocal (CUDA does that).
  at::Tensor full(const at::Tensor& like, double value) const { return at::full_like(like, value); }
};

// Learned parameters. Symmetric formats use only clip_lo, the factor on the signed absmax.
struct Params {
  at::Tensor v;        // float32 [out, groups, glen], rounding offsets in [-0.5, 0.5]
  at::Tensor clip_lo;  // float32 [out, groups]
  at::Tensor clip_hi;  // float32 [out, groups]
};

// One iterate in stored form: what gets packed, and what its loss and gradient are computed from.
struct Iterate {
  at::Tensor scale, zero;  // float32 [out, groups]: scale as stored, integer zero point
  at::Tensor code;         // float32 [out, groups, glen]: integer codes
  at::Tensor in_range;     // bool, same shape: the code was not clamped
  at::Tensor w_q;          // float32, same shape: scale * (code - zero)
};

// XtX's symmetric part: trace(D H D^T) = trace(D H_sym D^T) for any D, and the gradient of the loss
// is -2 D H_sym.
at::Tensor symmetric_xtx(const at::Tensor& xtx, int64_t in, const at::Device& device) {
  const at::Tensor h = checked_xtx(xtx, in, device, "train_rounding");
  return ((h + h.t()) * 0.5).contiguous();
}

Problem make_problem(const at::Tensor& w, const QuantSpec& spec, const at::Tensor& xtx) {
  Problem p;
  const at::Tensor wf = checked_weight(w, "train_rounding");
  p.out = wf.size(0);
  p.in = wf.size(1);
  p.h = symmetric_xtx(xtx, p.in, wf.device());
  p.glen = spec.group_len(p.in);
  p.groups = spec.n_groups(p.in);
  p.bits = spec.bits();
  p.max_code = static_cast<float>(quant_max_code(p.bits));
  p.symmetric = spec.symmetric;
  p.fp16_scale = spec.fp16_scale;
  const int64_t pad = p.groups * p.glen - p.in;
  p.w = at::constant_pad_nd(wf, {0, pad}).view({p.out, p.groups, p.glen});
  p.w_d = p.w.to(at::kDouble);
  // The padding must not enter a group's range.
  const at::Tensor valid = (at::arange(p.groups * p.glen, wf.options().dtype(at::kLong)) < p.in).view({1, p.groups, p.glen});
  p.lo = at::where(valid, p.w, p.full(p.w, INFINITY)).amin(-1);
  p.hi = at::where(valid, p.w, p.full(p.w, -INFINITY)).amax(-1);
  // quant_sym_signed_absmax: the ranges widened to include 0, the larger-magnitude end, hi on a tie.
  const at::Tensor zero = at::zeros_like(p.lo);
  const at::Tensor lo0 = at::where(p.lo < 0, p.lo, zero), hi0 = at::where(p.hi > 0, p.hi, zero);
  p.signed_absmax = at::where(hi0 >= -lo0, hi0, lo0);
  return p;
}

// The value a scale takes once stored (quant_round_scale): torch's float -> half conversion
// rounds to nearest even like float_to_half_bits (tested against each other on all floats).
at::Tensor round_scale(const Problem& p, const at::Tensor& scale) {
  return p.fp16_scale ? scale.to(at::kHalf).to(at::kFloat) : scale;
}

// Stored parameters of every group under the clip factors: with factors 1 exactly the parameters
// quantize() computes, with others those quantize_clipped() would for the same shrunken range.
// Written as quant_asym_params / quant_sym_params, operation for operation.
void group_params(const Problem& p, const Params& params, Iterate& it) {
  if (p.symmetric) {
    const at::Tensor sam = p.signed_absmax * params.clip_lo;
    it.scale = round_scale(p, sam / p.full(sam, -quant_sym_zero(p.bits)));
    it.zero = p.full(it.scale, quant_sym_zero(p.bits));
  } else {
    const at::Tensor lo_c = p.lo * params.clip_lo, hi_c = p.hi * params.clip_hi;
    const at::Tensor zero = at::zeros_like(lo_c);
    const at::Tensor lo = at::where(lo_c < 0, lo_c, zero), hi = at::where(hi_c > 0, hi_c, zero);
    it.scale = round_scale(p, (hi - lo) / p.full(lo, p.max_code));
    // For a zero scale the quotient is NaN or inf and not selected.
    at::Tensor z = at::round(-lo / it.scale);
    z = at::where(z > 0, z, zero);
    z = at::where(z < p.max_code, z, p.full(z, p.max_code));
    it.zero = at::where(it.scale > 0, z, zero);
  }
  const at::Tensor bad = ~at::isfinite(it.scale);
  if (bad.any().item<bool>()) {
    const int64_t k = bad.flatten().nonzero()[0].item<int64_t>();
    GRADQ_CHECK(false,
                "train_rounding: group {} of row {} needs a scale beyond the fp16 range (weights too large); "
                "use fp32 scales",
                k % p.groups, k / p.groups);
  }
}

// The exact stored result of the parameters: the code is quant_code(w * inv_scale + v, 1, zero)
// (multiplying by 1 is exact, so with v = 0 it is bit for bit the round-to-nearest code), and
// W_q = quant_dequant(code). `in_range` marks the codes that were not clamped: only their offsets
// get a gradient.
Iterate quantize_iterate(const Problem& p, const Params& params) {
  Iterate it;
  group_params(p, params, it);
  const at::Tensor inv = at::where(it.scale != 0, at::ones_like(it.scale) / it.scale, at::zeros_like(it.scale));
  const at::Tensor unclamped = at::round(p.w * inv.unsqueeze(-1) + params.v) + it.zero.unsqueeze(-1);
  it.code = at::clamp(unclamped, 0.0, p.max_code);
  it.in_range = (unclamped >= 0) & (unclamped <= p.max_code);
  it.w_q = it.scale.unsqueeze(-1) * (it.code - it.zero.unsqueeze(-1));
  return it;
}

// The padding columns of a [out, groups, glen] tensor cut off: [out, in].
at::Tensor unpadded(const Problem& p, const at::Tensor& t) {
  return t.reshape({p.out, p.groups * p.glen}).narrow(1, 0, p.in);
}

// Loss trace(D H D^T) with D = W - W_q, and E = D H (the loss gradient is -2 E), E returned padded
// to [out, groups, glen] with zeros. The row losses are added on the host in row order.
double output_error(const Problem& p, const Iterate& it, at::Tensor& e) {
  const at::Tensor d = unpadded(p, p.w_d - it.w_q.to(at::kDouble));
  const at::Tensor e_rows = d.matmul(p.h);
  const at::Tensor row_loss = (d * e_rows).sum(1).cpu().contiguous();
  e = at::constant_pad_nd(e_rows, {0, p.groups * p.glen - p.in}).view({p.out, p.groups, p.glen});
  const double* l = row_loss.data_ptr<double>();
  double loss = 0.0;
  for (int64_t r = 0; r < p.out; ++r) loss += l[r];
  return loss;
}

// p - lr * sign(g), clamped to [lo, hi]. `g` float64; p float32 (lr * sign is exactly +-lr or 0).
at::Tensor signed_update(const at::Tensor& param, const at::Tensor& g, float lr, double lo, double hi) {
  return at::clamp(param - at::sign(g).to(at::kFloat) * lr, lo, hi);
}

// One signed-gradient step from the iterate `it` (whose E = D H is `e`), straight-through:
//   in range:  W_q = s * rint(w / s + v)            dW_q/dv = s, dW_q/ds = (q - z) - w / s
//   clamped:   W_q = s * (q - z), q fixed           dW_q/dv = 0, dW_q/ds = q - z, dW_q/dz = -s
// with s the stored scale (its fp16 rounding has derivative 1). The group's scale and zero then
// carry the gradient to the clip factors:
//   asymmetric: lo' = min(c_lo * lo, 0), hi' = max(c_hi * hi, 0), s = (hi' - lo') / max_code,
//               z = clamp(rint(-lo' / s), 0, max_code)
//   symmetric:  s = c * signed_absmax / -2^(bits-1), z fixed.
// A group with a zero scale (all zero, or below fp16's smallest subnormal) has W_q = 0 whatever the
// parameters: its parameters stay as they are.
void signed_step(const Problem& p, const Iterate& it, const at::Tensor& e, float lr,
                 const TrainedRoundingOptions& options, Params& params) {
  const at::Tensor s = it.scale.to(at::kDouble).unsqueeze(-1);
  const at::Tensor inv = at::where(it.scale != 0, at::ones_like(it.scale) / it.scale, at::zeros_like(it.scale))
                             .to(at::kDouble)
                             .unsqueeze(-1);
  const at::Tensor g_wq = e * -2.0;
  const at::Tensor q_minus_z = it.code.to(at::kDouble) - it.zero.to(at::kDouble).unsqueeze(-1);
  const at::Tensor no_grad = at::zeros_like(g_wq);
  params.v = signed_update(params.v, at::where(it.in_range, g_wq * s, no_grad), lr, -0.5, 0.5);
  if (!options.learn_clipping) return;

  const at::Tensor live = it.scale != 0;
  const at::Tensor g_scale =
      at::where(it.in_range, g_wq * (q_minus_z - p.w_d * inv), g_wq * q_minus_z).sum(-1);
  const double min_clip = options.min_clip;
  if (p.symmetric) {
    const at::Tensor g_clip = g_scale * p.signed_absmax.to(at::kDouble) / -static_cast<double>(quant_sym_zero(p.bits));
    params.clip_lo = at::where(live, signed_update(params.clip_lo, g_clip, lr, min_clip, 1.0), params.clip_lo);
    return;
  }
  const at::Tensor g_zero = at::where(it.in_range, no_grad, -(g_wq * s)).sum(-1);
  const at::Tensor lo_c = p.lo * params.clip_lo, hi_c = p.hi * params.clip_hi;
  const at::Tensor lo_w = at::where(lo_c < 0, lo_c, at::zeros_like(lo_c));
  // The zero point passes its gradient only where its own clamp did not bind.
  const at::Tensor zero_unclamped = at::round(-lo_w / it.scale);
  const at::Tensor z_pass = (zero_unclamped >= 0) & (zero_unclamped <= p.max_code);
  const at::Tensor g_zero_pass = at::where(z_pass, g_zero, at::zeros_like(g_zero));
  const at::Tensor sg = s.squeeze(-1), lo_wd = lo_w.to(at::kDouble);
  // s enters directly and through z = rint(-lo' / s): dz/ds = lo' / s^2, dz/dlo' = -1 / s.
  const at::Tensor g_s_total = g_scale + g_zero_pass * lo_wd / (sg * sg);
  const at::Tensor g_lo = -g_s_total / static_cast<double>(p.max_code) - g_zero_pass / sg;
  const at::Tensor g_hi = g_s_total / static_cast<double>(p.max_code);
  const at::Tensor g_none = at::zeros_like(g_lo);
  const at::Tensor g_clip_lo = at::where(lo_c < 0, g_lo * p.lo.to(at::kDouble), g_none);
  const at::Tensor g_clip_hi = at::where(hi_c > 0, g_hi * p.hi.to(at::kDouble), g_none);
  params.clip_lo = at::where(live, signed_update(params.clip_lo, g_clip_lo, lr, min_clip, 1.0), params.clip_lo);
  params.clip_hi = at::where(live, signed_update(params.clip_hi, g_clip_hi, lr, min_clip, 1.0), params.clip_hi);
}

}  // namespace

TrainedRoundingResult train_rounding(const at::Tensor& w, const QuantSpec& spec, const at::Tensor& xtx,
                                     const TrainedRoundingOptions& options) {
  GRADQ_CHECK(spec.is_integer(), "train_rounding: expected an integer level ({}), got {}",
              quant_integer_level_names(), quant_level_name(spec.level));
  spec.validate();
  // Its ranges are trained per group against a scale stored per group; a k format's scale also
  // depends on the other groups of its super-group.
  GRADQ_CHECK(spec.sub_scale_bits == 0, "train_rounding: expected a format with direct scales (e.g. b4g32, b4g32s), got {}",
              spec.name());
  GRADQ_CHECK(options.iterations >= 0, "train_rounding: expected iterations >= 0, got {}", options.iterations);
  GRADQ_CHECK(std::isfinite(options.learning_rate) && options.learning_rate >= 0.0,
              "train_rounding: expected a learning rate >= 0 (0: 1 / iterations), got {}", options.learning_rate);
  GRADQ_CHECK(options.min_clip > 0.f && options.min_clip <= 1.f, "train_rounding: expected min_clip in (0, 1], got {}",
              options.min_clip);
  const Problem p = make_problem(w, spec, xtx);

  Params params{at::zeros_like(p.w), at::ones_like(p.lo), at::ones_like(p.lo)};
  const int iterations = options.iterations;
  const double lr = options.learning_rate > 0.0 ? options.learning_rate : (iterations > 0 ? 1.0 / iterations : 0.0);

  TrainedRoundingResult result;
  Iterate best;
  at::Tensor e;
  for (int k = 0; k <= iterations; ++k) {
    const Iterate current = quantize_iterate(p, params);
    const double loss = output_error(p, current, e);
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
    signed_step(p, current, e, lr_k, options, params);
  }
  result.packed = pack_codes(unpadded(p, best.code).to(at::kByte), best.scale, best.zero, spec);
  return result;
}

}  // namespace gradq
