"""Students: shapes, stage split vs timm, HFD stage borrowing for every backbone pair, checkpoints, errors."""
import itertools

import pytest
import timm
import torch
import torch.nn.functional as F

from ccl_bench.models import (CNN_BACKBONES, DEFAULT_CNN, DEFAULT_VIT, VIT_BACKBONES, build_student, run_stage,
                              split_stages)

NUM_CLASSES = 5
_CACHE = {}


def student(name, **options):
    """Built once per test session (from scratch, eval mode) — construction dominates the test time."""
    key = (name, tuple(sorted(options.items())))
    if key not in _CACHE:
        torch.manual_seed(0)
        _CACHE[key] = build_student(name, NUM_CLASSES, **options).eval()
    return _CACHE[key]


ALL_STUDENTS = [f"deeplabv3plus_{b}" for b in CNN_BACKBONES] + [f"segformer_{b}" for b in VIT_BACKBONES]


@pytest.mark.parametrize("name", ALL_STUDENTS)
def test_logits_at_input_resolution_and_stage_contract(name):
    model = student(name)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
    assert logits.shape == (2, NUM_CLASSES, 64, 96)
    assert len(feats) == len(model.stages) == 4
    for f, c, s in zip(feats, model.stage_channels, model.stage_strides):
        assert f.shape == (2, c, 64 // s, 96 // s)
    assert model.stage_strides[0] == 4  # stage 1 = first stride-4 feature, for both students
    assert model.last_feature(feats) is feats[-1] and model.last_channels == feats[-1].shape[1]
    torch.testing.assert_close(model.decode(feats, (64, 96)), logits)


@pytest.mark.parametrize("backbone", CNN_BACKBONES + VIT_BACKBONES)
def test_stages_reproduce_timm_features(backbone):
    net = timm.create_model(backbone).eval()
    stages, channels, strides = split_stages(net)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = net.forward_intermediates(x, indices=4, intermediates_only=True)[-4:]
        out = x
        for stage, r in zip(stages, ref):
            out = stage(out)
            torch.testing.assert_close(out, r, rtol=0, atol=0)
    assert channels == [r.shape[1] for r in ref]
    assert strides == [64 // r.shape[-1] for r in ref]


def test_output_stride_8_dilates_the_last_stages():
    model = student(DEFAULT_CNN, output_stride=8)
    assert model.stage_strides == [4, 8, 8, 8]
    with torch.no_grad():
        feats = model.encode(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 8, 8]
    with pytest.raises(ValueError, match="output_stride=4"):
        build_student(DEFAULT_CNN, NUM_CLASSES, output_stride=4)


def _hfd_pair(a, b, fa, fb):
    """METHOD.md §4 with 1x1-conv + resize Gammas; returns the two borrowed-stage outputs and targets."""
    gamma_a1 = torch.nn.Conv2d(a.stage_channels[0], b.stage_channels[0], 1)
    gamma_b1 = torch.nn.Conv2d(b.stage_channels[0], a.stage_channels[0], 1)
    vb2 = run_stage(b, 1, F.interpolate(gamma_a1(fa[0]), size=fb[0].shape[-2:], mode="bilinear"), frozen=True)
    va2 = run_stage(a, 1, F.interpolate(gamma_b1(fb[0]), size=fa[0].shape[-2:], mode="bilinear"), frozen=True)
    return vb2, fb[1], va2, fa[1], (gamma_a1, gamma_b1)


@pytest.mark.parametrize("cnn,vit", list(itertools.product(CNN_BACKBONES, VIT_BACKBONES)))
def test_hfd_shapes_line_up_for_every_pair(cnn, vit):
    a, b = student(f"deeplabv3plus_{cnn}"), student(f"segformer_{vit}")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        vb2, fb2, va2, fa2, _ = _hfd_pair(a, b, a.encode(x), b.encode(x))
    assert vb2.shape == fb2.shape
    assert va2.shape == fa2.shape


def test_hfd_borrowed_stage_is_frozen_but_passes_gradients():
    a, b = build_student(DEFAULT_CNN, NUM_CLASSES), build_student(DEFAULT_VIT, NUM_CLASSES)
    a.train(), b.train()
    x = torch.randn(2, 3, 64, 64)
    fa, fb = a.encode(x), b.encode(x)  # the students' own forward updates their BN statistics ...
    bn = a.stages[1][0][0].bn1  # a BatchNorm inside the CNN's stage 2 (layer2, block 0)
    stats_before = bn.running_mean.clone()
    vb2, fb2, va2, fa2, gammas = _hfd_pair(a, b, fa, fb)  # ... the borrowed stage must not
    loss = F.mse_loss(vb2, fb2.detach()) + F.mse_loss(va2, fa2.detach())
    loss.backward()
    for gamma in gammas:
        assert gamma.weight.grad is not None and gamma.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in a.stages[1].parameters())  # borrowed stages: no gradient
    assert all(p.grad is None for p in b.stages[1].parameters())
    assert a.stages[0][0].weight.grad.abs().sum() > 0  # source stage 1 learns
    torch.testing.assert_close(bn.running_mean, stats_before, rtol=0, atol=0)  # borrowed BN stats untouched
    out = run_stage(a, 1, torch.randn(1, a.stage_channels[0], 8, 8, requires_grad=True))  # not frozen
    out.sum().backward()
    assert a.stages[1][0][0].conv1.weight.grad is not None
    with pytest.raises(ValueError, match="expects"):
        run_stage(a, 1, torch.randn(1, 7, 8, 8))


@pytest.mark.parametrize("name", [DEFAULT_CNN, DEFAULT_VIT])
def test_every_parameter_gets_a_gradient(name):
    model = build_student(name, NUM_CLASSES).train()
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, NUM_CLASSES, (2, 64, 64))
    F.cross_entropy(model(x), y).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused


