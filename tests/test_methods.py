"""Each method's loss terms against METHOD.md's formulas on small tensors."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from baselines.kdcl import linear_alpha, project_to_simplex
from ccl_bench.methods import StudentOutput, build_method, method_names, parse_method_spec
from ccl_bench.models import build_student, run_stage

warnings.filterwarnings("ignore", message="ccl_ops: no compiled kernel")
N, C, H, W = 2, 5, 8, 8
IGNORE = 255


def _inputs(seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    za = torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * 2
    zb = torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, C, (N, H, W), generator=g)
    y[0, :2] = IGNORE
    return za.requires_grad_(requires_grad), zb.requires_grad_(requires_grad), y


def _kl_rows(p_teacher, log_p_student):
    """Per-pixel KL(p_teacher || p_student) over the class axis (the formula, written out)."""
    return (p_teacher * (p_teacher.log() - log_p_student)).sum(1)


def _mean_valid(per_pixel, y):
    valid = y != IGNORE
    return per_pixel[valid].sum() / valid.sum()


def _ce(z, y):
    return F.cross_entropy(z, y, ignore_index=IGNORE)


def _method(name, **options):
    return build_method(name, (None, None), C, IGNORE, **options)


def test_registry_holds_every_method():
    assert method_names() == sorted(["ccl", "dml", "independent", "kdcl-general", "kdcl-linear", "kdcl-minlogit",
                                     "kdcl-naive"])
    with pytest.raises(ValueError, match="method='nope' is unknown; expected one of"):
        build_method("nope", (None, None), C)


def test_independent_is_the_two_cross_entropies():
    za, zb, y = _inputs()
    out = _method("independent")(StudentOutput(za), StudentOutput(zb), y)
    assert set(out.terms) == {"ce_a", "ce_b"}
    assert_close(out.terms["ce_a"], _ce(za, y))
    assert_close(out.terms["ce_b"], _ce(zb, y))


@pytest.mark.parametrize("t,lam", [(1.0, 1.0), (2.0, 0.5)])
def test_dml_matches_formula_and_stops_gradients(t, lam):
    za, zb, y = _inputs()
    out = _method("dml", temperature=t, lambda_kl=lam)(StudentOutput(za), StudentOutput(zb), y)
    pa, pb = torch.softmax(za / t, 1), torch.softmax(zb / t, 1)
    expect_a = lam * t * t * _mean_valid(_kl_rows(pb.detach(), torch.log_softmax(za / t, 1)), y)
    expect_b = lam * t * t * _mean_valid(_kl_rows(pa.detach(), torch.log_softmax(zb / t, 1)), y)
    assert_close(out.terms["kl_a"].double(), expect_a)
    assert_close(out.terms["kl_b"].double(), expect_b)
    # kl_a trains A only
    grad_za, grad_zb = torch.autograd.grad(out.terms["kl_a"], [za, zb], allow_unused=True)
    assert grad_zb is None or grad_zb.abs().max() == 0
    assert grad_za.abs().max() > 0


def _kdcl_expected(za, zb, zt, y, t, lam):
    q = torch.softmax(zt.detach() / t, 1)
    return [lam * t * t * _mean_valid(_kl_rows(q, torch.log_softmax(z / t, 1)), y) for z in (za, zb)]


def _check_kdcl(name, zt, **options):
    za, zb, y = _inputs(1)
    method = _method(name, **options)
    out = method(StudentOutput(za), StudentOutput(zb), y)
    o = method.options
    expect_a, expect_b = _kdcl_expected(za, zb, zt(za.detach(), zb.detach(), y), y, o["temperature"], o["lambda_kl"])
    assert_close(out.terms["ce_a"], _ce(za, y))
    assert_close(out.terms["kl_a"].double(), expect_a)
    assert_close(out.terms["kl_b"].double(), expect_b)
    # the teacher is detached: kl_a reaches za only
    grads = torch.autograd.grad(out.terms["kl_a"], [za, zb], allow_unused=True)
    assert grads[0].abs().max() > 0 and (grads[1] is None or grads[1].abs().max() == 0)
    return method


def test_kdcl_naive_teacher_is_lower_ce_student():
    def teacher(za, zb, y):
        target = torch.where(y == IGNORE, 0, y)
        ce_a = F.cross_entropy(za, target, reduction="none")
        ce_b = F.cross_entropy(zb, target, reduction="none")
        return torch.where((ce_b < ce_a)[:, None], zb, za)
    _check_kdcl("kdcl-naive", teacher)


def test_kdcl_minlogit_teacher():
    def teacher(za, zb, y):
        target = torch.where(y == IGNORE, 0, y)
        out = torch.empty_like(za)
        for n in range(N):
            for i in range(H):
                for j in range(W):
                    k = target[n, i, j]
                    out[n, :, i, j] = torch.minimum(za[n, :, i, j] - za[n, k, i, j], zb[n, :, i, j] - zb[n, k, i, j])
        return out
    _check_kdcl("kdcl-minlogit", teacher, temperature=3.0, lambda_kl=0.7)


def test_kdcl_linear_alpha_minimises_batch_ce():
    za, zb, y = _inputs(2, requires_grad=False)
    alpha = linear_alpha(za, zb, y, IGNORE)
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    ces = torch.stack([_ce(a * za + (1 - a) * zb, y) for a in grid])
    best = grid[ces.argmin()].item()
    assert abs(alpha - best) <= 1.5e-3
    # at the boundary: a perfect A gives alpha = 1
    perfect = F.one_hot(torch.where(y == IGNORE, 0, y), C).permute(0, 3, 1, 2).double() * 20
    assert linear_alpha(perfect, zb, y, IGNORE) == 1.0
    _check_kdcl("kdcl-linear", lambda a, b, yy: linear_alpha(a, b, yy, IGNORE) * a
                + (1 - linear_alpha(a, b, yy, IGNORE)) * b)


class _Holdout:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def sum(self, t):
        return t


class _Fixed(torch.nn.Module):
    """A 'student' that returns fixed logits for a given input id."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, x):
        return self.table[int(x.flatten()[0])]


