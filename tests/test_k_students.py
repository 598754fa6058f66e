"""K students (issue #26): the students list in the config, every method over K students against a plain per-pair
reference, the two-student config as a list, runs of three students end to end (report, export, resume, DDP;
exact resume with three students: test_engine.py)."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.testing import assert_close

from baselines.dml import mutual_kl
from baselines.kdcl import kdcl_loss, min_logit_teacher_k
from ccl_bench.cli import main
from ccl_bench.config import ConfigError, load_config
from ccl_bench.methods import StudentOutput, build_method
from ccl_bench.methods.base import Method, MethodOutput
from ccl_bench.models import build_student
from ccl_ops import pixel_bsd_peers
from test_engine import _ddp_worker, _free_port
from tiny_config import TINY_ARGS, tiny_config

warnings.filterwarnings("ignore", message="ccl_ops: no compiled kernel")
CNN, VIT = "deeplabv3plus_mobilenetv2_100", "segformer_pvt_v2_b0"
THREE = f"students=[{{name: {CNN}, options: {{decoder_channels: 8}}}}, {{name: {VIT}, options: {{decoder_channels: 8}}}}, " \
        f"{{name: {CNN}, options: {{decoder_channels: 8}}, optim: {{lr: 0.003}}}}]"
IGNORE = 255


def _three(*overrides, method="dml"):
    return tiny_config(THREE, "train.iters=2", "train.eval_interval=2", "train.overlays=0", *overrides, method=method)


# -- the configuration -----------------------------------------------------------------------------------------
def test_a_students_list_resolves_each_entry_with_its_family_optimizer():
    config = _three()
    students = config["students"]
    assert [s["family"] for s in students] == ["cnn", "vit", "cnn"]
    assert students[0]["optim"] == config_default_optim("cnn", lr=0.01, weight_decay=0.0001)
    assert students[1]["optim"]["optimizer"] == "adamw" and students[1]["optim"]["warmup_iters"] == 2
    assert students[2]["optim"]["lr"] == 0.003 and students[2]["optim"]["optimizer"] == "sgd"
    assert config["legacy_students"] is False and set(config["optim"]) == {"grad_clip"}


def config_default_optim(family: str, **changes) -> dict:
    from ccl_bench.config import defaults

    return {**defaults()["optim"][family], **changes}


def test_the_two_student_keys_map_onto_the_list():
    legacy = tiny_config(method="dml")
    assert legacy["legacy_students"] is True
    assert [s["name"] for s in legacy["students"]] == [CNN, VIT]
    assert legacy["students"][1]["optim"]["lr"] == 0.0005  # optim.vit of tiny.yaml, slot B whatever its family
    as_list = tiny_config(f"students=[{{name: {CNN}, options: {{decoder_channels: 16}}}}, "
                          f"{{name: {VIT}, options: {{decoder_channels: 16}}}}]", method="dml")
    assert as_list["students"] == legacy["students"]


@pytest.mark.parametrize("students,message", [
    (f"[{{name: {CNN}}}]", "students: 1 given; expected 2 to 8"),
    (f"[{', '.join([f'{{name: {CNN}}}'] * 9)}]", "students: 9 given; expected 2 to 8"),
    (f"[{{name: {CNN}}}, {{name: {VIT}, opts: {{}}}}]", "students[1]: unknown key(s) ['opts']"),
    (f"[{{name: {CNN}}}, {{name: {VIT}, optim: {{lr: -1}}}}]", "students[1].optim.lr=-1; expected a number > 0"),
    (f"[{{name: {CNN}}}, {{name: {VIT}, optim: {{lrr: 1}}}}]", "unknown config key 'students[1].optim.lrr'"),
    (f"[{{name: {CNN}}}, {{name: {VIT}, family: rnn}}]", "students[1].family='rnn'; expected one of"),
    (f"[{{name: {CNN}}}, 5]", "students[1]=5; expected a mapping with a name"),
    (f"[{{name: {CNN}}}, {{name: {VIT}, options: {{decoder_channelz: 8}}}}]", "students[1].options.decoder_channelz"),
])
def test_a_bad_students_list_is_one_error_naming_the_entry(students, message):
    with pytest.raises(ConfigError) as exc:
        tiny_config(f"students={students}", method="dml")
    assert message in str(exc.value)


def test_a_two_student_method_refuses_three_students():
    class Pair(Method):
        name = "pair-only"

        def losses(self, out_a, out_b, y):
            return MethodOutput(self.ce_terms(out_a, out_b, y))

    models = [torch.nn.Identity()] * 3
    with pytest.raises(ValueError, match="method 'pair-only' takes 2 students; the config has 3"):
        Pair(models, 11, families=["cnn", "vit", "cnn"])


# -- the methods over K students against a per-pair reference ----------------------------------------------------
def _outputs(k: int, seed: int = 0, c: int = 5):
    g = torch.Generator().manual_seed(seed)
    logits = [(2 * torch.randn(2, c, 8, 8, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(k)]
    y = torch.randint(0, c, (2, 8, 8), generator=g)
    y[0, :2] = IGNORE
    return logits, y


@pytest.mark.parametrize("k", [3, 4])
def test_dml_with_k_peers_is_the_mean_of_the_pairwise_kls(k):
    logits, y = _outputs(k)
    t, lam = 2.0, 0.5
    families = ["cnn", "vit"] * (k // 2) + ["cnn"] * (k % 2)
    out = build_method("dml", [None] * k, 5, IGNORE, families=families, temperature=t, lambda_kl=lam)(
        *[StudentOutput(z) for z in logits], y=y)
    for s, slot in enumerate("abcd"[:k]):
        pairs = [mutual_kl(logits[s], logits[r], y, temperature=t, ignore_index=IGNORE).loss_a
                 for r in range(k) if r != s]
        assert_close(out.terms[f"kl_{slot}"], lam * torch.stack(pairs).mean())
        assert_close(out.terms[f"ce_{slot}"], F.cross_entropy(logits[s], y, ignore_index=IGNORE))


def test_kdcl_minlogit_with_three_students_distils_everyone_from_one_teacher():
    logits, y = _outputs(3)
    out = build_method("kdcl-minlogit", [None] * 3, 5, IGNORE, families=["cnn", "vit", "cnn"])(
        *[StudentOutput(z) for z in logits], y=y)
    teacher = min_logit_teacher_k([z.detach() for z in logits], y, IGNORE)
    for s, slot in enumerate("abc"):
        assert_close(out.terms[f"kl_{slot}"], kdcl_loss(logits[s], teacher, y, temperature=2.0, ignore_index=IGNORE))
    grads = torch.autograd.grad(out.terms["kl_b"], logits, allow_unused=True)
    assert grads[0] is None and grads[2] is None and grads[1].abs().sum() > 0  # the teacher is a constant


def _students(families):
    torch.manual_seed(0)
    return [build_student(CNN if f == "cnn" else VIT, 5, decoder_channels=8) for f in families]


def test_ccl_with_three_students_pairs_every_cnn_with_the_vit_and_selects_among_peers():
    families = ["cnn", "vit", "cnn"]
    models = _students(families)
    method = build_method("ccl", models, 5, IGNORE, families=families, region=[32, 32], rbsd_dim=8)
    assert method.hfd_pairs == [(0, 1), (1, 0), (1, 2), (2, 1)]
    assert sorted(method.gammas) == ["ab", "ba", "bc", "cb"]
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, 5, (2, 64, 64))
    outs = []
    for m in models:
        z, f = m(x, return_features=True)
        outs.append(StudentOutput(F.interpolate(z, size=y.shape[-2:], mode="bilinear"), f))
    out = method(*outs, y=y)
    expected = pixel_bsd_peers([o.logits for o in outs], y, temperature=1.0, rule="correct", normalize="valid",
                               ignore_index=IGNORE)
    for slot, kl in zip("abc", expected):
        assert_close(out.terms[f"pbsd_{slot}"], kl)
    assert {"hfd", "rbsd", "region_a", "pixel_c", "rbsd_norm_c"} <= set(out.terms) | set(out.stats)
    # each student's optimizer holds the Gammas it is the source of and its own projection
    owned = {slot: {id(p) for p in method.student_parameters(slot)} for slot in "abc"}
    assert {id(p) for p in method.gammas["bc"].parameters()} <= owned["b"]
    assert {id(p) for p in method.rbsd.projs[2].parameters()} <= owned["c"]
    assert set().union(*owned.values()) == {id(p) for p in method.parameters()}
    with pytest.raises(ValueError, match=r"hfd_pairs=\[\[0, 0\]\]; expected distinct \[source, target\] pairs"):
        build_method("ccl", models, 5, IGNORE, families=families, hfd_pairs=[[0, 0]])


# -- runs of three students ---------------------------------------------------------------------------------------
def test_three_students_train_resume_report_and_export(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["compare", "--methods", "independent,dml", "--seeds", "0", "--out", str(out), "--no-plots",
            *TINY_ARGS, "--set", THREE, "train.iters=2", "train.eval_interval=2", "train.overlays=0",
            "train.cpu_threads=1"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| C mIoU |" in table and f"C = {CNN}" in table
    metrics = json.loads((out / "dml" / "seed0" / "metrics.json").read_text())
    assert set(metrics["miou"]) == {"a", "b", "c", "ensemble"} and metrics["students"]["c"] == CNN
    steps = (out / "dml" / "seed0" / "steps.csv").read_text().splitlines()[0].split(",")
    assert {"ce_c", "kl_c", "lr_c"} <= set(steps)
    exported = tmp_path / "c.pt"
    assert main(["export", str(out / "dml" / "seed0"), "--student", "c", "--out", str(exported)]) == 0
    assert main(["train", "--resume", "--out", str(out / "dml" / "seed0"), "--iters", "3", "--set",
                 "train.eval_interval=3"]) == 0
    assert json.loads((out / "dml" / "seed0" / "metrics.json").read_text())["step"] == 3


def test_overlays_of_three_students_draw_who_learns_and_each_regions_target(tmp_path):
    # The K-student maps are the selection training makes (peer_masks, the region targets on the training grid),
    # and the plot shows every student's prediction beside them.
    import numpy as np

    from ccl_bench.engine.evaluation import save_overlays
    from ccl_bench.plots import plot_overlays
    from ccl_ops import peer_masks, targets_on_grid
    from ccl_ops.testing import make_peer_inputs

    logits, y = make_peer_inputs(3, 3, 2, 5, 32, 32)
    x = torch.rand(2, 3, 32, 32)
    run = tmp_path / "run"
    run.mkdir()
    save_overlays(str(run / "overlays.npz"), [(x, y, *logits)], 2, method_options={"rule": "correct", "region": [8, 8]},
                  ignore_index=IGNORE, mean=None, std=None, step=1, region_grid=(4, 4))
    masks = peer_masks(logits, y, rule="correct")
    target = targets_on_grid(logits, y, (4, 4), region=(8, 8))
    with np.load(run / "overlays.npz") as data:
        learners = torch.from_numpy(data["pixel_learners"])
        for s in range(3):
            learns = masks[(s + 1) % 3][s] | masks[(s + 2) % 3][s]
            assert torch.equal((learners >> s) & 1 == 1, learns)
        assert (learners > 0).any() and (torch.from_numpy(data["region_target"]) >= 0).any()
        assert torch.equal(torch.from_numpy(data["region_target"][:, ::8, ::8]).long(), target)
        assert {"pred_a", "pred_b", "pred_c", "pixel_direction", "region_direction"} <= set(data.files)
    png = plot_overlays(str(run), str(tmp_path / "overlays.png"), "ccl (seed 0)")
    assert os.path.getsize(png) > 0


def test_ddp_with_three_students_on_two_cpu_processes(tmp_path):
    run_dir = str(tmp_path / "ddp")
    mp.start_processes(_ddp_worker, args=(2, _free_port(), run_dir, "dml", (THREE,)), nprocs=2, join=True,
                       start_method="spawn")
    r0 = torch.load(os.path.join(run_dir, "rank0.pt"), weights_only=True)
    r1 = torch.load(os.path.join(run_dir, "rank1.pt"), weights_only=True)
    assert len(r0["students"]) == 3
    assert_close(r1["students"], r0["students"])
    assert r0["metrics"] == r1["metrics"] and set(r0["metrics"]) == {"a", "b", "c", "ensemble"}
