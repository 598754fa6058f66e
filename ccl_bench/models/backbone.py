"""Split a timm classification model into four callable encoder stages.

Stage convention (shared by every student, so that HFD pairs line up, METHOD.md §4):

* ``stages[0]`` ("stage 1" in METHOD.md) takes the image and returns the first stride-4 feature. For a
  ResNet it therefore contains the stem (conv1/bn1/act1/maxpool) followed by ``layer1``; for MobileNetV2
  ``conv_stem``/``bn1``/``blocks.0``/``blocks.1``; for PVTv2 ``patch_embed`` followed by ``stages.0``.
* ``stages[1..3]`` take the previous stage's NCHW output and return nominal strides 8, 16, 32 (a dilated
  CNN, ``output_stride`` 8 or 16, keeps the resolution; ``stage_strides`` tells the real strides).

Every stage maps NCHW to NCHW, so ``stages[1]`` of one student can be applied to any NCHW tensor with the
right channel count, e.g. a translated stage-1 feature of the other student.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch
from torch import nn

# Backbones exercised by the tests; any timm model whose ``feature_info`` has stride-4..32 entries works.
CNN_BACKBONES = ("resnet18", "mobilenetv2_100", "resnet50")
VIT_BACKBONES = ("pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2")

# Classifier keys that an ImageNet checkpoint carries and the encoder does not use.
_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "conv_head.", "bn2.", "head_drop.", "global_pool.")


def _flat_children(model: nn.Module, cuts: list[str]) -> Iterable[tuple[str, nn.Module]]:
    """Top-level children in forward order; a ``nn.Sequential`` whose children are cut points is flattened."""
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and any(c.startswith(name + ".") for c in cuts):
            for sub_name, sub in child.named_children():
                yield f"{name}.{sub_name}", sub
        else:
            yield name, child


def split_stages(model: nn.Module) -> tuple[nn.ModuleList, list[int], list[int]]:
    """Return ``(stages, stage_channels, stage_strides)`` of a timm model (modules are shared, not copied)."""
    info = list(getattr(model, "feature_info", []))
    if len(info) < 4:
        raise ValueError(f"timm model {type(model).__name__} exposes {len(info)} feature levels; need >= 4")
    info = info[-4:]  # nominal strides 4, 8, 16, 32 (dilation shows up in 'reduction')
    cuts = [f["module"] for f in info]
    stages, current = [], []
    for name, module in _flat_children(model, cuts):
        current.append(module)
        if name == cuts[len(stages)]:
            stages.append(nn.Sequential(*current))
            current = []
            if len(stages) == 4:
                break
    if len(stages) != 4:
        raise ValueError(f"could not find feature modules {cuts} among the children of {type(model).__name__}")
    return nn.ModuleList(stages), [int(f["num_chs"]) for f in info], [int(f["reduction"]) for f in info]


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Load a state dict from ``path`` (raw, or wrapped under 'state_dict'/'model'), naming the file on error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}={path!r}: no such file (expected a torch state-dict file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors come in many types
        raise ValueError(f"{what}={path!r}: not a readable torch checkpoint ({exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{what}={path!r}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checked(module: nn.Module, path: str | os.PathLike, what: str, ignore: tuple[str, ...] = ()) -> None:
    """Strictly load ``path`` into ``module``; a mismatch is a ValueError that lists what does not fit."""
    state = {k: v for k, v in read_state_dict(path, what).items() if not k.startswith(ignore)}
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(ignore)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def head(items):
            return ", ".join(items[:5]) + (f" ... (+{len(items) - 5})" if len(items) > 5 else "")
        raise ValueError(
            f"{what}={os.fspath(path)!r} does not match the architecture {type(module).__name__}: "
            f"{len(missing)} missing keys [{head(missing)}], {len(unexpected)} unexpected keys "
            f"[{head(unexpected)}], {len(shapes)} shape mismatches [{head(shapes)}]")
    module.load_state_dict(state, strict=not ignore)


def create_encoder(backbone: str, pretrained: bool = False, backbone_checkpoint: str | None = None,
                   output_stride: int | None = None, drop_path_rate: float = 0.0,
                   encoder_args: dict | None = None):
    """Build ``timm.create_model(backbone, **encoder_args)``, optionally load weights, and split it into stages.

    ``encoder_args`` are the timm model's own constructor arguments (e.g. ``{sr_ratios: [2, 2, 1, 1]}`` for a
    PVTv2 on small images); timm's error for an argument the model does not take is passed on as a ValueError.
    """
    import timm

    if not timm.is_model(backbone):
        raise ValueError(f"backbone={backbone!r} is not a timm model; supported here: "
                         f"{', '.join(CNN_BACKBONES + VIT_BACKBONES)} (any timm model with 4+ feature levels)")
    kwargs = dict(encoder_args or {})
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if output_stride is not None:
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride={output_stride!r}: expected 8, 16 or 32")
        kwargs["output_stride"] = output_stride
    fetch = pretrained and backbone_checkpoint is None
    try:
        model = timm.create_model(backbone, pretrained=fetch, **kwargs)
    except TypeError as exc:  # an argument this timm model does not take
        raise ValueError(f"backbone={backbone!r} with encoder_args={encoder_args!r}: timm says {exc}") from exc
    except Exception as exc:
        if not fetch:
            raise
        raise RuntimeError(f"pretrained=True: could not fetch timm weights for backbone={backbone!r} ({exc}); "
                           "offline, pass backbone_checkpoint=<local timm state dict> instead") from exc
    if backbone_checkpoint is not None:
        load_checked(model, backbone_checkpoint, "backbone_checkpoint", ignore=_HEAD_PREFIXES)
    return split_stages(model)