def _unconstrained_weights(za, zb, y, t):
    """KDCL-General's ensemble weights before the projection: inverse error covariance times 1, normalised."""
    valid = y != IGNORE
    errors = [(torch.softmax(z / t, 1).permute(0, 2, 3, 1)[valid] - F.one_hot(y[valid], C)).flatten()
              for z in (za, zb)]
    cov = torch.tensor([[(ei * ej).sum() / valid.sum() for ej in errors] for ei in errors], dtype=torch.float64)
    w = torch.linalg.inv(cov) @ torch.ones(2, dtype=torch.float64)
    return w / w.sum()


def test_kdcl_general_weights_from_error_covariance_and_teacher():
    za, zb, y = _inputs(3, requires_grad=False)
    t = 2.0
    method = build_method("kdcl-general", (_Fixed([za]), _Fixed([zb])), C, IGNORE, temperature=t, ridge=0.0)
    method.on_epoch_start(0, _Holdout([(torch.zeros(1), y)]))
    assert_close(method.weights, torch.tensor([0.5, 0.5]))  # first epoch: equal weights, no estimate
    method.on_epoch_start(1, _Holdout([(torch.zeros(1), y)]))
    w = _unconstrained_weights(za, zb, y, t)
    assume_inside = bool(((w >= 0) & (w <= 1)).all())
    assert assume_inside, f"the fixture's weights {w} should lie inside the simplex (no clipping)"
    assert_close(method.weights.double(), w, atol=1e-6, rtol=1e-5)
    assert "weights" in method.state_dict()  # checkpointed

    def teacher(a, b, yy):
        q = w[0] * torch.softmax(a / t, 1) + w[1] * torch.softmax(b / t, 1)
        return t * q.log()
    za2, zb2, y2 = _inputs(1)
    out = method(StudentOutput(za2), StudentOutput(zb2), y2)
    expect = _kdcl_expected(za2, zb2, teacher(za2.detach(), zb2.detach(), y2), y2, t, 1.0)
    assert_close(out.terms["kl_a"].double(), expect[0], atol=1e-5, rtol=1e-4)
    assert_close(out.terms["kl_b"].double(), expect[1], atol=1e-5, rtol=1e-4)
    assert method.needs_holdout


@pytest.mark.parametrize("a_scale", [0.5, 1.5])
def test_kdcl_general_weights_projected_onto_the_simplex(a_scale):
    # Nearly collinear errors of different size give an unconstrained weight outside [0, 1] (like the 5 / -4
    # seen on untrained students): the estimate is clipped to [0, 1] and renormalised (METHOD §6).
    _, zb, y = _inputs(3, requires_grad=False)
    za = zb * a_scale  # one student sharper or softer than the other, same ranking of the classes
    method = build_method("kdcl-general", (_Fixed([za]), _Fixed([zb])), C, IGNORE, ridge=0.0)
    method.on_epoch_start(1, _Holdout([(torch.zeros(1), y)]))
    w = _unconstrained_weights(za, zb, y, method.options["temperature"])
    assert bool(((w < 0) | (w > 1)).any()), f"the fixture's weights {w} should leave the simplex"
    clipped = w.clamp(0, 1)
    assert_close(method.weights.double(), clipped / clipped.sum(), atol=1e-6, rtol=1e-5)


