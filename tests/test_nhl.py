"""NHL: nested codes, dominance-aware adaptive weights, cascade self-distillation (brcd.losses.nhl)."""

import math

import pytest
import torch
import torch.nn.functional as F

from brcd.config import ModelConfig
from brcd.losses.nhl import (
    NestedHashLoss,
    cascade_distillation,
    dominance_analysis,
    dominance_aware_weights,
    length_gradients,
    nested_objective,
    nested_prefixes,
    per_length,
    prefix_args,
    shared_gradient_products,
)
from brcd.losses.teacher import teacher_objective
from brcd.models.nets import HashHead, HashingModel, create_hashing_model

BITS = [8, 16, 32]


@pytest.fixture(scope="module")
def nested_model() -> HashingModel:
    torch.manual_seed(0)
    return create_hashing_model(ModelConfig(backbone="test_resnet", bits=BITS, head="linear", channels_last=False))


# --------------------------------------------------------------------------------------------
# nested codes
# --------------------------------------------------------------------------------------------


def test_nested_codes_are_prefixes_of_the_longest_code(nested_model):
    m = nested_model
    assert m.bits == BITS and tuple(m.head.last_linear.weight.shape) == (32, m.head.last_linear.in_features)
    x = torch.randn(6, 3, 32, 32)
    longest = m.encode(x, bits=32)
    for L in BITS:
        assert torch.equal(m.encode(x, bits=L), longest[:, :L])
    m.train()
    out = m(x)
    feats = m.features(x)
    w, b = m.head.last_linear.weight, m.head.last_linear.bias
    for L, u, c in zip(BITS, nested_prefixes(out.logits, BITS), nested_prefixes(out.codes, BITS)):
        assert u.shape == (6, L)
        torch.testing.assert_close(u, F.linear(feats, w[:L], b[:L]))  # the L-bit code uses only W[:L]
        assert torch.equal(c, out.prefix(L).codes)
        assert torch.equal(torch.where(u >= 0, 1, -1).to(torch.int8), longest[:, :L])


def test_nested_prefixes_validates_lengths():
    u = torch.randn(2, 16)
    with pytest.raises(ValueError, match="strictly increasing"):
        nested_prefixes(u, [16, 8])
    with pytest.raises(ValueError, match="exceeds"):
        nested_prefixes(u, [8, 32])
    with pytest.raises(ValueError, match="positive"):
        nested_prefixes(u, [0, 8])


def test_per_length_with_prefix_args_matches_direct_calls():
    h1, h2 = torch.randn(5, 16), torch.randn(5, 16)
    b1, b2 = torch.sign(h1), torch.sign(h2)
    losses, terms = per_length(teacher_objective, prefix_args([4, 16], h1, h2, b1, b2), temperature=0.5)
    for L, loss, t in zip([4, 16], losses, terms):
        ref, _ = teacher_objective(h1[:, :L], h2[:, :L], b1[:, :L], b2[:, :L], temperature=0.5)
        torch.testing.assert_close(loss, ref)
        assert "contrastive" in t
    bare, extra = per_length(lambda x, scale: x.sum() * scale, [h1[:, :4], h1], scale=2.0)
    torch.testing.assert_close(bare[1], h1.sum() * 2)
    assert extra == [{}, {}]


# --------------------------------------------------------------------------------------------
# dominance-aware adaptive weights on hand-made conflicts
# --------------------------------------------------------------------------------------------


def _linear_losses(grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.nn.Parameter]:
    """loss_k = <A_k, W>: the gradient of loss_k w.r.t. W is exactly A_k."""
    w = torch.nn.Parameter(torch.randn(grads[0].shape, dtype=torch.float64))
    return [(a * w).sum() for a in grads], w


def _renorm(w: list[float]) -> list[float]:
    return [len(w) * x / sum(w) for x in w]


