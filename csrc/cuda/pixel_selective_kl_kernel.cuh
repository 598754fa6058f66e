// CUDA kernels of pixel_selective_kl (METHOD.md §1): forward, finalize and backward, with their launch geometry.
// Torch-free device code (see pixel_math.cuh); the launchers are in pixel_selective_kl_kernel.cu.
//
// Forward. One thread per pixel (threads along H*W, blockIdx.y along N). For C <= 32 (float/half/bfloat16)
// a thread loads the C logits of both students once into registers (template bucket CMAX in {8, 16, 32}),
// then: max/argmax, one pass of exponentials giving the sums at T (and at T = 1 for rule='confidence' when
// T != 1) and the two KL numerators in centred form, then the selection. For larger C (and for float64) a
// first pass computes max/argmax/sums online (one read of each logit) and a second pass, only at selected
// pixels, the KL numerators (a re-read, mostly L1/L2 hits). With d_s = (z_s - m_s) / T and S_s = sum exp(d_s):
//     KL(p_a || p_b) = sum_c exp(d_a) (d_a - d_b) / S_a - log S_a + log S_b    (accurate for logits ~ 1e4)
// `learners` (selection bits, kinds.h) names the losses summed; the other stays 0. Each block writes its
// partial sums (double) and counts (int64) to a scratch buffer; a one-block kernel sums
// them in a fixed order and writes n, the losses and the counts on the device: deterministic, no host sync,
// scratch of O(N * H * W / 256).
//
// Backward (also launched by the forward, with unit upstream gradients, when it is asked for the gradients).
// One thread per pixel: pixels where the student does not learn get zeros without reading the
// logits; elsewhere the softmaxes of both students are recomputed (registers for C <= 32, else an online pass
// and a second read) and grad_za = T / n * g_a * (p_a - p_b), grad_zb = T / n * g_b * (p_b - p_a) are written
// contiguous NCHW, coalesced. g_a, g_b and n are read from device memory (no sync).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../ops/kinds.h"
#include "pixel_math.cuh"
#include "selective_kl_pixel.cuh"

namespace ccl::cuda {

constexpr int kFinalThreads = 512;  // threads of the one-block finalize kernel

// Grid: x over ceil(H*W / kThreads), y over N (grid-stride when N > 65535). Block b writes
// part_kl[2b..2b+1] = (sum over A->B of KL(pa||pb), sum over B->A of KL(pb||pa)) and
// part_count[4b..4b+3] = (valid, A->B, B->A, any).
template <typename scalar_t, typename acc_t, int CMAX>
__global__ void __launch_bounds__(kThreads)
    selective_kl_forward_kernel(Logits<scalar_t> za, Logits<scalar_t> zb, Labels y, int64_t N, int C, int W,
                                int HW, acc_t inv_t, Rule rule, uint8_t learners, int64_t ignore_index,
                                uint8_t* __restrict__ selection, double* __restrict__ part_kl,
                                long long* __restrict__ part_count) {
  const int hw = blockIdx.x * kThreads + threadIdx.x;
  double kl_ab = 0, kl_ba = 0;
  long long valid = 0, ab = 0, ba = 0, any = 0;
  if (hw < HW) {
    const int h = hw / W, w = hw - h * W;
    for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
      const int label = read_label(y, n, h, w, C, ignore_index);
      uint8_t bits = 0;
      if (label >= 0) {
        acc_t term_ab, term_ba;
        if constexpr (CMAX > 0) {
          bits = forward_pixel_registers<scalar_t, acc_t, CMAX>(za.pixel(n, h, w), za.sC, zb.pixel(n, h, w),
                                                                zb.sC, C, label, inv_t, rule, term_ab, term_ba);
        } else {
          bits = forward_pixel_online<scalar_t, acc_t>(za.pixel(n, h, w), za.sC, zb.pixel(n, h, w), zb.sC, C,
                                                       label, inv_t, rule, term_ab, term_ba);
        }
        // Only the learners' losses: the other sum stays exactly 0 (NaN guard included).
        if (learners & kAteachesB) kl_ab += static_cast<double>(term_ab);
        if (learners & kBteachesA) kl_ba += static_cast<double>(term_ba);
        valid += 1;
        ab += (bits & kAteachesB) != 0;
        ba += (bits & kBteachesA) != 0;
        any += bits != 0;
      }
      selection[n * HW + hw] = bits;
    }
  }
  kl_ab = block_sum(kl_ab);
  kl_ba = block_sum(kl_ba);
  valid = block_sum(valid);
  ab = block_sum(ab);
  ba = block_sum(ba);
  any = block_sum(any);
  if (threadIdx.x == 0) {
    const int64_t b = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
    part_kl[2 * b] = kl_ab;
    part_kl[2 * b + 1] = kl_ba;
    part_count[4 * b] = valid;
    part_count[4 * b + 1] = ab;
    part_count[4 * b + 2] = ba;
    part_count[4 * b + 3] = any;
  }
}

