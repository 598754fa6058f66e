"""Datasets: ``build_dataset(name, split, root=None, **options)``.

Names: ``digits`` (embedded default, offline), ``voc``, ``voc_aug``, ``cityscapes``, ``camvid``, ``ade20k``,
``folder`` (any folder of images and masks, see :mod:`.folder`).
Items are ``(image float32 (3, H, W), label int64 (H, W))``, ignore index 255; datasets expose ``num_classes``,
``ignore_index`` and ``class_names``.
"""
from __future__ import annotations

from .base import IGNORE_INDEX, DataFileError, SegDataset
from .benchmarks import BENCHMARKS
from .digits import DigitsDataset
from .folder import FolderDataset, folder as _folder  # keeps ccl_bench.data.folder the module
from .transforms import IMAGENET_MEAN, IMAGENET_STD, SegTransform

# name -> (constructor, default crop size for training)
LOADERS = {**BENCHMARKS, "folder": (_folder, 512)}
DATASETS = ("digits",) + tuple(LOADERS)


def build_dataset(name: str, split: str, root=None, *, augment: bool | None = None,
                  crop_size: int | tuple[int, int] | None = None, scale_range: tuple[float, float] = (0.5, 2.0),
                  flip: bool | None = None, photometric: bool = True, resize: int | tuple[int, int] | None = None,
                  normalize: bool = True, **options) -> SegDataset:
    """Build a dataset by name.

    Augmentation (random scale, crop with ignore padding, flip, photometric) is on for ``split="train"``
    of the benchmarks and ``folder`` unless ``augment=False``; ``crop_size`` defaults to the usual size per
    benchmark (VOC/ADE20K 512, Cityscapes 768, CamVid 360; ``folder`` 512). ``digits`` is not augmented by
    default (``augment=True`` uses a crop of its own size and no flip: mirrored digits are not digits).
    Evaluation items keep their full resolution unless ``resize=(h, w)``. ``normalize`` applies ImageNet
    mean/std.

    Other options go to the dataset: ``digits``: ``size`` (64 or 128), ``num_images``, ``seed``,
    ``cache_dir``; ``cityscapes``: ``label_type`` (``"labelIds"`` or ``"labelTrainIds"``); ``folder``:
    ``class_names``, ``ignore_index``, ``palette``, ``ignore_color`` (else read from ``<root>/classes.yaml``).
    """
    if name not in DATASETS:
        raise ValueError(f"name={name!r}: expected one of {list(DATASETS)}")
    is_digits = name == "digits"
    if augment is None:
        augment = split == "train" and not is_digits
    if crop_size is None and augment:
        crop_size = options.get("size", 128) if is_digits else LOADERS[name][1]
    transform = SegTransform(augment=augment, crop_size=crop_size, scale_range=tuple(scale_range),
                             flip=(not is_digits) if flip is None else flip, photometric=photometric,
                             mean=IMAGENET_MEAN if normalize else None, std=IMAGENET_STD if normalize else None,
                             resize=resize, ignore_index=IGNORE_INDEX)
    if is_digits:
        return DigitsDataset(split, transform=transform, **options)
    return LOADERS[name][0](split, root, transform=transform, **options)


def dataset_options(name: str):
    """``({option: (annotation, default)}, open_ended)``: what ``build_dataset(name, split, root, **options)``
    accepts, read from the signatures of build_dataset and of the dataset's constructor (the arguments the
    config fills itself, split and root, are not options)."""
    from ..config.options import signature_options

    constructor = DigitsDataset.__init__ if name == "digits" else LOADERS[name][0]
    return signature_options([(build_dataset, ("name", "split", "root")),
                              (constructor, ("split", "root", "transform"))])


__all__ = ["build_dataset", "dataset_options", "DATASETS", "SegDataset", "SegTransform", "DigitsDataset",
           "FolderDataset", "DataFileError", "IGNORE_INDEX"]
