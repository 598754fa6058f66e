"""Per-student optimizers and the warm-up + poly schedule (SGD + poly for the CNN, AdamW + warm-up + poly for
the ViT by default)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: dict) -> torch.optim.Optimizer:
    """``cfg`` is ``optim.cnn`` or ``optim.vit``. Norm and bias parameters get no weight decay."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    name = cfg["optimizer"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"])
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]))
    raise ValueError(f"optimizer={name!r}; expected 'sgd', 'adamw' or 'adam'")


class WarmupPoly:
    """Learning-rate factor at ``step``: linear warm-up from ``warmup_ratio`` to 1 over ``warmup_iters``, then
    ``(1 - step / total) ** power``, floored at ``min_lr / lr``. A picklable callable (checkpointed)."""

    def __init__(self, total: int, power: float, warmup_iters: int = 0, warmup_ratio: float = 1e-6,
                 floor: float = 0.0):
        self.total, self.power, self.warmup_iters = total, power, warmup_iters
        self.warmup_ratio, self.floor = warmup_ratio, floor

    def __call__(self, step: int) -> float:
        factor = max(0.0, 1.0 - step / self.total) ** self.power
        if step < self.warmup_iters:
            factor *= self.warmup_ratio + (1 - self.warmup_ratio) * step / self.warmup_iters
        return max(factor, self.floor)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, total: int) -> LambdaLR:
    return LambdaLR(optimizer, WarmupPoly(total, cfg["power"], cfg["warmup_iters"], cfg["warmup_ratio"],
                                          cfg["min_lr"] / cfg["lr"]))
