"""What makes a comparison fair and a run correct (issue: the positive control): the held-out slice belongs to
the data configuration, a method's own parameters are not clipped with its students', the region grid is not
finer than the feature grid, an all-ignore batch is CE 0, the overlays draw the mask training used, item loading
leaves the CUDA generators alone, the shared distillation ramp-up (METHOD.md §8), the training-set evaluation
and the pairs of students of one family."""
from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import ccl_ops
from ccl_bench.config import ConfigError, load_config
from ccl_bench.engine import Trainer, run_training
from ccl_bench.engine.evaluation import save_overlays
from ccl_bench.engine.optim import clip_student
from ccl_bench.engine.sampling import SeededItems
from ccl_bench.engine.trainer import distill_weight
from ccl_bench.methods import StudentOutput, build_method, method_names
from ccl_bench.models import build_student
from ccl_ops.testing import make_inputs
from tiny_config import tiny_config

warnings.filterwarnings("ignore", message="ccl_ops: no compiled kernel")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(method, *overrides, **direct):
    return tiny_config(*overrides, method=method, **{"train.overlays": 0, **direct})


# -- the held-out slice is the data configuration's --------------------------------------------------------------
def test_kdcl_general_refuses_to_run_without_a_held_out_slice():
    with pytest.raises(ConfigError, match=r"kdcl-general.*data\.holdout=0\.1"):
        tiny("kdcl-general")
    assert tiny("kdcl-general", "data.holdout=0.25")["data"]["holdout"] == 0.25


def test_the_held_out_slice_is_removed_from_every_method_alike():
    trainers = [Trainer(tiny(m, "data.holdout=0.25"), None, quiet=True) for m in ("independent", "kdcl-general")]
    ref, general = trainers
    assert len(ref.train_indices) == 12 and ref.train_indices == general.train_indices
    assert ref.holdout.indices == general.holdout.indices and not set(ref.holdout.indices) & set(ref.train_indices)
    for epoch in (0, 1):
        order = [[i for i, _ in batch] for batch in ref.epoch_loader(epoch, 0).batch_sampler]
        assert order == [[i for i, _ in batch] for batch in general.epoch_loader(epoch, 0).batch_sampler]


# -- a method's own parameters: their own group, outside the students' clipping ----------------------------------
def test_method_parameters_form_their_own_group_at_the_owners_rate():
    trainer = Trainer(tiny("ccl", "optim.vit.method_lr_scale=0.5"), None, quiet=True)
    for key, opt, student, entry in zip(("a", "b"), trainer.optimizers, trainer.students,
                                        trainer.config["students"]):
        own = {id(p) for g in opt.param_groups if not g["method"] for p in g["params"]}
        mine = {id(p) for g in opt.param_groups if g["method"] for p in g["params"]}
        assert own == {id(p) for p in student.parameters()}
        assert mine == {id(p) for p in trainer.method.student_parameters(key)} and mine
        lr = entry["optim"]["lr"]
        scale = 0.5 if key == "b" else 1.0
        assert all(math.isclose(g["initial_lr"], lr * (scale if g["method"] else 1.0)) for g in opt.param_groups)


def test_gradient_clipping_covers_the_students_parameters_only():
    trainer = Trainer(tiny("ccl"), None, quiet=True)
    opt = trainer.optimizers[0]
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.full_like(p, 1e3 if g["method"] else 1e-3)
    own = [p for g in opt.param_groups if not g["method"] for p in g["params"]]
    before = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in own]))
    norm = clip_student(opt, max_norm=1e9)
    assert_close(norm, before)  # the adapters' huge gradients are not part of the clipped norm
    adapter = next(p for g in opt.param_groups if g["method"] for p in g["params"])
    clip_student(opt, max_norm=1e-6)
    assert (adapter.grad == 1e3).all()


