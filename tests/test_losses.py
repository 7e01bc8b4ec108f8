"""Losses against slow loop references written from docs/METHOD.md, plus flag and edge tests."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from brcd.codes import sign_ste
from brcd.losses import (
    BRCDLoss,
    DistillationLoss,
    NTXentLoss,
    SymmetricBernoulliKL,
    TeacherLoss,
    brcd_logits,
    brcd_loss,
    distillation_objective,
    nt_xent,
    symmetric_bernoulli_kl,
    teacher_objective,
)

torch.set_num_threads(1)

# --------------------------------------------------------------------------- loop references


def _norm(u):
    return max(math.sqrt(sum(x * x for x in u)), 1e-8)


def _cos(u, v):
    return sum(a * b for a, b in zip(u, v)) / (_norm(u) * _norm(v))


def _lse(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def ref_nt_xent(z1, z2, tau):
    z = z1.tolist() + z2.tolist()
    n, b = len(z), len(z1)
    total = 0.0
    for a in range(n):
        p = (a + b) % n
        logits = [_cos(z[a], z[j]) / tau for j in range(n) if j != a]
        total += -_cos(z[a], z[p]) / tau + _lse(logits)
    return total / n


def ref_sym_kl(p1, p2, eps=1e-7):
    def kl(p, q):
        tot = 0.0
        for pr, qr in zip(p, q):
            for x, y in zip(pr, qr):
                tot += x * (math.log(x + eps) - math.log(y + eps)) + (1 - x) * (
                    math.log(1 - x + eps) - math.log(1 - y + eps)
                )
        return tot / len(p)

    a, b = p1.tolist(), p2.tolist()
    return 0.5 * (kl(a, b) + kl(b, a))


def ref_brcd(s, t, tp, c, masks, cents, *, tau, alpha, use_mask, use_fn, use_off, use_struct, use_ind, released):
    """docs/METHOD.md, "The distillation objective", literally; ``released`` as documented in brcd_loss."""
    s, t, tp, masks, cents = s.tolist(), t.tolist(), tp.tolist(), masks.tolist(), cents.tolist()
    c = [int(x) for x in c.tolist()]
    b, bits = len(s), len(s[0])
    rows = []
    for k in range(b):
        if not use_mask:
            rows.append([1.0] * bits)
        elif released:
            rows.append([0.0] * bits)
        else:
            rows.append(list(masks[c[k]]))
    s_hat = [[s[k][l] * rows[k][l] for l in range(bits)] for k in range(b)]
    tp_hat = [[tp[k][l] * rows[k][l] for l in range(bits)] for k in range(b)]
    source = tp_hat if released else tp
    assigned = []
    for k in range(b):
        d = [sum((source[k][l] - mu[l]) ** 2 for l in range(bits)) for mu in cents]
        assigned.append(min(range(len(cents)), key=lambda j: (d[j], j)))
    alphas = []
    for k in range(b):
        if not use_struct:
            a_k = 1.0
        elif not use_ind:
            a_k = 0.0
        else:
            a_k = 1.0 if (use_off and assigned[k] != c[k]) else alpha
        alphas.append(a_k)
    z = s_hat + tp_hat
    n = 2 * b
    total = 0.0
    for a in range(n):
        k = a % b
        p = (a + b) % n
        pos = (alphas[k] * _cos(s[k], t[k]) + (1 - alphas[k]) * _cos(z[a], z[p])) / tau
        terms = [pos]
        for col in range(n):
            if col in (a, p):
                continue
            if col < b:
                col_label = c[col]
            elif released and not use_off:
                col_label = c[col - b]
            else:
                col_label = assigned[col - b]
            logit = _cos(z[a], z[col]) / tau
            if use_fn and col_label == c[k]:
                if released:
                    logit += -1000.0
                else:
                    continue
            terms.append(logit)
        total += _lse(terms) - pos
    return total / n


# --------------------------------------------------------------------------- fixtures


def _random_batch(seed=3, b=6, bits=8, k=3):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, bits, generator=g, dtype=torch.float64)
    t = torch.randint(0, 2, (b, bits), generator=g).double() * 2 - 1
    tp = torch.where(torch.rand(b, bits, generator=g) < 0.25, -t, t)  # view 2: some bits flipped
    masks = (torch.rand(k, bits, generator=g) < 0.6).double()
    cents = torch.randn(k, bits, generator=g, dtype=torch.float64) * 0.6
    c = torch.cdist(t, cents).argmin(1)  # pseudo-label = cluster of the view-1 teacher code
    masks[c[0]] = 0.0  # image 0's cluster fully masked: zero rows in Z
    return s, t, tp, c, masks, cents


SWITCHES = [
    combo
    for combo in itertools.product([True, False], repeat=6)
    if combo[3] or combo[4]  # use_structural or use_individual
]


def _switch_id(combo):
    names = ["mask", "fn", "off", "struct", "ind", "released"]
    return "-".join(n if on else f"no{n}" for n, on in zip(names, combo))


def test_random_batch_exercises_every_mechanism():
    s, t, tp, c, masks, cents = _random_batch()
    out = brcd_logits(s, t, tp, c, masks, cents)
    assert 0 < int(out.offset_positives.sum()) < len(c)
    assert int(out.false_negatives.sum()) > 0
    assert (out.row_masks.sum(1) == 0).any() and (out.row_masks.sum(1) > 0).any()


@pytest.mark.parametrize("tau,alpha", [(0.3, 0.8), (0.5, 0.3), (0.2, 0.0), (1.0, 1.0)])
@pytest.mark.parametrize("combo", SWITCHES, ids=_switch_id)
def test_brcd_matches_loop_reference(combo, tau, alpha):
    use_mask, use_fn, use_off, use_struct, use_ind, released = combo
    s, t, tp, c, masks, cents = _random_batch()
    kw = dict(
        use_mask=use_mask,
        use_false_negatives=use_fn,
        use_offset_positives=use_off,
        use_structural=use_struct,
        use_individual=use_ind,
        released=released,
    )
    loss, stats = brcd_loss(s, t, tp, c, masks, cents, temperature=tau, alpha=alpha, **kw)
    ref = ref_brcd(
        s, t, tp, c, masks, cents, tau=tau, alpha=alpha, use_mask=use_mask, use_fn=use_fn,
        use_off=use_off, use_struct=use_struct, use_ind=use_ind, released=released,
    )
    assert math.isfinite((loss).item())
    assert (loss).item() == pytest.approx(ref, rel=1e-9, abs=1e-9)
    assert float(stats["loss"]) == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_float32_matches_float64():
    batch = _random_batch()
    l64, _ = brcd_loss(*batch)
    l32, _ = brcd_loss(*(x.float() if x.is_floating_point() else x for x in batch))
    assert l32.dtype == torch.float32
    assert (l32).item() == pytest.approx((l64).item(), rel=1e-5)


# --------------------------------------------------------------------------- hand-made batch


def _hand_batch():
    #            c = 0          c = 0             c = 1
    t = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, -1], [-1, -1, -1, -1]])
    tp = torch.tensor([[1.0, 1, 1, 1], [-1, -1, -1, 1], [-1, -1, -1, -1]])  # image 1's view 2 left
    s = torch.tensor([[0.5, 1.0, 2.0, -1.0], [1.0, -2.0, 0.3, 0.7], [-1.0, -0.5, 0.2, 1.5]])
    c = torch.tensor([0, 0, 1])
    masks = torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 1]])
    cents = torch.tensor([[0.9, 0.9, 0.9, 0.9], [-0.8, -0.8, -0.8, -0.8]])  # cluster 1 has the smaller norm
    return s, t, tp, c, masks, cents


def test_hand_made_flags_intended():
    s, t, tp, c, masks, cents = _hand_batch()
    out = brcd_logits(s, t, tp, c, masks, cents, alpha=0.8)
    assert out.assigned.tolist() == [0, 1, 1]
    assert out.offset_positives.tolist() == [False, True, False]
    assert out.alpha.tolist() == pytest.approx([0.8, 1.0, 0.8])
    assert out.column_labels.tolist() == [0, 0, 1, 0, 1, 1]
    expected = {0: {1}, 1: {0, 3}, 2: {4}, 3: {1}, 4: {0, 3}, 5: {4}}
    for a in range(6):
        assert set(torch.nonzero(out.false_negatives[a]).flatten().tolist()) == expected[a], a
        assert out.targets[a] == (a + 3) % 6
        assert out.logits[a, a] == float("-inf")
        for col in expected[a]:
            assert out.logits[a, col] == float("-inf")
    # rows use the mask of the image's cluster
    assert out.row_masks.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1]]
    loss, stats = brcd_loss(s, t, tp, c, masks, cents, alpha=0.8)
    assert float(stats["offset_fraction"]) == pytest.approx(1 / 3)
    assert float(stats["false_negatives_per_row"]) == pytest.approx(8 / 6)
    assert float(stats["kept_bit_fraction"]) == pytest.approx(7 / 12)


def test_hand_made_flags_released():
    s, t, tp, c, masks, cents = _hand_batch()
    out = brcd_logits(s, t, tp, c, masks, cents, released=True)
    # zero mask: every view is assigned to the smallest-norm centroid (cluster 1)
    assert out.assigned.tolist() == [1, 1, 1]
    assert out.offset_positives.tolist() == [True, True, False]
    assert out.row_masks.abs().sum() == 0
    # teacher-view columns all carry cluster 1 -> flagged for image 2's rows only
    assert out.column_labels.tolist() == [0, 0, 1, 1, 1, 1]
    expected = {0: {1}, 1: {0}, 2: {3, 4}, 3: {1}, 4: {0}, 5: {3, 4}}
    for a in range(6):
        assert set(torch.nonzero(out.false_negatives[a]).flatten().tolist()) == expected[a], a
        for col in expected[a]:
            assert out.logits[a, col] == pytest.approx(-1000.0)  # cos = 0 with zero rows, -1000 added


def test_offset_positives_ignored_without_individual_term():
    s, t, tp, c, masks, cents = _hand_batch()
    out = brcd_logits(s, t, tp, c, masks, cents, use_individual=False)
    assert out.left_cluster.tolist() == [False, True, False]
    assert not out.offset_positives.any()
    assert out.alpha.tolist() == [0.0, 0.0, 0.0]
    # the teacher-view column labels still come from the nearest centroid
    assert out.column_labels.tolist() == [0, 0, 1, 0, 1, 1]


def test_without_offset_switch_false_negatives_still_use_assignment():
    s, t, tp, c, masks, cents = _hand_batch()
    out = brcd_logits(s, t, tp, c, masks, cents, use_offset_positives=False)
    assert not out.offset_positives.any()
    assert out.column_labels.tolist() == [0, 0, 1, 0, 1, 1]
    rel = brcd_logits(s, t, tp, c, masks, cents, use_offset_positives=False, released=True)
    assert rel.column_labels.tolist() == [0, 0, 1, 0, 0, 1]  # public --false_neg branch: c_b


# --------------------------------------------------------------------------- released-mode bug signature


def test_released_loss_ignores_teacher_view_but_intended_does_not():
    s, t, _, c, masks, cents = _random_batch()
    g = torch.Generator().manual_seed(11)
    released, intended = [], []
    for _ in range(3):
        tp = torch.randint(0, 2, t.shape, generator=g).double() * 2 - 1
        released.append(float(brcd_loss(s, t, tp, c, masks, cents, released=True)[0]))
        intended.append(float(brcd_loss(s, t, tp, c, masks, cents)[0]))
        out = brcd_logits(s, t, tp, c, masks, cents, released=True)
        assert (out.assigned == torch.argmin((cents**2).sum(1))).all()
    assert max(released) - min(released) < 1e-12
    assert max(intended) - min(intended) > 1e-3


# --------------------------------------------------------------------------- gradients, NaN safety


def test_gradient_flows_to_student_only():
    s, t, tp, c, masks, cents = _random_batch()
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    tp = tp.clone().requires_grad_(True)
    masks = masks.clone().requires_grad_(True)
    cents = cents.clone().requires_grad_(True)
    loss, stats = brcd_loss(s, t, tp, c, masks, cents)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    for x in (t, tp, masks, cents):
        assert x.grad is None
    assert all(not v.requires_grad for v in stats.values())


def test_straight_through_codes_backprop_to_logits():
    s, t, tp, c, masks, cents = (x.float() if x.is_floating_point() else x for x in _random_batch())
    h = torch.randn(s.shape, requires_grad=True)
    codes = sign_ste(torch.sigmoid(h) - 0.5)
    loss, _ = brcd_loss(codes, t, tp, c, masks, cents)
    loss.backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def test_fully_masked_and_all_false_negatives_no_nan():
    s, t, tp, _, masks, cents = _random_batch()
    s = s.clone().requires_grad_(True)
    zero = torch.zeros_like(masks)
    c = torch.zeros(len(s), dtype=torch.long)
    same_cents = torch.zeros_like(cents)
    same_cents[1:] = 5.0  # every view assigned to cluster 0 == every pseudo-label
    loss, stats = brcd_loss(s, t, tp, c, zero, same_cents)
    loss.backward()
    # every negative removed: each row's softmax holds only its positive
    assert (loss).item() == pytest.approx(0.0, abs=1e-12)
    assert float(stats["false_negatives_per_row"]) == 2 * len(s) - 2
    assert torch.isfinite(s.grad).all()
    # fully masked rows alone (no false negatives) are finite too, and the structural cosine is 0
    s.grad = None
    loss, stats = brcd_loss(s, t, tp, c, zero, cents, use_false_negatives=False)
    loss.backward()
    assert math.isfinite((loss).item()) and torch.isfinite(s.grad).all()
    assert float(stats["positive_structural"]) == 0.0


# --------------------------------------------------------------------------- validation and wrappers


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(alpha=1.5), "alpha"),
        (dict(use_structural=False, use_individual=False), "cannot both be False"),
    ],
)
def test_brcd_rejects_bad_options(kwargs, match):
    s, t, tp, c, masks, cents = _random_batch()
    with pytest.raises(ValueError, match=match):
        brcd_loss(s, t, tp, c, masks, cents, **kwargs)
    with pytest.raises(ValueError, match=match):
        BRCDLoss(masks, cents, **kwargs)


def test_brcd_rejects_bad_inputs():
    s, t, tp, c, masks, cents = _random_batch()
    with pytest.raises(ValueError, match="pseudo_labels"):
        brcd_loss(s, t, tp, c + 10, masks, cents)
    with pytest.raises(ValueError, match="integer"):
        brcd_loss(s, t, tp, c.double(), masks, cents)
    with pytest.raises(ValueError, match="same shape"):
        brcd_loss(s, t[:, :4], tp, c, masks, cents)
    with pytest.raises(ValueError, match="bits"):
        brcd_loss(s, t, tp, c, masks[:, :4], cents)
    with pytest.raises(ValueError, match="masks"):
        BRCDLoss(masks * 2, cents)
    with pytest.raises(ValueError, match="centroids"):
        BRCDLoss(masks, cents[:2])


def test_brcd_module_matches_function_and_holds_buffers():
    s, t, tp, c, masks, cents = _random_batch()
    module = BRCDLoss.from_artifact({"masks": masks.numpy(), "centroids": cents.numpy()}, alpha=0.5)
    assert set(module.state_dict()) == {"masks", "centroids"}
    assert module.masks.dtype == torch.float32
    got, _ = module(s.float(), t.float(), tp.float(), c)
    want, _ = brcd_loss(s.float(), t.float(), tp.float(), c, masks.float(), cents.float(), alpha=0.5)
    assert (got).item() == pytest.approx((want).item(), rel=1e-6)
    same = BRCDLoss.from_arrays(np.asarray(masks), np.asarray(cents), alpha=0.5)
    assert torch.equal(same.masks, module.masks)
    with pytest.raises(ValueError, match="centroids"):
        BRCDLoss.from_artifact({"masks": masks})


def test_distillation_objective_is_sum_of_parts():
    s, t, tp, c, masks, cents = _random_batch()
    g = torch.Generator().manual_seed(5)
    h1 = torch.randn(s.shape, generator=g, dtype=torch.float64, requires_grad=True)
    h2 = torch.randn(s.shape, generator=g, dtype=torch.float64, requires_grad=True)
    b1, b2 = sign_ste(torch.sigmoid(h1) - 0.5), sign_ste(torch.sigmoid(h2) - 0.5)
    loss, terms = distillation_objective(
        h1, h2, b1, b2, t, tp, c, masks, cents, temperature=0.4, kl_weight=0.01, brcd_weight=0.5, alpha=0.7
    )
    own, _ = teacher_objective(h1, h2, b1, b2, 0.4, 0.01)
    distill, _ = brcd_loss(b1, t, tp, c, masks, cents, temperature=0.4, alpha=0.7)
    assert (loss).item() == pytest.approx((own + 0.5 * distill).item(), rel=1e-12)
    for key in ("contrastive", "kl", "student_objective", "brcd", "total", "brcd/offset_fraction"):
        assert key in terms and not terms[key].requires_grad
    module = DistillationLoss(masks, cents, temperature=0.4, kl_weight=0.01, brcd_weight=0.5, alpha=0.7)
    got, _ = module(h1, h2, b1, b2, t, tp, c)
    assert (got).item() == pytest.approx((loss).item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(h1.grad).all() and torch.isfinite(h2.grad).all()
    with pytest.raises(ValueError, match="brcd_weight"):
        DistillationLoss(masks, cents, brcd_weight=-1)


# --------------------------------------------------------------------------- NT-Xent, KL, CIBHash objective


@pytest.mark.parametrize("tau", [0.1, 0.3, 1.0])
def test_nt_xent_matches_loop(tau):
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(5, 7, generator=g, dtype=torch.float64)
    z2 = torch.randn(5, 7, generator=g, dtype=torch.float64)
    assert float(nt_xent(z1, z2, tau)) == pytest.approx(ref_nt_xent(z1, z2, tau), rel=1e-10)
    assert float(NTXentLoss(tau)(z1, z2)) == pytest.approx(ref_nt_xent(z1, z2, tau), rel=1e-10)


def test_nt_xent_zero_rows_and_validation():
    z1 = torch.zeros(3, 4, requires_grad=True)
    z2 = torch.randn(3, 4)
    loss = nt_xent(z1, z2, 0.3)
    loss.backward()
    assert math.isfinite((loss).item()) and torch.isfinite(z1.grad).all()
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(0)
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(z1, z2[:2], 0.3)


def test_symmetric_kl_matches_loop_and_stops_gradient():
    g = torch.Generator().manual_seed(2)
    p1 = torch.rand(4, 6, generator=g, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_(True)
    p2 = torch.rand(4, 6, generator=g, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_(True)
    loss = symmetric_bernoulli_kl(p1, p2)
    assert (loss).item() == pytest.approx(ref_sym_kl(p1, p2), rel=1e-10)
    assert SymmetricBernoulliKL()(p1, p2).item() == pytest.approx((loss).item())
    loss.backward()
    eps, b = 1e-7, p1.shape[0]
    # only ½·KL(p1 ‖ sg p2) reaches p1:  d/dp1 = ½ · [log(p1+ε) − log(p2+ε) − log(1−p1+ε) + log(1−p2+ε)
    #                                              + p1/(p1+ε) − (1−p1)/(1−p1+ε)] / B
    with torch.no_grad():
        x, y = p1, p2
        want = 0.5 * (
            torch.log(x + eps) - torch.log(y + eps) - torch.log(1 - x + eps) + torch.log(1 - y + eps)
            + x / (x + eps) - (1 - x) / (1 - x + eps)
        ) / b
    assert torch.allclose(p1.grad, want, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="eps"):
        SymmetricBernoulliKL(eps=0)


def test_teacher_objective_matches_parts():
    g = torch.Generator().manual_seed(4)
    h1 = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    h2 = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b1, b2 = sign_ste(torch.sigmoid(h1) - 0.5), sign_ste(torch.sigmoid(h2) - 0.5)
    loss, terms = teacher_objective(h1, h2, b1, b2, 0.3, 0.001)
    want = ref_nt_xent(b1, b2, 0.3) + 0.001 * ref_sym_kl(torch.sigmoid(h1), torch.sigmoid(h2))
    assert (loss).item() == pytest.approx(want, rel=1e-10)
    assert float(terms["total"]) == pytest.approx(want, rel=1e-10)
    assert float(terms["contrastive"]) == pytest.approx(ref_nt_xent(b1, b2, 0.3), rel=1e-10)
    got, _ = TeacherLoss(0.3, 0.001)(h1, h2, b1, b2)
    assert (got).item() == pytest.approx(want, rel=1e-10)
    loss.backward()
    assert torch.isfinite(h1.grad).all() and h1.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="kl_weight"):
        TeacherLoss(kl_weight=-0.1)
