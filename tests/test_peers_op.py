"""The fused K-student selective KL (``ccl_ops.pixel_selective_kl_peers``) against its plain-PyTorch reference
(``ccl_ops.pixel_bsd_peers``, in float64): values, counts, gradients, edge cases, errors, opcheck, compile."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_peers import IGNORE, assert_grads_close, make_students, weighted_grads
from torch.testing import assert_close

import ccl_ops
from ccl_ops import ops
from ccl_ops.testing import DTYPES, LAYOUTS, LOSS_TOL, with_layout

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = settings(max_examples=60, deadline=None)
shapes = st.tuples(st.integers(1, 2), st.integers(1, 6), st.integers(1, 9), st.integers(1, 23))  # N, C, H, W


def weights(k):
    return [1.0 - 0.4 * s for s in range(k)]  # distinct, one negative from K = 4 on


def learners(logits, y, rule):
    return ccl_ops.learner_masks(ccl_ops.peer_masks(logits, y, rule=rule))


def fused_and_reference(logits, y, g, **kw):
    """The fused op's losses, counts and weighted gradients, and the float64 reference's."""
    z = [x.detach().clone().requires_grad_() for x in logits]
    out = ccl_ops.pixel_selective_kl_peers(z, y, **kw)
    grads = weighted_grads(list(out.losses), z, g)
    r = [x.detach().double().requires_grad_() for x in logits]
    ref = ccl_ops.pixel_bsd_peers(r, y, **kw)
    return out, grads, torch.stack(ref).detach(), weighted_grads(ref, r, g)


def normaliser(logits, y, normalize, rule):
    if normalize == "valid":
        return int((y != IGNORE).sum())
    return int(torch.stack(learners(logits, y, rule)).any(0).sum())


@SETTINGS
@given(shape=shapes, k=st.sampled_from((2, 3, 4, 8)), dtype=st.sampled_from(DTYPES),
       rule=st.sampled_from(ccl_ops.RULES), normalize=st.sampled_from(ccl_ops.NORMALIZATIONS),
       temperature=st.floats(0.5, 4.0), layout=st.sampled_from(LAYOUTS), ignore_frac=st.sampled_from((0.0, 0.3, 0.9)),
       tie=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fused_peers_match_the_reference(device, shape, k, dtype, rule, normalize, temperature, layout, ignore_frac,
                                         tie, seed):
    logits, y = make_students(seed, k, shape, torch.float64, ignore_frac, tie=tie)
    logits = [with_layout(z.to(dtype).to(device), layout) for z in logits]
    y = y.to(device)
    kw = dict(temperature=temperature, rule=rule, normalize=normalize)
    out, grads, ref, ref_grads = fused_and_reference(logits, y, weights(k), **kw)
    assert out.losses.shape == (k,) and out.losses.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out.losses.double(), ref, **LOSS_TOL[dtype])
    counts = torch.stack([learns.sum() for learns in learners([z.double() for z in logits], y, rule)])
    assert_close(out.counts, counts, rtol=0, atol=0)
    n = normaliser([z.double() for z in logits], y, normalize, rule)
    assert_grads_close(grads, ref_grads, dtype, temperature, n)


@pytest.mark.parametrize("rule", ccl_ops.RULES)
def test_two_students_give_the_two_student_op(device, rule):
    logits, y = make_students(3, 2, (2, 7, 9, 11), torch.float32)
    logits, y = [z.to(device) for z in logits], y.to(device)
    peers = ccl_ops.pixel_selective_kl_peers(logits, y, temperature=1.5, rule=rule)
    pair = ccl_ops.pixel_selective_kl(*logits, y, temperature=1.5, rule=rule)
    assert_close(peers.losses, torch.stack([pair.loss_a, pair.loss_b]), **LOSS_TOL[torch.float32])
    assert peers.counts.tolist() == [int(pair.count_ba), int(pair.count_ab)]  # A learns where B teaches A


@pytest.mark.parametrize("normalize", ccl_ops.NORMALIZATIONS)
@pytest.mark.parametrize("rule", ccl_ops.RULES)
def test_forward_gradients_are_the_losses_gradients(device, rule, normalize):
    # grads[s] = d losses[s] / d logits[s] at unit upstream, for n known before the pass and n divided out after
    # it; empty where not asked for, and the other outputs do not depend on grad_mask.
    logits, y = make_students(5, 3, (2, 6, 9, 13), torch.float32)
    logits, y = [z.to(device) for z in logits], y.to(device)
    out = torch.ops.ccl.pixel_selective_kl_peers(logits, y, 1.5, rule, normalize, IGNORE, [True, False, True])
    r = [z.double().requires_grad_() for z in logits]
    ref = ccl_ops.pixel_bsd_peers(r, y, temperature=1.5, rule=rule, normalize=normalize)
    for s in (0, 2):
        want = torch.autograd.grad(ref[s], r[s], allow_unused=True, materialize_grads=True)[0]
        assert_close(out[3][s].double(), want, rtol=1e-5, atol=1e-6)
    assert out[3][1].numel() == 0
    bare = torch.ops.ccl.pixel_selective_kl_peers(logits, y, 1.5, rule, normalize, IGNORE, [False] * 3)
    assert all(g.numel() == 0 for g in bare[3])
    for i in range(3):
        assert_close(bare[i], out[i], rtol=0, atol=0)


def test_retained_graph_gives_the_same_gradients_twice(device):
    logits, y = make_students(8, 3, (2, 5, 8, 9), torch.float32)
    z = [x.to(device).requires_grad_() for x in logits]
    out = ccl_ops.pixel_selective_kl_peers(z, y.to(device), rule="all")
    loss = (out.losses * torch.tensor([0.7, 1.3, -0.4], device=device)).sum()
    first = torch.autograd.grad(loss, z, retain_graph=True)
    second = torch.autograd.grad(loss, z)
    for a, b in zip(first, second):
        assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_a_student_whose_loss_is_unused_gets_no_gradient(device):
    logits, y = make_students(9, 3, (1, 4, 6, 6), torch.float32)
    z = [x.to(device).requires_grad_() for x in logits]
    out = ccl_ops.pixel_selective_kl_peers(z, y.to(device), rule="all")
    grads = torch.autograd.grad(out.losses[1], z, allow_unused=True)
    assert grads[0] is None or not grads[0].any()
    assert grads[1].abs().sum() > 0


@pytest.mark.parametrize("rule", ccl_ops.RULES)
def test_identical_students_have_zero_loss_and_gradient(device, rule):
    logits, y = make_students(11, 1, (2, 5, 7, 8), torch.float32)
    z = [logits[0].to(device).clone().requires_grad_() for _ in range(3)]
    out = ccl_ops.pixel_selective_kl_peers(z, y.to(device), temperature=2.0, rule=rule)
    assert out.losses.tolist() == [0.0, 0.0, 0.0]
    out.losses.sum().backward()
    assert all(not x.grad.any() for x in z)


def test_all_pixels_ignored_gives_zero_not_nan(device):
    logits, y = make_students(12, 4, (2, 3, 5, 5), torch.float32)
    z = [x.to(device).requires_grad_() for x in logits]
    out = ccl_ops.pixel_selective_kl_peers(z, torch.full_like(y, IGNORE).to(device), rule="all",
                                           normalize="selected")
    assert out.losses.tolist() == [0.0] * 4 and out.counts.tolist() == [0] * 4
    out.losses.sum().backward()
    assert all(not x.grad.any() for x in z)


@pytest.mark.parametrize("rule", ccl_ops.RULES)
def test_nan_logits_propagate_into_every_loss(device, rule):
    # A NaN at a valid pixel in one student reaches every student's loss (as the reference); at an ignored
    # pixel it changes nothing.
    logits, y = make_students(13, 3, (1, 4, 6, 6), torch.float32, ignore_frac=0.0)
    logits[1][0, 2, 3, 3] = float("nan")
    out = ccl_ops.pixel_selective_kl_peers([z.to(device) for z in logits], y.to(device), rule=rule)
    assert out.losses.isnan().all()
    y[0, 3, 3] = IGNORE
    clean = [z.nan_to_num() for z in logits]
    got = ccl_ops.pixel_selective_kl_peers([z.to(device) for z in logits], y.to(device), rule=rule)
    want = ccl_ops.pixel_selective_kl_peers([z.to(device) for z in clean], y.to(device), rule=rule)
    assert_close(got.losses, want.losses, rtol=0, atol=0)


def test_results_do_not_depend_on_thread_count():
    logits, y = make_students(14, 4, (2, 9, 40, 40), torch.float32)  # several tiles per image
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            z = [x.clone().requires_grad_() for x in logits]
            out = ccl_ops.pixel_selective_kl_peers(z, y, rule="confidence", normalize="selected")
            out.losses.sum().backward()
            results.append((out.losses, out.counts, [x.grad for x in z]))
    finally:
        torch.set_num_threads(before)
    (l1, c1, g1), (l2, c2, g2) = results
    assert torch.equal(l1, l2) and torch.equal(c1, c2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_opcheck(device):
    logits, y = make_students(15, 3, (2, 5, 6, 7), torch.float32)
    logits, y = [z.to(device).requires_grad_() for z in logits], y.to(device)
    for rule in ccl_ops.RULES:
        torch.library.opcheck(torch.ops.ccl.pixel_selective_kl_peers.default,
                              (logits, y, 1.5, rule, "selected", IGNORE, [True, False, True]))
        torch.library.opcheck(torch.ops.ccl.pixel_selective_kl_peers.default,
                              ([z.detach() for z in logits], y, 1.0, rule, "valid", IGNORE, [False] * 3))


def test_works_under_torch_compile_fullgraph(device):
    logits, y = make_students(16, 3, (2, 5, 6, 7), torch.float32)
    y = y.to(device)

    def loss(*z):
        return (ccl_ops.pixel_selective_kl_peers(list(z), y, temperature=2.0).losses * torch.tensor(
            [1.0, 0.5, -1.0], device=device)).sum()

    compiled = torch.compile(loss, fullgraph=True)
    z_c = [x.to(device).requires_grad_() for x in logits]
    z_e = [x.to(device).requires_grad_() for x in logits]
    assert_close(compiled(*z_c), loss(*z_e))
    for a, b in zip(torch.autograd.grad(compiled(*z_c), z_c), torch.autograd.grad(loss(*z_e), z_e)):
        assert_close(a, b)


def test_fallback_is_the_reference(monkeypatch):
    logits, y = make_students(17, 3, (1, 4, 5, 6), torch.float32)
    fused = ccl_ops.pixel_selective_kl_peers(logits, y, rule="confidence")
    monkeypatch.setattr(ops, "KERNEL_DEVICES", frozenset())
    monkeypatch.setattr(ops, "_warned", {"cpu"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the one warning was given already
        plain = ccl_ops.pixel_selective_kl_peers(logits, y, rule="confidence")
    assert_close(plain.losses, fused.losses, **LOSS_TOL[torch.float32])
    assert torch.equal(plain.counts, fused.counts)


@pytest.mark.parametrize("make_bad, error, message", [
    (lambda z, y: ([z[0]], y), ValueError, "K >= 2"),
    (lambda z, y: (z * 5, y), ValueError, "at most 8"),
    (lambda z, y: (z[0], y), ValueError, "list or tuple"),
    (lambda z, y: ([z[0], z[1][:, :2]], y), ValueError, r"logits\[1\] must have the shape"),
    (lambda z, y: ([z[0], z[1].double()], y), TypeError, r"logits\[1\] must have the dtype"),
    (lambda z, y: (z, y[:, :2]), ValueError, "y"),
])
def test_bad_input_is_a_clear_error(make_bad, error, message):
    logits, y = make_students(18, 2, (1, 4, 5, 6), torch.float32)
    bad_logits, bad_y = make_bad(logits, y)
    with pytest.raises(error, match=message):
        ccl_ops.pixel_selective_kl_peers(bad_logits, bad_y)


def test_bad_options_and_direct_calls():
    logits, y = make_students(19, 3, (1, 4, 5, 6), torch.float32)
    with pytest.raises(ValueError, match="rule"):
        ccl_ops.pixel_selective_kl_peers(logits, y, rule="best")
    with pytest.raises(ValueError, match="temperature"):
        ccl_ops.pixel_selective_kl_peers(logits, y, temperature=0.0)
    bad = y.clone()
    bad[0, 0, 0] = 4
    with pytest.raises(ValueError, match="label value 4"):
        ccl_ops.pixel_selective_kl_peers(logits, bad)
    # The op itself checks what its kernels rely on.
    with pytest.raises(ValueError, match="grad_mask must have one entry per student"):
        torch.ops.ccl.pixel_selective_kl_peers(logits, y, 1.0, "all", "valid", IGNORE, [True])
    with pytest.raises(ValueError, match="2 to 8"):
        torch.ops.ccl.pixel_selective_kl_peers(logits[:1], y, 1.0, "all", "valid", IGNORE, [True])
    with pytest.raises(ValueError, match="label value 4"):
        torch.ops.ccl.pixel_selective_kl_peers(logits, bad, 1.0, "all", "valid", IGNORE, [False] * 3)
