"""Joint image/label augmentations on tensors: image float32 (3, H, W) in [0, 1], label int64 (H, W).

Randomness comes from torch's global generator, which DataLoader seeds differently in every worker.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _randint(high: int) -> int:
    """Uniform integer in [0, high]."""
    return int(torch.randint(0, high + 1, ()).item()) if high > 0 else 0


def resize_pair(image: torch.Tensor, label: torch.Tensor, size: tuple[int, int]):
    """Bilinear (antialiased) for the image, nearest for the label."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, label
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return image, label


def photometric(image: torch.Tensor, strength: float = 0.25) -> torch.Tensor:
    """Random brightness, contrast and saturation (each with probability 1/2), on a [0, 1] image."""
    if torch.rand(()) < 0.5:
        image = image * _uniform(1 - strength, 1 + strength)
    if torch.rand(()) < 0.5:
        mean = image.mean()
        image = (image - mean) * _uniform(1 - strength, 1 + strength) + mean
    if torch.rand(()) < 0.5:
        gray = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]
        image = (image - gray) * _uniform(1 - strength, 1 + strength) + gray
    return image.clamp_(0, 1)


def random_scale_window(image: torch.Tensor, label: torch.Tensor, crop_size: tuple[int, int],
                        scale_range: tuple[float, float]):
    """The part of "rescale by s ~ U(scale_range), then random crop" that holds pixels: only the source
    window that survives the crop is resized (cheap for large images). The result is at most ``crop_size``;
    :func:`random_pad` completes it."""
    (ch, cw), (h, w) = crop_size, label.shape
    s = _uniform(*scale_range)
    sh, sw = min(h, max(1, round(ch / s))), min(w, max(1, round(cw / s)))
    y0, x0 = _randint(h - sh), _randint(w - sw)
    image, label = image[:, y0:y0 + sh, x0:x0 + sw], label[y0:y0 + sh, x0:x0 + sw]
    return resize_pair(image, label, (min(ch, max(1, round(sh * s))), min(cw, max(1, round(sw * s)))))


def random_pad(image: torch.Tensor, label: torch.Tensor, size: tuple[int, int], ignore_index: int):
    """Pad at a random offset to ``size``: image with 0 (the mean after normalisation), label with ignore."""
    ph, pw = size[0] - label.shape[0], size[1] - label.shape[1]
    if ph or pw:
        oy, ox = _randint(ph), _randint(pw)
        image = F.pad(image, (ox, pw - ox, oy, ph - oy), value=0.0)
        label = F.pad(label, (ox, pw - ox, oy, ph - oy), value=ignore_index)
    return image, label


def _size_pair(name: str, size) -> tuple[int, int] | None:
    """None, an int or (h, w) of positive ints -> (h, w); anything else is a ValueError naming the option."""
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) else size
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)):
        raise ValueError(f"{name}={size!r}: expected a positive int or (height, width) of positive ints")
    return tuple(pair)


@dataclass
class SegTransform:
    """Train: random scale + crop (window first) -> photometric -> normalize -> ignore padding -> flip.
    Eval (``augment=False``): normalize only (after a fixed resize when ``resize`` is given)."""

    augment: bool = False
    crop_size: tuple[int, int] | None = None
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    photometric: bool = True
    mean: Sequence[float] | None = IMAGENET_MEAN
    std: Sequence[float] | None = IMAGENET_STD
    resize: tuple[int, int] | None = None
    ignore_index: int = 255

    def __post_init__(self):
        if self.augment and self.crop_size is None:
            raise ValueError("crop_size=None: augmentation needs a crop size (an int or (h, w))")
        self.crop_size = _size_pair("crop_size", self.crop_size)
        self.resize = _size_pair("resize", self.resize)
        if not (isinstance(self.scale_range, (tuple, list)) and len(self.scale_range) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.scale_range)
                and 0 < self.scale_range[0] <= self.scale_range[1] < float("inf")):
            raise ValueError(f"scale_range={self.scale_range!r}: expected (low, high) with 0 < low <= high")

    def __call__(self, image: torch.Tensor, label: torch.Tensor):
        if self.resize is not None:
            image, label = resize_pair(image, label, self.resize)
        if self.augment:
            image, label = random_scale_window(image, label, self.crop_size, self.scale_range)
            if self.photometric:
                image = photometric(image)
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=image.dtype)[:, None, None]
            std = torch.tensor(self.std, dtype=image.dtype)[:, None, None]
            image = (image - mean) / std
        if self.augment:
            image, label = random_pad(image, label, self.crop_size, self.ignore_index)
            if self.flip and torch.rand(()) < 0.5:
                image, label = image.flip(-1), label.flip(-1)
        return image.contiguous(), label.contiguous()
