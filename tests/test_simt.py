"""The CUDA kernels of csrc/cuda executed on the CPU by the SIMT harness (tests/simt), against ccl_ops.reference.

Every case runs the real kernels (forward, one-block finalize, backward; region) through the launchers' grid
and block arithmetic, each CUDA thread a fiber, under AddressSanitizer and UBSan with exact-size buffers, three
times (thread orders forward, reverse, seeded random): the harness itself fails a case whose outputs differ
between orders, so every test here also checks the reductions are bitwise deterministic.
"""
from __future__ import annotations

import pytest
import torch
from simt_harness import LEARNER_BITS, RULE_CODES, SUPPORTED, build, kl_case, region_case, run

from ccl_ops import RULES, reference
from ccl_ops.testing import DTYPES, GRAD_TOL, LAYOUTS, LOSS_TOL, SCORE_TOL, make_inputs

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="the SIMT harness needs Linux x86-64")

# (N, C, H, W) reaching every channel bucket of with_channel_bucket: 8 (C = 1, 2, 5), 16, 32 (19 and exactly
# 32) and the online path (C = 40; float64 always).
BUCKET_SHAPES = ((2, 1, 5, 7), (2, 2, 6, 5), (2, 5, 9, 11), (1, 13, 7, 12), (2, 19, 8, 9), (1, 32, 4, 5),
                 (1, 40, 6, 7))
# Tolerances under the fast-math model (harness.cpp, device_expf): the ordinary float32 ones (see
# test_fast_math_model for why they need no widening).
FAST_MATH_LOSS_TOL = LOSS_TOL[torch.float32]


@pytest.fixture(scope="module")
def harness():
    return build()


def reference_kl(za, zb, y, case):
    """Reference losses, counts, selection bits and the gradients of g_a * loss_a + g_b * loss_b, in float64."""
    a = za.detach().double().requires_grad_()
    b = zb.detach().double().requires_grad_()
    rule = next(k for k, v in RULE_CODES.items() if v == case["rule"])
    normalize = "valid" if case["normalize_valid"] else "selected"
    learners = next(k for k, v in LEARNER_BITS.items() if v == case["learners"])
    ref = reference.pixel_selective_kl(a, b, y, temperature=case["T"], rule=rule, normalize=normalize,
                                       ignore_index=case["ignore_index"], learners=learners)
    loss = case["g_a"] * ref.loss_a + case["g_b"] * ref.loss_b
    if loss.requires_grad:
        loss.backward()
    a.grad = torch.zeros_like(a) if a.grad is None else a.grad  # a student that learns nothing: zero gradient
    b.grad = torch.zeros_like(b) if b.grad is None else b.grad
    m_ab, m_ba, valid = reference.selection_masks(a.detach(), b.detach(), y, rule, case["ignore_index"])
    bits = (m_ab.to(torch.uint8) | (m_ba.to(torch.uint8) << 1)).flatten()
    n = valid.sum() if normalize == "valid" else (m_ab | m_ba).sum()
    return ref, bits, max(int(n), 1), a.grad, b.grad


def assert_kl(out, case, loss_tol=None, exact_selection=True, ref_za=None):
    za, zb, y = case["za"], case["zb"], case["y"]
    dtype = za.dtype
    ref, bits, n, rga, rgb = reference_kl(za if ref_za is None else ref_za, zb, y, case)
    tol = loss_tol or LOSS_TOL[dtype]
    torch.testing.assert_close(out["loss_a"].double(), ref.loss_a.detach().reshape(1), **tol, equal_nan=True)
    torch.testing.assert_close(out["loss_b"].double(), ref.loss_b.detach().reshape(1), **tol, equal_nan=True)
    torch.testing.assert_close(out["norm"].double(), torch.tensor([float(n)], dtype=torch.float64), rtol=0, atol=0)
    if exact_selection:
        torch.testing.assert_close(out["selection"], bits, rtol=0, atol=0)
        torch.testing.assert_close(out["count_ab"], ref.count_ab.reshape(1), rtol=0, atol=0)
        torch.testing.assert_close(out["count_ba"], ref.count_ba.reshape(1), rtol=0, atol=0)
    if not case["backward"]:
        return
    # Gradient tolerance as in test_ops: rtol per dtype, atol relative to the largest reference gradient and
    # floored at a few ulps of the terms (weight * T-scaled probabilities / n) whose difference a gradient is.
    rtol, atol = GRAD_TOL[dtype]["rtol"], GRAD_TOL[dtype]["atol"]
    scale = max(rga.abs().max().item(), rgb.abs().max().item(), 1e-30)
    t = case["T"]
    terms = max(abs(case["g_a"]), abs(case["g_b"])) * max(t, 1 / t) / n
    atol = max(atol * scale, 16 * torch.finfo(dtype).eps * terms)
    for key, ref_grad, on in (("grad_za", rga, case["mask_a"]), ("grad_zb", rgb, case["mask_b"])):
        if on:
            got = out[key].view(za.shape).double()
            torch.testing.assert_close(got, ref_grad, rtol=rtol, atol=atol, equal_nan=True)
        else:
            assert key not in out


