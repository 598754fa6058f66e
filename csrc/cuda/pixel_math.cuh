// Device helpers shared by the CUDA kernels of the ccl ops (METHOD.md §1-2).
//
// Layout. Logits are (N, C, H, W) with arbitrary (int64) strides and labels (N, H, W) likewise. Every kernel
// maps one thread to one pixel, with consecutive threads on consecutive w, and loops over C inside the thread
// (PyTorch's spatial-softmax layout): for contiguous NCHW a warp reads 32 consecutive elements of one channel
// plane per load, fully coalesced; other strides (channels_last, slices, transposes) take the same code path
// through the strides and are only slower.
//
// Determinism. No float atomics anywhere: reductions go through fixed-shape warp shuffles and a fixed-order
// shared-memory step (block_sum), and cross-block sums through per-block partials that one block sums in a
// fixed order. Results depend on the problem shape only, not on the GPU or on scheduling.
//
// Labels. A label that is neither ignore_index nor in [0, C) cannot be reported with TORCH_CHECK without a
// host synchronisation, so the kernels stop with a device-side assertion (CCL_ASSERT_LABEL): the launch fails
// with "device-side assert triggered" at the next synchronising call, and the CUDA context is unusable
// afterwards (as for nll_loss / cross_entropy with bad targets). The pixel is treated as ignored on builds
// where device asserts compile to nothing, so no out-of-bounds read ever happens.
//
// Torch-free: this header and the kernel headers that include it (<op>_kernel.cuh) hold device code only, so
// that the SIMT harness (tests/simt) can compile them as host C++ and execute the kernels on the CPU. Launchers,
// tensors and TORCH_LIBRARY_IMPL stay in the .cu files.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

// Functions of the per-pixel arithmetic are host-and-device.
#define CCL_HD __host__ __device__ __forceinline__

#ifndef CCL_ASSERT_LABEL  // the SIMT harness defines its own, which names the kernel and stops the run
#include <c10/macros/Macros.h>
#define CCL_ASSERT_LABEL(ok) \
  CUDA_KERNEL_ASSERT((ok) && "ccl: y contains a label value that is neither in [0, C) nor ignore_index")
#endif

// The SIMT harness's fast-math build substitutes a model of the __expf intrinsic (see tests/simt/README.md).
#ifndef CCL_DEVICE_EXPF
#define CCL_DEVICE_EXPF ::expf
#endif

namespace ccl::cuda {

constexpr int kThreads = 256;  // threads per block of the per-pixel kernels (a multiple of 32)
constexpr int kWarpSize = 32;
constexpr int kMaxGridY = 65535;

// One student's logits: element (n, c, h, w) at data[n * sN + c * sC + h * sH + w * sW].
template <typename scalar_t>
struct Logits {
  const scalar_t* __restrict__ data;
  int64_t sN, sC, sH, sW;

  __device__ __forceinline__ const scalar_t* pixel(int64_t n, int h, int w) const {
    return data + n * sN + static_cast<int64_t>(h) * sH + static_cast<int64_t>(w) * sW;
  }
};

// Labels (N, H, W), int64, any strides.
struct Labels {
  const int64_t* __restrict__ data;
  int64_t sN, sH, sW;

