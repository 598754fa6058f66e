// CPU emulation of the CUDA kernels' per-pixel arithmetic (csrc/cuda/selective_kl_pixel.cuh and
// pixel_math.cuh), for a check without a GPU: run.py builds this file with nvcc as a host shared library,
// calls it through ctypes and compares with ccl_ops.reference. The loops below mirror the kernels' index
// arithmetic (pixel -> strided offsets, contiguous NCHW gradients, region tiling); only the thread/block
// structure and the reduction order differ.
#include <cstdint>
#include <cmath>
#include <limits>

#include "../../../csrc/cuda/selective_kl_pixel.cuh"

using namespace ccl;
using namespace ccl::cuda;

namespace {

struct Strides { int64_t n, c, h, w; };

template <typename acc_t, int CMAX>
int forward(const acc_t* za, Strides sa, const acc_t* zb, Strides sb, const int64_t* y, Strides sy, int64_t N,
            int C, int H, int W, double T, int rule_id, int normalize_valid, int64_t ignore_index, double* out,
            uint8_t* sel) {
  const Rule rule = static_cast<Rule>(rule_id);
  const acc_t inv_t = static_cast<acc_t>(1.0 / T);
  double kl_ab = 0, kl_ba = 0;
  long long valid = 0, ab = 0, ba = 0, any = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int h = 0; h < H; ++h)
      for (int w = 0; w < W; ++w) {
        const int64_t v = y[n * sy.n + h * sy.h + w * sy.w];
        uint8_t bits = 0;
        if (v != ignore_index) {
          if (v < 0 || v >= C) return 1;
          const acc_t* pa = za + n * sa.n + h * sa.h + w * sa.w;
          const acc_t* pb = zb + n * sb.n + h * sb.h + w * sb.w;
          acc_t tab, tba;
          if constexpr (CMAX > 0) {
            bits = forward_pixel_registers<acc_t, acc_t, CMAX>(pa, sa.c, pb, sb.c, C, int(v), inv_t, rule, tab, tba);
          } else {
            bits = forward_pixel_online<acc_t, acc_t>(pa, sa.c, pb, sb.c, C, int(v), inv_t, rule, tab, tba);
          }
          kl_ab += tab, kl_ba += tba, valid += 1;
          ab += (bits & kAteachesB) != 0, ba += (bits & kBteachesA) != 0, any += bits != 0;
        }
        sel[(n * H + h) * W + w] = bits;
      }
  const long long selected = normalize_valid ? valid : any;
  const double nn = double(selected > 0 ? selected : 1);
  out[0] = double(acc_t(T * T * kl_ba / nn));
  out[1] = double(acc_t(T * T * kl_ab / nn));
  out[2] = double(ab);
  out[3] = double(ba);
  out[4] = nn;
  return 0;
}

template <typename acc_t, int CMAX>
int backward(const acc_t* za, Strides sa, const acc_t* zb, Strides sb, const uint8_t* sel, int64_t N, int C, int H,
             int W, double T, double g_a, double g_b, double norm, acc_t* ga, acc_t* gb) {
  const acc_t inv_t = static_cast<acc_t>(1.0 / T);
  const double base = T / norm;
  const acc_t coef_a = acc_t(base * g_a), coef_b = acc_t(base * g_b);
  const int64_t HW = int64_t(H) * W;
  for (int64_t n = 0; n < N; ++n)
    for (int h = 0; h < H; ++h)
      for (int w = 0; w < W; ++w) {
        const int hw = h * W + w;
        const uint8_t bits = sel[n * HW + hw];
        const bool la = ga != nullptr && (bits & kBteachesA), lb = gb != nullptr && (bits & kAteachesB);
        const int64_t out = n * C * HW + hw;
        if (!la && !lb) {
          for (int c = 0; c < C; ++c) {
            if (ga) ga[out + c * HW] = 0;
            if (gb) gb[out + c * HW] = 0;
          }
          continue;
        }
        const acc_t* pa = za + n * sa.n + h * sa.h + w * sa.w;
        const acc_t* pb = zb + n * sb.n + h * sb.h + w * sb.w;
        if constexpr (CMAX > 0) {
          backward_pixel_registers<acc_t, acc_t, CMAX>(pa, sa.c, pb, sb.c, C, inv_t, ga, gb, out, HW, la, lb, coef_a,
                                                       coef_b);
        } else {
          backward_pixel_online<acc_t, acc_t>(pa, sa.c, pb, sb.c, C, inv_t, ga, gb, out, HW, la, lb, coef_a, coef_b);
        }
      }
  return 0;
}