def _k2_grads(a2_top: list[float], junk: bool = True) -> list[torch.Tensor]:
    """bits [2, 4], d = 3. g_1 = [[1,0,0],[0,0,0], junk]; g_2 = [a2_top, [0,0,0], junk]."""
    a1 = torch.zeros(4, 3, dtype=torch.float64)
    a2 = torch.zeros(4, 3, dtype=torch.float64)
    a1[0, 0] = 1.0
    a2[0] = torch.tensor(a2_top, dtype=torch.float64)
    if junk:  # rows outside the shared block W[:2] must be ignored for the pair (1, 2)
        a1[2:] = -1.0
        a2[2:] = 5.0
    return [a1, a2]


@pytest.mark.parametrize(
    "a2_top, beta, expected",
    [
        # n_1² = 1, budget β n_1²/(K−1) = β. d = −2 > budget 1: α = 1/2, w = [1, 1/2] -> [4/3, 2/3]
        ([-2.0, 0.0, 0.0], 1.0, _renorm([1.0, 0.5])),
        # no conflict (d = 2 > 0): all ones
        ([2.0, 1.0, 0.0], 1.0, [1.0, 1.0]),
        # orthogonal (d = 0): all ones
        ([0.0, 3.0, 0.0], 1.0, [1.0, 1.0]),
        # mild conflict within the budget (−d = 0.5 < 1): all ones
        ([-0.5, 4.0, 0.0], 1.0, [1.0, 1.0]),
        # −d equal to the budget is not "greater": all ones
        ([-1.0, 0.0, 0.0], 1.0, [1.0, 1.0]),
        # larger β tolerates the same conflict; smaller β scales harder: α = 0.5 / 2 = 1/4
        ([-2.0, 0.0, 0.0], 4.0, [1.0, 1.0]),
        ([-2.0, 0.0, 0.0], 0.5, _renorm([1.0, 0.25])),
    ],
)
def test_adaptive_weights_two_lengths(a2_top, beta, expected):
    losses, w = _linear_losses(_k2_grads(a2_top))
    weights = dominance_aware_weights(losses, w, [2, 4], beta=beta)
    assert weights.shape == (2,) and weights.dtype == torch.float32 and not weights.requires_grad
    torch.testing.assert_close(weights.double(), torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(weights.sum().item(), 2.0)


def test_adaptive_weights_restrict_both_gradients_to_the_shared_rows():
    # Over all rows <g_1, g_2> = -2 - 30 = -32 (alpha would be 1/32); on W[:2] it is -2 (alpha 1/2).
    losses, w = _linear_losses(_k2_grads([-2.0, 0.0, 0.0], junk=True))
    a = dominance_analysis(losses, w, [2, 4])
    assert a.products[0, 1].item() == pytest.approx(-2.0)
    assert a.products[0, 0].item() == pytest.approx(1.0)  # n_1² on W[:2] only
    assert a.alphas[0, 1].item() == pytest.approx(0.5)


def _k3_grads(a3_row0: list[float]) -> list[torch.Tensor]:
    """bits [1, 2, 3], d = 2, K − 1 = 2.

    g_1 = [(1, 0), 0, 0]           n_1² = 1, budget_1 = 1/2
    g_2 = [(−1, 0), (0, 2), 0]     d_12 = −1 -> α_12 = 0.5 / 1 = 1/2;  n_2² = 5, budget_2 = 5/2
    g_3 = [a3_row0, (0, −20), (7, 7)]
    """
    g1 = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    g2 = torch.tensor([[-1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    g3 = torch.tensor([a3_row0, [0.0, -20.0], [7.0, 7.0]], dtype=torch.float64)
    return [g1, g2, g3]


def test_adaptive_weights_three_lengths_monotone_clamp_binds():
    # d_13 = −0.25: within budget_1 (0.25 < 0.5) so the raw α_13 = 1, clamped to α_12 = 1/2.
    # d_23 = (−1)(−0.25) + 2·(−20) = −39.75 > budget_2 -> α_23 = 2.5 / 39.75.
    losses, w = _linear_losses(_k3_grads([-0.25, 0.0]))
    a = dominance_analysis(losses, w, [1, 2, 3])
    a23 = 2.5 / 39.75
    expected_alphas = torch.tensor([[1.0, 0.5, 0.5], [1.0, 1.0, a23], [1.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(a.alphas, expected_alphas)
    assert a.conflicts.tolist() == [[False, True, False], [False, False, True], [False, False, False]]
    expected = _renorm([1.0, 0.5, 0.5 * a23])
    torch.testing.assert_close(a.weights.double(), torch.tensor(expected, dtype=torch.float64))
    unclamped = _renorm([1.0, 0.5, 1.0 * a23])
    assert not math.isclose(a.weights[2].item(), unclamped[2], rel_tol=1e-3)  # the clamp matters here


def test_adaptive_weights_three_lengths_clamp_not_binding():
    # d_13 = −3 -> α_13 = 0.5 / 3 = 1/6 < α_12; d_23 = 3 − 40 = −37 -> α_23 = 2.5 / 37.
    losses, w = _linear_losses(_k3_grads([-3.0, 0.0]))
    weights = dominance_aware_weights(losses, w, [1, 2, 3])
    expected = _renorm([1.0, 0.5, (1 / 6) * (2.5 / 37)])
    torch.testing.assert_close(weights.double(), torch.tensor(expected, dtype=torch.float64))


def test_adaptive_weights_three_lengths_no_conflict_all_ones():
    g = [torch.zeros(3, 2, dtype=torch.float64) for _ in range(3)]
    g[0][0] = torch.tensor([1.0, 1.0])
    g[1][:2] = torch.tensor([[1.0, 0.0], [0.0, -3.0]])
    g[2][:] = torch.tensor([[0.0, 2.0], [1.0, 1.0], [-9.0, -9.0]])  # d_23 = −3 + 0 < 0 but −d_23 = 3 < budget_2 = 5
    losses, w = _linear_losses(g)
    torch.testing.assert_close(dominance_aware_weights(losses, w, [1, 2, 3]), torch.ones(3))


def test_adaptive_weights_single_length_and_scale_invariant_reducer():
    w = torch.nn.Parameter(torch.randn(4, 3))
    assert dominance_aware_weights([(w * 2).sum()], w, [4]).tolist() == [1.0]
    losses, wk = _linear_losses(_k3_grads([-0.25, 0.0]))
    calls = []

    def reducer(g):  # stands in for an all-reduce over DDP workers: a common scale changes nothing
        calls.append(tuple(g.shape))
        return g * 3.0

    plain = dominance_aware_weights(losses, wk, [1, 2, 3])
    reduced = dominance_aware_weights(losses, wk, [1, 2, 3], grad_reducer=reducer)
    assert calls == [(3, 3, 2)]
    torch.testing.assert_close(plain, reduced)


@pytest.mark.parametrize("width, kind", [(24, "linear"), (768, "linear"), (13, "mlp")])
def test_adaptive_weights_any_feature_width(width, kind):
    """N4: the shared block is rows of W whatever the width d (no hard-coded 2048)."""
    bits = [4, 8, 16]
    head = HashHead(width, bits, kind=kind, hidden_dim=11)
    weight = head.last_linear.weight
    f1, f2 = torch.randn(10, width), torch.randn(10, width)
    h1, h2 = head(f1), head(f2)
    losses, _ = per_length(teacher_objective, prefix_args(bits, h1, h2, torch.tanh(h1), torch.tanh(h2)))
    grads = length_gradients(losses, weight)
    d = weight.shape[1]
    assert grads.shape == (3, 16, d)
    products = shared_gradient_products(grads, bits)
    # reference: flatten row-major and slice the first L_min * d entries (the public recipe, with the real d)
    flat = grads.double().reshape(3, -1)
    for i in range(3):
        for j in range(3):
            n = bits[min(i, j)] * d
            assert products[i, j].item() == pytest.approx(float(flat[i, :n] @ flat[j, :n]), rel=1e-9, abs=1e-12)
    weights = dominance_aware_weights(losses, weight, bits)
    assert weights.shape == (3,) and torch.isfinite(weights).all()
    assert weights.sum().item() == pytest.approx(3.0, rel=1e-6)
    assert weight.grad is None  # autograd.grad does not accumulate into .grad


def test_adaptive_weights_input_errors():
    w = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="one loss per code length"):
        dominance_aware_weights([w.sum()], w, [2, 4])
    with pytest.raises(ValueError, match="rows"):
        dominance_aware_weights([w.sum(), w.sum()], w, [2, 8])
    frozen = torch.randn(4, 3)
    with pytest.raises(ValueError, match="require grad"):
        dominance_aware_weights([frozen.sum(), frozen.sum()], frozen, [2, 4])


# --------------------------------------------------------------------------------------------
# cascade self-distillation
# --------------------------------------------------------------------------------------------


def _loop_sp(short: torch.Tensor, long: torch.Tensor) -> float:
    """|| rownorm(U_l U_lᵀ) − rownorm(U_s U_sᵀ) ||_F² / B² with explicit loops."""
    s, t = short.tolist(), long.tolist()
    b = len(s)

    def gram_rownorm(u):
        g = [[sum(u[i][c] * u[j][c] for c in range(len(u[i]))) for j in range(b)] for i in range(b)]
        out = []
        for row in g:
            norm = math.sqrt(sum(v * v for v in row))
            out.append([v / max(norm, 1e-8) for v in row])
        return out

    gs, gt = gram_rownorm(s), gram_rownorm(t)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)


def test_cascade_matches_loop_reference():
    u = torch.randn(6, 12, dtype=torch.float64)
    outs = nested_prefixes(u, [3, 6, 12])
    total, pairs = cascade_distillation(outs)
    expected = [_loop_sp(outs[0], outs[1]), _loop_sp(outs[1], outs[2])]
    assert len(pairs) == 2
    for got, ref in zip(pairs, expected):
        assert got.item() == pytest.approx(ref, rel=1e-10)
    assert total.item() == pytest.approx(sum(expected), rel=1e-10)
    # not nested (independent outputs) works the same way; a single length gives 0 and no pairs
    a, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    assert cascade_distillation([a, b])[0].item() == pytest.approx(_loop_sp(a, b), rel=1e-10)
    zero, none = cascade_distillation([a])
    assert zero.item() == 0.0 and none == []


def test_cascade_gradient_never_reaches_the_longer_code():
    short = torch.randn(5, 4, requires_grad=True)
    long = torch.randn(5, 8, requires_grad=True)
    total, _ = cascade_distillation([short, long])
    total.backward()
    assert long.grad is None
    assert short.grad is not None and short.grad.abs().sum() > 0
    # nested prefixes of one output: the longest code's own columns get no gradient from the cascade
    u = torch.randn(5, 32, requires_grad=True)
    cascade_distillation(nested_prefixes(u, BITS))[0].backward()
    assert torch.all(u.grad[:, 16:] == 0)
    assert u.grad[:, :8].abs().sum() > 0 and u.grad[:, 8:16].abs().sum() > 0


def test_cascade_input_errors():
    with pytest.raises(ValueError, match="batch size"):
        cascade_distillation([torch.randn(3, 2), torch.randn(4, 4)])
    with pytest.raises(ValueError, match="at least one"):
        cascade_distillation([])


# --------------------------------------------------------------------------------------------
# nested objective
# --------------------------------------------------------------------------------------------


def test_nested_objective_without_switches_is_the_plain_sum_of_all_lengths():
    leaves = [torch.tensor(float(i + 1), requires_grad=True) for i in range(3)]
    losses = [x * 2 for x in leaves]
    loss, terms = nested_objective(losses, bits=BITS, adaptive=False, cascade=False)
    assert loss.item() == pytest.approx(2 + 4 + 6)
    loss.backward()
    assert [x.grad.item() for x in leaves] == [2.0, 2.0, 2.0]  # the last length counts (N3)
    assert terms["base/32"].item() == pytest.approx(6.0) and terms["weight/32"].item() == 1.0
    assert "distill/8" not in terms and terms["distill"].item() == 0.0


def _head_step(head: HashHead, bits: list[int], **kw):
    f1, f2 = torch.randn(12, head.last_linear.in_features), torch.randn(12, head.last_linear.in_features)
    h1, h2 = head(f1), head(f2)
    losses, _ = per_length(teacher_objective, prefix_args(bits, h1, h2, torch.tanh(h1), torch.tanh(h2)))
    real = torch.cat([h1, h2])
    return losses, real


def test_nested_objective_includes_last_length_with_adaptive_weights_and_cascade():
    """N3: the longest length's loss is part of the total, so the rows only it uses get a gradient."""
    bits = [2, 4, 8]
    head = HashHead(7, bits, kind="linear")
    losses, real = _head_step(head, bits)
    loss, terms = nested_objective(
        losses, real, shared_weight=head.last_linear.weight, bits=bits, cascade_weight=0.5
    )
    # recompute by hand: D_k from the cascade, w from the per-length totals
    _, pairs = cascade_distillation(nested_prefixes(real, bits))
    per_total = [losses[0] + 0.5 * pairs[0], losses[1] + 0.5 * pairs[1], losses[2]]
    w = dominance_aware_weights(per_total, head.last_linear.weight, bits)
    torch.testing.assert_close(loss, sum(w[k] * per_total[k] for k in range(3)))
    for k, L in enumerate(bits):
        assert terms[f"weight/{L}"].item() == pytest.approx(w[k].item())
        assert terms[f"base/{L}"].item() == pytest.approx(losses[k].item())
    assert set(k for k in terms if k.startswith("distill/")) == {"distill/2", "distill/4"}
    loss.backward()
    grad = head.last_linear.weight.grad
    assert grad[4:8].abs().sum() > 0  # rows 4..7 serve only the 8-bit code: its loss is in the sum
    assert torch.isfinite(grad).all()


def test_nested_objective_on_hashing_model_and_module_wrapper(nested_model):
    m = nested_model
    m.train()
    m.zero_grad(set_to_none=True)
    x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    o1, o2 = m(x1), m(x2)
    losses, _ = per_length(teacher_objective, prefix_args(BITS, o1.logits, o2.logits, o1.codes, o2.codes))
    crit = NestedHashLoss(BITS, cascade_weight=1.0)
    loss, terms = crit(losses, torch.cat([o1.logits, o2.logits]), m.head.last_linear.weight)
    assert torch.isfinite(loss) and terms["total"].item() == pytest.approx(loss.item())
    assert sum(terms[f"weight/{L}"].item() for L in BITS) == pytest.approx(3.0, rel=1e-6)
    loss.backward()
    assert m.head.last_linear.weight.grad is not None and torch.isfinite(m.head.last_linear.weight.grad).all()
    assert "bits=[8, 16, 32]" in repr(crit)


def test_nested_objective_argument_errors():
    losses = [torch.tensor(1.0), torch.tensor(2.0)]
    with pytest.raises(ValueError, match="real_outputs"):
        nested_objective(losses, bits=[4, 8], adaptive=False)
    with pytest.raises(ValueError, match="shared_weight"):
        nested_objective(losses, bits=[4, 8], cascade=False)
    with pytest.raises(ValueError, match="one loss per code length"):
        nested_objective(losses, bits=[4, 8, 16], adaptive=False, cascade=False)
    with pytest.raises(ValueError, match="widths"):
        nested_objective(losses, [torch.randn(3, 8), torch.randn(3, 4)], bits=[4, 8], adaptive=False)
    with pytest.raises(ValueError, match="cascade_weight"):
        nested_objective(losses, bits=[4, 8], adaptive=False, cascade=False, cascade_weight=-1.0)
