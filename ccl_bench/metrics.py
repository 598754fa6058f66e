"""Confusion-matrix segmentation metrics, exactly as METHOD.md §7.

One confusion matrix per model over the whole validation split, valid pixels only, accumulated on the
device of the inputs and summed across ranks under torch.distributed. ``IoU_c = TP / (TP + FP + FN)``;
mIoU is the mean over the classes that occur in the ground truth or the prediction (the others have
IoU NaN and are left out). Pixel accuracy = trace / total.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from .student_names import ENSEMBLE, result_keys, slots


def to_labels(logits_or_labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Logits/probabilities (N, C, H, W) -> argmax labels; integer labels (N, H, W) pass through."""
    pred = logits_or_labels
    if pred.is_floating_point():
        if pred.dim() != target.dim() + 1:
            raise ValueError(f"logits of shape {tuple(pred.shape)}: expected (N, C, H, W) for a target of shape "
                             f"{tuple(target.shape)}")
        pred = pred.argmax(1)
    if pred.shape != target.shape:
        raise ValueError(f"prediction of shape {tuple(pred.shape)} does not match target {tuple(target.shape)} "
                         "(bring logits to the label resolution first)")
    return pred


class SegMetrics:
    """``update(logits_or_labels, target)``, ``reset()``, ``compute()`` -> dict with ``miou``, ``iou``,
    ``pixel_acc``, ``class_acc``, ``present`` and ``confusion`` (rows: ground truth, columns: prediction)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r}: expected a positive int")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index}: must lie outside [0, num_classes={num_classes})")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, logits_or_labels: torch.Tensor, target: torch.Tensor) -> None:
        if target.is_floating_point():
            raise ValueError(f"target dtype {target.dtype}: expected integer class labels")
        pred = to_labels(logits_or_labels, target).long()
        target = target.long()
        valid = target != self.ignore_index
        c = self.num_classes
        bad = valid & ((target < 0) | (target >= c))
        if bad.any():
            raise ValueError(f"target contains values {target[bad].unique()[:10].tolist()}; expected [0, {c}) "
                             f"or ignore_index={self.ignore_index}")
        pred, target = pred[valid], target[valid]
        if pred.numel() and (pred.min() < 0 or pred.max() >= c):
            raise ValueError(f"prediction values outside [0, {c})")
        if self.confusion.device != target.device:
            self.confusion = self.confusion.to(target.device)
        self.confusion += torch.bincount(target * c + pred, minlength=c * c).view(c, c)

    def total_confusion(self) -> torch.Tensor:
        """This rank's matrix, summed over all ranks when torch.distributed is initialized."""
        confusion = self.confusion.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(confusion, op=dist.ReduceOp.SUM)
        return confusion

    def compute(self) -> dict:
        return confusion_metrics(self.total_confusion())


def confusion_metrics(confusion: torch.Tensor) -> dict:
    cm = confusion.double()
    tp = cm.diagonal()
    gt, predicted = cm.sum(1), cm.sum(0)
    union = gt + predicted - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    total = cm.sum()
    return {
        "miou": iou[present].mean().item() if present.any() else float("nan"),
        "iou": iou.float().cpu(),
        "pixel_acc": (tp.sum() / total).item() if total > 0 else float("nan"),
        "class_acc": torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan"))).float().cpu(),
        "present": present.cpu(),
        "confusion": confusion.cpu(),
    }


def ensemble_probs(*logits: torch.Tensor) -> torch.Tensor:
    """The ensemble of METHOD.md §7 and §9: the mean of the students' softmax probabilities."""
    probs = [z.float().softmax(1) for z in logits]
    return sum(probs[1:], probs[0]) * (1.0 / len(probs))  # two students: exactly 0.5 * (p_a + p_b)


class StudentMetrics:
    """Per-student and ensemble metrics: ``update([logits_a, logits_b, ...], target)``; ``compute()`` returns
    ``{"a": ..., "b": ..., ..., "ensemble": ...}``, each as :meth:`SegMetrics.compute`."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None, students: int = 2):
        self.meters = {k: SegMetrics(num_classes, ignore_index, device) for k in result_keys(students)}

    def reset(self) -> None:
        for meter in self.meters.values():
            meter.reset()

    @torch.no_grad()
    def update(self, logits: Sequence[torch.Tensor], target: torch.Tensor) -> None:
        for slot, z in zip(slots(len(logits)), logits):
            self.meters[slot].update(z, target)
        self.meters[ENSEMBLE].update(ensemble_probs(*logits), target)

    def compute(self) -> dict:
        return {k: meter.compute() for k, meter in self.meters.items()}
