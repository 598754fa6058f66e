"""The CUDA kernels of pixel_selective_kl_peers executed on the CPU by the SIMT harness (tests/simt), against
the float64 reference ccl_ops.peers (pixel_bsd_peers for the losses and, by autograd, the gradients; peer_masks
for the counts and the per-pixel learners).

As in test_simt.py, every case runs the real kernels (forward, one-block finalize, gradients) through the
launcher's grid arithmetic under AddressSanitizer and UBSan, in three thread orders whose outputs must agree bit
for bit. The last tests run a build with deliberate defects, to show that these checks catch them.
"""
from __future__ import annotations

import pytest
import torch
from simt_harness import RULE_CODES, SUPPORTED, build, mutator, peers_case, run

from ccl_ops import RULES
from ccl_ops.peers import learner_masks, peer_masks, pixel_bsd_peers
from ccl_ops.testing import DTYPES, GRAD_TOL, LAYOUTS, LOSS_TOL, make_peer_inputs, with_layout

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="the SIMT harness needs Linux x86-64")

PEER_COUNTS = (2, 3, 4, 8)  # every student bucket of with_peer_bucket (2, 4, 8), full and partly used
# Distinct weights g_s of the students' losses in the reference's autograd: a gradient of one student's loss
# reaching another student's logits would show.
GRAD_WEIGHTS = (0.7, 1.3, -0.4, 2.1, 0.9, -1.6, 0.55, 1.15)
RULE_NAMES = {code: rule for rule, code in RULE_CODES.items()}


@pytest.fixture(scope="module")
def harness():
    return build()


def peer_inputs(seed, k, n, c, h, w, dtype=torch.float32, *, layouts="contiguous", scale=3.0, ignore_frac=0.2,
                ignore_index=255):
    """K students' logits and shared labels from ccl_ops.testing.make_peer_inputs; `layouts`: one for all, or one
    per student (ccl_ops.testing.LAYOUTS)."""
    layouts = [layouts] * k if isinstance(layouts, str) else list(layouts)
    logits, y = make_peer_inputs(seed, k, n, c, h, w, dtype, scale=scale, ignore_frac=ignore_frac,
                                 ignore_index=ignore_index)
    return [with_layout(z, layout) for z, layout in zip(logits, layouts)], y


def reference_peers(case, logits=None):
    """Losses, counts, learner bits, n and the gradients of sum_s g_s * losses[s], in float64."""
    zs = [z.detach().double().requires_grad_() for z in (logits or case["logits"])]
    y, k, ignore_index = case["y"], len(zs), case["ignore_index"]
    rule = RULE_NAMES[case["rule"]]
    normalize = "valid" if case["normalize_valid"] else "selected"
    losses = pixel_bsd_peers(zs, y, temperature=case["T"], rule=rule, normalize=normalize,
                             ignore_index=ignore_index)
    total = sum(g * loss for g, loss in zip(GRAD_WEIGHTS, losses))
    grads = torch.autograd.grad(total, zs, allow_unused=True) if total.requires_grad else [None] * k
    grads = [torch.zeros_like(z) if g is None else g for z, g in zip(zs, grads)]  # nothing learnt: 0
    masks = peer_masks([z.detach() for z in zs], y, rule=rule, ignore_index=ignore_index)
    learns = learner_masks(masks)
    bits = sum(learn.to(torch.uint8) << s for s, learn in enumerate(learns)).flatten()
    counts = torch.stack([learn.sum() for learn in learns])
    n = (y != ignore_index).sum() if normalize == "valid" else torch.stack(learns).any(0).sum()
    return torch.stack(losses).detach(), counts, bits, max(int(n), 1), grads


