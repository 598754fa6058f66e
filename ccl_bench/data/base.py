"""Dataset base class and the file readers shared by every benchmark.

Items are ``(image float32 (3, H, W), label int64 (H, W))``; labels hold class ids in ``[0, num_classes)``
or ``ignore_index`` (255). A raw label value that the dataset's layout does not define is an error.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import SegTransform

IGNORE_INDEX = 255
LABEL_MODES = ("P", "L")


class DataFileError(OSError, ValueError):
    """A dataset file that is there but cannot be used (unreadable, a label of another size or mode, label
    values the layout does not define). One line naming the file. Both an OSError (the file) and a ValueError
    (its content), so that either kind of handler catches it."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def read_image(path: str) -> np.ndarray:
    """RGB uint8 (H, W, 3); an unreadable file is a DataFileError naming it."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except Exception as exc:
        raise DataFileError(f"cannot read image {path!r}: {_one_line(exc)}") from exc


def read_label(path: str) -> np.ndarray:
    """Class-index PNG (palette 'P' or grayscale 'L') as uint8 (H, W), without palette conversion."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in LABEL_MODES:
                return np.asarray(im)
    except Exception as exc:
        raise DataFileError(f"cannot read label {path!r}: {_one_line(exc)}") from exc
    raise DataFileError(_mode_message(path, mode))


def _mode_message(path: str, mode: str) -> str:
    return (f"label {path!r} has PIL mode {mode!r}; expected a class-index PNG in palette ('P') or 8-bit "
            "grayscale ('L') mode, not a color rendering")


def _header(path: str, what: str) -> tuple[tuple[int, int], str]:
    """(width, height) and mode from the file header only (no pixel decoding)."""
    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except Exception as exc:
        raise DataFileError(f"cannot read {what} {path!r}: {_one_line(exc)}") from exc


def make_lut(mapping: Mapping[int, int]) -> np.ndarray:
    """256-entry table raw value -> train id; -1 marks values the layout does not define."""
    lut = np.full(256, -1, dtype=np.int64)
    for raw, train_id in mapping.items():
        lut[raw] = train_id
    lut[IGNORE_INDEX] = IGNORE_INDEX  # 255 is ignore everywhere
    return lut


def apply_lut(raw: np.ndarray, lut: np.ndarray, path: str) -> np.ndarray:
    label = lut[raw]
    if (label < 0).any():
        bad = sorted(set(np.unique(raw[label < 0]).tolist()))
        allowed = np.flatnonzero(lut >= 0).tolist()
        raise DataFileError(f"label {path!r} contains values {bad[:10]} that this dataset does not define; "
                         f"expected raw values in {_ranges(allowed)}")
    return label


def _ranges(values: Sequence[int]) -> str:
    out, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return "{" + ", ".join(out) + "}"


class SegDataset(Dataset):
    """Base: subclasses implement ``__len__`` and ``load(index) -> (uint8 (H, W, 3), int64 (H, W))``."""

    name = "seg"
    ignore_index = IGNORE_INDEX

    def __init__(self, split: str, class_names: Sequence[str], transform: SegTransform | None = None):
        self.split = split
        self.class_names = list(class_names)
        self.transform = transform or SegTransform()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def check_files(self) -> None:
        """Check the files behind the items before training (nothing to check for generated data)."""

    def __getitem__(self, index: int):
        image, label = self.load(index)
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
        return self.transform(image, torch.from_numpy(np.ascontiguousarray(label)).long())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, items={len(self)}, num_classes={self.num_classes})"


class FileSegDataset(SegDataset):
    """Pairs of (image file, label file) decoded through a lookup table."""

    def __init__(self, split: str, pairs: Sequence[tuple[str, str]], class_names: Sequence[str],
                 lut: np.ndarray, transform: SegTransform | None = None):
        super().__init__(split, class_names, transform)
        self.pairs = list(pairs)
        self.lut = lut

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int):
        image_path, label_path = self.pairs[index]
        image, raw = read_image(image_path), read_label(label_path)
        if image.shape[:2] != raw.shape:
            raise DataFileError(_size_message(image_path, image.shape[1::-1], label_path, raw.shape[::-1]))
        return image, apply_lut(raw, self.lut, label_path)

    def check_files(self) -> None:
        """Read every file's header (no decoding: seconds for thousands of files): an unreadable file, a label
        whose size differs from its image's or a colour label is a DataFileError before any training. Label
        values are checked when an item is loaded (that needs the pixels)."""
        for image_path, label_path in self.pairs:
            image_size, _ = _header(image_path, "image")
            label_size, mode = _header(label_path, "label")
            if mode not in LABEL_MODES:
                raise DataFileError(_mode_message(label_path, mode))
            if image_size != label_size:
                raise DataFileError(_size_message(image_path, image_size, label_path, label_size))


def _size_message(image_path: str, image_size, label_path: str, label_size) -> str:
    return (f"image {image_path!r} is {image_size[0]}x{image_size[1]} but its label {label_path!r} is "
            f"{label_size[0]}x{label_size[1]}; expected the same size")


def require_files(paths: Sequence[str], what: str, layout: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} {what} missing, e.g. {missing[0]!r}; expected layout:\n{layout}")
