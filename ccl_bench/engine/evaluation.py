"""Evaluation of every student and their ensemble on the validation set, the overlays of the last evaluation,
and the summaries the run writes (``evals.csv`` rows, ``metrics.json``)."""
from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import ccl_ops
from ccl_ops import to_label_size
from ccl_ops.reference import selection_masks

from ..metrics import StudentMetrics
from ..student_names import slots
from . import distributed



@torch.no_grad()
def evaluate_students(students: Sequence[nn.Module], loader: DataLoader, *, num_classes: int, ignore_index: int,
                      device: torch.device, dist: distributed.DistInfo,
                      autocast: Callable[[], AbstractContextManager], overlays: int = 0,
                      progress: str | None = None) -> tuple[dict, list[tuple]]:
    """Metrics of every student and their ensemble over ``loader`` (this rank's share; summed over the ranks),
    and, on rank 0, the first ``overlays`` images with labels and the students' logits (CPU). ``progress`` is
    the label of a tqdm bar (none when None). The students are back in training mode afterwards."""
    from tqdm.auto import tqdm

    meters = StudentMetrics(num_classes, ignore_index, device, students=len(students))
    distributed.broadcast_buffers(students, dist)
    for m in students:
        m.eval()
    kept: list[tuple] = []
    for x, y in tqdm(loader, desc=progress, leave=False, unit="batch", disable=progress is None):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            logits = [to_label_size(m(x), y).float() for m in students]
        meters.update(logits, y)
        if dist.is_main and sum(len(k[0]) for k in kept) < overlays:
            kept.append((x.cpu(), y.cpu(), *(z.cpu() for z in logits)))
    for m in students:
        m.train()
    return meters.compute(), kept


def save_overlays(path: str, kept: list[tuple], count: int, *, method_options: dict, ignore_index: int,
                  mean: Sequence[float] | None, std: Sequence[float] | None, step: int,
                  region_grid: tuple[int, int] | None = None) -> None:
    """Validation images (de-normalised with ``mean``/``std``) with every student's prediction (``pred_a``,
    ``pred_b``, ...) and the who-teaches-where maps between A and B (pixels and regions, with the method's rule,
    region size and score where it has them) as ``path`` (.npz); with K > 2 students also the K-student maps
    (METHOD.md §9): ``pixel_learners`` (bit s where student s learns from a peer) and ``region_target`` (the
    student each region's others learn from, -1 for none).
    With ``region_grid`` (the feature grid region-wise BSD trained on) the region maps are the masks training used,
    resized to that grid by nearest neighbour, and stored at the label resolution; else one value per region."""
    x, y, *logits = (torch.cat(parts)[:count] for parts in zip(*kept))
    za, zb = logits[:2]
    rule = method_options.get("rule", "correct")
    rule = "correct" if rule == "all" else rule
    region = tuple(method_options.get("region", (16, 16)))
    score = method_options.get("score", "ce")
    m_ab, m_ba, _ = selection_masks(za, zb, y, rule, ignore_index)
    if region_grid:
        on_grid = ccl_ops.direction_on_grid(za, zb, y, region_grid, region=region, score=score,
                                            ignore_index=ignore_index)
        regions = F.interpolate(on_grid[:, None], size=tuple(y.shape[-2:]), mode="nearest")[:, 0].to(torch.int8)
    else:
        regions = ccl_ops.region_direction_mask(za, zb, y, region=region, score=score,
                                                ignore_index=ignore_index).direction
    peers = _peer_maps(logits, y, rule, region, score, ignore_index, region_grid) if len(logits) > 2 else {}
    mean = torch.tensor(mean or (0.0, 0.0, 0.0))[:, None, None]
    std = torch.tensor(std or (1.0, 1.0, 1.0))[:, None, None]
    images = ((x.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    np.savez_compressed(
        path, images=images.numpy(), labels=y.numpy(),
        **{f"pred_{slot}": z.argmax(1).numpy() for slot, z in zip(slots(len(logits)), logits)},
        pixel_direction=(m_ab.to(torch.int8) - m_ba.to(torch.int8)).numpy(), region_direction=regions.numpy(),
        region=np.array(region), region_grid=np.array(region_grid or ()), score=np.array(score),
        rule=np.array(rule), step=np.array(step), ignore_index=np.array(ignore_index), **peers)


def _peer_maps(logits, y, rule: str, region, score: str, ignore_index: int, region_grid) -> dict[str, np.ndarray]:
    """The K-student maps of :func:`save_overlays`, as training selects them (METHOD.md §9)."""
    masks = ccl_ops.peer_masks(logits, y, rule=rule, ignore_index=ignore_index)
    learners = torch.zeros(y.shape, dtype=torch.uint8)
    for s, learns in enumerate(ccl_ops.learner_masks(masks)):
        learners |= learns.to(torch.uint8) << s
    if region_grid:
        target = ccl_ops.targets_on_grid(logits, y, region_grid, region=region, score=score, ignore_index=ignore_index)
        target = F.interpolate(target[:, None].float(), size=tuple(y.shape[-2:]), mode="nearest")[:, 0]
    else:
        target = ccl_ops.region_targets(logits, y, region=region, score=score, ignore_index=ignore_index).target
    return {"pixel_learners": learners.numpy(), "region_target": target.to(torch.int8).numpy()}


def eval_row(step: int, result: dict, train_result: dict | None = None) -> dict:
    """One row of ``evals.csv``: the step, then mIoU and pixel accuracy of every student and the ensemble on
    the validation set, and their mIoU on the fixed training subset (``train_miou_*``) when it is evaluated."""
    row = {"step": step, **{f"miou_{k}": r["miou"] for k, r in result.items()},
           **{f"acc_{k}": r["pixel_acc"] for k, r in result.items()}}
    if train_result is not None:
        row.update({f"train_miou_{k}": r["miou"] for k, r in train_result.items()})
    return row


def result_summary(result: dict, class_names: Sequence[str]) -> dict:
    """The evaluation's part of ``metrics.json`` (NaN per-class IoU, a class absent everywhere, as null)."""
    return {"miou": {k: r["miou"] for k, r in result.items()},
            "pixel_acc": {k: r["pixel_acc"] for k, r in result.items()},
            "iou": {k: [None if math.isnan(v) else v for v in r["iou"].tolist()] for k, r in result.items()},
            "class_names": list(class_names)}
