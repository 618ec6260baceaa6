"""Fused vs naive per-token log-probs: forward+backward time and peak extra memory.

For each (N, H, V) case both implementations run side by side, each call in a fresh subprocess
so that neither inherits the other's allocator state or high-water mark. Inside the subprocess
the inputs (hidden [N, H], LM-head weight [V, H], labels, and a random upstream gradient) are
built first, and one warm-up call sets up thread pools and BLAS (on a slice of the inputs on
CPU; at full size on CUDA, where it also autotunes the Triton kernels); then one
forward+backward is measured:

- memory: the peak extra memory of one forward+backward, including the gradients it returns
  (d hidden and d weight, identical in size for both paths). On CPU it is the growth of the
  process's resident set: the kernel's high-water mark (VmHWM in /proc/self/status) is reset
  through /proc/self/clear_refs once the inputs exist, so the peak is VmHWM - VmRSS at that point
  (Linux only). On CUDA it is torch.cuda.max_memory_allocated() - memory_allocated().
- time: the wall time of that same call. The machine may be shared, so naive and fused
  children alternate for --rounds rounds and the table keeps each one's fastest time (and its
  largest memory).

The ratio columns are fused / naive: below 1 means the fused path wins. "grads MiB" is the size
of d hidden + d weight, which both paths return and which therefore sets a floor under both
memory columns; "working ratio" compares what is left above that floor.

    python benchmarks/bench_logprobs.py                  # CPU table, fp32
    python benchmarks/bench_logprobs.py --gpu            # 16384x4096x152064, bf16, CUDA, triton

`--json PATH` also writes the rows as JSON (the GPU check collects them from there).
"""

import argparse
import json
import subprocess
import sys
import time

import torch

CPU_CASES = ["2048x1024x32000", "8192x1024x32000", "2048x1024x152064"]
GPU_CASES = ["16384x4096x152064"]


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} missing from /proc/self/status")


def _measure(args: argparse.Namespace) -> dict:
    """One implementation on one case, in this (fresh) process."""
    from safevid.kernels import fused_logprobs, naive_logprobs

    n, h, v = (int(x) for x in args.case.split("x"))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=gen).requires_grad_()
    # In place, so no transient [V, H] copy raises the high-water mark before the reset.
    weight = torch.randn(v, h, device=device, dtype=dtype, generator=gen).mul_(h**-0.5)
    weight.requires_grad_()
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    upstream = torch.randn(n, device=device, generator=gen)

    if args.impl == "naive":
        def step():
            naive_logprobs(hidden, weight, labels).backward(upstream)
    else:
        def step():
            fused_logprobs(hidden, weight, labels, backend=args.backend).backward(upstream)

    if device.type == "cuda":
        # Full size: the first call also autotunes the Triton kernels for this (H, V).
        step()
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        # Thread pools and BLAS set themselves up on first use (tens of MiB, once per process);
        # pay that on a slice so that it lands in neither path's measurement.
        small = slice(0, min(n, 64))
        fn = naive_logprobs if args.impl == "naive" else fused_logprobs
        fn(hidden[small].detach().clone().requires_grad_(), weight[:256].detach().clone(),
           labels[small] % min(v, 256)).backward(upstream[small])
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _status_mib("VmRSS")
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        peak_mib = _status_mib("VmHWM") - base
    return {"ms": 1000 * seconds, "mib": peak_mib}


def _run_child(args: argparse.Namespace, case: str, impl: str) -> dict:
    cmd = [
        sys.executable, __file__, "--child", "--case", case, "--impl", impl,
        "--device", args.device, "--dtype", args.dtype, "--backend", args.backend,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} on {case} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", help="NxHxV, e.g. 8192x1024x32000")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--rounds", type=int, default=3, help="naive/fused child pairs per case")
    parser.add_argument(
        "--gpu", action="store_true", help="the GPU case: 16384x4096x152064, bf16, CUDA, triton"
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["naive", "fused"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args)))
        return
    if args.gpu:
        args.device, args.dtype, args.backend = "cuda", "bfloat16", "triton"
    cases = args.cases or (GPU_CASES if args.device.startswith("cuda") else CPU_CASES)

    print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, "
          f"fused backend {args.backend}, best of {args.rounds} interleaved rounds")
    cols = ["N", "H", "V", "naive ms", "fused ms", "time ratio", "naive MiB", "fused MiB",
            "mem ratio", "grads MiB", "working ratio"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("-" * (len(c) + 1) + ":" for c in cols) + "|")
    itemsize = getattr(torch, args.dtype).itemsize
    rows = []
    for case in cases:
        runs = {"naive": [], "fused": []}
        for _ in range(args.rounds):
            for impl, results in runs.items():
                results.append(_run_child(args, case, impl))
        naive, fused = (
            {"ms": min(r["ms"] for r in rs), "mib": max(r["mib"] for r in rs)}
            for rs in runs.values()
        )
        n, h, v = (int(x) for x in case.split("x"))
        # d hidden and d weight: returned by both paths, so a floor under both memory columns.
        grads = (n + v) * h * itemsize / 2**20
        cells = [
            n, h, v, f"{naive['ms']:.0f}", f"{fused['ms']:.0f}",
            f"{fused['ms'] / naive['ms']:.2f}", f"{naive['mib']:.0f}", f"{fused['mib']:.0f}",
            f"{fused['mib'] / naive['mib']:.1%}", f"{grads:.0f}",
            f"{(fused['mib'] - grads) / (naive['mib'] - grads):.1%}",
        ]
        row = (str(c).rjust(len(name)) for c, name in zip(cells, cols, strict=True))
        print("| " + " | ".join(row) + " |", flush=True)
        rows.append({
            "case": case, "naive_ms": naive["ms"], "fused_ms": fused["ms"],
            "time_ratio": fused["ms"] / naive["ms"], "naive_mib": naive["mib"],
            "fused_mib": fused["mib"], "mem_ratio": fused["mib"] / naive["mib"], "grads_mib": grads,
        })
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": args.device, "dtype": args.dtype,
                       "backend": args.backend, "rounds": args.rounds, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
