// CPU kernel of pixel_selective_kl_peers (METHOD.md §9 on §1): the selective KL among K students in one pass
// over the K logit tensors, with the gradients written in the same pass (the op has no backward kernel).
//
// Per tile (kTile pixels of one sample, each student's C x kTile logits packed once, pixel_tile.h): pass 1 every
// student's max/argmax; the selection, a pixel at a time: the two-student rule on every ordered pair gives the
// weights w[r][s] = [r teaches s] / |R_s| (R_s: the peers teaching s there; the weights of a learner sum to 1);
// pass 2 the exponentials (only at the vector groups where somebody learns, unless rule 'confidence' needed
// them for its cross-entropies); pass 3, a vector group at a time and all C channels of it, with p_s = softmax
// and d_s = (z_s - max_s) / T:
//     A_s = sum_c p_s d_s,   q_s = sum_r w[r][s] p_r (the mean of s's teachers),   B_s = sum_c q_s d_s,
//     grad_s = T / n * [s learns] * (p_s - q_s)
// and the term of s, mean over R_s of KL(p_r || p_s), is sum_r w[r][s] (A_r - log S_r) - B_s + log S_s
// (S: the sum of the exponentials; log p = d - log S). The cost per element is K exponentials (once per student,
// not per pair) and K(K-1) multiply-adds for the teachers' means: small against the exponentials for K <= 8.
// Identical students give exactly 0 where a student has one or two teachers (w = 1 or 1/2: q_s = p_s exactly),
// within a rounding of p otherwise (the CUDA kernel forms its means so that they are exact).
// Per-tile partial sums are reduced in tile order: the result does not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "../ops/checks.h"
#include "gradient_buffer.h"
#include "pixel_tile.h"

