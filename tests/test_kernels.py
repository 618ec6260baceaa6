"""Fused log-prob kernels against a float64 log_softmax + gather, forward and backward.

Tolerances per dtype (the fused paths accumulate logits in fp32 whatever the input dtype):
- float32: log-probs atol 1e-4; grads rtol 1e-4, atol 1e-5 x max|grad|.
- bfloat16: log-probs atol 2e-4 (fp32 sums of bf16 products); grads rtol 2e-2,
  atol 2e-2 x max|grad| (grads are returned in bf16, and on CUDA d logits are rounded to bf16
  for the tensor cores).
The reference runs on the same (already rounded) inputs upcast to float64.

The Triton kernels run under TRITON_INTERPRET=1 in a subprocess (the variable must be set
before the kernels are defined), at small sizes only: the interpreter is slow.

On a machine with CUDA the `cuda` tests also run the compiled kernels (autotuned configs
included) up to H=4096 and V=152064, and check that the fused path's GPU memory stays far below
one [N, V] buffer. Without CUDA they skip, unless SAFEVID_TEST_DEVICE=cuda (set by
benchmarks/gpu_check.sh), which turns a missing GPU into a failure rather than a silent skip.
"""

import os
import subprocess
import sys

import pytest
import torch
from safevid.kernels import fused_logprobs, naive_logprobs
from safevid.kernels.torch_chunked import CUDA_TOKEN_CHUNK, CUDA_VOCAB_CHUNK
from torch.utils._python_dispatch import TorchDispatchMode

TOL = {
    torch.float32: {"out_atol": 1e-4, "grad_rtol": 1e-4, "grad_atol": 1e-5},
    torch.bfloat16: {"out_atol": 2e-4, "grad_rtol": 2e-2, "grad_atol": 2e-2},
}
IGNORE = -100
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("SAFEVID_TEST_DEVICE") != "cuda",
    reason="needs CUDA (SAFEVID_TEST_DEVICE=cuda makes this a failure instead)",
)


def _inputs(n: int, h: int, v: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    # Drawn on the device itself: the largest CUDA case would take seconds to draw on a CPU.
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, device=device).to(dtype).requires_grad_()
    # Logits with a std of about 2: a peaked but not degenerate softmax, like a trained head.
    weight = (2 * torch.randn(v, h, generator=gen, device=device) / h**0.5).to(dtype)
    weight.requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    labels[0] = v - 1  # the last vocabulary block's edge
    labels[2::3] = IGNORE
    upstream = torch.randn(n, generator=gen, device=device)
    return hidden, weight, labels, upstream


def _reference(hidden, weight, labels, upstream):
    """float64 log_softmax + gather, with grads of sum(upstream * logp)."""
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    keep = labels != IGNORE
    logp = torch.log_softmax(h64 @ w64.T, dim=-1)
    logp = logp.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1) * keep
    (logp * upstream.double()).sum().backward()
    return logp.detach(), h64.grad, w64.grad


def check_against_reference(fn, n: int, h: int, v: int, dtype: torch.dtype, device: str = "cpu",
                            **kwargs) -> None:
    hidden, weight, labels, upstream = _inputs(n, h, v, dtype, device=device)
    out = fn(hidden, weight, labels, IGNORE, **kwargs)
    (out * upstream).sum().backward()
    ref_out, ref_dh, ref_dw = _reference(hidden, weight, labels, upstream)
    tol = TOL[dtype]
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=tol["out_atol"])
    assert torch.all(out[labels == IGNORE] == 0)
    assert torch.all(hidden.grad[labels == IGNORE] == 0)
    for got, want in ((hidden.grad, ref_dh), (weight.grad, ref_dw)):
        atol = tol["grad_atol"] * want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=tol["grad_rtol"], atol=atol)


