// Per-pixel arithmetic of pixel_selective_kl's CUDA kernels (forward and backward), METHOD.md §1.
//
// Host-and-device functions: the kernels in pixel_selective_kl_kernel.cuh call them once per pixel. Everything
// here works on one pixel's C logits of both students, reached through a pointer to channel 0 and the channel
// stride. Torch-free, like pixel_math.cuh.
#pragma once

#include "../ops/kinds.h"
#include "pixel_math.cuh"

namespace ccl::cuda {

// ---- forward, per pixel -----------------------------------------------------------------------------------

// Selection bits of a valid pixel from argmaxes (rule 'correct') or cross-entropies (rule 'confidence').
CCL_HD uint8_t select_by_argmax(Rule rule, int argmax_a, int argmax_b, int label) {
  if (rule == Rule::kAll) return static_cast<uint8_t>(kAteachesB | kBteachesA);
  const bool right_a = argmax_a == label, right_b = argmax_b == label;
  return static_cast<uint8_t>((right_a && !right_b ? kAteachesB : 0) | (right_b && !right_a ? kBteachesA : 0));
}

template <typename acc_t>
CCL_HD uint8_t select_by_ce(acc_t ce_a, acc_t ce_b) {
  return static_cast<uint8_t>((ce_a < ce_b ? kAteachesB : 0) | (ce_b < ce_a ? kBteachesA : 0));
}

// Contributions of one valid pixel to the two KL sums. A NaN in the pixel's softmax statistics (a NaN or
// +inf logit) reaches both sums whether or not the pixel is selected, as in the reference.
template <typename acc_t>
CCL_HD void kl_terms(uint8_t bits, acc_t w_a, acc_t s_a, acc_t w_b, acc_t s_b,
                     acc_t& term_ab, acc_t& term_ba) {
  const acc_t log_ratio = dlog(s_b) - dlog(s_a);
  const acc_t guard = disnan(log_ratio) ? log_ratio : acc_t(0);
  term_ab = guard + ((bits & kAteachesB) ? w_a / s_a + log_ratio : acc_t(0));
  term_ba = guard + ((bits & kBteachesA) ? w_b / s_b - log_ratio : acc_t(0));
}

// C <= CMAX: both students' logits in registers, each read once.
// Both students' C logits of one pixel into registers (channels past C are zero and never used).
template <typename scalar_t, typename acc_t, int CMAX>
CCL_HD void load_pixel_registers(const scalar_t* __restrict__ pa, int64_t sa_c, const scalar_t* __restrict__ pb,
                                 int64_t sb_c, int C, acc_t (&a)[CMAX], acc_t (&b)[CMAX]) {
#pragma unroll
  for (int c = 0; c < CMAX; ++c) {
    if (c < C) {
      a[c] = static_cast<acc_t>(pa[c * sa_c]);
      b[c] = static_cast<acc_t>(pb[c * sb_c]);
    } else {
      a[c] = b[c] = acc_t(0);
    }
  }
}

template <typename scalar_t, typename acc_t, int CMAX>
CCL_HD uint8_t forward_pixel_registers(const scalar_t* __restrict__ pa, int64_t sa_c,
                                       const scalar_t* __restrict__ pb, int64_t sb_c, int C,
                                       int label, acc_t inv_t, Rule rule, acc_t& term_ab,
                                       acc_t& term_ba) {
  acc_t a[CMAX], b[CMAX];
  load_pixel_registers<scalar_t, acc_t, CMAX>(pa, sa_c, pb, sb_c, C, a, b);
  acc_t ma = a[0], mb = b[0], ya = a[0], yb = b[0];
  int ia = 0, ib = 0;
#pragma unroll
  for (int c = 1; c < CMAX; ++c) {
    if (c < C) {
      argmax_step(a[c], c, ma, ia);
      argmax_step(b[c], c, mb, ib);
      if (c == label) ya = a[c], yb = b[c];
    }
  }
  const bool unit_ce = rule == Rule::kConfidence && inv_t != acc_t(1);
  acc_t sa = 0, sb = 0, s1a = 0, s1b = 0, wa = 0, wb = 0;
#pragma unroll
  for (int c = 0; c < CMAX; ++c) {
    if (c < C) {
      const acc_t da = (a[c] - ma) * inv_t, db = (b[c] - mb) * inv_t;
      const acc_t ea = dexp(da), eb = dexp(db), diff = da - db;
      sa += ea;
      sb += eb;
      wa += ea * diff;
      wb -= eb * diff;
      if (unit_ce) {
        s1a += dexp(a[c] - ma);
        s1b += dexp(b[c] - mb);
      }
    }
  }
  uint8_t bits;
  if (rule == Rule::kConfidence) {
    const acc_t ce_a = dlog(unit_ce ? s1a : sa) - (ya - ma), ce_b = dlog(unit_ce ? s1b : sb) - (yb - mb);
    bits = select_by_ce(ce_a, ce_b);
  } else {
    bits = select_by_argmax(rule, ia, ib, label);
  }
  kl_terms(bits, wa, sa, wb, sb, term_ab, term_ba);
  return bits;
}

// One online pass over C of one student's logits.
template <bool kWithUnitT, typename scalar_t, typename acc_t>
CCL_HD OnlineSoftmax<acc_t, kWithUnitT> online_stats(const scalar_t* __restrict__ p,
                                                     int64_t s_c, int C, acc_t inv_t) {
  OnlineSoftmax<acc_t, kWithUnitT> st;
  st.init(static_cast<acc_t>(p[0]));
  for (int c = 1; c < C; ++c) st.step(static_cast<acc_t>(p[c * s_c]), c, inv_t);
  st.finish();
  return st;
}

// The online pass a rule needs: s1 (the sum at T = 1) only for rule 'confidence' with T != 1; otherwise
// s1 = s (equal at T = 1, unused by the other rules).
template <typename scalar_t, typename acc_t>
CCL_HD OnlineSoftmax<acc_t, true> rule_stats(const scalar_t* __restrict__ p, int64_t s_c, int C, acc_t inv_t,
                                             Rule rule) {
  if (rule == Rule::kConfidence && inv_t != acc_t(1)) return online_stats<true>(p, s_c, C, inv_t);
  const auto st = online_stats<false>(p, s_c, C, inv_t);
  OnlineSoftmax<acc_t, true> out;
  out.m = st.m, out.index = st.index, out.s = out.s1 = st.s;
  return out;
}

// Cross-entropy at T = 1 of a pixel, -log softmax(z)[label], from its statistics and the labelled logit.
template <typename acc_t>
CCL_HD acc_t cross_entropy(const OnlineSoftmax<acc_t, true>& st, acc_t z_label) {
  return dlog(st.s1) - (z_label - st.m);
}

// Any C: an online pass for the statistics, then (selected pixels only) a pass for the KL numerators.
template <typename scalar_t, typename acc_t>
CCL_HD uint8_t forward_pixel_online(const scalar_t* __restrict__ pa, int64_t sa_c,
                                    const scalar_t* __restrict__ pb, int64_t sb_c, int C,
                                    int label, acc_t inv_t, Rule rule, acc_t& term_ab,
                                    acc_t& term_ba) {
  const auto A = rule_stats(pa, sa_c, C, inv_t, rule), B = rule_stats(pb, sb_c, C, inv_t, rule);
  uint8_t bits;
  if (rule == Rule::kConfidence) {
    bits = select_by_ce(cross_entropy(A, static_cast<acc_t>(pa[label * sa_c])),
                        cross_entropy(B, static_cast<acc_t>(pb[label * sb_c])));
  } else {
    bits = select_by_argmax(rule, A.index, B.index, label);
  }
  acc_t wa = 0, wb = 0;
  if (bits != 0) {
    for (int c = 0; c < C; ++c) {
      const acc_t da = (static_cast<acc_t>(pa[c * sa_c]) - A.m) * inv_t;
      const acc_t db = (static_cast<acc_t>(pb[c * sb_c]) - B.m) * inv_t;
      const acc_t diff = da - db;
      wa += dexp(da) * diff;
      wb -= dexp(db) * diff;
    }
  }
  kl_terms(bits, wa, A.s, wb, B.s, term_ab, term_ba);
  return bits;
}

// ---- backward, per pixel ----------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
CCL_HD void store_grads(scalar_t* __restrict__ ga, scalar_t* __restrict__ gb, int64_t at,
                        bool learn_a, bool learn_b, acc_t coef_a, acc_t coef_b, acc_t pa,
                        acc_t pb) {
  // Select, do not multiply: a pixel where a student does not learn gets exactly 0.
  if (ga) ga[at] = static_cast<scalar_t>(learn_a ? coef_a * (pa - pb) : acc_t(0));
  if (gb) gb[at] = static_cast<scalar_t>(learn_b ? coef_b * (pb - pa) : acc_t(0));
}

template <typename scalar_t, typename acc_t, int CMAX>
CCL_HD void backward_pixel_registers(const scalar_t* __restrict__ pa, int64_t sa_c,
                                     const scalar_t* __restrict__ pb, int64_t sb_c, int C,
                                     acc_t inv_t, scalar_t* __restrict__ ga,
                                     scalar_t* __restrict__ gb, int64_t out, int64_t out_c,
                                     bool learn_a, bool learn_b, acc_t coef_a, acc_t coef_b) {
  acc_t a[CMAX], b[CMAX];
  load_pixel_registers<scalar_t, acc_t, CMAX>(pa, sa_c, pb, sb_c, C, a, b);
  acc_t ma = a[0], mb = b[0];
  int ia = 0, ib = 0;
#pragma unroll
  for (int c = 1; c < CMAX; ++c) {
    if (c < C) {
      argmax_step(a[c], c, ma, ia);
      argmax_step(b[c], c, mb, ib);
    }
  }
  acc_t sa = 0, sb = 0;
#pragma unroll
  for (int c = 0; c < CMAX; ++c) {
    if (c < C) {
      a[c] = dexp((a[c] - ma) * inv_t);
      b[c] = dexp((b[c] - mb) * inv_t);
      sa += a[c];
      sb += b[c];
    }
  }
  const acc_t ra = acc_t(1) / sa, rb = acc_t(1) / sb;
#pragma unroll
  for (int c = 0; c < CMAX; ++c) {
    if (c < C) store_grads(ga, gb, out + c * out_c, learn_a, learn_b, coef_a, coef_b, a[c] * ra, b[c] * rb);
  }
}

template <typename scalar_t, typename acc_t>
CCL_HD void backward_pixel_online(const scalar_t* __restrict__ pa, int64_t sa_c,
                                  const scalar_t* __restrict__ pb, int64_t sb_c, int C,
                                  acc_t inv_t, scalar_t* __restrict__ ga,
                                  scalar_t* __restrict__ gb, int64_t out, int64_t out_c,
                                  bool learn_a, bool learn_b, acc_t coef_a, acc_t coef_b) {
  const auto A = online_stats<false>(pa, sa_c, C, inv_t), B = online_stats<false>(pb, sb_c, C, inv_t);
  const acc_t ra = acc_t(1) / A.s, rb = acc_t(1) / B.s;
  for (int c = 0; c < C; ++c) {
    const acc_t p = dexp((static_cast<acc_t>(pa[c * sa_c]) - A.m) * inv_t) * ra;
    const acc_t q = dexp((static_cast<acc_t>(pb[c * sb_c]) - B.m) * inv_t) * rb;
    store_grads(ga, gb, out + c * out_c, learn_a, learn_b, coef_a, coef_b, p, q);
  }
}

}  // namespace ccl::cuda
