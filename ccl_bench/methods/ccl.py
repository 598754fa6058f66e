"""The proposed method (METHOD.md §3-5): CE + HFD + region-wise BSD + pixel-wise BSD, each term switchable."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ccl_ops import NORMALIZATIONS, RULES, SCORES, PixelBSDLoss, RegionBSDLoss, resize_bilinear

from ..models import run_stage
from .base import Knob, Method, MethodOutput, StudentOutput, share
from .registry import register


class Gamma(nn.Module):
    """HFD adapter: 1x1 conv to the other student's stage-1 channels, then bilinear resize to its grid."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, kernel_size=1)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        return resize_bilinear(self.proj(x), size)


@register
class CCL(Method):
    name = "ccl"
    description = "CNN-Transformer collaborative learning: CE + HFD + region-wise BSD + pixel-wise BSD"
    defaults = {
        "hfd": True, "rbsd": True, "pbsd": True,
        "lambda_hfd": 1.0, "lambda_rbsd": 1.0, "lambda_pbsd": 1.0,
        "temperature": 1.0, "rule": "correct", "normalize": "valid",
        "region": [16, 16], "score": "ce", "rbsd_dim": 128,
    }
    choices = {"rule": RULES, "normalize": NORMALIZATIONS, "score": SCORES}
    search_space = {"lambda_hfd": Knob(0.25, 4.0), "lambda_rbsd": Knob(0.25, 4.0), "lambda_pbsd": Knob(0.25, 4.0),
                    "temperature": Knob(1.0, 4.0)}

    def __init__(self, students, num_classes, ignore_index=255, **options):
        super().__init__(students, num_classes, ignore_index, **options)
        o = self.options
        a, b = self._students
        if o["hfd"]:
            self.gamma_a = Gamma(a.stage_channels[0], b.stage_channels[0])  # A's stage 1 -> B's format
            self.gamma_b = Gamma(b.stage_channels[0], a.stage_channels[0])  # B's stage 1 -> A's format
        if o["rbsd"]:
            self.rbsd = RegionBSDLoss(a.last_channels, b.last_channels, dim=o["rbsd_dim"],
                                      region=tuple(o["region"]), score=o["score"], ignore_index=ignore_index)
        if o["pbsd"]:
            self.pbsd = PixelBSDLoss(o["temperature"], o["rule"], o["normalize"], ignore_index=ignore_index)

    def student_parameters(self, slot: str) -> list[nn.Parameter]:
        a = slot == "a"  # student A owns gamma_a and proj_a
        params = []
        if self.options["hfd"]:
            params += list((self.gamma_a if a else self.gamma_b).parameters())
        if self.options["rbsd"]:
            params += list((self.rbsd.proj_a if a else self.rbsd.proj_b).parameters())
        return params

    def hfd_loss(self, out_a: StudentOutput, out_b: StudentOutput) -> torch.Tensor:
        """METHOD.md §4: each stage-1 feature goes through the other student's (frozen) stage 2."""
        a, b = self._students
        fa1, fa2 = out_a.features[0], out_a.features[1]
        fb1, fb2 = out_b.features[0], out_b.features[1]
        vb2 = run_stage(b, 1, self.gamma_a(fa1, fb1.shape[-2:]), frozen=True)  # ViT to CNN
        va2 = run_stage(a, 1, self.gamma_b(fb1, fa1.shape[-2:]), frozen=True)  # CNN to ViT
        loss_a = F.mse_loss(resize_bilinear(vb2, fb2.shape[-2:]).float(), fb2.detach().float())
        loss_b = F.mse_loss(resize_bilinear(va2, fa2.shape[-2:]).float(), fa2.detach().float())
        return 0.5 * (loss_a + loss_b)

    def losses(self, out_a, out_b, y) -> MethodOutput:
        o = self.options
        terms = self.ce_terms(out_a, out_b, y)
        stats = {}
        if o["hfd"]:
            terms["hfd"] = o["lambda_hfd"] * self.hfd_loss(out_a, out_b)
        if o["rbsd"]:
            ga, gb = out_a.features[-1], out_b.features[-1]
            region = self.rbsd(ga, gb, out_a.logits, out_b.logits, y)
            terms["rbsd"] = o["lambda_rbsd"] * region.loss
            cells = torch.tensor(region.direction.numel(), device=y.device)
            stats["region_ab"] = share((region.direction > 0).sum(), cells)
            stats["region_ba"] = share((region.direction < 0).sum(), cells)
            stats["rbsd_norm_a"], stats["rbsd_norm_b"] = region.norm_a, region.norm_b
            self.region_grid = tuple(region.direction.shape[-2:])  # the overlays draw the mask on this grid
        if o["pbsd"]:
            kl = self.pbsd(out_a.logits, out_b.logits, y)
            terms["pbsd_a"] = o["lambda_pbsd"] * kl.loss_a
            terms["pbsd_b"] = o["lambda_pbsd"] * kl.loss_b
            n = self.valid_count(y)
            stats["pixel_ab"] = share(kl.count_ab, n)
            stats["pixel_ba"] = share(kl.count_ba, n)
        return MethodOutput(terms, stats)
