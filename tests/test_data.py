"""Datasets: the embedded digits set, fixture trees in each benchmark's exact layout, augmentations, errors."""
import multiprocessing as mp
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ccl_bench.data import build_dataset
from ccl_bench.data.digits import build_digits, compose_canvas, compose_photo, load_mnist, split_digits
from voc_tree import check_items

# ---------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("digits-cache"))


def small_digits(split, cache, **kw):
    return build_dataset("digits", split, size=64, num_images=24, cache_dir=cache, normalize=False, **kw)


def test_digits_items_and_metadata(digits_cache):
    ds = small_digits("train", digits_cache)
    assert len(ds) == 24 and ds.num_classes == 11 and ds.ignore_index == 255
    assert ds.class_names[0] == "background" and ds.class_names[10] == "digit 9"
    image, label = ds[3]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
    assert label.dtype == torch.int64 and label.shape == (64, 64)
    assert 0 <= image.min() and image.max() <= 1
    labels = torch.stack([ds[i][1] for i in range(len(ds))])
    assert labels.min() == 0 and labels.max() <= 10
    assert ((labels > 0).flatten(1).any(1)).all()  # every image shows at least one digit


def test_digits_deterministic_and_cached(tmp_path, monkeypatch):
    a = small_digits("val", str(tmp_path / "one"))
    b = small_digits("val", str(tmp_path / "two"))
    torch.testing.assert_close(a[5], b[5], rtol=0, atol=0)
    monkeypatch.setenv("CCL_BENCH_CACHE", str(tmp_path / "env"))
    c = build_dataset("digits", "val", size=64, num_images=24, seed=1)
    assert c.cache_path.startswith(str(tmp_path / "env"))
    assert not torch.equal(c[5][1], a[5][1])  # another seed, other scenes
    mtime = os.path.getmtime(os.path.join(a.cache_path, "images.npy"))
    again = small_digits("val", str(tmp_path / "one"))
    assert again.cache_path == a.cache_path
    assert os.path.getmtime(os.path.join(a.cache_path, "images.npy")) == mtime  # read, not rebuilt


def test_digit_split_is_item_level_disjoint_and_stratified():
    _, labels = load_mnist()
    assert len(labels) == 5000 and np.bincount(labels).tolist() == [500] * 10
    split = split_digits(labels, seed=0)
    assert len(np.intersect1d(split["train"], split["val"])) == 0
    assert len(split["train"]) + len(split["val"]) == 5000
    assert np.bincount(labels[split["val"]]).tolist() == [100] * 10
    assert not np.array_equal(split["val"], split_digits(labels, seed=1)["val"])


def test_digit_label_is_class_plus_one_where_ink_covers():
    digits, labels = load_mnist()
    k = int(np.flatnonzero(labels == 7)[0])
    background = np.full((80, 80, 3), 200, np.uint8)  # one flat "photo": every deviation is ink
    images, masks = compose_photo(digits[k:k + 1], labels[k:k + 1], [background], 1, 64,
                                  np.random.default_rng(0))
    assert set(np.unique(masks[0]).tolist()) <= {0, 8} and (masks[0] == 8).sum() > 20
    # ink fraction alpha = |pixel - 200| / |colour - 200|; labelled exactly where alpha >= 1/2
    deviation = np.abs(images[0].astype(np.float64) - 200).max(-1)
    alpha = deviation / deviation.max()
    confident = np.abs(alpha - 0.5) > 0.05  # away from the rounding band around the threshold
    np.testing.assert_array_equal((masks[0] == 8)[confident], (alpha >= 0.5)[confident])


def test_canvas_variant_bright_ink_on_darker_ground_one_digit_per_quarter():
    digits, labels = load_mnist()
    photo = np.random.default_rng(1).integers(0, 256, (96, 96, 3)).astype(np.uint8)
    images, masks = compose_canvas(digits[:40], labels[:40], [photo], 20, 64, np.random.default_rng(0))
    assert masks.max() <= 10
    for image, mask in zip(images.astype(np.float64).mean(-1), masks):
        present = [np.unique(q[q > 0]) for q in (mask[:32, :32], mask[:32, 32:], mask[32:, :32], mask[32:, 32:])]
        assert sum(len(p) > 0 for p in present) >= 1  # at least one digit
        assert image[mask > 0].mean() > image[mask == 0].mean() + 40  # one polarity: bright ink


