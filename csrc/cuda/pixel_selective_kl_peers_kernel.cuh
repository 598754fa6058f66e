// CUDA kernels of pixel_selective_kl_peers (METHOD.md §9 on §1): K = 2..8 students, every ordered pair (r, s)
// selected by the two-student rule. Forward, finalize and gradient kernels with their launch geometry; torch-free
// device code (see pixel_math.cuh), launched by pixel_selective_kl_peers_kernel.cu.
//
// Per pixel, one thread (grid and partials as pixel_selective_kl's): an online pass over each student's C logits
// gives its max m_s, argmax, S_s = sum_c exp(d_s,c) with d_s,c = (z_s,c - m_s) / T (and the sum at T = 1 for rule
// 'confidence' at T != 1); from the argmaxes or cross-entropies, every student's teachers R_s (a bit mask). Where
// some student learns, a second pass over the channels forms p_r,c = exp(d_r,c) / S_r once per student and, per
// learner, q_s,c = mean over R_s of p_r,c. With E_r = sum_c p_r,c d_r,c and Q_s = sum_c q_s,c d_s,c,
//     mean_{r in R_s} KL(p_r || p_s) = (mean_R E_r - Q_s) + (log S_s - mean_R log S_r)
// in centred form (accurate for logits ~ 1e4): K exponentials per channel and O(K^2) adds for the q's. Students
// are a template bucket KMAX in {2, 4, 8} so that the per-student arrays stay in registers.
//
// The gradient kernel runs after the finalize kernel (it needs n): where a student with a gradient output learns
// (the forward's per-pixel learner bits) it recomputes the pixel and writes T / n * (p_s - q_s), elsewhere 0,
// contiguous NCHW. On a GPU re-reading the logits costs less than storing and re-reading unscaled gradients.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../ops/kinds.h"
#include "pixel_math.cuh"
#include "pixel_selective_kl_kernel.cuh"  // kFinalThreads, pixel_grid
#include "selective_kl_pixel.cuh"

namespace ccl::cuda {

// The K students' logits (slots past K unused).
template <typename scalar_t, int KMAX>
struct PeerLogits {
  Logits<scalar_t> z[KMAX];
};

// The gradient outputs, contiguous (N, C, H, W); nullptr for a student without one.
template <typename scalar_t, int KMAX>
struct PeerGrads {
  scalar_t* g[KMAX];
};

// One pixel of every student: channel-0 pointers and channel strides.
template <typename scalar_t, int KMAX>
struct PeerPixelLogits {
  const scalar_t* at[KMAX];
  int64_t s_c[KMAX];

  CCL_HD PeerPixelLogits(const PeerLogits<scalar_t, KMAX>& z, int K, int64_t n, int h, int w) {
#pragma unroll
    for (int r = 0; r < KMAX; ++r) {
      at[r] = r < K ? z.z[r].pixel(n, h, w) : nullptr;
      s_c[r] = r < K ? z.z[r].sC : 0;
    }
  }
  template <typename acc_t>
  CCL_HD acc_t logit(int r, int c) const {
    return static_cast<acc_t>(at[r][c * s_c[r]]);
  }
};

// A valid pixel's statistics and selection.
template <typename acc_t, int KMAX>
struct PeerStats {
  acc_t m[KMAX];            // max of each student's logits (NaN-propagating)
  acc_t s[KMAX];            // S_s, the softmax denominator at T of the centred logits
  uint8_t teachers[KMAX];   // bit r of teachers[s]: peer r teaches student s here
  bool finite;              // every student's max is finite; else the pixel makes every loss NaN

