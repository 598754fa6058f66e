// CPU kernels of pixel_selective_kl (METHOD.md §1): forward (optionally with the gradients) and backward, fused
// per tile of pixels.
//
// Forward, per tile (kTile pixels packed into C x kTile rows), a vector group of pixels at a time:
// pass 1 max/argmax of both students; the selection (for rule 'confidence' after pass 2, which its
// cross-entropies need); pass 2 the exponentials and their sums (kept for the tile, so no exponential is computed
// twice), for rules 'correct' and 'all' only at the vector groups where a student learns; pass 3 the two KL sums
// over those groups and, when asked (grad_mask), the gradients of both losses
//     dloss_a/dza = T / n * [B teaches A] * (p_a - p_b)   (and symmetrically for zb),
// written once, in the same pass: the autograd backward then only scales them by the upstream gradient, in
// place (Liger-Kernel's habit), instead of reading the logits and exponentiating again. n is counted from the
// labels before the pass when it is known up front (normalize='valid', or rule='all'); otherwise the gradients
// are written for n = 1 and divided by n at the end. Nothing of size N*C*H*W is allocated but the gradients.
// Per-tile partial sums are reduced in tile order, so the result does not depend on the number of threads.
//
// Backward (pixel_selective_kl_backward), per tile with a selected pixel: passes 1 and 2 again, then the
// gradients, for callers whose forward did not write them (a second backward through a retained graph).
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "../ops/checks.h"
#include "gradient_buffer.h"
#include "pixel_tile.h"

