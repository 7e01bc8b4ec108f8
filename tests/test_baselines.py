"""KD baselines against slow loop references."""

from __future__ import annotations

import math

import pytest
import torch

from brcd.losses import BASELINES, BaselineKDLoss, crd, hinton_kd, pkt, rkd, sp

torch.set_num_threads(1)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _huber(d):
    return 0.5 * d * d if abs(d) < 1.0 else abs(d) - 0.5


def _dist(u, v):
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v)))


def _unit(u):
    n = max(math.sqrt(sum(x * x for x in u)), 1e-8)
    return [x / n for x in u]


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def ref_kd(s, t, T):
    total = 0.0
    for sr, tr in zip(s.tolist(), t.tolist()):
        for x, y in zip(sr, tr):
            p, q = _sigmoid(x / T), _sigmoid(y / T)
            total += q * (math.log(q) - math.log(p)) + (1 - q) * (math.log(1 - q) - math.log(1 - p))
    return total / len(s) * T * T


def ref_rkd(s, t, w_dist, w_angle):
    def distances(x):
        b = len(x)
        d = {(i, j): _dist(x[i], x[j]) for i in range(b) for j in range(b) if i != j}
        mu = sum(d.values()) / len(d)
        return {k: v / mu for k, v in d.items()}

    def angles(x):
        b = len(x)
        out = {}
        for i in range(b):
            for j in range(b):
                for k in range(b):
                    if len({i, j, k}) == 3:
                        e_ij = _unit([a - c for a, c in zip(x[i], x[j])])
                        e_kj = _unit([a - c for a, c in zip(x[k], x[j])])
                        out[(i, j, k)] = _dot(e_ij, e_kj)
        return out

    s, t = s.tolist(), t.tolist()
    ds, dt = distances(s), distances(t)
    loss_d = sum(_huber(ds[k] - dt[k]) for k in ds) / len(ds)
    a_s, a_t = angles(s), angles(t)
    loss_a = sum(_huber(a_s[k] - a_t[k]) for k in a_s) / len(a_s)
    return w_dist * loss_d + w_angle * loss_a


def ref_pkt(s, t, eps=1e-7):
    def cond(x):
        x = [_unit(r) for r in x]
        k = [[(_dot(a, b) + 1) / 2 for b in x] for a in x]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = cond(s.tolist()), cond(t.tolist())
    b = len(ps)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b)) / (b * b)


def ref_sp(s, t):
    def gram(x):
        g = [[_dot(a, b) for b in x] for a in x]
        return [_unit(row) for row in g]

    gs, gt = gram(s.tolist()), gram(t.tolist())
    b = len(gs)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)


def ref_crd(s, t, tau):
    s = [_unit(r) for r in s.tolist()]
    t = [_unit(r) for r in t.tolist()]
    b = len(s)

    def ce(rows):
        total = 0.0
        for i in range(b):
            logits = [rows(i, j) / tau for j in range(b)]
            m = max(logits)
            total += m + math.log(sum(math.exp(x - m) for x in logits)) - logits[i]
        return total / b

    return 0.5 * (ce(lambda i, j: _dot(s[i], t[j])) + ce(lambda i, j: _dot(t[i], s[j])))


def _pair(seed=0, b=5, bits=6, codes=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, bits, generator=g, dtype=torch.float64)
    t = torch.randn(b, bits, generator=g, dtype=torch.float64)
    if codes:
        t = t.sign()
    return s, t


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_hinton_kd(T):
    s, t = _pair(codes=False)
    assert hinton_kd(s, t, T=T).item() == pytest.approx(ref_kd(s, t, T), rel=1e-10)


@pytest.mark.parametrize("w_dist,w_angle", [(25.0, 50.0), (1.0, 0.0), (0.0, 2.0)])
@pytest.mark.parametrize("codes", [True, False])
def test_rkd(w_dist, w_angle, codes):
    s, t = _pair(codes=codes)
    assert rkd(s, t, w_dist, w_angle).item() == pytest.approx(ref_rkd(s, t, w_dist, w_angle), rel=1e-9)


@pytest.mark.parametrize("codes", [True, False])
def test_pkt(codes):
    s, t = _pair(codes=codes)
    assert pkt(s, t).item() == pytest.approx(ref_pkt(s, t), rel=1e-9)


@pytest.mark.parametrize("codes", [True, False])
def test_sp(codes):
    s, t = _pair(codes=codes)
    assert sp(s, t).item() == pytest.approx(ref_sp(s, t), rel=1e-9)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_crd(tau):
    s, t = _pair()
    assert crd(s, t, tau).item() == pytest.approx(ref_crd(s, t, tau), rel=1e-10)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_gradient_to_student_only_and_finite_with_duplicate_rows(name):
    s, t = _pair()
    t[1] = t[0]  # identical teacher codes (common with binary codes): zero distances / angles
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    loss = BASELINES[name](s, t)
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_registry_and_wrapper():
    assert set(BASELINES) == {"kd", "rkd", "pkt", "sp", "crd"}
    s, t = _pair()
    module = BaselineKDLoss("crd", temperature=0.2)
    assert module(s, t).item() == pytest.approx(crd(s, t, 0.2).item())
    with pytest.raises(ValueError, match="unknown KD baseline"):
        BaselineKDLoss("fitnet")
    with pytest.raises(ValueError, match="bad arguments"):
        BaselineKDLoss("sp", temperature=0.1)
    with pytest.raises(ValueError, match="temperature"):
        BaselineKDLoss("crd", temperature=0.0)
    with pytest.raises(ValueError, match="at least 3"):
        rkd(s[:2], t[:2])
