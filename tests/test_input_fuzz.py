"""Property tests of the other inputs a user hands over: the run folders ``ccl-bench report`` reads (missing,
partial, foreign or broken files) and dataset folders with the right layout but broken files. Either the command
works, or it fails with one line naming the file and writes nothing that could pass for a result."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ccl_bench.cli import main
from ccl_bench.data import DataFileError, build_dataset
from tiny_config import TINY_ARGS
from voc_tree import IDS, make_voc_tree

warnings.filterwarnings("ignore", message="ccl_ops: no compiled kernel")
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# -- report ----------------------------------------------------------------------------------------------------
GOOD = {"method": "dml", "seed": 0, "step": 4, "complete": True, "miou": {"cnn": 0.5, "vit": 0.4, "ensemble": 0.6}}
BROKEN_METRICS = {  # name -> content of metrics.json (bytes, or a JSON value)
    "no seed": {k: v for k, v in GOOD.items() if k != "seed"},
    "no miou": {k: v for k, v in GOOD.items() if k != "miou"},
    "seed text": {**GOOD, "seed": "a"},
    "seed float": {**GOOD, "seed": 1.5},
    "seed bool": {**GOOD, "seed": True},
    "method number": {**GOOD, "method": 5},
    "miou list": {**GOOD, "miou": [0.5]},
    "miou percent": {**GOOD, "miou": {"cnn": 54.3, "vit": 0.4, "ensemble": 0.6}},
    "miou text": {**GOOD, "miou": {"cnn": "x"}},
    "complete text": {**GOOD, "complete": "yes"},
    "a list": [GOOD],
    "a string": "metrics",
    "null": None,
    "not JSON": b"{\"method\": ",
    "empty": b"",
    "not UTF-8": b"\xff\xfe\x00{",
}
runs = st.lists(st.tuples(st.sampled_from(["valid"] + sorted(BROKEN_METRICS)), st.sampled_from(["dml", "ccl"]),
                          st.integers(0, 2)), min_size=1, max_size=4)


def _write(path: str, content) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else json.dumps(content).encode())


def _run_report(argv, capsys):
    code = main(["report", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@FUZZ
@given(spec=runs, partial=st.booleans())
def test_report_of_any_run_folder(spec, partial, capsys):
    root = tempfile.mkdtemp(prefix="ccl-report-")
    try:
        runs_dir, out = os.path.join(root, "runs"), os.path.join(root, "out")
        for n, (kind, method, seed) in enumerate(spec):
            content = {**GOOD, "method": method, "seed": seed} if kind == "valid" else BROKEN_METRICS[kind]
            _write(os.path.join(runs_dir, f"r{n}", "metrics.json"), content)
        if partial:  # a run that never got to its first evaluation: no metrics.json, ignored
            _write(os.path.join(runs_dir, "started", "config.yaml"), b"method: dml\n")
        code, table, err = _run_report([runs_dir, "--out", out, "--no-plots"], capsys)
        keys = [(m, s) for k, m, s in spec if k == "valid"]
        ok = len(keys) == len(spec) and len(set(keys)) == len(keys)
        assert code == (0 if ok else 2), err
        if ok:
            assert all(f"| {m} | " in table for m, _ in keys)
            return
        assert err.count("\n") == 1 and err.startswith("ccl-bench report: error: ") and "Traceback" not in err
        assert "metrics.json" in err and runs_dir in err, err  # names the file
        assert not os.path.exists(out)  # nothing written
    finally:
        shutil.rmtree(root)


BROKEN_LOGS = {  # file of a valid run -> content that the plots cannot use
    "steps.csv": [b"\xff\x00garbage\n,,,\n\"", b"loss,ce_a\n1.0,2.0\n", b"step,loss\n1,1.0\n1,2.0\n",
                  b"step,loss\n1,abc\n"],
    "evals.csv": [b"step,miou_cnn\n1,high\n", b"miou_cnn\n0.5\n"],
    "overlays.npz": [b"PK\x03\x04 not a zip", b""],
}


@FUZZ
@given(name=st.sampled_from(sorted(BROKEN_LOGS)), index=st.integers(0, 3))
def test_report_names_a_broken_log_before_writing(name, index, capsys):
    content = BROKEN_LOGS[name][index % len(BROKEN_LOGS[name])]
    root = tempfile.mkdtemp(prefix="ccl-report-")
    try:
        run, out = os.path.join(root, "run"), os.path.join(root, "out")
        _write(os.path.join(run, "metrics.json"), GOOD)
        _write(os.path.join(run, name), content)
        code, _, err = _run_report([run, "--out", out], capsys)
        if name == "overlays.npz" and not content:
            assert code == 2 or os.path.isfile(os.path.join(out, "table.md"))
        else:
            assert code == 2 and err.count("\n") == 1 and os.path.join(run, name) in err, err
        if code == 2:
            assert not os.path.exists(out)
    finally:
        shutil.rmtree(root)


def test_report_of_an_overlays_file_without_its_arrays(tmp_path, capsys):
    _write(str(tmp_path / "run" / "metrics.json"), GOOD)
    np.savez(tmp_path / "run" / "overlays.npz", images=np.zeros((1, 4, 4, 3), np.uint8))
    code, _, err = _run_report([str(tmp_path / "run"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "overlays.npz lacks" in err and not (tmp_path / "out").exists()


# -- dataset folders with broken files ---------------------------------------------------------------------------
def _break(base: str, kind: str, split: str, value: int) -> str:
    """Break the first file of ``split`` in the way ``kind`` says; return the path of the broken file."""
    i = IDS[split][0]
    image, label = os.path.join(base, "JPEGImages", f"{i}.jpg"), os.path.join(base, "SegmentationClass", f"{i}.png")
    if kind == "unreadable image":
        open(image, "wb").write(b"\x00not an image")
        return image
    if kind == "truncated image":
        data = open(image, "rb").read()
        open(image, "wb").write(data[: len(data) // 2])
        return image
    if kind == "label of another size":
        Image.fromarray(np.zeros((5, 7), np.uint8), mode="L").save(label)
    elif kind == "label values out of range":
        grid = np.zeros((12, 16), np.uint8)
        grid[3, 4] = value
        Image.fromarray(grid, mode="L").save(label)
    elif kind == "colour label":
        Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(label)
    elif kind == "truncated label":
        data = open(label, "rb").read()
        open(label, "wb").write(data[: len(data) // 2])
    return label


KINDS = ["unreadable image", "truncated image", "label of another size", "label values out of range",
         "colour label", "truncated label"]


@FUZZ
@given(kind=st.sampled_from(KINDS), split=st.sampled_from(["train", "val"]), value=st.integers(21, 254))
def test_dataset_with_a_broken_file_names_it(kind, split, value):
    root = tempfile.mkdtemp(prefix="ccl-voc-")
    try:
        base = make_voc_tree(root)
        broken = _break(base, kind, split, value)
        dataset = build_dataset("voc", split, root)
        with pytest.raises(DataFileError) as info:
            dataset.check_files()  # the header scan train runs before writing anything ...
            for n in range(len(dataset)):  # ... and loading, for what only the pixels show
                dataset[n]
        text = str(info.value)
        assert repr(broken) in text and "\n" not in text, text
        if kind == "label values out of range":
            assert f"[{value}]" in text
    finally:
        shutil.rmtree(root)


TRAIN = ["train", "--method", "independent", *TINY_ARGS, "--iters", "1"]


@pytest.mark.parametrize("kind", ["unreadable image", "label of another size", "colour label"])
def test_train_on_a_broken_file_stops_before_writing(kind, tmp_path, capsys):
    base = make_voc_tree(tmp_path / "data")
    broken = _break(base, kind, "val", 0)
    out = tmp_path / "run"
    code = main([*TRAIN, "--out", str(out), "--set", "data.dataset=voc", f"data.root={tmp_path / 'data'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and repr(broken) in err, err
    assert not out.exists()


def test_train_on_undefined_label_values_writes_no_result(tmp_path, capsys):
    # only the pixels show this one: training stops at the file with one line and leaves no metrics.json or
    # checkpoint behind (config.yaml and train.log say what was tried)
    base = make_voc_tree(tmp_path / "data")
    for i in IDS["train"]:
        grid = np.full((12, 16), 77, np.uint8)
        Image.fromarray(grid, mode="L").save(os.path.join(base, "SegmentationClass", f"{i}.png"))
    out = tmp_path / "run"
    code = main([*TRAIN, "--out", str(out), "--set", "data.dataset=voc", f"data.root={tmp_path / 'data'}",
                 "data.batch_size=1", "data.eval_batch_size=1", "train.overlays=0", "train.cpu_threads=1"])
    last = capsys.readouterr().err.splitlines()[-1]  # after the trainer's start line
    assert code == 2 and last.startswith("ccl-bench train: error: label ") and "[77]" in last, last
    assert not (out / "metrics.json").exists() and not (out / "checkpoints" / "last.pt").exists()