def test_project_to_simplex():
    assert_close(project_to_simplex(torch.tensor([5.0, -4.0])), torch.tensor([1.0, 0.0]))
    assert_close(project_to_simplex(torch.tensor([-0.2, 1.2])), torch.tensor([0.0, 1.0]))
    assert_close(project_to_simplex(torch.tensor([0.3, 0.7])), torch.tensor([0.3, 0.7]))


def test_kdcl_invariant_mode_gives_each_student_its_own_view():
    method = _method("kdcl-minlogit", invariant=True)
    x = torch.randn(2, 3, 8, 8)
    xa, xb = method.views(x)
    assert xa.shape == x.shape and not torch.equal(xa, xb)
    method.eval()
    xa, xb = method.views(x)
    assert xa is x and xb is x
    xa, xb = _method("kdcl-minlogit").views(x)
    assert xa is x and xb is x


@pytest.fixture(scope="module")
def students():
    torch.manual_seed(0)
    a = build_student("deeplabv3plus_mobilenetv2_100", C, decoder_channels=16)
    b = build_student("segformer_pvt_v2_b0", C, decoder_channels=16)
    return a, b


def _student_outputs(students, seed=0):
    a, b = students
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 32, 32, generator=g)
    y = torch.randint(0, C, (2, 32, 32), generator=g)
    y[:, :4] = IGNORE
    za, fa = a(x, return_features=True)
    zb, fb = b(x, return_features=True)
    return StudentOutput(za, fa), StudentOutput(zb, fb), y


def test_ccl_terms_match_formulas(students):
    a, b = students
    torch.manual_seed(1)
    method = build_method("ccl", students, C, IGNORE, region=[16, 16], rbsd_dim=8, lambda_hfd=0.5,
                          lambda_rbsd=2.0, lambda_pbsd=3.0)
    out_a, out_b, y = _student_outputs(students)
    out = method(out_a, out_b, y)
    assert set(out.terms) == {"ce_a", "ce_b", "hfd", "rbsd", "pbsd_a", "pbsd_b"}
    za, zb = out_a.logits.detach().double(), out_b.logits.detach().double()
    assert_close(out.terms["ce_a"], _ce(out_a.logits, y))
    # pixel-wise BSD, rule "correct", T = 1, normalised by the valid pixels
    valid = y != IGNORE
    target = torch.where(valid, y, 0)
    right_a, right_b = za.argmax(1) == target, zb.argmax(1) == target
    m_ab, m_ba = valid & right_a & ~right_b, valid & right_b & ~right_a
    kl_ab = _kl_rows(torch.softmax(za, 1), torch.log_softmax(zb, 1))
    kl_ba = _kl_rows(torch.softmax(zb, 1), torch.log_softmax(za, 1))
    assert_close(out.terms["pbsd_b"].double(), 3.0 * (kl_ab * m_ab).sum() / valid.sum(), atol=1e-6, rtol=1e-5)
    assert_close(out.terms["pbsd_a"].double(), 3.0 * (kl_ba * m_ba).sum() / valid.sum(), atol=1e-6, rtol=1e-5)
    assert_close(out.stats["pixel_ab"], m_ab.sum().float() / valid.sum())
    # HFD: stage-1 features through the other student's stage 2, MSE to its own stage-2 output, mean of two
    fa1, fa2, fb1, fb2 = out_a.features[0], out_a.features[1], out_b.features[0], out_b.features[1]
    ga = F.interpolate(method.gammas["ab"].proj(fa1), size=fb1.shape[-2:], mode="bilinear", align_corners=False)
    gb = F.interpolate(method.gammas["ba"].proj(fb1), size=fa1.shape[-2:], mode="bilinear", align_corners=False)
    hfd = 0.5 * (F.mse_loss(b.stages[1](ga), fb2) + F.mse_loss(a.stages[1](gb), fa2))
    assert_close(out.terms["hfd"], 0.5 * hfd, atol=1e-5, rtol=1e-4)
    # region-wise BSD: masked feature MSE on the common grid, direction from the mean-CE per 16x16 region (one per cell of the 2x2 grid)
    ce_a = F.cross_entropy(za, target, reduction="none") * valid
    ce_b = F.cross_entropy(zb, target, reduction="none") * valid
    pool = lambda t: F.avg_pool2d(t[:, None].double(), 16)[:, 0]  # noqa: E731
    score_a, score_b = pool(ce_a) / pool(valid.double()), pool(ce_b) / pool(valid.double())
    d = (score_a < score_b).double() - (score_b < score_a).double()
    ga4, gb4 = out_a.features[-1], out_b.features[-1]
    grid = max(ga4.shape[-2:], gb4.shape[-2:], key=lambda s: s[0] * s[1])
    pa = F.interpolate(method.rbsd.proj_a(ga4), size=grid, mode="bilinear", align_corners=False)
    pb = F.interpolate(method.rbsd.proj_b(gb4), size=grid, mode="bilinear", align_corners=False)
    dg = F.interpolate(d[:, None], size=grid, mode="nearest")[:, 0]
    per_b = (pb - pa).pow(2).sum(1) / 8
    per_a = (pa - pb).pow(2).sum(1) / 8
    cells = (dg != 0).sum().clamp(min=1)
    expect = ((dg > 0) * per_b + (dg < 0) * per_a).sum() / cells
    assert_close(out.terms["rbsd"].double(), 2.0 * expect.double(), atol=1e-5, rtol=1e-4)
    assert_close(out.stats["region_ab"], (dg > 0).float().mean())


