"""Equal-budget tuning (issue #24, ``ccl-bench tune``): the declared search spaces, the study (defaults first,
seeded draws, an interrupted study replays to the same trials), its refusals, and one tiny study end to end."""
from __future__ import annotations

import os
import warnings

import pytest
import yaml

from ccl_bench.cli import main
from ccl_bench.config import load_config
from ccl_bench.methods import METHODS, Knob, Method, MethodOutput, method_class, registry
from ccl_bench.tune import N_STARTUP, run_study, score
from tiny_config import TINY_ARGS, TINY_FILE

warnings.filterwarnings("ignore", message="ccl_ops: no compiled kernel")
TINY = [*TINY_ARGS, "--set", "train.overlays=0", "train.cpu_threads=1", "train.iters=2", "train.eval_interval=2"]


# -- the declared knobs ---------------------------------------------------------------------------------------
def test_every_method_but_independent_declares_its_own_knobs():
    spaces = {name: set(cls.search_space) for name, cls in METHODS.items() if cls.__module__.startswith("ccl_bench")}
    assert spaces["independent"] == set()
    assert spaces["dml"] == {"temperature", "lambda_kl"}
    for name in ("kdcl-naive", "kdcl-linear", "kdcl-minlogit", "kdcl-general"):
        assert spaces[name] == {"temperature", "lambda_kl"}, name
    assert spaces["ccl"] == {"lambda_hfd", "lambda_rbsd", "lambda_pbsd", "temperature"}


def _method(**attrs) -> type:
    body = {"name": "mine", "defaults": {"w": 1.0, "flag": True},
            "losses": lambda self, a, b, y: MethodOutput({}), **attrs}
    return type("Mine", (Method,), body)


@pytest.mark.parametrize("space,message", [
    ({"flag": Knob(0.1, 1.0)}, "search_space['flag']: expected a float option of defaults"),
    ({"nope": Knob(0.1, 1.0)}, "search_space['nope']: expected a float option of defaults"),
    ({"w": (0.1, 2.0)}, "search_space['w']=(0.1, 2.0); expected Knob(low, high)"),
    ({"w": Knob(2.0, 0.5)}, "expected Knob(low, high) with 0 <= low < high"),
    ({"w": Knob(0.0, 2.0)}, "(low > 0 on a log scale)"),
    ({"w": Knob(2.0, 4.0)}, "leaves out the default 1.0"),
])
def test_a_bad_search_space_is_refused_at_registration(space, message):
    with pytest.raises(registry.RegistrationError) as exc:
        registry.register(_method(search_space=space))
    assert message in str(exc.value)
    assert "mine" not in METHODS
    registry._check(_method(search_space={"w": Knob(0.0, 2.0, log=False)}))  # linear scale from 0 is fine


# -- the study -------------------------------------------------------------------------------------------------
def _fake_trainer(calls: list):
    """A trial that records its options like a run folder does and scores a smooth function of them."""
    def train_trial(options, folder):
        calls.append(dict(options))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.yaml"), "w") as f:
            yaml.safe_dump({"methods": {"dml": options}}, f)
        m = 0.5 - (options["temperature"] - 2.5) ** 2 / 10 - (options["lambda_kl"] - 0.5) ** 2 / 20
        return {"miou": {"cnn": m, "vit": m + 0.1, "ensemble": m + 0.2}}
    return train_trial


def test_the_study_starts_from_the_defaults_and_replays_to_the_same_trials(tmp_path):
    dml = method_class("dml")
    first = []
    table = run_study(dml, 6, 0, str(tmp_path / "a"), _fake_trainer(first))
    assert first[0] == {k: dml.defaults[k] for k in dml.search_space}
    assert len({tuple(c.values()) for c in first}) == 6  # every draw new
    for c in first:
        for key, knob in dml.search_space.items():
            assert knob.low <= c[key] <= knob.high
    assert list(table["score"]) == sorted(table["score"], reverse=True)
    # interrupted after 3 trials, then continued to 6: the same draws as the uninterrupted study
    again = []
    run_study(dml, 3, 0, str(tmp_path / "b"), _fake_trainer(again))
    run_study(dml, 6, 0, str(tmp_path / "b"), _fake_trainer(again))
    assert again[3:] == first
    assert again[:3] == first[:3]
    # another sampler seed: the same first trial (the defaults), other draws
    other = []
    run_study(dml, N_STARTUP, 1, str(tmp_path / "c"), _fake_trainer(other))
    assert other[0] == first[0] and other[1] != first[1]


