"""Plain log-probs through full logits: the slow path and the ground truth for the fused ones."""

import torch


def naive_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token log p(label) via full [N, V] logits, log_softmax and gather.

    The logits are computed in the inputs' dtype and upcast afterwards, as a `transformers`
    LM head does, so in bf16 they carry bf16 rounding that the fused kernels avoid.
    Returns float32 [N], 0 where ``labels == ignore_index``.
    """
    logits = (hidden @ weight.T).float()
    ignored = labels == ignore_index
    safe = labels.masked_fill(ignored, 0)
    logp = torch.log_softmax(logits, dim=-1).gather(1, safe.unsqueeze(1)).squeeze(1)
    return logp.masked_fill(ignored, 0.0)
