"""The loss modules against their formulas (METHOD.md §1 and §3) on small tensors."""
import pytest
import torch
import torch.nn.functional as F

import ccl_ops
from ccl_ops import reference
from ccl_ops.testing import make_inputs


def test_pixel_bsd_loss_resizes_logits_to_the_labels():
    za, zb, y = make_inputs(0, 2, 5, 16, 12, torch.float32)
    small_a, small_b = za[:, :, ::2, ::2], zb[:, :, ::2, ::2]
    loss = ccl_ops.PixelBSDLoss(temperature=2.0, rule="confidence")
    out = loss(small_a, small_b, y)
    up = [F.interpolate(z, size=(16, 12), mode="bilinear", align_corners=False) for z in (small_a, small_b)]
    ref = reference.pixel_selective_kl(*up, y, temperature=2.0, rule="confidence")
    torch.testing.assert_close(out.total, ref.loss_a + ref.loss_b)
    assert int(out.count_ab) == int(ref.count_ab)


def region_bsd_by_formula(module, ga, gb, za, zb, y):
    """METHOD.md §3 written out in float64 with the module's own projection weights."""
    d = reference.region_direction_mask(za, zb, y, region=module.region, score=module.score).direction
    grid = module.grid or max(ga.shape[-2:], gb.shape[-2:], key=lambda s: s[0] * s[1])

    def project(conv, g):
        p = F.conv2d(g.double(), conv.weight.double(), conv.bias.double())
        return F.interpolate(p, size=grid, mode="bilinear", align_corners=False)

    fa, fb = project(module.proj_a, ga), project(module.proj_b, gb)
    d = F.interpolate(d[:, None].double(), size=grid, mode="nearest")[:, 0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(d.shape[0]):
        for r in range(grid[0]):
            for c in range(grid[1]):
                if d[i, r, c] > 0:
                    total += ((fb[i, :, r, c] - fa[i, :, r, c]) ** 2).sum() / module.dim
                elif d[i, r, c] < 0:
                    total += ((fa[i, :, r, c] - fb[i, :, r, c]) ** 2).sum() / module.dim
    cells = int((d != 0).sum())
    return total / max(cells, 1)


@pytest.mark.parametrize("grid", (None, (5, 4)))
@pytest.mark.parametrize("score", ("ce", "accuracy"))
def test_region_bsd_loss_matches_formula(grid, score):
    torch.manual_seed(0)
    za, zb, y = make_inputs(1, 2, 4, 32, 24, torch.float32)
    ga, gb = torch.randn(2, 8, 4, 3), torch.randn(2, 6, 8, 6)
    module = ccl_ops.RegionBSDLoss(8, 6, dim=5, grid=grid, region=(8, 8), score=score)
    out = module(ga, gb, za, zb, y)
    torch.testing.assert_close(out.loss.double(), region_bsd_by_formula(module, ga, gb, za, zb, y))
    assert out.direction.dtype == torch.int8 and out.direction.shape[-2:] == (grid or (8, 6))


def test_region_bsd_gradient_reaches_only_the_learner():
    za, zb, y = make_inputs(2, 1, 3, 16, 16, torch.float32, ignore_frac=0.0)
    za = F.one_hot(y, 3).permute(0, 3, 1, 2).float() * 10  # A is right everywhere, with low CE
    zb = -za  # B is wrong everywhere: A teaches every region
    ga = torch.randn(1, 4, 4, 4, requires_grad=True)
    gb = torch.randn(1, 4, 4, 4, requires_grad=True)
    module = ccl_ops.RegionBSDLoss(4, 4, dim=3, region=(4, 4))
    out = module(ga, gb, za, zb, y)
    assert (out.direction == 1).all()
    out.loss.backward()
    assert ga.grad.abs().sum() == 0 and module.proj_a.weight.grad.abs().sum() == 0
    assert gb.grad.abs().sum() > 0 and module.proj_b.weight.grad.abs().sum() > 0


def test_region_bsd_loss_is_zero_without_teaching_regions():
    za, _, y = make_inputs(3, 1, 3, 16, 16, torch.float32)
    module = ccl_ops.RegionBSDLoss(4, 4, dim=3)
    out = module(torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), za, za.clone(), y)
    assert out.loss.item() == 0.0 and not out.direction.any()
