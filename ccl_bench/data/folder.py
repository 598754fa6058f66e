"""``folder``: any folder of images and masks paired by file stem (``--set data.dataset=folder data.root=DIR``).

Masks in palette ('P') or grayscale ('L') mode hold class ids; RGB(A) masks are read through a palette of one
colour per class. The raw ignore value (or ``ignore_color``) becomes the engine's ignore index 255; any other
value or colour the classes do not define is an error naming the file.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import yaml
from PIL import Image

from .base import (IGNORE_INDEX, LABEL_MODES, DataFileError, FileSegDataset, _header, _one_line, _size_message,
                   apply_lut, read_image)
from .transforms import SegTransform

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
COLOUR_MODES = ("RGB", "RGBA")
CLASSES_KEYS = ("names", "ignore_index", "palette", "ignore_color")
FULL_CHECK_LIMIT = 1000  # check_files decodes every mask (label values) for splits up to this many items
FOLDER_LAYOUT = """<root>/
  images/<stem>.{jpg,jpeg,png,bmp,tif,tiff}   or images/<split>/<stem>.*
  masks/<stem>.png                            or masks/<split>/<stem>.png
  <split>.txt      one stem per line (# comments); without it, the <split>/ sub-folders above are the split
  classes.yaml     names: [...]; optional ignore_index: 255 (raw "no label" value), palette: [[r, g, b], ...]
                   (one colour per class, for RGB masks), ignore_color: [r, g, b]; or the options class_names,
                   ignore_index, palette, ignore_color (they win over the file)
masks: 'P' or 'L' PNG of class ids 0..N-1 (+ ignore_index), or RGB PNG of palette colours"""


class FolderDataset(FileSegDataset):
    """Image/mask pairs; index masks through a lookup table, colour masks through the palette."""

    name = "folder"

    def __init__(self, split: str, pairs, class_names, lut: np.ndarray, colours: dict[tuple, int] | None,
                 transform: SegTransform | None = None):
        super().__init__(split, pairs, class_names, lut, transform)
        self.colours = colours  # (r, g, b) -> id (255 for the ignore colour); None: index masks only
        if colours:
            codes = np.array([(r << 16) | (g << 8) | b for r, g, b in colours], np.int64)
            order = np.argsort(codes)
            self._codes, self._ids = codes[order], np.array(list(colours.values()), np.int64)[order]

    def _mode_error(self, path: str, mode: str) -> DataFileError:
        expected = "a PNG of class ids in palette ('P') or grayscale ('L') mode"
        if self.colours:
            expected += " or an RGB PNG of palette colours"
        elif mode in COLOUR_MODES:
            expected += "; an RGB mask needs a palette (palette: [[r, g, b], ...] in classes.yaml or the option)"
        return DataFileError(f"mask {path!r} has PIL mode {mode!r}; expected {expected}")

    def read_mask(self, path: str) -> np.ndarray:
        """Class ids int64 (H, W) with 255 for ignore; a value or colour the classes do not define is an error."""
        try:
            with Image.open(path) as im:
                mode = im.mode
                if mode in LABEL_MODES:
                    raw = np.asarray(im)
                elif mode in COLOUR_MODES and self.colours:
                    raw = np.asarray(im.convert("RGB"))
                else:
                    raw = None
        except Exception as exc:
            raise DataFileError(f"cannot read mask {path!r}: {_one_line(exc)}") from exc
        if raw is None:
            raise self._mode_error(path, mode)
        if raw.ndim == 2:
            return apply_lut(raw, self.lut, path)
        codes = (raw[..., 0].astype(np.int64) << 16) | (raw[..., 1].astype(np.int64) << 8) | raw[..., 2]
        pos = np.searchsorted(self._codes, codes).clip(max=len(self._codes) - 1)
        unknown = self._codes[pos] != codes
        if unknown.any():
            y, x = (int(v[0]) for v in np.nonzero(unknown))
            has_ignore = IGNORE_INDEX in self.colours.values()
            raise DataFileError(f"mask {path!r} has colour {list(map(int, raw[y, x]))} at (row {y}, column {x}) "
                                f"that is not in the palette; expected one of its {self.num_classes} class colours"
                                + (" or ignore_color" if has_ignore else " (or set ignore_color: [r, g, b] for "
                                   "unlabelled pixels)"))
        return self._ids[pos]

    def load(self, index: int):
        image_path, mask_path = self.pairs[index]
        image, label = read_image(image_path), self.read_mask(mask_path)
        if image.shape[:2] != label.shape:
            raise DataFileError(_size_message(image_path, image.shape[1::-1], mask_path, label.shape[::-1]))
        return image, label

    def check_files(self) -> None:
        """Every file's header (unreadable, size mismatch, mask mode); for splits of at most FULL_CHECK_LIMIT
        items also every mask's values (decoded in full), else those are checked when an item is loaded."""
        modes = LABEL_MODES + (COLOUR_MODES if self.colours else ())
        for image_path, mask_path in self.pairs:
            image_size, _ = _header(image_path, "image")
            mask_size, mode = _header(mask_path, "mask")
            if mode not in modes:
                raise self._mode_error(mask_path, mode)
            if image_size != mask_size:
                raise DataFileError(_size_message(image_path, image_size, mask_path, mask_size))
        if len(self.pairs) <= FULL_CHECK_LIMIT:
            for _, mask_path in self.pairs:
                self.read_mask(mask_path)


def _colour(value, what: str) -> tuple[int, int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)):
        raise ValueError(f"{what}={value!r}: expected [r, g, b] with integers 0-255")
    return tuple(value)


