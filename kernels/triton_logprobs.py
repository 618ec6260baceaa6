"""Fused log-probs with a Triton forward (CUDA, or CPU tensors under TRITON_INTERPRET=1).

Forward: one program per block of tokens walks the vocabulary in blocks, computes each
[BLOCK_N, BLOCK_V] logits tile with fp32-accumulated dots over H, and keeps an online
logsumexp; it stores log p(label) and the logsumexp, and no [N, V] buffer exists.

Backward: the torch back end's blockwise backward (`torch_chunked.blockwise_backward`):
recomputed logits blocks on the tensor cores, d logits formed in place, two matmuls per
block. A Triton backward that gave each (token block, vocabulary block) tile its own program
and added its share of d hidden and d weight with fp32 atomics was measured on an H200 at 10x
the naive path's time (16384 x 4096 x 152064, bf16): every tile wrote [BLOCK_N + BLOCK_V, H]
fp32 atomics, about 900 GB in all.

Ignored tokens never reach the kernel: it gets a list of the valid row indices and gathers
rows through it, so prompt and video tokens cost nothing and need no copy in the forward (the
backward copies the valid rows once, for its matmuls).
"""

import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl
from safevid.kernels.torch_chunked import blockwise_backward, resolve_chunks

# The interpreter runs one config at a time and fails on several; read the same knob that
# triton.jit reads when these kernels are defined below.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter's tl.dot multiplies bf16 bit patterns as integers, so there the tiles are
# upcast to fp32 first; on a GPU bf16/fp16 tiles go to the tensor cores as they are.
_DOT_FP32 = tl.constexpr(INTERPRET)

if INTERPRET:
    _FWD_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16})]
else:
    _FWD_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": 64}, num_warps=w, num_stages=s)
        for bn, bv, w, s in [(64, 128, 4, 3), (128, 128, 8, 3), (64, 256, 8, 3), (128, 64, 4, 4)]
    ]


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, row_idx, row_mask, cols, col_mask, H, stride_h, stride_w,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < H
        h = tl.load(
            h_ptr + row_idx[:, None] * stride_h + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :], other=0.0,
        )
        w = tl.load(
            w_ptr + cols[:, None] * stride_w + ks[None, :],
            mask=col_mask[:, None] & k_mask[None, :], other=0.0,
        )
        if _DOT_FP32:
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.autotune(configs=_FWD_CONFIGS, key=["H", "V"])
@triton.jit
def _logprobs_fwd(
    h_ptr, w_ptr, rows_ptr, labels_ptr, out_ptr, lse_ptr,
    n_rows, H, V, stride_h, stride_w,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < n_rows
    row_idx = tl.load(rows_ptr + offs, mask=row_mask, other=0).to(tl.int64)
    labels = tl.load(labels_ptr + offs, mask=row_mask, other=0)
    run_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    target = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        logits = _logits_tile(
            h_ptr, w_ptr, row_idx, row_mask, cols.to(tl.int64), col_mask, H, stride_h, stride_w,
            BLOCK_N, BLOCK_V, BLOCK_H, PRECISION,
        )
        logits = tl.where(col_mask[None, :], logits, float("-inf"))
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], logits, 0.0), axis=1)
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(
            tl.exp(logits - new_max[:, None]), axis=1
        )
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    tl.store(lse_ptr + offs, lse, mask=row_mask)
    tl.store(out_ptr + offs, target - lse, mask=row_mask)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep full fp32 products (no TF32), matching the torch paths.
    return "ieee" if dtype == torch.float32 else "tf32"


class TritonLogprobs(torch.autograd.Function):
    """Autograd function over the rows listed in ``rows``; see `triton_logprobs`."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, labels, token_chunk, vocab_chunk):
        n_rows, (vocab, dim) = rows.numel(), weight.shape
        out = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        if n_rows:
            grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]),)
            # Triton launches on the current device: on the tensors' one, whichever that is
            # (evaluation may put a model on cuda:1 without making it current).
            with torch.cuda.device(hidden.device) if hidden.is_cuda else nullcontext():
                _logprobs_fwd[grid](
                    hidden, weight, rows, labels, out, lse, n_rows, dim, vocab,
                    hidden.stride(0), weight.stride(0), PRECISION=_precision(hidden.dtype),
                )
        ctx.save_for_backward(hidden, weight, rows, labels, lse)
        ctx.chunks = (token_chunk, vocab_chunk)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, rows, labels, lse = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh_rows, dw = blockwise_backward(
            hidden.index_select(0, rows), weight, labels, lse, grad_out, need_dh, need_dw,
            *ctx.chunks)
        dh = None
        if need_dh:  # ignored rows get zeros
            dh = torch.zeros_like(hidden).index_copy_(0, rows, dh_rows)
        return dh, dw, None, None, None, None


def triton_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
    token_chunk: int | None = None, vocab_chunk: int | None = None,
) -> torch.Tensor:
    """Per-token log p(label) through the Triton forward: float32 [N], 0 where ignored. The
    chunks size the blockwise backward's blocks (`torch_chunked.resolve_chunks`)."""
    if not (hidden.is_cuda or INTERPRET):
        raise RuntimeError(
            "the triton back end needs CUDA tensors (or TRITON_INTERPRET=1 set before import); "
            "use backend='torch' on CPU"
        )
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    rows = (labels != ignore_index).nonzero().squeeze(1)
    chunks = resolve_chunks(hidden.device, token_chunk, vocab_chunk)
    logp = TritonLogprobs.apply(hidden, weight, rows, labels[rows].contiguous(), *chunks)
    out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    return out.index_put((rows,), logp)