template <typename acc_t>
int region(const acc_t* za, Strides sa, const acc_t* zb, Strides sb, const int64_t* y, Strides sy, int64_t N, int C,
           int H, int W, int64_t rh, int64_t rw, int accuracy, int64_t ignore_index, int8_t* dir, float* scores) {
  const int64_t Hr = (H + rh - 1) / rh, Wr = (W + rw - 1) / rw, plane = Hr * Wr;
  for (int64_t r = 0; r < N * plane; ++r) {
    const int64_t n = r / plane, cell = r - n * plane, ry = cell / Wr, rx = cell - ry * Wr;
    const int h0 = int(ry * rh), w0 = int(rx * rw);
    const int rows = int(rh < H - h0 ? rh : H - h0), cols = int(rw < W - w0 ? rw : W - w0);
    double ta = 0, tb = 0;
    long long count = 0;
    for (int k = 0; k < rows * cols; ++k) {
      const int i = k / cols, h = h0 + i, w = w0 + (k - i * cols);
      const int64_t v = y[n * sy.n + h * sy.h + w * sy.w];
      if (v == ignore_index) continue;
      if (v < 0 || v >= C) return 1;
      ta += pixel_score<acc_t, acc_t>(za + n * sa.n + h * sa.h + w * sa.w, sa.c, C, int(v), accuracy != 0);
      tb += pixel_score<acc_t, acc_t>(zb + n * sb.n + h * sb.h + w * sb.w, sb.c, C, int(v), accuracy != 0);
      count += 1;
    }
    int8_t d = 0;
    float a, b;
    if (count == 0) {
      a = b = std::numeric_limits<float>::quiet_NaN();
    } else {
      const acc_t ma = acc_t(ta / double(count)), mb = acc_t(tb / double(count));
      const bool ab = accuracy ? ma > mb : ma < mb, bb = accuracy ? mb > ma : mb < ma;
      d = int8_t(ab ? 1 : (bb ? -1 : 0));
      a = float(ma), b = float(mb);
    }
    dir[r] = d;
    scores[(2 * n) * plane + cell] = a;
    scores[(2 * n + 1) * plane + cell] = b;
  }
  return 0;
}

Strides st(const int64_t* s) { return {s[0], s[1], s[2], s[3]}; }

}  // namespace

extern "C" {

// double_ = 1: acc_t double (the kernels' float64 path: online only); else float. path: 0 online, 8/16/32 bucket.
int ccl_emu_forward(int double_, int path, const void* za, const int64_t* sa, const void* zb, const int64_t* sb,
                    const int64_t* y, const int64_t* sy, int64_t N, int C, int H, int W, double T, int rule,
                    int normalize_valid, int64_t ignore_index, double* out, uint8_t* sel) {
  const Strides Y{sy[0], 0, sy[1], sy[2]};
  if (double_) return forward<double, 0>((const double*)za, st(sa), (const double*)zb, st(sb), y, Y, N, C, H, W, T,
                                         rule, normalize_valid, ignore_index, out, sel);
#define FWD(K) forward<float, K>((const float*)za, st(sa), (const float*)zb, st(sb), y, Y, N, C, H, W, T, rule, \
                                 normalize_valid, ignore_index, out, sel)
  switch (path) {
    case 8: return C <= 8 ? FWD(8) : 2;
    case 16: return C <= 16 ? FWD(16) : 2;
    case 32: return C <= 32 ? FWD(32) : 2;
    default: return FWD(0);
  }
#undef FWD
}

int ccl_emu_backward(int double_, int path, const void* za, const int64_t* sa, const void* zb, const int64_t* sb,
                     const uint8_t* sel, int64_t N, int C, int H, int W, double T, double g_a, double g_b,
                     double norm, void* ga, void* gb) {
  if (double_) return backward<double, 0>((const double*)za, st(sa), (const double*)zb, st(sb), sel, N, C, H, W, T,
                                          g_a, g_b, norm, (double*)ga, (double*)gb);
#define BWD(K) backward<float, K>((const float*)za, st(sa), (const float*)zb, st(sb), sel, N, C, H, W, T, g_a, g_b, \
                                  norm, (float*)ga, (float*)gb)
  switch (path) {
    case 8: return C <= 8 ? BWD(8) : 2;
    case 16: return C <= 16 ? BWD(16) : 2;
    case 32: return C <= 32 ? BWD(32) : 2;
    default: return BWD(0);
  }
#undef BWD
}

int ccl_emu_region(int double_, const void* za, const int64_t* sa, const void* zb, const int64_t* sb,
                   const int64_t* y, const int64_t* sy, int64_t N, int C, int H, int W, int64_t rh, int64_t rw,
                   int accuracy, int64_t ignore_index, int8_t* dir, float* scores) {
  const Strides Y{sy[0], 0, sy[1], sy[2]};
  if (double_) return region<double>((const double*)za, st(sa), (const double*)zb, st(sb), y, Y, N, C, H, W, rh, rw,
                                     accuracy, ignore_index, dir, scores);
  return region<float>((const float*)za, st(sa), (const float*)zb, st(sb), y, Y, N, C, H, W, rh, rw, accuracy,
                       ignore_index, dir, scores);
}

}  // extern "C"