namespace ccl::cpu {
namespace {

struct TilePartial {
  double kl_ab = 0, kl_ba = 0;  // sums of KL(p_a||p_b) over A->B pixels and KL(p_b||p_a) over B->A pixels
  int64_t valid = 0, ab = 0, ba = 0, any = 0;
};

// Where the forward writes the gradients: contiguous NCHW buffers, or nullptr when not asked for, the factor
// T / n (T when n is not known yet), and whether to store them non-temporally (store_output, pixel_tile.h).
template <typename scalar_t, typename acc_t>
struct GradientOut {
  scalar_t* a = nullptr;
  scalar_t* b = nullptr;
  acc_t coef = 0;
  bool non_temporal = true;
};

// Zeros for the first `count` pixels of every channel of a tile's gradient rows (from `row0`, channel stride HW).
template <typename scalar_t>
void zero_rows(scalar_t* row0, int64_t C, int64_t HW, int64_t count) {
  if (row0 == nullptr) return;
  for (int64_t c = 0; c < C; ++c) std::fill(row0 + c * HW, row0 + c * HW + count, scalar_t(0));
}

// Pass 3 of a tile. With d_s = (z_s - m_s) / T, log p_s = d_s - log S_s (S_s = sum_t), so
//   KL(p_a || p_b) = sum_c p_a (d_a - d_b) + log(S_b / S_a)   (centred: accurate for large logits);
// this pass writes the sums over c (kl_ab, kl_ba; the log sums are added by the caller) at the active groups,
// and the gradient rows (row0_a/row0_b at channel 0 of the tile, channel stride HW, or nullptr) everywhere:
// mask * (p_a - p_b) for A, mask * (p_b - p_a) for B, exactly 0 where the mask is 0. It runs over pairs of vector
// groups, all C channels of a pair at a time, so the per-pixel terms stay in registers and each gradient row
// gets one whole 64-byte line (float) per channel: the non-temporal stores then fill whole lines.
template <typename scalar_t, typename acc_t>
void kl_gradient_pass(const Tile<acc_t>& ta, const Tile<acc_t>& tb, const SoftmaxStats<acc_t>& sa,
                      const SoftmaxStats<acc_t>& sb, int64_t C, acc_t inv_t, const bool* active,
                      const acc_t* mask_a, const acc_t* mask_b, bool learn_a, bool learn_b, scalar_t* row0_a,
                      scalar_t* row0_b, int64_t HW, bool non_temporal, acc_t* kl_ab, acc_t* kl_ba) {
  constexpr int64_t V = Vec<acc_t>::size();
  constexpr int P = kGroups;  // vector groups per step (pixel_tile.h)
  const Vec<acc_t> scale(inv_t), zero(0);
  const bool scaled = inv_t != acc_t(1);
  for (int64_t i0 = 0; i0 < ta.len; i0 += P * V) {
    Vec<acc_t> ma[P], mb[P], ra[P], rb[P], wa[P], wb[P], ab[P], ba[P];
    int64_t count[P];
    bool on[P];
    for (int g = 0; g < P; ++g) {
      const int64_t i = i0 + g * V;
      count[g] = std::clamp<int64_t>(ta.len - i, 0, V);
      on[g] = count[g] > 0 && active[i / V];
      ma[g] = Vec<acc_t>::loadu(sa.max + i), mb[g] = Vec<acc_t>::loadu(sb.max + i);
      ra[g] = Vec<acc_t>::loadu(sa.inv_sum_t + i), rb[g] = Vec<acc_t>::loadu(sb.inv_sum_t + i);
      wa[g] = Vec<acc_t>::loadu(mask_a + i), wb[g] = Vec<acc_t>::loadu(mask_b + i);
      ab[g] = ba[g] = zero;
    }
    for (int64_t c = 0; c < C; ++c) {
      scalar_t* row_a = row0_a ? row0_a + c * HW + i0 : nullptr;
      scalar_t* row_b = row0_b ? row0_b + c * HW + i0 : nullptr;
      for (int g = 0; g < P; ++g) {
        const int64_t i = i0 + g * V;
        if (!on[g]) {
          if (row_a && count[g]) store_output(row_a + g * V, zero, count[g], non_temporal);
          if (row_b && count[g]) store_output(row_b + g * V, zero, count[g], non_temporal);
          continue;
        }
        const auto pa = Vec<acc_t>::loadu(sa.exps.data() + c * kTile + i) * ra[g];
        const auto pb = Vec<acc_t>::loadu(sb.exps.data() + c * kTile + i) * rb[g];
        auto diff = (load(ta, c, i) - ma[g]) - (load(tb, c, i) - mb[g]);
        if (scaled) diff = diff * scale;
        if (learn_b) ab[g] = at::vec::fmadd(pa, diff, ab[g]);
        if (learn_a) ba[g] = at::vec::fnmadd(pb, diff, ba[g]);
        // Select, do not multiply, so that a pixel where the student does not learn gets exactly 0.
        if (row_a) store_output(row_a + g * V, Vec<acc_t>::blendv(wa[g] * (pa - pb), zero, wa[g] == zero), count[g], non_temporal);
        if (row_b) store_output(row_b + g * V, Vec<acc_t>::blendv(wb[g] * (pb - pa), zero, wb[g] == zero), count[g], non_temporal);
      }
    }
    for (int g = 0; g < P; ++g) {
      ab[g].store(kl_ab + i0 + g * V);
      ba[g].store(kl_ba + i0 + g * V);
    }
  }
}

template <typename scalar_t, typename acc_t>
void selective_kl_forward(const at::Tensor& za, const at::Tensor& zb, const at::Tensor& y, acc_t temperature,
                          Rule rule, uint8_t learners, int64_t ignore_index, GradientOut<scalar_t, acc_t> grad,
                          at::Tensor& selection, std::vector<TilePartial>& parts, std::atomic<int64_t>& bad) {
  constexpr int64_t V = Vec<acc_t>::size();
  const int64_t N = za.size(0), C = za.size(1), HW = za.size(2) * za.size(3);
  const int64_t tiles = tiles_per_plane(HW);
  const acc_t inv_t = acc_t(1) / temperature;
  const bool learn_a = learners & kBteachesA, learn_b = learners & kAteachesB;
  uint8_t* sel_out = selection.data_ptr<uint8_t>();
  const Vec<acc_t> zero(0), coef(grad.coef);
  // All-ones lanes where a student learns (a blend mask), zero lanes where it does not.
  const Vec<acc_t> learns_a = learn_a ? zero == zero : zero != zero, learns_b = learn_b ? zero == zero : zero != zero;

  at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
    SoftmaxStats<acc_t> sa(C), sb(C);
    alignas(64) int64_t label[kTile];
    alignas(64) acc_t label_f[kTile];
    alignas(64) acc_t kl_ab[kTile], kl_ba[kTile];
    alignas(64) acc_t mask_a[kTile], mask_b[kTile];  // T / n where the student learns, 0 elsewhere
    alignas(64) acc_t teach_ab[kTile], teach_ba[kTile];  // lane masks: A teaches B, B teaches A
    alignas(64) acc_t ce_a[kTile], ce_b[kTile];
    std::vector<acc_t> pack_a(C * kTile), pack_b(C * kTile);
    bool active[kTile / V] = {};  // past len stale (the passes run pairs of groups), never uninitialised
    for (int64_t job = begin; job < end; ++job) {
      const int64_t n = job / tiles, p0 = (job % tiles) * kTile, len = std::min(kTile, HW - p0);
      const int64_t out0 = n * C * HW + p0;  // gradient of channel 0, first pixel of the tile
      TilePartial part;
      part.valid = label_reader(y, n, C, ignore_index, &bad).read(p0, len, label, label_f);
      uint8_t* sel = sel_out + n * HW + p0;  // the selection bits, written in place
      if (part.valid == 0) {  // nothing to do: ignored pixels never count, whatever their logits
        std::fill(sel, sel + len, uint8_t(0));
        zero_rows(grad.a ? grad.a + out0 : nullptr, C, HW, len);
        zero_rows(grad.b ? grad.b + out0 : nullptr, C, HW, len);
        parts[job] = part;
        continue;
      }
      const auto ta = make_tile(plane<scalar_t>(za, n), p0, len, pack_a.data());
      const auto tb = make_tile(plane<scalar_t>(zb, n), p0, len, pack_b.data());
      max_argmax(ta, C, sa);
      max_argmax(tb, C, sb);
      if (rule == Rule::kConfidence) {  // cross-entropies at T = 1 (a gather of the label's logit: scalar)
        sum_exp(ta, C, inv_t, /*with_sum_1=*/true, nullptr, sa);
        sum_exp(tb, C, inv_t, /*with_sum_1=*/true, nullptr, sb);
        for (int64_t i = 0; i < len; ++i) {
          const int64_t l = std::max<int64_t>(label[i], 0);
          ce_a[i] = cross_entropy(ta, sa, i, l);
          ce_b[i] = cross_entropy(tb, sb, i, l);
        }
      }
      // The selection, a vector group at a time (lanes past len have label -1: invalid).
      for (int64_t i = 0; i < len; i += V) {
        const auto lab = Vec<acc_t>::loadu(label_f + i);
        const auto valid = lab >= zero;
        Vec<acc_t> a_teaches = valid, b_teaches = valid;
        if (rule == Rule::kCorrect) {
          const auto right_a = Vec<acc_t>::loadu(sa.argmax + i) == lab, right_b = Vec<acc_t>::loadu(sb.argmax + i) == lab;
          const auto differ = right_a ^ right_b;
          a_teaches = valid & right_a & differ;
          b_teaches = valid & right_b & differ;
        } else if (rule == Rule::kConfidence) {
          const auto ca = Vec<acc_t>::loadu(ce_a + i), cb = Vec<acc_t>::loadu(ce_b + i);
          a_teaches = valid & (ca < cb);
          b_teaches = valid & (cb < ca);
        }
        a_teaches.store(teach_ab + i);
        b_teaches.store(teach_ba + i);
        const int ab_bits = lane_bits(a_teaches), ba_bits = lane_bits(b_teaches);
        for (int64_t k = 0; k < std::min(V, len - i); ++k) {
          sel[i + k] = static_cast<uint8_t>(((ab_bits >> k) & 1) * kAteachesB | ((ba_bits >> k) & 1) * kBteachesA);
        }
        part.ab += __builtin_popcount(ab_bits);
        part.ba += __builtin_popcount(ba_bits);
        part.any += __builtin_popcount(ab_bits | ba_bits);
        Vec<acc_t>::blendv(zero, coef, b_teaches & learns_a).store(mask_a + i);
        Vec<acc_t>::blendv(zero, coef, a_teaches & learns_b).store(mask_b + i);
        active[i / V] = ((learn_b ? ab_bits : 0) | (learn_a ? ba_bits : 0)) != 0;
      }

      if (rule != Rule::kConfidence) {  // the selection needed no softmax: exponentials only where a student learns
        sum_exp(ta, C, inv_t, false, active, sa);
        sum_exp(tb, C, inv_t, false, active, sb);
      }
      kl_gradient_pass(ta, tb, sa, sb, C, inv_t, active, mask_a, mask_b, learn_a, learn_b,
                       grad.a ? grad.a + out0 : nullptr, grad.b ? grad.b + out0 : nullptr, HW, grad.non_temporal,
                       kl_ab, kl_ba);
      // KL = sum_c p_a (d_a - d_b) + log(S_b / S_a) at the selected pixels (one logarithm per group that has one). A NaN logit at any valid
      // pixel (selected or not) must reach both losses, never vanish: the max carries it (an infinite max gives
      // NaN too, as softmax does). Ignored pixels add exactly 0.
      Vec<acc_t> sum_ab(0), sum_ba(0);
      for (int64_t i = 0; i < len; i += V) {
        const auto ma = Vec<acc_t>::loadu(sa.max + i), mb = Vec<acc_t>::loadu(sb.max + i);
        const auto guard = (ma - ma) + (mb - mb);
        const auto valid = Vec<acc_t>::loadu(label_f + i) >= zero;
        const auto t_ab = Vec<acc_t>::loadu(teach_ab + i), t_ba = Vec<acc_t>::loadu(teach_ba + i);
        const auto log_ratio = active[i / V]  // else no learner's pixel here, and the sums may not be computed
                                   ? (Vec<acc_t>::loadu(sb.sum_t + i) * Vec<acc_t>::loadu(sa.inv_sum_t + i)).log()
                                   : zero;
        const auto ab = Vec<acc_t>::blendv(zero, Vec<acc_t>::loadu(kl_ab + i) + log_ratio, t_ab);
        const auto ba = Vec<acc_t>::blendv(zero, Vec<acc_t>::loadu(kl_ba + i) - log_ratio, t_ba);
        sum_ab = sum_ab + Vec<acc_t>::blendv(zero, guard + ab, valid);
        sum_ba = sum_ba + Vec<acc_t>::blendv(zero, guard + ba, valid);
      }
      part.kl_ab = lane_sum(sum_ab);
      part.kl_ba = lane_sum(sum_ba);
      parts[job] = part;
    }
    stream_fence();
  });
}

