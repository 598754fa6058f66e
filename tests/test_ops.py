"""Fused ops against the float64 reference: values, gradients, edge cases, errors, opcheck, gradcheck, compile."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from op_cases import shapes, wide_shapes

import ccl_ops
from ccl_ops import RULES, reference
from ccl_ops.testing import DTYPES, GRAD_TOL, LAYOUTS, LOSS_TOL, SCORE_TOL, make_inputs, with_layout

SETTINGS = settings(max_examples=100, deadline=None)


def run_kl(fn, za, zb, y, grad_weights, **kw):
    """Losses, counts and the gradients of (g_a * loss_a + g_b * loss_b) w.r.t. both logits."""
    za = za.detach().requires_grad_()
    zb = zb.detach().requires_grad_()
    out = fn(za, zb, y, **kw)
    # materialize_grads: a student whose loss is not computed (learners) gets a zero gradient.
    ga, gb = torch.autograd.grad(out.loss_a * grad_weights[0] + out.loss_b * grad_weights[1], (za, zb),
                                 allow_unused=True, materialize_grads=True)
    return out, ga, gb


def assert_kl_matches_reference(za, zb, y, grad_weights=(1.0, 1.0), reference_dtype=torch.float64, **kw):
    out, ga, gb = run_kl(ccl_ops.pixel_selective_kl, za, zb, y, grad_weights, **kw)
    ref, rga, rgb = run_kl(reference.pixel_selective_kl, za.to(reference_dtype), zb.to(reference_dtype), y,
                           grad_weights, **kw)
    dtype = za.dtype
    tol = LOSS_TOL[dtype] if reference_dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss_a.double(), ref.loss_a.double(), **tol)
    torch.testing.assert_close(out.loss_b.double(), ref.loss_b.double(), **tol)
    assert int(out.count_ab) == int(ref.count_ab) and int(out.count_ba) == int(ref.count_ba)
    assert ga.dtype == dtype and gb.dtype == dtype
    rtol, atol = GRAD_TOL[dtype]["rtol"], GRAD_TOL[dtype]["atol"]
    if reference_dtype != torch.float64:
        rtol, atol = max(rtol, 1e-4), max(atol, 1e-4)
    scale = max(rga.abs().max().item(), rgb.abs().max().item(), 1e-30)
    # Where the two students agree, a gradient is a small difference of larger terms (weight * T-scaled
    # probabilities / n): the kernel's rounding is then a few ulps of those terms, not of the result.
    n = (y != 255).sum() if kw.get("normalize", "valid") == "valid" else torch.maximum(ref.count_ab, ref.count_ba)
    t = kw.get("temperature", 1.0)
    terms = max(abs(w) for w in grad_weights) * max(t, 1 / t) / max(int(n), 1)
    # A gradient below the dtype's subnormal spacing (float16: 6e-8, e.g. with an upstream weight of 1e-7) can
    # only be stored as 0 or one subnormal step: that rounding is the floor of any tolerance.
    subnormal_step = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    atol = max(atol * scale, 16 * torch.finfo(dtype).eps * terms, 2 * subnormal_step)
    torch.testing.assert_close(ga.double(), rga.double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(gb.double(), rgb.double(), rtol=rtol, atol=atol)
    return out, ga, gb


@SETTINGS
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    rule=st.sampled_from(RULES),
    normalize=st.sampled_from(("valid", "selected")),
    temperature=st.floats(0.5, 4.0),
    layout=st.sampled_from(LAYOUTS),
    ignore_frac=st.sampled_from((0.0, 0.3, 0.9)),
    grad_weights=st.tuples(st.floats(-2, 2), st.floats(-2, 2)),
    learners=st.sampled_from(ccl_ops.LEARNERS),
    seed=st.integers(0, 2**31 - 1),
)
@example(shape=(1, 2, 3, 17), dtype=torch.float32, rule="confidence", normalize="valid", temperature=1.0,
         layout="contiguous", ignore_frac=0.9, grad_weights=(1.0, 0.0), learners="both",
         seed=256)  # cancellation, found by CI
@example(shape=(2, 5, 7, 9), dtype=torch.float16, rule="all", normalize="valid", temperature=1.0,
         layout="contiguous", ignore_frac=0.0, grad_weights=(6e-8, 1.0), learners="both",
         seed=0)  # float16 subnormal gradients
def test_pixel_selective_kl_matches_reference(device, shape, dtype, rule, normalize, temperature, layout,
                                              ignore_frac, grad_weights, learners, seed):
    za, zb, y = make_inputs(seed, *shape, dtype, ignore_frac=ignore_frac, device=device, layout=layout)
    assert_kl_matches_reference(za, zb, y, grad_weights, temperature=temperature, rule=rule, normalize=normalize,
                                learners=learners)


@pytest.mark.parametrize("normalize", ("valid", "selected"))
@pytest.mark.parametrize("rule", RULES)
def test_forward_gradients_are_the_losses_gradients(device, rule, normalize):
    # The op's gradient outputs (grad_mask) are d loss / d logits at unit upstream gradient, for n known before
    # the pass (normalize='valid', rule='all') and for n divided out after it; empty where not asked for.
    za, zb, y = make_inputs(7, 2, 6, 9, 13, torch.float32, device=device)
    out = torch.ops.ccl.pixel_selective_kl(za, zb, y, 1.5, rule, normalize, 255, "both", [True, True])
    _, rga, rgb = run_kl(reference.pixel_selective_kl, za.double(), zb.double(), y, (1.0, 1.0), temperature=1.5,
                         rule=rule, normalize=normalize)
    torch.testing.assert_close(out[6].double(), rga, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[7].double(), rgb, rtol=1e-5, atol=1e-6)
    bare = torch.ops.ccl.pixel_selective_kl(za, zb, y, 1.5, rule, normalize, 255)
    assert bare[6].numel() == 0 and bare[7].numel() == 0
    for i in range(6):
        torch.testing.assert_close(bare[i], out[i], rtol=0, atol=0)


def test_retained_graph_gives_the_same_gradients_twice(device):
    # The first backward scales the forward's gradients in place; a second one through the retained graph must
    # not scale them again (it recomputes), and must give the same result.
    za, zb, y = make_inputs(8, 2, 5, 8, 9, torch.float32, device=device)
    a, b = za.clone().requires_grad_(), zb.clone().requires_grad_()
    out = ccl_ops.pixel_selective_kl(a, b, y, rule="all")
    loss = 0.7 * out.loss_a + 1.3 * out.loss_b
    first = torch.autograd.grad(loss, (a, b), retain_graph=True)
    second = torch.autograd.grad(loss, (a, b))
    _, rga, rgb = run_kl(reference.pixel_selective_kl, za.double(), zb.double(), y, (0.7, 1.3), rule="all")
    for got in (first, second):
        torch.testing.assert_close(got[0].double(), rga, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1].double(), rgb, rtol=1e-5, atol=1e-6)


def test_gradients_in_freshly_mapped_memory(device):
    # Logits over 32 MB: glibc maps each gradient afresh, the CPU kernel maps its pages in bulk and then writes
    # them with ordinary stores instead of non-temporal ones (csrc/cpu/fresh_pages.h, store_output). Twice, so
    # that a second call's buffers are checked too.
    za, zb, y = make_inputs(10, 1, 19, 512, 1024, torch.float32, device=device)
    for _ in range(2):
        assert_kl_matches_reference(za, zb, y)


TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


@pytest.mark.skipif(not os.path.exists(TCMALLOC), reason="tcmalloc is not installed (Debian libtcmalloc-minimal4)")
def test_gradients_where_the_allocator_hands_out_page_aligned_buffers(device):
    # tcmalloc's large buffers start on a page boundary; the CPU kernel then starts each gradient one 64-byte line
    # into its buffer (4K aliasing, csrc/cpu/pixel_selective_kl_kernel.cpp). Values and that offset, under tcmalloc.
    if device.type != "cpu":
        pytest.skip("a CPU kernel")
    script = """
