"""The ``folder`` dataset: any folder of images and masks (list-file or sub-folder splits, index or palette
masks, classes from classes.yaml or options), its one-line errors naming the file, and a 2-step training on it."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ccl_bench.config import ConfigError, load_config
from ccl_bench.data import DataFileError, build_dataset
from ccl_bench.data import folder as folder_module
from tiny_config import TINY_FILE
from voc_tree import check_items

warnings.filterwarnings("ignore", message="ccl_ops: no compiled kernel")

NAMES = ["background", "cat", "dog"]
PALETTE = [[0, 0, 0], [200, 0, 0], [0, 0, 200]]
IGNORE_COLOR = [255, 255, 255]
SPLITS = {"train": ["a", "b"], "val": ["c"]}


def write_image(path, seed, size=16):
    """A smooth RGB image (PNG: exact), returned as the [0, 1] tensor the loader should produce."""
    yy, xx = np.mgrid[0:size, 0:size]
    rgb = np.stack([yy * 9 + seed * 30, xx * 7, np.full_like(xx, 60 + seed * 40)], -1).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rgb).save(path)
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255


def write_mask(path, raw, mode):
    """``raw``: (H, W) values; mode 'L' or 'P' writes them as indices, 'RGB' as palette colours (the raw
    ignore value as IGNORE_COLOR)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if mode == "RGB":
        table = np.array(PALETTE + [IGNORE_COLOR] * (256 - len(PALETTE)), np.uint8)
        Image.fromarray(table[raw]).save(path)
        return
    im = Image.fromarray(raw.astype(np.uint8), mode="L")
    if mode == "P":
        im = im.convert("P")
        im.putpalette([(i * 37) % 256 for i in range(768)])
    im.save(path)


def make_tree(root, layout="list", mode="L", raw_ignore=255, size=16, splits=SPLITS, classes=None):
    """Write a folder dataset; return {split: [(image tensor, expected label)]}. ``classes``: classes.yaml's
    content (None: no file)."""
    expected = {}
    for split, stems in splits.items():
        sub = "" if layout == "list" else split
        expected[split] = []
        for n, stem in enumerate(stems):
            seed = sum(map(ord, stem)) % 5
            image = write_image(os.path.join(root, "images", sub, f"{stem}.png"), seed, size)
            raw = np.random.default_rng(seed).choice([0, 1, 2, raw_ignore], size=(size, size))
            raw.flat[:4] = [0, 1, 2, raw_ignore]
            write_mask(os.path.join(root, "masks", sub, f"{stem}.png"),
                       raw, ("P" if n % 2 else "L") if mode == "index" else mode)
            expected[split].append((image, np.where(raw == raw_ignore, 255, raw)))
        if layout == "list":
            (root / f"{split}.txt").write_text("# my split\n\n" + "\n".join(f"{s}  # item" for s in stems) + "\n")
    if classes is not None:
        (root / "classes.yaml").write_text(yaml.safe_dump(classes))
    return expected


def plain(split, root, **options):
    return build_dataset("folder", split, root, augment=False, normalize=False, **options)


# ------------------------------------------------------------------------------------------- layouts


def test_list_file_splits_index_masks_classes_from_yaml(tmp_path):
    expected = make_tree(tmp_path, "list", "index", raw_ignore=7, classes={"names": NAMES, "ignore_index": 7})
    for split in ("train", "val"):
        ds = plain(split, tmp_path)
        ds.check_files()
        assert ds.num_classes == 3 and ds.class_names == NAMES and ds.ignore_index == 255
        check_items(ds, expected[split], atol=1e-6)  # raw 7 -> 255, 0-2 stay
    assert Image.open(tmp_path / "masks" / "b.png").mode == "P"  # both index modes are exercised


def test_subfolder_splits_palette_masks_classes_from_options(tmp_path):
    expected = make_tree(tmp_path, "subfolders", "RGB", classes={"names": ["x", "y"], "ignore_index": 9})
    options = dict(class_names=NAMES, ignore_index=255, palette=PALETTE, ignore_color=IGNORE_COLOR)
    for split in ("train", "val"):
        ds = plain(split, tmp_path, **options)  # the options win over classes.yaml
        ds.check_files()
        assert ds.class_names == NAMES
        check_items(ds, expected[split], atol=1e-6)


