// CUDA kernel of region_direction_mask (METHOD.md §2) and its launch geometry. Torch-free device code (see
// pixel_math.cuh); the launcher is in region_direction_mask_kernel.cu.
//
// One block per region (n, ry, rx) of rh x rw pixels (the last row/column of regions may be partial). The
// block's threads walk the region's pixels row-major (consecutive threads on consecutive w: for contiguous
// NCHW and rw >= 8 every load of a warp reads whole 32-byte sectors), and each thread computes per pixel, for
// both students, the cross-entropy at T = 1 (one online log-sum-exp pass over C, each logit read once) or
// whether argmax == label. The block then sums the scores and the number of valid pixels (fixed-order
// reduction: deterministic, no atomics, no scratch) and thread 0 writes the two mean scores and the direction.
// Block size: the region's pixel count rounded up to a warp, at most 256 (one pixel per thread at 16 x 16).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "pixel_math.cuh"

namespace ccl::cuda {

// Grid: one block per region, x = (n * Hr + ry) * Wr + rx.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    region_direction_kernel(Logits<scalar_t> za, Logits<scalar_t> zb, Labels y, int C, int H, int W, int64_t rh,
                            int64_t rw, int64_t Hr, int64_t Wr, bool accuracy, int64_t ignore_index,
                            int8_t* __restrict__ direction, float* __restrict__ scores) {
  const int64_t r = blockIdx.x;
  const int64_t plane = Hr * Wr;
  const int64_t n = r / plane, cell = r - n * plane, ry = cell / Wr, rx = cell - ry * Wr;
  const int h0 = static_cast<int>(ry * rh), w0 = static_cast<int>(rx * rw);  // < H, < W
  const int rows = static_cast<int>(rh < H - h0 ? rh : H - h0);
  const int cols = static_cast<int>(rw < W - w0 ? rw : W - w0);
  const int pixels = rows * cols;  // <= H * W < 2^31

  acc_t sum_a = 0, sum_b = 0;
  long long count = 0;
  for (int k = threadIdx.x; k < pixels; k += blockDim.x) {
    const int i = k / cols, h = h0 + i, w = w0 + (k - i * cols);
    const int label = read_label(y, n, h, w, C, ignore_index);
    if (label < 0) continue;
    sum_a += pixel_score<scalar_t, acc_t>(za.pixel(n, h, w), za.sC, C, label, accuracy);
    sum_b += pixel_score<scalar_t, acc_t>(zb.pixel(n, h, w), zb.sC, C, label, accuracy);
    count += 1;
  }
  const double total_a = block_sum(static_cast<double>(sum_a));
  const double total_b = block_sum(static_cast<double>(sum_b));
  count = block_sum(count);
  if (threadIdx.x == 0) {
    int8_t d = 0;
    float score_a, score_b;
    if (count == 0) {
      score_a = score_b = std::numeric_limits<float>::quiet_NaN();
    } else {
      // Compare in the accumulation type (as the reference does before casting the scores to float32).
      const acc_t mean_a = static_cast<acc_t>(total_a / static_cast<double>(count));
      const acc_t mean_b = static_cast<acc_t>(total_b / static_cast<double>(count));
      const bool a_better = accuracy ? mean_a > mean_b : mean_a < mean_b;
      const bool b_better = accuracy ? mean_b > mean_a : mean_b < mean_a;
      d = static_cast<int8_t>(a_better ? 1 : (b_better ? -1 : 0));
      score_a = static_cast<float>(mean_a);
      score_b = static_cast<float>(mean_b);
    }
    direction[r] = d;
    scores[(2 * n) * plane + cell] = score_a;
    scores[(2 * n + 1) * plane + cell] = score_b;
  }
}

// ---- launch geometry (host) -------------------------------------------------------------------------------

// Threads per block: the pixel count of a full region (clipped to the image), rounded up to a warp, at most
// kThreads. Grid: one block per region.
inline int region_threads(int64_t region_h, int64_t region_w, int64_t H, int64_t W) {
  const int64_t region_pixels = std::min(region_h, H) * std::min(region_w, W);
  return static_cast<int>(std::min<int64_t>(kThreads, (region_pixels + kWarpSize - 1) / kWarpSize * kWarpSize));
}

}  // namespace ccl::cuda
