"""The GPU check script end to end on CPU (`--dry-run`): every step at toy size, fp32.

Covers: the step runner and its summary (stdout table, $OUT/summary.json, $OUT/gpu_check.log,
both runs' metrics), the benchmark as the script calls it (the kernel step is skipped: its
CPU tests run in `make test`), a ZeRO-3 DPO run of the demo config through the in-process
wrapper that reads peak memory, and the
LLaVA-NeXT-Video model built from the 7B config (at toy widths here) trained for 2 steps, and
the layout steps (the layout benchmark at toy size, the demo in packed rows compared with the
shared-prefix run, the Qwen2-VL demo config).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import REPO, child_env

RUNS = ("demo_dpo", "llava7b_dpo", "demo_packed", "qwen_demo")


def test_gpu_check_dry_run(demo_assets, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {**child_env(), "OUT": str(out), "PYTHON": sys.executable}
    # A generous budget: tests may share the cores with other work.
    cmd = ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--work", str(tmp_path / "work"),
           "--assets", str(demo_assets), "--budget", "400"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    for name in RUNS:  # | run | tokens/s | peak memory GiB | measured as | ...
        row = re.search(rf"^\| {name} \| ([0-9.]+) \| ([0-9.]+) \| CPU max RSS \|", done.stdout,
                        re.M)
        assert row, f"no summary row for {name}:\n{done.stdout[-3000:]}"
        assert float(row.group(1)) > 0 and float(row.group(2)) > 0
    assert "gpu check: all steps passed" in done.stdout

    summary = json.loads((out / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {"install": "skipped", "device": "ok", "kernels": "skipped", "bench": "ok",
                      "train_bench": "skipped",
                      "demo_dpo": "ok", "llava7b_build": "ok", "llava7b_dpo": "ok",
                      "layouts_bench": "ok", "demo_packed": "ok", "qwen_demo": "ok"}
    for name in RUNS:
        run = summary["runs"][name]
        assert run["rc"] == 0 and run["steps"] == 2 and run["tokens_per_s"] > 0
    # The 7B geometry survives the toy widths: 336 px frames, 576 video tokens per prompt, one
    # prompt per pair in shared-prefix rows.
    assert summary["runs"]["llava7b_dpo"]["tokens_per_step"] > 4 * 576
    assert summary["bench"]["rows"][0]["case"] == "512x64x1000"
    assert summary["failed"] == []
    # fp32: shared-prefix and packed rows train alike.
    assert summary["layouts"]["steps"] == 2
    assert summary["layouts"]["loss"] < 1e-5 and summary["layouts"]["grad_norm"] < 1e-5
    layouts = json.loads((out / "layouts.json").read_text())
    assert set(layouts["mixes"]["prompt4x"]) == {"padded", "packed", "shared-prefix"}
    assert (out / "gpu_check.log").stat().st_size > 0
    for name in ("demo", "llava7b", "demo_packed", "qwen_demo"):
        assert len((out / f"{name}_metrics.jsonl").read_text().splitlines()) == 2
