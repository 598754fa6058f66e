// CPU kernel of region_direction_mask (METHOD.md §2).
//
// One task per (sample, row of regions): it walks the rh pixel rows of its regions in tiles along W, computes
// each pixel's score for both students (cross-entropy at T = 1 from one max pass and one exp pass, or argmax
// == label from the max pass alone) and adds it to its region's sums. Each region is summed by one task in a
// fixed order, so the result is deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../ops/checks.h"
#include "pixel_tile.h"

namespace ccl::cpu {
namespace {

// Per-pixel cross-entropy at T = 1 of a tile, log(sum_c exp(z_c - m)) - (z_y - m), a vector group at a time
// (the label's logit is gathered first; an ignored pixel reads channel 0 and is dropped by the caller).
template <typename acc_t>
void pixel_cross_entropy(const Tile<acc_t>& t, int64_t C, const int64_t* label, SoftmaxStats<acc_t>& s,
                         acc_t* out) {
  constexpr int64_t V = Vec<acc_t>::size();
  max_only(t, C, s);
  sum_exp(t, C, acc_t(1), /*with_sum_1=*/true, nullptr, s, /*keep_exps=*/false);
  for (int64_t i = 0; i < t.len; ++i) out[i] = load_one(t, std::max<int64_t>(label[i], 0), i);
  for (int64_t i = 0; i < t.len; i += V) {
    const auto m = Vec<acc_t>::loadu(s.max + i);
    (Vec<acc_t>::loadu(s.sum_1 + i).log() - (Vec<acc_t>::loadu(out + i) - m)).store(out + i);
  }
}

// Per-pixel accuracy (argmax == label: 1 or 0) of a tile.
template <typename acc_t>
void pixel_accuracy(const Tile<acc_t>& t, int64_t C, const acc_t* label_f, SoftmaxStats<acc_t>& s, acc_t* out) {
  constexpr int64_t V = Vec<acc_t>::size();
  max_argmax(t, C, s);
  const Vec<acc_t> one(1), zero(0);
  for (int64_t i = 0; i < t.len; i += V) {
    Vec<acc_t>::blendv(zero, one, Vec<acc_t>::loadu(s.argmax + i) == Vec<acc_t>::loadu(label_f + i)).store(out + i);
  }
}

template <typename scalar_t, typename acc_t>
void region_scores(const at::Tensor& za, const at::Tensor& zb, const at::Tensor& y, int64_t rh, int64_t rw,
                   Score score, int64_t ignore_index, at::Tensor& direction, at::Tensor& scores,
                   std::atomic<int64_t>& bad) {
  const int64_t N = za.size(0), C = za.size(1), H = za.size(2), W = za.size(3);
  const int64_t Hr = direction.size(1), Wr = direction.size(2);
  int8_t* dir_out = direction.data_ptr<int8_t>();
  float* score_out = scores.data_ptr<float>();

  at::parallel_for(0, N * Hr, 1, [&](int64_t begin, int64_t end) {
    SoftmaxStats<acc_t> sa(C), sb(C);
    alignas(64) int64_t label[kTile];
    alignas(64) acc_t label_f[kTile];
    std::vector<acc_t> pack_a(C * kTile), pack_b(C * kTile);
    alignas(64) acc_t score_a[kTile], score_b[kTile];
    std::vector<acc_t> sum_a(Wr), sum_b(Wr);
    std::vector<int64_t> count(Wr);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t n = job / Hr, r = job % Hr;
      std::fill(sum_a.begin(), sum_a.end(), acc_t(0));
      std::fill(sum_b.begin(), sum_b.end(), acc_t(0));
      std::fill(count.begin(), count.end(), int64_t(0));
      const auto labels = label_reader(y, n, C, ignore_index, &bad);
      for (int64_t h = r * rh; h < std::min(H, (r + 1) * rh); ++h) {
        for (int64_t w0 = 0; w0 < W; w0 += kTile) {
          const int64_t p0 = h * W + w0, len = std::min(kTile, W - w0);
          if (labels.read(p0, len, label, label_f) == 0) continue;
          const auto ta = make_tile(plane<scalar_t>(za, n), p0, len, pack_a.data());
          const auto tb = make_tile(plane<scalar_t>(zb, n), p0, len, pack_b.data());
          if (score == Score::kCrossEntropy) {
            pixel_cross_entropy(ta, C, label, sa, score_a);
            pixel_cross_entropy(tb, C, label, sb, score_b);
          } else {
            pixel_accuracy(ta, C, label_f, sa, score_a);
            pixel_accuracy(tb, C, label_f, sb, score_b);
          }
          // Into the regions of the tile's pixels (w0 + i) / rw, walked without a division per pixel;
          // ignored pixels add exactly 0 (a select: their scores may be anything).
          int64_t q = w0 / rw, next = (q + 1) * rw - w0;
          for (int64_t i = 0; i < len; ++i) {
            if (i == next) ++q, next += rw;
            const bool valid = label[i] >= 0;
            sum_a[q] += valid ? score_a[i] : acc_t(0);
            sum_b[q] += valid ? score_b[i] : acc_t(0);
            count[q] += valid;
          }
        }
      }
      for (int64_t q = 0; q < Wr; ++q) {
        const float nan = std::numeric_limits<float>::quiet_NaN();
        const float a = count[q] ? static_cast<float>(sum_a[q] / count[q]) : nan;
        const float b = count[q] ? static_cast<float>(sum_b[q] / count[q]) : nan;
        const bool a_better = score == Score::kCrossEntropy ? a < b : a > b;  // false for NaN
        const bool b_better = score == Score::kCrossEntropy ? b < a : b > a;
        dir_out[(n * Hr + r) * Wr + q] = static_cast<int8_t>(a_better) - static_cast<int8_t>(b_better);
        score_out[((n * 2 + 0) * Hr + r) * Wr + q] = a;
        score_out[((n * 2 + 1) * Hr + r) * Wr + q] = b;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> region_direction_mask_cpu(const at::Tensor& za, const at::Tensor& zb,
                                                             const at::Tensor& y, int64_t region_h, int64_t region_w,
                                                             c10::string_view score_name, int64_t ignore_index) {
  check_logits_and_labels(za, zb, y);
  TORCH_CHECK(region_h >= 1 && region_w >= 1, "region sizes must be >= 1, got (", region_h, ", ", region_w, ")");
  const Score score = parse_score(std::string(score_name));
  const int64_t N = za.size(0), C = za.size(1), H = za.size(2), W = za.size(3);
  const int64_t Hr = (H + region_h - 1) / region_h, Wr = (W + region_w - 1) / region_w;
  auto direction = at::empty({N, Hr, Wr}, za.options().dtype(at::kChar));
  auto scores = at::empty({N, 2, Hr, Wr}, za.options().dtype(at::kFloat));
  std::atomic<int64_t> bad{LabelReader::kNoBadLabel};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, za.scalar_type(), "region_direction_mask_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    region_scores<scalar_t, acc_t>(za, zb, y, region_h, region_w, score, ignore_index, direction, scores, bad);
  });
  raise_if_bad_label(bad, C, ignore_index);
  return {direction, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(ccl, CPU, m) { m.impl("region_direction_mask", &region_direction_mask_cpu); }

}  // namespace ccl::cpu