  CCL_HD uint8_t learners(int K) const {
    uint8_t bits = 0;
#pragma unroll
    for (int s = 0; s < KMAX; ++s) bits |= (s < K && teachers[s] != 0) ? 1u << s : 0u;
    return bits;
  }
};

// Teachers of every student by the two-student rule on each ordered pair, with each student's argmax or
// cross-entropy computed once (as ccl_ops.peers.peer_masks). `label` is valid.
template <typename scalar_t, typename acc_t, int KMAX>
CCL_HD PeerStats<acc_t, KMAX> peer_stats(const PeerPixelLogits<scalar_t, KMAX>& px, int K, int C, int label,
                                        acc_t inv_t, Rule rule) {
  PeerStats<acc_t, KMAX> st;
  st.finite = true;
  uint8_t right = 0;  // bit s: student s's argmax is the label
  acc_t ce[KMAX];
#pragma unroll
  for (int s = 0; s < KMAX; ++s) {
    ce[s] = acc_t(0);
    st.m[s] = st.s[s] = acc_t(1);
    if (s >= K) continue;
    const auto online = rule_stats(px.at[s], px.s_c[s], C, inv_t, rule);
    st.m[s] = online.m;
    st.s[s] = online.s;
    st.finite = st.finite && disfinite(online.m);
    right |= online.index == label ? 1u << s : 0u;
    // A +inf logit makes log_softmax, so the reference's cross-entropy, NaN at every label: a NaN never teaches
    // nor learns.
    if (rule == Rule::kConfidence) {
      ce[s] = disfinite(online.m) ? cross_entropy(online, px.template logit<acc_t>(s, label))
                                  : std::numeric_limits<acc_t>::quiet_NaN();
    }
  }
  const uint8_t everyone = static_cast<uint8_t>((1u << K) - 1);
#pragma unroll
  for (int s = 0; s < KMAX; ++s) {
    uint8_t t = 0;
    if (s < K) {
      if (rule == Rule::kAll) {
        t = everyone & ~(1u << s);
      } else if (rule == Rule::kCorrect) {
        t = (right >> s & 1) ? 0 : right;  // the right peers teach a wrong student
      } else {
#pragma unroll
        for (int r = 0; r < KMAX; ++r) t |= (r < K && ce[r] < ce[s]) ? 1u << r : 0u;  // never r == s
      }
    }
    st.teachers[s] = t;
  }
  return st;
}

// Mean over the teachers (bits of `teachers`, not 0) of v[r], as v[first] + sum_r (v[r] - v[first]) / |R|: exactly
// v[first] when the teachers' values are equal, so that students with equal logits give exactly 0.
template <typename acc_t, int KMAX>
CCL_HD acc_t teacher_mean(const acc_t (&v)[KMAX], uint8_t teachers, acc_t inv_count) {
  acc_t first = acc_t(0), spread = acc_t(0);
  bool found = false;
#pragma unroll
  for (int r = 0; r < KMAX; ++r) {
    if (!found && (teachers >> r & 1)) first = v[r], found = true;
  }
#pragma unroll
  for (int r = 0; r < KMAX; ++r) {
    if (teachers >> r & 1) spread += v[r] - first;
  }
  return first + spread * inv_count;
}

// 1 / |R_s| per student (0 where it does not learn: never used there).
template <typename acc_t, int KMAX>
CCL_HD void inverse_teacher_counts(const PeerStats<acc_t, KMAX>& st, acc_t (&inv_count)[KMAX]) {
#pragma unroll
  for (int s = 0; s < KMAX; ++s) {
    int count = 0;
#pragma unroll
    for (int r = 0; r < KMAX; ++r) count += st.teachers[s] >> r & 1;
    inv_count[s] = count > 0 ? acc_t(1) / acc_t(count) : acc_t(0);
  }
}

// Channel c of every student: d_r = (z_r,c - m_r) / T and p_r = exp(d_r) / S_r (given as inv_s = 1 / S_r).
template <typename scalar_t, typename acc_t, int KMAX>
CCL_HD void peer_channel(const PeerPixelLogits<scalar_t, KMAX>& px, int K, int c, const PeerStats<acc_t, KMAX>& st,
                         const acc_t (&inv_s)[KMAX], acc_t inv_t, acc_t (&d)[KMAX], acc_t (&p)[KMAX]) {
#pragma unroll
  for (int r = 0; r < KMAX; ++r) {
    d[r] = p[r] = acc_t(0);
    if (r < K) {
      d[r] = (px.template logit<acc_t>(r, c) - st.m[r]) * inv_t;
      p[r] = dexp(d[r]) * inv_s[r];
    }
  }
}

template <typename acc_t, int KMAX>
CCL_HD void inverse_sums(const PeerStats<acc_t, KMAX>& st, acc_t (&inv_s)[KMAX]) {
#pragma unroll
  for (int r = 0; r < KMAX; ++r) inv_s[r] = acc_t(1) / st.s[r];
}

// Each student's per-pixel term, the mean over R_s of KL(p_r || p_s) (without T^2; 0 where R_s is empty), and
// NaN for every student where some student's max is not finite (a NaN or +inf logit), as in the reference.
template <typename scalar_t, typename acc_t, int KMAX>
CCL_HD void peer_terms(const PeerPixelLogits<scalar_t, KMAX>& px, int K, int C, acc_t inv_t,
                       const PeerStats<acc_t, KMAX>& st, acc_t (&term)[KMAX]) {
  acc_t inv_s[KMAX], inv_count[KMAX], e[KMAX], q[KMAX], log_s[KMAX];
  inverse_sums(st, inv_s);
  inverse_teacher_counts(st, inv_count);
#pragma unroll
  for (int r = 0; r < KMAX; ++r) e[r] = q[r] = term[r] = acc_t(0), log_s[r] = dlog(st.s[r]);
  if (st.learners(K) != 0) {
    for (int c = 0; c < C; ++c) {
      acc_t d[KMAX], p[KMAX];
      peer_channel(px, K, c, st, inv_s, inv_t, d, p);
#pragma unroll
      for (int r = 0; r < KMAX; ++r) e[r] += p[r] * d[r];
#pragma unroll
      for (int s = 0; s < KMAX; ++s) {
        if (st.teachers[s] != 0) q[s] += teacher_mean(p, st.teachers[s], inv_count[s]) * d[s];
      }
    }
#pragma unroll
    for (int s = 0; s < KMAX; ++s) {
      if (st.teachers[s] != 0) {
        term[s] = (teacher_mean(e, st.teachers[s], inv_count[s]) - q[s]) +
                  (log_s[s] - teacher_mean(log_s, st.teachers[s], inv_count[s]));
      }
    }
  }
  if (!st.finite) {
#pragma unroll
    for (int s = 0; s < KMAX; ++s) term[s] = std::numeric_limits<acc_t>::quiet_NaN();
  }
}

// ---- kernels ----------------------------------------------------------------------------------------------

// Grid: pixel_grid(N, H*W). Block b writes part_kl[K*b + s] = the sum of student s's terms and
// part_count[(K+2)*b ...] = (valid pixels, pixels where any student learns, then per student the pixels where
// it learns). learners: contiguous (N, H, W), bit s where student s learns (0 at ignored pixels).
template <typename scalar_t, typename acc_t, int KMAX>
__global__ void __launch_bounds__(kThreads)
    peers_forward_kernel(PeerLogits<scalar_t, KMAX> z, int K, Labels y, int64_t N, int C, int W, int HW,
                         acc_t inv_t, Rule rule, int64_t ignore_index, uint8_t* __restrict__ learners,
                         double* __restrict__ part_kl, long long* __restrict__ part_count) {
  const int hw = blockIdx.x * kThreads + threadIdx.x;
  double kl[KMAX];
  long long learned[KMAX], valid = 0, any = 0;
#pragma unroll
  for (int s = 0; s < KMAX; ++s) kl[s] = 0, learned[s] = 0;
  if (hw < HW) {
    const int h = hw / W, w = hw - h * W;
    for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
      const int label = read_label(y, n, h, w, C, ignore_index);
      uint8_t bits = 0;
      if (label >= 0) {
        const PeerPixelLogits<scalar_t, KMAX> px(z, K, n, h, w);
        const auto st = peer_stats(px, K, C, label, inv_t, rule);
        acc_t term[KMAX];
        peer_terms(px, K, C, inv_t, st, term);
        bits = st.learners(K);
#pragma unroll
        for (int s = 0; s < KMAX; ++s) {
          kl[s] += static_cast<double>(term[s]);
          learned[s] += bits >> s & 1;
        }
        valid += 1;
        any += bits != 0;
      }
      learners[n * HW + hw] = bits;
    }
  }
  valid = block_sum(valid);
  any = block_sum(any);
#pragma unroll
  for (int s = 0; s < KMAX; ++s) {
    if (s < K) {  // uniform over the block
      kl[s] = block_sum(kl[s]);
      learned[s] = block_sum(learned[s]);
    }
  }
  if (threadIdx.x == 0) {
    const int64_t b = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
    part_count[(K + 2) * b] = valid;
    part_count[(K + 2) * b + 1] = any;
#pragma unroll
    for (int s = 0; s < KMAX; ++s) {
      if (s < K) {
        part_kl[K * b + s] = kl[s];
        part_count[(K + 2) * b + 2 + s] = learned[s];
      }
    }
  }
}