def _read_classes(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            spec = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read {path!r}: {_one_line(exc)}") from None
    if not isinstance(spec, dict) or set(spec) - set(CLASSES_KEYS):
        raise ValueError(f"{path!r}: expected a mapping with the keys {', '.join(CLASSES_KEYS)} (names required), "
                         f"got {spec if not isinstance(spec, dict) else sorted(set(spec) - set(CLASSES_KEYS))!r}")
    return spec


def _split_pairs(root: str, split: str) -> list[tuple[str, str]]:
    list_file = os.path.join(root, split + ".txt")
    if os.path.isfile(list_file):
        image_dir, mask_dir = os.path.join(root, "images"), os.path.join(root, "masks")
        with open(list_file) as f:
            stems = [line.split("#")[0].strip() for line in f]
        stems = [s for s in stems if s]
        if not stems:
            raise ValueError(f"split list {list_file!r} names no stems; expected one image stem per line")
    else:
        image_dir, mask_dir = os.path.join(root, "images", split), os.path.join(root, "masks", split)
        if not (os.path.isdir(image_dir) and os.path.isdir(mask_dir)):
            raise FileNotFoundError(f"root={root!r}: split {split!r} has neither a list file {list_file!r} nor "
                                    f"the folders {image_dir!r} and {mask_dir!r}; expected layout:\n{FOLDER_LAYOUT}")
        stems = None
    images, masks = _index(image_dir, IMAGE_EXTS, "images"), _index(mask_dir, (".png",), "masks")
    if stems is None:
        stems = sorted(set(images) | set(masks))
        if not stems:
            raise FileNotFoundError(f"split {split!r}: {image_dir!r} and {mask_dir!r} hold no images and masks")
    for stem in stems:
        if stem not in images:
            of = f"mask {masks[stem]!r}" if stem in masks else f"{stem!r} listed in {list_file!r}"
            raise FileNotFoundError(f"split {split!r}: no image {os.path.join(image_dir, stem)}"
                                    f".{{{','.join(e[1:] for e in IMAGE_EXTS)}}} for the {of}")
        if stem not in masks:
            raise FileNotFoundError(f"split {split!r}: image {images[stem]!r} has no mask "
                                    f"{os.path.join(mask_dir, stem + '.png')!r}")
    return [(images[s], masks[s]) for s in stems]


def _index(folder: str, exts: tuple[str, ...], what: str) -> dict[str, str]:
    """stem -> path of the files in ``folder`` ending in one of ``exts`` (any case); two files of a stem is an
    error."""
    out: dict[str, str] = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        stem, ext = os.path.splitext(name)
        path = os.path.join(folder, name)
        if ext.lower() in exts and os.path.isfile(path):
            if stem in out:
                raise ValueError(f"{what} {out[stem]!r} and {path!r} share the stem {stem!r}; expected one per stem")
            out[stem] = path
    return out


def folder(split: str, root=None, class_names: Sequence[str] | None = None, ignore_index: int | None = None,
           palette: Sequence[tuple[int, int, int]] | None = None, ignore_color: tuple[int, int, int] | None = None,
           transform: SegTransform | None = None) -> FolderDataset:
    """A folder of ``images/`` and ``masks/`` (layout: FOLDER_LAYOUT). Classes from the options, else from
    ``<root>/classes.yaml``; ``ignore_index`` is the raw mask value that means "no label" (default 255)."""
    if root is None:
        raise ValueError(f"root=None: dataset 'folder' needs its folder (--set data.root=DIR); expected layout:\n"
                         f"{FOLDER_LAYOUT}")
    root = os.fspath(root)
    if not os.path.isdir(os.path.join(root, "images")):
        raise FileNotFoundError(f"root={root!r}: no 'images' directory for dataset 'folder'; expected layout:\n"
                                f"{FOLDER_LAYOUT}")
    classes_file = os.path.join(root, "classes.yaml")
    spec = _read_classes(classes_file)

    def pick(option, name: str, key: str, default=None):  # an option wins over classes.yaml
        return (option, name) if option is not None else (spec.get(key, default), f"{classes_file}: {key}")

    names, where = pick(class_names, "class_names", "names")
    if names is None:
        raise ValueError(f"dataset 'folder' has no class names: write {classes_file!r} with names: [...] or set "
                         "data.options.class_names=[...] (one name per class id 0..N-1)")
    if not (isinstance(names, (list, tuple)) and 1 <= len(names) <= 255 and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{where}={names!r}: expected a list of 1 to 255 class names (strings)")
    ignore, where = pick(ignore_index, "ignore_index", "ignore_index", IGNORE_INDEX)
    if not (isinstance(ignore, int) and not isinstance(ignore, bool) and len(names) <= ignore <= 255):
        raise ValueError(f"{where}={ignore!r}: expected the raw mask value meaning 'no label', an integer in "
                         f"{len(names)}-255 (0-{len(names) - 1} are the class ids)")
    lut = np.full(256, -1, dtype=np.int64)
    lut[:len(names)] = np.arange(len(names))
    lut[ignore] = IGNORE_INDEX
    colours, where = pick(palette, "palette", "palette")
    ignore_c, ignore_where = pick(ignore_color, "ignore_color", "ignore_color")
    if colours is not None:
        if not isinstance(colours, (list, tuple)) or len(colours) != len(names):
            raise ValueError(f"{where}={colours!r}: expected one [r, g, b] per class ({len(names)} classes)")
        colours = {_colour(c, where): i for i, c in enumerate(colours)}
        if len(colours) != len(names):
            raise ValueError(f"{where}: two classes share a colour; expected {len(names)} distinct colours")
    if ignore_c is not None:
        ignore_c = _colour(ignore_c, ignore_where)
        if colours is None or ignore_c in colours:
            raise ValueError(f"{ignore_where}={list(ignore_c)}: expected a colour of its own beside a palette "
                             "(it is the colour of unlabelled pixels in RGB masks)")
        colours[ignore_c] = IGNORE_INDEX
    return FolderDataset(split, _split_pairs(root, split), names, lut, colours, transform)