struct GradientBuffers {
  at::Tensor a, b;
  bool fresh = false;  // pages just mapped (and zeroed) here: their lines are in the caches
};

GradientBuffers gradient_buffers(const at::Tensor& za, const at::Tensor& zb, std::array<bool, 2> mask) {
  GradientBuffers out;
  out.a = gradient_buffer(za, mask[0], out.fresh);
  out.b = gradient_buffer(zb, mask[1], out.fresh);
  return out;
}

KlForwardOutputs pixel_selective_kl_cpu(const at::Tensor& za, const at::Tensor& zb, const at::Tensor& y,
                                        double temperature, c10::string_view rule_name, c10::string_view normalize_name,
                                        int64_t ignore_index, c10::string_view learners_name,
                                        std::array<bool, 2> grad_mask) {
  check_logits_and_labels(za, zb, y);
  check_temperature(temperature);
  const Rule rule = parse_rule(std::string(rule_name));
  const Normalize normalize = parse_normalize(std::string(normalize_name));
  const uint8_t learners = parse_learners(std::string(learners_name));
  const int64_t N = za.size(0), C = za.size(1), H = za.size(2), W = za.size(3);
  auto selection = at::empty({N, H, W}, za.options().dtype(at::kByte));
  std::vector<TilePartial> parts(N * tiles_per_plane(H * W));
  std::atomic<int64_t> bad{LabelReader::kNoBadLabel};
  const at::ScalarType acc_type = za.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto buffers = gradient_buffers(za, zb, grad_mask);
  const at::Tensor &grad_za = buffers.a, &grad_zb = buffers.b;
  const bool grads = grad_mask[0] || grad_mask[1];
  // n is known before the pass when every valid pixel counts (a label pass: 1/C of the logits' bytes).
  const bool n_up_front = grads && (normalize == Normalize::kValid || rule == Rule::kAll);
  const double n_before = n_up_front ? std::max<double>(1.0, at::ne(y, ignore_index).sum().item<double>()) : 1.0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, za.scalar_type(), "pixel_selective_kl_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GradientOut<scalar_t, acc_t> out{grad_mask[0] ? grad_za.data_ptr<scalar_t>() : nullptr,
                                     grad_mask[1] ? grad_zb.data_ptr<scalar_t>() : nullptr,
                                     static_cast<acc_t>(temperature / n_before), !buffers.fresh};
    selective_kl_forward<scalar_t, acc_t>(za, zb, y, static_cast<acc_t>(temperature), rule, learners, ignore_index,
                                          out, selection, parts, bad);
  });
  raise_if_bad_label(bad, C, ignore_index);

  TilePartial total;
  for (const auto& p : parts) {  // fixed order: deterministic
    total.kl_ab += p.kl_ab, total.kl_ba += p.kl_ba;
    total.valid += p.valid, total.ab += p.ab, total.ba += p.ba, total.any += p.any;
  }
  const double n = static_cast<double>(std::max<int64_t>(1, normalize == Normalize::kValid ? total.valid : total.any));
  if (grads && !n_up_front && n != 1.0) {  // written for n = 1: divide now (in place, ATen's parallel kernel)
    if (grad_mask[0]) grad_za.div_(n);
    if (grad_mask[1]) grad_zb.div_(n);
  }
  const double t2 = temperature * temperature;
  auto scalar = [&](double v, at::ScalarType type) { return at::scalar_tensor(v, za.options().dtype(type)); };
  const double loss_a = (learners & kBteachesA) ? t2 * total.kl_ba / n : 0.0;
  const double loss_b = (learners & kAteachesB) ? t2 * total.kl_ab / n : 0.0;
  return {scalar(loss_a, acc_type), scalar(loss_b, acc_type),
          at::scalar_tensor(total.ab, za.options().dtype(at::kLong)),
          at::scalar_tensor(total.ba, za.options().dtype(at::kLong)), selection, scalar(n, acc_type),
          grad_za, grad_zb};
}

