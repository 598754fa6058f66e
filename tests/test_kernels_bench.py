"""The kernel benchmark runs end to end on a tiny shape and reports every column it promises."""
import pandas as pd
import pytest

from ccl_bench.cli import main


def test_kernels_benchmark_writes_its_table(tmp_path, capsys):
    assert main(["kernels", "--shapes", "1x3x16x20", "--reps", "2", "--warmup", "1", "--impls", "eager,fused",
                 "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "kernels_cpu.csv")
    assert set(table.impl) == {"eager", "fused"} and set(table.op) == {"pixel_selective_kl", "region_direction_mask"}
    for column in ("fwd_ms", "fwd_bwd_ms", "fwd_GBps", "peak_extra_MB", "copy_GBps", "fwd_bwd_x_vs_eager",
                   "pct_of_copy_bw"):
        assert column in table
    kl = table[table.op == "pixel_selective_kl"]
    assert (kl.fwd_bwd_ms > 0).all() and (kl.copy_GBps > 0).all()
    # forward+backward of the fused op allocates at least its two gradients
    fused = kl[kl.impl == "fused"].iloc[0]
    assert fused.peak_extra_logits >= 2
    assert "| op" in (tmp_path / "kernels_cpu.md").read_text()
    assert "ccl-bench kernels" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--shapes", "1x3x16"], "each shape is NxCxHxW"),
    (["--dtypes", "float8"], "--dtypes: unknown"),
    (["--ops", "softmax"], "--ops: unknown"),
])
def test_kernels_benchmark_rejects_bad_arguments(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        main(["kernels", "--out", str(tmp_path), *args])