# -- the region grid -------------------------------------------------------------------------------------------
def test_a_region_grid_finer_than_the_feature_grid_is_an_error():
    za, zb, y = make_inputs(0, 2, 5, 64, 64, torch.float32)
    module = ccl_ops.RegionBSDLoss(8, 8, dim=4, region=(8, 8))
    ga, gb = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2)
    with pytest.raises(ValueError, match=r"region=\[8, 8\].*8x8 region grid, finer than the 4x4 feature grid.*16x16"):
        module(ga, gb, za, zb, y)
    out = ccl_ops.RegionBSDLoss(8, 8, dim=4, region=(16, 16))(ga, gb, za, zb, y)
    assert out.direction.shape == (2, 4, 4)


def test_region_bsd_logs_both_projections_mean_norm():
    za, zb, y = make_inputs(1, 2, 5, 32, 32, torch.float32)
    module = ccl_ops.RegionBSDLoss(8, 6, dim=4, region=(8, 8))
    ga, gb = torch.randn(2, 8, 4, 4), torch.randn(2, 6, 4, 4)
    out = module(ga, gb, za, zb, y)
    assert_close(out.norm_a, module.proj_a(ga).norm(dim=1).mean().detach())
    assert_close(out.norm_b, module.proj_b(gb).norm(dim=1).mean().detach())
    stats = build_method("ccl", _students(), 11, 255, region=[16, 16], rbsd_dim=4)(
        *_outputs(_students(), torch.zeros(2, 32, 32, dtype=torch.long))).stats
    assert {"rbsd_norm_a", "rbsd_norm_b"} <= set(stats) and stats["rbsd_norm_a"] > 0


# -- a batch without a valid pixel -----------------------------------------------------------------------------
_CACHE = {}


def _students(kind=("deeplabv3plus_mobilenetv2_100", "segformer_pvt_v2_b0")):
    if kind not in _CACHE:
        torch.manual_seed(0)
        _CACHE[kind] = tuple(build_student(name, 11, decoder_channels=8) for name in kind)
    return _CACHE[kind]


def _outputs(students, y, seed=0):
    x = torch.randn(y.shape[0], 3, *y.shape[-2:], generator=torch.Generator().manual_seed(seed))
    outs = []
    for s in students:
        z, f = s(x, return_features=True)
        outs.append(StudentOutput(ccl_ops.to_label_size(z, y), f))
    return (*outs, y)


@pytest.mark.parametrize("name", method_names())
def test_a_batch_of_ignored_pixels_gives_ce_zero_and_finite_losses(name):
    students = _students()
    method = build_method(name, students, 11, 255)
    y = torch.full((2, 32, 32), 255, dtype=torch.long)
    out = method(*_outputs(students, y))
    assert out.terms["ce_a"].item() == 0.0 and out.terms["ce_b"].item() == 0.0
    assert all(torch.isfinite(v) for v in out.terms.values()), out.terms
    total = sum(out.terms.values())
    total.backward()  # and the backward is finite too
    assert all(torch.isfinite(p.grad).all() for s in students for p in s.parameters() if p.grad is not None)
    for s in students:
        s.zero_grad(set_to_none=True)


def test_cross_entropy_is_the_mean_over_valid_pixels():
    students = _students()
    y = torch.randint(0, 11, (2, 32, 32), generator=torch.Generator().manual_seed(3))
    y[:, :5] = 255
    out_a, out_b, _ = _outputs(students, y)
    terms = build_method("independent", students, 11, 255)(out_a, out_b, y).terms
    assert_close(terms["ce_a"], F.cross_entropy(out_a.logits, y, ignore_index=255))


