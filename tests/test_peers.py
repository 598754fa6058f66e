"""The K-student losses of METHOD.md §9 (``ccl_ops.peers``, ``baselines.peer_kl``, the ``*_k`` KDCL teachers).

K = 2 against today's two-student functions (to the bit where the code path is shared); K = 3 and 4 against
per-pair loops written here in float64 (a double loop over learner s and peer r, with explicit per-pixel masks).
"""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import ccl_ops
from baselines import dml, kdcl
from ccl_ops import reference
from ccl_ops.testing import GRAD_TOL, LOSS_TOL, SCORE_TOL

pytestmark = pytest.mark.usefixtures("one_thread")
warnings.filterwarnings("ignore", message="ccl_ops: no compiled kernel")
SETTINGS = settings(max_examples=50, deadline=None)
IGNORE = 255
shapes = st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(1, 9), st.integers(1, 9))  # N, C, H, W
K_MANY = st.sampled_from((3, 4))


def make_students(seed, k, shape, dtype=torch.float64, ignore_frac=0.2, scale=3.0, tie=False):
    """K students' logits (each right on about half the pixels, so that every direction of teaching occurs) and
    labels with an ``ignore_frac`` share ignored; ``tie``: the last student is a copy of the first."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n, h, w), generator=g)
    logits = []
    for _ in range(k):
        z = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * scale
        right = torch.rand(n, h, w, generator=g) < 0.5
        logits.append(z.scatter_add(1, y[:, None], right[:, None].double() * 2 * scale))
    if tie:
        logits[-1] = logits[0].clone()
    y[torch.rand(n, h, w, generator=g) < ignore_frac] = IGNORE
    return [z.to(dtype) for z in logits], y


def leaves(logits, dtype=None):
    return [z.detach().to(dtype or z.dtype).clone().requires_grad_() for z in logits]


def weighted_grads(losses, logits, weights):
    """Gradients of ``sum_s weights[s] * losses[s]`` w.r.t. every student's logits (zeros where unused)."""
    total = sum(w * loss for w, loss in zip(weights, losses))
    return torch.autograd.grad(total, logits, allow_unused=True, materialize_grads=True)


def grad_weights(k):
    return [1.0 + 0.5 * s for s in range(k)]


def assert_grads_close(got, want, dtype, temperature, n):
    """Per-dtype gradient tolerance (as the op tests): relative to the largest gradient, floored by a few ulps of
    the T / n-scaled terms a gradient is the difference of."""
    scale = max(max(float(g.abs().max()) for g in want), 1e-30)
    terms = 4 * max(temperature, 1 / temperature) / max(n, 1)
    atol = max(GRAD_TOL[dtype]["atol"] * scale, 16 * torch.finfo(dtype).eps * terms)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert_close(g.double(), w.double(), rtol=GRAD_TOL[dtype]["rtol"], atol=atol)


def kl_rows(z_teacher, z_student, t):
    """Per-pixel T^2 KL(sg p_teacher || p_student), float64, the teacher detached."""
    log_q = torch.log_softmax(z_teacher.detach().double() / t, 1)
    return t * t * (log_q.exp() * (log_q - torch.log_softmax(z_student.double() / t, 1))).sum(1)


def opmath(z):
    return z.double() if z.dtype == torch.float64 else z.float()


# ---------------------------------------------------------------------------------------------------- references


def loop_peer_kl(logits, y, t):
    """§9 DML: student s gets T^2 mean_{r != s} KL(sg p_r || p_s), averaged over the valid pixels."""
    valid = y != IGNORE
    n = max(int(valid.sum()), 1)
    losses = []
    for s, z_s in enumerate(logits):
        terms = [kl_rows(z_r, z_s, t)[valid].sum() / n for r, z_r in enumerate(logits) if r != s]
        losses.append(sum(terms) / len(terms))
    return losses


def loop_teaches(z_r, z_s, y, rule):
    """§1's rule for the pair (r teaches s), per pixel, on the logits as given (CE in float32 or float64)."""
    valid = y != IGNORE
    target = torch.where(valid, y, 0)
    if rule == "all":
        return valid
    if rule == "correct":
        return valid & (z_r.argmax(1) == target) & (z_s.argmax(1) != target)
    ce_r = F.cross_entropy(opmath(z_r.detach()), target, reduction="none")
    ce_s = F.cross_entropy(opmath(z_s.detach()), target, reduction="none")
    return valid & (ce_r < ce_s)