def run_kl(harness, cases, **check):
    for out, case in zip(run(harness, cases), cases):
        assert_kl(out, case, **check)


# ---- pixel_selective_kl -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
def test_kl_rules_and_normalisations(harness, rule):
    za, zb, y = make_inputs(1, 2, 5, 9, 11, torch.float32)
    run_kl(harness, [kl_case(za, zb, y, rule=rule, normalize=normalize, temperature=t)
                     for normalize in ("valid", "selected") for t in (1.0, 1.7, 0.5)])


@pytest.mark.parametrize("learners", ("a", "b"))
def test_kl_learners(harness, learners):
    # Only the asked-for loss is summed (the other is exactly 0, NaN guard included); counts, selection and n
    # do not change; the gradients of the computed loss match (the wrapper asks the backward for that one only).
    za, zb, y = make_inputs(4, 2, 19, 9, 11, torch.float32)
    nan_za = za.clone()
    nan_za[0, 3, 2, 2] = float("nan")
    mask = (learners == "a", learners == "b")
    cases = [kl_case(a, zb, y, rule=rule, normalize=normalize, learners=learners, mask=mask, backward=a is za)
             for rule in RULES for normalize in ("valid", "selected") for a in (za, nan_za)]
    for out, case in zip(run(harness, cases), cases):
        assert_kl(out, case)
        assert (out["loss_b"] if learners == "a" else out["loss_a"]).item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kl_every_bucket(harness, dtype):
    cases = []
    for i, shape in enumerate(BUCKET_SHAPES):
        za, zb, y = make_inputs(10 + i, *shape, dtype)
        cases.append(kl_case(za, zb, y, rule=RULES[i % 3], normalize=("valid", "selected")[i % 2],
                             temperature=(1.0, 2.0)[i % 2]))
    run_kl(harness, cases)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kl_layouts(harness, layout):
    cases = []
    for dtype in DTYPES:
        for i, shape in enumerate(((2, 5, 9, 11), (1, 40, 6, 7))):
            za, zb, y = make_inputs(20 + i, *shape, dtype, layout=layout)
            y = y.transpose(1, 2).contiguous().transpose(1, 2) if layout == "strided" else y  # strided labels too
            cases.append(kl_case(za, zb, y, rule=RULES[i], temperature=1.3))
    run_kl(harness, cases)


def test_kl_launch_geometry(harness):
    """Several blocks with a partial last one, the loop over N past the grid's y extent, the finalize kernel's
    loop over more partials than it has threads, and the backward's gradient masks."""
    many, geo = [], []
    za, zb, y = make_inputs(30, 1, 3, 20, 30, torch.float32)  # 600 pixels: blocks of 256, 256, 88
    many.append(kl_case(za, zb, y, rule="confidence", temperature=1.5))
    za, zb, y = make_inputs(31, 5, 4, 3, 7, torch.float32)
    geo.append(kl_case(za, zb, y, max_grid_y=2))  # grid.y = 2 < N = 5
    za, zb, y = make_inputs(32, 40, 2, 3, 3, torch.float32)
    geo.append(kl_case(za, zb, y, rule="all", normalize="selected", final_threads=32))  # 40 partials, 32 threads
    for mask in ((True, False), (False, True), (False, False)):
        many.append(kl_case(za, zb, y, mask=mask, grad_weights=(-2.0, 0.25)))
    run_kl(harness, many + geo)


