"""Data-loader throughput (images/s) of the embedded digits set and of a VOC-layout tree of JPEGs.

    python benchmarks/bench_loader.py [--batches 40] [--workers 0,2]

The VOC tree is written to a temporary folder from one of scikit-image's bundled photos (500x375 JPEGs,
random palette labels), so the numbers cover JPEG decoding and the joint augmentations of a real benchmark.
"""
import argparse
import os
import tempfile
import time

import numpy as np
import skimage
import torch
from PIL import Image

from ccl_bench.data import build_dataset


def images_per_second(dataset, workers: int, batches: int, batch_size: int = 8) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, drop_last=True)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, _ = next(it)
        seen += x.shape[0]
    return seen / (time.perf_counter() - start)


def write_voc_tree(root: str, count: int = 64) -> None:
    base = os.path.join(root, "VOC2012")
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(base, sub))
    photo = Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", "astronaut.png"))
    photo = photo.convert("RGB").resize((500, 375))
    rng = np.random.default_rng(0)
    ids = [f"img{i:03d}" for i in range(count)]
    for name in ids:
        photo.save(os.path.join(base, "JPEGImages", name + ".jpg"), quality=90)
        blocks = rng.integers(0, 21, (15, 20), dtype=np.uint8).repeat(25, 0).repeat(25, 1)
        Image.fromarray(blocks).convert("P").save(os.path.join(base, "SegmentationClass", name + ".png"))
    with open(os.path.join(base, "ImageSets/Segmentation/train.txt"), "w") as f:
        f.write("\n".join(ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", default="0,2")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    print("| data | workers | images/s |\n| --- | ---: | ---: |")
    digits = build_dataset("digits", "train")
    for w in workers:
        print(f"| digits train 128x128 | {w} | {images_per_second(digits, w, args.batches):.0f} |")
    with tempfile.TemporaryDirectory() as root:
        write_voc_tree(root)
        for crop in (128, 512):
            voc = build_dataset("voc", "train", root=root, crop_size=crop)
            for w in workers:
                print(f"| VOC layout, 500x375 JPEG, train augmentation, crop {crop} | {w} | "
                      f"{images_per_second(voc, w, args.batches):.0f} |")


if __name__ == "__main__":
    main()
