// Launcher of the region_direction_mask CUDA kernel (region_direction_mask_kernel.cuh) and its TORCH_LIBRARY_IMPL.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../ops/checks.h"
#include "region_direction_mask_kernel.cuh"
#include "tensor_views.h"

namespace ccl::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> region_direction_mask_cuda(const at::Tensor& za, const at::Tensor& zb,
                                                              const at::Tensor& y, int64_t region_h,
                                                              int64_t region_w, c10::string_view score_name,
                                                              int64_t ignore_index) {
  check_logits_and_labels(za, zb, y);
  TORCH_CHECK(za.is_cuda(), "region_direction_mask (CUDA): tensors must be on a CUDA device, got ", za.device());
  TORCH_CHECK(region_h >= 1 && region_w >= 1, "region sizes must be >= 1, got (", region_h, ", ", region_w, ")");
  const Score score = parse_score(std::string(score_name));
  const int64_t N = za.size(0), C = za.size(1), H = za.size(2), W = za.size(3);
  TORCH_CHECK(C <= std::numeric_limits<int>::max(), "region_direction_mask (CUDA): C = ", C, " is too large");
  TORCH_CHECK(H * W <= std::numeric_limits<int>::max(), "region_direction_mask (CUDA): H * W = ", H * W,
              " is too large (at most 2^31 - 1 pixels per image)");
  const int64_t Hr = (H + region_h - 1) / region_h, Wr = (W + region_w - 1) / region_w;
  const c10::cuda::CUDAGuard guard(za.device());
  at::Tensor direction = at::empty({N, Hr, Wr}, za.options().dtype(at::kChar));
  at::Tensor scores = at::empty({N, 2, Hr, Wr}, za.options().dtype(at::kFloat));
  const int64_t regions = N * Hr * Wr;
  if (regions == 0) return {direction, scores};
  TORCH_CHECK(regions <= std::numeric_limits<int>::max(), "region_direction_mask (CUDA): ", regions,
              " regions is too many for one launch");
  const int threads = region_threads(region_h, region_w, H, W);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, za.scalar_type(), "region_direction_mask_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    region_direction_kernel<scalar_t, acc_t><<<static_cast<unsigned>(regions), threads, 0, stream>>>(
        logits_view<scalar_t>(za), logits_view<scalar_t>(zb), labels_view(y), static_cast<int>(C),
        static_cast<int>(H), static_cast<int>(W), region_h, region_w, Hr, Wr, score == Score::kAccuracy,
        ignore_index, direction.data_ptr<int8_t>(), scores.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {direction, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(ccl, CUDA, m) { m.impl("region_direction_mask", &region_direction_mask_cuda); }

}  // namespace ccl::cuda
