"""Stage 2 of pair generation: one caption -> safety preference pairs.

For each caption the LLM (1) picks the taxonomy categories the video fits, (2) writes explicit,
implicit and benign queries per category, (3) writes a chosen answer that follows the category's
rule and a rejected answer that shows the failure (unsafe compliance, or a needless refusal for
benign queries), and (4) checks each pair; failing pairs are dropped with the reason.

Failures of the API (unavailable, request refused) make the whole caption a retryable reject, so
a rerun tries it again with every finished call served from the cache. Failures of the model's
output (a refusal, JSON that stays invalid, a failed check) drop just that item, for good.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from safevid.data_prep.generate_io import Outcome, make_reject, read_records, stable_id
from safevid.data_prep.generate_rules import PromptSet, Subcategory, Taxonomy

from safevid.llm_client import LLMClient, LLMError

QUERY_TYPES = ("explicit", "implicit", "benign")
CHECKS = ("chosen_safe", "chosen_helpful", "chosen_grounded", "rejected_worse",
          "rejected_non_actionable")


@dataclass
class PairSettings:
    max_categories: int = 3
    queries: dict[str, int] = field(
        default_factory=lambda: {"explicit": 1, "implicit": 1, "benign": 1})
    models: dict[str, str] = field(default_factory=dict)  # stage -> model; default: client's
    params: dict = field(default_factory=dict)  # extra API parameters for every call


def _object(properties: dict) -> dict:
    # Strict structured outputs want every property required and no others allowed.
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def categories_schema(paths: list[str], most: int) -> dict:
    item = _object({"category": {"type": "string", "enum": paths},
                    "evidence": {"type": "string"}})
    return _object({"categories": {"type": "array", "items": item, "maxItems": most}})


def queries_schema(counts: dict[str, int]) -> dict:
    return _object({t: {"type": "array", "items": {"type": "string"}, "minItems": n,
                        "maxItems": n} for t, n in counts.items() if n > 0})


ANSWER_SCHEMA = _object({"answer": {"type": "string"}})
VERIFY_SCHEMA = _object({**{c: {"type": "boolean"} for c in CHECKS},
                         "reason": {"type": "string"}})


@dataclass
class Candidate:
    leaf: Subcategory
    query_type: str
    query: str


class RetryLater(Exception):
    """An API failure inside a caption: the caption is rejected as retryable."""

    def __init__(self, stage: str, error: LLMError) -> None:
        super().__init__(f"{stage}: {type(error).__name__}: {error}")
        self.stage = stage


class PairGenerator:
    """Turns one caption record into its verified pairs (or a reject)."""

    def __init__(self, client: LLMClient, taxonomy: Taxonomy, prompts: PromptSet,
                 settings: PairSettings) -> None:
        self.client, self.tax, self.prompts, self.s = client, taxonomy, prompts, settings
        self.system = prompts.render("system", principles=taxonomy.principles_text())
        self.cat_schema = categories_schema(list(taxonomy.leaves), settings.max_categories)
        self.q_schema = queries_schema(settings.queries)
        self.template_sha = prompts.sha_of("system", "categorize", "queries", "chosen",
                                           "rejected", "verify")

    def model(self, stage: str) -> str:
        return self.s.models.get(stage) or self.client.model

    async def _ask(self, stage: str, template: str, schema: dict, **values: object) -> dict:
        messages = [{"role": "system", "content": self.system},
                    {"role": "user", "content": self.prompts.render(template, **values)}]
        try:
            result = await self.client.chat(messages, schema, schema_name=stage,
                                            model=self.model(stage), **self.s.params)
        except LLMError as exc:
            if exc.retryable:
                raise RetryLater(stage, exc) from exc
            raise
        return result.content

    async def __call__(self, key: str, item: object) -> Outcome:
        if isinstance(item, Outcome):  # an input line rejected while reading
            return item
        caption, source = item
        text = caption["caption"]
        drops: list[dict] = []
        try:
            try:
                found = await self._ask("categorize", "categorize", self.cat_schema,
                                        description=text, taxonomy=self.tax.listing(),
                                        max_categories=self.s.max_categories)
            except LLMError as exc:
                return Outcome(key, reject=make_reject(
                    key, source, "categorize", f"{type(exc).__name__}: {exc}"))
            paths = list(dict.fromkeys(c["category"] for c in found["categories"]
                                       if c["category"] in self.tax.leaves))
            paths = paths[: self.s.max_categories]
            if not paths:
                return Outcome(key, reject=make_reject(
                    key, source, "categorize", "no taxonomy category fits the description"))
            candidates = await self._candidates(key, source, text, paths, drops)
            results = await asyncio.gather(
                *(self._pair(key, source, caption, c) for c in candidates),
                return_exceptions=True)
        except RetryLater as exc:
            return Outcome(key, reject=make_reject(key, source, exc.stage, str(exc),
                                                   retryable=True))
        pairs = []
        for result in results:
            if isinstance(result, RetryLater):
                return Outcome(key, reject=make_reject(key, source, result.stage, str(result),
                                                       retryable=True))
            if isinstance(result, BaseException):
                raise result
            (drops if result.get("level") == "item" else pairs).append(result)
        if not pairs:
            return Outcome(key, drops=drops, reject=make_reject(
                key, source, "verify", f"no pair survived ({len(drops)} dropped)"))
        order = {t: i for i, t in enumerate(QUERY_TYPES)}
        pairs.sort(key=lambda p: (p["category"], order[p["query_type"]], p["prompt"]))
        for pair in pairs:
            pair["provenance"]["caption_pairs"] = len(pairs)
        return Outcome(key, records=pairs, drops=drops)

    async def _candidates(self, key: str, source: str, text: str, paths: list[str],
                          drops: list[dict]) -> list[Candidate]:
        leaves = [self.tax.leaves[p] for p in paths]
        results = await asyncio.gather(*(self._ask(
            "queries", "queries", self.q_schema, description=text, category=leaf.path,
            category_description=leaf.description, rule=leaf.rule,
            **{f"n_{t}": self.s.queries.get(t, 0) for t in QUERY_TYPES}) for leaf in leaves),
            return_exceptions=True)
        candidates, seen = [], set()
        for leaf, result in zip(leaves, results, strict=True):
            if isinstance(result, RetryLater):
                raise result
            if isinstance(result, LLMError):
                drops.append(make_reject(key, source, "queries", f"{type(result).__name__}: "
                                         f"{result}", level="item", item=leaf.path,
                                         category=leaf.path))
                continue
            if isinstance(result, BaseException):
                raise result
            for query_type in QUERY_TYPES:
                for query in result.get(query_type, [])[: self.s.queries.get(query_type, 0)]:
                    query = " ".join(query.split())
                    if query and query.lower() not in seen:
                        seen.add(query.lower())
                        candidates.append(Candidate(leaf, query_type, query))
        return candidates

    async def _pair(self, key: str, source: str, caption: dict, cand: Candidate) -> dict:
        """A finished pair record, or an item-level reject saying why there is none."""
        pair_id = stable_id(key, cand.query, prefix="pair-")
        values = dict(description=caption["caption"], category=cand.leaf.path,
                      rule=cand.leaf.rule, query_type=cand.query_type, query=cand.query)

        def drop(stage: str, reason: str, **detail: object) -> dict:
            return make_reject(key, source, stage, reason, level="item", item=pair_id,
                               category=cand.leaf.path, query_type=cand.query_type,
                               prompt=cand.query, **detail)

        answers = await asyncio.gather(
            self._ask("chosen", "chosen", ANSWER_SCHEMA, **values),
            self._ask("rejected", "rejected", ANSWER_SCHEMA, **values),
            return_exceptions=True)
        for stage, answer in zip(("chosen", "rejected"), answers, strict=True):
            if isinstance(answer, RetryLater) or not isinstance(answer, (dict, LLMError)):
                raise answer
            if isinstance(answer, LLMError):
                return drop(stage, f"{type(answer).__name__}: {answer}")
        chosen = answers[0]["answer"].strip()
        rejected = answers[1]["answer"].strip()
        if not chosen or not rejected or chosen == rejected:
            return drop("answers", "empty or identical chosen and rejected answers",
                        chosen=chosen, rejected=rejected)
        try:
            verdict = await self._ask("verify", "verify", VERIFY_SCHEMA, chosen=chosen,
                                      rejected=rejected, **values)
        except LLMError as exc:
            return drop("verify", f"{type(exc).__name__}: {exc}", chosen=chosen,
                        rejected=rejected)
        failed = [c for c in CHECKS if verdict.get(c) is not True]
        if failed:
            return drop("verify", f"failed {', '.join(failed)}: {verdict.get('reason', '')}",
                        chosen=chosen, rejected=rejected)
        record = {
            "id": pair_id,
            "video_id": caption["video_id"],
            **({"video": caption["video"]} if caption.get("video") else {}),
            "prompt": cand.query,
            "chosen": chosen,
            "rejected": rejected,
            "category": cand.leaf.path,
            "query_type": cand.query_type,
            "provenance": {
                "caption_id": key,
                "caption_pairs": 0,  # set once the caption's pairs are all known
                "caption_model": (caption.get("provenance") or {}).get("model"),
                "models": {stage: self.model(stage) for stage in
                           ("categorize", "queries", "chosen", "rejected", "verify")},
                "prompt_template_sha": self.template_sha,
                "prompts": self.prompts.source,
                "taxonomy": self.tax.label,
                "taxonomy_sha": self.tax.sha,
                "verification": {c: verdict[c] for c in CHECKS} | {
                    "reason": verdict.get("reason", "")},
            },
        }
        return record


def read_captions(path: Path) -> Iterator[tuple[str, object]]:
    """(key, (caption, source)) per usable caption line; (key, Outcome) for a rejected line."""
    seen: dict[str, int] = {}
    for number, record, _ in read_records(path):
        source = f"{path}:{number}"
        problem = None
        if record is None:
            problem = "not a JSON object (torn or invalid line)"
        elif not str(record.get("caption") or "").strip():
            problem = "no caption"
        elif not (record.get("id") or record.get("video_id")):
            problem = "no id or video_id"
        else:
            key = str(record.get("id") or record["video_id"])
            if key in seen:
                problem = f"duplicate caption id {key!r} (first at line {seen[key]})"
        if problem:
            yield source, Outcome(source, reject=make_reject(
                source, source, "read", f"{source}: {problem}"))
            continue
        seen[key] = number
        record.setdefault("video_id", key)
        yield key, (record, source)


__all__ = ["PairGenerator", "PairSettings", "QUERY_TYPES", "read_captions"]
