// Schema of the pixel-wise selective KL among K >= 2 students (METHOD.md §9 on §1), one pass over the K logit
// tensors. Kernels: csrc/cpu/pixel_selective_kl_peers_kernel.cpp and csrc/cuda/pixel_selective_kl_peers_kernel.cu;
// autograd and fake tensors from Python (ccl_ops/ops.py). Reference: ccl_ops.peers.pixel_bsd_peers.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ccl, m) {
  // logits: K (N, C, H, W) tensors of one shape, dtype and device (2 <= K <= 8). At a valid pixel i, student s
  // learns from the peers R_s,i = {r != s : the two-student rule of §1 selects "r teaches s"}; its term is the
  // mean over R_s,i of T^2 KL(sg p_r || p_s) (0 where R_s,i is empty).
  // Outputs: losses (K,) opmath: the sums of the terms over the valid pixels, divided by the normaliser n;
  // counts (K,) int64: the valid pixels where each student learns (R_s,i not empty); norm: n (opmath scalar),
  // max(1, valid pixels) for normalize='valid', max(1, pixels where any student learns) for 'selected';
  // grads: K tensors, grads[s] = d losses[s] / d logits[s] = T / n * [R_s,i not empty] * (p_s - mean_{R_s,i} p_r)
  // (contiguous, the logits' shape and dtype) where grad_mask[s], else an empty tensor. The op writes the
  // gradients itself (CPU: in the forward pass; CUDA: a second kernel once n is known), so there is no backward
  // op: the autograd backward scales them, and a second backward through a retained graph calls this op again.
  m.def(
      "pixel_selective_kl_peers(Tensor[] logits, Tensor y, float temperature, str rule, str normalize, "
      "int ignore_index, bool[] grad_mask) -> (Tensor, Tensor, Tensor, Tensor[])");
}
