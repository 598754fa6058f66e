// CUDA kernels of pixel_selective_kl (METHOD.md §1): forward and backward.
//
// Forward. One thread per pixel (threads along H*W, blockIdx.y along N). For C <= 32 (float/half/bfloat16)
// a thread loads the C logits of both students once into registers (template bucket CMAX in {8, 16, 32}),
// then: max/argmax, one pass of exponentials giving the sums at T (and at T = 1 for rule='confidence' when
// T != 1) and the two KL numerators in centred form, then the selection. For larger C (and for float64) a
// first pass computes max/argmax/sums online (one read of each logit) and a second pass, only at selected
// pixels, the KL numerators (a re-read, mostly L1/L2 hits). With d_s = (z_s - m_s) / T and S_s = sum exp(d_s):
//     KL(p_a || p_b) = sum_c exp(d_a) (d_a - d_b) / S_a - log S_a + log S_b    (accurate for logits ~ 1e4)
// Each block writes its partial sums (double) and counts (int64) to a scratch buffer; a one-block kernel sums
// them in a fixed order and writes n, the losses and the counts on the device: deterministic, no host sync,
// scratch of O(N * H * W / 256).
//
// Backward. One thread per pixel: pixels where the student does not learn get zeros without reading the
// logits; elsewhere the softmaxes of both students are recomputed (registers for C <= 32, else an online pass
// and a second read) and grad_za = T / n * g_a * (p_a - p_b), grad_zb = T / n * g_b * (p_b - p_a) are written
// contiguous NCHW, coalesced. g_a, g_b and n are read from device memory (no sync).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../ops/checks.h"
#include "pixel_math.cuh"
#include "selective_kl_pixel.cuh"

