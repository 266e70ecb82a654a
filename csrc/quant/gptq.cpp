#include "quant/gptq.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/error.h"
#include "quant/checked_inputs.h"
#include "quant/quant_math.h"

namespace gradq {
namespace {

// Rows of W^T updated per product after each block of columns (see the loop in quantize_gptq), and
// the panel width of the in-place factorisations below.
constexpr int64_t kUpdateRows = 256;

// gptq_column_order from diag(XtX) alone.
at::Tensor column_order(const at::Tensor& diagonal, bool act_order) {
  if (!act_order) return at::arange(diagonal.size(0), diagonal.options().dtype(at::kLong));
  // Stable, so that equal diagonals (dead inputs, duplicated channels) keep index order on every
  // device.
  return std::get<1>(at::sort(diagonal.to(at::kDouble), /*stable=*/true, /*dim=*/0, /*descending=*/true));
}

// The factorisations below work in place on one [in, in] float64 matrix, a panel of kUpdateRows
// rows or columns at a time, where ATen's (linalg_cholesky, cholesky_inverse) each return a new
// matrix: two live at once, 484 MiB at 5632 inputs (a 1B model's down projection).

// Row i of `a` becomes its row order[i] (a permutation), following its cycles: one row of extra memory.
void permute_rows_in_place(at::Tensor& a, const at::Tensor& order) {
  const at::Tensor order_cpu = order.cpu();
  const auto to = order_cpu.accessor<int64_t, 1>();
  const int64_t n = a.size(0);
  std::vector<bool> placed(n, false);
  for (int64_t start = 0; start < n; ++start) {
    if (placed[start]) continue;
    const at::Tensor first = a[start].clone();
    int64_t i = start;
    for (; to[i] != start; i = to[i]) {
      a[i].copy_(a[to[i]]);
      placed[i] = true;
    }
    a[i].copy_(first);
    placed[i] = true;
  }
}

// `a` (X^T X) becomes, in its lower triangle and diagonal, H = X^T X + (X^T X)^T with its rows and
// columns in `order` (row and column i are X^T X's order[i]); its upper triangle is left stale.
void permuted_hessian_in_place(at::Tensor& a, const at::Tensor& order) {
  const int64_t n = a.size(0);
  permute_rows_in_place(a, order);
  for (int64_t r = 0; r < n; r += kUpdateRows) {
    at::Tensor rows = a.narrow(0, r, std::min(kUpdateRows, n - r));
    rows.copy_(rows.index_select(1, order));
  }
  // Row panel r..r+c of the lower triangle plus the matching column panel's transpose; the column
  // panel (rows 0..r+c) is not yet written by the panels before, whose columns end before r.
  for (int64_t r = 0; r < n; r += kUpdateRows) {
    const int64_t c = std::min(kUpdateRows, n - r);
    a.narrow(0, r, c).narrow(1, 0, r + c).add_(a.narrow(0, 0, r + c).narrow(1, r, c).t().clone());
  }
}

// The lower Cholesky factor of the symmetric positive definite matrix whose lower triangle `a`
// holds, in place (blocked, right-looking); the upper triangle is set to 0. Returns 0, or the
// 1-based index of the first pivot that is not positive.
int64_t cholesky_in_place(at::Tensor& a) {
  const int64_t n = a.size(0);
  for (int64_t k = 0; k < n; k += kUpdateRows) {
    const int64_t kb = std::min(kUpdateRows, n - k), rest = n - k - kb;
    at::Tensor diagonal_block = a.narrow(0, k, kb).narrow(1, k, kb);
    const at::Tensor lower = diagonal_block.tril();
    auto [l, info] = at::linalg_cholesky_ex(lower + lower.tril(-1).t());
    if (const int64_t failed = info.item<int64_t>(); failed != 0) return k + failed;
    diagonal_block.copy_(l);
    if (rest == 0) break;
    a.narrow(0, k, kb).narrow(1, k + kb, rest).zero_();
    // The panel below: P L^-T. Then the trailing lower triangle less P P^T, a panel of rows at a time.
    at::Tensor panel = a.narrow(0, k + kb, rest).narrow(1, k, kb);
    panel.copy_(at::linalg_solve_triangular(l.t(), panel, /*upper=*/true, /*left=*/false));
    for (int64_t r = 0; r < rest; r += kUpdateRows) {
      const int64_t c = std::min(kUpdateRows, rest - r);
      a.narrow(0, k + kb + r, c)
          .narrow(1, k + kb, r + c)
          .addmm_(panel.narrow(0, r, c), panel.narrow(0, 0, r + c).t(), /*beta=*/1, /*alpha=*/-1);
    }
  }
  return 0;
}

// L^-1 of the lower triangular `a` (its upper triangle 0), in place. Panels from the last: with the
// trailing M22 = L22^-1 already in place, L21's panel becomes -M22 L21 L11^-1. M22 is lower
// triangular, so each slice of the panel's rows needs only the columns of M22 up to its last row:
// half the multiply-adds of the dense product.
void invert_lower_in_place(at::Tensor& a) {
  const int64_t n = a.size(0);
  for (int64_t k = (n - 1) / kUpdateRows * kUpdateRows; k >= 0; k -= kUpdateRows) {
    const int64_t kb = std::min(kUpdateRows, n - k), rest = n - k - kb;
    at::Tensor diagonal_block = a.narrow(0, k, kb).narrow(1, k, kb);
    const at::Tensor inverse = at::linalg_solve_triangular(diagonal_block, at::eye(kb, a.options()), /*upper=*/false);
    if (rest > 0) {
      at::Tensor panel = a.narrow(0, k + kb, rest).narrow(1, k, kb);
      const at::Tensor m22 = a.narrow(0, k + kb, rest).narrow(1, k + kb, rest);
      const at::Tensor scaled = panel.matmul(inverse);  // L21 L11^-1, a new [rest, kb] matrix
      for (int64_t r = 0; r < rest; r += kUpdateRows) {
        const int64_t c = std::min(kUpdateRows, rest - r);
        at::Tensor rows = panel.narrow(0, r, c);
        at::mm_out(rows, m22.narrow(0, r, c).narrow(1, 0, r + c), scaled.narrow(0, 0, r + c));
      }
      panel.neg_();
    }
    diagonal_block.copy_(inverse);
  }
}

// a[i][j] = a[n-1-i][n-1-j] for all i, j, in place (a half turn: reverses the order of rows and columns).
void reverse_rows_and_columns_in_place(at::Tensor& a) {
  const int64_t n = a.size(0), half = n / 2;
  for (int64_t r = 0; r < half; r += kUpdateRows) {
    const int64_t c = std::min(kUpdateRows, half - r);
    at::Tensor top = a.narrow(0, r, c), bottom = a.narrow(0, n - r - c, c);
    const at::Tensor saved = top.clone();
    top.copy_(bottom.flip({0, 1}));
    bottom.copy_(saved.flip({0, 1}));
  }
  if (n % 2 == 1) a[half].copy_(a[half].flip({0}));
}

void check_gptq_spec(const QuantSpec& spec) {
  GRADQ_CHECK(spec.is_integer(), "quantize_gptq: expected an integer level ({}), got {}",
              quant_integer_level_names(), quant_level_name(spec.level));
  spec.validate();
}

void check_gptq_options(const GptqOptions& options) {
  GRADQ_CHECK(std::isfinite(options.damp) && options.damp >= 0.0,
              "quantize_gptq: expected a dampening >= 0 (a fraction of the mean diagonal), got {}", options.damp);
  GRADQ_CHECK(options.block_size >= 1, "quantize_gptq: expected block_size >= 1, got {}", options.block_size);
}

// Row sums of x [n, in] over each group of `group_len` consecutive columns: [n, n_groups] (the last
// group may be partial).
at::Tensor group_sums(const at::Tensor& x, int64_t group_len) {
  const int64_t n = x.size(0), in = x.size(1), full = in / group_len, rest = in - full * group_len;
  at::Tensor sums = x.narrow(1, 0, full * group_len).reshape({n, full, group_len}).sum(2);
  return rest == 0 ? sums : at::cat({sums, x.narrow(1, full * group_len, rest).sum(1, /*keepdim=*/true)}, 1);
}

// refit_scales (gptq.h): the group scales that minimise trace((W - W_q) H (W - W_q)^T) for the fixed
// `codes` (uint8 [out, in]) and `zeros` (float32 [out, n_groups]), from `scales` (float32 [out,
// n_groups], stored values), all on the weight's device. Row r's error as a function of its scales s
// is s^T N_r s - 2 s^T c_r + const, with a_g the row's (code - zero) on group g and 0 elsewhere,
//   N_r[g][h] = a_g^T H a_h,   c_r[g] = a_g^T H w_r,
// so the best scales solve N_r s = c_r. N_r is positive definite (H is, and the a_g have disjoint
// supports) except for a group whose codes all equal its zero point, which keeps its scale. A row
// takes the solution rounded to the storage type only when its error falls. Returns float32 on the CPU.
at::Tensor refitted_scales(const at::Tensor& wf, const at::Tensor& codes, const at::Tensor& scales,
                           const at::Tensor& zeros, const QuantSpec& spec, const at::Tensor& h) {
  const int64_t out = wf.size(0), in = wf.size(1), groups = scales.size(1), group_len = spec.group_len(in);
  const at::Tensor group_of = at::arange(in, wf.options().dtype(at::kLong)).div(group_len, "floor");
  at::Tensor refitted = scales.clone();
  // Rows a slice at a time: the normal matrices are [rows, groups, groups] float64, 2 GB for 2048
  // rows of 5632 inputs in groups of 16, and the slice's work matrices about six [rows, in] float64
  // ones; slices keep each near 1 MiB (the normal matrices at most 32 MiB, in groups of 16 at 10000
  // inputs and more).
  const int64_t rows_per_slice =
      std::max<int64_t>(1, std::min((int64_t{4} << 20) / (groups * groups), (int64_t{1} << 17) / in));
  for (int64_t r0 = 0; r0 < out; r0 += rows_per_slice) {
    const int64_t n = std::min(rows_per_slice, out - r0);
    const at::Tensor w = wf.narrow(0, r0, n).to(at::kDouble);
    const at::Tensor z = zeros.narrow(0, r0, n).to(at::kDouble);
    const at::Tensor a = codes.narrow(0, r0, n).to(at::kDouble) - z.index_select(1, group_of);
    const at::Tensor c = group_sums(w.mm(h) * a, group_len);
    // N's upper triangle a group's row at a time (groups before g are done by symmetry).
    at::Tensor normal = at::empty({n, groups, groups}, w.options());
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t g0 = g * group_len, len = std::min(group_len, in - g0);
      const at::Tensor row = group_sums(
          a.narrow(1, g0, len).mm(h.narrow(0, g0, len).narrow(1, g0, in - g0)) * a.narrow(1, g0, in - g0), group_len);
      normal.select(1, g).narrow(1, g, groups - g).copy_(row);
      normal.select(2, g).narrow(1, g, groups - g).copy_(row);
    }
    const at::Tensor s0 = scales.narrow(0, r0, n).to(at::kDouble);
    // Solved for the change from s0, so that a group left out (diagonal 0: all its codes at its
    // zero point, no say in the error) keeps its scale exactly.
    const at::Tensor unused = normal.diagonal(0, 1, 2) == 0;
    at::Tensor system = normal.clone();
    system.diagonal(0, 1, 2).masked_fill_(unused, 1.0);
    const at::Tensor gradient = (c - normal.bmm(s0.unsqueeze(2)).squeeze(2)).masked_fill(unused, 0.0);
    const auto [delta, info] = at::linalg_solve_ex(system, gradient);
    at::Tensor s1 = (s0 + delta).to(at::kFloat);
    if (spec.fp16_scale) s1 = s1.to(at::kHalf).to(at::kFloat);
    const at::Tensor s1d = s1.to(at::kDouble);
    auto error = [&](const at::Tensor& s) {  // less its constant, w^T H w
      return (normal.bmm(s.unsqueeze(2)).squeeze(2) * s).sum(1) - 2 * (c * s).sum(1);
    };
    // A scale that changes sign or overflows its type is not taken, nor a solve that failed.
    const at::Tensor keep = (info == 0) & at::isfinite(s1).all(1) & ((s1d * s0) >= 0).all(1) & (error(s1d) < error(s0));
    refitted.narrow(0, r0, n).copy_(at::where(keep.unsqueeze(1), s1, scales.narrow(0, r0, n)));
  }
  return refitted.cpu();
}

// GPTQ's codes (uint8 [out, in], index order) of `wf` on the groups' `scales` and `zeros` (float32
// [out, n_groups] on wf's device).
at::Tensor gptq_codes(const at::Tensor& wf, const QuantSpec& spec, const GptqFactor& factor,
                      const GptqOptions& options, const at::Tensor& scales, const at::Tensor& zeros) {
  const int64_t out = wf.size(0), in = wf.size(1);
  const at::Tensor& perm = factor.order;
  const at::Tensor& u = factor.u;

  // Work on W^T [in, out] in column order, so that a column is a contiguous row.
  at::Tensor wt = wf.t().index_select(0, perm).to(at::kDouble).contiguous();
  // Group parameters as [groups, out] rows, looked up per column (not expanded to [in, out]: three
  // more copies of the weight's size in float32).
  const at::Tensor scale_t = scales.t().contiguous();
  const at::Tensor zero_t = zeros.t().contiguous();
  const at::Tensor inv_t = at::where(scale_t != 0, at::ones_like(scale_t) / scale_t, at::zeros_like(scale_t));
  const at::Tensor group_of = perm.div(spec.group_len(in), "floor").cpu();
  const auto group_at = group_of.accessor<int64_t, 1>();
  const double max_code = quant_max_code(spec.bits());
  at::Tensor codes_t = at::empty({in, out}, wf.options().dtype(at::kByte));  // codes are 0..255

  for (int64_t i1 = 0; i1 < in; i1 += options.block_size) {
    const int64_t count = std::min(options.block_size, in - i1);
    at::Tensor block = wt.narrow(0, i1, count).clone();  // [count, out]
    at::Tensor err = at::empty_like(block);
    const at::Tensor u_block = u.narrow(0, i1, count).narrow(1, i1, count);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t c = i1 + i;
      const int64_t g = group_at[c];
      const at::Tensor col = block[i];
      // quant_code of the float32 value, operation for operation; then quant_dequant.
      const at::Tensor code =
          at::clamp(at::round(col.to(at::kFloat) * inv_t[g]) + zero_t[g], 0.0, max_code);
      codes_t[c].copy_(code);
      const at::Tensor q = (scale_t[g] * (code - zero_t[g])).to(at::kDouble);
      const at::Tensor e = (col - q) / u_block[i][i];
      err[i].copy_(e);
      if (i + 1 < count) {
        block.narrow(0, i + 1, count - i - 1)
            .sub_(u_block[i].narrow(0, i + 1, count - i - 1).unsqueeze(1) * e.unsqueeze(0));
      }
    }
    // The block's error passed on to the columns after it, a slice of rows at a time: the product for
    // all of them at once is [rest, out] float64, 87 MB for TinyLlama's gate projection, on top of
    // GPTQ's other work matrices. The codes still equal the column-by-column reference's (tested),
    // and the output bytes the unsliced product's (stories260K and TinyLlama's shapes).
    const int64_t first = i1 + count;
    for (int64_t r = first; r < in; r += kUpdateRows) {
      const int64_t n = std::min(kUpdateRows, in - r);
      wt.narrow(0, r, n).sub_(u.narrow(0, i1, count).narrow(1, r, n).t().matmul(err));
    }
  }
  // Back to [out, in] in index order.
  return at::empty_like(codes_t).index_copy_(0, perm, codes_t).t();
}