// One block: sums the per-block partials in a fixed order and writes norm, losses[K] and counts[K].
template <typename acc_t>
__global__ void __launch_bounds__(kFinalThreads)
    peers_finalize_kernel(const double* __restrict__ part_kl, const long long* __restrict__ part_count,
                          int64_t blocks, int K, double t2, bool normalize_valid, acc_t* __restrict__ losses,
                          int64_t* __restrict__ counts, acc_t* __restrict__ norm) {
  long long valid = 0, any = 0;
  for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) {
    valid += part_count[(K + 2) * b];
    any += part_count[(K + 2) * b + 1];
  }
  valid = block_sum(valid);
  any = block_sum(any);
  const long long selected = normalize_valid ? valid : any;
  const double n = static_cast<double>(selected > 0 ? selected : 1);  // meaningful in thread 0 only
  for (int s = 0; s < K; ++s) {
    double kl = 0;
    long long learned = 0;
    for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) {
      kl += part_kl[K * b + s];
      learned += part_count[(K + 2) * b + 2 + s];
    }
    kl = block_sum(kl);
    learned = block_sum(learned);
    if (threadIdx.x == 0) {
      losses[s] = static_cast<acc_t>(t2 * kl / n);
      counts[s] = learned;
    }
  }
  if (threadIdx.x == 0) *norm = static_cast<acc_t>(n);
}