import torch, ccl_ops
from ccl_ops import reference
from ccl_ops.testing import make_inputs
za, zb, y = make_inputs(11, 2, 19, 128, 256, torch.float32)
grads = []
for fn, dtype in ((ccl_ops.pixel_selective_kl, torch.float32), (reference.pixel_selective_kl, torch.float64)):
    a, b = za.to(dtype).requires_grad_(), zb.to(dtype).requires_grad_()
    out = fn(a, b, y)
    grads.append(torch.autograd.grad(out.loss_a + out.loss_b, (a, b)))
for got, want in zip(*grads):
    assert got.data_ptr() % 4096 == 64, hex(got.data_ptr())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
print("checked")
"""
    run = subprocess.run([sys.executable, "-c", script], env={**os.environ, "LD_PRELOAD": TCMALLOC},
                         capture_output=True, text=True)
    assert run.returncode == 0 and "checked" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]


def test_one_loss_used_leaves_the_other_student_without_gradient(device):
    za, zb, y = make_inputs(9, 2, 5, 8, 9, torch.float32, device=device)
    a, b = za.clone().requires_grad_(), zb.clone().requires_grad_()
    ccl_ops.pixel_selective_kl(a, b, y, rule="all").loss_a.backward()
    _, rga, _ = run_kl(reference.pixel_selective_kl, za.double(), zb.double(), y, (1.0, 0.0), rule="all")
    torch.testing.assert_close(a.grad.double(), rga, rtol=1e-5, atol=1e-6)
    assert b.grad is None


@SETTINGS
@given(
    shape=shapes | wide_shapes,
    dtype=st.sampled_from(DTYPES),
    score=st.sampled_from(("ce", "accuracy")),
    region=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    layout=st.sampled_from(LAYOUTS),
    ignore_frac=st.sampled_from((0.0, 0.5, 0.95)),
    seed=st.integers(0, 2**31 - 1),
)
def test_region_direction_mask_matches_reference(device, shape, dtype, score, region, layout, ignore_frac, seed):
    za, zb, y = make_inputs(seed, *shape, dtype, ignore_frac=ignore_frac, device=device, layout=layout)
    out = ccl_ops.region_direction_mask(za, zb, y, region=region, score=score)
    ref = reference.region_direction_mask(za.double(), zb.double(), y, region=region, score=score)
    n, _, h, w = za.shape
    hr, wr = -(-h // region[0]), -(-w // region[1])
    assert out.direction.dtype == torch.int8 and out.direction.shape == (n, hr, wr)
    assert out.scores.dtype == torch.float32 and out.scores.shape == (n, 2, hr, wr)
    torch.testing.assert_close(out.scores, ref.scores, equal_nan=True, **SCORE_TOL[dtype])
    # Directions must agree wherever the two scores are not a near-tie (float32 vs float64 summation order).
    decided = (ref.scores[:, 0] - ref.scores[:, 1]).abs() > 1e-4
    torch.testing.assert_close(out.direction[decided], ref.direction[decided])
    assert ((out.direction == 0) | ~ref.scores.isnan().any(1)).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ("far_apart", "huge", "+inf", "-inf", "-inf_at_label", "nan"))
def test_region_cross_entropy_of_extreme_logits(device, layout, case):
    # The CPU kernel reads float NCHW logits in place (W a multiple of 16) shifted by the label's logit, and must
    # fall back to the max-shifted path where that could overflow (logits far apart, an infinite one), and
    # propagate NaN; every layout must agree with the reference in float32, the precision the kernel computes in.
    scale = {"far_apart": 1e4 / 6, "huge": 3e7}.get(case, 3.0)  # huge: exponents past float's range
    za, zb, y = make_inputs(11, 2, 5, 6, 32, torch.float32, scale=scale, ignore_frac=0.0)
    where = (0, slice(None), 1, 7)  # one pixel of sample 0, every channel
    label = int(y[0, 1, 7])
    if case in ("+inf", "-inf"):
        za[where][(label + 1) % 5] = float(case)
    elif case == "-inf_at_label":
        za[where][label] = -float("inf")
    elif case == "nan":
        za[where][(label + 2) % 5] = float("nan")
    za, zb, y = with_layout(za.to(device), layout), with_layout(zb.to(device), layout), y.to(device)
    out = ccl_ops.region_direction_mask(za, zb, y, region=(2, 16))
    ref = reference.region_direction_mask(za, zb, y, region=(2, 16))
    torch.testing.assert_close(out.scores, ref.scores, equal_nan=True, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.direction, ref.direction)
    if case not in ("far_apart", "huge"):
        expected = {"+inf": float("nan"), "-inf": None, "-inf_at_label": float("inf"), "nan": float("nan")}[case]
        got = out.scores[0, 0, 0, 0].item()
        if expected is None:
            assert got == got and got != float("inf")
        elif expected != expected:
            assert got != got
        else:
            assert got == expected


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="the CPU runs no AVX-512 kernels")
def test_region_avx2_path_where_avx512_is_the_default(device):
    # The CPU region kernel follows ATen's choice of vector ISA (ATEN_CPU_CAPABILITY): run the region tests again
    # in a process where ATen is held to AVX2, so that both the AVX-512 and the AVX2 loops are checked here.
    if device.type != "cpu":
        pytest.skip("a CPU kernel")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    check = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                           env=env, capture_output=True, text=True, check=True)
    assert check.stdout.strip() == "AVX2"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "(region_cross_entropy_of_extreme or region_direction_mask_matches) and cpu"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULES)
def test_identical_students_have_zero_loss_and_gradient(device, dtype, rule):
    za, _, y = make_inputs(1, 2, 5, 9, 11, dtype, device=device)
    out, ga, gb = run_kl(ccl_ops.pixel_selective_kl, za, za.clone(), y, (1.0, 1.0), rule=rule)
    torch.testing.assert_close(out.loss_a.double(), torch.zeros((), dtype=torch.float64, device=device))
    torch.testing.assert_close(out.loss_b.double(), torch.zeros((), dtype=torch.float64, device=device))
    assert not ga.any() and not gb.any()
    if rule != "all":
        assert int(out.count_ab) == 0 and int(out.count_ba) == 0
    mask = ccl_ops.region_direction_mask(za, za.clone(), y, region=(4, 4))
    assert not mask.direction.any()


@pytest.mark.parametrize("rule", RULES)
def test_argmax_ties_resolve_to_lowest_channel(device, rule):
    # Every pixel of A has all-equal logits (argmax = channel 0); B is sharp on random channels.
    _, zb, y = make_inputs(2, 2, 4, 7, 9, torch.float32, device=device, ignore_frac=0.0)
    za = torch.zeros_like(zb)
    out, _, _ = assert_kl_matches_reference(za, zb, y, rule=rule)
    if rule == "correct":
        right_a = y == 0
        right_b = zb.argmax(1) == y
        assert int(out.count_ab) == int((right_a & ~right_b).sum())


@pytest.mark.parametrize("op", ("kl", "region"))
def test_all_pixels_ignored_gives_zero_not_nan(device, op):
    za, zb, y = make_inputs(3, 2, 5, 8, 8, torch.float32, device=device)
    y = torch.full_like(y, 255)
    if op == "kl":
        for normalize in ("valid", "selected"):
            out, ga, gb = run_kl(ccl_ops.pixel_selective_kl, za, zb, y, (1.0, 1.0), normalize=normalize, rule="all")
            assert out.loss_a.item() == 0.0 and out.loss_b.item() == 0.0
            assert not ga.any() and not gb.any()
    else:
        out = ccl_ops.region_direction_mask(za, zb, y, region=(3, 3))
        assert not out.direction.any() and out.scores.isnan().all()


@pytest.mark.parametrize("c", (1, 2))
@pytest.mark.parametrize("rule", RULES)
def test_one_and_two_classes(device, c, rule):
    za, zb, y = make_inputs(4, 2, c, 7, 5, torch.float32, device=device)
    out, _, _ = assert_kl_matches_reference(za, zb, y, rule=rule, temperature=2.0)
    if c == 1:  # a single class: both students always right, p = 1, nothing to learn
        assert float(out.loss_a) == 0.0 and float(out.loss_b) == 0.0


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("rule", RULES)
def test_logits_near_1e4(device, dtype, rule):
    za, zb, y = make_inputs(5, 2, 6, 9, 10, dtype, scale=1e4 / 6, device=device)
    assert za.abs().max() > 5e3
    # Near one-hot softmaxes make cross-entropies differ below float32 resolution, so the 'confidence' selection
    # is only defined at the precision the spec computes in (float32): compare with the reference run in float32.
    out, ga, gb = assert_kl_matches_reference(za, zb, y, rule=rule, temperature=0.5, reference_dtype=torch.float32)
    assert torch.isfinite(out.loss_a) and torch.isfinite(out.loss_b)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_give_the_same_result(device, layout):
    za, zb, y = make_inputs(6, 2, 7, 13, 17, torch.float32, device=device)
    base, ga, gb = run_kl(ccl_ops.pixel_selective_kl, za, zb, y, (1.0, 1.0), rule="confidence")
    other, ga2, gb2 = run_kl(ccl_ops.pixel_selective_kl, with_layout(za, layout), with_layout(zb, layout), y,
                             (1.0, 1.0), rule="confidence")
    torch.testing.assert_close(other.loss_a, base.loss_a)
    torch.testing.assert_close(ga2, ga)
    torch.testing.assert_close(gb2, gb)
    y_strided = torch.zeros(y.shape[0], y.shape[2], y.shape[1], dtype=y.dtype, device=device).transpose(1, 2)
    y_strided.copy_(y)
    torch.testing.assert_close(ccl_ops.pixel_selective_kl(za, zb, y_strided).loss_b,
                               ccl_ops.pixel_selective_kl(za, zb, y).loss_b)
    torch.testing.assert_close(ccl_ops.region_direction_mask(with_layout(za, layout), with_layout(zb, layout), y),
                               ccl_ops.region_direction_mask(za, zb, y), equal_nan=True)


def test_nan_logits_propagate_into_the_loss(device):
    za, zb, y = make_inputs(7, 1, 4, 6, 6, torch.float32, device=device, ignore_frac=0.0)
    # A NaN at one valid pixel, whichever rule selected it or not, makes the loss NaN for both implementations,
    # and the selection treats NaN as the maximum logit, as torch.argmax does.
    za[0, 2, 3, 3] = float("nan")
    for rule in RULES:
        out = ccl_ops.pixel_selective_kl(za, zb, y, rule=rule)
        ref = reference.pixel_selective_kl(za, zb, y, rule=rule)
        assert out.loss_a.isnan() and out.loss_b.isnan() and ref.loss_a.isnan() and ref.loss_b.isnan(), rule
        if rule != "confidence":
            assert (int(out.count_ab), int(out.count_ba)) == (int(ref.count_ab), int(ref.count_ba)), rule
    # ... but a NaN under an ignored pixel does not count.
    y[0, 3, 3] = 255
    out = ccl_ops.pixel_selective_kl(za, zb, y)
    assert torch.isfinite(out.loss_a) and torch.isfinite(out.loss_b)


def test_results_do_not_depend_on_thread_count():
    za, zb, y = make_inputs(8, 4, 19, 64, 96, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ccl_ops.pixel_selective_kl(za, zb, y, rule="all")
        torch.set_num_threads(max(2, threads))
        many = ccl_ops.pixel_selective_kl(za, zb, y, rule="all")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.loss_a, many.loss_a) and torch.equal(one.loss_b, many.loss_b)


@pytest.mark.parametrize("rule", RULES)
def test_gradcheck_float64(device, rule):
    za, zb, y = make_inputs(9, 2, 4, 5, 6, torch.float64, device=device)
    # The teacher side is a stop-gradient by definition, so each loss is checked against its learner only.
    kw = dict(temperature=1.7, rule=rule)
    assert torch.autograd.gradcheck(lambda a: ccl_ops.pixel_selective_kl(a, zb, y, **kw).loss_a,
                                    (za.requires_grad_(),))
    assert torch.autograd.gradcheck(lambda b: ccl_ops.pixel_selective_kl(za.detach(), b, y, **kw).loss_b,
                                    (zb.requires_grad_(),))


def test_opcheck(device):
    za, zb, y = make_inputs(10, 2, 5, 6, 7, torch.float32, device=device)
    za.requires_grad_()
    zb.requires_grad_()
    for rule in RULES:
        torch.library.opcheck(torch.ops.ccl.pixel_selective_kl.default, (za, zb, y, 1.5, rule, "valid", 255))
    for learners, grad_mask in (("both", [True, True]), ("a", [True, False]), ("b", [False, True])):
        torch.library.opcheck(torch.ops.ccl.pixel_selective_kl.default,
                              (za, zb, y, 1.0, "correct", "selected", 255, learners, grad_mask))
    out = torch.ops.ccl.pixel_selective_kl(za, zb, y, 1.0, "correct", "selected", 255)
    g = torch.tensor(0.7, device=device)
    torch.library.opcheck(torch.ops.ccl.pixel_selective_kl_backward.default,
                          (g, g, za.detach(), zb.detach(), out[4], out[5], 1.0, [True, False]))
    for score in ("ce", "accuracy"):
        torch.library.opcheck(torch.ops.ccl.region_direction_mask.default, (za.detach(), zb.detach(), y, 3, 4, score, 255))


def test_works_under_torch_compile_fullgraph(device):
    za, zb, y = make_inputs(11, 2, 5, 12, 10, torch.float32, device=device)

    def step(a, b, labels):
        out = ccl_ops.pixel_selective_kl(a, b, labels, temperature=2.0, rule="confidence")
        mask = ccl_ops.region_direction_mask(a.detach(), b.detach(), labels, region=(4, 4))
        return 0.7 * out.loss_a + 1.3 * out.loss_b, mask.direction  # non-unit upstream: the traced backward scales

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        a, b = za.clone().requires_grad_(), zb.clone().requires_grad_()
        loss, direction = fn(a, b, y)
        loss.backward()
        results.append((loss, direction, a.grad, b.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager)


def test_backend_and_fallback(monkeypatch):
    from ccl_ops import ops

    assert ccl_ops.backend(torch.device("cpu")) == "cpu-fused"
    assert ccl_ops.backend("meta") == "reference"
    za, zb, y = make_inputs(12, 2, 5, 6, 6, torch.float32)
    fused = ccl_ops.pixel_selective_kl(za, zb, y)
    monkeypatch.setattr(ops, "KERNEL_DEVICES", frozenset())
    monkeypatch.setattr(ops, "_warned", set())
    with pytest.warns(RuntimeWarning, match="using the pure-PyTorch reference"):
        fallback = ccl_ops.pixel_selective_kl(za, zb, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per device type, not one per call
        ccl_ops.region_direction_mask(za, zb, y)
    assert ccl_ops.backend("cpu") == "reference"
    torch.testing.assert_close(fallback.loss_a, fused.loss_a)


# Bad input: a clear error naming the argument, the value and what was expected.
BAD_INPUTS = [
    (lambda za, zb, y: (za, zb, torch.where(y == 255, y, 7)), {}, ValueError, "label value 7"),
    (lambda za, zb, y: (za, zb, torch.where(y == 255, y, -1)), {}, ValueError, "label value -1"),
    (lambda za, zb, y: (za, zb[:, :, :-1], y), {}, ValueError, "zb must have the shape of za"),
    (lambda za, zb, y: (za, zb, y[:, :-1]), {}, ValueError, "y must have shape"),
    (lambda za, zb, y: (za[0], zb[0], y), {}, ValueError, "za must be 4-D"),
    (lambda za, zb, y: (za, zb.double(), y), {}, TypeError, "zb must have the dtype of za"),
    (lambda za, zb, y: (za.long(), zb.long(), y), {}, TypeError, "za must be float32"),
    (lambda za, zb, y: (za, zb, y.int()), {}, TypeError, "y must be int64"),
    (lambda za, zb, y: (za, zb.to("meta"), y), {}, ValueError, "one device"),
]


@pytest.mark.parametrize("make_bad, kwargs, error, message", BAD_INPUTS)
@pytest.mark.parametrize("op", ("kl", "region"))
@pytest.mark.parametrize("impl", ("fused", "reference"))
def test_bad_input_is_a_clear_error(make_bad, kwargs, error, message, op, impl):
    za, zb, y = make_bad(*make_inputs(13, 2, 5, 6, 6, torch.float32))
    module = ccl_ops if impl == "fused" else reference
    fn = module.pixel_selective_kl if op == "kl" else module.region_direction_mask
    with pytest.raises(error, match=message):
        fn(za, zb, y, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "temperature must be a finite number > 0, got 0.0"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(temperature=float("inf")), "temperature must be"),
    (dict(rule="majority"), "rule='majority' is unknown; expected one of 'correct', 'confidence', 'all'"),
    (dict(normalize="sum"), "normalize='sum' is unknown"),
    (dict(learners="cnn"), "learners='cnn' is unknown; expected one of 'both', 'a', 'b'"),
])
def test_bad_kl_options(kwargs, message):
    za, zb, y = make_inputs(14, 1, 3, 4, 4, torch.float32)
    for fn in (ccl_ops.pixel_selective_kl, reference.pixel_selective_kl):
        with pytest.raises(ValueError, match=message):
            fn(za, zb, y, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(region=0), "region sizes must be >= 1"),
    (dict(region=(4, -2)), "region sizes must be >= 1"),
    (dict(region=(4, 4, 4)), "region must be an int or a pair"),
    (dict(score="iou"), "score='iou' is unknown"),
])
def test_bad_region_options(kwargs, message):
    za, zb, y = make_inputs(15, 1, 3, 4, 4, torch.float32)
    for fn in (ccl_ops.region_direction_mask, reference.region_direction_mask):
        with pytest.raises(ValueError, match=message):
            fn(za, zb, y, **kwargs)


def test_direct_op_calls_check_their_arguments():
    za, zb, y = make_inputs(16, 1, 3, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="rule='x' is unknown"):
        torch.ops.ccl.pixel_selective_kl(za, zb, y, 1.0, "x", "valid", 255)
    with pytest.raises(RuntimeError, match="temperature must be"):
        torch.ops.ccl.pixel_selective_kl(za, zb, y, -1.0, "all", "valid", 255)
    with pytest.raises(RuntimeError, match="region sizes must be >= 1"):
        torch.ops.ccl.region_direction_mask(za, zb, y, 0, 2, "ce", 255)
    with pytest.raises(ValueError, match="label value 9"):
        torch.ops.ccl.region_direction_mask(za, zb, torch.full_like(y, 9), 2, 2, "ce", 255)


def test_gradient_outputs_start_their_storage_whatever_the_allocator_gives():
    # The CPU kernel shifts a page-aligned gradient buffer by one cache line; the shift must not show as a storage
    # offset, which the op's fake implementation (0) and torch.compile rely on. Hundreds of allocations of
    # different sizes: with 16-byte-aligned heap chunks some of them start on a page.
    for n in range(1, 4):
        for c in range(2, 12):
            for h in range(1, 9):
                za, zb, y = make_inputs(n * 100 + c * 10 + h, n, c, h, 3, torch.float32)
                out = torch.ops.ccl.pixel_selective_kl(za, zb, y, 1.0, "correct", "valid", 255, "both", [True, True])
                for grad, z in zip(out[6:8], (za, zb)):
                    assert grad.storage_offset() == 0 and grad.shape == z.shape and grad.is_contiguous()
