"""The co-training engine: exact resume, fairness across methods, checkpoints, NaN stop, export, DDP on CPU."""
from __future__ import annotations

import json
import os
import signal
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from torch.testing import assert_close

from ccl_bench.config import ConfigError
from ccl_bench.engine import (CheckpointError, NonFiniteLossError, RunDirError, Trainer, TrainingInterrupted,
                              export_student, load_checkpoint, run_training)
from ccl_bench.methods.ccl import CCL
from ccl_bench.models import build_student
from tiny_config import tiny_config

warnings.filterwarnings("ignore", message="ccl_ops: no compiled kernel")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(method="ccl", *overrides, **direct):
    return tiny_config(*overrides, method=method, **{"train.overlays": 0, **direct})


def _state(path):
    return load_checkpoint(path)


def _stop_after(monkeypatch, step):
    original = Trainer.train_step

    def train_step(self, x, y):
        out = original(self, x, y)
        if self.step == step:
            self._stop_signal = signal.SIGTERM
        return out
    monkeypatch.setattr(Trainer, "train_step", train_step)


THREE_STUDENTS = ("students=[{name: deeplabv3plus_mobilenetv2_100, options: {decoder_channels: 8}}, "
                  "{name: segformer_pvt_v2_b0, options: {decoder_channels: 8}}, "
                  "{name: deeplabv3plus_mobilenetv2_100, options: {decoder_channels: 8}}]")


@pytest.mark.parametrize("method,students", [("ccl", None), ("kdcl-general", None), ("ccl", THREE_STUDENTS),
                                             ("kdcl-general", THREE_STUDENTS)])
