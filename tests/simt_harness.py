"""Build and drive the SIMT harness (tests/simt): the project's CUDA kernels executed on the CPU.

``build()`` compiles tests/simt/harness.cpp with g++ under AddressSanitizer and UBSan, cached under
build/simt/ by a hash of every source, flag and the compiler; ``run()`` writes each case's inputs as exact-size
buffers, runs the harness once over all cases and reads the outputs back as tensors.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import ccl_ops

# ucontext fibers, ELF symbol tables and the x86 MXCSR (fast-math model): Linux x86-64 only.
SUPPORTED = sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")
ROOT = Path(__file__).resolve().parents[1]
SIMT = ROOT / "tests" / "simt"
CACHE = ROOT / "build" / "simt"
# Everything the harness is compiled from, relative to ROOT.
SOURCES = (
    "tests/simt/simt.h",
    "tests/simt/simt_runtime.h",
    "tests/simt/harness.cpp",
    "csrc/ops/kinds.h",
    "csrc/cuda/pixel_math.cuh",
    "csrc/cuda/selective_kl_pixel.cuh",
    "csrc/cuda/pixel_selective_kl_kernel.cuh",
    "csrc/cuda/pixel_selective_kl_peers_kernel.cuh",
    "csrc/cuda/region_direction_mask_kernel.cuh",
)
FLAGS = (
    "-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer",
    "-fsanitize=address,undefined", "-fsanitize=bounds-strict", "-fno-sanitize-recover=all",
    "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",  # '#pragma unroll' is nvcc's
)
ENV = {
    # Leak checking needs ptrace, which containers often forbid; every buffer is freed anyway.
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1:detect_stack_use_after_return=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}
# rule -> its integer code in the C++ harness (enum Rule in csrc/ops/kinds.h), one for each of ccl_ops.RULES
RULE_CODES = {"correct": 0, "confidence": 1, "all": 2}
assert tuple(RULE_CODES) == ccl_ops.RULES, (tuple(RULE_CODES), ccl_ops.RULES)
# learners -> the selection bits (csrc/ops/kinds.h) whose losses the forward kernel sums
LEARNER_BITS = {"both": 3, "a": 2, "b": 1}
assert tuple(LEARNER_BITS) == ccl_ops.LEARNERS, (tuple(LEARNER_BITS), ccl_ops.LEARNERS)
# Outputs the harness writes, with their dtypes (acc: float64 for float64 inputs, else float32).
OUTPUT_DTYPES = {
    "loss_a": "acc", "loss_b": "acc", "norm": "acc", "count_ab": torch.int64, "count_ba": torch.int64,
    "selection": torch.uint8, "grad_za": "scalar", "grad_zb": "scalar", "direction": torch.int8,
    "scores": torch.float32, "part_kl": torch.float64, "part_count": torch.int64,
    "losses": "acc", "counts": torch.int64, "learners": torch.uint8,
    **{f"grad{s}": "scalar" for s in range(8)},  # pixel_selective_kl_peers: up to kMaxPeers students
}


def compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"the SIMT harness needs a C++ compiler ({cxx!r} not found; set CXX)")
    return cxx


def build(defines: tuple[str, ...] = (), mutate=None, name: str = "harness") -> Path:
    """The harness binary for these -D defines; ``mutate(relpath, text) -> text`` edits a copy of the sources."""
    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    texts = {rel: (ROOT / rel).read_text() for rel in SOURCES}
    if mutate is not None:
        texts = {rel: mutate(rel, text) for rel, text in texts.items()}
    torch_inc = Path(torch.__file__).parent / "include"
    h = hashlib.sha256("\0".join([version, torch.__version__, *FLAGS, *defines]).encode())
    for rel in SOURCES:
        h.update(rel.encode() + b"\0" + texts[rel].encode())
    out = CACHE / f"{name}-{h.hexdigest()[:16]}"
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for rel, text in texts.items():
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / rel).write_text(text)
        exe = Path(tmp) / "harness"
        cmd = [cxx, *FLAGS, *(f"-D{d}" for d in defines), "-x", "c++", "-include", f"{tmp}/tests/simt/simt.h",
               f"-I{torch_inc}", f"{tmp}/tests/simt/harness.cpp", "-o", str(exe)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the SIMT harness failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
        os.replace(exe, out)
    return out


def mutator(mutations):
    """A ``build(mutate=...)`` function from ``(file, original, mutated)`` replacements in the harness's sources;
    each original text must stand exactly once in its file (so that a changed kernel cannot silently drop one)."""
    mutations = list(mutations)

    def mutate(rel: str, text: str) -> str:
        for file, original, mutated in mutations:
            if file == rel:
                assert text.count(original) == 1, f"mutation site not found exactly once in {rel}: {original!r}"
                text = text.replace(original, mutated)
        return text
    return mutate


def _exact(t: torch.Tensor, poison) -> torch.Tensor:
    """The elements t's strides can reach, as one flat buffer; the gaps between them hold `poison`."""
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) if t.numel() else 0
    buf = torch.full((span,), poison, dtype=t.dtype)
    if span:
        buf.as_strided(t.shape, t.stride()).copy_(t)
    return buf


