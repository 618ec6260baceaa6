"""Throughput of `safevid generate pairs` against a server with a fixed latency.

With every request taking `latency` seconds, a client that keeps C requests in flight can do at
most C / latency requests per second: that is the bound. This measures how close the real
pipeline (categorise -> queries -> answers -> verification, SQLite cache, JSONL commits) comes to
it at each concurrency, with the test server in its own process.

    .venv/bin/python benchmarks/bench_generate.py [--latency 0.2] [--seconds 8]
        [--concurrency 1 4 8 16 32 64] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = "## LLM generation throughput (safevid generate)"
CALLS_PER_CAPTION = 1 + 2 + 2 * 3 * 3  # categorise, 2 x queries, 6 x (chosen, rejected, verify)


def machine() -> str:
    mem = 0
    with contextlib.suppress(OSError):
        text = Path("/proc/meminfo").read_text()
        mem = int(re.search(r"MemTotal:\s+(\d+)", text).group(1)) // (1024 * 1024) + 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {cpus} cores, {mem} GiB"


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "openai_server.py"),
                             "--latency", str(latency)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, line.split()[1]


def server_requests(base_url: str) -> int:
    root = base_url.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(f"{root}/control/stats", timeout=10) as resp:
        return json.load(resp)["requests"]


def run_once(base_url: str, concurrency: int, captions: int, work: Path) -> dict:
    from safevid.data_prep.generate_cli import main

    work.mkdir(parents=True)
    source = work / "captions.jsonl"
    with open(source, "w") as f:
        for i in range(captions):
            f.write(json.dumps({"id": f"c{concurrency}-{i}", "caption": f"Clip {i}: a person "
                                f"climbs a tower at concurrency {concurrency}."}) + "\n")
    out = work / "pairs.jsonl"
    before = server_requests(base_url)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["pairs", "--captions", str(source), "--out", str(out), "--base-url",
                     base_url, "--model", "bench", "--max-categories", "2", "--concurrency",
                     str(concurrency), "--no-progress", "-q"])
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if code != 0:
        raise RuntimeError(f"generation failed with exit code {code}")
    requests = server_requests(base_url) - before
    pairs = sum(1 for _ in open(out))
    return {"requests": requests, "pairs": pairs, "wall": wall, "cpu": cpu}


def write_section(results: Path, table: str, header: str) -> None:
    """Replace this benchmark's section of RESULTS.md (other sections are left alone)."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    body = f"{SECTION}\n\n{header}\n\n{table}\n"
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + (text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    results.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2, help="server latency, seconds")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="target duration of each run at the bound")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    parser.add_argument("--results", type=Path, help="write the table into this RESULTS.md")
    args = parser.parse_args()

    load = os.getloadavg()[0]  # other work on the machine shows in the numbers; say how much
    server, base_url = start_server(args.latency)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for c in args.concurrency:
                bound = c / args.latency
                captions = max(2, math.ceil(bound * args.seconds / CALLS_PER_CAPTION))
                r = run_once(base_url, c, captions, Path(tmp) / f"c{c}")
                rate = r["requests"] / r["wall"]
                rows.append((c, captions, r["requests"], r["pairs"] / r["wall"], rate, bound,
                             rate / bound, r["cpu"] / r["wall"]))
                print(f"concurrency {c:3d}: {rate:7.1f} req/s of {bound:6.1f} "
                      f"({rate / bound:.0%})", file=sys.stderr, flush=True)
    finally:
        server.kill()
        server.wait()

    head = ("| concurrency | captions | requests | pairs/s | requests/s | bound (req/s) "
            "| fraction of bound | client CPU |")
    lines = [head, "|" + "---:|" * 8]
    for c, n, req, pps, rate, bound, frac, cpu in rows:
        lines.append(f"| {c} | {n} | {req} | {pps:.1f} | {rate:.1f} | {bound:.1f} | "
                     f"{frac:.0%} | {cpu:.0%} |")
    table = "\n".join(lines)
    header = (f"Machine: {machine()}, Python {platform.python_version()}, load average "
              f"{load:.1f} at the start (the cores were shared with other work). Test server "
              f"(tests/openai_server.py, own process) answering every request after "
              f"{args.latency * 1000:.0f} ms; bound = in-flight requests / latency. Each "
              f"caption makes {CALLS_PER_CAPTION} calls (2 categories x 3 query types); runs "
              f"include the SQLite cache and JSONL commits. Command: "
              f"`.venv/bin/python benchmarks/bench_generate.py`.")
    print(f"{header}\n\n{table}")
    if args.results:
        write_section(args.results, table, header)


if __name__ == "__main__":
    main()
