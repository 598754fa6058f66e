"""The kernel benchmark runs end to end on a tiny shape and reports every column it promises."""
import pandas as pd
import pytest

from ccl_bench.cli import main


def test_kernels_benchmark_writes_its_table(tmp_path, capsys):
    assert main(["kernels", "--shapes", "1x3x16x20", "--reps", "2", "--warmup", "1", "--impls", "eager,fused",
                 "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "kernels_cpu.csv")
    assert set(table.impl) == {"eager", "fused"}
    assert set(table.op) == {"pixel_selective_kl", "pixel_selective_kl_peers", "region_direction_mask"}
    assert (table[table.op == "pixel_selective_kl_peers"].students == 3).all()
    for column in ("fwd_ms", "fwd_bwd_ms", "fwd_GBps", "peak_extra_MB", "copy_GBps", "fwd_bwd_x_vs_eager",
                   "pct_of_copy_bw", "x_floor", "fwd_thread_speedup"):
        assert column in table
    kl = table[table.op == "pixel_selective_kl"]
    assert (kl.fwd_bwd_ms > 0).all() and (kl.copy_GBps > 0).all() and (kl.x_floor > 0).all()
    assert (table[table.impl == "fused"].fwd_thread_speedup > 0).all()
    assert table[table.impl == "eager"].fwd_x_vs_eager.eq(1).all()  # a ratio within each round
    # forward+backward of a fused op allocates at least its gradients, one per student
    for op, students in (("pixel_selective_kl", 2), ("pixel_selective_kl_peers", 3)):
        fused = table[(table.op == op) & (table.impl == "fused")].iloc[0]
        assert fused.peak_extra_logits >= students and fused.fwd_bwd_ms > 0
    markdown = (tmp_path / "kernels_cpu.md").read_text()
    assert "| op" in markdown and "alloc_fill_2_logits_ms" in markdown and "allocator" in markdown
    assert "ccl-bench kernels" in capsys.readouterr().out


def test_interleaved_timing_runs_every_call_once_a_round_in_rotating_order():
    import torch

    from ccl_bench.kernels import Timed, interleaved_ms

    order, threads = [], torch.get_num_threads()
    seen = {}

    def call(name):
        def fn(i):
            order.append((name, i))
            seen[name] = torch.get_num_threads()
        return fn

    times = interleaved_ms({"a": Timed(call("a")), "b": Timed(call("b"), threads=1)}, torch.device("cpu"),
                           warmup=1, reps=2)
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}
    assert order == [("a", 0), ("b", 0), ("a", 0), ("b", 0), ("b", 1), ("a", 1)]
    assert seen["b"] == 1 and torch.get_num_threads() == threads


@pytest.mark.parametrize("args, message", [
    (["--shapes", "1x3x16"], "each shape is NxCxHxW"),
    (["--dtypes", "float8"], "--dtypes: unknown"),
    (["--ops", "softmax"], "--ops: unknown"),
    (["--students", "9"], "--students: 9; expected 2 to 8"),
])
def test_kernels_benchmark_rejects_bad_arguments(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        main(["kernels", "--out", str(tmp_path), *args])


@pytest.mark.parametrize("env, expected", [
    ({}, "default (glibc malloc)"),
    ({"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "1000"},
     "glibc malloc, MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1000"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}, "tcmalloc (LD_PRELOAD)"),
])
def test_the_table_names_the_allocator_and_its_tunables(monkeypatch, env, expected):
    """A table made with glibc tuned to keep its memory must not read as one made with the default."""
    import os

    import torch

    from ccl_bench.kernels.bench import allocator_description

    for name in [k for k in os.environ if k.startswith("MALLOC_")] + ["LD_PRELOAD", "GLIBC_TUNABLES",
                                                                      "THP_MEM_ALLOC_ENABLE"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert allocator_description(torch.device("cpu")) == expected
