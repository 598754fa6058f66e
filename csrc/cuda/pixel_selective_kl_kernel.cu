// Launchers of the pixel_selective_kl CUDA kernels (pixel_selective_kl_kernel.cuh) and their TORCH_LIBRARY_IMPL.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops/checks.h"
#include "pixel_selective_kl_kernel.cuh"
#include "tensor_views.h"

namespace ccl::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> pixel_selective_kl_backward_cuda(const at::Tensor& grad_loss_a,
                                                                    const at::Tensor& grad_loss_b,
                                                                    const at::Tensor& za, const at::Tensor& zb,
                                                                    const at::Tensor& selection, const at::Tensor& norm,
                                                                    double temperature, std::array<bool, 2> mask);

KlForwardOutputs pixel_selective_kl_cuda(const at::Tensor& za, const at::Tensor& zb, const at::Tensor& y,
                                         double temperature, c10::string_view rule_name, c10::string_view normalize_name,
                                         int64_t ignore_index, c10::string_view learners_name,
                                         std::array<bool, 2> grad_mask) {
  check_logits_and_labels(za, zb, y);
  check_temperature(temperature);
  TORCH_CHECK(za.is_cuda(), "pixel_selective_kl (CUDA): tensors must be on a CUDA device, got ", za.device());
  const Rule rule = parse_rule(std::string(rule_name));
  const Normalize normalize = parse_normalize(std::string(normalize_name));
  const uint8_t learners = parse_learners(std::string(learners_name));
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
            static_cast<int>(W), static_cast<int>(HW), static_cast<acc_t>(1.0 / temperature), rule, learners, ignore_index,
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
  // The gradients of the losses themselves (unit upstream gradients), by the backward kernel: on a GPU,
  // recomputing the softmaxes costs less than a second pass over stored statistics would save. A gradient
  // whose loss is not computed (learners) is zero.
  const at::Tensor one = at::ones({}, acc_opts);
  const at::Tensor g_a = (learners & kBteachesA) ? one : at::zeros({}, acc_opts);
  const at::Tensor g_b = (learners & kAteachesB) ? one : at::zeros({}, acc_opts);
  at::Tensor grad_za, grad_zb;
  std::tie(grad_za, grad_zb) =
      pixel_selective_kl_backward_cuda(g_a, g_b, za, zb, selection, norm, temperature, grad_mask);
  return {loss_a, loss_b, count_ab, count_ba, selection, norm, grad_za, grad_zb};
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
