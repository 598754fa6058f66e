// Per-pixel softmax statistics over C for a tile of pixels, shared by the CPU kernels.
//
// Layout: a tile is a run of up to kTile consecutive pixels (flattened h * W + w) of one sample, packed once
// (make_tile) into a C x kTile buffer of acc_t (float, or double for double inputs), converting each element
// once and reading it in the order its memory runs (NCHW, channels_last, transposed or sliced strides). The
// passes work on at::vec vectors across pixels and re-read the tile from L1, not from memory. All offsets
// are int64.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <atomic>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
#include <immintrin.h>
#endif

namespace ccl::cpu {

constexpr int64_t kTile = 512;

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// One student's logits for one sample n: element (c, h, w) is data[c * sC + h * sH + w * sW].
template <typename scalar_t>
struct PlaneView {
  const scalar_t* data;
  int64_t C, sC, sH, sW, W;
};

template <typename scalar_t>
inline PlaneView<scalar_t> plane(const at::Tensor& z, int64_t n) {
  return {z.const_data_ptr<scalar_t>() + n * z.stride(0), z.size(1), z.stride(1), z.stride(2), z.stride(3),
          z.size(3)};
}

// Where the next tile's rows start in memory (NCHW: the same rows, len pixels on), for prefetch; base nullptr for
// other layouts.
//
// prefetch(c, i) hints the line of the next tile at channel c, pixel i into L2. The passes call it once per channel
// and pair of vector groups (16 float pixels: one 64-byte line), so the next tile streams in while this one is
// computed, evenly spread over the pass, and the memory time hides behind the arithmetic (2C short rows per tile
// are too short and too many streams for the hardware prefetchers). Measured in one process, interleaved calls of
// region_direction_mask at (2, 19, 512, 512): 15% (1 thread) and 11% (2 threads) faster than hinting the whole
// next tile while packing this one, 25% faster than no hint. A prefetch past the end of the logits never faults.
// An asm statement, not __builtin_prefetch: GCC 12 dropped the builtin from these loops (absent from the
// disassembly).
struct Ahead {
  const char* base = nullptr;
  int64_t channel_bytes = 0, pixel_bytes = 0;

  void prefetch(int64_t c, int64_t i) const {
    if (base) hint(base + c * channel_bytes + i * pixel_bytes);
  }

  static void hint(const void* address) {
#if defined(__x86_64__)
    asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(address)));
#else
    __builtin_prefetch(address, 0, 2);
#endif
  }
};

// The next tile's rows after a tile of len pixels from `origin` (channel 0), channels sC elements apart.
template <typename scalar_t>
inline Ahead ahead_of(const scalar_t* origin, int64_t len, int64_t sC) {
  return {reinterpret_cast<const char*>(origin + len), sC * int64_t(sizeof(scalar_t)), int64_t(sizeof(scalar_t))};
}

// C rows of kTile acc_t values, of which the first len are the tile's pixels: channel c of pixel i is
// origin[c * kTile + i]. Lanes past len hold whatever an earlier tile left (finite or not): every pass loads
// whole vectors and only lanes below len reach a result.
template <typename acc_t>
struct Tile {
  const acc_t* origin;
  int64_t len;
  Ahead ahead;
};

// Pixels p0 .. p0 + len - 1 of a plane, packed into `pack` (C * kTile values, converted to acc_t once).
// Always packed, even when the rows could be read in place: in NCHW the C rows of a tile lie H * W elements
// apart, a large power of two for common sizes, so they all map to the same few cache sets and evict each other
// from L1 and L2 between the passes (measured: the packed tile is ~12% faster for float32 at 512 x 512).
template <typename acc_t, typename scalar_t>
inline Tile<acc_t> make_tile(const PlaneView<scalar_t>& v, int64_t p0, int64_t len, acc_t* pack) {
  const int64_t h0 = p0 / v.W, w0 = p0 % v.W;
  const scalar_t* origin = v.data + h0 * v.sH + w0 * v.sW;
  const bool consecutive = v.sW == 1 && (w0 + len <= v.W || v.sH == v.W);
  if (consecutive) {  // NCHW: row by row (vectorisable)
    for (int64_t c = 0; c < v.C; ++c) {
      const scalar_t* row = origin + c * v.sC;
      acc_t* out = pack + c * kTile;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        std::memcpy(out, row, len * sizeof(acc_t));  // explicit: the vectoriser's choice for the loop varied
      } else {
        for (int64_t i = 0; i < len; ++i) out[i] = static_cast<acc_t>(row[i]);
      }
    }
    return {pack, len, ahead_of(origin, len, v.sC)};
  } else {  // pixel by pixel, channels innermost (contiguous for channels_last)
    for (int64_t i = 0, h = h0, w = w0; i < len; ++i) {
      const scalar_t* pixel = v.data + h * v.sH + w * v.sW;
      for (int64_t c = 0; c < v.C; ++c) pack[c * kTile + i] = static_cast<acc_t>(pixel[c * v.sC]);
      if (++w == v.W) w = 0, ++h;
    }
  }
  return {pack, len};
}

