"""Fused log-probs in plain torch: chunked over vocabulary and tokens, runs on any device.

Forward keeps a running max and sum-of-exp per token across vocabulary chunks (online
logsumexp) and picks the label logit out of the chunk that holds it. Backward recomputes each
[token_chunk, vocab_chunk] block of logits, turns it into d logp / d logits in place and feeds
it straight into two matmuls, so neither pass ever holds more than one block of logits. The
Triton back end shares this backward (`blockwise_backward`).

Every block's logits are fp32 sums of the inputs' products. On CUDA, bf16/fp16 blocks go to
the tensor cores as they are, with fp32 output (`torch.mm(..., out_dtype=torch.float32)`):
upcasting them first, as the CPU does, would run the matmuls at the fp32 (non-tensor-core)
rate, measured 20x slower than the naive path's bf16 matmuls on an H200. There d logits are
rounded to the input dtype for the two gradient matmuls, as the naive path's autograd does.
"""

import functools
import warnings

import torch

# 1024 x 2048 fp32 logits = 8 MiB per block: big enough for matmuls to run near peak on CPU,
# small next to the 2-3 GiB a typical [N, V] costs.
TOKEN_CHUNK = 1024
VOCAB_CHUNK = 2048
# On a GPU a block that small is launch-bound (1,200 blocks of several kernels each for 16k
# tokens and a 152k vocabulary): 4096 x 8192 fp32 = 128 MiB, a few percent of [N, V].
CUDA_TOKEN_CHUNK = 4096
CUDA_VOCAB_CHUNK = 8192
_HALF = (torch.bfloat16, torch.float16)


def resolve_chunks(device: torch.device, token_chunk: int | None,
                   vocab_chunk: int | None) -> tuple[int, int]:
    """(token_chunk, vocab_chunk) for blocks on `device`: the given ones, checked, or the
    device's defaults."""
    default_t, default_v = ((CUDA_TOKEN_CHUNK, CUDA_VOCAB_CHUNK) if device.type == "cuda"
                            else (TOKEN_CHUNK, VOCAB_CHUNK))
    token_chunk = default_t if token_chunk is None else token_chunk
    vocab_chunk = default_v if vocab_chunk is None else vocab_chunk
    if token_chunk < 1 or vocab_chunk < 1:
        raise ValueError(f"chunk sizes must be positive, got {token_chunk=} {vocab_chunk=}")
    return token_chunk, vocab_chunk


@functools.cache
def _half_mm_fp32_out(device: str, dtype: torch.dtype) -> bool:
    """Whether this torch multiplies half tensors on `device` into fp32 (mm's out_dtype)."""
    a = torch.ones(2, 2, dtype=dtype, device=device)
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        warnings.warn(f"torch {torch.__version__} cannot multiply {dtype} into float32 on "
                      f"{device} (torch.mm out_dtype): the fused log-probs upcast each block "
                      "and run fp32 matmuls, which is several times slower", stacklevel=3)
        return False