# N in {1, 7, 1000}, H in {17, 64}, V in {31, 50257}; small chunks put several ragged
# blocks on both axes, the defaults check what the trainer runs.
TORCH_CASES = [
    pytest.param(1, 17, 31, {"token_chunk": 4, "vocab_chunk": 8}, id="N1-H17-V31-chunks4x8"),
    pytest.param(7, 64, 31, {"token_chunk": 3, "vocab_chunk": 7}, id="N7-H64-V31-chunks3x7"),
    pytest.param(7, 17, 50257, {}, id="N7-H17-V50257-default"),
    pytest.param(1000, 17, 31, {"token_chunk": 128, "vocab_chunk": 16},
                 id="N1000-H17-V31-chunks128x16"),
    pytest.param(1000, 64, 50257, {"token_chunk": 384, "vocab_chunk": 4096},
                 id="N1000-H64-V50257-chunks384x4096"),
    pytest.param(1000, 17, 50257, {}, id="N1000-H17-V50257-default"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,h,v,chunks", TORCH_CASES)
def test_torch_backend_matches_float64(n, h, v, chunks, dtype):
    check_against_reference(fused_logprobs, n, h, v, dtype, backend="torch", **chunks)


def test_naive_matches_float64():
    check_against_reference(naive_logprobs, 7, 64, 31, torch.float32)


def test_only_the_needed_grad_is_computed_and_no_grad_forward_works():
    hidden, weight, labels, upstream = _inputs(9, 17, 31, torch.float32)
    weight.requires_grad_(False)
    out = fused_logprobs(hidden, weight, labels, backend="torch", vocab_chunk=8)
    (out * upstream).sum().backward()
    _, ref_dh, _ = _reference(hidden, weight, labels, upstream)
    torch.testing.assert_close(hidden.grad.double(), ref_dh, rtol=1e-4, atol=1e-6)
    assert weight.grad is None
    with torch.no_grad():
        again = fused_logprobs(hidden, weight, labels, backend="torch")
    assert not again.requires_grad
    torch.testing.assert_close(again, out.detach())


def test_all_ignored_gives_zeros_and_zero_grads():
    hidden, weight, labels, _ = _inputs(5, 17, 31, torch.float32)
    out = fused_logprobs(hidden, weight, torch.full_like(labels, IGNORE), backend="torch")
    out.sum().backward()
    assert torch.all(out == 0)
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_bad_inputs_are_rejected():
    hidden, weight, labels, _ = _inputs(5, 17, 31, torch.float32)
    with pytest.raises(ValueError, match="labels must lie"):
        fused_logprobs(hidden, weight, labels.clamp(min=0) + 31)
    with pytest.raises(ValueError, match="expected hidden"):
        fused_logprobs(hidden, weight[:, :16], labels)
    with pytest.raises(ValueError, match="unknown backend"):
        fused_logprobs(hidden, weight, labels, backend="cuda")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter accepts CPU")
def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter():
    pytest.importorskip("triton")
    hidden, weight, labels, _ = _inputs(5, 17, 31, torch.float32)
    with pytest.raises(RuntimeError, match="backend='torch'"):
        fused_logprobs(hidden, weight, labels, backend="triton")


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


class LargestSaved:
    """Records the element count of the largest tensor autograd saves for backward."""

    def __init__(self):
        self.largest = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.largest = max(self.largest, t.numel())
        return t


def _largest(fn, n: int, h: int, v: int) -> tuple[int, int]:
    hidden, weight, labels, upstream = _inputs(n, h, v, torch.float32)
    ops, saved = LargestTensor(), LargestSaved()
    with ops, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        (fn(hidden, weight, labels) * upstream).sum().backward()
    return ops.largest, saved.largest


def test_torch_backend_never_allocates_n_by_v():
    n, h, v, tc, vc = 600, 16, 4000, 128, 512
    # The instrument itself must see [N, V] in the naive path, else passing proves nothing.
    naive_ops, naive_saved = _largest(naive_logprobs, n, h, v)
    assert naive_ops >= n * v and naive_saved >= n * v
    fused = lambda *a: fused_logprobs(*a, backend="torch", token_chunk=tc, vocab_chunk=vc)
    fused_ops, fused_saved = _largest(fused, n, h, v)
    # Nothing beyond one logits block, the inputs and their same-shaped grads.
    assert fused_ops <= max(tc * vc, n * h, v * h) < n * v
    assert fused_saved <= max(n * h, v * h)


def check_triton_cases() -> None:
    """Body of the interpreter test; runs in a subprocess with TRITON_INTERPRET=1."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for dtype in (torch.float32, torch.bfloat16):
        for n, h, v in [(1, 17, 31), (7, 17, 31), (40, 64, 100)]:
            check_against_reference(fused_logprobs, n, h, v, dtype, backend="triton")
    # The chunks reach the backward's blocks (several token and vocabulary blocks here).
    check_against_reference(fused_logprobs, 40, 64, 100, torch.float32, backend="triton",
                            token_chunk=7, vocab_chunk=16)
    hidden, weight, labels, _ = _inputs(20, 32, 50, torch.float32)
    weight.requires_grad_(False)
    fused_logprobs(hidden, weight, labels, backend="triton").sum().backward()
    assert weight.grad is None and hidden.grad is not None
    print("triton cases ok")


def test_triton_backend_under_interpreter_matches_float64():
    pytest.importorskip("triton")
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_kernels as t; "
    code += "t.check_triton_cases()"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "triton cases ok" in done.stdout


# Ragged shapes, the 7B's hidden size and vocabulary, Qwen2's vocabulary. bf16 is what training
# runs on a GPU; fp32 on two shapes only, as every new dtype and shape class costs Triton
# compilations of all autotune configs.
CUDA_CASES = [
    pytest.param(7, 64, 31, torch.float32, id="N7-H64-V31-fp32"),
    pytest.param(333, 4096, 32064, torch.float32, id="N333-H4096-V32064-fp32"),
    pytest.param(1, 17, 31, torch.bfloat16, id="N1-H17-V31-bf16"),
    pytest.param(7, 64, 31, torch.bfloat16, id="N7-H64-V31-bf16"),
    pytest.param(1000, 64, 50257, torch.bfloat16, id="N1000-H64-V50257-bf16"),
    pytest.param(333, 4096, 32064, torch.bfloat16, id="N333-H4096-V32064-bf16"),
    # The float64 reference needs about 20 GB here.
    pytest.param(2048, 4096, 152064, torch.bfloat16, id="N2048-H4096-V152064-bf16"),
]


@requires_cuda
@pytest.mark.parametrize("n,h,v,dtype", CUDA_CASES)
def test_cuda_triton_matches_float64(n, h, v, dtype):
    check_against_reference(fused_logprobs, n, h, v, dtype, device="cuda", backend="triton")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_torch_backend_matches_float64(dtype):
    check_against_reference(fused_logprobs, 1000, 64, 50257, dtype, device="cuda", backend="torch",
                            token_chunk=384, vocab_chunk=4096)


@requires_cuda
def test_cuda_triton_frozen_weight_and_all_ignored():
    hidden, weight, labels, upstream = _inputs(9, 64, 1000, torch.bfloat16, device="cuda")
    weight.requires_grad_(False)
    (fused_logprobs(hidden, weight, labels, backend="triton") * upstream).sum().backward()
    _, ref_dh, _ = _reference(hidden, weight, labels, upstream)
    atol = TOL[torch.bfloat16]["grad_atol"] * ref_dh.abs().max().item()
    torch.testing.assert_close(hidden.grad.double(), ref_dh, rtol=2e-2, atol=atol)
    assert weight.grad is None
    hidden.grad = None
    out = fused_logprobs(hidden, weight, torch.full_like(labels, IGNORE), backend="triton")
    out.sum().backward()
    assert torch.all(out == 0) and torch.all(hidden.grad == 0)


@requires_cuda
def test_cuda_triton_memory_stays_far_below_n_by_v():
    n, h, v = 8192, 1024, 152064
    hidden, weight, labels, upstream = _inputs(n, h, v, torch.bfloat16, device="cuda")

    def step():
        (fused_logprobs(hidden, weight, labels, backend="triton") * upstream).sum().backward()
        hidden.grad = weight.grad = None

    step()  # autotuning allocates buffers of its own (an L2-flush buffer among them)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    (fused_logprobs(hidden, weight, labels, backend="triton") * upstream).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # fp32 accumulators for d hidden and d weight plus the bf16 grads returned: 6 bytes each.
    grads = (n + v) * h * 6
    # Beyond them, the backward's one block: fp32 logits, their bf16 copy for the tensor cores
    # and the two matmuls' fp32 outputs; plus the gathered rows and slack.
    block = CUDA_TOKEN_CHUNK * CUDA_VOCAB_CHUNK * 6 + (CUDA_TOKEN_CHUNK + CUDA_VOCAB_CHUNK) * h * 4
    assert extra < grads + block + 64 * 2**20, (extra, grads, block)
    assert extra - grads < n * v * 4 / 16  # a sixteenth of one fp32 [N, V] (5 GB here)