template <typename scalar_t, typename acc_t>
void selective_kl_backward(const at::Tensor& za, const at::Tensor& zb, const at::Tensor& selection, acc_t temperature,
                           acc_t coef_a, acc_t coef_b, scalar_t* grad_a, scalar_t* grad_b) {
  constexpr int64_t V = Vec<acc_t>::size();
  const int64_t N = za.size(0), C = za.size(1), HW = za.size(2) * za.size(3);
  const int64_t tiles = tiles_per_plane(HW);
  const acc_t inv_t = acc_t(1) / temperature;
  const uint8_t* sel_in = selection.const_data_ptr<uint8_t>();

  at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
    SoftmaxStats<acc_t> sa(C), sb(C);
    std::vector<acc_t> pack_a(C * kTile), pack_b(C * kTile);
    alignas(64) acc_t mask_a[kTile], mask_b[kTile];  // coef where the student learns, 0 elsewhere
    bool active[kTile / V];
    for (int64_t job = begin; job < end; ++job) {
      const int64_t n = job / tiles, p0 = (job % tiles) * kTile, len = std::min(kTile, HW - p0);
      const uint8_t* sel = sel_in + n * HW + p0;
      std::fill(active, active + kTile / V, false);
      std::fill(mask_a, mask_a + kTile, acc_t(0));
      std::fill(mask_b, mask_b + kTile, acc_t(0));
      bool any = false;
      for (int64_t i = 0; i < len; ++i) {
        mask_a[i] = (sel[i] & kBteachesA) ? coef_a : acc_t(0);
        mask_b[i] = (sel[i] & kAteachesB) ? coef_b : acc_t(0);
        const bool on = (grad_a && (sel[i] & kBteachesA)) || (grad_b && (sel[i] & kAteachesB));
        active[i / V] = active[i / V] || on;
        any = any || on;
      }
      const int64_t out0 = n * C * HW + p0;
      if (!any) {
        for (int64_t c = 0; c < C; ++c) {
          if (grad_a) std::fill(grad_a + out0 + c * HW, grad_a + out0 + c * HW + len, scalar_t(0));
          if (grad_b) std::fill(grad_b + out0 + c * HW, grad_b + out0 + c * HW + len, scalar_t(0));
        }
        continue;
      }
      const auto ta = make_tile(plane<scalar_t>(za, n), p0, len, pack_a.data());
      const auto tb = make_tile(plane<scalar_t>(zb, n), p0, len, pack_b.data());
      max_argmax(ta, C, sa);
      max_argmax(tb, C, sb);
      sum_exp(ta, C, inv_t, false, active, sa);
      sum_exp(tb, C, inv_t, false, active, sb);
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t i = 0; i < len; i += V) {
          const int64_t count = std::min(V, len - i);
          if (!active[i / V]) {
            if (grad_a) store(grad_a + out0 + c * HW + i, Vec<acc_t>(0), count);
            if (grad_b) store(grad_b + out0 + c * HW + i, Vec<acc_t>(0), count);
            continue;
          }
          const auto pa = sa.prob(c, i), pb = sb.prob(c, i);
          // Select, do not multiply, so that an unselected pixel's gradient is exactly 0.
          const Vec<acc_t> zero(0);
          if (grad_a) {
            const auto m = Vec<acc_t>::loadu(mask_a + i);
            store(grad_a + out0 + c * HW + i, Vec<acc_t>::blendv(m * (pa - pb), zero, m == zero), count);
          }
          if (grad_b) {
            const auto m = Vec<acc_t>::loadu(mask_b + i);
            store(grad_b + out0 + c * HW + i, Vec<acc_t>::blendv(m * (pb - pa), zero, m == zero), count);
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pixel_selective_kl_backward_cpu(const at::Tensor& grad_loss_a,
                                                                   const at::Tensor& grad_loss_b,
                                                                   const at::Tensor& za, const at::Tensor& zb,
                                                                   const at::Tensor& selection, const at::Tensor& norm,
                                                                   double temperature, std::array<bool, 2> mask) {
  check_backward_inputs(za, zb, selection);
  check_temperature(temperature);
  const auto sel = selection.contiguous();
  // dloss/dz = T^2 / n * (p - q) / T * g.  Scalars are read on the host here: a CPU kernel has nothing to sync.
  const double base = temperature / norm.item<double>();
  const double coef_a = base * grad_loss_a.item<double>(), coef_b = base * grad_loss_b.item<double>();
  const auto buffers = gradient_buffers(za, zb, mask);  // written with ordinary stores, fresh or not
  const at::Tensor &grad_za = buffers.a, &grad_zb = buffers.b;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, za.scalar_type(), "pixel_selective_kl_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    selective_kl_backward<scalar_t, acc_t>(za, zb, sel, static_cast<acc_t>(temperature), static_cast<acc_t>(coef_a),
                                           static_cast<acc_t>(coef_b), mask[0] ? grad_za.data_ptr<scalar_t>() : nullptr,
                                           mask[1] ? grad_zb.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_za, grad_zb};
}

}  // namespace

TORCH_LIBRARY_IMPL(ccl, CPU, m) {
  m.impl("pixel_selective_kl", &pixel_selective_kl_cpu);
  m.impl("pixel_selective_kl_backward", &pixel_selective_kl_backward_cpu);
}

}  // namespace ccl::cpu