# -- overlays draw what training used ---------------------------------------------------------------------------
def test_overlays_draw_the_training_mask_with_the_methods_score(tmp_path):
    za, zb, y = make_inputs(2, 3, 5, 64, 64, torch.float32)
    x = torch.rand(3, 3, 64, 64)
    path = str(tmp_path / "overlays.npz")
    options = {"rule": "correct", "region": [16, 32], "score": "accuracy"}
    save_overlays(path, [(x, y, za, zb)], 3, method_options=options, ignore_index=255, mean=None, std=None, step=1,
                  region_grid=(4, 4))
    on_grid = ccl_ops.direction_on_grid(za, zb, y, (4, 4), region=(16, 32), score="accuracy")
    expect = F.interpolate(on_grid[:, None], size=(64, 64), mode="nearest")[:, 0].to(torch.int8)
    with np.load(path) as data:
        assert np.array_equal(data["region_direction"], expect.numpy())
        assert str(data["score"]) == "accuracy" and tuple(data["region_grid"]) == (4, 4)
    by_ce = ccl_ops.direction_on_grid(za, zb, y, (4, 4), region=(16, 32), score="ce")
    assert not torch.equal(by_ce, on_grid), "the fixture should tell the two scores apart"


def test_the_trainer_hands_the_overlays_the_grid_ccl_trained_on(tmp_path):
    config = tiny("ccl", "train.iters=2", "train.eval_interval=2", "train.overlays=2")
    run_training(config, str(tmp_path / "run"), quiet=True)
    with np.load(tmp_path / "run" / "overlays.npz") as data:
        assert tuple(data["region_grid"]) == (4, 4) and data["region_direction"].shape == (2, 64, 64)