def loop_pixel_bsd(logits, y, t, rule, normalize):
    """§9 CCL pixel-wise BSD: the mean over a pixel's selected peers of T^2 KL, normalised as in §1."""
    k = len(logits)
    valid = y != IGNORE
    masks = {(r, s): loop_teaches(logits[r], logits[s], y, rule) for r in range(k) for s in range(k) if r != s}
    if normalize == "valid":
        n = int(valid.sum())
    else:
        any_pair = torch.zeros_like(valid)
        for m in masks.values():
            any_pair |= m
        n = int(any_pair.sum())
    losses = []
    for s in range(k):
        total = torch.zeros(y.shape, dtype=torch.float64)
        count = torch.zeros(y.shape, dtype=torch.float64)
        for r in range(k):
            if r != s:
                m = masks[r, s]
                total = total + torch.where(m, kl_rows(logits[r], logits[s], t), 0)
                count = count + m.double()
        per_pixel = torch.where(count > 0, total / count.clamp(min=1), 0)
        losses.append(per_pixel[valid].sum() / max(n, 1))
    return losses


def loop_region_targets(logits, y, region, score):
    """§9 region-wise selection by explicit loops over images and regions, scores in float64."""
    rh, rw = region
    n, _, h, w = logits[0].shape
    hr, wr = -(-h // rh), -(-w // rw)
    scores = torch.full((n, len(logits), hr, wr), float("nan"), dtype=torch.float64)
    target = torch.full((n, hr, wr), -1, dtype=torch.int64)
    gap = torch.zeros((n, hr, wr), dtype=torch.float64)  # best score's margin over the second best
    for i, a, b in itertools.product(range(n), range(hr), range(wr)):
        rows, cols = slice(a * rh, (a + 1) * rh), slice(b * rw, (b + 1) * rw)
        labels = y[i, rows, cols]
        valid = labels != IGNORE
        if not valid.any():
            continue
        for s, z in enumerate(logits):
            zz = z[i, :, rows, cols].double().permute(1, 2, 0)[valid]  # (P, C)
            if score == "ce":
                scores[i, s, a, b] = F.cross_entropy(zz, labels[valid])
            else:
                scores[i, s, a, b] = (zz.argmax(1) == labels[valid]).double().mean()
        better = scores[i, :, a, b] if score == "accuracy" else -scores[i, :, a, b]  # higher is better
        ranked = better.sort(descending=True).values
        gap[i, a, b] = ranked[0] - ranked[1]
        if ranked[0] > ranked[1]:
            target[i, a, b] = int(better.argmax())
    return target, scores, gap


# ------------------------------------------------------------------------------------------------------- DML, §9


@SETTINGS
@given(shape=shapes, dtype=st.sampled_from((torch.float32, torch.float64, torch.float16)),
       temperature=st.floats(0.5, 4.0), ignore_frac=st.sampled_from((0.0, 0.3)), seed=st.integers(0, 2**31 - 1))
def test_peer_kl_with_two_students_is_mutual_kl_to_the_bit(shape, dtype, temperature, ignore_frac, seed):
    logits, y = make_students(seed, 2, shape, dtype, ignore_frac)
    za, zb = leaves(logits)
    peers = dml.peer_kl([za, zb], y, temperature=temperature)
    ga, gb = weighted_grads(peers, [za, zb], (1.0, -0.7))
    ma, mb = leaves(logits)
    pair = dml.mutual_kl(ma, mb, y, temperature=temperature)
    ra, rb = weighted_grads([pair.loss_a, pair.loss_b], [ma, mb], (1.0, -0.7))
    assert torch.equal(peers[0], pair.loss_a) and torch.equal(peers[1], pair.loss_b)
    assert torch.equal(ga, ra) and torch.equal(gb, rb)


@SETTINGS
@given(shape=shapes, k=K_MANY, dtype=st.sampled_from((torch.float32, torch.float64)),
       temperature=st.floats(0.5, 4.0), ignore_frac=st.sampled_from((0.0, 0.3, 0.9)), seed=st.integers(0, 2**31 - 1))
def test_peer_kl_matches_the_per_pair_loop(shape, k, dtype, temperature, ignore_frac, seed):
    logits, y = make_students(seed, k, shape, dtype, ignore_frac)
    got_z, want_z = leaves(logits), leaves(logits, torch.float64)
    got = dml.peer_kl(got_z, y, temperature=temperature)
    want = loop_peer_kl(want_z, y, temperature)
    for g, w in zip(got, want):
        assert g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close(g.double(), w, **LOSS_TOL[dtype])
    grads = weighted_grads(got, got_z, grad_weights(k))
    assert_grads_close(grads, weighted_grads(want, want_z, grad_weights(k)), dtype, temperature,
                       int((y != IGNORE).sum()))


def test_peer_kl_trains_each_student_from_its_peers_only():
    logits, y = make_students(0, 3, (2, 4, 6, 5), torch.float32)
    z = leaves(logits)
    losses = dml.peer_kl(z, y, temperature=2.0)
    for s, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, z, allow_unused=True, retain_graph=True)
        for r, g in enumerate(grads):
            assert (g is not None and g.abs().max() > 0) if r == s else (g is None or not g.any())