def test_student_checkpoint_roundtrip_and_mismatch(tmp_path):
    a = build_student(DEFAULT_CNN, NUM_CLASSES).eval()
    path = tmp_path / "a.pt"
    torch.save({"state_dict": a.state_dict()}, path)
    b = build_student(DEFAULT_CNN, NUM_CLASSES, checkpoint=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x))
    with pytest.raises(ValueError, match=r"a\.pt.*does not match"):
        build_student("deeplabv3plus_mobilenetv2_100", NUM_CLASSES, checkpoint=str(path))
    with pytest.raises(ValueError, match="shape mismatch"):
        build_student(DEFAULT_CNN, NUM_CLASSES + 1, checkpoint=str(path))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        build_student(DEFAULT_CNN, NUM_CLASSES, checkpoint=str(garbage))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_student(DEFAULT_CNN, NUM_CLASSES, checkpoint=str(tmp_path / "missing.pt"))


def test_backbone_checkpoint_in_timm_format(tmp_path):
    torch.manual_seed(1)
    net = timm.create_model("pvt_v2_b0")  # an ImageNet-style state dict, classifier head included
    path = tmp_path / "pvt.pth"
    torch.save(net.state_dict(), path)
    model = build_student(DEFAULT_VIT, NUM_CLASSES, backbone_checkpoint=str(path))
    torch.testing.assert_close(model.stages[0][0].proj.weight, net.patch_embed.proj.weight)
    torch.testing.assert_close(model.stages[3][0].norm.weight, net.stages[3].norm.weight)
    with pytest.raises(ValueError, match="backbone_checkpoint.*pvt.pth.*does not match"):
        build_student(DEFAULT_CNN, NUM_CLASSES, backbone_checkpoint=str(path))


def test_pretrained_failure_points_to_local_checkpoint(monkeypatch):
    def offline(*args, pretrained=False, **kwargs):  # never touch the network in tests
        if pretrained:
            raise OSError("no network")
        return real(*args, **kwargs)
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="backbone='resnet18'.*backbone_checkpoint"):
        build_student(DEFAULT_CNN, NUM_CLASSES, pretrained=True)


@pytest.mark.parametrize("name,match", [("unet_resnet18", "name='unet_resnet18'"),
                                        ("deeplabv3plus", "name='deeplabv3plus'"),
                                        ("segformer_not_a_model", "backbone='not_a_model'")])
def test_bad_names(name, match):
    with pytest.raises(ValueError, match=match):
        build_student(name, NUM_CLASSES)
