"""The quick regime learns: a reduced budget of the `quick` preset lifts both students clearly off the
all-background solution (a correctness test of data, students, engine and schedule together, not a timing)."""
from __future__ import annotations

import pytest

from ccl_bench.config import load_config
from ccl_bench.engine.trainer import run_training

# Predicting background everywhere scores about 0.076 mIoU on the digits validation set (background IoU 0.83,
# the ten digit classes 0, mean over 11). 150 of the preset's steps give about 0.5 (CNN) and 0.3 (ViT).
FLOOR = 0.08


@pytest.mark.slow
def test_quick_preset_independent_training_leaves_the_all_background_solution(tmp_path):
    config = load_config("quick", None, ["train.progress=false", "train.overlays=0", "data.val_limit=200"],
                         method="independent", **{"train.iters": 150})
    metrics = run_training(config, str(tmp_path / "run"), quiet=True)
    assert metrics["complete"]
    assert metrics["miou"]["a"] > FLOOR + 0.15, metrics["miou"]
    assert metrics["miou"]["b"] > FLOOR + 0.10, metrics["miou"]
    digit_iou = {k: sum(v[1:]) / 10 for k, v in metrics["iou"].items()}
    assert min(digit_iou["a"], digit_iou["b"]) > 0.05, digit_iou


@pytest.mark.slow
def test_small_data_pipeline_learns_and_reports_train_miou(tmp_path):
    # The positive-control regime's pipeline (280 images, 28 held out, the training-subset evaluation) on a
    # reduced budget: both students clearly off the floor on validation and on the fixed training subset.
    config = load_config("small-data", None, ["train.progress=false", "train.overlays=0", "data.val_limit=100",
                                              "data.train_eval_images=64"],
                         method="independent", **{"train.iters": 150, "train.eval_interval": 150})
    metrics = run_training(config, str(tmp_path / "run"), quiet=True)
    assert metrics["complete"] and metrics["train_images"] == 252 and metrics["holdout_images"] == 28
    for split in ("miou", "train_miou"):
        assert metrics[split]["a"] > FLOOR + 0.15, metrics[split]
        assert metrics[split]["b"] > FLOOR + 0.10, metrics[split]