def test_palette_from_yaml_reads_rgb_and_index_masks(tmp_path):
    expected = make_tree(tmp_path, "list", "RGB", classes={"names": NAMES, "palette": PALETTE,
                                                           "ignore_color": IGNORE_COLOR})
    write_mask(str(tmp_path / "masks" / "c.png"), np.asarray(expected["val"][0][1]), "P")  # 'P' = class ids
    check_items(plain("train", tmp_path), expected["train"], atol=1e-6)
    check_items(plain("val", tmp_path), expected["val"], atol=1e-6)


def test_list_file_wins_and_leaves_other_files_out(tmp_path):
    make_tree(tmp_path, "list", classes={"names": NAMES})
    make_tree(tmp_path, "subfolders", splits={"train": ["z"]})
    write_image(str(tmp_path / "images" / "extra.png"), 0)  # in no list
    ds = plain("train", tmp_path)
    assert [os.path.basename(i) for i, _ in ds.pairs] == ["a.png", "b.png"]


def test_train_split_is_augmented_with_the_given_or_default_crop(tmp_path):
    make_tree(tmp_path, classes={"names": NAMES})
    assert build_dataset("folder", "train", tmp_path, crop_size=8)[0][0].shape == (3, 8, 8)
    image, label = build_dataset("folder", "train", tmp_path, scale_range=(1, 1))[1]
    assert image.shape == (3, 512, 512) and (label == 255).sum() == 512 * 512 - (label != 255).sum()
    assert (label != 255).sum() <= 16 * 16
    assert build_dataset("folder", "val", tmp_path)[0][0].shape == (3, 16, 16)  # evaluation: full size


# -------------------------------------------------------------------------------------------- errors


def one_line(exc_info, *parts):
    text = str(exc_info.value)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, (part, text)


def test_missing_mask_is_named(tmp_path):
    make_tree(tmp_path, classes={"names": NAMES})
    os.remove(tmp_path / "masks" / "b.png")
    with pytest.raises(FileNotFoundError) as info:
        plain("train", tmp_path)
    one_line(info, "images/b.png", "masks/b.png")


def test_mask_without_image_is_named(tmp_path):
    make_tree(tmp_path, "subfolders", classes={"names": NAMES})
    os.remove(tmp_path / "images" / "train" / "a.png")
    with pytest.raises(FileNotFoundError) as info:
        plain("train", tmp_path)
    one_line(info, "masks/train/a.png", "images/train/a.{jpg")


def test_listed_stem_without_image_is_named(tmp_path):
    make_tree(tmp_path, classes={"names": NAMES})
    with open(tmp_path / "val.txt", "a") as f:
        f.write("nosuch\n")
    with pytest.raises(FileNotFoundError) as info:
        plain("val", tmp_path)
    one_line(info, "'nosuch'", "val.txt")


def test_size_mismatch_is_named(tmp_path):
    make_tree(tmp_path, classes={"names": NAMES})
    write_mask(str(tmp_path / "masks" / "b.png"), np.zeros((12, 16), np.uint8), "L")
    ds = plain("train", tmp_path)
    for check in (ds.check_files, lambda: ds[1]):
        with pytest.raises(DataFileError) as info:
            check()
        one_line(info, "images/b.png", "masks/b.png", "16x16", "16x12")


def test_unreadable_image_is_named(tmp_path):
    make_tree(tmp_path, classes={"names": NAMES})
    (tmp_path / "images" / "c.png").write_bytes(b"\x00garbage")
    ds = plain("val", tmp_path)
    for check in (ds.check_files, lambda: ds[0]):
        with pytest.raises(DataFileError) as info:
            check()
        one_line(info, "images/c.png")


def test_value_out_of_range_is_named(tmp_path, monkeypatch):
    make_tree(tmp_path, classes={"names": NAMES, "ignore_index": 7})
    write_mask(str(tmp_path / "masks" / "a.png"), np.full((16, 16), 3), "L")  # 3 classes: 3 is undefined
    ds = plain("train", tmp_path)
    with pytest.raises(DataFileError) as info:
        ds.check_files()  # a small split: check_files decodes the masks
    one_line(info, "masks/a.png", "[3]")
    monkeypatch.setattr(folder_module, "FULL_CHECK_LIMIT", 1)
    ds.check_files()  # a larger split: headers only ...
    with pytest.raises(DataFileError) as info:
        ds[0]  # ... and the value when the item is read
    one_line(info, "masks/a.png", "[3]")
    write_mask(str(tmp_path / "masks" / "a.png"), np.full((16, 16), 255), "L")  # 255 is not the ignore value
    with pytest.raises(DataFileError) as info:
        ds[0]
    one_line(info, "masks/a.png", "[255]")