def test_kl_edge_cases(harness):
    za, zb, y = make_inputs(40, 2, 4, 6, 6, torch.float32, ignore_frac=0.0)
    cases = [kl_case(za, zb, torch.full_like(y, 255), rule=r) for r in RULES]  # all ignored: zero, n = 1
    cases.append(kl_case(za, zb, torch.where(y == 1, 7, y), ignore_index=7))  # another ignore_index
    cases.append(kl_case(za, za.clone(), y, rule="all", temperature=2.0))  # identical students: exactly 0
    big_a, big_b, big_y = make_inputs(41, 2, 6, 9, 10, torch.float32, scale=1e4 / 6)
    cases.append(kl_case(big_a, big_b, big_y, rule="correct"))  # centred arithmetic at logits ~ 1e4
    outs = run(harness, cases)
    for out, case in zip(outs, cases):
        assert_kl(out, case)
    for out in outs[:3]:
        assert out["loss_a"].item() == 0 and out["loss_b"].item() == 0 and out["norm"].item() == 1
        assert not out["grad_za"].any() and not out["grad_zb"].any()
    assert outs[4]["loss_a"].item() == 0 and outs[4]["loss_b"].item() == 0


def test_kl_empty(harness):
    """No pixels: only the finalize kernel runs (on zero partials) and the backward launches nothing."""
    for shape in ((0, 3, 4, 4), (2, 3, 0, 5)):
        za = torch.randn(shape)
        y = torch.zeros(shape[0], shape[2], shape[3], dtype=torch.int64)
        (out,) = run(harness, [kl_case(za, za.clone(), y)])
        assert out["loss_a"].tolist() == [0.0] and out["norm"].tolist() == [1.0] and out["count_ab"].tolist() == [0]
        assert out["selection"].numel() == 0 and out["grad_za"].numel() == 0


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
def test_kl_nan_propagation(harness, dtype):
    cases = []
    for c in (4, 40):
        za, zb, y = make_inputs(50 + c, 1, c, 6, 6, dtype, ignore_frac=0.0)
        za[0, 2, 3, 3] = float("nan")
        cases += [kl_case(za, zb, y, rule=r, backward=False) for r in RULES]
        y_ign = y.clone()
        y_ign[0, 3, 3] = 255  # the NaN pixel ignored: no NaN anywhere
        cases.append(kl_case(za, zb, y_ign, rule="confidence"))
    outs = run(harness, cases)
    for i, (out, case) in enumerate(zip(outs, cases)):
        # At an ignored pixel the logits do not matter, but the reference's masked arithmetic turns a NaN there
        # into NaN gradients (NaN * 0): compare with the reference of the same logits without the NaN.
        assert_kl(out, case, ref_za=case["za"].nan_to_num() if i in (3, 7) else None)
    for out in outs[:3] + outs[4:7]:
        assert out["loss_a"].isnan().all() and out["loss_b"].isnan().all()
    assert outs[3]["loss_a"].isfinite().all() and outs[7]["grad_za"].isfinite().all()


def test_kl_bad_label_stops_with_device_assert(harness):
    za, zb, y = make_inputs(60, 1, 5, 4, 4, torch.float32)
    y[0, 2, 1] = 5  # == C
    proc = run(harness, [kl_case(za, zb, y)], check=False)
    assert proc.returncode != 0
    assert "selective_kl_forward_kernel<float, CMAX=8>" in proc.stderr and "device-side assert" in proc.stderr
    proc = run(harness, [region_case(za, zb, y, region=(2, 2))], check=False)
    assert proc.returncode != 0 and "region_direction_kernel<float>" in proc.stderr, proc.stderr


# ---- region_direction_mask ----------------------------------------------------------------------------------

REGIONS = ((4, 4), (3, 5), (16, 16), (1, 2), (7, 1), (40, 3))


