"""A co-training method from outside ccl_bench: DML whose per-pixel KL is weighted by the teacher's confidence.

kl_a = lambda_kl T^2 mean over valid pixels of  w_b KL(sg p_b || p_a),  w_b = max_c sg p_b  (and the same for B),
with p = softmax(z / T). Load it with `--plugin examples/my_method/my_method.py`, or `pip install -e
examples/my_method` (entry point `ccl_bench.methods`) and no flag.
"""
import torch

from ccl_bench.methods import Method, MethodOutput, register


def confidence_kl(z_student, z_teacher, y, temperature=1.0, ignore_index=255):
    """T^2 * sum over valid pixels of max_c(p_t) KL(p_t || p_s) / (number of valid pixels); teacher detached."""
    dtype = torch.promote_types(z_student.dtype, torch.float32)  # bf16/fp16 logits: the loss in float32
    log_p_t = torch.log_softmax(z_teacher.detach().to(dtype) / temperature, 1)
    log_p_s = torch.log_softmax(z_student.to(dtype) / temperature, 1)
    p_t = log_p_t.exp()
    kl = (p_t * (log_p_t - log_p_s)).sum(1)  # (N, H, W)
    valid = y != ignore_index
    weighted = torch.where(valid, p_t.amax(1) * kl, torch.zeros_like(kl))
    return temperature ** 2 * weighted.sum() / valid.sum().clamp(min=1)


@register
class ConfidenceDML(Method):
    name = "confidence-dml"
    description = "DML with each pixel's KL weighted by the teacher's max probability (detached)"
    defaults = {"temperature": 1.0, "lambda_kl": 1.0}

    def losses(self, out_a, out_b, y) -> MethodOutput:
        t, lam = self.options["temperature"], self.options["lambda_kl"]
        terms = self.ce_terms(out_a, out_b, y)  # ce_a, ce_b: each student's own CE over the valid pixels
        terms["kl_a"] = lam * confidence_kl(out_a.logits, out_b.logits, y, t, self.ignore_index)
        terms["kl_b"] = lam * confidence_kl(out_b.logits, out_a.logits, y, t, self.ignore_index)
        return MethodOutput(terms)
