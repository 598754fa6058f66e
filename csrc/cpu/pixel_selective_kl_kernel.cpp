// CPU kernels of pixel_selective_kl (METHOD.md §1): forward (optionally with the gradients) and backward, fused
// per tile of pixels.
//
// Forward, per tile: pass 1 max/argmax of both students, pass 2 their exponentials and sums (kept for the
// tile, so no exponential is computed twice), then the selection per pixel, then pass 3: the two KL sums over
// the vector groups with a selected pixel and, when asked (grad_mask), the gradients of both losses
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

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "../ops/checks.h"
#include "pixel_tile.h"

namespace ccl::cpu {
namespace {

struct TilePartial {
  double kl_ab = 0, kl_ba = 0;  // sums of KL(p_a||p_b) over A->B pixels and KL(p_b||p_a) over B->A pixels
  int64_t valid = 0, ab = 0, ba = 0, any = 0;
};

// Where the forward writes the gradients: contiguous NCHW buffers, or nullptr when not asked for, and the
// factor T / n (T when n is not known yet).
template <typename scalar_t, typename acc_t>
struct GradientOut {
  scalar_t* a = nullptr;
  scalar_t* b = nullptr;
  acc_t coef = 0;
};

// Zeros for pixels [i, i + count) of every channel of a tile's gradient rows (from `row0`, channel stride HW).
template <typename scalar_t>
void zero_rows(scalar_t* row0, int64_t C, int64_t HW, int64_t count) {
  if (row0 == nullptr) return;
  for (int64_t c = 0; c < C; ++c) std::fill(row0 + c * HW, row0 + c * HW + count, scalar_t(0));
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
  const bool grads = grad.a || grad.b;
  uint8_t* sel_out = selection.data_ptr<uint8_t>();

  at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
    SoftmaxStats<acc_t> sa(C), sb(C);
    alignas(64) int64_t label[kTile];
    alignas(64) acc_t label_f[kTile];
    alignas(64) acc_t kl_ab[kTile], kl_ba[kTile];
    alignas(64) acc_t mask_a[kTile], mask_b[kTile];  // T / n where the student learns, 0 elsewhere
    std::vector<acc_t> pack_a(C * kTile), pack_b(C * kTile);
    bool active[kTile / V];
    for (int64_t job = begin; job < end; ++job) {
      const int64_t n = job / tiles, p0 = (job % tiles) * kTile, len = std::min(kTile, HW - p0);
      const int64_t out0 = n * C * HW + p0;  // gradient of channel 0, first pixel of the tile
      TilePartial part;
      part.valid = label_reader(y, n, C, ignore_index, &bad).read(p0, len, label, label_f);
      uint8_t* sel = sel_out + n * HW + p0;  // written in place, read back by pass 3
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
      const bool need_ce = rule == Rule::kConfidence;
      sum_exp(ta, C, inv_t, need_ce, nullptr, sa);
      sum_exp(tb, C, inv_t, need_ce, nullptr, sb);

      std::fill(active, active + kTile / V, false);
      for (int64_t i = 0; i < kTile; ++i) mask_a[i] = mask_b[i] = acc_t(0);
      for (int64_t i = 0; i < len; ++i) {
        uint8_t bits = 0;
        if (label[i] >= 0) {
          bool a_teaches, b_teaches;
          if (rule == Rule::kAll) {
            a_teaches = b_teaches = true;
          } else if (rule == Rule::kCorrect) {
            const bool right_a = sa.argmax[i] == label_f[i], right_b = sb.argmax[i] == label_f[i];
            a_teaches = right_a && !right_b;
            b_teaches = right_b && !right_a;
          } else {
            const acc_t ce_a = cross_entropy(ta, sa, i, label[i]), ce_b = cross_entropy(tb, sb, i, label[i]);
            a_teaches = ce_a < ce_b;
            b_teaches = ce_b < ce_a;
          }
          bits = (a_teaches ? kAteachesB : 0) | (b_teaches ? kBteachesA : 0);
          part.ab += a_teaches;
          part.ba += b_teaches;
          part.any += bits != 0;
        }
        sel[i] = bits;
        mask_a[i] = (bits & learners & kBteachesA) ? grad.coef : acc_t(0);
        mask_b[i] = (bits & learners & kAteachesB) ? grad.coef : acc_t(0);
        active[i / V] = active[i / V] || (bits & learners) != 0;
      }

      // Pass 3: with d_s = (z_s - m_s) / T, log p_s = d_s - log_sum_t_s, so
      // KL(p_a || p_b) = sum_c p_a (d_a - d_b) - log_sum_t_a + log_sum_t_b (centred: accurate for large logits).
      for (int64_t i = 0; i < len; i += V) {
        Vec<acc_t>(0).store(kl_ab + i);
        Vec<acc_t>(0).store(kl_ba + i);
      }
      const Vec<acc_t> scale(inv_t), zero(0);
      for (int64_t c = 0; c < C; ++c) {
        scalar_t* row_a = grad.a ? grad.a + out0 + c * HW : nullptr;
        scalar_t* row_b = grad.b ? grad.b + out0 + c * HW : nullptr;
        for (int64_t i = 0; i < len; i += V) {
          const int64_t count = std::min(V, len - i);
          if (!active[i / V]) {
            if (row_a) store_stream(row_a + i, zero, count);
            if (row_b) store_stream(row_b + i, zero, count);
            continue;
          }
          const auto pa = sa.prob(c, i), pb = sb.prob(c, i);
          const auto da = (load(ta, c, i) - Vec<acc_t>::loadu(sa.max + i)) * scale;
          const auto db = (load(tb, c, i) - Vec<acc_t>::loadu(sb.max + i)) * scale;
          const auto diff = da - db;
          if (learn_b) (Vec<acc_t>::loadu(kl_ab + i) + pa * diff).store(kl_ab + i);
          if (learn_a) (Vec<acc_t>::loadu(kl_ba + i) - pb * diff).store(kl_ba + i);
          // Select, do not multiply, so that a pixel where the student does not learn gets exactly 0.
          if (row_a) {
            const auto m = Vec<acc_t>::loadu(mask_a + i);
            store_stream(row_a + i, Vec<acc_t>::blendv(m * (pa - pb), zero, m == zero), count);
          }
          if (row_b) {
            const auto m = Vec<acc_t>::loadu(mask_b + i);
            store_stream(row_b + i, Vec<acc_t>::blendv(m * (pb - pa), zero, m == zero), count);
          }
        }
      }
      for (int64_t i = 0; i < len; ++i) {
        if (label[i] < 0) continue;
        const acc_t log_ratio = sb.log_sum_t[i] - sa.log_sum_t[i];
        // A NaN logit at any valid pixel (selected or not) must reach both losses, never vanish: the max
        // carries it (an infinite max gives NaN too, as softmax does).
        const acc_t nan_guard = (sa.max[i] - sa.max[i]) + (sb.max[i] - sb.max[i]);
        part.kl_ab += nan_guard + ((sel[i] & kAteachesB) ? kl_ab[i] + log_ratio : acc_t(0));
        part.kl_ba += nan_guard + ((sel[i] & kBteachesA) ? kl_ba[i] - log_ratio : acc_t(0));
      }
      parts[job] = part;
    }
    stream_fence();
  });
}

