// CPU kernel of region_direction_mask (METHOD.md §2).
//
// One task per (sample, row of regions): it walks the rh pixel rows of its regions in tiles along W, computes
// each pixel's score for both students (cross-entropy at T = 1, or argmax == label from a max pass) and adds it
// to its region's sums. The cross-entropy of float NCHW logits takes one pass over the logits read in place
// (cross_entropy_in_place); other dtypes and layouts pack the tile and take a max pass and an exp pass. Each
// region is summed by one task in a fixed order, so the result is deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
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

#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
// Per-pixel cross-entropy at T = 1 of a tile of float logits read in place (channel 0 of its first pixel at
// `origin`, channels sC apart, len a multiple of 16), in one pass over the channels: shifted by the label's logit
// instead of the max, ce = log(sum_c exp(z_c - z_y)). No max pass and no packed copy: each line of the logits is
// read once, its next tile's line prefetched. The label's own term is exactly 1, so the sum is >= 1 and its log
// accurate. z_c - z_y may be positive: the exponent is clamped at 126, and a pair of groups whose sum reaches 2^125
// (a clamp or an overflow possible: logits more than ~86 apart, or an infinite one) or is NaN (a NaN logit, or an
// infinite label logit: inf - inf) makes it return false, and the caller takes the max-shifted path for the
// tile, which gives those pixels the reference's NaN or infinity.
bool cross_entropy_in_place(const float* origin, int64_t C, int64_t sC, int64_t len, const int64_t* label,
                            float* out) {
  constexpr int64_t V = 8;
  const Ahead ahead = ahead_of(origin, len, sC);
  alignas(32) float label_logit[kTile];
  for (int64_t i = 0; i < len; ++i) label_logit[i] = origin[std::max<int64_t>(label[i], 0) * sC + i];  // ignored: 0
  const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(126.f), overflow = _mm256_set1_ps(0x1p125f);
  for (int64_t i = 0; i < len; i += kGroups * V) {
    __m256 shift[kGroups], sum[kGroups];
    for (int g = 0; g < kGroups; ++g) shift[g] = _mm256_load_ps(label_logit + i + g * V), sum[g] = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      ahead.prefetch(c, i);
      for (int g = 0; g < kGroups; ++g) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(origin + c * sC + i + g * V), shift[g]);
        sum[g] = _mm256_add_ps(sum[g], exp2_in_range(_mm256_min_ps(hi, _mm256_max_ps(lo, log2e_times(d)))));
      }
    }
    for (int g = 0; g < kGroups; ++g) {
      if (_mm256_movemask_ps(_mm256_cmp_ps(sum[g], overflow, _CMP_NLT_UQ))) return false;  // NaN too
      Vec<float>(sum[g]).log().store(out + i + g * V);
    }
  }
  return true;
}

// The same with AVX-512, for CPUs where ATen runs its own AVX-512 kernels (at::get_cpu_capability(), which
// honours ATEN_CPU_CAPABILITY). A 16-float vector is one 64-byte line of a channel row, so each step reads
// one line per channel; the exponent's power of two comes from scalef (the exponent clamped at 128, where it
// overflows: an infinite sum) and the logarithm of the sum (>= 1) from getexp/getmant and an atanh series, inline.
// Half the instructions of the AVX2 loop per pixel, so the out-of-order window spans twice as many of the loads
// that miss the caches.
#define CCL_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma")))

// log(s) for s >= 1: s = m * 2^e with m in [0.75, 1.5), log m = 2 atanh(f), f = (m - 1) / (m + 1), |f| <= 1/5,
// summed to f^9 (truncation < 4e-9). NaN propagates.
CCL_TARGET_AVX512 inline __m512 log_of_sum_avx512(__m512 s) {
  const __m512 e = _mm512_getexp_ps(_mm512_mul_ps(s, _mm512_set1_ps(4.f / 3.f)));
  const __m512 m = _mm512_getmant_ps(s, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
  const __m512 f = _mm512_div_ps(_mm512_sub_ps(m, _mm512_set1_ps(1.f)), _mm512_add_ps(m, _mm512_set1_ps(1.f)));
  const __m512 f2 = _mm512_mul_ps(f, f);
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(1.f / 9), f2, _mm512_set1_ps(1.f / 7));
  q = _mm512_fmadd_ps(q, f2, _mm512_set1_ps(1.f / 5));
  q = _mm512_fmadd_ps(q, f2, _mm512_set1_ps(1.f / 3));
  q = _mm512_fmadd_ps(q, f2, _mm512_set1_ps(1.f));
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693147180559945309f), _mm512_mul_ps(_mm512_add_ps(f, f), q));
}

