"""Preference losses against direct float64 transcriptions of their papers' formulas."""

import math

import pytest
import torch

from safevid.losses import LOSS_TYPES, needs_reference, preference_loss, reward_metrics

BETA, GAMMA = 0.1, 0.5


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.log(1 / (1 + torch.exp(-x)))


def formula(kind: str, pc, pr, rc, rr, eps: float, len_c=None, len_r=None, beta=BETA):
    """Each loss written out as in its paper, in float64."""
    z = (pc - rc) - (pr - rr) if kind != "simpo" else None
    if kind in ("sigmoid", "cdpo"):
        return -(1 - eps) * log_sigmoid(beta * z) - eps * log_sigmoid(-beta * z)
    if kind == "robust":
        return (-(1 - eps) * log_sigmoid(beta * z) + eps * log_sigmoid(-beta * z)) / (1 - 2 * eps)
    if kind == "ipo":  # the mean form: per-token mean log-ratios
        return ((pc - rc) / len_c - (pr - rr) / len_r - 1 / (2 * beta)) ** 2
    if kind == "ipo_sum":
        return (z - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return torch.clamp(1 - beta * z, min=0)
    m = beta * pc / len_c - beta * pr / len_r - GAMMA
    return -(1 - eps) * log_sigmoid(m) - eps * log_sigmoid(-m)


def _pairs(b: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-50 * torch.rand(b, generator=gen, dtype=torch.float64) for _ in range(4))
    len_c = torch.randint(1, 60, (b,), generator=gen).double()
    len_r = torch.randint(1, 60, (b,), generator=gen).double()
    return pc, pr, rc, rr, len_c, len_r


SMOOTHING = [(kind, eps) for kind in LOSS_TYPES for eps in (0.0, 0.3)
             if eps == 0.0 or kind in ("sigmoid", "cdpo", "robust", "simpo")]


@pytest.mark.parametrize("kind,eps", SMOOTHING)
def test_loss_and_grads_match_formula(kind, eps):
    pc, pr, rc, rr, len_c, len_r = _pairs()
    pc.requires_grad_()
    pr.requires_grad_()
    losses, chosen_r, rejected_r = preference_loss(
        pc, pr, rc, rr, loss_type=kind, beta=BETA, label_smoothing=eps, simpo_gamma=GAMMA,
        chosen_lengths=len_c, rejected_lengths=len_r,
    )
    want = formula(kind, pc, pr, rc, rr, eps, len_c, len_r)
    torch.testing.assert_close(losses, want, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad(losses.sum(), (pc, pr))
    want_grads = torch.autograd.grad(want.sum(), (pc, pr))
    for got, expected in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    if kind == "simpo":
        want_c, want_r = BETA * pc / len_c, BETA * pr / len_r
    else:
        want_c, want_r = BETA * (pc - rc), BETA * (pr - rr)
    torch.testing.assert_close(chosen_r, want_c.detach())
    torch.testing.assert_close(rejected_r, want_r.detach())
    assert not chosen_r.requires_grad and not rejected_r.requires_grad


# At z = 0 smoothing mixes log 2 with itself, and robust's (1 - 2 eps) cancels.
EQUAL_VALUES = {
    "sigmoid": math.log(2), "cdpo": math.log(2), "robust": math.log(2),
    "ipo": (1 / (2 * BETA)) ** 2, "hinge": 1.0, "simpo": math.log1p(math.exp(GAMMA)),
}


@pytest.mark.parametrize("kind", LOSS_TYPES)
def test_equal_logps(kind):
    same = torch.full((3,), -12.5, dtype=torch.float64)
    lengths = torch.full((3,), 5.0, dtype=torch.float64)
    eps = 0.3 if kind in ("sigmoid", "cdpo", "robust") else 0.0
    losses, chosen_r, rejected_r = preference_loss(
        same, same, same, same, loss_type=kind, beta=BETA, label_smoothing=eps,
        simpo_gamma=GAMMA, chosen_lengths=lengths, rejected_lengths=lengths,
    )
    torch.testing.assert_close(losses, torch.full_like(same, EQUAL_VALUES[kind]))
    torch.testing.assert_close(chosen_r, rejected_r)
    assert reward_metrics(chosen_r, rejected_r)["rewards/accuracy"].sum() == 0


@pytest.mark.parametrize("kind", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_margins_stay_finite(kind, dtype):
    # Summed log-probs of long answers differ by thousands; log(sigmoid(x)) would give -inf.
    pc = torch.tensor([-1.0, -9000.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-9000.0, -1.0], dtype=dtype, requires_grad=True)
    ref = torch.tensor([-500.0, -500.0], dtype=dtype)
    lengths = torch.tensor([1.0, 1.0], dtype=dtype)
    losses, _, _ = preference_loss(
        pc, pr, ref, ref, loss_type=kind, beta=0.5, chosen_lengths=lengths,
        rejected_lengths=lengths, nll_weight=0.1,
    )
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()
    assert torch.isfinite(pr.grad).all()
    if kind in ("sigmoid", "cdpo", "robust", "simpo"):
        # Right way round: only the nll term is left. Wrong way round: linear, ~ beta |z|.
        assert losses[0].item() == pytest.approx(0.1 * 1.0, abs=1e-6)
        assert losses[1].item() == pytest.approx(0.5 * 8999 + (-0.5 if kind == "simpo" else 0)
                                                 + 0.1 * 9000, rel=1e-3)


def test_nll_term_is_added_per_pair():
    pc, pr, rc, rr, len_c, len_r = _pairs()
    for kind in ("sigmoid", "simpo"):
        base, _, _ = preference_loss(pc, pr, rc, rr, loss_type=kind, chosen_lengths=len_c,
                                     rejected_lengths=len_r)
        with_nll, _, _ = preference_loss(pc, pr, rc, rr, loss_type=kind, chosen_lengths=len_c,
                                         rejected_lengths=len_r, nll_weight=0.7)
        torch.testing.assert_close(with_nll - base, 0.7 * (-pc / len_c))
    with pytest.raises(ValueError, match="chosen_lengths is required"):
        preference_loss(pc, pr, rc, rr, nll_weight=0.7)


def test_simpo_is_reference_free_and_needs_lengths():
    pc, pr, _, _, len_c, len_r = _pairs()
    losses, _, _ = preference_loss(pc, pr, None, None, loss_type="simpo", beta=2.0,
                                   chosen_lengths=len_c, rejected_lengths=len_r)
    want = formula("simpo", pc, pr, None, None, 0.0, len_c, len_r, beta=2.0)
    torch.testing.assert_close(losses, want)
    # Lengths as plain numbers work too (a batch of equal-length answers).
    losses, _, _ = preference_loss(pc, pr, None, None, loss_type="simpo", chosen_lengths=4,
                                   rejected_lengths=4)
    torch.testing.assert_close(losses, formula("simpo", pc, pr, None, None, 0.0, 4, 4))
    with pytest.raises(ValueError, match="rejected_lengths is required for simpo"):
        preference_loss(pc, pr, None, None, loss_type="simpo", chosen_lengths=len_c)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss(pc, pr, None, None, loss_type="sigmoid")
    assert not needs_reference("simpo")
    assert all(needs_reference(k) for k in LOSS_TYPES if k != "simpo")


def test_invalid_arguments_are_named():
    pc, pr, rc, rr, _, _ = _pairs()
    with pytest.raises(ValueError, match=r"unknown loss_type 'kto'.*sigmoid, ipo, hinge"):
        preference_loss(pc, pr, rc, rr, loss_type="kto")
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'"):
        needs_reference("dpo")
    with pytest.raises(ValueError, match=r"robust must lie in \[0, 0.5\)"):
        preference_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="no meaning for ipo"):
        preference_loss(pc, pr, rc, rr, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta must be positive"):
        preference_loss(pc, pr, rc, rr, beta=0.0)


def test_reward_metrics():
    chosen = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    rejected = torch.tensor([0.0, -1.0, 0.5])
    metrics = reward_metrics(chosen, rejected)
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracy",
                            "rewards/margin"}
    torch.testing.assert_close(metrics["rewards/accuracy"], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(metrics["rewards/margin"], torch.tensor([1.0, -1.0, 0.0]))
    assert not any(t.requires_grad for t in metrics.values())


def test_ipo_mean_and_sum_forms():
    """The default IPO is the per-token mean form; the summed form stays available. Different
    answer lengths tell them apart (a mean form that forgets to divide fails here)."""
    pc, pr, rc, rr, len_c, len_r = _pairs()
    assert not torch.equal(len_c, len_r)
    mean, _, _ = preference_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=len_c,
                                 rejected_lengths=len_r)
    torch.testing.assert_close(mean, formula("ipo", pc, pr, rc, rr, 0.0, len_c, len_r))
    summed, _, _ = preference_loss(pc, pr, rc, rr, loss_type="ipo", ipo_form="sum")
    torch.testing.assert_close(summed, formula("ipo_sum", pc, pr, rc, rr, 0.0))
    assert not torch.allclose(mean, summed)
    with pytest.raises(ValueError, match="rejected_lengths is required for the mean IPO form"):
        preference_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=len_c)
    with pytest.raises(ValueError, match="ipo_form must be one of mean, sum"):
        preference_loss(pc, pr, rc, rr, loss_type="ipo", ipo_form="avg")
