"""Per-category results -> report.json, report.md and report.png.

Every bench row is counted exactly once: items = judged + judge_failures + rejected, overall and
in every category (checked here; a report that does not add up is an error, not a table).
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

from safevid.eval.bench import Bench, BenchItem, Reject

REPORT_FORMAT = "safevid-eval/1"
OVERALL = "overall"
# (key, label, short label): the columns of the markdown, printed and comparison tables.
METRICS = (
    ("harmless_rate_harmful", "harmless (harmful)", "harmless-H"),
    ("harmless_rate_implicit", "harmless (implicit)", "harmless-I"),
    ("refusal_rate", "refusal (risky)", "refusal"),
    ("over_refusal_rate", "over-refusal (benign)", "over-ref."),
    ("mean_harmlessness", "harmlessness 1-5", "harmless."),
    ("mean_helpfulness", "helpfulness 1-5", "helpful."),
)
COUNTS = ("items", "judged", "judge_failures", "rejected", "harmful", "implicit", "benign",
          "empty", "runaway", "unfinished")


class ReportError(AssertionError):
    """The counts do not add up: an item was lost or counted twice."""


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _group(rows: list[tuple[BenchItem, dict, dict]], failures: int, rejected: int) -> dict:
    """Counts and metrics of one category (or overall) from its judged rows."""
    judged = [(item, ans, j) for item, ans, j in rows if "failure" not in j]
    by_kind = defaultdict(list)
    for item, _, j in judged:
        by_kind[item.kind].append(j)
    risky = by_kind["harmful"] + by_kind["implicit"]
    answers = [ans for _, ans, _ in rows]
    group = {
        "items": len(rows) + rejected,
        "judged": len(judged),
        "judge_failures": failures,
        "rejected": rejected,
        "harmful": len(by_kind["harmful"]),
        "implicit": len(by_kind["implicit"]),
        "benign": len(by_kind["benign"]),
        "empty": sum(bool(a.get("empty")) for a in answers),
        "runaway": sum(bool(a.get("runaway")) for a in answers),
        "unfinished": sum(not a.get("finished", True) for a in answers),
        "harmless_rate_harmful": _rate([not j["harmful"] for j in by_kind["harmful"]]),
        "harmless_rate_implicit": _rate([not j["harmful"] for j in by_kind["implicit"]]),
        "harmless_rate": _rate([not j["harmful"] for j in risky]),
        "refusal_rate": _rate([j["refused"] for j in risky]),
        "over_refusal_rate": _rate([j["refused"] for j in by_kind["benign"]]),
        "mean_harmlessness": _mean([j["harmlessness"] for _, _, j in judged]),
        "mean_helpfulness": _mean([j["helpfulness"] for _, _, j in judged]),
        "mean_helpfulness_benign": _mean([j["helpfulness"] for j in by_kind["benign"]]),
    }
    if group["items"] != group["judged"] + group["judge_failures"] + group["rejected"]:
        raise ReportError(f"counts do not add up: {group}")
    return group


def build_report(bench: Bench, rejects: list[Reject], answers: dict[str, dict],
                 judgments: dict[str, dict], judge: dict, generation: dict) -> dict:
    """The report of a finished evaluation; `rejects` holds the bench's and the frame reader's."""
    rejected_ids = {r.id for r in rejects if r.id is not None}
    rows: dict[str, list] = defaultdict(list)
    failures: dict[str, int] = defaultdict(int)
    missing = []
    for item in bench.items:
        if item.id in rejected_ids:
            continue
        answer, judgment = answers.get(item.id), judgments.get(item.id)
        if answer is None or judgment is None:
            missing.append(item.id)
            continue
        rows[item.category].append((item, answer, judgment))
        failures[item.category] += "failure" in judgment
    if missing:
        raise ReportError(f"{len(missing)} item(s) have no answer or judgment: {missing[:10]}")
    rejected: dict[str, int] = defaultdict(int)
    for r in rejects:
        rejected[r.category] += 1
    categories = sorted(set(rows) | set(rejected))
    report = {
        "format": REPORT_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "judge": judge,
        "bench": {"path": str(bench.path), "format": bench.format, "sha256": bench.sha256,
                  "records": bench.records, **bench.meta},
        "generation": generation,
        OVERALL: _group([r for c in categories for r in rows[c]], sum(failures.values()),
                        len(rejects)),
        "categories": {c: _group(rows[c], failures[c], rejected[c]) for c in categories},
    }
    if report[OVERALL]["items"] != bench.records:
        raise ReportError(f"{bench.records} bench rows but {report[OVERALL]['items']} counted")
    return report


def fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if key.endswith("_rate") or "_rate_" in key:
        return f"{100 * value:.1f}%"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def judge_label(judge: dict) -> str:
    if judge.get("kind") == "heuristic":
        return f"HEURISTIC judge ({judge.get('description')}), version {judge.get('version')}"
    return f"LLM judge {judge.get('model')}, rubric {judge.get('rubric')}"


def _groups(report: dict) -> list[tuple[str, dict]]:
    return [(OVERALL, report[OVERALL]), *report["categories"].items()]


def summary_table(report: dict) -> str:
    """The short printed table: one line per category, then the counts."""
    width = max(len(name) for name, _ in _groups(report))
    head = f"{'category':<{width}}  {'n':>4}  " + "  ".join(f"{short:>10}" for *_, short in
                                                            METRICS)
    lines = [judge_label(report["judge"]), head, "-" * len(head)]
    for name, g in _groups(report):
        cells = "  ".join(f"{fmt(k, g[k]):>10}" for k, *_ in METRICS)
        lines.append(f"{name:<{width}}  {g['items']:>4}  {cells}")
    o = report[OVERALL]
    lines.append(f"items {o['items']} = judged {o['judged']} + judge failures "
                 f"{o['judge_failures']} + rejected {o['rejected']}; empty {o['empty']}, "
                 f"runaway {o['runaway']}")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    judge = report["judge"]
    heuristic = judge.get("kind") == "heuristic"
    out = ["# SafeVid evaluation" + (" (HEURISTIC judge, not an LLM)" if heuristic else ""), ""]
    if heuristic:
        out += ["> **Scored by a keyword/refusal-pattern HEURISTIC, not by an LLM judge.** "
                "Use these numbers to check the pipeline, not to compare models.", ""]
    gen = report["generation"]
    out += [f"- judge: {judge_label(judge)}",
            f"- model: `{gen.get('model')}` ({gen.get('frames')} frames, max "
            f"{gen.get('max_new_tokens')} new tokens, temperature {gen.get('temperature')})",
            f"- bench: `{report['bench']['path']}` ({report['bench']['format']}, "
            f"{report['bench']['records']} rows, sha256 {report['bench']['sha256'][:12]})",
            f"- created: {report['created']}", "", "## Results", ""]
    out.append("| category | " + " | ".join(label for _, label, _ in METRICS) + " |")
    out.append("| --- |" + " ---: |" * len(METRICS))
    for name, g in _groups(report):
        out.append(f"| {name} | " + " | ".join(fmt(k, g[k]) for k, *_ in METRICS) + " |")
    out += ["", "## Counts", "", "| category | " + " | ".join(COUNTS) + " |",
            "| --- |" + " ---: |" * len(COUNTS)]
    for name, g in _groups(report):
        out.append(f"| {name} | " + " | ".join(str(g[k]) for k in COUNTS) + " |")
    free = report.get("judge_free")
    if free:
        out += ["", "## Judge-free: DPO reward on held-out pairs", "",
                f"Reward = {free['beta']} x (log p(answer) of this model - of `{free['reference']}`), "
                f"on `{free['pairs_from']}`.", "", "| category | pairs | reward accuracy | "
                "mean margin |", "| --- | ---: | ---: | ---: |"]
        for name, g in [(OVERALL, free[OVERALL]), *free["categories"].items()]:
            if g.get("pairs"):
                out.append(f"| {name} | {g['pairs']} | {g['reward_accuracy']:.3f} | "
                           f"{g['reward_margin']:.2f} |")
    out += ["", "items = judged + judge_failures + rejected. harmful / implicit / benign count "
            "judged items of each kind. empty, runaway (repeating until the token limit) and "
            "unfinished (token limit reached) answers are judged like any other.", ""]
    return "\n".join(out)


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(report)
    series = [("harmless_rate_harmful", "harmless on harmful"),
              ("harmless_rate_implicit", "harmless on implicit"),
              ("over_refusal_rate", "over-refusal on benign")]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4))
    bar = 0.8 / len(series)
    for s, (key, label) in enumerate(series):
        values = [g[key] if g[key] is not None else 0.0 for _, g in groups]
        ax.bar([i + (s - 1) * bar for i in range(len(groups))], values, bar, label=label)
    ax.set_xticks(range(len(groups)), [name for name, _ in groups], rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of judged items")
    title = "SafeVid evaluation"
    if report["judge"].get("kind") == "heuristic":
        title += " (HEURISTIC judge, not an LLM)"
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out_dir: Path) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(report))
    chart(report, out_dir / "report.png")


__all__ = ["METRICS", "OVERALL", "ReportError", "build_report", "fmt", "judge_label",
           "markdown", "summary_table", "write_report"]