def _write(path: Path, t: torch.Tensor) -> None:
    t.contiguous().view(torch.uint8).numpy().tofile(path)


def kl_case(za, zb, y, *, temperature=1.0, rule="correct", normalize="valid", ignore_index=255, backward=True,
            grad_weights=(0.7, 1.3), mask=(True, True), learners="both", **geometry) -> dict:
    return dict(op="kl", za=za, zb=zb, y=y, T=temperature, rule=RULE_CODES[rule], normalize_valid=int(normalize == "valid"),
                ignore_index=ignore_index, backward=int(backward), g_a=grad_weights[0], g_b=grad_weights[1],
                mask_a=int(mask[0]), mask_b=int(mask[1]), learners=LEARNER_BITS[learners], **geometry)


def region_case(za, zb, y, *, region=(16, 16), score="ce", ignore_index=255) -> dict:
    return dict(op="region", za=za, zb=zb, y=y, rh=region[0], rw=region[1], accuracy=int(score == "accuracy"),
                ignore_index=ignore_index)


def peers_case(logits, y, *, temperature=1.0, rule="correct", normalize="valid", ignore_index=255, grad_mask=None,
               **geometry) -> dict:
    """A pixel_selective_kl_peers case; grad_mask defaults to every student."""
    mask = [True] * len(logits) if grad_mask is None else list(grad_mask)
    return dict(op="peers", logits=list(logits), y=y, K=len(logits), T=temperature, rule=RULE_CODES[rule],
                normalize_valid=int(normalize == "valid"), ignore_index=ignore_index,
                grad_mask=sum(1 << s for s, on in enumerate(mask) if on), **geometry)


def _inputs(case: dict) -> dict[str, tuple[torch.Tensor, str]]:
    """A case's input tensors: file stem -> (tensor, prefix of its stride keys in args.txt)."""
    if case["op"] == "peers":
        named = {f"z{s}": (z, f"sz{s}_") for s, z in enumerate(case["logits"])}
    else:
        named = {"za": (case["za"], "sa"), "zb": (case["zb"], "sb")}
    return {**named, "y": (case["y"], "sy")}


def run(exe: Path, cases: list[dict], check: bool = True):
    """Runs the cases in one harness process. Returns one dict of output tensors per case, or with
    check=False the CompletedProcess (for tests that expect the harness to fail)."""
    with tempfile.TemporaryDirectory(prefix="simt-") as tmp:
        dirs = []
        for i, case in enumerate(cases):
            d = Path(tmp) / f"case{i}"
            d.mkdir()
            inputs = _inputs(case)
            first = next(iter(inputs.values()))[0]
            n, c, h, w = first.shape
            args = {k: v for k, v in case.items() if k not in ("za", "zb", "logits", "y")}
            args.update(N=n, C=c, H=h, W=w, dtype=str(first.dtype).removeprefix("torch."))
            args.setdefault("seed", 1 + i)  # of the random thread order: a different schedule for every case
            for stem, (t, key) in inputs.items():
                args.update({f"{key}{k}": s for k, s in enumerate(t.stride())})
                # a gap read as a logit is NaN; as a label, it trips the label assert
                _write(d / f"{stem}.bin", _exact(t, 1 << 40 if stem == "y" else float("nan")))
            (d / "args.txt").write_text("".join(f"{k} {v}\n" for k, v in args.items()))
            dirs.append(d)
        proc = subprocess.run([str(exe), *map(str, dirs)], capture_output=True, text=True, env={**os.environ, **ENV})
        if not check:
            return proc
        if proc.returncode != 0:
            raise AssertionError(f"SIMT harness failed (rc={proc.returncode}):\n{proc.stderr[-8000:]}")
        results = []
        for case, d in zip(cases, dirs):
            inputs = _inputs(case)
            scalar = next(iter(inputs.values()))[0].dtype
            acc = torch.float64 if scalar == torch.float64 else torch.float32
            out = {}
            for f in d.glob("*.bin"):
                if f.stem in inputs or f.stem not in OUTPUT_DTYPES:
                    continue
                kind = OUTPUT_DTYPES[f.stem]
                dtype = acc if kind == "acc" else scalar if kind == "scalar" else kind
                out[f.stem] = torch.from_file(str(f), size=f.stat().st_size // dtype.itemsize, dtype=dtype).clone()
            results.append(out)
        return results