PackedWeight quantize_with_factor(const at::Tensor& wf, const QuantSpec& spec, const GptqFactor& factor,
                                  const GptqOptions& options, const ClipSearchOptions& clip) {
  // Static groups: the stored parameters of every group, from the original weight. The search is
  // quantize_clipped's, weighted by diag(XtX) (proportional to the mean of x^2 that kClip uses).
  const at::Tensor w_cpu = wf.cpu();
  const PackedWeight grid = options.clip_search
                                ? quantize_clipped(w_cpu, spec, factor.diagonal.to(at::kFloat).cpu(), clip)
                                : quantize(w_cpu, spec);
  // Stored scales (exact in fp32; k formats' effective ones) and zero points, per group.
  auto [group_scales, group_zeros] = group_scales_and_zeros(grid);
  const at::Tensor scales = group_scales.to(wf.device());
  const at::Tensor zeros = group_zeros.to(wf.device());
  const at::Tensor codes = gptq_codes(wf, spec, factor, options, scales, zeros);
  if (!options.refit_scales || spec.sub_scale_bits != 0) return with_codes(grid, codes);
  // One refit: GPTQ again on the refitted scales, refitted again, gave no better plans on
  // stories260K (+5%: 4.377 and 4.497 bits per weight after two and three rounds, 4.330 after one).
  return pack_codes(codes, refitted_scales(wf, codes, scales, zeros, spec, factor.hessian), group_zeros, spec);
}

}  // namespace

