"""The ccl losses in your own training loop: two timm students (a CNN and a ViT), no ccl_bench.

    python examples/own_loop.py --method ccl --steps 20     # CE + pixel-wise BSD + region-wise BSD
    python examples/own_loop.py --method dml --steps 20     # CE + DML's mutual KL (from `baselines`)

Random images and labels stand in for your data loader; replace `batches()` with yours.
"""
import argparse

import timm
import torch
import torch.nn.functional as F
from torch import nn

from baselines import mutual_kl
from ccl_ops import PixelBSDLoss, RegionBSDLoss

NUM_CLASSES, IGNORE = 5, 255


class Student(nn.Module):
    """A timm encoder with a 1x1 classifier on its last feature map; returns (logits, last feature)."""

    def __init__(self, backbone: str):
        super().__init__()
        self.encoder = timm.create_model(backbone, pretrained=False, features_only=True)
        self.channels = self.encoder.feature_info.channels()[-1]
        self.head = nn.Conv2d(self.channels, NUM_CLASSES, kernel_size=1)

    def forward(self, x):
        feature = self.encoder(x)[-1]
        return self.head(feature), feature


def batches(n=4, size=64):
    while True:
        y = torch.randint(0, NUM_CLASSES, (n, size, size))
        y[:, :4] = IGNORE  # a few unlabelled rows, as real masks have
        yield torch.randn(n, 3, size, size), y


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("ccl", "dml"), default="ccl")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    cnn, vit = Student("resnet18"), Student("pvt_v2_b0")
    pixel_bsd = PixelBSDLoss(temperature=1.0, rule="correct", ignore_index=IGNORE)
    # regions of 32 px on 64 px labels: a 2x2 region grid, not finer than the 2x2 feature grid (METHOD.md §3)
    region_bsd = RegionBSDLoss(cnn.channels, vit.channels, dim=64, region=(32, 32), ignore_index=IGNORE)
    params = [*cnn.parameters(), *vit.parameters(), *region_bsd.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for step, (x, y) in zip(range(1, args.steps + 1), batches()):
        (za, ga), (zb, gb) = cnn(x), vit(x)
        za, zb = (F.interpolate(z, size=y.shape[-2:], mode="bilinear", align_corners=False) for z in (za, zb))
        ce = F.cross_entropy(za, y, ignore_index=IGNORE) + F.cross_entropy(zb, y, ignore_index=IGNORE)
        if args.method == "ccl":
            distill = pixel_bsd(za, zb, y).total + region_bsd(ga, gb, za, zb, y).loss
        else:
            distill = mutual_kl(za, zb, y, ignore_index=IGNORE).total
        loss = ce + distill
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f} (CE {ce.item():.4f}, {args.method} {distill.item():.4f})")


if __name__ == "__main__":
    main()
