"""The two students: DeepLabV3+ on a timm CNN and SegFormer's all-MLP decoder on a timm PVTv2.

Both share :class:`SegStudent`: ``stages`` (four callable NCHW -> NCHW modules, see ``backbone.py`` for the
stage-1 = first stride-4 feature convention), ``stage_channels``, ``stage_strides``, ``encode(x)``,
``decode(features, out_size)``, ``last_feature(features)`` / ``last_channels`` (region-wise BSD) and
``forward(x)`` -> logits at the input resolution.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .backbone import create_encoder, load_checked


def conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3). The image-pooling branch has no BatchNorm so that a
    batch of one still trains."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int]):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(cin, cout, 1)] +
                                      [conv_bn_relu(cin, cout, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(conv_bn_relu(cout * (len(rates) + 2), cout, 1), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3PlusHead(nn.Module):
    """ASPP on the last feature + 48-channel low-level skip from stage 1 (stride 4), two 3x3 convs."""

    def __init__(self, stage_channels: Sequence[int], num_classes: int, channels: int, rates: Sequence[int]):
        super().__init__()
        self.aspp = ASPP(stage_channels[-1], channels, rates)
        self.low = conv_bn_relu(stage_channels[0], 48, 1)
        self.fuse = nn.Sequential(conv_bn_relu(channels + 48, channels, 3), conv_bn_relu(channels, channels, 3))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        low = self.low(features[0])
        high = F.interpolate(self.aspp(features[-1]), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([high, low], dim=1)))


class SegFormerHead(nn.Module):
    """SegFormer all-MLP decoder: per-stage linear embed, upsample to stride 4, concat, fuse, classify."""

    def __init__(self, stage_channels: Sequence[int], num_classes: int, channels: int):
        super().__init__()
        self.embed = nn.ModuleList([nn.Conv2d(c, channels, 1) for c in stage_channels])
        self.fuse = conv_bn_relu(channels * len(stage_channels), channels, 1)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        x = [F.interpolate(e(f), size=size, mode="bilinear", align_corners=False) if i else e(f)
             for i, (e, f) in enumerate(zip(self.embed, features))]
        return self.classifier(self.dropout(self.fuse(torch.cat(x, dim=1))))


class SegStudent(nn.Module):
    """Encoder stages + decode head. ``model(x)`` returns logits at the input resolution."""

    def __init__(self, backbone: str, stages: nn.ModuleList, stage_channels: list[int],
                 stage_strides: list[int], head: nn.Module, num_classes: int):
        super().__init__()
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.stages = stages
        self.stage_channels = list(stage_channels)
        self.stage_strides = list(stage_strides)
        self.head = head

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage output, ``[f1, f2, f3, f4]`` (METHOD.md's stage 1 is index 0)."""
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def decode(self, features: Sequence[torch.Tensor], out_size: Sequence[int] | None = None) -> torch.Tensor:
        """Logits from the stage outputs, resized (bilinear) to ``out_size`` when given."""
        logits = self.head(features)
        if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return logits

    @staticmethod
    def last_feature(features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The last encoder feature (input of region-wise BSD's projection)."""
        return features[-1]

    @property
    def last_channels(self) -> int:
        return self.stage_channels[-1]

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.encode(x)
        logits = self.decode(features, x.shape[-2:])
        return (logits, features) if return_features else logits


def run_stage(model: SegStudent, index: int, feature: torch.Tensor, frozen: bool = False) -> torch.Tensor:
    """Apply ``model.stages[index]`` (0-based: index 1 is METHOD.md's "stage 2") to any NCHW ``feature``.

    ``frozen=True`` is HFD's borrowed stage: gradients reach ``feature`` but not the stage's parameters,
    and BatchNorm running statistics of the borrowed stage are left untouched (buffers are copied).
    """
    if not 0 <= index < len(model.stages):
        raise IndexError(f"index={index}: expected 0 <= index < {len(model.stages)}")
    expected = model.stage_channels[index - 1] if index else 3
    if feature.dim() != 4 or feature.shape[1] != expected:
        raise ValueError(f"feature of shape {tuple(feature.shape)}: stage {index} of {model.backbone_name} "
                         f"expects (N, {expected}, H, W)")
    stage = model.stages[index]
    if not frozen:
        return stage(feature)
    params = {k: v.detach() for k, v in stage.named_parameters()}
    buffers = {k: v.clone() for k, v in stage.named_buffers()}
    return functional_call(stage, {**params, **buffers}, (feature,))


def _deeplab(backbone: str, num_classes: int, output_stride: int = 16, decoder_channels: int = 256,
             **encoder_options) -> SegStudent:
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride={output_stride!r}: DeepLabV3+ supports 8 or 16")
    stages, channels, strides = create_encoder(backbone, output_stride=output_stride, **encoder_options)
    rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
    return SegStudent(backbone, stages, channels, strides,
                      DeepLabV3PlusHead(channels, num_classes, decoder_channels, rates), num_classes)


def _segformer(backbone: str, num_classes: int, decoder_channels: int | None = None,
               **encoder_options) -> SegStudent:
    if encoder_options.get("output_stride") is not None:
        raise ValueError(f"output_stride={encoder_options['output_stride']!r}: SegFormer students keep the "
                         f"hierarchical transformer's strides 4-32; output_stride is a DeepLabV3+ option")
    stages, channels, strides = create_encoder(backbone, **encoder_options)
    if decoder_channels is None:  # SegFormer: 256 for B0/B1, 768 for larger encoders
        decoder_channels = 768 if backbone in ("pvt_v2_b2", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5") else 256
    return SegStudent(backbone, stages, channels, strides,
                      SegFormerHead(channels, num_classes, decoder_channels), num_classes)


STUDENTS = {"deeplabv3plus": _deeplab, "segformer": _segformer}
DEFAULT_CNN = "deeplabv3plus_resnet18"
DEFAULT_VIT = "segformer_pvt_v2_b0"


def build_student(name: str, num_classes: int, checkpoint: str | None = None, **options) -> SegStudent:
    """Build ``"deeplabv3plus_<timm backbone>"`` or ``"segformer_<timm backbone>"``.

    Options: ``pretrained`` (timm ImageNet weights; needs network), ``backbone_checkpoint`` (local timm-format
    ImageNet state dict, offline), ``checkpoint`` (local state dict of this whole student, offline),
    ``output_stride`` (DeepLabV3+: 8 or 16), ``decoder_channels``, ``drop_path_rate``. From scratch by default.
    """
    decoder, _, backbone = name.partition("_")
    if decoder not in STUDENTS or not backbone:
        raise ValueError(f"name={name!r}: expected '<decoder>_<timm backbone>' with decoder in "
                         f"{sorted(STUDENTS)}, e.g. {DEFAULT_CNN!r} or {DEFAULT_VIT!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: expected a positive int")
    model = STUDENTS[decoder](backbone, num_classes, **options)
    if checkpoint is not None:
        load_checked(model, checkpoint, "checkpoint")
    return model
