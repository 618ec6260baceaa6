"""Preference losses for DPO-style alignment, one value per (chosen, rejected) pair.

Inputs are log-probs summed over each answer's tokens, shape [B]. Notation used below:
pi_c, pi_r (policy), ref_c, ref_r (reference), |y_c|, |y_r| (answer lengths in tokens),
z = (pi_c - ref_c) - (pi_r - ref_r) (the log-ratio margin), beta, eps = label_smoothing,
sigma = the logistic function.
"""

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "cdpo", "simpo")
IPO_FORMS = ("mean", "sum")
_REFERENCE_FREE = ("simpo",)
_SMOOTHED = ("sigmoid", "cdpo", "robust", "simpo")

Logps = torch.Tensor | None
Lengths = torch.Tensor | float | int | None


def needs_reference(loss_type: str) -> bool:
    """Whether ``loss_type`` compares against a frozen reference model (all but simpo)."""
    _check_type(loss_type)
    return loss_type not in _REFERENCE_FREE


def _check_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def _smoothed_logistic(margin: torch.Tensor, eps: float) -> torch.Tensor:
    # logsigmoid stays finite for margins of any size, where log(sigmoid(x)) underflows to -inf.
    return -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)


def _lengths(lengths: Lengths, like: torch.Tensor, name: str, why: str) -> torch.Tensor:
    if lengths is None:
        raise ValueError(f"{name} is required {why}")
    return torch.as_tensor(lengths, dtype=like.dtype, device=like.device)


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: Logps,
    ref_rejected_logps: Logps,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    chosen_lengths: Lengths = None,
    rejected_lengths: Lengths = None,
    nll_weight: float = 0.0,
    ipo_form: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference loss and implicit rewards.

    loss_type:
        sigmoid: DPO (Rafailov et al., 2023, eq. 7), with optional label smoothing as in cDPO:
            L = -(1 - eps) log sigma(beta z) - eps log sigma(-beta z); eps = 0 is plain DPO.
        cdpo: conservative DPO (Mitchell, 2023), the same formula, eps being the assumed rate
            of flipped preference labels.
        robust: provably robust DPO (Chowdhury et al., 2024), unbiased under label noise eps:
            L = [-(1 - eps) log sigma(beta z) + eps log sigma(-beta z)] / (1 - 2 eps), eps < 0.5.
        ipo: IPO (Azar et al., 2023, eq. 17: the empirical IPO loss), a squared loss
            regressing the log-ratio margin to 1 / (2 beta). ``ipo_form`` says which margin:
            mean (default, as the authors ran it and as TRL does): the per-token mean
                z_mean = (pi_c - ref_c) / |y_c| - (pi_r - ref_r) / |y_r|,
                L = (z_mean - 1 / (2 beta))^2; both lengths are required;
            sum: the summed log-ratio, L = (z - 1 / (2 beta))^2, which weighs long answers
                more (the literal reading of eq. 17 with sequence log-probs).
        hinge: SLiC-HF's rank calibration loss (Zhao et al., 2023, sec. 2) on the DPO
            margin: L = max(0, 1 - beta z).
        simpo: SimPO (Meng et al., 2024, eq. 6), reference-free and length-normalised:
            m = beta (pi_c / |y_c| - pi_r / |y_r|) - gamma,
            L = -(1 - eps) log sigma(m) - eps log sigma(-m), with gamma = ``simpo_gamma``.
            ``ref_*`` may be None; both lengths are required.
    nll_weight: RPO-style term (Pang et al., 2024) keeping the chosen answer likely:
        L += nll_weight * (-pi_c / |y_c|); ``chosen_lengths`` is required when it is > 0.
    label_smoothing (eps) applies to sigmoid, cdpo, robust and simpo; it must be 0 for the
    others.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each [B]. Rewards are detached:
        beta (pi - ref) for the reference-based types, beta pi / |y| for simpo.
    """
    _check_type(loss_type)
    eps = label_smoothing
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if loss_type in _SMOOTHED:
        limit_ok = eps < 0.5 if loss_type == "robust" else eps <= 0.5
        if not (eps >= 0 and limit_ok):
            bound = "[0, 0.5)" if loss_type == "robust" else "[0, 0.5]"
            raise ValueError(f"label_smoothing for {loss_type} must lie in {bound}, got {eps}")
    elif eps != 0:
        raise ValueError(f"label_smoothing has no meaning for {loss_type}; set it to 0")
    if nll_weight < 0:
        raise ValueError(f"nll_weight must be >= 0, got {nll_weight}")
    if ipo_form not in IPO_FORMS:
        raise ValueError(f"ipo_form must be one of {', '.join(IPO_FORMS)}, got {ipo_form!r}")

    pi_c, pi_r = policy_chosen_logps, policy_rejected_logps
    if loss_type == "simpo":
        len_c = _lengths(chosen_lengths, pi_c, "chosen_lengths", "for simpo")
        len_r = _lengths(rejected_lengths, pi_r, "rejected_lengths", "for simpo")
        chosen_rewards, rejected_rewards = beta * pi_c / len_c, beta * pi_r / len_r
        losses = _smoothed_logistic(chosen_rewards - rejected_rewards - simpo_gamma, eps)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"{loss_type} needs reference log-probs (ref_* are None)")
        chosen_ratio = pi_c - ref_chosen_logps
        rejected_ratio = pi_r - ref_rejected_logps
        z = chosen_ratio - rejected_ratio
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
        if loss_type in ("sigmoid", "cdpo"):
            losses = _smoothed_logistic(beta * z, eps)
        elif loss_type == "robust":
            losses = (
                -(1 - eps) * F.logsigmoid(beta * z) + eps * F.logsigmoid(-beta * z)
            ) / (1 - 2 * eps)
        elif loss_type == "ipo" and ipo_form == "mean":
            len_c = _lengths(chosen_lengths, pi_c, "chosen_lengths", "for the mean IPO form")
            len_r = _lengths(rejected_lengths, pi_r, "rejected_lengths", "for the mean IPO form")
            losses = (chosen_ratio / len_c - rejected_ratio / len_r - 1 / (2 * beta)) ** 2
        elif loss_type == "ipo":
            losses = (z - 1 / (2 * beta)) ** 2
        else:  # hinge
            losses = torch.relu(1 - beta * z)

    if nll_weight > 0:
        len_c = _lengths(chosen_lengths, pi_c, "chosen_lengths", "when nll_weight > 0")
        losses = losses + nll_weight * (-pi_c / len_c)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def reward_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-pair reward metrics (float tensors [B]) that the trainer averages over a step."""
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracy": (chosen > rejected).to(chosen.dtype),
        "rewards/margin": chosen - rejected,
    }