// Lanes [i, i + Vec::size()) of channel c (i < kTile).
template <typename acc_t>
inline Vec<acc_t> load(const Tile<acc_t>& t, int64_t c, int64_t i) {
  return Vec<acc_t>::loadu(t.origin + c * kTile + i);
}

template <typename acc_t>
inline acc_t load_one(const Tile<acc_t>& t, int64_t c, int64_t i) {
  return t.origin[c * kTile + i];
}

// Store lanes [0, count) of v to dst (consecutive), converting to scalar_t.
template <typename scalar_t, typename acc_t>
inline void store(scalar_t* dst, const Vec<acc_t>& v, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(dst, count);
  } else {
    alignas(64) acc_t buf[Vec<acc_t>::size()];
    v.store(buf);
    for (int64_t k = 0; k < count; ++k) dst[k] = static_cast<scalar_t>(buf[k]);
  }
}

// Like store, for output written once and not read again soon (the gradients). Non-temporal where asked: a full,
// aligned float vector goes around the caches, with no read for ownership of its line; callers end their
// parallel region with stream_fence(). That pays where the lines are not in the caches (memory an allocator
// hands out again) and costs where they are: pages the kernel has just zeroed (fresh_pages.h) sit in the caches,
// and a non-temporal store must first push its line out. Measured in the benchmark's rounds, KL forward+backward
// at (2, 19, 512, 512) float32: on freshly mapped gradients 103 ms non-temporal, 56 ms ordinary stores; on
// glibc's kept heap 19.5 and 22.5 ms; with tcmalloc 34.7 and 24.2 ms, with jemalloc 42.1 and 47.7 ms.
template <typename scalar_t, typename acc_t>
inline void store_output(scalar_t* dst, const Vec<acc_t>& v, int64_t count, bool non_temporal) {
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float> && Vec<float>::size() == 8) {
    if (non_temporal && count == 8 && (reinterpret_cast<uintptr_t>(dst) & 31) == 0) {
      _mm256_stream_ps(dst, static_cast<__m256>(v));
      return;
    }
  }
#endif
  store(dst, v, count);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
  _mm_sfence();
#endif
}

// Bit k set where lane k of a comparison result (all bits set or clear) is set.
template <typename acc_t>
inline int lane_bits(const Vec<acc_t>& m) {
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
  if constexpr (std::is_same_v<acc_t, float> && Vec<float>::size() == 8) return _mm256_movemask_ps(m);
  if constexpr (std::is_same_v<acc_t, double> && Vec<double>::size() == 4) return _mm256_movemask_pd(m);
#endif
  alignas(64) acc_t lanes[Vec<acc_t>::size()];
  m.store(lanes);
  int bits = 0;
  for (int k = 0; k < Vec<acc_t>::size(); ++k) {
    bits |= (std::signbit(lanes[k]) ? 1 : 0) << k;  // a set mask is all ones: negative (a NaN with its sign set)
  }
  return bits;
}

// Sum of the lanes, in double.
template <typename acc_t>
inline double lane_sum(const Vec<acc_t>& v) {
  alignas(64) acc_t lanes[Vec<acc_t>::size()];
  v.store(lanes);
  double sum = 0;
  for (int k = 0; k < Vec<acc_t>::size(); ++k) sum += lanes[k];
  return sum;
}