@pytest.mark.parametrize("variant", ["canvas", "photo"])
def test_digits_variants_are_cached_apart(variant, digits_cache):
    ds = small_digits("val", digits_cache, variant=variant)
    assert ds.variant == variant and f"digits-{variant}-" in ds.cache_path
    with pytest.raises(ValueError, match="variant='grid'"):
        small_digits("val", digits_cache, variant="grid")


def _build_in_process(cache):
    return build_digits("val", 64, 16, 3, cache)


def test_concurrent_builders_share_one_cache_entry(tmp_path):
    with mp.get_context("fork").Pool(2) as pool:
        paths = pool.map(_build_in_process, [str(tmp_path)] * 2)
    assert paths[0] == paths[1]
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(paths[0])]  # no temp dir left behind
    assert np.load(os.path.join(paths[0], "labels.npy")).shape == (16, 64, 64)


@pytest.mark.parametrize("option,value", [("size", 100), ("num_images", 0)])
def test_digits_bad_options(option, value, digits_cache):
    with pytest.raises(ValueError, match=f"{option}={value}"):
        build_dataset("digits", "train", cache_dir=digits_cache, **{option: value})
    with pytest.raises(ValueError, match="split='test'"):
        build_dataset("digits", "test", cache_dir=digits_cache)


def test_loader_with_workers(digits_cache):
    ds = small_digits("train", digits_cache, augment=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, shuffle=True)
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 64, 64) and labels.shape == (8, 64, 64) and labels.dtype == torch.int64
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned worker receives: a re-opened memory map
    assert len(pickle.dumps(ds)) < 10_000 and isinstance(clone.images, np.memmap)
    np.testing.assert_array_equal(clone.labels[2], ds.labels[2])


# ------------------------------------------------------------------------------- fixture trees (writers)

H, W = 12, 16


def write_rgb(path, seed, ext):
    """A smooth image (survives JPEG) — returned as the float values the loader should produce."""
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([yy * 10 + seed * 20, xx * 8, np.full_like(xx, 90 + seed * 10)], -1).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rgb).save(path, quality=100, subsampling=0) if ext == "jpg" else Image.fromarray(rgb).save(path)
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255