namespace ccl::cuda {
namespace {

constexpr int kFinalThreads = 512;

// Grid: x over ceil(H*W / kThreads), y over N (grid-stride when N > 65535). Block b writes
// part_kl[2b..2b+1] = (sum over A->B of KL(pa||pb), sum over B->A of KL(pb||pa)) and
// part_count[4b..4b+3] = (valid, A->B, B->A, any).
template <typename scalar_t, typename acc_t, int CMAX>
__global__ void __launch_bounds__(kThreads)
    selective_kl_forward_kernel(Logits<scalar_t> za, Logits<scalar_t> zb, Labels y, int64_t N, int C, int W,
                                int HW, acc_t inv_t, Rule rule, int64_t ignore_index,
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
        kl_ab += static_cast<double>(term_ab);
        kl_ba += static_cast<double>(term_ba);
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

// ---- host side --------------------------------------------------------------------------------------------

// Calls f(std::integral_constant<int, CMAX>) with the register bucket for C (0: the online path).
template <typename scalar_t, typename F>
void with_channel_bucket(int64_t C, F&& f) {
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

void check_sizes(const at::Tensor& za) {
  const int64_t C = za.size(1), HW = za.size(2) * za.size(3);
  TORCH_CHECK(C <= std::numeric_limits<int>::max(), "ccl (CUDA): C = ", C, " is too large");
  TORCH_CHECK(HW <= std::numeric_limits<int>::max() - kThreads, "ccl (CUDA): H * W = ", HW,
              " is too large (at most 2^31 - 257 pixels per image)");
}

dim3 pixel_grid(int64_t N, int64_t HW) {
  return dim3(static_cast<unsigned>((HW + kThreads - 1) / kThreads),
              static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(N, 1), kMaxGridY)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pixel_selective_kl_cuda(
    const at::Tensor& za, const at::Tensor& zb, const at::Tensor& y, double temperature, c10::string_view rule_name,
    c10::string_view normalize_name, int64_t ignore_index) {
  check_logits_and_labels(za, zb, y);
  check_temperature(temperature);
  TORCH_CHECK(za.is_cuda(), "pixel_selective_kl (CUDA): tensors must be on a CUDA device, got ", za.device());
  const Rule rule = parse_rule(std::string(rule_name));
  const Normalize normalize = parse_normalize(std::string(normalize_name));
  check_sizes(za);
  const c10::cuda::CUDAGuard guard(za.device());
  const int64_t N = za.size(0), C = za.size(1), H = za.size(2), W = za.size(3), HW = H * W;
  const at::ScalarType acc_type = za.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = za.options().dtype(acc_type);
  at::Tensor loss_a = at::empty({}, acc_opts), loss_b = at::empty({}, acc_opts), norm = at::empty({}, acc_opts);
  at::Tensor count_ab = at::empty({}, za.options().dtype(at::kLong));
  at::Tensor count_ba = at::empty({}, za.options().dtype(at::kLong));
  at::Tensor selection = at::empty({N, H, W}, za.options().dtype(at::kByte));

  const bool has_pixels = N > 0 && HW > 0;
  const dim3 grid = pixel_grid(N, HW);
  const int64_t blocks = has_pixels ? static_cast<int64_t>(grid.x) * grid.y : 0;
  at::Tensor part_kl = at::empty({2 * blocks}, za.options().dtype(at::kDouble));
  at::Tensor part_count = at::empty({4 * blocks}, za.options().dtype(at::kLong));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, za.scalar_type(), "pixel_selective_kl_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (has_pixels) {
      with_channel_bucket<scalar_t>(C, [&](auto bucket) {
        constexpr int CMAX = decltype(bucket)::value;
        selective_kl_forward_kernel<scalar_t, acc_t, CMAX><<<grid, kThreads, 0, stream>>>(
            logits_view<scalar_t>(za), logits_view<scalar_t>(zb), labels_view(y), N, static_cast<int>(C),
            static_cast<int>(W), static_cast<int>(HW), static_cast<acc_t>(1.0 / temperature), rule, ignore_index,
            selection.data_ptr<uint8_t>(), part_kl.data_ptr<double>(),
            reinterpret_cast<long long*>(part_count.data_ptr<int64_t>()));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    selective_kl_finalize_kernel<acc_t><<<1, kFinalThreads, 0, stream>>>(
        part_kl.const_data_ptr<double>(), reinterpret_cast<const long long*>(part_count.const_data_ptr<int64_t>()),
        blocks, temperature * temperature, normalize == Normalize::kValid, loss_a.data_ptr<acc_t>(),
        loss_b.data_ptr<acc_t>(), count_ab.data_ptr<int64_t>(), count_ba.data_ptr<int64_t>(), norm.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss_a, loss_b, count_ab, count_ba, selection, norm};
}

// A device scalar of the accumulation type, on za's device (a no-op for what autograd passes).
at::Tensor device_scalar(const at::Tensor& t, const at::Tensor& za, at::ScalarType acc_type, const char* name) {
  TORCH_CHECK(t.numel() == 1, "pixel_selective_kl_backward: ", name, " must hold one value, got shape ", t.sizes());
  return t.reshape({}).to(za.device(), acc_type).contiguous();
}

std::tuple<at::Tensor, at::Tensor> pixel_selective_kl_backward_cuda(const at::Tensor& grad_loss_a,
                                                                    const at::Tensor& grad_loss_b,
                                                                    const at::Tensor& za, const at::Tensor& zb,
                                                                    const at::Tensor& selection, const at::Tensor& norm,
                                                                    double temperature, std::array<bool, 2> mask) {
  check_backward_inputs(za, zb, selection);
  TORCH_CHECK(za.is_cuda() && zb.device() == za.device() && selection.device() == za.device(),
              "pixel_selective_kl_backward (CUDA): za, zb and selection must be on one CUDA device, got ",
              za.device(), ", ", zb.device(), ", ", selection.device());
  check_temperature(temperature);
  check_sizes(za);
  const c10::cuda::CUDAGuard guard(za.device());
  const int64_t N = za.size(0), C = za.size(1), HW = za.size(2) * za.size(3);
  const at::ScalarType acc_type = za.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g_a = device_scalar(grad_loss_a, za, acc_type, "grad_loss_a");
  const at::Tensor g_b = device_scalar(grad_loss_b, za, acc_type, "grad_loss_b");
  const at::Tensor n = device_scalar(norm, za, acc_type, "norm");
  const at::Tensor sel = selection.contiguous();
  at::Tensor grad_za, grad_zb;
  std::tie(grad_za, grad_zb) = empty_gradients(za, zb, mask);
  if (!(mask[0] || mask[1]) || N == 0 || HW == 0) return {grad_za, grad_zb};
  const dim3 grid = pixel_grid(N, HW);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, za.scalar_type(), "pixel_selective_kl_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_channel_bucket<scalar_t>(C, [&](auto bucket) {
      constexpr int CMAX = decltype(bucket)::value;
      selective_kl_backward_kernel<scalar_t, acc_t, CMAX><<<grid, kThreads, 0, stream>>>(
          logits_view<scalar_t>(za), logits_view<scalar_t>(zb), sel.const_data_ptr<uint8_t>(), N,
          static_cast<int>(C), static_cast<int>(za.size(3)), static_cast<int>(HW),
          static_cast<acc_t>(1.0 / temperature), temperature, g_a.const_data_ptr<acc_t>(),
          g_b.const_data_ptr<acc_t>(), n.const_data_ptr<acc_t>(), mask[0] ? grad_za.data_ptr<scalar_t>() : nullptr,
          mask[1] ? grad_zb.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_za, grad_zb};
}

}  // namespace

TORCH_LIBRARY_IMPL(ccl, CUDA, m) {
  m.impl("pixel_selective_kl", &pixel_selective_kl_cuda);
  m.impl("pixel_selective_kl_backward", &pixel_selective_kl_backward_cuda);
}

}  // namespace ccl::cuda