// Labels of a tile: label[i] = y or -1 where ignored. An out-of-range label is recorded in `bad` (first one
// wins) and treated as ignored so that the kernel never reads out of bounds; the caller raises afterwards.
struct LabelReader {
  const int64_t* data;  // at sample n
  int64_t sH, sW, W, C, ignore_index;
  std::atomic<int64_t>* bad;

  static constexpr int64_t kNoBadLabel = std::numeric_limits<int64_t>::min();

  // Labels of pixels p0 .. p0 + len - 1 into label (and label_f as acc_t, unless nullptr); returns how many count.
  template <typename acc_t>
  int64_t read(int64_t p0, int64_t len, int64_t* label, acc_t* label_f) const {
    const int64_t w0 = p0 % W;
    int64_t valid = -1;
    if (sW == 1 && (w0 + len <= W || sH == W)) valid = read_run(data + (p0 / W) * sH + w0, len, label);
    if (valid < 0) valid = read_each(p0, len, label);  // strided, or an out-of-range label to record
    for (int64_t i = len; i < kTile; ++i) label[i] = -1;
    if (label_f) {
      for (int64_t i = 0; i < kTile; ++i) label_f[i] = static_cast<acc_t>(label[i]);
    }
    return valid;
  }

 private:
  // A contiguous run, branch-free (vectorised); -1 when it holds an out-of-range label.
  int64_t read_run(const int64_t* run, int64_t len, int64_t* label) const {
    int64_t valid = 0, bad_labels = 0;
    // The next tile's labels follow: hinted now, like its logits (4% faster region mask, interleaved in one process).
    for (int64_t i = 0; i < len; i += 64 / int64_t(sizeof(int64_t))) Ahead::hint(run + len + i);
    for (int64_t i = 0; i < len; ++i) {
      const int64_t v = run[i];
      const bool ignored = v == ignore_index;
      bad_labels += !ignored && static_cast<uint64_t>(v) >= static_cast<uint64_t>(C);
      label[i] = ignored ? -1 : v;
      valid += !ignored;
    }
    return bad_labels ? -1 : valid;
  }

  int64_t read_each(int64_t p0, int64_t len, int64_t* label) const {
    int64_t valid = 0;
    for (int64_t i = 0, h = p0 / W, w = p0 % W; i < len; ++i) {
      int64_t v = data[h * sH + w * sW];
      if (v != ignore_index && (v < 0 || v >= C)) {
        int64_t expected = kNoBadLabel;
        bad->compare_exchange_strong(expected, v);
        v = ignore_index;
      }
      label[i] = v == ignore_index ? -1 : v;
      valid += label[i] >= 0;
      if (++w == W) w = 0, ++h;
    }
    return valid;
  }
};

inline LabelReader label_reader(const at::Tensor& y, int64_t n, int64_t C, int64_t ignore_index,
                                std::atomic<int64_t>* bad) {
  return {y.const_data_ptr<int64_t>() + n * y.stride(0), y.stride(1), y.stride(2), y.size(2), C, ignore_index, bad};
}

inline void raise_if_bad_label(const std::atomic<int64_t>& bad, int64_t C, int64_t ignore_index) {
  const int64_t value = bad.load();
  TORCH_CHECK_VALUE(value == LabelReader::kNoBadLabel, "y contains label value ", value, ", which is neither in [0, ", C,
              ") nor ignore_index=", ignore_index);
}

// Coefficients of the degree-5 polynomial for 2^r, |r| <= 1/2, highest first (a relative-error fit; < 2e-7
// relative error evaluated in float, against about 2e-6 for at::vec's exp_u20). Shared by the vector exponentials.
constexpr float kExp2Poly[6] = {1.32647e-3f, 9.67151e-3f, 5.550734e-2f, 0.24022242f, 0.693147f, 1.f};

#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
// 2^x for x in [-127, 127], NaN propagated, as 2^round(x) * 2^r with |r| <= 1/2: kExp2Poly for 2^r and
// 2^round(x) built in the exponent bits. 2^-127 has exponent bits 0: exactly 0. Callers clamp x.
inline __m256 exp2_in_range(__m256 x) {
  const __m256 shifter = _mm256_set1_ps(12582912.f);  // 1.5 * 2^23: x + shifter holds round(x) in its low bits
  const __m256 t = _mm256_add_ps(x, shifter);
  const __m256 r = _mm256_sub_ps(x, _mm256_sub_ps(t, shifter));
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int k = 1; k < 6; ++k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExp2Poly[k]));
  const __m256i power = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(t), 23), _mm256_set1_epi32(127 << 23));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(power));
}