# ------------------------------------------------------------------------------------------------------ KDCL, §9


@SETTINGS
@given(shape=shapes, dtype=st.sampled_from((torch.float32, torch.float64, torch.bfloat16)),
       ignore_frac=st.sampled_from((0.0, 0.3)), tie=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kdcl_teachers_with_two_students_are_the_two_student_ones_to_the_bit(shape, dtype, ignore_frac, tie, seed):
    (za, zb), y = make_students(seed, 2, shape, dtype, ignore_frac, tie=tie)
    assert torch.equal(kdcl.naive_teacher_k([za, zb], y, IGNORE), kdcl.naive_teacher(za, zb, y, IGNORE))
    assert torch.equal(kdcl.min_logit_teacher_k([za, zb], y, IGNORE), kdcl.min_logit_teacher(za, zb, y, IGNORE))
    zt, weights = kdcl.linear_teacher_k([za, zb], y, IGNORE)
    zt2, alpha = kdcl.linear_teacher(za, zb, y, IGNORE)
    assert weights.tolist() == [alpha, 1 - alpha] and torch.equal(zt, zt2)
    w = torch.tensor([0.3, 0.7])
    assert torch.equal(kdcl.general_teacher_k([za, zb], w, 2.0), kdcl.general_teacher(za, zb, w, 2.0))


@SETTINGS
@given(shape=shapes, k=K_MANY, tie=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_naive_and_min_logit_teachers_match_per_pixel_loops(shape, k, tie, seed):
    logits, y = make_students(seed, k, shape, tie=tie)
    naive = kdcl.naive_teacher_k(logits, y, IGNORE)
    min_logit = kdcl.min_logit_teacher_k(logits, y, IGNORE)
    n, c, h, w = shape
    for i, a, b in itertools.product(range(n), range(h), range(w)):
        label = int(y[i, a, b])
        rows = [z[i, :, a, b] for z in logits]
        if label == IGNORE:
            assert torch.equal(naive[i, :, a, b], rows[0])  # ignored pixels: the first student
            label = 0
        else:
            ces = [float(torch.logsumexp(row, 0) - row[label]) for row in rows]
            best = ces.index(min(ces))  # the first of equal CEs: ties go to the lowest index
            assert torch.equal(naive[i, :, a, b], rows[best])
        expect = torch.stack([row - row[label] for row in rows]).min(0).values
        assert torch.equal(min_logit[i, :, a, b], expect)


def test_naive_teacher_ties_go_to_the_lowest_index():
    logits, y = make_students(1, 3, (1, 3, 4, 4), ignore_frac=0.0)
    logits = [logits[0], logits[1], logits[1].clone()]  # students 1 and 2 tie everywhere
    logits[0] = logits[0] - 50.0 * F.one_hot(y, 3).permute(0, 3, 1, 2)  # student 0 is worst everywhere
    assert torch.equal(kdcl.naive_teacher_k(logits, y, IGNORE), logits[1])


def batch_ce(logits, y, w):
    return F.cross_entropy(sum(ws * z for ws, z in zip(w, logits)), y, ignore_index=IGNORE)


@pytest.mark.parametrize("seed", range(3))
def test_linear_weights_minimise_the_batch_ce_on_the_simplex(seed):
    logits, y = make_students(seed, 3, (2, 4, 6, 6), scale=2.0)
    w = kdcl.linear_weights(logits, y, IGNORE)
    assert w.dtype == torch.float64 and abs(float(w.sum()) - 1) < 1e-12 and bool((w >= 0).all())
    # Better than every point of a 1/100 grid on the simplex.
    grid = [torch.tensor([i, j, 100 - i - j], dtype=torch.float64) / 100 for i in range(101) for j in range(101 - i)]
    assert float(batch_ce(logits, y, w)) <= min(float(batch_ce(logits, y, g)) for g in grid) + 1e-12
    # Within tol = 1e-3 of a tight solve, which satisfies the optimality (KKT) conditions: every weight in use has
    # the least partial derivative of the CE, the unused ones no less.
    tight = kdcl.linear_weights(logits, y, IGNORE, tol=1e-10)
    assert float((w - tight).abs().max()) <= 1e-3
    v = tight.clone().requires_grad_()
    (g,) = torch.autograd.grad(batch_ce(logits, y, v), v)
    assert float(g.min()) > -1e3 and bool(((g - g.min())[tight > 1e-6] < 1e-6).all())


def test_linear_weights_of_a_perfect_student_and_of_an_all_ignored_batch():
    logits, y = make_students(4, 3, (2, 5, 6, 6))
    perfect = F.one_hot(torch.where(y == IGNORE, 0, y), 5).permute(0, 3, 1, 2).double() * 20
    w = kdcl.linear_weights([logits[0], perfect, logits[1]], y, IGNORE)
    assert float(w[1]) >= 1 - 1e-3
    assert kdcl.linear_weights(logits, torch.full_like(y, IGNORE), IGNORE).tolist() == [1 / 3] * 3


@pytest.mark.parametrize("v", [[5.0, -4.0, 0.5], [0.2, 0.3, 0.5], [1.0, 1.0, 1.0, 1.0], [-3.0, 0.1, 0.2]])
def test_euclidean_simplex_projection_is_the_closest_point(v):
    v = torch.tensor(v, dtype=torch.float64)
    p = kdcl.euclidean_simplex_projection(v)
    assert abs(float(p.sum()) - 1) < 1e-12 and bool((p >= 0).all())
    # No point of a fine grid on the simplex is closer to v.
    k = len(v)
    points = torch.tensor([c for c in itertools.product(range(41), repeat=k - 1) if sum(c) <= 40], dtype=torch.float64)
    points = torch.cat([points, 40 - points.sum(1, keepdim=True)], 1) / 40
    assert float((p - v).norm()) <= float((points - v).norm(dim=1).min()) + 1e-12


def test_general_weights_and_teacher_with_three_students():
    logits, y = make_students(5, 3, (2, 4, 5, 6))
    t = 2.0
    errors = [kdcl.prediction_errors(z, y, t, IGNORE) for z in logits]
    cov = kdcl.error_covariance(errors)
    assert cov.shape == (3, 3)
    for s, r in itertools.product(range(3), repeat=2):
        assert_close(cov[s, r], (errors[s].double() * errors[r].double()).sum())
    mean_cov = cov / errors[0].shape[0]
    w = kdcl.ensemble_weights(mean_cov, ridge=0.0)
    raw = torch.linalg.inv(mean_cov) @ torch.ones(3, dtype=torch.float64)
    raw = (raw / raw.sum()).clamp(0, 1)
    assert_close(w, raw / raw.sum())
    zt = kdcl.general_teacher_k(logits, w, t)
    q = sum(ws * torch.softmax(z / t, 1) for ws, z in zip(w, logits))
    assert_close(torch.softmax(zt.double() / t, 1), q, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k", (3, 4))
def test_kdcl_losses_distil_every_student_from_the_one_teacher(k):
    logits, y = make_students(6, k, (2, 4, 5, 6), torch.float32)
    z = leaves(logits)
    zt = kdcl.min_logit_teacher_k([x.detach() for x in z], y, IGNORE)
    losses = kdcl.kdcl_losses(z, zt, y, temperature=2.0, ignore_index=IGNORE)
    valid = y != IGNORE
    for s, loss in enumerate(losses):
        assert_close(loss.double(), kl_rows(zt, z[s], 2.0)[valid].mean(), **LOSS_TOL[torch.float32])
        grads = torch.autograd.grad(loss, z, allow_unused=True)
        assert all((g is not None and g.any()) if r == s else (g is None or not g.any()) for r, g in enumerate(grads))


# -------------------------------------------------------------------------------------- CCL pixel-wise BSD, §9


@SETTINGS
@given(shape=shapes, dtype=st.sampled_from((torch.float32, torch.float64, torch.float16)),
       rule=st.sampled_from(ccl_ops.RULES), normalize=st.sampled_from(ccl_ops.NORMALIZATIONS),
       temperature=st.floats(0.5, 4.0), ignore_frac=st.sampled_from((0.0, 0.3, 0.9)), tie=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_pixel_bsd_peers_with_two_students_is_pixel_selective_kl(shape, dtype, rule, normalize, temperature,
                                                                  ignore_frac, tie, seed):
    logits, y = make_students(seed, 2, shape, dtype, ignore_frac, tie=tie)
    kw = dict(temperature=temperature, rule=rule, normalize=normalize)
    z = leaves(logits)
    peers = ccl_ops.pixel_bsd_peers(z, y, **kw)
    grads = weighted_grads(peers, z, (1.0, -0.7))
    # The reference's arithmetic, to the bit: one selected peer at most, so the per-pixel mean divides by 1.
    r = leaves(logits)
    ref = reference.pixel_selective_kl(*r, y, **kw)
    ref_grads = weighted_grads([ref.loss_a, ref.loss_b], r, (1.0, -0.7))
    assert torch.equal(peers[0], ref.loss_a) and torch.equal(peers[1], ref.loss_b)
    assert all(torch.equal(g, h) for g, h in zip(grads, ref_grads))
    # The fused op, to its tolerance.
    f = leaves(logits)
    fused = ccl_ops.pixel_selective_kl(*f, y, **kw)
    assert_close(peers[0].double(), fused.loss_a.double(), **LOSS_TOL[dtype])
    assert_close(peers[1].double(), fused.loss_b.double(), **LOSS_TOL[dtype])
    n = int((y != IGNORE).sum()) if normalize == "valid" else int(fused.count_ab + fused.count_ba)
    assert_grads_close(grads, weighted_grads([fused.loss_a, fused.loss_b], f, (1.0, -0.7)), dtype, temperature, n)


@SETTINGS
@given(shape=shapes, k=K_MANY, dtype=st.sampled_from((torch.float32, torch.float64)),
       rule=st.sampled_from(ccl_ops.RULES), normalize=st.sampled_from(ccl_ops.NORMALIZATIONS),
       temperature=st.floats(0.5, 4.0), ignore_frac=st.sampled_from((0.0, 0.3, 0.9)), tie=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_pixel_bsd_peers_matches_the_per_pair_loop(shape, k, dtype, rule, normalize, temperature, ignore_frac, tie,
                                                   seed):
    logits, y = make_students(seed, k, shape, dtype, ignore_frac, tie=tie)
    got_z, want_z = leaves(logits), leaves(logits)
    got = ccl_ops.pixel_bsd_peers(got_z, y, temperature=temperature, rule=rule, normalize=normalize)
    want = loop_pixel_bsd(want_z, y, temperature, rule, normalize)
    for g, w in zip(got, want):
        assert_close(g.double(), w, **LOSS_TOL[dtype])
    assert_grads_close(weighted_grads(got, got_z, grad_weights(k)), weighted_grads(want, want_z, grad_weights(k)),
                       dtype, temperature, int((y != IGNORE).sum()))


@pytest.mark.parametrize("k", (3, 4))
def test_pixel_bsd_peers_with_rule_all_is_peer_kl(k):
    logits, y = make_students(7, k, (2, 5, 7, 6), torch.float32)
    got = ccl_ops.pixel_bsd_peers(logits, y, temperature=2.0, rule="all")
    for g, w in zip(got, dml.peer_kl(logits, y, temperature=2.0)):
        assert_close(g, w, **LOSS_TOL[torch.float32])


def test_rule_correct_lets_every_correct_peer_teach_every_wrong_student():
    # Three students on one pixel: 0 and 1 right, 2 wrong. Student 2 learns the mean of both KLs, 0 and 1 nothing.
    y = torch.tensor([[[1]]])
    z = [torch.tensor([0.0, 2.0, 0.5]), torch.tensor([1.0, 3.0, -1.0]), torch.tensor([2.0, 0.0, 1.0])]
    z = [v.view(1, 3, 1, 1) for v in z]
    losses = ccl_ops.pixel_bsd_peers(z, y, rule="correct")
    assert losses[0] == 0 and losses[1] == 0
    assert_close(losses[2].double(), (kl_rows(z[0], z[2], 1.0) + kl_rows(z[1], z[2], 1.0)).squeeze() / 2)
    masks = ccl_ops.peer_masks(z, y, rule="correct")
    assert [[None if m is None else bool(m) for m in row] for row in masks] == [
        [None, False, True], [False, None, True], [False, False, None]]


@SETTINGS
@given(shape=shapes, k=K_MANY, rule=st.sampled_from(("correct", "confidence")), seed=st.integers(0, 2**31 - 1),
       order=st.permutations(range(4)))
def test_pixel_bsd_peers_is_equivariant_to_the_order_of_the_students(shape, k, rule, seed, order):
    logits, y = make_students(seed, k, shape)
    order = [s for s in order if s < k]
    losses = ccl_ops.pixel_bsd_peers(logits, y, rule=rule)
    permuted = ccl_ops.pixel_bsd_peers([logits[s] for s in order], y, rule=rule)
    for i, s in enumerate(order):
        assert_close(permuted[i], losses[s], rtol=1e-12, atol=1e-14)


def test_a_student_best_everywhere_learns_nothing():
    logits, y = make_students(8, 3, (2, 4, 6, 6))
    logits[1] = logits[1] + 40.0 * F.one_hot(torch.where(y == IGNORE, 0, y), 4).permute(0, 3, 1, 2)
    for rule in ("correct", "confidence"):
        losses = ccl_ops.pixel_bsd_peers(logits, y, rule=rule)
        assert losses[1] == 0 and losses[0] > 0 and losses[2] > 0


# ------------------------------------------------------------------------------------- CCL region-wise BSD, §9


regions = st.tuples(st.integers(1, 5), st.integers(1, 5))


@SETTINGS
@given(shape=shapes, dtype=st.sampled_from((torch.float32, torch.float64, torch.bfloat16)),
       score=st.sampled_from(ccl_ops.SCORES), region=regions, ignore_frac=st.sampled_from((0.0, 0.5, 0.9)),
       tie=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_region_targets_with_two_students_are_the_direction_mask(shape, dtype, score, region, ignore_frac, tie, seed):
    (za, zb), y = make_students(seed, 2, shape, dtype, ignore_frac, tie=tie)
    targets = ccl_ops.region_targets([za, zb], y, region=region, score=score)
    mask = ccl_ops.region_direction_mask(za, zb, y, region=region, score=score)
    d = mask.direction
    assert targets.target.dtype == torch.int64
    assert torch.equal(targets.target, torch.where(d > 0, 0, torch.where(d < 0, 1, -1)))
    assert_close(targets.scores, mask.scores, rtol=0, atol=0, equal_nan=True)  # the op's own scores
    role_a, role_b = ccl_ops.region_roles(targets.target, 2)
    assert torch.equal(role_a.learns, d < 0) and torch.equal(role_b.learns, d > 0)
    assert torch.equal(role_a.teacher, torch.where(d < 0, 1, -1))
    assert torch.equal(role_b.teacher, torch.where(d > 0, 0, -1))


@SETTINGS
@given(shape=shapes, k=K_MANY, dtype=st.sampled_from((torch.float32, torch.float64)),
       score=st.sampled_from(ccl_ops.SCORES), region=regions, ignore_frac=st.sampled_from((0.0, 0.5, 0.9)),
       tie=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_region_targets_match_the_per_region_loop(shape, k, dtype, score, region, ignore_frac, tie, seed):
    logits, y = make_students(seed, k, shape, dtype, ignore_frac, tie=tie)
    got = ccl_ops.region_targets(logits, y, region=region, score=score)
    target, scores, gap = loop_region_targets(logits, y, region, score)
    assert_close(got.scores.double(), scores, equal_nan=True, **SCORE_TOL[dtype])
    # The op ranks float32 scores: where the float64 best is ahead by less than their rounding, either is right;
    # an exact tie (a copied student) or a region without valid pixels is -1 in both.
    clear = (gap > 1e-4) | (gap == 0)
    assert torch.equal(got.target[clear], target[clear])
    for s, role in enumerate(ccl_ops.region_roles(got.target, k)):
        assert torch.equal(role.learns, (got.target >= 0) & (got.target != s))
        assert torch.equal(role.teacher[role.learns], got.target[role.learns])
        assert bool((role.teacher[~role.learns] == -1).all())


def test_a_tie_for_the_best_teaches_nobody():
    logits, y = make_students(9, 3, (1, 3, 4, 4), ignore_frac=0.0)
    best = 30.0 * F.one_hot(y, 3).permute(0, 3, 1, 2).double()
    targets = ccl_ops.region_targets([logits[0], best, best.clone()], y, region=4)
    assert targets.target.tolist() == [[[-1]]]
    targets = ccl_ops.region_targets([logits[0], best, logits[1]], y, region=4)
    assert targets.target.tolist() == [[[1]]]


def test_targets_on_grid_with_two_students_is_direction_on_grid():
    (za, zb), y = make_students(10, 2, (2, 4, 16, 12), torch.float32)
    grid = (4, 3)
    target = ccl_ops.targets_on_grid([za, zb], y, grid, region=(4, 4))
    d = ccl_ops.direction_on_grid(za, zb, y, grid, region=(4, 4))
    assert torch.equal(target, torch.where(d > 0, 0, torch.where(d < 0, 1, -1)))
    with pytest.raises(ValueError, match="finer than the 4x3 feature grid"):
        ccl_ops.targets_on_grid([za, zb], y, grid, region=(2, 2))


def region_bsd_loop(features, target):
    """§3 with K students by a loop over cells: each non-target student moves toward the target's features."""
    n, d, h, w = features[0].shape
    losses = [torch.zeros((), dtype=torch.float64) for _ in features]
    cells = 0
    for i, a, b in itertools.product(range(n), range(h), range(w)):
        t = int(target[i, a, b])
        if t < 0:
            continue
        cells += 1
        for s, f in enumerate(features):
            if s != t:
                diff = f[i, :, a, b].double() - features[t][i, :, a, b].detach().double()
                losses[s] = losses[s] + (diff ** 2).sum() / d
    return [loss / max(cells, 1) for loss in losses]


@pytest.mark.parametrize("k", (2, 3, 4))
def test_region_feature_losses_match_the_cell_loop(k):
    logits, y = make_students(11, k, (2, 4, 16, 16), torch.float32)
    target = ccl_ops.targets_on_grid(logits, y, (4, 4), region=(4, 4))
    assert bool((target >= 0).any())
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(2, 5, 4, 4, generator=g).requires_grad_() for _ in range(k)]
    got = ccl_ops.region_feature_losses(features, target)
    want = region_bsd_loop(features, target)
    for s, (a, b) in enumerate(zip(got, want)):
        assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(a, features, allow_unused=True)
        assert all(r == s or gr is None or not gr.any() for r, gr in enumerate(grads))  # the target is a constant
    if k == 2:  # §3's loss_rbsd, written as RegionBSDLoss writes it, from the op's direction
        d = ccl_ops.direction_on_grid(*logits, y, (4, 4), region=(4, 4))
        fa, fb = features
        per_b = (fb - fa.detach()).pow(2).sum(1) / 5
        per_a = (fa - fb.detach()).pow(2).sum(1) / 5
        loss = ((d > 0) * per_b + (d < 0) * per_a).sum() / (d != 0).sum().clamp(min=1)
        assert_close(got[0] + got[1], loss)


# ------------------------------------------------------------------------------------------ edges and errors


@pytest.mark.parametrize("k", (2, 3))
def test_an_all_ignored_batch_gives_zero_losses_and_finite_gradients(k):
    logits, y = make_students(12, k, (1, 4, 5, 5), torch.float32)
    y = torch.full_like(y, IGNORE)
    cases = {
        "peer_kl": lambda z: dml.peer_kl(z, y),
        "pixel_bsd_valid": lambda z: ccl_ops.pixel_bsd_peers(z, y, rule="confidence"),
        "pixel_bsd_selected": lambda z: ccl_ops.pixel_bsd_peers(z, y, rule="all", normalize="selected"),
        "kdcl": lambda z: kdcl.kdcl_losses(z, kdcl.naive_teacher_k([x.detach() for x in z], y), y, temperature=2.0),
    }
    for name, fn in cases.items():
        z = leaves(logits)
        losses = fn(z)
        assert len(losses) == k and all(float(loss.detach()) == 0.0 for loss in losses), name
        grads = weighted_grads(losses, z, grad_weights(k))
        assert all(bool(g.isfinite().all()) for g in grads), name
    targets = ccl_ops.region_targets(logits, y, region=2)
    assert bool((targets.target == -1).all()) and bool(targets.scores.isnan().all())
    features = [torch.randn(1, 3, 3, 3, requires_grad=True) for _ in range(k)]
    losses = ccl_ops.region_feature_losses(features, torch.full((1, 3, 3), -1))
    assert all(float(loss.detach()) == 0.0 for loss in losses)


def _functions():
    """Every K-student function, called with ``logits`` and labels ``y``."""
    w = torch.tensor([0.5, 0.5])
    return {
        "peer_kl": lambda z, y: dml.peer_kl(z, y),
        "pixel_bsd_peers": lambda z, y: ccl_ops.pixel_bsd_peers(z, y),
        "peer_masks": lambda z, y: ccl_ops.peer_masks(z, y),
        "region_targets": lambda z, y: ccl_ops.region_targets(z, y, region=2),
        "naive_teacher_k": lambda z, y: kdcl.naive_teacher_k(z, y),
        "min_logit_teacher_k": lambda z, y: kdcl.min_logit_teacher_k(z, y),
        "linear_teacher_k": lambda z, y: kdcl.linear_teacher_k(z, y),
        "kdcl_losses": lambda z, y: kdcl.kdcl_losses(z, torch.zeros(1, 3, 4, 4), y, temperature=1.0),
        "general_teacher_k": lambda z, y: kdcl.general_teacher_k(z, w, 1.0),
    }


@pytest.mark.parametrize("name", sorted(_functions()))
def test_bad_input_is_a_clear_error(name):
    fn = _functions()[name]
    (za, zb, zc), y = make_students(13, 3, (1, 3, 4, 4), torch.float32)
    with pytest.raises(ValueError, match=r"logits must hold K >= 2 students' logits \(METHOD.md §9\), got K = 1"):
        fn([za], y)
    with pytest.raises(ValueError, match=r"got K = 0"):
        fn([], y)
    with pytest.raises(ValueError, match=r"logits must be a list or tuple of K >= 2 .*, got Tensor"):
        fn(za, y)
    with pytest.raises(ValueError, match=r"logits\[1\] must have the shape of logits\[0\] \(1, 3, 4, 4\), got "
                                         r"\(1, 3, 4, 5\)"):
        fn([za, torch.zeros(1, 3, 4, 5)], y)
    with pytest.raises(ValueError, match=r"logits\[2\] must be 4-D \(N, C, H, W\), got shape \(3, 4, 4\)"):
        fn([za, zb, zc[0]], y)
    with pytest.raises(TypeError, match=r"logits\[1\] must have the dtype of logits\[0\] \(torch.float32\), got "
                                        r"torch.float64"):
        fn([za, zb.double()], y)
    if name != "general_teacher_k":  # the only one without labels
        with pytest.raises(ValueError, match=r"y must have shape \(N, H, W\) = \(1, 4, 4\) to match the logits, got "
                                             r"\(1, 4, 3\)"):
            fn([za, zb], y[..., :3])


def test_bad_options_are_clear_errors():
    (za, zb), y = make_students(14, 2, (1, 3, 4, 4), torch.float32)
    with pytest.raises(ValueError, match=r"rule='best' is unknown; expected one of 'correct', 'confidence', 'all'"):
        ccl_ops.pixel_bsd_peers([za, zb], y, rule="best")
    with pytest.raises(ValueError, match=r"normalize='pixels' is unknown; expected one of 'valid', 'selected'"):
        ccl_ops.pixel_bsd_peers([za, zb], y, normalize="pixels")
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        ccl_ops.pixel_bsd_peers([za, zb], y, temperature=0)
    with pytest.raises(ValueError, match=r"score='iou' is unknown; expected one of 'ce', 'accuracy'"):
        ccl_ops.region_targets([za, zb], y, score="iou")
    with pytest.raises(ValueError, match=r"label value 7, which is neither in \[0, 3\) nor ignore_index=255"):
        ccl_ops.pixel_bsd_peers([za, zb], torch.full_like(y, 7))
    with pytest.raises(ValueError, match=r"weights must have shape \(K,\) = \(2,\), one per student, got \(3,\)"):
        kdcl.general_teacher_k([za, zb], torch.ones(3) / 3, 1.0)
    with pytest.raises(ValueError, match=r"num_students must be K >= 2 \(METHOD.md §9\), got 1"):
        ccl_ops.region_roles(torch.zeros(1, 2, 2, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match=r"features must hold K >= 2 students' \(N, D, h, w\) features, got 1"):
        ccl_ops.region_feature_losses([torch.zeros(1, 2, 3, 3)], torch.zeros(1, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"features\[1\] must be \(N, D, h, w\) with the shape of features\[0\] "
                                         r"\(1, 2, 3, 3\), got \(1, 2, 3, 4\)"):
        ccl_ops.region_feature_losses([torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4)],
                                      torch.zeros(1, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"target must have shape \(N, h, w\) = \(1, 3, 3\) to match the features, "
                                         r"got \(1, 3, 4\)"):
        ccl_ops.region_feature_losses([torch.zeros(1, 2, 3, 3)] * 2, torch.zeros(1, 3, 4, dtype=torch.int64))
