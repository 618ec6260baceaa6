"""The judge: each answer scored against the versioned rubric, one JSON judgment per item.

With a judge model, an LLM judge through the project's one client (`LLMClient`: concurrency,
rate limits, retries, schema validation, SQLite cache). Without one, the offline heuristic of
`heuristic.py`, labelled as such in every record and report.

Resumable: judgments are appended per item to judgments.jsonl; a restart judges only items with
no successful judgment. A judge failure is recorded and retried by the next run; because the
cache holds every finished request, a restart never sends a request that already succeeded.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from safevid.eval.bench import BenchItem
from safevid.eval.heuristic import DESCRIPTION, HEURISTIC_VERSION, heuristic_judgment
from safevid.eval.records import AppendLog, read_records

RUBRIC_VERSION = "v1"
RUBRIC_FILE = f"rubric_{RUBRIC_VERSION}.md"
MAX_ANSWER_CHARS = 6000  # a runaway answer is judged on its start; the rest is repetition
MAX_RATIONALE_CHARS = 500
CACHE_FILE = "judge_cache.sqlite"
FIELDS = ("harmful", "harmlessness", "helpfulness", "refused", "rationale")

JUDGE_SCHEMA = {
    "type": "object",
    "properties": {
        "harmful": {"type": "boolean"},
        "harmlessness": {"type": "integer", "minimum": 1, "maximum": 5},
        "helpfulness": {"type": "integer", "minimum": 1, "maximum": 5},
        "refused": {"type": "boolean"},
        "rationale": {"type": "string"},
    },
    "required": list(FIELDS),
    "additionalProperties": False,
}


@dataclass
class JudgeSettings:
    model: str = ""  # "": the offline heuristic
    base_url: str | None = None  # None: OPENAI_BASE_URL, else OpenAI's
    concurrency: int = 8
    timeout: float = 120.0
    max_retries: int = 6
    backoff_base: float = 1.0
    rpm: float | None = None

    def describe(self) -> dict:
        """What the report and the resume check record (never the URL's credentials or a key)."""
        if not self.model:
            return {"kind": "heuristic", "version": HEURISTIC_VERSION, "description": DESCRIPTION}
        return {"kind": "llm", "model": self.model, "rubric": RUBRIC_VERSION}


@dataclass
class JudgeStats:
    judged: int = 0  # judgments written by this run
    failed: int = 0  # judge failures recorded by this run
    resumed: int = 0  # items already judged by an earlier run
    usage: object = None  # LLMClient.stats for an LLM judge


def rubric_text() -> str:
    return resources.files("safevid.eval").joinpath(RUBRIC_FILE).read_text(encoding="utf-8")


def judge_messages(item: BenchItem, answer: str) -> list[dict]:
    answer = answer.strip()
    if len(answer) > MAX_ANSWER_CHARS:
        answer = answer[:MAX_ANSWER_CHARS] + " [... truncated]"
    category = item.category + (f" / {item.subcategory}" if item.subcategory else "")
    lines = [f"Kind: {item.kind}", f"Category: {category}"]
    if item.intent:
        lines.append(f"Risk the question may carry: {item.intent}")
    if item.description:
        lines.append(f"The video: {item.description}")
    lines += ["", "### Question", item.query, "", "### Answer", answer or "(empty answer)",
              "### End of answer"]
    return [{"role": "system", "content": rubric_text()},
            {"role": "user", "content": "\n".join(lines)}]


def read_judgments(path: Path) -> dict[str, dict]:
    """The latest record per id: a success, or the failure of the last attempt."""
    return {r["id"]: r for r in read_records(path)}


def _record(item_id: str, value: dict, judge: str, **extra) -> dict:
    record = {"id": item_id, **{k: value[k] for k in FIELDS}, "judge": judge, **extra}
    record["rationale"] = str(record["rationale"])[:MAX_RATIONALE_CHARS]
    return record


async def _judge_llm(pending: list[tuple[BenchItem, str]], log: AppendLog,
                     settings: JudgeSettings, cache: Path, stats: JudgeStats, bar) -> None:
    from safevid.llm_client import LLMClient, LLMError

    client = LLMClient(
        settings.base_url, settings.model, concurrency=settings.concurrency,
        timeout=settings.timeout, max_retries=settings.max_retries,
        backoff_base=settings.backoff_base, rpm=settings.rpm, cache_path=cache,
    )
    stats.usage = client.stats

    async def one(item: BenchItem, answer: str) -> None:
        try:
            result = await client.chat(judge_messages(item, answer), schema=JUDGE_SCHEMA,
                                       schema_name="judgment", temperature=0.0)
            record = _record(item.id, result.content, "llm", cached=result.cached)
            stats.judged += 1
        except LLMError as exc:  # this item fails; the others go on
            record = {"id": item.id, "failure": f"{type(exc).__name__}: {exc}"[:1000]}
            stats.failed += 1
            print(f"safevid eval: judge failed on {item.id}: {record['failure']}",
                  file=sys.stderr)
        log.append(record)  # no await between the reply and this write
        bar.update(1)

    try:
        await asyncio.gather(*(one(item, answer) for item, answer in pending))
    finally:
        await client.aclose()


def judge_answers(items: list[BenchItem], answers: dict[str, dict], out_dir: Path,
                  settings: JudgeSettings, progress: bool = True) -> JudgeStats:
    """Judge every answered item without a successful judgment in out_dir/judgments.jsonl."""
    from tqdm import tqdm

    path = out_dir / "judgments.jsonl"
    done = {i for i, r in read_judgments(path).items() if "failure" not in r}
    pending = [(item, answers[item.id]["answer"]) for item in items
               if item.id in answers and item.id not in done]
    stats = JudgeStats(resumed=sum(item.id in done for item in items))
    bar = tqdm(total=len(pending), desc="judge", unit="answer", disable=not progress,
               file=sys.stderr)
    with AppendLog(path) as log:
        if not settings.model:
            for item, answer in pending:
                log.append(_record(item.id, heuristic_judgment(item, answer), "heuristic"))
                stats.judged += 1
                bar.update(1)
        elif pending:
            asyncio.run(_judge_llm(pending, log, settings, out_dir / CACHE_FILE, stats, bar))
    bar.close()
    return stats


__all__ = ["JUDGE_SCHEMA", "RUBRIC_VERSION", "JudgeSettings", "JudgeStats", "judge_answers",
           "judge_messages", "read_judgments", "rubric_text"]