inline __m256 log2e_times(__m256 d) { return _mm256_mul_ps(d, _mm256_set1_ps(1.44269504088896341f)); }
#endif

// exp(d) for d <= 0 (logits minus their maximum, times 1 / T), the kernels' exponential: exp2_in_range of
// d * log2(e) clamped below at -127 (exp(-inf) and anything below 2^-127 give exactly 0; the clamp returns its
// second operand, so NaN propagates). Knowing d <= 0 saves the upper clamp and the edge blends: 12 vector
// instructions against exp_u20's 20, which matters because the exponentials are most of the kernels'
// arithmetic. Other types and ISAs: at::vec's exp_u20.
template <typename acc_t>
inline Vec<acc_t> exp_nonpositive(const Vec<acc_t>& d) {
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
  if constexpr (std::is_same_v<acc_t, float> && Vec<float>::size() == 8) {
    return exp2_in_range(_mm256_max_ps(_mm256_set1_ps(-127.f), log2e_times(d)));
  }
#endif
  return d.exp_u20();
}

// Softmax statistics of one student over a tile. Exponentials use exp_nonpositive (above); NaN inputs are
// detected through the max, which propagates them (at::vec::maximum). With m = max_c z and
// e_c = exp((z_c - m) / T), the exponentials are kept per tile (C x kTile, L1/L2-resident) so that the passes
// that need probabilities p_c = e_c * inv_sum_t multiply instead of exponentiating again:
//   sum_t = sum_c e_c, inv_sum_t = 1 / sum_c e_c          -> log p_c = (z_c - m) / T - log sum_t
// (no logarithm here: the out-of-line vector log cost 8% of the forward; callers take one where they need it)
//   sum_1 = sum_c exp(z_c - m)                              -> cross-entropy at T = 1 (when asked)
template <typename acc_t>
struct SoftmaxStats {
  explicit SoftmaxStats(int64_t C) : exps(static_cast<size_t>(C * kTile)) {}
  alignas(64) acc_t max[kTile];
  alignas(64) acc_t argmax[kTile];  // lowest index among equal maxima (NaN counts as the maximum), as torch.argmax
  alignas(64) acc_t sum_t[kTile];
  alignas(64) acc_t inv_sum_t[kTile];
  alignas(64) acc_t sum_1[kTile];
  std::vector<acc_t> exps;  // e_c of pixel i at [c * kTile + i]

  Vec<acc_t> prob(int64_t c, int64_t i) const {
    return Vec<acc_t>::loadu(exps.data() + c * kTile + i) * Vec<acc_t>::loadu(inv_sum_t + i);
  }
};

// Both passes below run two vector groups at a time, all C channels of them, so the running statistics stay
// in registers (one load of each logit, one store of each result per group) instead of being loaded and stored
// again for every channel, and two independent dependency chains run side by side: one chain (a running max or
// sum through C channels) waits on the latency of each step, which measured at about half of these passes'
// time with one group. kTile holds whole pairs of groups; a pair past len reads the tile's stale lanes.
constexpr int kGroups = 2;

template <typename acc_t, bool kArgmax = true>
inline void max_argmax(const Tile<acc_t>& t, int64_t C, SoftmaxStats<acc_t>& s) {
  constexpr int64_t V = Vec<acc_t>::size();
  static_assert(kTile % (kGroups * V) == 0, "a tile holds whole pairs of vector groups");
  const Vec<acc_t> one(1);
  for (int64_t i = 0; i < t.len; i += kGroups * V) {
    Vec<acc_t> m[kGroups], argmax[kGroups], index(0);
    for (int g = 0; g < kGroups; ++g) m[g] = Vec<acc_t>(-std::numeric_limits<acc_t>::infinity()), argmax[g] = index;
    for (int64_t c = 0; c < C; ++c) {
      for (int g = 0; g < kGroups; ++g) {
        const auto z = load(t, c, i + g * V);
        if constexpr (kArgmax) {
          // As torch.argmax: the first strictly greater value, or the first NaN (z != z) while m is not NaN.
          const auto take = (z > m[g]) | ((z != z) & (m[g] == m[g]));
          argmax[g] = Vec<acc_t>::blendv(argmax[g], index, take);
        }
        m[g] = at::vec::maximum(m[g], z);  // propagates NaN
      }
      if constexpr (kArgmax) index = index + one;
    }
    for (int g = 0; g < kGroups; ++g) {
      m[g].store(s.max + i + g * V);
      if constexpr (kArgmax) argmax[g].store(s.argmax + i + g * V);
    }
  }
}