def write_label(path, values, palette=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(np.asarray(values, np.uint8), mode="L")
    if palette:
        im = im.convert("P")  # identity mapping of indices ...
        im.putpalette([(i * 37) % 256 for i in range(768)])  # ... with an arbitrary colour table
    im.save(path)


def raw_grid(values, seed):
    """An H x W label using the given raw values in a seeded pattern (each value appears)."""
    rng = np.random.default_rng(seed)
    grid = rng.choice(np.asarray(values), size=(H, W))
    grid.flat[: len(values)] = values
    return grid


# ------------------------------------------------------------------------------------------- VOC


def make_voc(root, aug=False):
    base = root / "VOCdevkit" / "VOC2012"
    expected = {"train": [], "val": []}
    raw_values = list(range(21)) + [255]
    for split, ids in (("train", ["2007_000032", "2007_000039"]), ("val", ["2007_000033"])):
        for n, i in enumerate(ids):
            image = write_rgb(str(base / "JPEGImages" / f"{i}.jpg"), n, "jpg")
            raw = raw_grid(raw_values, hash(i) % 1000)
            write_label(str(base / ("SegmentationClassAug" if aug else "SegmentationClass") / f"{i}.png"), raw,
                        palette=not aug)
            expected[split].append((image, raw))  # VOC: raw index = class id, 255 = boundary/ignore
        lines = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" if aug and split == "train" else i
                 for i in ids]
        name = "train_aug" if aug and split == "train" else split
        os.makedirs(base / "ImageSets" / "Segmentation", exist_ok=True)
        (base / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return expected


@pytest.mark.parametrize("aug", [False, True])
def test_voc_layouts_decode_pixel_by_pixel(tmp_path, aug):
    expected = make_voc(tmp_path, aug)
    name = "voc_aug" if aug else "voc"
    for split in ("train", "val"):
        ds = build_dataset(name, split, root=tmp_path, augment=False, normalize=False)
        assert ds.num_classes == 21 and ds.class_names[15] == "person" and ds.ignore_index == 255
        check_items(ds, expected[split])


def test_voc_palette_png_is_read_as_indices(tmp_path):
    make_voc(tmp_path)
    path = tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000033.png"
    assert Image.open(path).mode == "P"  # the fixture really is palette mode


# ------------------------------------------------------------------------------------ Cityscapes

# cityscapesScripts labels.py: id -> trainId (255 = ignore), ids 0..33
CITYSCAPES_TRAIN_ID = [255, 255, 255, 255, 255, 255, 255, 0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8,
                       9, 10, 11, 12, 13, 14, 15, 255, 255, 16, 17, 18]


@pytest.mark.parametrize("label_type", ["labelIds", "labelTrainIds"])
def test_cityscapes_layout(tmp_path, label_type):
    expected = []
    for n, (city, frame) in enumerate([("aachen", "000000_000019"), ("bochum", "000001_000019")]):
        stem = f"{city}_{frame}"
        image = write_rgb(str(tmp_path / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png"), n, "png")
        ids = raw_grid(list(range(34)), n)
        write_label(str(tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png"), ids)
        train_ids = np.asarray(CITYSCAPES_TRAIN_ID)[ids]
        write_label(str(tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png"), train_ids)
        expected.append((image, train_ids))
    ds = build_dataset("cityscapes", "val", root=tmp_path, label_type=label_type, normalize=False)
    assert ds.num_classes == 19 and ds.class_names[13] == "car"
    check_items(ds, expected)


# ---------------------------------------------------------------------------------------- CamVid


def test_camvid_segnet_layout(tmp_path):
    expected = []
    for n, name in enumerate(["0001TP_006690.png", "Seq05VD_f00000.png"]):
        image = write_rgb(str(tmp_path / "CamVid" / "train" / name), n, "png")
        raw = raw_grid(list(range(12)), n)
        write_label(str(tmp_path / "CamVid" / "trainannot" / name), raw)
        expected.append((image, np.where(raw == 11, 255, raw)))  # 11 = unlabelled -> ignore
    ds = build_dataset("camvid", "train", root=tmp_path, augment=False, normalize=False)
    assert ds.num_classes == 11 and ds.class_names[0] == "sky"
    check_items(ds, expected)


# ---------------------------------------------------------------------------------------- ADE20K


def test_ade20k_reduce_zero_label(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    expected = []
    for n in range(2):
        name = f"ADE_val_0000000{n + 1}"
        image = write_rgb(str(base / "images" / "validation" / f"{name}.jpg"), n, "jpg")
        raw = raw_grid([0, 1, 2, 75, 149, 150], n)
        write_label(str(base / "annotations" / "validation" / f"{name}.png"), raw)
        expected.append((image, np.where(raw == 0, 255, raw - 1)))
    ds = build_dataset("ade20k", "val", root=tmp_path, normalize=False)
    assert ds.num_classes == 150 and ds.class_names[0] == "wall" and ds.class_names[149] == "flag"
    check_items(ds, expected)


# ---------------------------------------------------------------------------------------- errors


def test_missing_root_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)root=.*JPEGImages.*SegmentationClass"):
        build_dataset("voc", "train", root=tmp_path)
    with pytest.raises(ValueError, match=r"(?s)root=None.*leftImg8bit"):
        build_dataset("cityscapes", "train")
    (tmp_path / "leftImg8bit").mkdir()
    with pytest.raises(FileNotFoundError, match="leftImg8bit/train"):
        build_dataset("cityscapes", "train", root=tmp_path)
    with pytest.raises(ValueError, match="name='coco'"):
        build_dataset("coco", "train", root=tmp_path)
    with pytest.raises(ValueError, match="split='test'"):
        build_dataset("ade20k", "test", root=tmp_path)


def test_missing_listed_file_is_named(tmp_path):
    make_voc(tmp_path)
    os.remove(tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000039.png")
    with pytest.raises(FileNotFoundError, match="2007_000039.png"):
        build_dataset("voc", "train", root=tmp_path)


def test_unreadable_image_names_the_file(tmp_path):
    make_voc(tmp_path)
    (tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000033.jpg").write_bytes(b"\x00garbage")
    ds = build_dataset("voc", "val", root=tmp_path)
    with pytest.raises(OSError, match="2007_000033.jpg"):
        ds[0]


@pytest.mark.parametrize("value", [21, 254])
def test_unexpected_label_value_is_an_error(tmp_path, value):
    make_voc(tmp_path)
    bad = raw_grid([0, 1, value], 0)
    write_label(str(tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000033.png"), bad, True)
    ds = build_dataset("voc", "val", root=tmp_path)
    with pytest.raises(ValueError, match=rf"2007_000033.png.*\[{value}\]"):
        ds[0]


def test_colour_label_png_is_rejected(tmp_path):
    make_voc(tmp_path)
    path = tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000033.png"
    Image.open(path).convert("RGB").save(path)
    with pytest.raises(ValueError, match="mode 'RGB'"):
        build_dataset("voc", "val", root=tmp_path)[0]


# ------------------------------------------------------------------------------------ augmentation


def _coded_tree(tmp_path, size=(40, 56)):
    """CamVid tree whose image red channel encodes the label: red = 20 * label (exact in PNG)."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 11, size=(size[0] // 8, size[1] // 8))
    label = np.kron(blocks, np.ones((8, 8), np.int64))
    rgb = np.stack([label * 20, np.full_like(label, 50), np.full_like(label, 90)], -1).astype(np.uint8)
    for split in ("train",):
        os.makedirs(tmp_path / split, exist_ok=True)
        Image.fromarray(rgb).save(tmp_path / split / "a.png")
        write_label(str(tmp_path / f"{split}annot" / "a.png"), label)
    return label


def test_crop_and_flip_keep_image_and_label_aligned(tmp_path):
    _coded_tree(tmp_path)
    ds = build_dataset("camvid", "train", root=tmp_path, crop_size=32, scale_range=(1, 1), photometric=False,
                       normalize=False)
    torch.manual_seed(0)
    for _ in range(10):
        image, label = ds[0]
        assert image.shape == (3, 32, 32) and label.shape == (32, 32)
        torch.testing.assert_close(image[0], label.float() * 20 / 255, rtol=0, atol=1e-6)


def test_scale_pads_with_ignore_and_keeps_alignment(tmp_path):
    _coded_tree(tmp_path)
    ds = build_dataset("camvid", "train", root=tmp_path, crop_size=64, scale_range=(0.5, 0.5),
                       photometric=False, normalize=False)
    torch.manual_seed(0)
    image, label = ds[0]
    assert image.shape == (3, 64, 64)
    pad = label == 255
    assert pad.sum() == 64 * 64 - 20 * 28  # the 40x56 image became 20x28; the rest is ignore padding
    torch.testing.assert_close(image[:, pad], torch.zeros(3, int(pad.sum())), rtol=0, atol=0)
    # labels follow the (antialiased) image except near block edges where colours mix
    interior = ~pad & (image[0] * 255 / 20 - label.float()).abs().lt(0.3)
    assert interior.sum() > 0.5 * (~pad).sum()
    big = build_dataset("camvid", "train", root=tmp_path, crop_size=24, scale_range=(2, 2))
    assert big[0][0].shape == (3, 24, 24) and not (big[0][1] == 255).any()


def test_photometric_changes_image_not_label(tmp_path):
    label = _coded_tree(tmp_path)
    ds = build_dataset("camvid", "train", root=tmp_path, crop_size=(40, 56), scale_range=(1, 1), flip=False,
                       normalize=False)
    torch.manual_seed(3)
    images = [ds[0] for _ in range(4)]
    for image, lab in images:
        torch.testing.assert_close(lab, torch.from_numpy(label), rtol=0, atol=0)
    assert any(not torch.allclose(images[0][0], im) for im, _ in images[1:])