at::Tensor gptq_column_order(const at::Tensor& xtx, bool act_order) { return column_order(xtx.diagonal(), act_order); }

GptqFactor gptq_factor(at::Tensor xtx, const GptqOptions& options, const at::Device& device) {
  // The search collects X^T X under InferenceMode; changing such a tensor in place is allowed only there.
  c10::InferenceMode inference;
  check_gptq_options(options);
  GRADQ_CHECK(xtx.defined() && xtx.dim() == 2, "quantize_gptq: expected XtX [in_features, in_features], got {}",
              xtx.defined() ? c10::str(xtx.sizes()) : std::string("an undefined tensor"));
  const int64_t in = xtx.size(1);
  // One [in, in] float64 matrix is all the factorisation holds: X^T X itself when the caller moved it
  // in as float64 on `device` (no one else can see it change), a copy otherwise.
  const bool sole_owner = xtx.use_count() == 1 && xtx.storage().use_count() == 1;
  at::Tensor h = checked_xtx(xtx, in, device, "quantize_gptq");
  if ((h.is_same(xtx) && !sole_owner) || !h.is_contiguous()) h = h.clone(at::MemoryFormat::Contiguous);
  xtx.reset();
  GptqFactor factor;
  factor.damp = options.damp;
  factor.act_order = options.act_order;
  factor.diagonal = h.diagonal().clone();
  GRADQ_CHECK((factor.diagonal >= 0).all().item<bool>(),
              "quantize_gptq: expected XtX with a diagonal >= 0 (sums of squares), got {}",
              factor.diagonal.min().item<double>());
  factor.order = column_order(factor.diagonal, options.act_order);
  // With the refit, H itself in index order (its groups are contiguous there), made before h is
  // permuted in place below: one more matrix and no temporaries. Dampened as h is, below.
  at::Tensor hessian = options.refit_scales ? h + h.t() : at::Tensor();
  // U: the upper Cholesky factor of Hp^-1 (Hp^-1 = U^T U), Hp the dampened H in `order`. With J the
  // reversal and L the lower Cholesky factor of J Hp J, Hp = (J L J)(J L J)^T, so U = J L^-1 J: one
  // factorisation and one triangular inverse, both in place, instead of a factorisation, an inverse
  // and a second factorisation that each made a new matrix.
  permuted_hessian_in_place(h, factor.order.flip({0}));
  // An input that is always 0 gets diag 1: its column is rounded with no error passed on (H is
  // block diagonal there, so no error reaches it either, wherever it is in the order).
  h.diagonal().masked_fill_(h.diagonal() == 0, 1.0);
  const double damp = options.damp * h.diagonal().mean().item<double>();
  h.diagonal().add_(damp);
  factor.refit_scales = options.refit_scales;
  if (hessian.defined()) {
    hessian.diagonal().masked_fill_(hessian.diagonal() == 0, 1.0);
    hessian.diagonal().add_(damp);
    factor.hessian = std::move(hessian);
  }
  const int64_t failed = cholesky_in_place(h);
  GRADQ_CHECK(failed == 0,
              "quantize_gptq: H + dampening is not positive definite (pivot {} of {} in reversed column order); "
              "expected a larger dampening than {}",
              failed, in, options.damp);
  invert_lower_in_place(h);
  reverse_rows_and_columns_in_place(h);
  factor.u = std::move(h);
  return factor;
}

