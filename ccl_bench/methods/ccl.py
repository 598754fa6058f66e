"""The proposed method (METHOD.md §3-5, §9): CE + HFD + region-wise BSD + pixel-wise BSD, each term switchable.

Two students run the fused two-student ops (:class:`ccl_ops.PixelBSDLoss`, :class:`ccl_ops.RegionBSDLoss`); K > 2
students run their K-peer forms (the fused :func:`ccl_ops.pixel_selective_kl_peers`, one pass over the K logits;
:class:`ccl_ops.RegionBSDPeersLoss`), which equal the two-student ops at K = 2. HFD runs over a list of (source,
target) pairs (``hfd_pairs``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ccl_ops import (NORMALIZATIONS, RULES, SCORES, PixelBSDLoss, RegionBSDLoss, RegionBSDPeersLoss,
                     pixel_selective_kl_peers, resize_bilinear)

from ..models import run_stage
from ..student_names import MAX_STUDENTS
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
        "hfd_pairs": None,  # [[source, target], ...] student indices; None: every CNN-ViT pair (two: A<->B)
    }
    choices = {"rule": RULES, "normalize": NORMALIZATIONS, "score": SCORES}
    search_space = {"lambda_hfd": Knob(0.25, 4.0), "lambda_rbsd": Knob(0.25, 4.0), "lambda_pbsd": Knob(0.25, 4.0),
                    "temperature": Knob(1.0, 4.0)}
    students_range = (2, MAX_STUDENTS)

    def __init__(self, students, num_classes, ignore_index=255, **options):
        super().__init__(students, num_classes, ignore_index, **options)
        o = self.options
        models = self._students
        two = len(models) == 2
        self.hfd_pairs = self._pairs(o["hfd_pairs"])
        if o["hfd"]:  # Gamma "ab": A's stage 1 -> B's format, trained with A
            self.gammas = nn.ModuleDict({
                self.slots[s] + self.slots[t]: Gamma(models[s].stage_channels[0], models[t].stage_channels[0])
                for s, t in self.hfd_pairs})
        if o["rbsd"]:
            common = dict(dim=o["rbsd_dim"], region=tuple(o["region"]), score=o["score"], ignore_index=ignore_index)
            self.rbsd = (RegionBSDLoss(models[0].last_channels, models[1].last_channels, **common) if two else
                         RegionBSDPeersLoss([m.last_channels for m in models], **common))
        if o["pbsd"] and two:
            self.pbsd = PixelBSDLoss(o["temperature"], o["rule"], o["normalize"], ignore_index=ignore_index)

    def _pairs(self, pairs) -> list[tuple[int, int]]:
        """HFD's (source, target) pairs: the option's, else A<->B for two students, else every ordered pair of a
        CNN and a ViT (METHOD.md §9)."""
        k = len(self._students)
        if pairs is None:
            if k == 2:
                return [(0, 1), (1, 0)]
            return [(s, t) for s in range(k) for t in range(k) if {self.families[s], self.families[t]} == {"cnn", "vit"}]
        ok = isinstance(pairs, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) and 0 <= i < k for i in p)
            and p[0] != p[1] for p in pairs)
        if not ok or len({tuple(p) for p in pairs}) != len(pairs):
            raise ValueError(f"method 'ccl': hfd_pairs={pairs!r}; expected distinct [source, target] pairs of "
                             f"different student indices in 0..{k - 1}, e.g. [[0, {k - 1}], [{k - 1}, 0]]")
        return [tuple(p) for p in pairs]

    def student_parameters(self, slot: str) -> list[nn.Parameter]:
        """The Gammas that map this student's features (it is their source) and its region projection."""
        index = self.slots.index(slot)
        params = []
        if self.options["hfd"]:
            for key, gamma in self.gammas.items():
                if key[0] == slot:
                    params += list(gamma.parameters())
        if self.options["rbsd"]:
            proj = ((self.rbsd.proj_a, self.rbsd.proj_b)[index] if isinstance(self.rbsd, RegionBSDLoss)
                    else self.rbsd.projs[index])
            params += list(proj.parameters())
        return params

    def hfd_loss(self, outs: list[StudentOutput]) -> torch.Tensor:
        """METHOD.md §4 over the pairs: the source's stage-1 feature, translated by its Gamma, goes through the
        target's (frozen) stage 2 and must match the target's own stage-2 feature; the mean over the pairs."""
        borrowed = [run_stage(self._students[t], 1, self.gammas[self.slots[s] + self.slots[t]](
            outs[s].features[0], outs[t].features[0].shape[-2:]), frozen=True) for s, t in self.hfd_pairs]
        losses = [F.mse_loss(resize_bilinear(v, outs[t].features[1].shape[-2:]).float(),
                             outs[t].features[1].detach().float()) for v, (_, t) in zip(borrowed, self.hfd_pairs)]
        return sum(losses[1:], losses[0]) * (1.0 / len(losses))  # two students: 0.5 * (l_ab + l_ba)

    def losses(self, *outs, y) -> MethodOutput:
        o = self.options
        terms = self.ce_terms(*outs, y=y)
        stats = {}
        if o["hfd"] and self.hfd_pairs:
            terms["hfd"] = o["lambda_hfd"] * self.hfd_loss(list(outs))
        if o["rbsd"]:
            terms["rbsd"] = o["lambda_rbsd"] * self._region(outs, y, stats)
        if o["pbsd"]:
            terms.update(self._pixel(outs, y, stats))
        return MethodOutput(terms, stats)

    def _region(self, outs, y, stats: dict) -> torch.Tensor:
        features, logits = [o.features[-1] for o in outs], [o.logits for o in outs]
        if isinstance(self.rbsd, RegionBSDLoss):
            region = self.rbsd(*features, *logits, y)
            cells = torch.tensor(region.direction.numel(), device=y.device)
            stats["region_ab"] = share((region.direction > 0).sum(), cells)
            stats["region_ba"] = share((region.direction < 0).sum(), cells)
            stats["rbsd_norm_a"], stats["rbsd_norm_b"] = region.norm_a, region.norm_b
            self.region_grid = tuple(region.direction.shape[-2:])  # the overlays draw the mask on this grid
            return region.loss
        region = self.rbsd(features, logits, y)
        cells = torch.tensor(region.target.numel(), device=y.device)
        for i, slot in enumerate(self.slots):  # where each student is the region's teacher
            stats[f"region_{slot}"] = share((region.target == i).sum(), cells)
            stats[f"rbsd_norm_{slot}"] = region.norms[i]
        self.region_grid = tuple(region.target.shape[-2:])
        return region.loss

    def _pixel(self, outs, y, stats: dict) -> dict[str, torch.Tensor]:
        o = self.options
        n = self.valid_count(y)
        if len(outs) == 2:
            kl = self.pbsd(outs[0].logits, outs[1].logits, y)
            stats["pixel_ab"] = share(kl.count_ab, n)
            stats["pixel_ba"] = share(kl.count_ba, n)
            return {"pbsd_a": o["lambda_pbsd"] * kl.loss_a, "pbsd_b": o["lambda_pbsd"] * kl.loss_b}
        kl = pixel_selective_kl_peers([out.logits for out in outs], y, temperature=o["temperature"], rule=o["rule"],
                                      normalize=o["normalize"], ignore_index=self.ignore_index)
        for s, slot in enumerate(self.slots):  # where each student learns from at least one peer
            stats[f"pixel_{slot}"] = share(kl.counts[s], n)
        return {f"pbsd_{slot}": o["lambda_pbsd"] * kl.losses[s] for s, slot in enumerate(self.slots)}