// The gradients are fresh buffers first touched by this kernel. On Linux, hint transparent huge pages for them
// (as PyTorch's THP_MEM_ALLOC_ENABLE does for every allocation), so that first touch takes one page fault per
// 2 MB instead of one per 4 KB: with glibc's allocator every logits-sized buffer is a fresh mmap, and its 4 KB
// faults cost several times the arithmetic (measured in benchmarks/RESULTS_CPU.md).
void advise_huge_pages(const at::Tensor& t) {
#ifdef __linux__
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr()), end = begin + t.nbytes();
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1), last = end & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint: errors ignored
#endif
}

std::tuple<at::Tensor, at::Tensor> fresh_gradients(const at::Tensor& za, const at::Tensor& zb,
                                                   std::array<bool, 2> mask) {
  auto grads = empty_gradients(za, zb, mask);
  advise_huge_pages(std::get<0>(grads));
  advise_huge_pages(std::get<1>(grads));
  return grads;
}

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor>;

ForwardOutputs pixel_selective_kl_cpu(const at::Tensor& za, const at::Tensor& zb, const at::Tensor& y,
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
  at::Tensor grad_za, grad_zb;
  std::tie(grad_za, grad_zb) = fresh_gradients(za, zb, grad_mask);
  const bool grads = grad_mask[0] || grad_mask[1];
  // n is known before the pass when every valid pixel counts (a label pass: 1/C of the logits' bytes).
  const bool n_up_front = grads && (normalize == Normalize::kValid || rule == Rule::kAll);
  const double n_before = n_up_front ? std::max<double>(1.0, at::ne(y, ignore_index).sum().item<double>()) : 1.0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, za.scalar_type(), "pixel_selective_kl_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GradientOut<scalar_t, acc_t> out{grad_mask[0] ? grad_za.data_ptr<scalar_t>() : nullptr,
                                     grad_mask[1] ? grad_zb.data_ptr<scalar_t>() : nullptr,
                                     static_cast<acc_t>(temperature / n_before)};
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
  at::Tensor grad_za, grad_zb;
  std::tie(grad_za, grad_zb) = fresh_gradients(za, zb, mask);
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
