"""Equal-budget tuning of one method's own knobs (``ccl-bench tune``).

Every method gets the same number of trials over the knobs it declares (``Method.search_space``): trial 0 runs
the method's defaults, trials 1 to ``N_STARTUP - 1`` are drawn at random and the rest by Optuna's TPE sampler,
all from one fixed sampler seed. Each trial is one training run (one seed) on a held-out copy of the data,
never on the split a report shows, and scores the mean of the students' final validation mIoU on that copy.

Trials are run folders ``trial<k>`` under the study's folder: a finished one is reused, a started one resumed.
A restarted study replays the recorded trials through the same seeded sampler, so it draws what an
uninterrupted study would have drawn, and a recorded trial whose options differ from the replayed draw is an
error (the study's settings changed). The result is ``trials.csv`` and ``best.yaml``, a config file that runs
the chosen options under the label ``<method>+tuned`` (``ccl-bench train --config best.yaml``).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

import yaml

from .student_names import ENSEMBLE

if TYPE_CHECKING:
    import pandas as pd

    from .methods.base import Knob

N_STARTUP = 4  # trials before TPE models the scores: the defaults and three random draws
TRIALS = 8  # the default budget, the same for every method


def score(metrics: dict) -> float:
    """What a trial maximises: the mean of the students' final validation mIoU."""
    students = [v for k, v in metrics["miou"].items() if k != ENSEMBLE]
    return sum(students) / len(students)


def _distributions(space: dict[str, Knob]) -> dict:
    from optuna.distributions import FloatDistribution

    return {key: FloatDistribution(k.low, k.high, log=k.log) for key, k in space.items()}


def new_study(space: dict[str, Knob], defaults: dict, sampler_seed: int):
    """A maximising study whose first trial is the defaults, then ``N_STARTUP - 1`` random draws, then TPE."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=N_STARTUP)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial({key: float(defaults[key]) for key in space})
    return study


def run_study(method_cls, trials: int, sampler_seed: int, out: str,
              train_trial: Callable[[dict, str], dict]) -> pd.DataFrame:
    """Run (or continue) ``trials`` trials of ``method_cls``'s search space into ``out``.

    ``train_trial(options, folder)`` trains one trial with the method's ``options`` (the knobs' values) into
    ``folder`` (reusing or resuming what is there) and returns its metrics. Writes ``trials.csv`` and
    ``best.yaml`` into ``out`` and returns the trials table, best first.
    """
    import pandas as pd

    space = method_cls.search_space
    if not space:
        raise ValueError(f"method {method_cls.name!r} declares no knobs (search_space is empty): there is nothing "
                         f"to tune; its defaults are its only configuration")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"--trials {trials!r}: expected an int >= 1 (the same budget for every method)")
    study = new_study(space, method_cls.defaults, sampler_seed)
    rows = []
    for k in range(trials):
        trial = study.ask(_distributions(space))
        options = dict(trial.params)
        metrics = train_trial(options, os.path.join(out, f"trial{k}"))
        value = score(metrics)
        study.tell(trial, value)
        rows.append({"trial": k, **options, "score": value, **{f"miou_{s}": v for s, v in metrics["miou"].items()}})
    table = pd.DataFrame(rows)
    table.to_csv(os.path.join(out, "trials.csv"), index=False)
    best = table.loc[table["score"].idxmax()]  # the first of equal scores: the defaults win ties
    _write_best(method_cls, {key: float(best[key]) for key in space}, int(best["trial"]), float(best["score"]),
                trials, sampler_seed, out)
    return table.sort_values("score", ascending=False, kind="stable")


def _write_best(method_cls, options: dict, trial: int, value: float, trials: int, sampler_seed: int,
                out: str) -> None:
    header = (f"# ccl-bench tune: the best of {trials} trials of {method_cls.name} (trial {trial}, score {value:.4f} = "
              f"mean of the students' final mIoU on the held-out copy);\n# sampler: defaults first, "
              f"{N_STARTUP - 1} random, then TPE, seed {sampler_seed}. Trials: trials.csv beside this file.\n"
              f"# Run it: ccl-bench train --config best.yaml (with the same preset, on the reported data)\n")
    body = {"label": f"{method_cls.name}+tuned", "methods": {method_cls.name: options}}
    with open(os.path.join(out, "best.yaml"), "w") as f:
        f.write(header + yaml.safe_dump(body, sort_keys=False))


def check_recorded(method: str, options: dict, folder: str) -> None:
    """A trial folder that was started must have run ``options``: else the study's settings changed."""
    saved = os.path.join(folder, "config.yaml")
    if not os.path.isfile(saved):
        return
    with open(saved) as f:
        recorded = (yaml.safe_load(f).get("methods") or {}).get(method) or {}
    differ = {key: recorded.get(key) for key, value in options.items() if recorded.get(key) != value}
    if differ:
        raise ValueError(f"{folder} ran {method} with {differ}, but the replayed study draws "
                         f"{ {key: options[key] for key in differ} }: the study's settings (sampler seed, search "
                         f"space, method options) are not the ones it was started with; use another --out")
