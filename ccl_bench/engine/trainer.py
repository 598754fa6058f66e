"""The co-training loop shared by every method (same data order, seeds, schedule and budget for all).

Per step: both students see the batch (``method.views``), the method turns their logits and encoder features
into named loss terms, their sum is back-propagated, each student steps its own optimizer (which also holds
the method's parameters that belong to it). Evaluation covers both students and their ensemble.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ccl_ops import to_label_size

from .. import config as config_mod
from ..data import build_dataset
from ..methods import StudentOutput, build_method
from ..methods.base import CE_TERMS
from ..models import build_student
from ..student_names import result_keys, slots, student_labels
from . import distributed
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .evaluation import eval_row, evaluate_students, result_summary, save_overlays
from .logging import CSVLog, Messages, TensorBoard
from .optim import build_optimizer, build_scheduler, clip_student
from .run_dir import checkpoint_path, prepare_run_dir, read_metrics, write_metrics, write_run_config
from .sampling import (EVAL_STREAM, HoldoutSlice, SeededItems, TrainingOrder, item_seed, private_generator,
                       split_holdout)



def distill_weight(step: int, ramp: float, iters: int) -> float:
    """METHOD.md §8: ``exp(-5 (1 - min(t / t_r, 1))^2)`` with ``t_r = ramp * iters`` at optimizer step ``t``
    (0 for the first step); 1 when ``ramp`` is 0."""
    if ramp <= 0:
        return 1.0
    return math.exp(-5.0 * (1.0 - min(step / (ramp * iters), 1.0)) ** 2)


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the run stopped without taking that step."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM: a checkpoint was saved and the run stopped."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class Trainer:
    """Builds the students, the method, data, optimizers from a resolved config; :meth:`fit` trains."""

    def __init__(self, config: dict, run_dir: str | None, dist: distributed.DistInfo | None = None,
                 resume_from: str | None = None, quiet: bool = False):
        self.config = config
        self.run_dir = run_dir
        self.dist = dist or distributed.DistInfo()
        self.device = self.dist.device
        self.seed = int(config["seed"])
        self.label = config.get("label") or config["method"]
        main = self.dist.is_main and run_dir is not None
        self.say = Messages(os.path.join(run_dir, "train.log") if main else None, enabled=self.dist.is_main and not quiet)
        train_cfg = config["train"]
        if train_cfg["cpu_threads"]:
            torch.set_num_threads(train_cfg["cpu_threads"])
        if train_cfg["deterministic"]:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if train_cfg["sync_bn"] and self.device.type != "cuda":
            raise ValueError("train.sync_bn=true needs CUDA devices (SyncBatchNorm does not run on CPU); "
                             "set train.sync_bn=false")
        amp = train_cfg["amp"] if self.device.type == "cuda" else "off"
        self.amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        self._build_data()
        self._build_models()
        self.step = 0
        self.history: list[dict] = []
        self.elapsed = 0.0
        if resume_from:
            self._load(resume_from)
        self._stop_signal: int | None = None

    # -- construction -------------------------------------------------------------------------------------------
    def _build_data(self) -> None:
        d = self.config["data"]
        common = dict(d["options"])
        self.train_set = build_dataset(d["dataset"], d["train_split"], d["root"], **{**common, **d["train_options"]})
        self.val_set = build_dataset(d["dataset"], d["val_split"], d["root"], **{**common, **d["val_options"]})
        self.num_classes = self.train_set.num_classes
        self.ignore_index = self.train_set.ignore_index
        self.class_names = list(self.train_set.class_names)

    def _build_models(self) -> None:
        cfg = self.config
        self.slots = slots(len(cfg["students"]))
        self.result_keys = result_keys(len(self.slots))
        students = []
        for index, s in enumerate(cfg["students"]):  # the same init for a seed, whatever the method
            # A and B keep the two-student engine's streams (offsets 0 and 1; 2 and 3 are the method's and the
            # training's below); students C, D, ... draw from offsets 100 + index
            torch.manual_seed(self.seed * 1000 + (index if index < 2 else 100 + index))
            students.append(build_student(s["name"], self.num_classes, **s["options"]))
        if self.dist.enabled and cfg["train"]["sync_bn"]:
            students = [torch.nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in students]
        self.students = [m.to(self.device).train() for m in students]
        torch.manual_seed(self.seed * 1000 + 2)
        self.method = build_method(cfg["method"], tuple(self.students), self.num_classes, self.ignore_index,
                                   families=[s["family"] for s in cfg["students"]],
                                   **config_mod.method_options(cfg)).to(self.device).train()
        self.optimizers, self.schedulers = [], []
        total = cfg["train"]["iters"]
        for model, slot, s in zip(self.students, self.slots, cfg["students"]):
            opt = build_optimizer(model.parameters(), s["optim"], self.method.student_parameters(slot))
            self.optimizers.append(opt)
            self.schedulers.append(build_scheduler(opt, s["optim"], total))
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.nets = [DistributedDataParallel(m, device_ids=ids) for m in self.students]
        else:
            self.nets = list(self.students)
        torch.manual_seed(self.seed * 1000 + 3 + self.dist.rank)  # dropout, drop-path, invariant views
        # training indices (minus the data configuration's held-out slice, for every method) and the data order
        d = cfg["data"]
        held_out, self.train_indices = split_holdout(len(self.train_set), d["holdout"], self.seed)
        self.holdout = HoldoutSlice(
            self.train_set, held_out, seed=self.seed, batch_size=d["eval_batch_size"], num_workers=d["num_workers"],
            students=self.students, device=self.device, autocast=self.autocast, dist=self.dist) if held_out else None
        self.order = TrainingOrder(self.train_set, self.train_indices, seed=self.seed, batch_size=d["batch_size"],
                                   num_workers=d["num_workers"], pin_memory=self.device.type == "cuda",
                                   dist=self.dist)
        self.steps_per_epoch = self.order.steps_per_epoch
        # a fixed subset of the training images (the first of the shuffled training indices), evaluated beside
        # the validation set so that overfitting is measured, not assumed
        order = torch.randperm(len(self.train_indices), generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.train_eval_indices = sorted(self.train_indices[i] for i in order[:d["train_eval_images"]])

    @property
    def models(self) -> dict[str, str]:
        """``{slot: model name}`` of the students."""
        return {slot: s["name"] for slot, s in zip(self.slots, self.config["students"])}

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def epoch_loader(self, epoch: int, offset: int) -> DataLoader:
        """Batches ``offset..`` of ``epoch`` for this rank (the same for every method and after a resume)."""
        return self.order.loader(epoch, offset)

    def batches(self):
        """Endless ``(x, y)`` from the current step on; calls the method's epoch hook at each epoch start."""
        step = self.step
        while True:
            epoch, offset = divmod(step, self.steps_per_epoch)
            if offset == 0:
                self.method.on_epoch_start(epoch, self.holdout)
            for x, y in self.epoch_loader(epoch, offset):
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                step += 1

    # -- one step -----------------------------------------------------------------------------------------------
    def forward_losses(self, x: torch.Tensor, y: torch.Tensor):
        views = self.method.views(x)
        with self.autocast():
            outs = []
            for net, view in zip(self.nets, views):
                z, f = net(view, return_features=True)
                outs.append(StudentOutput(to_label_size(z, y), f))
            out = self.method(*outs, y=y)
        ramp = self.config["train"]["distill_ramp"]
        if ramp > 0:  # METHOD §8: the same weight on every method's non-CE terms
            weight = distill_weight(self.step, ramp, self.config["train"]["iters"])
            out.terms = {k: v if k in CE_TERMS else weight * v for k, v in out.terms.items()}
            out.stats["distill_weight"] = torch.tensor(weight)
        total = sum(v.float() for v in out.terms.values())
        return total, out

    def train_step(self, x: torch.Tensor, y: torch.Tensor):
        total, out = self.forward_losses(x, y)
        if not torch.isfinite(total):
            bad = [f"{k}={v.item():.4g}" for k, v in out.terms.items() if not torch.isfinite(v)]
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step + 1} of {self.label} (seed {self.seed}): "
                f"{', '.join(bad) or 'the sum of the terms'} (all terms: "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in out.terms.items()) + "); the step was not taken")
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        distributed.average_gradients(self.method.parameters(), self.dist)
        clip = self.config["optim"]["grad_clip"]
        for opt in self.optimizers:
            if clip > 0:
                self.scaler.unscale_(opt)
                clip_student(opt, clip)
            self.scaler.step(opt)
        self.scaler.update()
        for sched in self.schedulers:
            sched.step()
        self.step += 1
        return total, out

    # -- evaluation ---------------------------------------------------------------------------------------------
    def _evaluate_on(self, dataset, items: list, what: str, overlays: int = 0) -> tuple[dict, list]:
        d = self.config["data"]
        loader = DataLoader(dataset, batch_size=d["eval_batch_size"], sampler=items[self.dist.rank::self.dist.world_size],
                            num_workers=d["num_workers"], pin_memory=self.device.type == "cuda",
                            generator=private_generator(self.seed, EVAL_STREAM))
        progress = f"eval {what} {self.label}" if self.dist.is_main and self.config["train"]["progress"] else None
        return evaluate_students(self.students, loader, num_classes=self.num_classes, ignore_index=self.ignore_index,
                                 device=self.device, dist=self.dist, autocast=self.autocast, overlays=overlays,
                                 progress=progress)

    @torch.no_grad()
    def evaluate(self, overlays: int = 0) -> dict:
        """Metrics of every student and their ensemble on the validation set; the first ``overlays`` images to
        ``overlays.npz``."""
        d = self.config["data"]
        n = len(self.val_set) if d["val_limit"] is None else min(d["val_limit"], len(self.val_set))
        result, kept = self._evaluate_on(self.val_set, list(range(n)), "val", overlays)
        if kept and self.run_dir:
            transform = self.val_set.transform  # undo its normalisation (none when mean/std are None)
            save_overlays(os.path.join(self.run_dir, "overlays.npz"), kept, overlays,
                          method_options=config_mod.method_options(self.config), ignore_index=self.ignore_index,
                          mean=transform.mean, std=transform.std, step=self.step,
                          region_grid=getattr(self.method, "region_grid", None))
        return result

    @torch.no_grad()
    def evaluate_train_subset(self) -> dict | None:
        """The same metrics on the fixed training subset (``data.train_eval_images``; None when 0), each image as
        the training set gives it, with fixed augmentation seeds."""
        if not self.train_eval_indices:
            return None
        items = [(i, item_seed(self.seed, EVAL_STREAM, i)) for i in self.train_eval_indices]
        return self._evaluate_on(SeededItems(self.train_set), items, "train")[0]

    # -- checkpoints --------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> str:
        return checkpoint_path(self.run_dir)

    def save(self) -> None:
        distributed.broadcast_buffers([*self.students, self.method], self.dist)
        rng = rng_state()
        if self.dist.enabled:
            states = [None] * self.dist.world_size
            torch.distributed.all_gather_object(states, rng)
        else:
            states = [rng]
        if not self.dist.is_main or self.run_dir is None:
            return
        save_checkpoint(self.checkpoint_path, {
            "step": self.step,
            "label": self.label,
            "config": self.config,
            "students": {k: m.state_dict() for k, m in zip(self.slots, self.students)},
            "method": self.method.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in zip(self.slots, self.optimizers)},
            "schedulers": {k: s.state_dict() for k, s in zip(self.slots, self.schedulers)},
            "scaler": self.scaler.state_dict(),
            "rng": {str(r): s for r, s in enumerate(states)},
            "history": self.history,
            "elapsed": self.elapsed,
        })

    def _load(self, path: str) -> None:
        from .checkpoint import CheckpointError

        state = load_checkpoint(path, map_location=self.device)
        try:
            for key, model in zip(self.slots, self.students):
                model.load_state_dict(state["students"][key])
            self.method.load_state_dict(state["method"])
            for key, opt, sched in zip(self.slots, self.optimizers, self.schedulers):
                opt.load_state_dict(state["optimizers"][key])
                sched.load_state_dict(state["schedulers"][key])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path!r} does not fit this run's students/method/optimizers: "
                                  f"{str(exc).splitlines()[0]}") from exc
        for sched in self.schedulers:  # the schedule's length follows the (possibly extended) budget
            sched.lr_lambdas[0].total = self.config["train"]["iters"]
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"].get(str(self.dist.rank), state["rng"]["0"])
        set_rng_state(rng)
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.elapsed = float(state.get("elapsed", 0.0))

    # -- signals ------------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    # -- the loop -----------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.config["train"]
        iters = cfg["iters"]
        main = self.dist.is_main and self.run_dir is not None
        steps_log = CSVLog(os.path.join(self.run_dir, "steps.csv")) if main else None
        evals_log = CSVLog(os.path.join(self.run_dir, "evals.csv")) if main else None
        if main:
            steps_log.truncate(self.step)
            evals_log.truncate(self.step)
        board = TensorBoard(os.path.join(self.run_dir, "tensorboard"), cfg["tensorboard"] and main) \
            if self.run_dir else TensorBoard("", False)
        previous = self._install_signals()
        bar = tqdm(total=iters, initial=self.step, desc=f"train {self.label} s{self.seed}", unit="it",
                   disable=not (self.dist.is_main and cfg["progress"]), dynamic_ncols=True)
        names = student_labels(self.models)
        if self.config["legacy_students"]:
            self.say(config_mod.LEGACY_NOTE)
        self.say(f"{self.label} seed {self.seed}: students {', '.join(names.values())}; steps {self.step}->{iters}, "
                 f"{len(self.train_indices)} training images"
                 + (f" ({len(self.train_set) - len(self.train_indices)} held out)" if self.holdout else "") + ", "
                 + (f"distillation ramp-up over {cfg['distill_ramp']:g} of the steps, " if cfg["distill_ramp"] else "")
                 + f"{self.steps_per_epoch} steps/epoch, device {self.device}"
                 + (f" x{self.dist.world_size}" if self.dist.enabled else "")
                 + (f", amp {self.amp_dtype}" if self.amp_dtype else ""))
        metrics = self._metrics_dict(None)
        try:
            batches = self.batches()
            tick = time.perf_counter()
            while self.step < iters:
                x, y = next(batches)
                total, out = self.train_step(x, y)
                bar.update(1)
                last = self.step == iters
                if self.step % cfg["log_interval"] == 0 or last:
                    row = {"step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch,
                           "loss": total.item(), **{k: v.item() for k, v in out.terms.items()},
                           **{k: float(v) for k, v in out.stats.items()},
                           **{f"lr_{k}": s.get_last_lr()[0] for k, s in zip(self.slots, self.schedulers)}}
                    bar.set_postfix(loss=f"{row['loss']:.3f}")
                    if main:
                        steps_log.write(row)
                    board.scalars("train", row, self.step)
                if self.step % cfg["eval_interval"] == 0 or last:
                    self.elapsed += time.perf_counter() - tick
                    result = self.evaluate(overlays=cfg["overlays"] if last else 0)
                    train_result = self.evaluate_train_subset()
                    row = eval_row(self.step, result, train_result)
                    self.history.append(row)
                    metrics = self._metrics_dict(result, train_result)
                    if main:
                        evals_log.write(row)
                        write_metrics(self.run_dir, metrics)
                    board.scalars("val", row, self.step)
                    bar.write(f"[{self.label} s{self.seed}] step {self.step}: mIoU " + ", ".join(
                        f"{names.get(k, k)} {row[f'miou_{k}']:.4f}" for k in self.result_keys)) \
                        if self.dist.is_main and cfg["progress"] else None
                    tick = time.perf_counter()
                if self.step % cfg["checkpoint_interval"] == 0 or last:
                    self.save()
                if distributed.any_rank(self._stop_signal is not None, self.dist):
                    self.elapsed += time.perf_counter() - tick
                    self.save()
                    signum = self._stop_signal or signal.SIGTERM
                    where = f"; checkpoint {self.checkpoint_path}" if self.run_dir else ""
                    raise TrainingInterrupted(
                        f"{signal.Signals(signum).name} at step {self.step}/{iters}{where}; continue with --resume",
                        int(signum))
        except NonFiniteLossError as exc:
            keep = (f"the last good checkpoint is {self.checkpoint_path}" if self.run_dir and
                    os.path.isfile(self.checkpoint_path) else "no checkpoint was written yet")
            raise NonFiniteLossError(f"{exc}; {keep}") from None
        finally:
            bar.close()
            board.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return metrics

    def _metrics_dict(self, result: dict | None, train_result: dict | None = None) -> dict:
        d = {"method": self.label, "method_name": self.config["method"],
             "method_options": config_mod.method_options(self.config), "seed": self.seed, "step": self.step,
             "iters": self.config["train"]["iters"], "complete": self.step >= self.config["train"]["iters"],
             "distill_ramp": self.config["train"]["distill_ramp"],
             "train_images": len(self.train_indices), "holdout_images": len(self.train_set) - len(self.train_indices),
             "preset": self.config.get("preset"), "dataset": self.config["data"]["dataset"],
             "students": self.models,
             "world_size": self.dist.world_size, "device": str(self.device), "train_seconds": self.elapsed,
             "history": self.history}
        if result is not None:
            d.update(result_summary(result, self.class_names))
        if train_result is not None:
            d["train_miou"] = {k: train_result[k]["miou"] for k in self.result_keys}
            d["train_eval_images"] = len(self.train_eval_indices)
        return d

    def fixed_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first training batch, on the device (the same for every method with the same seed)."""
        x, y = next(iter(self.epoch_loader(0, 0)))
        return x.to(self.device), y.to(self.device)


def run_training(config: dict, run_dir: str, resume: bool = False, overwrite: bool = False,
                 quiet: bool = False) -> dict:
    """Train one run into ``run_dir`` (rank 0 writes it); returns its metrics. Works under ``torchrun``."""
    info = distributed.setup(config["train"]["device"])
    threads = torch.get_num_threads()  # train.cpu_threads applies to this run only
    try:
        config, checkpoint = prepare_run_dir(run_dir, config, resume, overwrite)
        distributed.barrier(info)
        if info.is_main:
            write_run_config(run_dir, config, overwrite)
        distributed.barrier(info)
        trainer = Trainer(config, run_dir, info, resume_from=checkpoint, quiet=quiet)
        if checkpoint and info.is_main:
            trainer.say(f"resuming {run_dir} from step {trainer.step}")
        if resume and trainer.step >= config["train"]["iters"]:
            trainer.say(f"{run_dir} is complete ({trainer.step} steps); nothing to do")
            return read_metrics(run_dir)
        return trainer.fit()
    finally:
        torch.set_num_threads(threads)
        distributed.teardown(info)