def test_resume_continues_to_exactly_the_same_result(tmp_path, monkeypatch, method, students):
    # 6 steps at 4 (ccl) or 3 (kdcl-general: holdout) steps per epoch: the resume point sits mid-epoch and
    # the run crosses an epoch boundary after it; two students and three
    holdout = "data.holdout=0.25" if method == "kdcl-general" else "data.holdout=0"
    config = tiny(method, "train.deterministic=true", "train.iters=6", "train.eval_interval=6",
                  "train.checkpoint_interval=6", holdout, *([students] if students else []))
    straight = run_training(config, str(tmp_path / "straight"))
    with monkeypatch.context() as m:
        _stop_after(m, 3)
        with pytest.raises(TrainingInterrupted, match="SIGTERM at step 3/6.*--resume") as info:
            run_training(config, str(tmp_path / "resumed"))
    assert info.value.signum == signal.SIGTERM
    assert _state(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 3
    resumed = run_training(config, str(tmp_path / "resumed"), resume=True)
    a = _state(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = _state(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 6
    for key in ("students", "method", "optimizers"):
        assert_close(b[key], a[key], rtol=0, atol=0)
    assert straight["miou"] == resumed["miou"]
    # the logs hold each step once
    with open(tmp_path / "resumed" / "steps.csv") as f:
        steps = [int(line.split(",")[0]) for line in f.read().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_same_init_and_data_order_for_every_method():
    trainers = [Trainer(tiny(m), None, quiet=True) for m in ("independent", "ccl", "dml")]
    other_seed = Trainer(tiny("independent", seed=1), None, quiet=True)
    ref = trainers[0]
    for t in trainers[1:]:
        for s_ref, s in zip(ref.students, t.students):
            assert_close(s.state_dict(), s_ref.state_dict(), rtol=0, atol=0)
        for epoch in (0, 1):
            for (x0, y0), (x1, y1) in zip(ref.epoch_loader(epoch, 0), t.epoch_loader(epoch, 0)):
                assert_close(x1, x0, rtol=0, atol=0)
                assert torch.equal(y1, y0)
    assert not torch.equal(other_seed.students[0].stages[0][0].weight, ref.students[0].stages[0][0].weight)
    x_ref, _ = ref.fixed_batch()
    x_other, _ = other_seed.fixed_batch()
    assert not torch.equal(x_ref, x_other)
    # an epoch visits every training image once; a later epoch shuffles
    order = [i for batch in ref.epoch_loader(0, 0).batch_sampler for i, _ in batch]
    assert sorted(order) == list(range(16))
    assert order != [i for batch in ref.epoch_loader(1, 0).batch_sampler for i, _ in batch]


def test_checkpoint_errors_are_clear(tmp_path):
    run = tmp_path / "run"
    run_training(tiny("independent", "train.iters=2"), str(run))
    last = run / "checkpoints" / "last.pt"
    assert _state(last)["step"] == 2

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="garbage.pt.* corrupt or not a torch checkpoint"):
        load_checkpoint(garbage)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt.* corrupt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a ccl-bench training checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    # a checkpoint of other students
    other = tiny("independent", "students.cnn.options.decoder_channels=8")
    with pytest.raises(CheckpointError, match="does not fit"):
        Trainer(other, None, resume_from=str(last), quiet=True)
    # resuming a run whose checkpoint got corrupted
    last.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="last.pt"):
        run_training(tiny("independent", "train.iters=3"), str(run), resume=True)


def test_non_finite_loss_names_the_term_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = CCL.losses

    def losses(self, *outs, y):
        out = original(self, *outs, y=y)
        calls["n"] += 1
        if calls["n"] == 3:
            out.terms["pbsd_a"] = out.terms["pbsd_a"] * float("nan")
        return out
    monkeypatch.setattr(CCL, "losses", losses)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*pbsd_a=nan.*last good checkpoint .*last.pt"):
        run_training(tiny("ccl", "train.iters=6"), str(run))
    assert _state(run / "checkpoints" / "last.pt")["step"] == 2


def test_run_dir_is_never_overwritten_silently(tmp_path):
    run = str(tmp_path / "run")
    run_training(tiny("independent", "train.iters=2"), run)
    with pytest.raises(RunDirError, match="already holds a run; pass --resume"):
        run_training(tiny("independent", "train.iters=2"), run)
    with pytest.raises(RunDirError, match=r"cannot change on resume \(.*method: run has 'independent', asked 'dml'"):
        run_training(tiny("dml", "train.iters=4"), run, resume=True)
    with pytest.raises(RunDirError, match="holds no run"):
        run_training(tiny("independent"), str(tmp_path / "empty"), resume=True)
    metrics = run_training(tiny("independent", "train.iters=2"), run, overwrite=True)
    assert metrics["step"] == 2


def test_metrics_json_and_export(tmp_path):
    run = tmp_path / "run"
    run_training(tiny("ccl", "train.iters=2", **{"train.overlays": 2}), str(run))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "ccl" and metrics["seed"] == 0 and metrics["step"] == 2 and metrics["complete"]
    assert set(metrics["miou"]) == {"a", "b", "ensemble"}
    assert all(0 <= v <= 1 for v in metrics["miou"].values())
    header = (run / "steps.csv").read_text().splitlines()[0].split(",")
    for column in ("loss", "ce_a", "ce_b", "hfd", "rbsd", "pbsd_a", "pbsd_b", "pixel_ab", "pixel_ba", "region_ab",
                   "region_ba", "lr_a", "lr_b"):
        assert column in header
    assert (run / "overlays.npz").is_file() and (run / "config.yaml").is_file()
    out = export_student(str(run), "b", str(tmp_path / "vit.pt"))
    model = build_student("segformer_pvt_v2_b0", 11, decoder_channels=16, checkpoint=out)
    assert_close(model.state_dict(), _state(run / "checkpoints" / "last.pt")["students"]["b"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="student='teacher'; expected one of"):
        export_student(str(run), "teacher", str(tmp_path / "x.pt"))


def test_bad_config_is_rejected_before_training():
    with pytest.raises(ConfigError, match="unknown config key 'train.iterations'; valid keys under train: .*iters"):
        tiny("ccl", "train.iterations=3")
    with pytest.raises(ConfigError, match=r"train.amp='fp8'; expected one of \['off', 'bf16', 'fp16'\]"):
        tiny("ccl", "train.amp=fp8")
    with pytest.raises(ConfigError, match="methods.ccl: method 'ccl': unknown option"):
        tiny("ccl", "methods.ccl.hfdd=false")
    with pytest.raises(ConfigError, match=r"data.batch_size=0; expected a number > 0"):
        tiny("ccl", "data.batch_size=0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, run_dir, method="ccl", overrides=()):
    from ccl_bench.engine import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    config = tiny(method, "data.batch_size=2", "train.device=cpu", *overrides)
    info = distributed.setup("cpu")
    os.makedirs(run_dir, exist_ok=True)
    try:
        trainer = Trainer(config, run_dir, info, quiet=True)
        metrics = trainer.fit()
        torch.save({"metrics": metrics["miou"], "students": [m.state_dict() for m in trainer.students],
                    "method": trainer.method.state_dict()}, os.path.join(run_dir, f"rank{rank}.pt"))
    finally:
        distributed.teardown(info)


def test_ddp_two_cpu_processes_gloo(tmp_path):
    run_dir = str(tmp_path / "ddp")
    mp.start_processes(_ddp_worker, args=(2, _free_port(), run_dir), nprocs=2, join=True, start_method="spawn")
    metrics = json.loads(open(os.path.join(run_dir, "metrics.json")).read())
    assert metrics["world_size"] == 2 and metrics["step"] == 4
    r0 = torch.load(os.path.join(run_dir, "rank0.pt"), weights_only=True)
    r1 = torch.load(os.path.join(run_dir, "rank1.pt"), weights_only=True)
    # both ranks end with the same weights (DDP for the students, averaged gradients for the method's own
    # parameters) and the same metrics (confusion matrices summed over the ranks)
    assert_close(r1["students"], r0["students"])
    assert_close(r1["method"], r0["method"])
    assert r0["metrics"] == r1["metrics"] == metrics["miou"]
    assert _state(os.path.join(run_dir, "checkpoints", "last.pt"))["step"] == 4


def test_sync_bn_needs_cuda():
    with pytest.raises(ValueError, match="train.sync_bn=true needs CUDA"):
        Trainer(tiny("independent", "train.sync_bn=true", "train.device=cpu"), None, quiet=True)
