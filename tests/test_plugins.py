"""Methods from outside the package (issue #25): ``--plugin`` files and modules, installed entry points, the
checks every registered method passes, and the example plugin ``examples/my_method``."""
from __future__ import annotations

import json
import os
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.testing import assert_close

from ccl_bench.cli import main
from ccl_bench.methods import METHODS, StudentOutput, build_method, method_class, method_names, plugins, registry
from tiny_config import TINY_ARGS

warnings.filterwarnings("ignore", message="ccl_ops: no compiled kernel")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "my_method", "my_method.py")
TINY = [*TINY_ARGS, "--set", "train.overlays=0", "train.cpu_threads=1"]
TEST_MODULES = ("ep_demo_method", "ep_demo_class", "ep_broken_method")


def _forget_plugins(before: dict) -> None:
    """The registry as in a fresh process: no plugin methods, no plugin modules (the built-ins stay)."""
    for name in set(METHODS) - set(before):
        del METHODS[name]
    plugins._LOADED.clear()
    for name in [m for m in sys.modules if m.startswith(registry.PLUGIN_MODULE_PREFIX) or m in TEST_MODULES]:
        del sys.modules[name]


@pytest.fixture(autouse=True)
def clean_registry():
    before = dict(METHODS)
    yield
    _forget_plugins(before)
    assert METHODS == before


def _plugin(tmp_path, body: str, name: str = "plugin.py") -> str:
    path = tmp_path / name
    path.write_text("from ccl_bench.methods import Method, MethodOutput, register\n\n" + textwrap.dedent(body))
    return str(path)


# -- (a) a plugin file through compare, and train --resume without the flag -----------------------------------
def test_compare_with_a_plugin_file_then_resume_without_the_flag(tmp_path, capsys):
    before = dict(METHODS)
    out = str(tmp_path / "cmp")
    assert "confidence-dml" not in method_names()
    assert main(["compare", "--plugin", os.path.relpath(EXAMPLE), "--methods", "dml,confidence-dml", "--seeds", "0",
                 "--iters", "2", "--baseline", "dml", "--no-plots", "--out", out, *TINY]) == 0
    table = capsys.readouterr().out
    assert "| dml | 1 |" in table and "| confidence-dml | 1 |" in table, table
    run = os.path.join(out, "confidence-dml", "seed0")
    with open(os.path.join(run, "config.yaml")) as f:
        assert yaml.safe_load(f)["plugins"] == [EXAMPLE]  # recorded as an absolute path
    _forget_plugins(before)  # as in a new process: only the run's config knows the plugin
    assert "confidence-dml" not in method_names()
    assert main(["train", "--out", run, "--resume", "--iters", "3", *TINY]) == 0
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert (metrics["method"], metrics["step"]) == ("confidence-dml", 3)


# -- (b) entry points of the group ccl_bench.methods, without pip ---------------------------------------------
def _distribution(tmp_path, name: str, entry_points: str, modules: dict[str, str]) -> None:
    info = tmp_path / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ccl_bench.methods]\n" + entry_points)
    for module, body in modules.items():
        _plugin(tmp_path, body, f"{module}.py")


DEMO = """
    {decorator}
    class Demo(Method):
        name = "{name}"
        description = "a demo plugin"
        defaults = {{"weight_demo": 0.5, "mode": "a"}}
        choices = {{"mode": ["a", "b"]}}

        def losses(self, out_a, out_b, y):
            return MethodOutput(self.ce_terms(out_a, out_b, y))
"""


def test_installed_entry_points_are_loaded_on_the_first_look_up(tmp_path, monkeypatch, capsys):
    _distribution(tmp_path, "ep-demo", "ep-demo = ep_demo_method\nep-demo-class = ep_demo_class:Demo\n", {
        "ep_demo_method": DEMO.format(decorator="@register", name="ep-demo"),
        "ep_demo_class": DEMO.format(decorator="", name="ep-demo-class")})  # a class: registered by the loader
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    assert {"ep-demo", "ep-demo-class"} <= set(method_names())
    assert method_class("ep-demo-class").__module__ == "ep_demo_class"
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "ep-demo-class   a demo plugin" in listing and "plugin: ep_demo_class" in listing
    assert "options: weight_demo=0.5, mode='a'" in listing