  __device__ __forceinline__ int64_t at(int64_t n, int h, int w) const {
    return data[n * sN + static_cast<int64_t>(h) * sH + static_cast<int64_t>(w) * sW];
  }
};

// Reads the label of a pixel; returns -1 for an ignored pixel. Asserts on a label outside [0, C).
__device__ __forceinline__ int read_label(const Labels& y, int64_t n, int h, int w, int C, int64_t ignore_index) {
  const int64_t v = y.at(n, h, w);
  if (v == ignore_index) return -1;
  const bool in_range = v >= 0 && v < C;
  CCL_ASSERT_LABEL(in_range);
  return in_range ? static_cast<int>(v) : -1;
}

// exp/log in the accumulation type. float: expf becomes the __expf intrinsic under --use_fast_math (relative
// error ~ 2 + 1.2 |x| ulp, and every argument here is <= 0); logf would become __logf, whose absolute error
// (~4.5e-7 near 1) is too large for cross-entropies of confident pixels (log of sums slightly above 1), so the
// log goes through log1pf, which fast math leaves exact to ~1 ulp. Every argument of dlog is a sum of
// exponentials that includes exp(0) = 1, so x - 1 is exact (Sterbenz) where it matters. double: full precision.
CCL_HD float dexp(float x) { return CCL_DEVICE_EXPF(x); }
CCL_HD double dexp(double x) { return ::exp(x); }
CCL_HD float dlog(float x) { return ::log1pf(x - 1.0f); }
CCL_HD double dlog(double x) { return ::log(x); }
CCL_HD bool disnan(float x) { return x != x; }
CCL_HD bool disnan(double x) { return x != x; }
// False for +-inf and NaN (inf - inf is NaN).
CCL_HD bool disfinite(float x) { return x - x == 0.0f; }
CCL_HD bool disfinite(double x) { return x - x == 0.0; }

// torch.argmax order: a NaN beats any number (the first NaN wins), ties keep the lowest index. Call with
// c in increasing order; (best, index) start at (z_0, 0).
template <typename acc_t>
CCL_HD void argmax_step(acc_t v, int c, acc_t& best, int& index) {
  if (v > best || (disnan(v) && !disnan(best))) {
    best = v;
    index = c;
  }
}

// Online softmax statistics over C (one pass, any C): with m the running max of z (NaN-propagating, in
// torch.argmax order) and index its channel, s = sum_c exp((z_c - m) / T). With kWithUnitT, also
// s1 = sum_c exp(z_c - m) (the sum at T = 1, for cross-entropies). Edge cases follow log_softmax: -inf logits
// contribute nothing, a +inf or NaN logit makes the sums NaN, and so does a pixel whose logits are all -inf.
template <typename acc_t, bool kWithUnitT>
struct OnlineSoftmax {
  acc_t m;
  int index;
  acc_t s, s1;

  CCL_HD void init(acc_t z0) {
    m = z0;
    index = 0;
    s = acc_t(1);
    s1 = acc_t(1);
  }

  CCL_HD void step(acc_t v, int c, acc_t inv_t) {
    if (v > m || (disnan(v) && !disnan(m))) {
      s = s * dexp((m - v) * inv_t) + acc_t(1);
      if (kWithUnitT) s1 = s1 * dexp(m - v) + acc_t(1);
      m = v;
      index = c;
    } else if (v != -std::numeric_limits<acc_t>::infinity()) {
      s += dexp((v - m) * inv_t);
      if (kWithUnitT) s1 += dexp(v - m);
    }
  }

  // Call once after the last step.
  CCL_HD void finish() {
    if (m == -std::numeric_limits<acc_t>::infinity()) {
      s = std::numeric_limits<acc_t>::quiet_NaN();
      s1 = s;
    }
  }
};

// Score of one valid pixel for one student in region_direction_mask: cross-entropy at T = 1 (score 'ce') or
// 1/0 for argmax == label (score 'accuracy'); one online pass over C.
template <typename scalar_t, typename acc_t>
CCL_HD acc_t pixel_score(const scalar_t* __restrict__ p, int64_t s_c, int C, int label,
                         bool accuracy) {
  OnlineSoftmax<acc_t, false> st;
  st.init(static_cast<acc_t>(p[0]));
#pragma unroll 4
  for (int c = 1; c < C; ++c) st.step(static_cast<acc_t>(p[c * s_c]), c, acc_t(1));
  st.finish();
  if (accuracy) return st.index == label ? acc_t(1) : acc_t(0);
  return dlog(st.s) - (static_cast<acc_t>(p[label * s_c]) - st.m);  // -log softmax(z)[label]
}

// Sum over a warp (fixed shuffle tree: deterministic). All 32 lanes must take part.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in thread 0. Every
// thread of the block must call it (it synchronises). Fixed order: deterministic.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T partial[kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  __syncthreads();  // a previous call may still be reading `partial`
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T total = T(0);
  if (warp == 0) total = warp_sum(lane < warps ? partial[lane] : T(0));
  return total;
}

}  // namespace ccl::cuda