def _tensor_cores(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in _HALF and _half_mm_fp32_out(str(t.device), t.dtype)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of half operands on the tensor cores, with fp32 output (only where
    `_tensor_cores` holds; elsewhere the blocks are upcast before they get here)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def _blocks(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _block_buffer(n: int, v: int, token_chunk: int, vocab_chunk: int, device) -> torch.Tensor:
    # One buffer reused for every block: fresh blocks would each come from the allocator, and
    # glibc keeps several of them resident (measured: 50 MiB instead of 16 MiB on CPU).
    return torch.empty(min(n, token_chunk) * min(v, vocab_chunk), device=device)


def _logits(buf: torch.Tensor | None, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 logits of one block, into `buf` where given (the upcast path)."""
    if buf is None:
        return _mm(h, w.T)
    out = buf[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
    return torch.mm(h, w.T, out=out)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for an fp32 `acc`: in place where a and b are fp32, else through `_mm`."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    else:
        acc.add_(_mm(a, b))


def _operand(t: torch.Tensor, fast: bool) -> torch.Tensor:
    # fp32 accumulation for half inputs: upcast one block, not the whole head, unless the
    # tensor cores take the block as it is.
    return t if fast else t.float()


class ChunkedLogprobs(torch.autograd.Function):
    """Autograd function over the valid (non-ignored) rows only; see `chunked_logprobs`."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        token_chunk: int,
        vocab_chunk: int,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        run_max = torch.full((n,), float("-inf"), device=hidden.device)
        run_sum = torch.zeros(n, device=hidden.device)
        target = torch.zeros(n, device=hidden.device)
        tokens = _blocks(n, token_chunk)
        fast = _tensor_cores(hidden)
        buf = None if fast else _block_buffer(n, weight.shape[0], token_chunk, vocab_chunk,
                                              hidden.device)
        for v0, v1 in _blocks(weight.shape[0], vocab_chunk):
            w = _operand(weight[v0:v1], fast)
            for t0, t1 in tokens:
                logits = _logits(buf, _operand(hidden[t0:t1], fast), w)
                _take_label_logits(logits, labels[t0:t1], v0, target[t0:t1])
                m = run_max[t0:t1]
                m_new = torch.maximum(m, logits.amax(dim=1))
                run_sum[t0:t1].mul_((m - m_new).exp_())
                run_sum[t0:t1].add_(logits.sub_(m_new.unsqueeze(1)).exp_().sum(dim=1))
                m.copy_(m_new)
        lse = run_max + run_sum.log()
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunks = (token_chunk, vocab_chunk)
        return target - lse

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        grad_h, grad_w = blockwise_backward(
            hidden, weight, labels, lse, grad_out, ctx.needs_input_grad[0],
            ctx.needs_input_grad[1], *ctx.chunks)
        return grad_h, grad_w, None, None, None


def blockwise_backward(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
    grad_out: torch.Tensor, need_h: bool, need_w: bool, token_chunk: int, vocab_chunk: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Grads of sum(grad_out * logp) in `hidden` [N, H] and `weight` [V, H], given the
    forward's per-row logsumexp, one recomputed [token_chunk, vocab_chunk] block at a time;
    returned in the inputs' dtype (None where not needed)."""
    if not hidden.shape[0]:  # no valid rows: zero grads, no fp32 accumulators
        return (torch.zeros_like(hidden) if need_h else None,
                torch.zeros_like(weight) if need_w else None)
    g = grad_out.float()
    # Accumulate in fp32; for fp32 inputs the accumulators are the returned grads themselves.
    grad_h = torch.zeros(hidden.shape, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, device=weight.device) if need_w else None
    if not (need_h or need_w):
        return None, None
    tokens = _blocks(hidden.shape[0], token_chunk)
    fast = _tensor_cores(hidden)
    buf = None if fast else _block_buffer(*lse.shape, weight.shape[0], token_chunk,
                                          vocab_chunk, lse.device)
    for v0, v1 in _blocks(weight.shape[0], vocab_chunk):
        w = _operand(weight[v0:v1], fast)
        for t0, t1 in tokens:
            h = _operand(hidden[t0:t1], fast)
            # d logp_i / d logit_ij = 1[j == label_i] - softmax_ij, scaled by grad_out_i.
            dlogits = _logits(buf, h, w).sub_(lse[t0:t1].unsqueeze(1)).exp_()
            dlogits.mul_(-g[t0:t1].unsqueeze(1))
            _add_label_grads(dlogits, labels[t0:t1], v0, g[t0:t1])
            if fast:  # d logits rounded to the inputs' dtype for the tensor cores
                dlogits = dlogits.to(hidden.dtype)
            if need_h:
                _accumulate(grad_h[t0:t1], dlogits, w)
            if need_w:
                _accumulate(grad_w[v0:v1], dlogits.T, h)
    return (grad_h.to(hidden.dtype) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None)


def _label_hits(labels: torch.Tensor, v0: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = ((labels >= v0) & (labels < v0 + width)).nonzero().squeeze(1)
    return rows, labels[rows] - v0


def _take_label_logits(logits: torch.Tensor, labels: torch.Tensor, v0: int, out: torch.Tensor):
    rows, cols = _label_hits(labels, v0, logits.shape[1])
    out[rows] = logits[rows, cols]


def _add_label_grads(dlogits: torch.Tensor, labels: torch.Tensor, v0: int, g: torch.Tensor):
    rows, cols = _label_hits(labels, v0, dlogits.shape[1])
    dlogits.index_put_((rows, cols), g[rows], accumulate=True)


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    *,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
) -> torch.Tensor:
    """Per-token log p(label), float32 [N], 0 where ignored.

    Peak extra memory beyond the returned grads: one fp32 [token_chunk, vocab_chunk] block
    (on CUDA with half inputs also its half copy and the two gradient matmuls' fp32 outputs,
    [token_chunk, H] and [vocab_chunk, H]), a copy of the non-ignored rows of ``hidden`` when
    some rows are ignored, and fp32 grad accumulators when the inputs are bf16/fp16. Chunks
    default to 1024 x 2048 on CPU and 4096 x 8192 on CUDA (`resolve_chunks`).
    """
    token_chunk, vocab_chunk = resolve_chunks(hidden.device, token_chunk, vocab_chunk)
    rows = (labels != ignore_index).nonzero().squeeze(1)
    if rows.numel() == labels.numel():
        return ChunkedLogprobs.apply(hidden, weight, labels, token_chunk, vocab_chunk)
    # Only answer tokens count in DPO, so skipping ignored rows saves most of the work.
    logp = ChunkedLogprobs.apply(
        hidden.index_select(0, rows), weight, labels[rows], token_chunk, vocab_chunk
    )
    out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    return out.index_put((rows,), logp)