def test_a_broken_entry_point_is_one_line_naming_it_and_its_distribution(tmp_path, monkeypatch, capsys):
    _distribution(tmp_path, "ep-broken", "ep-broken = ep_broken_method\n",
                  {"ep_broken_method": "import no_such_module_anywhere\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    with pytest.raises(ValueError, match=r"entry point ep-broken = ep_broken_method \(group ccl_bench.methods\) "
                                         r"of distribution ep-broken 0.1: ModuleNotFoundError: .*no_such_module"):
        method_names()
    assert main(["methods"]) == 2  # still an error on the next look-up, as one line
    err = capsys.readouterr().err
    assert err.startswith("ccl-bench methods: error: entry point ep-broken") and err.count("\n") == 1


# -- (c) a plugin is checked like a built-in method -----------------------------------------------------------
METHOD = """
    @register
    class Mine(Method):
        name = {name!r}
        defaults = {defaults}
        choices = {choices}
    {losses}
"""
LOSSES = """
        def losses(self, out_a, out_b, y):
            return MethodOutput(self.ce_terms(out_a, out_b, y))
"""


def _method_file(tmp_path, name="mine", defaults="{}", choices="{}", losses=LOSSES) -> str:
    return _plugin(tmp_path, METHOD.format(name=name, defaults=defaults, choices=choices, losses=losses))


@pytest.mark.parametrize("kwargs,message", [
    ({"name": "dml"}, "name 'dml' is already registered by DML of 'ccl_bench.methods.dml'; expected a unique name"),
    ({"name": "my method"}, "name='my method'; expected a non-empty string without ':', ',' or whitespace"),
    ({"name": "a:b"}, "name='a:b'; expected a non-empty string without"),
    ({"losses": ""}, "does not override losses; expected losses(self, out_a, out_b, y)"),
    ({"defaults": "[1]"}, "defaults=[1]; expected a dict of option name -> default value"),
    ({"defaults": "{'w': {'a': 1}}"}, "defaults {'w': {'a': 1}}; expected str option names with bool, int"),
    ({"defaults": "{'w': (1, 2)}"}, "defaults {'w': (1, 2)}; expected str option names with bool, int"),
    ({"defaults": "{'mode': 'c'}", "choices": "{'mode': ['a', 'b']}"},
     "defaults['mode']='c', choices['mode']=['a', 'b']; expected a list of allowed values holding the default"),
    ({"choices": "{'mode': ['a']}"}, "choices['mode']: no such option; expected options of defaults []"),
])
def test_a_bad_method_class_is_one_line_naming_the_file_and_the_class(tmp_path, capsys, kwargs, message):
    path = _method_file(tmp_path, **kwargs)
    with pytest.raises(registry.RegistrationError) as exc:
        plugins.load_plugin(path)
    assert str(exc.value).startswith(f"method class Mine of {path!r}: {message}"), str(exc.value)
    assert "mine" not in METHODS and METHODS["dml"].__module__ == "ccl_bench.methods.dml"
    assert main(["methods", "--plugin", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ccl-bench methods: error: method class Mine of {path!r}: {message}")
    assert err.count("\n") == 1


@pytest.mark.parametrize("source,message", [
    ("def broken(:\n", "cannot import it (SyntaxError: "),
    ("import no_such_module_anywhere\n", "cannot import it (ModuleNotFoundError: No module named "),
    (None, "no such file; expected a path to a .py file"),
])
def test_a_plugin_file_that_does_not_import_is_one_line_naming_it(tmp_path, capsys, source, message):
    path = tmp_path / "bad.py"
    if source is not None:
        path.write_text(source)
    assert main(["compare", "--plugin", str(path), "--methods", "dml", "--out", str(tmp_path / "cmp"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ccl-bench compare: error: plugin {str(path)!r}: {message}") and err.count("\n") == 1
    assert not (tmp_path / "cmp").exists()
    assert not [m for m in sys.modules if m.startswith(registry.PLUGIN_MODULE_PREFIX + "bad_")]


def test_the_config_key_is_checked_and_names_itself(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--out", out, *TINY, "--set", "plugins=5"]) == 2
    assert "plugins=5; expected a list of module names or .py file paths" in capsys.readouterr().err
    assert main(["train", "--out", out, *TINY, "--set", "plugins=[no_such_plugin_module]"]) == 2
    assert "error: plugins: plugin 'no_such_plugin_module': cannot import it" in capsys.readouterr().err
    # a plugin named in a config (not on the command line) makes its method valid there
    assert main(["train", "--out", out, *TINY, "--iters", "1", "--set", f"plugins=[{EXAMPLE}]",
                 "method=confidence-dml"]) == 0


def test_the_same_file_loads_once_and_builtins_pass_the_checks():
    first = plugins.load_plugins([EXAMPLE, os.path.relpath(EXAMPLE)])
    assert first == [EXAMPLE] and plugins.load_plugins([EXAMPLE]) == first
    assert method_class("confidence-dml").__module__.startswith(registry.PLUGIN_MODULE_PREFIX)
    for name in ("ccl", "dml", "independent", "kdcl-general"):
        registry._check(METHODS[name])
    with pytest.raises(registry.RegistrationError, match="expected a subclass of ccl_bench.methods.Method"):
        registry.register(dict)


# -- (d) the example method's loss ----------------------------------------------------------------------------
def test_example_confidence_weighted_kl_matches_the_formula():
    plugins.load_plugin(EXAMPLE)
    g = torch.Generator().manual_seed(0)
    za, zb = (torch.randn(2, 5, 6, 6, generator=g, dtype=torch.float64).mul(2).requires_grad_() for _ in "ab")
    y = torch.randint(0, 5, (2, 6, 6), generator=g)
    y[0, :2] = 255
    t, lam = 2.0, 0.5
    out = build_method("confidence-dml", (None, None), 5, 255, temperature=t, lambda_kl=lam)(
        StudentOutput(za), StudentOutput(zb), y)
    valid = y != 255

    def expected(student, teacher):
        p = torch.softmax(teacher.detach() / t, 1)
        kl = F.kl_div(torch.log_softmax(student / t, 1), p, reduction="none").sum(1)
        return lam * t * t * (p.max(1).values * kl)[valid].sum() / valid.sum()

    assert_close(out.terms["kl_a"], expected(za, zb))
    assert_close(out.terms["kl_b"], expected(zb, za))
    assert_close(out.terms["ce_a"], F.cross_entropy(za, y, ignore_index=255))
    dml = build_method("dml", (None, None), 5, 255, temperature=t, lambda_kl=lam)(
        StudentOutput(za), StudentOutput(zb), y)
    assert not torch.allclose(out.terms["kl_a"], dml.terms["kl_a"])  # the weights change the loss
    grad_za, grad_zb = torch.autograd.grad(out.terms["kl_a"], [za, zb], allow_unused=True)
    assert grad_za.abs().max() > 0 and (grad_zb is None or grad_zb.abs().max() == 0)  # teacher and weight detached