// The max alone (callers that never need the argmax).
template <typename acc_t>
inline void max_only(const Tile<acc_t>& t, int64_t C, SoftmaxStats<acc_t>& s) {
  max_argmax<acc_t, false>(t, C, s);
}

// sum_exp over the pairs of vector groups (all, or those with an active[g]), its options as template arguments
// so that the loop over C has no branch.
template <bool kScale, bool kOwnSum1, bool kKeepExps, typename acc_t>
inline void sum_exp_groups(const Tile<acc_t>& t, int64_t C, acc_t inv_t, bool with_sum_1, const bool* active,
                           SoftmaxStats<acc_t>& s) {
  constexpr int64_t V = Vec<acc_t>::size();
  const Vec<acc_t> scale(inv_t);
  for (int64_t i = 0; i < t.len; i += kGroups * V) {
    if (active && !active[i / V] && !active[i / V + 1]) {
      for (int64_t c = 0; c < C; ++c) t.ahead.prefetch(c, i);
      continue;
    }
    Vec<acc_t> m[kGroups], sum[kGroups], sum_1[kGroups];
    for (int g = 0; g < kGroups; ++g) m[g] = Vec<acc_t>::loadu(s.max + i + g * V), sum[g] = sum_1[g] = Vec<acc_t>(0);
    for (int64_t c = 0; c < C; ++c) {
      t.ahead.prefetch(c, i);
      for (int g = 0; g < kGroups; ++g) {
        const auto d = load(t, c, i + g * V) - m[g];
        const auto e_t = exp_nonpositive(kScale ? d * scale : d);
        if constexpr (kKeepExps) e_t.store(s.exps.data() + c * kTile + i + g * V);
        sum[g] = sum[g] + e_t;
        if constexpr (kOwnSum1) sum_1[g] = sum_1[g] + exp_nonpositive(d);
      }
    }
    for (int g = 0; g < kGroups; ++g) {
      sum[g].store(s.sum_t + i + g * V);
      sum[g].reciprocal().store(s.inv_sum_t + i + g * V);
      if (with_sum_1) (kOwnSum1 ? sum_1[g] : sum[g]).store(s.sum_1 + i + g * V);
    }
  }
}

// Needs s.max. `active[g]` (per vector group) lets callers skip groups nobody needs; nullptr = all.
// keep_exps = false: only the sums (callers that never form probabilities; honoured at T = 1).
template <typename acc_t>
inline void sum_exp(const Tile<acc_t>& t, int64_t C, acc_t inv_t, bool with_sum_1, const bool* active,
                    SoftmaxStats<acc_t>& s, bool keep_exps = true) {
  if (inv_t == acc_t(1)) {
    keep_exps ? sum_exp_groups<false, false, true>(t, C, inv_t, with_sum_1, active, s)
              : sum_exp_groups<false, false, false>(t, C, inv_t, with_sum_1, active, s);
  } else if (with_sum_1) {
    sum_exp_groups<true, true, true>(t, C, inv_t, with_sum_1, active, s);
  } else {
    sum_exp_groups<true, false, true>(t, C, inv_t, with_sum_1, active, s);
  }
}

// Cross-entropy at T = 1 of pixel i with label `label` (needs max and sum_1).
template <typename acc_t>
inline acc_t cross_entropy(const Tile<acc_t>& t, const SoftmaxStats<acc_t>& s, int64_t i, int64_t label) {
  return std::log(s.sum_1[i]) - (load_one(t, label, i) - s.max[i]);
}

// Number of tiles covering `pixels` pixels of one sample.
inline int64_t tiles_per_plane(int64_t pixels) { return (pixels + kTile - 1) / kTile; }

}  // namespace ccl::cpu