namespace ccl::cpu {
namespace {

struct PeersPartial {
  std::array<double, kMaxPeers> kl{};        // each student's sum of terms over the tile's valid pixels
  std::array<int64_t, kMaxPeers> learns{};   // pixels where it learns
  int64_t valid = 0, any = 0;                // valid pixels; those where some student learns
};

// Per-thread scratch of one tile, K students.
template <typename acc_t>
struct PeersScratch {
  PeersScratch(int64_t K, int64_t C) : pack(K, std::vector<acc_t>(C * kTile)), weight(K * K * kTile), coef(K * kTile),
                                       ce(K * kTile) {
    for (int64_t s = 0; s < K; ++s) stats.emplace_back(C);
  }
  std::vector<SoftmaxStats<acc_t>> stats;
  std::vector<std::vector<acc_t>> pack;
  std::vector<acc_t> weight;  // w[r][s] of pixel i at [(r * K + s) * kTile + i]
  std::vector<acc_t> coef;    // the gradient factor of s where it learns, 0 elsewhere, at [s * kTile + i]
  std::vector<acc_t> ce;      // cross-entropies at T = 1 (rule 'confidence')
  alignas(64) int64_t label[kTile];
  alignas(64) acc_t label_f[kTile];
  bool active[kTile / Vec<acc_t>::size()] = {};  // some student learns in the vector group
};

// The weights of one pixel from the rule, and which students learn there; returns the bit set of learners.
template <typename acc_t>
unsigned select_pixel(Rule rule, int64_t K, int64_t i, int64_t label, PeersScratch<acc_t>& w) {
  bool teaches[kMaxPeers][kMaxPeers] = {};
  for (int64_t r = 0; r < K; ++r) {
    for (int64_t s = 0; s < K; ++s) {
      if (r == s) continue;
      if (rule == Rule::kCorrect) {
        teaches[r][s] = w.stats[r].argmax[i] == acc_t(label) && w.stats[s].argmax[i] != acc_t(label);
      } else if (rule == Rule::kConfidence) {
        teaches[r][s] = w.ce[r * kTile + i] < w.ce[s * kTile + i];  // false for a NaN cross-entropy
      } else {
        teaches[r][s] = true;
      }
    }
  }
  unsigned learners = 0;
  for (int64_t s = 0; s < K; ++s) {
    int64_t count = 0;
    for (int64_t r = 0; r < K; ++r) count += teaches[r][s];
    const acc_t share = count ? acc_t(1) / acc_t(count) : acc_t(0);
    for (int64_t r = 0; r < K; ++r) w.weight[(r * K + s) * kTile + i] = teaches[r][s] ? share : acc_t(0);
    if (count) learners |= 1u << s;
  }
  return learners;
}

template <typename scalar_t, typename acc_t>
void peers_forward(at::TensorList logits, const at::Tensor& y, acc_t temperature, Rule rule, int64_t ignore_index,
                   const std::vector<scalar_t*>& grads, acc_t grad_coef, bool non_temporal,
                   std::vector<PeersPartial>& parts, std::atomic<int64_t>& bad) {
  constexpr int64_t V = Vec<acc_t>::size();
  const int64_t K = static_cast<int64_t>(logits.size());
  const int64_t N = logits[0].size(0), C = logits[0].size(1), HW = logits[0].size(2) * logits[0].size(3);
  const int64_t tiles = tiles_per_plane(HW);
  const acc_t inv_t = acc_t(1) / temperature;
  const Vec<acc_t> zero(0), scale(inv_t);

  at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
    PeersScratch<acc_t> w(K, C);
    std::vector<Tile<acc_t>> tile(K);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t n = job / tiles, p0 = (job % tiles) * kTile, len = std::min(kTile, HW - p0);
      const int64_t out0 = n * C * HW + p0;  // gradient of channel 0, first pixel of the tile
      PeersPartial part;
      part.valid = label_reader(y, n, C, ignore_index, &bad).read(p0, len, w.label, w.label_f);
      if (part.valid == 0) {  // ignored pixels never count, whatever their logits
        for (scalar_t* g : grads) {
          if (g) for (int64_t c = 0; c < C; ++c) std::fill(g + out0 + c * HW, g + out0 + c * HW + len, scalar_t(0));
        }
        parts[job] = part;
        continue;
      }
      for (int64_t s = 0; s < K; ++s) {
        tile[s] = make_tile(plane<scalar_t>(logits[s], n), p0, len, w.pack[s].data());
        max_argmax(tile[s], C, w.stats[s]);
      }
      if (rule == Rule::kConfidence) {
        for (int64_t s = 0; s < K; ++s) {
          sum_exp(tile[s], C, inv_t, /*with_sum_1=*/true, nullptr, w.stats[s]);
          for (int64_t i = 0; i < len; ++i) {
            w.ce[s * kTile + i] = cross_entropy(tile[s], w.stats[s], i, std::max<int64_t>(w.label[i], 0));
          }
        }
      }
      // The selection; lanes past len (up to the end of their vector group) get zero weights.
      const int64_t padded = (len + V - 1) / V * V;
      for (int64_t i = 0; i < padded; ++i) {
        const unsigned learners = i < len && w.label[i] >= 0 ? select_pixel(rule, K, i, w.label[i], w) : 0u;
        if (learners == 0) {
          for (int64_t rs = 0; rs < K * K; ++rs) w.weight[rs * kTile + i] = acc_t(0);
        }
        for (int64_t s = 0; s < K; ++s) {
          const bool learns = (learners >> s) & 1u;
          part.learns[s] += learns;
          w.coef[s * kTile + i] = learns ? grad_coef : acc_t(0);
        }
        part.any += learners != 0;
        if (i % V == 0) w.active[i / V] = false;
        w.active[i / V] = w.active[i / V] || learners != 0;
      }
      if (rule != Rule::kConfidence) {  // the selection needed no softmax: exponentials only where one learns
        for (int64_t s = 0; s < K; ++s) sum_exp(tile[s], C, inv_t, false, w.active, w.stats[s]);
      }

      std::array<Vec<acc_t>, kMaxPeers> kl_sum;
      kl_sum.fill(zero);
      for (int64_t i = 0; i < len; i += V) {
        const int64_t count = std::min(V, len - i);
        const auto valid = Vec<acc_t>::loadu(w.label_f + i) >= zero;
        Vec<acc_t> guard = zero;  // NaN where any student's max is not finite (a NaN or +inf logit), as softmax
        for (int64_t s = 0; s < K; ++s) {
          const auto m = Vec<acc_t>::loadu(w.stats[s].max + i);
          guard = guard + (m - m);
        }
        if (!w.active[i / V]) {
          for (int64_t s = 0; s < K; ++s) {
            if (grads[s]) {
              for (int64_t c = 0; c < C; ++c) store_output(grads[s] + out0 + c * HW + i, zero, count, non_temporal);
            }
            kl_sum[s] = kl_sum[s] + Vec<acc_t>::blendv(zero, guard, valid);
          }
          continue;
        }
        std::array<Vec<acc_t>, kMaxPeers> A, B, p, d, m, inv_sum;
        for (int64_t s = 0; s < K; ++s) {
          A[s] = B[s] = zero;
          m[s] = Vec<acc_t>::loadu(w.stats[s].max + i);
          inv_sum[s] = Vec<acc_t>::loadu(w.stats[s].inv_sum_t + i);
        }
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t s = 0; s < K; ++s) {
            tile[s].ahead.prefetch(c, i);
            p[s] = Vec<acc_t>::loadu(w.stats[s].exps.data() + c * kTile + i) * inv_sum[s];
            d[s] = (load(tile[s], c, i) - m[s]) * scale;
            A[s] = at::vec::fmadd(p[s], d[s], A[s]);
          }
          for (int64_t s = 0; s < K; ++s) {
            Vec<acc_t> q = zero;
            for (int64_t r = 0; r < K; ++r) {
              if (r != s) q = at::vec::fmadd(Vec<acc_t>::loadu(w.weight.data() + (r * K + s) * kTile + i), p[r], q);
            }
            B[s] = at::vec::fmadd(q, d[s], B[s]);
            if (grads[s]) {
              // Select, do not multiply, so that a pixel where the student does not learn gets exactly 0.
              const auto k = Vec<acc_t>::loadu(w.coef.data() + s * kTile + i);
              store_output(grads[s] + out0 + c * HW + i, Vec<acc_t>::blendv(k * (p[s] - q), zero, k == zero), count,
                           non_temporal);
            }
          }
        }
        std::array<Vec<acc_t>, kMaxPeers> log_sum;
        for (int64_t s = 0; s < K; ++s) log_sum[s] = Vec<acc_t>::loadu(w.stats[s].sum_t + i).log();
        for (int64_t s = 0; s < K; ++s) {
          Vec<acc_t> term = log_sum[s] - B[s], taught = zero;
          for (int64_t r = 0; r < K; ++r) {
            if (r == s) continue;
            const auto wr = Vec<acc_t>::loadu(w.weight.data() + (r * K + s) * kTile + i);
            term = at::vec::fmadd(wr, A[r] - log_sum[r], term);
            taught = taught + wr;  // 1 where s learns, 0 elsewhere
          }
          // Blend, not multiply: a lane where s does not learn adds exactly 0 (its sums may be stale).
          const auto own = Vec<acc_t>::blendv(zero, term, taught != zero);
          kl_sum[s] = kl_sum[s] + Vec<acc_t>::blendv(zero, guard + own, valid);
        }
      }
      for (int64_t s = 0; s < K; ++s) part.kl[s] = lane_sum(kl_sum[s]);
      parts[job] = part;
    }
    stream_fence();
  });
}