# -- item loading leaves the CUDA generators alone ----------------------------------------------------------------
def test_item_loading_seeds_only_the_cpu_generator(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("item loading reseeded the CUDA generators")
    monkeypatch.setattr(torch.cuda, "manual_seed_all", forbidden)
    monkeypatch.setattr(torch.cuda, "manual_seed", forbidden)
    items = SeededItems([0, 1])
    state = torch.get_rng_state()
    assert items[(1, 5)] == 1
    assert torch.equal(torch.get_rng_state(), state)


# -- the distillation ramp-up (METHOD.md §8) ---------------------------------------------------------------------
def test_distill_weight_follows_the_formula():
    iters, ramp = 200, 0.25
    for step in (0, 1, 25, 49, 50, 51, 199):
        t_r = ramp * iters
        expect = math.exp(-5 * (1 - min(step / t_r, 1)) ** 2)
        assert distill_weight(step, ramp, iters) == pytest.approx(expect, rel=1e-12)
    assert distill_weight(0, 0.0, iters) == 1.0 and distill_weight(50, ramp, iters) == 1.0
    assert distill_weight(0, ramp, iters) == pytest.approx(math.exp(-5))


@pytest.mark.parametrize("method", ["dml", "ccl", "kdcl-minlogit"])
def test_the_ramp_scales_every_non_ce_term_exactly_and_leaves_ce_alone(method):
    plain = Trainer(tiny(method, "train.iters=40"), None, quiet=True)
    ramped = Trainer(tiny(method, "train.iters=40", "train.distill_ramp=0.5"), None, quiet=True)
    x, y = plain.fixed_batch()
    for step in (0, 7):
        plain.step = ramped.step = step
        torch.manual_seed(0)
        _, out_plain = plain.forward_losses(x, y)
        torch.manual_seed(0)
        _, out_ramped = ramped.forward_losses(x, y)
        w = distill_weight(step, 0.5, 40)
        assert out_ramped.stats["distill_weight"].item() == pytest.approx(w)
        assert set(out_plain.terms) == set(out_ramped.terms)
        for key, value in out_plain.terms.items():
            expect = value if key in ("ce_a", "ce_b") else w * value
            assert_close(out_ramped.terms[key], expect, rtol=0, atol=0)
    assert ramped.config["label"] == f"{method}+ramp0.5"


def test_the_ramp_is_logged_and_named_in_the_table(tmp_path):
    from ccl_bench.report import write_report

    config = tiny("dml", "train.iters=2", "train.eval_interval=2", "train.distill_ramp=0.5")
    metrics = run_training(config, str(tmp_path / "runs" / "dml_ramp"), quiet=True)
    assert metrics["distill_ramp"] == 0.5 and metrics["method"] == "dml+ramp0.5"
    with open(tmp_path / "runs" / "dml_ramp" / "steps.csv") as f:
        header = f.readline().strip().split(",")
    assert "distill_weight" in header
    run_training(tiny("dml", "train.iters=2", "train.eval_interval=2"), str(tmp_path / "runs" / "dml"), quiet=True)
    with open(write_report([str(tmp_path / "runs")], str(tmp_path / "report"), plots=False, baseline="dml")[
            "markdown"]) as f:
        table = f.read()
    assert "| ramp |" in table and "| dml+ramp0.5 | 1 |" in table and table.count(" | 0.5 |") == 1


# -- the training-set evaluation -----------------------------------------------------------------------------
def test_train_miou_is_evaluated_on_a_fixed_training_subset(tmp_path):
    config = tiny("independent", "train.iters=2", "train.eval_interval=1", "data.train_eval_images=6",
                  "data.holdout=0.25")
    metrics = run_training(config, str(tmp_path / "run"), quiet=True)
    assert set(metrics["train_miou"]) == {"a", "b", "ensemble"} and metrics["train_eval_images"] == 6
    with open(tmp_path / "run" / "evals.csv") as f:
        assert "train_miou_a" in f.readline()
    trainer = Trainer(config, None, quiet=True)
    assert len(trainer.train_eval_indices) == 6 and set(trainer.train_eval_indices) <= set(trainer.train_indices)
    assert trainer.train_eval_indices == Trainer(config, None, quiet=True).train_eval_indices  # fixed
    assert not Trainer(tiny("independent"), None, quiet=True).train_eval_indices  # off by default


# -- pairs of one family ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["small-data", "small-data-cnn-cnn", "small-data-vit-vit"])
def test_the_small_data_presets_name_their_pairs(preset):
    config = load_config(preset)
    assert config["data"]["holdout"] > 0 and config["data"]["train_eval_images"] > 0
    names = dict(zip(("cnn", "vit"), (s["name"] for s in config["students"])))
    family = {"small-data": ("deeplabv3plus", "segformer"), "small-data-cnn-cnn": ("deeplabv3plus",) * 2,
              "small-data-vit-vit": ("segformer",) * 2}[preset]
    assert tuple(n.split("_")[0] for n in names.values()) == family


@pytest.mark.parametrize("pair", [("deeplabv3plus_mobilenetv2_100", "deeplabv3plus_mobilenetv2_100"),
                                  ("segformer_pvt_v2_b0", "segformer_pvt_v2_b0")])
def test_every_method_runs_on_a_pair_of_one_family(pair):
    students = _students(pair)
    y = torch.randint(0, 11, (2, 64, 64), generator=torch.Generator().manual_seed(0))
    for name in method_names():
        method = build_method(name, students, 11, 255, **({"region": [32, 32]} if name == "ccl" else {}))
        out = method(*_outputs(students, y))
        assert all(torch.isfinite(v) for v in out.terms.values()), (name, out.terms)
        sum(out.terms.values()).backward()
        for s in students:
            s.zero_grad(set_to_none=True)


def test_logs_and_reports_name_the_students_by_their_model(tmp_path):
    from ccl_bench.report import write_report

    cnn = "deeplabv3plus_mobilenetv2_100"
    config = tiny("independent", "train.iters=1", "train.eval_interval=1", f"students.vit.name={cnn}")
    run_training(config, str(tmp_path / "runs" / "independent" / "seed0"))
    with open(tmp_path / "runs" / "independent" / "seed0" / "train.log") as f:
        assert f"students A {cnn}, B {cnn}" in f.read()
    written = write_report([str(tmp_path / "runs")], str(tmp_path / "report"), plots=False)
    with open(written["markdown"]) as f:
        text = f.read()
    assert f"A = {cnn}, B = {cnn}" in text and "ViT" not in text and "CNN" not in text
    with open(tmp_path / "runs" / "independent" / "seed0" / "metrics.json") as f:
        assert json.load(f)["students"] == {"a": cnn, "b": cnn}
    assert os.path.isfile(written["csv"])