def test_best_yaml_is_a_config_that_runs_the_best_trial(tmp_path):
    out = str(tmp_path / "study")
    table = run_study(method_class("dml"), 5, 0, out, _fake_trainer([]))
    best = table.iloc[0]
    assert best["score"] == pytest.approx(score({"miou": {"cnn": best["miou_cnn"], "vit": best["miou_vit"]}}))
    config = load_config(None, [TINY_FILE, os.path.join(out, "best.yaml")], [], method="dml")
    assert config["label"] == "dml+tuned"
    assert config["methods"]["dml"] == {"temperature": best["temperature"], "lambda_kl": best["lambda_kl"]}
    assert len(open(os.path.join(out, "trials.csv")).read().splitlines()) == 1 + 5


def test_a_changed_study_is_refused_before_it_mixes_trials(tmp_path):
    from ccl_bench.tune import check_recorded

    out = str(tmp_path / "study")
    calls = []
    run_study(method_class("dml"), 3, 0, out, _fake_trainer(calls))
    check_recorded("dml", calls[1], os.path.join(out, "trial1"))  # the recorded draw: fine
    with pytest.raises(ValueError, match=r"trial1 ran dml with .*the replayed study draws .*use another --out"):
        check_recorded("dml", {**calls[1], "lambda_kl": 0.3}, os.path.join(out, "trial1"))


def test_a_method_without_knobs_or_with_no_trials_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'independent' declares no knobs"):
        run_study(method_class("independent"), 8, 0, str(tmp_path), _fake_trainer([]))
    with pytest.raises(ValueError, match=r"--trials 0: expected an int >= 1"):
        run_study(method_class("dml"), 0, 0, str(tmp_path), _fake_trainer([]))


# -- the command -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--method", "dml", "--held-out", "data.options.seed=0"], "the validation images are the same as without it"),
    (["--method", "dml", "--held-out", "train.iters=3"], "expected data.KEY=VALUE items"),
    (["--method", "dml:temperature=2.0", "--held-out", "data.options.seed=1"], "fixes ['temperature'], which tune"),
    (["--method", "independent", "--held-out", "data.options.seed=1"], "declares no knobs"),
])
def test_tune_refuses_the_reported_split_and_fixed_knobs(tmp_path, capsys, argv, message):
    out = tmp_path / "study"
    assert main(["tune", *argv, "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ccl-bench tune: error: ") and message in err, err
    assert not (out / "trial0").exists()


def test_tune_end_to_end_on_the_held_out_copy(tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["tune", "--method", "dml", "--trials", "2", "--held-out", "data.options.seed=1", "--out", str(out), *TINY]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    header, _, *rows = printed.splitlines()
    assert header.split("|")[1].strip() == "trial" and sorted(r.split("|")[1].strip() for r in rows) == ["0", "1"]
    trial0 = yaml.safe_load((out / "trial0" / "config.yaml").read_text())
    assert trial0["data"]["options"]["seed"] == 1  # trained and scored on the held-out copy
    assert trial0["methods"]["dml"] == {"temperature": 1.0, "lambda_kl": 1.0}
    assert (out / "best.yaml").is_file() and (out / "trial1" / "metrics.json").is_file()
    assert main(argv) == 0  # a finished study is reused, trial by trial
    assert capsys.readouterr().err.count("is complete; reusing it") == 2


def test_the_tuning_gain_pairs_each_tuned_run_with_the_default_run_of_its_seed(tmp_path):
    import importlib.util
    import json

    path = os.path.join(os.path.dirname(__file__), "..", "docs", "results3", "tuning_gain.py")
    spec = importlib.util.spec_from_file_location("tuning_gain", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    values = {("dml", 0): 0.50, ("dml", 1): 0.60, ("dml", 2): 0.70, ("dml+tuned", 0): 0.52, ("dml+tuned", 1): 0.63,
              ("dml+tuned", 2): 0.74, ("ccl", 0): 0.40, ("ccl+tuned", 5): 0.9}  # ccl: no common seed
    for (method, seed), a in values.items():
        run = tmp_path / method / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps(
            {"method": method, "seed": seed, "step": 1, "miou": {"a": a, "b": a / 2, "ensemble": a}}))
    runs = module.load_runs([str(tmp_path)])
    tuned = runs["method"].str.endswith("+tuned")
    table = module.tuning_gain(runs[~tuned], runs[tuned], ["dml", "ccl"]).set_index("method")
    assert list(table.index) == ["dml"] and table.loc["dml", "seeds"] == 3
    # per-seed gains 2, 3 and 4 points: mean 3, t(0.975, 2) = 4.303 times 1 / sqrt(3)
    assert table.loc["dml", "tuned − defaults A"] == "+3.00 [+0.52, +5.48] *"
    assert table.loc["dml", "tuned − defaults B"] == "+1.50 [+0.26, +2.74] *"