PeersOutputs pixel_selective_kl_peers_cpu(at::TensorList logits, const at::Tensor& y, double temperature,
                                          c10::string_view rule_name, c10::string_view normalize_name,
                                          int64_t ignore_index, const c10::List<bool>& mask) {
  const PeersCall call = check_peers_call(logits, y, temperature, rule_name, normalize_name, mask);
  const Rule rule = call.rule;
  const Normalize normalize = call.normalize;
  const std::vector<bool>& grad_mask = call.grad_mask;
  const int64_t K = static_cast<int64_t>(logits.size());
  const at::Tensor& z0 = logits[0];
  const int64_t N = z0.size(0), C = z0.size(1), HW = z0.size(2) * z0.size(3);
  const at::ScalarType acc_type = z0.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<at::Tensor> grads;
  bool fresh = false, any_grad = false;
  for (int64_t s = 0; s < K; ++s) {
    grads.push_back(gradient_buffer(logits[s], grad_mask[s], fresh));
    any_grad = any_grad || grad_mask[s];
  }
  // n is known before the pass when every valid pixel counts (a label pass: 1/C of one student's bytes).
  const bool n_up_front = any_grad && (normalize == Normalize::kValid || rule == Rule::kAll);
  const double n_before = n_up_front ? std::max<double>(1.0, at::ne(y, ignore_index).sum().item<double>()) : 1.0;
  std::vector<PeersPartial> parts(N * tiles_per_plane(HW));
  std::atomic<int64_t> bad{LabelReader::kNoBadLabel};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z0.scalar_type(), "pixel_selective_kl_peers_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<scalar_t*> out(K, nullptr);
    for (int64_t s = 0; s < K; ++s) out[s] = grad_mask[s] ? grads[s].data_ptr<scalar_t>() : nullptr;
    peers_forward<scalar_t, acc_t>(logits, y, static_cast<acc_t>(temperature), rule, ignore_index, out,
                                   static_cast<acc_t>(temperature / n_before), !fresh, parts, bad);
  });
  raise_if_bad_label(bad, C, ignore_index);

  PeersPartial total;
  for (const auto& p : parts) {  // fixed order: deterministic
    for (int64_t s = 0; s < K; ++s) total.kl[s] += p.kl[s], total.learns[s] += p.learns[s];
    total.valid += p.valid, total.any += p.any;
  }
  const double n = static_cast<double>(std::max<int64_t>(1, normalize == Normalize::kValid ? total.valid : total.any));
  if (any_grad && !n_up_front && n != 1.0) {  // written for n = 1: divide now
    for (int64_t s = 0; s < K; ++s) {
      if (grad_mask[s]) grads[s].div_(n);
    }
  }
  const double t2 = temperature * temperature;
  auto losses = at::empty({K}, z0.options().dtype(at::kDouble));
  auto counts = at::empty({K}, z0.options().dtype(at::kLong));
  for (int64_t s = 0; s < K; ++s) {
    losses.data_ptr<double>()[s] = t2 * total.kl[s] / n;
    counts.data_ptr<int64_t>()[s] = total.learns[s];
  }
  return {losses.to(acc_type), counts, at::scalar_tensor(n, z0.options().dtype(acc_type)), grads};
}

}  // namespace

TORCH_LIBRARY_IMPL(ccl, CPU, m) { m.impl("pixel_selective_kl_peers", &pixel_selective_kl_peers_cpu); }

}  // namespace ccl::cpu
