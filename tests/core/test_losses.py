"""The loss registry against the test vectors of docs/losses.md (values, gradients, dtypes, the tie)."""

from __future__ import annotations

import math

import pytest
import torch

from core.losses import LOSSES, REFERENCE_FREE, MetricSums, WeightedLoss, pair_metrics

# (pc, pr, rc, rr, beta)
A = (-10.0, -14.0, -11.0, -12.0, 0.1)
B = (-10.0, -11.0, -10.5, -12.0, 0.1)
C = (-20.0, -30.0, -15.0, -18.0, 0.5)
D = (-5.0, -7.0, -5.0, -7.0, 0.1)

# case, method, loss, dL/dpc, dL/dpr
VECTORS = [
    (A, "sigmoid", 0.5543552445, -0.0425557483, 0.0425557483),
    (A, "minor_dpo", 0.6443966601, -0.0475020813, 0.0),
    (B, "sigmoid", 0.7184596480, -0.0512497396, 0.0512497396),
    (B, "minor_dpo", 0.7184596480, -0.0512497396, 0.0512497396),
    (C, "sigmoid", 0.0297504183, -0.0146561154, 0.0146561154),
    (C, "minor_dpo", 2.5788897343, -0.4620709100, 0.0),
    (D, "sigmoid", 0.6931471806, -0.05, 0.05),
    (D, "minor_dpo", 0.6931471806, -0.05, 0.05),
]


def _run(case, method, dtype, **extra):
    pc, pr, rc, rr, beta = case
    pc_t = torch.tensor([pc], dtype=dtype, requires_grad=True)
    pr_t = torch.tensor([pr], dtype=dtype, requires_grad=True)
    loss = LOSSES[method](
        pc_t, pr_t, torch.tensor([rc], dtype=dtype), torch.tensor([rr], dtype=dtype), beta=beta, **extra
    )
    loss.sum().backward()
    return loss.item(), pc_t.grad.item(), pr_t.grad.item()


@pytest.mark.parametrize(("case", "method", "loss", "gpc", "gpr"), VECTORS)
def test_vectors_float64(case, method, loss, gpc, gpr):
    got = _run(case, method, torch.float64)
    assert got[0] == pytest.approx(loss, abs=1e-9)
    assert got[1] == pytest.approx(gpc, abs=1e-9)
    assert got[2] == pytest.approx(gpr, abs=1e-9)


@pytest.mark.parametrize(("case", "method", "loss", "gpc", "gpr"), VECTORS)
def test_vectors_float32(case, method, loss, gpc, gpr):
    got = _run(case, method, torch.float32)
    assert got[0] == pytest.approx(loss, abs=1e-6)
    assert got[1] == pytest.approx(gpc, abs=1e-7)
    assert got[2] == pytest.approx(gpr, abs=1e-7)


def test_minor_dpo_tie_passes_gradient_to_rejected():
    """Tie r_l = 0: clamp(min=0) lets +β/2 through (vector D), the pinned convention."""
    _, _, gpr = _run(D, "minor_dpo", torch.float64)
    assert gpr == pytest.approx(0.05, abs=1e-12)
    # just below the tie the gate is off and the rejected answer gets nothing
    below = (D[0], D[1] - 1e-6, D[2], D[3], D[4])
    assert _run(below, "minor_dpo", torch.float64)[2] == 0.0


def test_minor_dpo_clamp_changes_value_not_just_gradient():
    """With r_l < 0 MinorDPO equals -logσ(β r_w), which is larger than DPO's value."""
    pc, pr, rc, rr, beta = A
    minor = _run(A, "minor_dpo", torch.float64)[0]
    assert minor == pytest.approx(-math.log(1 / (1 + math.exp(-beta * (pc - rc)))), abs=1e-12)
    assert minor > _run(A, "sigmoid", torch.float64)[0]


def test_batch_mean_reduction():
    cases = [A, B]
    for method, expected in (("sigmoid", 0.6364074462), ("minor_dpo", 0.6814281540)):
        pc, pr, rc, rr = (torch.tensor([c[i] for c in cases], dtype=torch.float64) for i in range(4))
        assert LOSSES[method](pc, pr, rc, rr, beta=0.1).mean().item() == pytest.approx(expected, abs=1e-9)


FAMILY_A = [
    ("cdpo", {"label_smoothing": 0.1}, 0.5843552445),
    ("hinge", {}, 0.7),
    ("ipo", {}, 23.04),
    ("exo_pair", {"label_smoothing": 1e-3}, 2.2581991915),
    ("nca_pair", {}, 1.3156644248),
    ("robust", {"label_smoothing": 0.1}, 0.5168552445),
    ("bco_pair", {}, 1.2425355295),
    ("sppo_hard", {}, 25.0),
    ("apo_zero", {}, 0.9251868152),
    ("apo_down", {}, 0.9505366707),
    ("discopop", {"discopop_tau": 0.05}, 0.7403571680),
    ("sigmoid_norm", {}, 0.6831971797),
]