def assert_region(out, case):
    za, zb, y = case["za"], case["zb"], case["y"]
    score = "accuracy" if case["accuracy"] else "ce"
    ref = reference.region_direction_mask(za, zb, y, region=(case["rh"], case["rw"]), score=score,
                                          ignore_index=case["ignore_index"])
    torch.testing.assert_close(out["scores"].view_as(ref.scores), ref.scores, **SCORE_TOL[za.dtype], equal_nan=True)
    torch.testing.assert_close(out["direction"].view_as(ref.direction), ref.direction, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_region_scores_and_regions(harness, dtype):
    cases = []
    for i, (shape, layout) in enumerate((((2, 5, 9, 11), "contiguous"), ((1, 40, 13, 7), "channels_last"),
                                         ((2, 1, 8, 8), "strided"), ((1, 2, 17, 20), "contiguous"))):
        za, zb, y = make_inputs(70 + i, *shape, dtype, layout=layout)
        for j, region in enumerate(REGIONS):
            cases.append(region_case(za, zb, y, region=region, score=("ce", "accuracy")[(i + j) % 2]))
    for out, case in zip(run(harness, cases), cases):
        assert_region(out, case)


def test_region_edge_cases(harness):
    za, zb, y = make_inputs(80, 2, 3, 8, 8, torch.float32, ignore_frac=0.0)
    y_holes = y.clone()
    y_holes[0, :4, :4] = 255  # one region without valid pixels: NaN scores, direction 0
    za_nan = za.clone()
    za_nan[1, 0, 6, 6] = float("nan")
    cases = [region_case(za, zb, y_holes, region=(4, 4), score=s) for s in ("ce", "accuracy")]
    cases += [region_case(za, zb, torch.full_like(y, 255), region=(3, 3))]
    cases += [region_case(za_nan, zb, y, region=(4, 4), score=s) for s in ("ce", "accuracy")]
    cases += [region_case(za, za.clone(), y, region=(5, 5))]  # equal scores: direction 0
    outs = run(harness, cases)
    for out, case in zip(outs, cases):
        assert_region(out, case)
    assert outs[0]["scores"].view(2, 2, 2, 2)[0, :, 0, 0].isnan().all()
    assert outs[2]["scores"].isnan().all() and not outs[2]["direction"].any()
    assert not outs[5]["direction"].any()


# ---- fast math ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_fast_math_model(harness, dtype):
    """The kernels under a model of --use_fast_math, against the float64 reference with the ordinary float32
    loss tolerance (rtol 2e-5) and the per-dtype gradient tolerances. The model: __expf = ex2.approx(x * log2 e)
    with the product rounded to float (relative error ~ |x| * 6e-8) and the result moved 2 ulp (ex2.approx's
    documented bound) in an x-dependent direction, subnormals flushed (FTZ/DAZ). With |x| <= ~30 here (logits
    of scale 3, T >= 1/2) one exponential is off by at most ~2.3e-6, ten times below rtol; measured on these
    cases: losses within 2e-7 and float32 gradients within 6e-7 of the largest gradient. Not modelled:
    approximate division (__fdividef, 2 ulp, another ~1e-7). Rule 'confidence' compares two cross-entropies,
    whose near-ties may resolve either way under such errors (METHOD.md §1 allows it): its selections are not
    compared bit for bit, its losses and gradients are."""
    cases = []
    for i, shape in enumerate(BUCKET_SHAPES):
        za, zb, y = make_inputs(90 + i, *shape, dtype)
        for rule in RULES:
            case = kl_case(za, zb, y, rule=rule, temperature=(1.0, 0.5, 2.0)[i % 3])
            case["fast_math"] = 1
            cases.append(case)
    for out, case in zip(run(harness, cases), cases):
        assert_kl(out, case, loss_tol=FAST_MATH_LOSS_TOL, exact_selection=case["rule"] != 1)


def test_fast_math_model_is_not_the_host_expf(harness):
    """The fast-math model really perturbs: the per-block KL sums (float64) and the gradients differ from the
    exact-exp run's (else the test above would check nothing; the float32 losses may round alike)."""
    za, zb, y = make_inputs(99, 2, 19, 8, 9, torch.float32)
    exact = kl_case(za, zb, y, rule="all")
    fast = dict(exact, fast_math=1)
    out_exact, out_fast = run(harness, [exact, fast])
    assert (out_exact["part_kl"] != out_fast["part_kl"]).all()
    assert not torch.equal(out_exact["grad_za"], out_fast["grad_za"])