def test_ccl_gradients_reach_the_right_parameters(students):
    a, b = students
    method = build_method("ccl", students, C, IGNORE, region=[16, 16], rbsd_dim=8)
    out_a, out_b, y = _student_outputs(students, 1)
    out = method(out_a, out_b, y)
    a.zero_grad()
    b.zero_grad()
    # HFD trains the Gammas and the source student's stage 1, never the borrowed stage 2
    grads = torch.autograd.grad(out.terms["hfd"], [method.gammas["ab"].proj.weight, *a.stages[0].parameters(),
                                                   *b.stages[1].parameters()], allow_unused=True)
    n_a = len(list(a.stages[0].parameters()))
    assert grads[0].abs().sum() > 0
    assert any(g is not None and g.abs().sum() > 0 for g in grads[1:1 + n_a])
    assert all(g is None or g.abs().sum() == 0 for g in grads[1 + n_a:])
    # each student's optimizer gets its own side of the method's parameters
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(method.student_parameters("a")) == ids([*method.gammas["ab"].parameters(), *method.rbsd.proj_a.parameters()])
    assert ids(method.student_parameters("b")) == ids([*method.gammas["ba"].parameters(), *method.rbsd.proj_b.parameters()])
    assert ids(method.parameters()) == ids(method.student_parameters("a")) | ids(method.student_parameters("b"))


@pytest.mark.parametrize("off", ["hfd", "rbsd", "pbsd"])
def test_ccl_terms_switch_off(students, off):
    method = build_method("ccl", students, C, IGNORE, region=[16, 16], **{off: False})
    out = method(*_student_outputs(students))
    assert not any(k.startswith(off) for k in out.terms)
    assert {"ce_a", "ce_b"} <= set(out.terms)
    assert all(math.isfinite(v.item()) for v in out.terms.values())


def test_bad_options_name_the_option_and_the_choices():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['hdf'\]; valid options: .*'hfd'"):
        _method("ccl", hdf=False)
    with pytest.raises(ValueError, match=r"rule='best'; expected one of \['correct', 'confidence', 'all'\]"):
        _method("ccl", rule="best")
    with pytest.raises(ValueError, match=r"temperature=-1.0; expected a number > 0"):
        _method("dml", temperature=-1.0)
    with pytest.raises(ValueError, match=r"hfd='no'; expected a bool"):
        build_method("ccl", (None, None), C, hfd="no")


def test_method_spec_parsing():
    assert parse_method_spec("ccl:hfd=false:lambda_pbsd=0.5") == ("ccl", {"hfd": False, "lambda_pbsd": 0.5})
    assert parse_method_spec("dml") == ("dml", {})
    with pytest.raises(ValueError, match="not key=value"):
        parse_method_spec("ccl:hfd")
    with pytest.raises(ValueError, match="unknown"):
        parse_method_spec("cll")
