"""Per-student optimizers and the warm-up + poly schedule (SGD + poly for the CNN, AdamW + warm-up + poly for
the ViT by default)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR


def _groups(params: Iterable[torch.nn.Parameter], cfg: dict, **extra) -> list[dict]:
    """Weight-decayed (matrices, kernels) and undecayed (norms, biases) groups of ``params``; empty ones dropped."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": cfg["weight_decay"], **extra},
              {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0, **extra}]
    return [g for g in groups if g["params"]]


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: dict,
                    method_params: Iterable[torch.nn.Parameter] = ()) -> torch.optim.Optimizer:
    """``cfg`` is ``optim.cnn`` or ``optim.vit``; ``params`` the student's own, ``method_params`` the method's
    parameters that this student owns (METHOD.md §5: groups of their own, marked ``method=True``, at the
    student's learning rate times ``method_lr_scale`` and on its schedule, left out of :func:`clip_student`).
    Norm and bias parameters get no weight decay."""
    groups = _groups(params, cfg, method=False) + _groups(method_params, cfg, method=True,
                                                          lr=cfg["lr"] * cfg["method_lr_scale"])
    name = cfg["optimizer"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"])
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]))
    raise ValueError(f"optimizer={name!r}; expected 'sgd', 'adamw' or 'adam'")


def clip_student(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Clip the gradient norm of the student's own parameters in ``optimizer`` (not the method's groups), so that
    every method clips exactly its students' parameters."""
    own = [p for g in optimizer.param_groups if not g.get("method", False) for p in g["params"]]
    return torch.nn.utils.clip_grad_norm_(own, max_norm)


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
