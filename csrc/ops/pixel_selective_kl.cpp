// Schema of the pixel-wise selective KL (METHOD.md §1) and of its backward.
// Kernels live beside this file: csrc/cpu/pixel_selective_kl_kernel.cpp and
// csrc/cuda/pixel_selective_kl_kernel.cu. Autograd and fake tensors are
// registered from Python (ccl_ops/ops.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ccl, m) {
  // Outputs: loss_a, loss_b (opmath scalars), count_ab, count_ba (int64
  // scalars), selection (uint8 (N,H,W): bit 0 = A teaches B, bit 1 = B
  // teaches A), norm (the normaliser n, opmath scalar), grad_za, grad_zb.
  // learners ('both', 'a' or 'b') names the losses computed; the other one is
  // 0 (counts, selection and n do not depend on it). grad_za = d loss_a / d za
  // (and grad_zb = d loss_b / d zb) is computed in the same pass where
  // grad_mask asks for it, else it is an empty tensor: the autograd backward
  // then only scales it by the upstream gradient. selection and norm serve
  // pixel_selective_kl_backward; the public wrapper hides them.
  m.def(
      "pixel_selective_kl(Tensor za, Tensor zb, Tensor y, float temperature, "
      "str rule, str normalize, int ignore_index, str learners=\"both\", "
      "bool[2] grad_mask=[False, False]) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Recomputes the gradients from the logits and the selection:
  // grad_za = T / n * grad_loss_a * [bit 1] * (p_a - p_b), and symmetrically
  // for zb with bit 0. An output whose output_mask entry is false comes back
  // as an empty tensor.
  m.def(
      "pixel_selective_kl_backward(Tensor grad_loss_a, Tensor grad_loss_b, "
      "Tensor za, Tensor zb, Tensor selection, Tensor norm, float temperature, "
      "bool[2] output_mask) -> (Tensor, Tensor)");
}
