"""Before/after: two evaluations' reports side by side, per category and metric.

Absolute change is B - A; relative change is (B - A) / A (none when A is 0 or missing).
Comparisons that would mislead get a warning line: different judges, rubrics or bench files.
"""

from __future__ import annotations

import json
from pathlib import Path

from safevid.eval.report import METRICS, OVERALL, fmt, judge_label


def _change(a, b) -> tuple[float | None, float | None]:
    if a is None or b is None:
        return None, None
    return b - a, ((b - a) / a if a else None)


def warnings(a: dict, b: dict) -> list[str]:
    out = []
    if a["judge"] != b["judge"]:
        out.append(f"different judges: A {judge_label(a['judge'])}; B {judge_label(b['judge'])}")
    if a["bench"].get("sha256") != b["bench"].get("sha256"):
        out.append(f"different bench files: A {a['bench']['path']}; B {b['bench']['path']}")
    for side, r in (("A", a), ("B", b)):
        if r["judge"].get("kind") == "heuristic":
            out.append(f"{side} was scored by the offline heuristic, not an LLM judge")
    return out


def compare_reports(a: dict, b: dict, a_name: str = "A", b_name: str = "B") -> dict:
    """{"rows": [{category, metric, a, b, abs_change, rel_change}], "warnings": [...]}."""
    categories = [OVERALL] + sorted(set(a["categories"]) | set(b["categories"]))
    rows = []
    for cat in categories:
        ga = a[OVERALL] if cat == OVERALL else a["categories"].get(cat, {})
        gb = b[OVERALL] if cat == OVERALL else b["categories"].get(cat, {})
        for key, label, _ in METRICS:
            va, vb = ga.get(key), gb.get(key)
            change, rel = _change(va, vb)
            rows.append({"category": cat, "metric": key, "label": label, "a": va, "b": vb,
                         "abs_change": change, "rel_change": rel,
                         "items_a": ga.get("items", 0), "items_b": gb.get("items", 0)})
    # Judge-free reward metrics, where both evaluations computed them.
    fa, fb = a.get("judge_free"), b.get("judge_free")
    if fa and fb:
        for cat in [OVERALL] + sorted(set(fa["categories"]) | set(fb["categories"])):
            ga = fa[OVERALL] if cat == OVERALL else fa["categories"].get(cat, {})
            gb = fb[OVERALL] if cat == OVERALL else fb["categories"].get(cat, {})
            for key, label in (("reward_accuracy", "reward accuracy (judge-free)"),
                               ("reward_margin", "reward margin (judge-free)")):
                change, rel = _change(ga.get(key), gb.get(key))
                rows.append({"category": cat, "metric": key, "label": label, "a": ga.get(key),
                             "b": gb.get(key), "abs_change": change, "rel_change": rel,
                             "items_a": ga.get("pairs", 0), "items_b": gb.get("pairs", 0)})
    return {"a": a_name, "b": b_name, "a_judge": a["judge"], "b_judge": b["judge"],
            "warnings": warnings(a, b), "rows": rows}


def _cells(row: dict) -> list[str]:
    change = row["abs_change"]
    if change is None:
        absolute = "-"
    elif row["metric"].endswith("_rate") or "_rate_" in row["metric"]:
        absolute = f"{100 * change:+.1f} pt"
    else:
        absolute = f"{change:+.2f}"
    rel = "-" if row["rel_change"] is None else f"{100 * row['rel_change']:+.1f}%"
    return [row["category"], row["label"], fmt(row["metric"], row["a"]),
            fmt(row["metric"], row["b"]), absolute, rel]


HEADER = ["category", "metric", "A", "B", "change", "relative"]


def compare_table(comparison: dict) -> str:
    """A plain-text table of a comparison, for printing (the demo prints this)."""
    rows = [HEADER] + [_cells(r) for r in comparison["rows"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = [f"A = {comparison['a']}", f"B = {comparison['b']}"]
    lines += [f"warning: {w}" for w in comparison["warnings"]]
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compare_markdown(comparison: dict) -> str:
    out = ["# SafeVid evaluation: before / after", "", f"- A (before): `{comparison['a']}`",
           f"- B (after): `{comparison['b']}`", ""]
    out += [f"> warning: {w}" for w in comparison["warnings"]]
    out += ["", "| " + " | ".join(HEADER) + " |", "| --- | --- |" + " ---: |" * 4]
    out += ["| " + " | ".join(_cells(r)) + " |" for r in comparison["rows"]]
    return "\n".join(out) + "\n"


def compare_dirs(a_dir: str | Path, b_dir: str | Path, out_dir: str | Path = ".") -> dict:
    """Compare two `safevid eval` output dirs; writes compare.json and compare.md in out_dir."""
    a = json.loads((Path(a_dir) / "report.json").read_text())
    b = json.loads((Path(b_dir) / "report.json").read_text())
    comparison = compare_reports(a, b, str(a_dir), str(b_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(comparison, indent=2) + "\n")
    (out / "compare.md").write_text(compare_markdown(comparison))
    return comparison


__all__ = ["compare_dirs", "compare_markdown", "compare_reports", "compare_table", "warnings"]
