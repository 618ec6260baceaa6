"""Per-token log-probs from hidden states and the LM head without materialising the logits.

DPO needs log p(token) of every answer token, for chosen and rejected, policy and reference.
Full logits cost N x V x 4 bytes (8192 tokens x 152k vocabulary = 5 GiB) and the same again in
backward; the fused paths keep one block of them at a time.

- `fused_logprobs`: the fused path, with a Triton back end (CUDA, or the Triton interpreter) and
  a chunked torch back end (any device).
- `naive_logprobs`: logits + log_softmax + gather, the slow reference path.
"""

import torch
from safevid.kernels.reference import naive_logprobs
from safevid.kernels.torch_chunked import chunked_logprobs

__all__ = ["BACKENDS", "fused_logprobs", "naive_logprobs"]

BACKENDS = ("auto", "triton", "torch")


def _triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    *,
    backend: str = "auto",
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
) -> torch.Tensor:
    """Per-token log p(label) = h . w_label - logsumexp(h W^T), never materialising [N, V].

    Args:
        hidden: [N, H] final hidden states (fp32, bf16 or fp16).
        weight: [V, H] LM-head weight, same dtype and device as ``hidden``.
        labels: [N] integer token ids; positions equal to ``ignore_index`` are skipped.
        backend: "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "torch"
            (chunked, any device) or "auto" (triton for CUDA tensors when triton imports,
            else torch).
        token_chunk, vocab_chunk: block sizes of the torch back end and of the Triton back
            end's backward (which is the torch one's); its peak extra memory is one fp32
            [token_chunk, vocab_chunk] block. Default: 1024 x 2048 on CPU, 4096 x 8192 on CUDA.
            The Triton forward autotunes its own tiles.

    Returns:
        float32 [N]: log p(label), 0 at ignored positions. Differentiable in ``hidden`` and
        ``weight``; logits are accumulated in fp32 whatever the input dtype.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}")
    valid = labels[labels != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= weight.shape[0]):
        raise ValueError(f"labels must lie in [0, {weight.shape[0]}) or equal {ignore_index}")

    if backend == "auto":
        backend = "triton" if hidden.is_cuda and _triton_usable() else "torch"
    if backend == "triton":
        from safevid.kernels.triton_logprobs import triton_logprobs

        return triton_logprobs(hidden, weight, labels, ignore_index, token_chunk, vocab_chunk)
    if backend == "torch":
        return chunked_logprobs(
            hidden, weight, labels, ignore_index, token_chunk=token_chunk, vocab_chunk=vocab_chunk
        )
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
