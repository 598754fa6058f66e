// CPU kernels of pixel_selective_kl (METHOD.md §1): forward and backward, fused per tile of pixels.
//
// Forward, per tile: pass 1 max/argmax of both students, pass 2 their exponentials and sums, then the
// selection per pixel, then pass 3 (only over vector groups with a selected pixel) the two KL sums from the
// kept exponentials. Nothing of
// size N*C*H*W is allocated. Per-tile partial sums are reduced in tile order, so the result does not depend on
// the number of threads.
//
// Backward, per tile with a selected pixel: passes 1 and 2 again (the exponentials of pass 2 are kept for the
// tile, so no exponential is computed twice), then the gradients
// dloss_a/dza = T / n * g_a * [B teaches A] * (p_a - p_b) (and symmetrically for zb), written once.
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

template <typename scalar_t, typename acc_t>
void selective_kl_forward(const at::Tensor& za, const at::Tensor& zb, const at::Tensor& y, acc_t temperature,
                          Rule rule, int64_t ignore_index, at::Tensor& selection, std::vector<TilePartial>& parts,
                          std::atomic<int64_t>& bad) {
  constexpr int64_t V = Vec<acc_t>::size();
  const int64_t N = za.size(0), C = za.size(1), HW = za.size(2) * za.size(3);
  const int64_t tiles = tiles_per_plane(HW);
  const acc_t inv_t = acc_t(1) / temperature;
  uint8_t* sel_out = selection.data_ptr<uint8_t>();

  at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
    SoftmaxStats<acc_t> sa(C), sb(C);
    alignas(64) int64_t label[kTile];
    alignas(64) acc_t label_f[kTile];
    alignas(64) acc_t kl_ab[kTile], kl_ba[kTile];
    std::vector<acc_t> pack_a(C * kTile), pack_b(C * kTile);
    bool active[kTile / V];
    for (int64_t job = begin; job < end; ++job) {
      const int64_t n = job / tiles, p0 = (job % tiles) * kTile, len = std::min(kTile, HW - p0);
      const auto ta = make_tile(plane<scalar_t>(za, n), p0, len, pack_a.data());
      const auto tb = make_tile(plane<scalar_t>(zb, n), p0, len, pack_b.data());
      TilePartial part;
      part.valid = label_reader(y, n, C, ignore_index, &bad).read(p0, len, label, label_f);
      if (part.valid == 0) {  // nothing to do: ignored pixels never count, whatever their logits
        std::fill(sel_out + n * HW + p0, sel_out + n * HW + p0 + len, uint8_t(0));
        parts[job] = part;
        continue;
      }
      max_argmax(ta, C, sa);
      max_argmax(tb, C, sb);
      const bool need_ce = rule == Rule::kConfidence;
      sum_exp(ta, C, inv_t, need_ce, nullptr, sa);
      sum_exp(tb, C, inv_t, need_ce, nullptr, sb);

      std::fill(active, active + kTile / V, false);
      uint8_t* sel = sel_out + n * HW + p0;  // written in place, read back by pass 3
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
        active[i / V] = active[i / V] || bits != 0;
      }

      // Pass 3: with d_s = (z_s - m_s) / T, log p_s = d_s - log_sum_t_s, so
      // KL(p_a || p_b) = sum_c p_a (d_a - d_b) - log_sum_t_a + log_sum_t_b (centred: accurate for large logits).
      for (int64_t i = 0; i < len; i += V) {
        if (!active[i / V]) continue;
        Vec<acc_t>(0).store(kl_ab + i);
        Vec<acc_t>(0).store(kl_ba + i);
      }
      const Vec<acc_t> scale(inv_t);
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t i = 0; i < len; i += V) {
          if (!active[i / V]) continue;
          const auto da = (load(ta, c, i) - Vec<acc_t>::loadu(sa.max + i)) * scale;
          const auto db = (load(tb, c, i) - Vec<acc_t>::loadu(sb.max + i)) * scale;
          const auto diff = da - db;
          (Vec<acc_t>::loadu(kl_ab + i) + sa.prob(c, i) * diff).store(kl_ab + i);
          (Vec<acc_t>::loadu(kl_ba + i) - sb.prob(c, i) * diff).store(kl_ba + i);
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
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pixel_selective_kl_cpu(
    const at::Tensor& za, const at::Tensor& zb, const at::Tensor& y, double temperature, c10::string_view rule_name,
    c10::string_view normalize_name, int64_t ignore_index) {
  check_logits_and_labels(za, zb, y);
  check_temperature(temperature);
  const Rule rule = parse_rule(std::string(rule_name));
  const Normalize normalize = parse_normalize(std::string(normalize_name));
  const int64_t N = za.size(0), C = za.size(1), H = za.size(2), W = za.size(3);
  auto selection = at::empty({N, H, W}, za.options().dtype(at::kByte));
  std::vector<TilePartial> parts(N * tiles_per_plane(H * W));
  std::atomic<int64_t> bad{LabelReader::kNoBadLabel};
  at::ScalarType acc_type = za.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, za.scalar_type(), "pixel_selective_kl_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    selective_kl_forward<scalar_t, acc_t>(za, zb, y, static_cast<acc_t>(temperature), rule, ignore_index, selection,
                                          parts, bad);
  });
  raise_if_bad_label(bad, C, ignore_index);

  TilePartial total;
  for (const auto& p : parts) {  // fixed order: deterministic
    total.kl_ab += p.kl_ab, total.kl_ba += p.kl_ba;
    total.valid += p.valid, total.ab += p.ab, total.ba += p.ba, total.any += p.any;
  }
  const double n = static_cast<double>(std::max<int64_t>(1, normalize == Normalize::kValid ? total.valid : total.any));
  const double t2 = temperature * temperature;
  auto scalar = [&](double v, at::ScalarType type) { return at::scalar_tensor(v, za.options().dtype(type)); };
  return {scalar(t2 * total.kl_ba / n, acc_type), scalar(t2 * total.kl_ab / n, acc_type),
          at::scalar_tensor(total.ab, za.options().dtype(at::kLong)),
          at::scalar_tensor(total.ba, za.options().dtype(at::kLong)), selection, scalar(n, acc_type)};
}

// The gradients are fresh buffers first touched by this kernel. On Linux, hint transparent huge pages for them
// (as PyTorch's THP_MEM_ALLOC_ENABLE does for every allocation), so that first touch takes one page fault per
// 2 MB instead of one per 4 KB: the faults otherwise cost as much as the arithmetic.
void advise_huge_pages(const at::Tensor& t) {
#ifdef __linux__
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr()), end = begin + t.nbytes();
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1), last = end & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint: errors ignored
#endif
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
  std::tie(grad_za, grad_zb) = empty_gradients(za, zb, mask);
  advise_huge_pages(grad_za);
  advise_huge_pages(grad_zb);
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