def test_colour_not_in_palette_is_named(tmp_path):
    make_tree(tmp_path, mode="RGB", classes={"names": NAMES, "palette": PALETTE})  # no ignore_color here
    ds = plain("val", tmp_path)
    with pytest.raises(DataFileError) as info:
        ds.check_files()
    one_line(info, "masks/c.png", "[255, 255, 255]", "palette")


def test_rgb_mask_without_palette_is_named(tmp_path):
    make_tree(tmp_path, mode="RGB", classes={"names": NAMES})
    ds = plain("val", tmp_path)
    for check in (ds.check_files, lambda: ds[0]):
        with pytest.raises(DataFileError) as info:
            check()
        one_line(info, "masks/c.png", "mode 'RGB'", "palette")


def test_no_class_names_says_how_to_give_them(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(ValueError) as info:
        plain("train", tmp_path)
    one_line(info, "classes.yaml", "names:", "class_names")
    (tmp_path / "classes.yaml").write_text("names: [a, b]\ncolours: []\n")
    with pytest.raises(ValueError) as info:
        plain("train", tmp_path)
    one_line(info, "classes.yaml", "colours")


@pytest.mark.parametrize("options,parts", [
    (dict(ignore_index=1), ["ignore_index=1", "3-255"]),
    (dict(palette=PALETTE[:2]), ["palette=", "3 classes"]),
    (dict(palette=[[0, 0, 0]] * 3), ["share a colour"]),
    (dict(palette=PALETTE, ignore_color=PALETTE[1]), ["ignore_color=[200, 0, 0]"]),
    (dict(ignore_color=[1, 2, 3]), ["ignore_color=[1, 2, 3]", "palette"]),
    (dict(palette=[[0, 0, 0], [1, 2], [3, 4, 5]]), ["palette=", "[r, g, b]"]),
])
def test_bad_class_options_are_named(tmp_path, options, parts):
    make_tree(tmp_path, classes={"names": NAMES})
    with pytest.raises(ValueError) as info:
        plain("train", tmp_path, **options)
    one_line(info, *parts)


def test_missing_split_names_both_places(tmp_path):
    make_tree(tmp_path, classes={"names": NAMES})
    with pytest.raises(FileNotFoundError, match=r"(?s)test\.txt.*images/test.*masks/test.*expected layout"):
        plain("test", tmp_path)
    with pytest.raises(ValueError, match=r"(?s)root=None.*classes\.yaml"):
        build_dataset("folder", "train")
    with pytest.raises(FileNotFoundError, match=r"(?s)no 'images' directory.*masks/<stem>\.png"):
        build_dataset("folder", "train", tmp_path / "masks")


# ------------------------------------------------------------------------------------ config and training


def test_config_switch_drops_digits_options_and_checks_folder_options(tmp_path):
    base = ["data.dataset=folder", f"data.root={tmp_path}"]
    data = load_config("quick", None, base)["data"]
    assert data["dataset"] == "folder" and data["options"] == {} and data["root"] == str(tmp_path)
    data = load_config("quick", None, base + ["data.options={class_names: [a, b], palette: [[0, 0, 0], [1, 1, 1]]}"])[
        "data"]
    assert data["options"]["class_names"] == ["a", "b"]
    for bad in ("data.options.class_names=cat", "data.options.palette=[[0, 0]]", "data.options.size=64"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config("quick", None, base + [bad])


def test_two_training_steps_on_a_folder(tmp_path):
    from ccl_bench.engine import run_training

    data = tmp_path / "data"
    make_tree(data, "list", "index", size=64, splits={"train": ["a", "b", "c", "d"], "val": ["e", "f"]},
              classes={"names": NAMES})
    config = load_config(None, TINY_FILE, ["data.dataset=folder", f"data.root={data}", "train.iters=2",
                                          "data.train_options={crop_size: 64}", "train.overlays=0"])
    assert config["data"]["train_options"] == {"crop_size": 64}  # the tiny file's digits options are gone
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_training(config, str(tmp_path / "run"), quiet=True)
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dataset"] == "folder" and metrics["complete"] and metrics["step"] == 2
    assert metrics["train_images"] == 4 and metrics["class_names"] == NAMES and len(metrics["iou"]["a"]) == 3
    assert result["step"] == 2 and 0 <= metrics["miou"]["ensemble"] <= 1