def assert_peers(out, case, *, grads=True, ref_logits=None):
    logits = case["logits"]
    dtype, k = logits[0].dtype, len(logits)
    ref_losses, counts, bits, n, ref_grads = reference_peers(case, ref_logits)
    torch.testing.assert_close(out["losses"].double(), ref_losses, **LOSS_TOL[dtype], equal_nan=True)
    torch.testing.assert_close(out["norm"].double(), torch.tensor([float(n)], dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(out["counts"], counts, rtol=0, atol=0)
    torch.testing.assert_close(out["learners"], bits, rtol=0, atol=0)
    # Gradient tolerance as in test_simt.assert_kl: rtol per dtype, atol relative to the largest reference gradient
    # and floored at a few ulps of the terms (weight * T-scaled probabilities / n) whose difference a gradient is.
    rtol, atol = GRAD_TOL[dtype]["rtol"], GRAD_TOL[dtype]["atol"]
    scale = max(max(g.abs().max().item() for g in ref_grads), 1e-30) if ref_grads[0].numel() else 1.0
    t = case["T"]
    terms = max(abs(g) for g in GRAD_WEIGHTS[:k]) * max(t, 1 / t) / n
    atol = max(atol * scale, 16 * torch.finfo(dtype).eps * terms)
    for s in range(k):
        key = f"grad{s}"
        if not case["grad_mask"] >> s & 1:
            assert key not in out
        elif grads:
            got = out[key].view(logits[s].shape).double() * GRAD_WEIGHTS[s]
            torch.testing.assert_close(got, ref_grads[s], rtol=rtol, atol=atol, equal_nan=True)


def run_peers(harness, cases, **check):
    outs = run(harness, cases)
    for out, case in zip(outs, cases):
        assert_peers(out, case, **check)
    return outs


# ---- semantics ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", PEER_COUNTS)
def test_peers_rules_normalisations_temperatures(harness, k):
    logits, y = peer_inputs(k, k, 1, 5, 6, 7)
    run_peers(harness, [peers_case(logits, y, rule=rule, normalize=normalize, temperature=t)
                        for rule in RULES for normalize in ("valid", "selected") for t in (1.0, 0.6)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_peers_dtypes_and_channels(harness, dtype):
    cases = []
    for i, (k, shape) in enumerate(((2, (2, 1, 5, 7)), (3, (2, 2, 6, 5)), (4, (1, 19, 8, 9)), (8, (1, 40, 4, 5)),
                                    (5, (2, 7, 3, 11)))):
        logits, y = peer_inputs(10 + i, k, *shape, dtype)
        cases.append(peers_case(logits, y, rule=RULES[i % 3], normalize=("valid", "selected")[i % 2],
                                temperature=(1.0, 2.0)[i % 2]))
    run_peers(harness, cases)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_peers_layouts(harness, layout):
    """Every student in its own layout (the kernels take each one's strides), strided labels too."""
    cases = []
    for dtype in DTYPES:
        for i, (k, shape) in enumerate(((4, (2, 5, 9, 11)), (3, (1, 40, 6, 7)))):
            mixed = [LAYOUTS[(LAYOUTS.index(layout) + s) % len(LAYOUTS)] for s in range(k)]
            logits, y = peer_inputs(20 + i, k, *shape, dtype, layouts=mixed)
            y = y.transpose(1, 2).contiguous().transpose(1, 2) if layout == "strided" else y
            cases.append(peers_case(logits, y, rule=RULES[i], temperature=1.3))
    run_peers(harness, cases)


def test_peers_grad_mask(harness):
    """Only the asked-for gradients are written (the others are not even allocated); the losses do not change."""
    cases = []
    for k, masks in ((3, ((True, False, True), (False, True, False), (False, False, False))),
                     (8, ((False,) * 7 + (True,), (True, False) * 4))):
        logits, y = peer_inputs(30 + k, k, 2, 6, 5, 4)
        cases += [peers_case(logits, y, rule=rule, grad_mask=mask) for mask in masks for rule in ("correct", "all")]
    run_peers(harness, cases)


def test_peers_launch_geometry(harness):
    """Several blocks with a partial last one, the loop over N past the grid's y extent, and the finalize
    kernel's loop over more partials than it has threads."""
    cases = []
    logits, y = peer_inputs(40, 3, 1, 3, 20, 30)  # 600 pixels: blocks of 256, 256, 88
    cases.append(peers_case(logits, y, rule="confidence", temperature=1.5))
    logits, y = peer_inputs(41, 4, 5, 4, 3, 7)
    cases.append(peers_case(logits, y, max_grid_y=2))  # grid.y = 2 < N = 5
    logits, y = peer_inputs(42, 5, 40, 2, 3, 3)
    cases.append(peers_case(logits, y, rule="all", normalize="selected", final_threads=32))  # 40 partials
    run_peers(harness, cases)


# ---- edge cases ---------------------------------------------------------------------------------------------


def test_peers_edge_cases(harness):
    logits, y = peer_inputs(50, 3, 2, 4, 6, 6, ignore_frac=0.0)
    cases = [peers_case(logits, torch.full_like(y, 255), rule=r) for r in RULES]  # all ignored: zero, n = 1
    cases.append(peers_case(logits, torch.where(y == 1, 7, y), ignore_index=7))  # another ignore_index
    same = [logits[0].clone() for _ in range(4)]
    cases += [peers_case(same, y, rule=r, temperature=2.0) for r in RULES]  # identical students: exactly 0
    for i, k in enumerate((3, 8)):  # centred arithmetic at logits ~ 1e4
        big, big_y = peer_inputs(51 + i, k, 2, 6, 9, 10, scale=1e4 / 6)
        cases += [peers_case(big, big_y, rule=r) for r in ("correct", "all")]
    outs = run_peers(harness, cases)
    for out in outs[:3]:
        assert not out["losses"].any() and out["norm"].item() == 1 and not out["counts"].any()
        assert not any(out[f"grad{s}"].any() for s in range(3))
    for out in outs[4:7]:
        assert not out["losses"].any() and not any(out[f"grad{s}"].any() for s in range(4))


def test_peers_empty(harness):
    """No pixels: only the finalize kernel runs (on zero partials)."""
    for shape in ((0, 3, 4, 4), (2, 3, 0, 5)):
        logits = [torch.randn(shape) for _ in range(3)]
        y = torch.zeros(shape[0], shape[2], shape[3], dtype=torch.int64)
        (out,) = run(harness, [peers_case(logits, y)])
        assert out["losses"].tolist() == [0.0] * 3 and out["norm"].tolist() == [1.0]
        assert out["counts"].tolist() == [0] * 3 and out["learners"].numel() == 0
        assert all(out[f"grad{s}"].numel() == 0 for s in range(3))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
def test_peers_nan_propagation(harness, dtype):
    """A NaN or +inf logit of any student at a valid pixel makes every loss NaN (as in the reference); at an
    ignored pixel it changes no output at all."""
    bad_cases, clean_cases, ignored_cases = [], [], []
    for c in (4, 40):
        logits, y = peer_inputs(60 + c, 3, 1, c, 6, 6, dtype, ignore_frac=0.0)
        for student, value in ((1, float("nan")), (2, float("inf"))):
            bad = [z.clone() for z in logits]
            bad[student][0, 2, 3, 3] = value
            bad_cases += [peers_case(bad, y, rule=r) for r in RULES]
            y_ign = y.clone()
            y_ign[0, 3, 3] = 255
            clean_cases.append(peers_case(logits, y_ign, rule="confidence", temperature=1.5))
            ignored_cases.append(peers_case(bad, y_ign, rule="confidence", temperature=1.5))
    outs = run(harness, bad_cases + clean_cases + ignored_cases)
    for out, case in zip(outs, bad_cases):
        assert out["losses"].isnan().all()
        assert_peers(out, case, grads=False)  # counts and learners still match (a NaN ce never teaches)
    clean, ignored = outs[len(bad_cases):][:len(clean_cases)], outs[len(bad_cases) + len(clean_cases):]
    for out_clean, out_ignored, case in zip(clean, ignored, clean_cases):
        assert_peers(out_clean, case)
        assert out_clean.keys() == out_ignored.keys()
        for key in out_clean:
            assert torch.equal(out_clean[key], out_ignored[key]), key


def test_peers_bad_label_stops_with_device_assert(harness):
    logits, y = peer_inputs(70, 3, 1, 5, 4, 4)
    y[0, 2, 1] = 5  # == C
    proc = run(harness, [peers_case(logits, y)], check=False)
    assert proc.returncode != 0
    assert "peers_forward_kernel<float, KMAX=4>" in proc.stderr and "device-side assert" in proc.stderr, proc.stderr


# ---- the checks can fail ------------------------------------------------------------------------------------

# mutant id -> (original text, mutated text) in csrc/cuda/pixel_selective_kl_peers_kernel.cuh, each switched on
# by SIMT_MUTANT=k in one float32-only build (as tests/test_simt_defects.py does for the two-student kernels).
MUTATIONS = {
    # ties of cross-entropy teach: wrong counts and losses against the reference
    1: ("(r < K && ce[r] < ce[s])", "(r < K && r != s && (::simt::mutant() == 1 ? ce[r] <= ce[s] : ce[r] < ce[s]))"),
    # the gradient kernel ignores the selection: nonzero gradients where a student does not learn
    2: ("(learn >> s & 1) ? coef", "(::simt::mutant() == 2 || (learn >> s & 1)) ? coef"),
    # the last student's block partials are not reduced over the block: a wrong loss
    3: ("    if (s < K) {  // uniform over the block", "    if (s < K - (::simt::mutant() == 3)) {"),
    # the forward's loop over N one image too far: out of bounds
    4: ("for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {\n      const int label",
        "for (int64_t n = blockIdx.y; n < N + (::simt::mutant() == 4); n += gridDim.y) {\n      const int label"),
}
HEADER = "csrc/cuda/pixel_selective_kl_peers_kernel.cuh"


@pytest.fixture(scope="module")
def mutant_harness():
    return build(defines=("CCL_SIMT_FLOAT32_ONLY",), mutate=mutator((HEADER, *m) for m in MUTATIONS.values()),
                 name="mutant-peers")


def mutant_cases():
    logits, y = peer_inputs(80, 3, 2, 4, 5, 7)
    same = [logits[0], logits[0].clone(), logits[2]]  # equal cross-entropies: no teaching between 0 and 1
    return [peers_case(same, y, rule="confidence", temperature=1.5), peers_case(logits, y, rule="correct")]


@pytest.mark.parametrize("k", [0, *sorted(MUTATIONS)])
def test_defect_is_caught(mutant_harness, monkeypatch, k):
    monkeypatch.setenv("SIMT_MUTANT", str(k))
    cases = mutant_cases()
    if k == 0:  # the same build and cases pass without a defect
        for out, case in zip(run(mutant_harness, cases), cases):
            assert_peers(out, case)
    elif k == 4:
        proc = run(mutant_harness, cases, check=False)
        assert proc.returncode != 0 and "AddressSanitizer: heap-buffer-overflow" in proc.stderr, proc.stderr[-4000:]
    else:
        with pytest.raises(AssertionError):
            for out, case in zip(run(mutant_harness, cases), cases):
                assert_peers(out, case)