// grads[s] = T / n * (p_s - q_s) where student s learns, else 0, for the students with a gradient output; n is
// read from device memory (no sync). learners: the forward's.
template <typename scalar_t, typename acc_t, int KMAX>
__global__ void __launch_bounds__(kThreads)
    peers_grad_kernel(PeerLogits<scalar_t, KMAX> z, int K, Labels y, const uint8_t* __restrict__ learners,
                      int64_t N, int C, int W, int HW, acc_t inv_t, Rule rule, int64_t ignore_index,
                      double temperature, const acc_t* __restrict__ norm, PeerGrads<scalar_t, KMAX> grads) {
  const int hw = blockIdx.x * kThreads + threadIdx.x;
  if (hw >= HW) return;
  const int h = hw / W, w = hw - h * W;
  const acc_t coef = static_cast<acc_t>(temperature / static_cast<double>(*norm));  // T^2 / n * (p - q) / T
  uint8_t wanted = 0;
#pragma unroll
  for (int s = 0; s < KMAX; ++s) wanted |= (s < K && grads.g[s] != nullptr) ? 1u << s : 0u;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const uint8_t learn = learners[n * HW + hw] & wanted;
    const int64_t out = n * C * static_cast<int64_t>(HW) + hw;
    if (learn == 0) {  // nothing to learn here: zeros, without reading the logits
      for (int c = 0; c < C; ++c) {
#pragma unroll
        for (int s = 0; s < KMAX; ++s) {
          if (wanted >> s & 1) grads.g[s][out + static_cast<int64_t>(c) * HW] = scalar_t(0);
        }
      }
      continue;
    }
    // The forward found learners here, so the label is valid; the selection is recomputed bit for bit.
    const PeerPixelLogits<scalar_t, KMAX> px(z, K, n, h, w);
    const auto st = peer_stats(px, K, C, read_label(y, n, h, w, C, ignore_index), inv_t, rule);
    acc_t inv_s[KMAX], inv_count[KMAX];
    inverse_sums(st, inv_s);
    inverse_teacher_counts(st, inv_count);
    for (int c = 0; c < C; ++c) {
      acc_t d[KMAX], p[KMAX];
      peer_channel(px, K, c, st, inv_s, inv_t, d, p);
#pragma unroll
      for (int s = 0; s < KMAX; ++s) {
        if (!(wanted >> s & 1)) continue;
        // Select, do not multiply: a student that does not learn here gets exactly 0.
        const acc_t g = (learn >> s & 1) ? coef * (p[s] - teacher_mean(p, st.teachers[s], inv_count[s])) : acc_t(0);
        grads.g[s][out + static_cast<int64_t>(c) * HW] = static_cast<scalar_t>(g);
      }
    }
  }
}

// ---- launch geometry (host) -------------------------------------------------------------------------------

// Calls f(std::integral_constant<int, KMAX>) with the student bucket for K (2 <= K <= kMaxPeers).
template <typename F>
inline void with_peer_bucket(int64_t K, F&& f) {
  if (K <= 2) {
    f(std::integral_constant<int, 2>{});
  } else if (K <= 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, kMaxPeers>{});
  }
}

}  // namespace ccl::cuda