// One block: sums the per-block partials in a fixed order and writes the outputs.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalThreads)
    selective_kl_finalize_kernel(const double* __restrict__ part_kl, const long long* __restrict__ part_count,
                                 int64_t blocks, double t2, bool normalize_valid, acc_t* __restrict__ loss_a,
                                 acc_t* __restrict__ loss_b, int64_t* __restrict__ count_ab,
                                 int64_t* __restrict__ count_ba, acc_t* __restrict__ norm) {
  double kl_ab = 0, kl_ba = 0;
  long long valid = 0, ab = 0, ba = 0, any = 0;
  for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) {
    kl_ab += part_kl[2 * b];
    kl_ba += part_kl[2 * b + 1];
    valid += part_count[4 * b];
    ab += part_count[4 * b + 1];
    ba += part_count[4 * b + 2];
    any += part_count[4 * b + 3];
  }
  kl_ab = block_sum(kl_ab);
  kl_ba = block_sum(kl_ba);
  valid = block_sum(valid);
  ab = block_sum(ab);
  ba = block_sum(ba);
  any = block_sum(any);
  if (threadIdx.x == 0) {
    const long long selected = normalize_valid ? valid : any;
    const double n = static_cast<double>(selected > 0 ? selected : 1);
    *loss_a = static_cast<acc_t>(t2 * kl_ba / n);
    *loss_b = static_cast<acc_t>(t2 * kl_ab / n);
    *count_ab = ab;
    *count_ba = ba;
    *norm = static_cast<acc_t>(n);
  }
}

// grad_za / grad_zb: contiguous (N, C, H, W) or nullptr when not asked for. selection: contiguous (N, H, W).
template <typename scalar_t, typename acc_t, int CMAX>
__global__ void __launch_bounds__(kThreads)
    selective_kl_backward_kernel(Logits<scalar_t> za, Logits<scalar_t> zb, const uint8_t* __restrict__ selection,
                                 int64_t N, int C, int W, int HW, acc_t inv_t, double temperature,
                                 const acc_t* __restrict__ grad_loss_a, const acc_t* __restrict__ grad_loss_b,
                                 const acc_t* __restrict__ norm, scalar_t* __restrict__ grad_za,
                                 scalar_t* __restrict__ grad_zb) {
  const int hw = blockIdx.x * kThreads + threadIdx.x;
  if (hw >= HW) return;
  const int h = hw / W, w = hw - h * W;
  // d loss / d z = T^2 / n * (p - q) / T * g, formed in double like the CPU kernel.
  const double base = temperature / static_cast<double>(*norm);
  const acc_t coef_a = static_cast<acc_t>(base * static_cast<double>(*grad_loss_a));
  const acc_t coef_b = static_cast<acc_t>(base * static_cast<double>(*grad_loss_b));
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const uint8_t bits = selection[n * HW + hw];
    const bool learn_a = grad_za != nullptr && (bits & kBteachesA);
    const bool learn_b = grad_zb != nullptr && (bits & kAteachesB);
    const int64_t out = n * C * static_cast<int64_t>(HW) + hw;
    if (!learn_a && !learn_b) {  // nothing to learn here: zeros, without reading the logits
      for (int c = 0; c < C; ++c) {
        if (grad_za) grad_za[out + static_cast<int64_t>(c) * HW] = scalar_t(0);
        if (grad_zb) grad_zb[out + static_cast<int64_t>(c) * HW] = scalar_t(0);
      }
      continue;
    }
    if constexpr (CMAX > 0) {
      backward_pixel_registers<scalar_t, acc_t, CMAX>(za.pixel(n, h, w), za.sC, zb.pixel(n, h, w), zb.sC, C, inv_t,
                                                      grad_za, grad_zb, out, HW, learn_a, learn_b, coef_a, coef_b);
    } else {
      backward_pixel_online<scalar_t, acc_t>(za.pixel(n, h, w), za.sC, zb.pixel(n, h, w), zb.sC, C, inv_t, grad_za,
                                             grad_zb, out, HW, learn_a, learn_b, coef_a, coef_b);
    }
  }
}

// ---- launch geometry (host) -------------------------------------------------------------------------------

// Calls f(std::integral_constant<int, CMAX>) with the register bucket for C (0: the online path).
template <typename scalar_t, typename F>
inline void with_channel_bucket(int64_t C, F&& f) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    f(std::integral_constant<int, 0>{});  // doubles: registers would spill; the online path is exact anyway
  } else {
    if (C <= 8) {
      f(std::integral_constant<int, 8>{});
    } else if (C <= 16) {
      f(std::integral_constant<int, 16>{});
    } else if (C <= 32) {
      f(std::integral_constant<int, 32>{});
    } else {
      f(std::integral_constant<int, 0>{});
    }
  }
}

// Grid of the per-pixel kernels: x over ceil(H*W / kThreads), y over N, at most max_grid_y (the kernels loop
// over the rest). Only the SIMT harness passes a smaller max_grid_y, to reach that loop with a small N.
inline dim3 pixel_grid(int64_t N, int64_t HW, int64_t max_grid_y = kMaxGridY) {
  return dim3(static_cast<unsigned>((HW + kThreads - 1) / kThreads),
              static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(N, 1), max_grid_y)));
}

}  // namespace ccl::cuda
