// Argument checks shared by the CPU and CUDA kernels. The Python wrappers check
// the same things first with friendlier messages; these protect direct callers
// of torch.ops.ccl.*.
#pragma once
#include <ATen/ATen.h>
#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "kinds.h"

namespace ccl {

inline Rule parse_rule(const std::string& rule) {
  if (rule == "correct") return Rule::kCorrect;
  if (rule == "confidence") return Rule::kConfidence;
  if (rule == "all") return Rule::kAll;
  TORCH_CHECK_VALUE(false, "rule='", rule, "' is unknown; expected one of 'correct', 'confidence', 'all'");
}

// The selection bits of the directions whose loss is computed (see kinds.h).
inline uint8_t parse_learners(const std::string& learners) {
  if (learners == "both") return kBothLearn;
  if (learners == "a") return kBteachesA;
  if (learners == "b") return kAteachesB;
  TORCH_CHECK_VALUE(false, "learners='", learners, "' is unknown; expected one of 'both', 'a', 'b'");
}

inline Normalize parse_normalize(const std::string& normalize) {
  if (normalize == "valid") return Normalize::kValid;
  if (normalize == "selected") return Normalize::kSelected;
  TORCH_CHECK_VALUE(false, "normalize='", normalize, "' is unknown; expected 'valid' or 'selected'");
}

inline Score parse_score(const std::string& score) {
  if (score == "ce") return Score::kCrossEntropy;
  if (score == "accuracy") return Score::kAccuracy;
  TORCH_CHECK_VALUE(false, "score='", score, "' is unknown; expected 'ce' or 'accuracy'");
}

// za, zb: (N, C, H, W) floating, same shape/dtype/device; y: int64 (N, H, W).
inline void check_logits_and_labels(const at::Tensor& za, const at::Tensor& zb, const at::Tensor& y) {
  TORCH_CHECK(za.dim() == 4, "za must be 4-D (N, C, H, W), got shape ", za.sizes());
  TORCH_CHECK(zb.sizes() == za.sizes(), "zb must have the shape of za ", za.sizes(), ", got ", zb.sizes());
  TORCH_CHECK(at::isFloatingType(za.scalar_type()),
              "za must be float32, float16, bfloat16 or float64, got ", za.scalar_type());
  TORCH_CHECK(zb.scalar_type() == za.scalar_type(), "zb must have the dtype of za (", za.scalar_type(),
              "), got ", zb.scalar_type());
  TORCH_CHECK(y.scalar_type() == at::kLong, "y must be int64, got ", y.scalar_type());
  TORCH_CHECK(y.dim() == 3 && y.size(0) == za.size(0) && y.size(2) == za.size(3) && y.size(1) == za.size(2),
              "y must have shape (N, H, W) = (", za.size(0), ", ", za.size(2), ", ", za.size(3), "), got ",
              y.sizes());
  TORCH_CHECK(zb.device() == za.device() && y.device() == za.device(),
              "za, zb and y must be on one device, got ", za.device(), ", ", zb.device(), ", ", y.device());
  TORCH_CHECK(za.size(1) >= 1, "za must have at least one channel, got C = ", za.size(1));
}

// Arguments of pixel_selective_kl_backward: logits as in the forward and the forward's selection mask.
inline void check_backward_inputs(const at::Tensor& za, const at::Tensor& zb, const at::Tensor& selection) {
  TORCH_CHECK(za.dim() == 4 && zb.sizes() == za.sizes() && zb.scalar_type() == za.scalar_type(),
              "za and zb must be 4-D with one shape and dtype, got ", za.sizes(), " ", za.scalar_type(), " and ",
              zb.sizes(), " ", zb.scalar_type());
  TORCH_CHECK(at::isFloatingType(za.scalar_type()), "za must be floating point, got ", za.scalar_type());
  TORCH_CHECK(selection.scalar_type() == at::kByte && selection.dim() == 3 && selection.size(0) == za.size(0) &&
                  selection.size(1) == za.size(2) && selection.size(2) == za.size(3),
              "selection must be uint8 (N, H, W) from pixel_selective_kl, got ", selection.scalar_type(), " ",
              selection.sizes());
}

// The outputs of pixel_selective_kl (its schema: csrc/ops/pixel_selective_kl.cpp): loss_a, loss_b, count_ab,
// count_ba, selection, norm, grad_za, grad_zb.
using KlForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                    at::Tensor>;

// The gradient outputs of pixel_selective_kl_backward: contiguous NCHW, or empty where output_mask is false.
inline std::tuple<at::Tensor, at::Tensor> empty_gradients(const at::Tensor& za, const at::Tensor& zb,
                                                         std::array<bool, 2> mask) {
  return {mask[0] ? at::empty(za.sizes(), za.options()) : at::empty({0}, za.options()),
          mask[1] ? at::empty(zb.sizes(), zb.options()) : at::empty({0}, zb.options())};
}

inline void check_temperature(double temperature) {
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "temperature must be a finite number > 0, got ", temperature);
}

}  // namespace ccl

namespace ccl {

// The arguments of pixel_selective_kl_peers, checked and parsed (the CPU and CUDA kernels share this).
struct PeersCall {
  Rule rule;
  Normalize normalize;
  std::vector<bool> grad_mask;  // the schema's bool[] reaches a kernel as c10::List<bool>
};

// logits: 2..kMaxPeers (N, C, H, W) tensors, each checked against the first as za and zb are; grad_mask: one
// entry per student.
inline PeersCall check_peers_call(at::TensorList logits, const at::Tensor& y, double temperature,
                                  c10::string_view rule, c10::string_view normalize,
                                  const c10::List<bool>& grad_mask) {
  const int64_t K = static_cast<int64_t>(logits.size());
  TORCH_CHECK_VALUE(K >= 2 && K <= kMaxPeers, "logits must hold 2 to ", kMaxPeers, " students' logits, got ", K);
  for (int64_t s = 1; s < K; ++s) check_logits_and_labels(logits[0], logits[s], y);
  TORCH_CHECK_VALUE(static_cast<int64_t>(grad_mask.size()) == K, "grad_mask must have one entry per student (", K,
                    "), got ", grad_mask.size());
  check_temperature(temperature);
  return {parse_rule(std::string(rule)), parse_normalize(std::string(normalize)),
          std::vector<bool>(grad_mask.begin(), grad_mask.end())};
}

// The outputs of pixel_selective_kl_peers: losses, counts, norm, grads.
using PeersOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>;

}  // namespace ccl