CCL_TARGET_AVX512 bool cross_entropy_in_place_avx512(const float* origin, int64_t C, int64_t sC, int64_t len,
                                                     const int64_t* label, float* out) {
  constexpr int64_t V = 16;
  const char* ahead = reinterpret_cast<const char*>(origin + len);  // the next tile's rows
  alignas(64) float label_logit[kTile];
  if ((C - 1) * sC + len > std::numeric_limits<int32_t>::max()) {
    for (int64_t i = 0; i < len; ++i) label_logit[i] = origin[std::max<int64_t>(label[i], 0) * sC + i];  // ignored: 0
  } else {  // one gather per 16 pixels of offset label * sC + i (int32: checked above)
    const __m512i step = _mm512_set1_epi32(static_cast<int32_t>(sC));
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t i = 0; i < len; i += V) {
      const __m256i lo8 = _mm512_cvtepi64_epi32(_mm512_max_epi64(_mm512_load_si512(label + i), _mm512_setzero_si512()));
      const __m256i hi8 = _mm512_cvtepi64_epi32(_mm512_max_epi64(_mm512_load_si512(label + i + 8), _mm512_setzero_si512()));
      const __m512i channel = _mm512_inserti64x4(_mm512_castsi256_si512(lo8), hi8, 1);
      const __m512i offset = _mm512_add_epi32(_mm512_mullo_epi32(channel, step),
                                              _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(i))));
      _mm512_store_ps(label_logit + i, _mm512_i32gather_ps(offset, origin, 4));
    }
  }
  const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(128.f), log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 shifter = _mm512_set1_ps(12582912.f), overflow = _mm512_set1_ps(0x1p125f);
  for (int64_t i = 0; i < len; i += V) {
    const __m512 shift = _mm512_load_ps(label_logit + i);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      asm volatile("prefetcht1 %0" : : "m"(ahead[(c * sC + i) * int64_t(sizeof(float))]));
      const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(origin + c * sC + i), shift);
      const __m512 x = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_mul_ps(d, log2e)));
      const __m512 n = _mm512_sub_ps(_mm512_add_ps(x, shifter), shifter);  // round(x)
      const __m512 r = _mm512_sub_ps(x, n);
      __m512 p = _mm512_set1_ps(kExp2Poly[0]);
      for (int k = 1; k < 6; ++k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExp2Poly[k]));
      sum = _mm512_add_ps(sum, _mm512_scalef_ps(p, n));
    }
    if (_mm512_cmp_ps_mask(sum, overflow, _CMP_NLT_UQ)) return false;  // NaN too
    _mm512_store_ps(out + i, log_of_sum_avx512(sum));
  }
  return true;
}
#endif

// Per-pixel cross-entropy at T = 1 of the tile p0 .. p0 + len - 1 of one student: in place (float NCHW, whole
// pairs of vector groups), else packed into `pack`.
template <typename scalar_t, typename acc_t>
void tile_cross_entropy(const PlaneView<scalar_t>& v, int64_t p0, int64_t len, const int64_t* label, acc_t* pack,
                        SoftmaxStats<acc_t>& s, acc_t* out) {
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    const int64_t w0 = p0 % v.W;
    const bool in_place = v.sW == 1 && (w0 + len <= v.W || v.sH == v.W) && len % (kGroups * Vec<float>::size()) == 0;
    const float* origin = v.data + (p0 / v.W) * v.sH + w0;
    static const bool avx512 = at::get_cpu_capability() == "AVX512";
    if (in_place && (avx512 ? cross_entropy_in_place_avx512(origin, v.C, v.sC, len, label, out)
                            : cross_entropy_in_place(origin, v.C, v.sC, len, label, out))) {
      return;
    }
  }
#endif
  pixel_cross_entropy(make_tile(v, p0, len, pack), v.C, label, s, out);
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
          const bool accuracy = score == Score::kAccuracy;
          if (labels.read(p0, len, label, accuracy ? label_f : nullptr) == 0) continue;
          if (score == Score::kCrossEntropy) {
            tile_cross_entropy(plane<scalar_t>(za, n), p0, len, label, pack_a.data(), sa, score_a);
            tile_cross_entropy(plane<scalar_t>(zb, n), p0, len, label, pack_b.data(), sb, score_b);
          } else {
            pixel_accuracy(make_tile(plane<scalar_t>(za, n), p0, len, pack_a.data()), C, label_f, sa, score_a);
            pixel_accuracy(make_tile(plane<scalar_t>(zb, n), p0, len, pack_b.data()), C, label_f, sb, score_b);
          }
          // Into the regions of the tile's pixels, (w0 + i) / rw, a run of consecutive pixels each. Ignored pixels
          // add exactly 0 (their scores are replaced, not multiplied: they may be anything).
          for (int64_t i = 0; i < len; ++i) {
            if (label[i] < 0) score_a[i] = score_b[i] = acc_t(0);
          }
          for (int64_t q = w0 / rw, start = 0; start < len; ++q) {
            const int64_t stop = std::min(len, (q + 1) * rw - w0);
            acc_t a = 0, b = 0;
            int64_t valid = 0;
#pragma omp simd reduction(+ : a, b)
            for (int64_t i = start; i < stop; ++i) a += score_a[i], b += score_b[i];
#pragma omp simd reduction(+ : valid)
            for (int64_t i = start; i < stop; ++i) valid += label[i] >= 0;
            sum_a[q] += a, sum_b[q] += b, count[q] += valid;
            start = stop;
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