PackedWeight quantize_gptq(const at::Tensor& w, const QuantSpec& spec, at::Tensor xtx,
                           const GptqOptions& options, const ClipSearchOptions& clip) {
  check_gptq_spec(spec);
  const at::Tensor wf = checked_weight(w, "quantize_gptq");
  GRADQ_CHECK(!xtx.defined() || xtx.dim() != 2 || xtx.size(0) == wf.size(1),
              "quantize_gptq: expected XtX [in_features, in_features] = [{}, {}], got {}", wf.size(1), wf.size(1),
              c10::str(xtx.sizes()));
  return quantize_with_factor(wf, spec, gptq_factor(std::move(xtx), options, wf.device()), options, clip);
}

PackedWeight quantize_gptq(const at::Tensor& w, const QuantSpec& spec, const GptqFactor& factor,
                           const GptqOptions& options, const ClipSearchOptions& clip) {
  check_gptq_spec(spec);
  check_gptq_options(options);
  const at::Tensor wf = checked_weight(w, "quantize_gptq");
  GRADQ_CHECK(factor.u.defined() && factor.u.size(0) == wf.size(1),
              "quantize_gptq: expected a factor for {} inputs, got one for {}", wf.size(1),
              factor.u.defined() ? factor.u.size(0) : 0);
  GRADQ_CHECK(factor.u.device() == wf.device(), "quantize_gptq: expected a factor on the weight's device {}, got {}",
              wf.device().str(), factor.u.device().str());
  GRADQ_CHECK(factor.damp == options.damp && factor.act_order == options.act_order &&
                  factor.refit_scales == options.refit_scales,
              "quantize_gptq: the factor was made with dampening {}, act_order {} and refit_scales {}, the options ask "
              "for {}, {} and {}",
              factor.damp, factor.act_order, factor.refit_scales, options.damp, options.act_order, options.refit_scales);
  return quantize_with_factor(wf, spec, factor, options, clip);
}

double gptq_output_error(const at::Tensor& w, const at::Tensor& w_q, const GptqFactor& factor) {
  GRADQ_CHECK(w.dim() == 2 && w.sizes() == w_q.sizes() && w.size(1) == factor.u.size(0),
              "gptq_output_error: expected W and W_q of the same shape [out, {}], got {} and {}", factor.u.size(0),
              c10::str(w.sizes()), c10::str(w_q.sizes()));
  // H^-1 = U^T U, so H = U^-1 U^-T and trace(D H D^T) = |D U^-1|^2, D's columns in the factor's order.
  const at::Tensor d = (w.to(at::kDouble) - w_q.to(at::kDouble)).index_select(1, factor.order.to(w.device()));
  const at::Tensor y = at::linalg_solve_triangular(factor.u.to(w.device()), d, /*upper=*/true, /*left=*/false);
  return y.square().sum().item<double>();
}

}  // namespace gradq
