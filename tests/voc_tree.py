"""A minimal Pascal VOC tree (both label layouts) for tests that need a real dataset folder without downloads."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

IDS = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000033"]}
H, W = 12, 16


def make_voc_tree(root) -> str:
    """Write ``root/VOC2012`` with 2 train and 1 val pairs (labels 0-20 and 255); return the VOC2012 folder."""
    base = os.path.join(os.fspath(root), "VOC2012")
    rng = np.random.default_rng(0)
    for split, ids in IDS.items():
        for i in ids:
            os.makedirs(os.path.join(base, "JPEGImages"), exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
                os.path.join(base, "JPEGImages", f"{i}.jpg"))
            label = rng.choice(np.array(list(range(21)) + [255], np.uint8), size=(H, W))
            for folder in ("SegmentationClass", "SegmentationClassAug"):
                os.makedirs(os.path.join(base, folder), exist_ok=True)
                Image.fromarray(label, mode="L").save(os.path.join(base, folder, f"{i}.png"))
        lists = os.path.join(base, "ImageSets", "Segmentation")
        os.makedirs(lists, exist_ok=True)
        for name in ([split, "train_aug"] if split == "train" else [split]):
            with open(os.path.join(lists, f"{name}.txt"), "w") as f:
                f.write("\n".join(ids) + "\n")
    return base


def check_items(ds, expected, atol: float = 4 / 255):
    """expected: list of (image tensor, expected label array) in dataset order; labels exactly, images within
    ``atol`` (JPEG rounding by default)."""
    assert len(ds) == len(expected)
    for i, (image, label) in enumerate(expected):
        got_image, got_label = ds[i]
        assert got_label.dtype == torch.int64
        torch.testing.assert_close(got_label, torch.as_tensor(label, dtype=torch.int64), rtol=0, atol=0)
        torch.testing.assert_close(got_image, image, rtol=0, atol=atol)