@pytest.mark.parametrize(("method", "extra", "expected"), FAMILY_A)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_family_values_on_vector_a(method, extra, expected, dtype):
    lengths = {
        "chosen_lengths": torch.tensor([10.0], dtype=dtype),
        "rejected_lengths": torch.tensor([20.0], dtype=dtype),
    }
    got = _run(A, method, dtype, **extra, **lengths)[0]
    tol = 1e-9 if dtype == torch.float64 else 1e-6 * max(1.0, abs(expected))
    assert got == pytest.approx(expected, abs=tol)


def test_dpop_on_vector_c():
    assert _run(C, "dpop", torch.float64, dpop_lambda=5.0)[0] == pytest.approx(9.0001234022, abs=1e-9)


@pytest.mark.parametrize("method", sorted(LOSSES))
def test_gradients_match_finite_differences(method):
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-10.3, -13.7, -11.1, -12.9))
    lengths = {
        "chosen_lengths": torch.tensor([7.0], dtype=torch.float64),
        "rejected_lengths": torch.tensor([9.0], dtype=torch.float64),
    }
    fn = LOSSES[method]

    def f(a, b):
        return fn(a, b, rc, rr, beta=0.3, label_smoothing=0.1, **lengths).sum()

    assert torch.autograd.gradcheck(
        f, (pc.clone().requires_grad_(), pr.clone().requires_grad_()), eps=1e-6, atol=1e-8
    )


@pytest.mark.parametrize("method", ["ipo", "sigmoid_norm", "simpo", "sft"])
def test_length_losses_demand_lengths(method):
    t = torch.tensor([-1.0])
    with pytest.raises(TypeError, match="lengths"):
        LOSSES[method](t, t, t, t, beta=0.1)


def test_reference_free_losses_ignore_reference():
    pc, pr = torch.tensor([-8.0]), torch.tensor([-9.0])
    lengths = {"chosen_lengths": torch.tensor([4.0]), "rejected_lengths": torch.tensor([3.0])}
    for name in REFERENCE_FREE:
        a = LOSSES[name](pc, pr, torch.tensor([0.0]), torch.tensor([0.0]), beta=2.0, **lengths)
        b = LOSSES[name](pc, pr, torch.tensor([-50.0]), torch.tensor([3.0]), beta=2.0, **lengths)
        assert torch.equal(a, b)
    # simpo value: -logσ(β(c̄ - r̄) - γ) with c̄ = -2, r̄ = -3
    got = LOSSES["simpo"](pc, pr, pc, pr, beta=2.0, simpo_gamma=0.5, **lengths).item()
    assert got == pytest.approx(-math.log(1 / (1 + math.exp(-(2.0 * 1.0 - 0.5)))), abs=1e-6)


def test_weighted_combination_is_sum_of_terms():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -14.0, -11.0, -12.0))
    lc, lr = torch.tensor([10.0]), torch.tensor([20.0])
    combo = WeightedLoss(("minor_dpo", "sft"), (1.0, 0.5), 0.1, {})
    got = combo(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr).item()
    assert got == pytest.approx(0.6443966601 + 0.5 * 1.0, abs=1e-6)  # sft = -pc/lc = 1.0
    assert combo.needs_reference
    assert not WeightedLoss(("simpo", "sft"), (1.0, 1.0), 2.0, {}).needs_reference
    with pytest.raises(ValueError, match="unknown loss"):
        WeightedLoss(("nope",), (1.0,), 0.1, {})


def test_metrics_names_and_gate_fraction():
    pc, pr, rc, rr = (
        torch.tensor(v) for v in ([-10.0, -10.0], [-14.0, -11.0], [-11.0, -10.5], [-12.0, -12.0])
    )
    losses = LOSSES["minor_dpo"](pc, pr, rc, rr, beta=0.1)
    m = pair_metrics(
        losses,
        pc,
        pr,
        rc,
        rr,
        beta=0.1,
        chosen_logits_mean=torch.zeros(2),
        rejected_logits_mean=torch.ones(2),
    )
    # rewards/rejected stays unclamped (β r_l) so dashboards compare with DPO
    assert m["rewards/rejected"].tolist() == pytest.approx([-0.2, 0.1])
    assert m["minor_dpo/reject_gate_off_frac"].tolist() == [1.0, 0.0]
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0]  # B: r_w = 0.5 < r_l = 1.0
    sums = MetricSums()
    sums.add(m)
    means = sums.reduce()
    assert means["minor_dpo/reject_gate_off_frac"] == 0.5
    assert means["logits/rejected"] == 1.0
    # a fake two-rank all-reduce doubles sums and counts: means are unchanged
    assert sums.reduce(lambda t: t * 2) == pytest.approx(means)
    assert sums.count == 2
