// Launcher of the pixel_selective_kl_peers CUDA kernels (pixel_selective_kl_peers_kernel.cuh) and its
// TORCH_LIBRARY_IMPL. Schema: csrc/ops/pixel_selective_kl_peers.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/List.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../ops/checks.h"
#include "pixel_selective_kl_peers_kernel.cuh"
#include "tensor_views.h"

namespace ccl::cuda {
namespace {

template <typename scalar_t, int KMAX>
PeerLogits<scalar_t, KMAX> peer_logits_view(at::TensorList logits) {
  PeerLogits<scalar_t, KMAX> z{};
  for (size_t s = 0; s < logits.size(); ++s) z.z[s] = logits_view<scalar_t>(logits[s]);
  return z;
}

template <typename scalar_t, int KMAX>
PeerGrads<scalar_t, KMAX> peer_grads_view(const std::vector<at::Tensor>& grads, const std::vector<bool>& mask) {
  PeerGrads<scalar_t, KMAX> g{};
  for (size_t s = 0; s < grads.size(); ++s) g.g[s] = mask[s] ? grads[s].data_ptr<scalar_t>() : nullptr;
  return g;
}

PeersOutputs pixel_selective_kl_peers_cuda(at::TensorList logits, const at::Tensor& y, double temperature,
                                           c10::string_view rule_name, c10::string_view normalize_name,
                                           int64_t ignore_index, const c10::List<bool>& grad_mask_list) {
  const PeersCall call = check_peers_call(logits, y, temperature, rule_name, normalize_name, grad_mask_list);
  const Rule rule = call.rule;
  const Normalize normalize = call.normalize;
  const std::vector<bool>& grad_mask = call.grad_mask;
  const at::Tensor& z0 = logits[0];
  TORCH_CHECK(z0.is_cuda(), "pixel_selective_kl_peers (CUDA): tensors must be on a CUDA device, got ", z0.device());
  check_sizes(z0);
  const c10::cuda::CUDAGuard guard(z0.device());
  const int64_t K = static_cast<int64_t>(logits.size());
  const int64_t N = z0.size(0), C = z0.size(1), H = z0.size(2), W = z0.size(3), HW = H * W;
  const at::ScalarType acc_type = z0.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = z0.options().dtype(acc_type);
  at::Tensor losses = at::empty({K}, acc_opts), norm = at::empty({}, acc_opts);
  at::Tensor counts = at::empty({K}, z0.options().dtype(at::kLong));
  std::vector<at::Tensor> grads;
  for (int64_t s = 0; s < K; ++s) {
    grads.push_back(grad_mask[s] ? at::empty(z0.sizes(), z0.options()) : at::empty({0}, z0.options()));
  }

  const bool has_pixels = N > 0 && HW > 0;
  const bool any_grad = std::find(grad_mask.begin(), grad_mask.end(), true) != grad_mask.end();
  const dim3 grid = pixel_grid(N, HW);
  const int64_t blocks = has_pixels ? static_cast<int64_t>(grid.x) * grid.y : 0;
  at::Tensor learners = at::empty({N, H, W}, z0.options().dtype(at::kByte));  // bit s: student s learns
  at::Tensor part_kl = at::empty({K * blocks}, z0.options().dtype(at::kDouble));
  at::Tensor part_count = at::empty({(K + 2) * blocks}, z0.options().dtype(at::kLong));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int k = static_cast<int>(K);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z0.scalar_type(), "pixel_selective_kl_peers", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    with_peer_bucket(K, [&](auto bucket) {
      constexpr int KMAX = decltype(bucket)::value;
      const auto z = peer_logits_view<scalar_t, KMAX>(logits);
      if (has_pixels) {
        peers_forward_kernel<scalar_t, acc_t, KMAX><<<grid, kThreads, 0, stream>>>(
            z, k, labels_view(y), N, static_cast<int>(C), static_cast<int>(W), static_cast<int>(HW), inv_t, rule,
            ignore_index, learners.data_ptr<uint8_t>(), part_kl.data_ptr<double>(),
            reinterpret_cast<long long*>(part_count.data_ptr<int64_t>()));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      peers_finalize_kernel<acc_t><<<1, kFinalThreads, 0, stream>>>(
          part_kl.const_data_ptr<double>(), reinterpret_cast<const long long*>(part_count.const_data_ptr<int64_t>()),
          blocks, k, temperature * temperature, normalize == Normalize::kValid, losses.data_ptr<acc_t>(),
          counts.data_ptr<int64_t>(), norm.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (has_pixels && any_grad) {
        peers_grad_kernel<scalar_t, acc_t, KMAX><<<grid, kThreads, 0, stream>>>(
            z, k, labels_view(y), learners.const_data_ptr<uint8_t>(), N, static_cast<int>(C), static_cast<int>(W),
            static_cast<int>(HW), inv_t, rule, ignore_index, temperature, norm.const_data_ptr<acc_t>(),
            peer_grads_view<scalar_t, KMAX>(grads, grad_mask));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {losses, counts, norm, grads};
}

}  // namespace

TORCH_LIBRARY_IMPL(ccl, CUDA, m) { m.impl("pixel_selective_kl_peers", &pixel_selective_kl_peers_cuda); }

}  // namespace ccl::cuda
