"""The one client for every LLM call in SafeVid: captioning, pair generation, the judge.

It speaks the OpenAI chat-completions protocol through `openai.AsyncOpenAI`, so it works with
OpenAI and with any compatible server (vLLM, SGLang, llama.cpp, ...). On top of the SDK it adds
what a long batch job needs:

- bounded concurrency, and requests- and tokens-per-minute limits;
- retries with exponential backoff and jitter on 429 (honouring Retry-After), 5xx, timeouts,
  connection errors and malformed responses (a body cut short, not JSON, or not the shape of a
  chat completion);
- JSON results validated against a JSON schema: structured outputs (`response_format`
  json_schema) where the server supports them, otherwise the schema in the prompt; either way
  the reply is parsed and validated, with one repair request when it does not match;
- a persistent SQLite cache keyed by the full logical request (model, messages, schema, params;
  never the API key or the base URL), so a rerun never pays twice for the same call;
- token accounting and an estimated cost.

    client = LLMClient(base_url, "gpt-4o-mini", cache_path="llm_cache.sqlite")
    result = await client.chat(messages, schema=SCHEMA, temperature=0)
    result.content  # the validated JSON object (the text when no schema was given)
    result.usage    # {"prompt_tokens": ..., "completion_tokens": ...}
    await client.aclose()

The API key comes from the argument or `OPENAI_API_KEY`; it lives only inside the SDK client and
is never logged, cached or written.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import time
from dataclasses import asdict, dataclass, fields
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import jsonschema
import openai

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the cached result layout changes
RETRY_STATUSES = {408, 409, 429}  # plus every 5xx
MAX_RETRY_AFTER_S = 600.0  # a server asking for longer is waited on for at most this
IMAGE_TOKENS = {"low": 85, "high": 765, "auto": 765}  # rough per-image prompt tokens, for TPM
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class LLMError(RuntimeError):
    """A chat call that produced no usable result. `retryable`: a later run may well succeed."""

    retryable = False


class LLMUnavailable(LLMError):
    """Retries exhausted on rate limits, server errors, timeouts or connection errors."""

    retryable = True


class LLMMalformedResponse(LLMUnavailable):
    """Retries exhausted, the last response unreadable: an HTTP 200 whose body was cut short,
    is not JSON, or is not a chat completion (no `choices`, a field of the wrong type).

    Retryable like a 5xx: a proxy or server fault, not a verdict on the input.
    """


class LLMRequestError(LLMError):
    """The server refused the request itself (a 4xx other than 408/409/429).

    Retryable: this is usually a setting to fix (a wrong model name or key, a parameter the
    model does not take) rather than something wrong with the input, so work must not be
    written off because of it.
    """

    retryable = True


class LLMRefusal(LLMError):
    """The model declined to answer (the `refusal` field, or no content at all)."""


class LLMInvalidOutput(LLMError):
    """The reply was not JSON matching the schema, even after one repair request."""


@dataclass
class ChatResult:
    content: Any  # the validated JSON value with a schema, else the text
    text: str  # the raw reply text
    usage: dict[str, int]  # prompt_tokens, completion_tokens (of every request behind it)
    model: str  # the model the server reported
    finish_reason: str | None = None
    cached: bool = False


@dataclass
class UsageStats:
    """Counters for a run; tokens of cache hits are kept apart (they cost nothing this time)."""

    calls: int = 0  # chat() calls
    cache_hits: int = 0
    requests: int = 0  # HTTP requests sent (retries and repairs included)
    retries: int = 0
    repairs: int = 0
    malformed: int = 0  # responses that could not be read (retried like a 5xx)
    failures: int = 0  # chat() calls that raised LLMError
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0

    def cost(self, price_input: float, price_output: float) -> float:
        """Estimated spend in the price unit, from prices per 1M prompt / completion tokens."""
        return (self.prompt_tokens * price_input + self.completion_tokens * price_output) / 1e6

    def add(self, other: UsageStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def summary_rows(self, price_input: float = 0.0, price_output: float = 0.0) -> list[tuple]:
        saved = (self.cached_prompt_tokens * price_input
                 + self.cached_completion_tokens * price_output)
        return [
            ("LLM calls", self.calls),
            ("  served from cache", self.cache_hits),
            ("  HTTP requests", self.requests),
            ("  retries / repairs", f"{self.retries} / {self.repairs}"),
            ("  malformed responses", self.malformed),
            ("  failed", self.failures),
            ("tokens prompt / completion", f"{self.prompt_tokens:,} / {self.completion_tokens:,}"),
            ("est. cost (USD)", f"{self.cost(price_input, price_output):.4f}"),
            ("  saved by cache (USD)", f"{saved / 1e6:.4f}"),
        ]


class RateLimiter:
    """Token bucket refilled at `per_minute / 60` per second, holding one second's worth.

    A one-second bucket keeps the rate smooth: providers enforce per-minute limits in shorter
    windows, so a minute's worth sent at once can trip them. A request larger than the bucket
    waits for a full bucket and leaves it in debt, which keeps the long-run rate right.
    """

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def acquire(self, amount: float = 1.0) -> None:
        async with self.lock:  # one waiter at a time: first come, first served
            need = min(amount, self.capacity)
            self._refill()
            while self.level < need:
                await asyncio.sleep((need - self.level) / self.rate)
                self._refill()
            self.level -= amount

    def adjust(self, amount: float) -> None:
        """Charge (or, negative, refund) the difference between an estimate and the real use."""
        self._refill()
        self.level = min(self.capacity, self.level - amount)


class ResponseCache:
    """Finished chat results on disk, keyed by a hash of the logical request.

    Each result is committed as it arrives (autocommit, WAL), so a process killed right after
    a call has still paid for it only once.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS responses ("
            "key TEXT PRIMARY KEY, model TEXT, result TEXT NOT NULL, created REAL)"
        )

    def get(self, key: str) -> dict | None:
        row = self.db.execute("SELECT result FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, model: str, result: dict) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
            (key, model, json.dumps(result, ensure_ascii=False), time.time()),
        )

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self.db.close()


def request_key(model: str, messages: list[dict], schema: dict | None, params: dict,
                schema_name: str = "result") -> str:
    """Cache key of a logical request. The transport (URL, key, structured-output mode) is left
    out on purpose: the same request to another replica of the same model is the same work."""
    blob = json.dumps(
        {"v": CACHE_FORMAT, "model": model, "messages": messages, "schema": schema,
         "schema_name": schema_name if schema is not None else None, "params": params},
        sort_keys=True, ensure_ascii=False, separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def parse_json(text: str) -> Any:
    """The JSON value in a reply, tolerating a code fence or prose around one object."""
    body = text.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0]
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        start, end = body.find("{"), body.rfind("}")
        if start < 0 or end <= start:
            raise
        return json.loads(body[start : end + 1])


def _valid_unicode(value: Any) -> Any:
    """`value` with every lone UTF-16 surrogate in its strings replaced by U+FFFD.

    JSON carries them as escapes (`\\ud800`: a model's broken byte-level output, a caption file
    written elsewhere), but no UTF-8 request body, cache row or output line can hold them, so
    one such character would otherwise fail wherever the text is written next.
    """
    if isinstance(value, str):
        return LONE_SURROGATE.sub("\ufffd", value) if LONE_SURROGATE.search(value) else value
    if isinstance(value, list):
        return [_valid_unicode(v) for v in value]
    if isinstance(value, dict):
        return {_valid_unicode(k): _valid_unicode(v) for k, v in value.items()}
    return value


class _BadResponse(Exception):
    """A response that cannot be read as a chat completion; the message names the fault."""


def _read_completion(body: bytes, content_type: str = "application/json") -> dict:
    """The parts of a chat-completion response body that the client uses, checked.

    Returns `content`, `refusal`, `finish` (strings or None), `model` (a string or None) and
    `prompt_tokens`, `completion_tokens`. Raises `_BadResponse` for a body that is empty, not
    UTF-8 JSON, or not shaped like a chat completion. Fields the client does not use are not
    checked, so servers that leave out `id` or `created` still work; token counts that are
    missing or not counts read as 0 (they feed only the counters and the TPM budget).
    """
    kind = content_type or "no content-type"
    if not body.strip():
        raise _BadResponse(f"empty body ({kind})")
    try:
        data = json.loads(body)
    except UnicodeDecodeError as exc:
        raise _BadResponse(f"body is not UTF-8 ({exc.reason} at byte {exc.start}; {kind})") from exc
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past Python's limit
        raise _BadResponse(f"body is not JSON ({exc}; {kind}, {len(body)} bytes): "
                          f"{body[:120]!r}") from exc
    if not isinstance(data, dict):
        raise _BadResponse(f"body is {_json_kind(data)}, not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        if data.get("error"):  # some servers and proxies answer 200 with an error object
            raise _BadResponse(f"an error object instead of a completion: {data['error']!r:.300}")
        what = "no `choices`" if choices is None else f"`choices` is {choices!r:.60}"
        raise _BadResponse(f"{what} in the completion")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise _BadResponse(f"`choices[0]` has no message object: {choice!r:.100}")
    found = {"content": message.get("content"), "refusal": message.get("refusal"),
             "finish": choice.get("finish_reason")}
    for name, value in found.items():
        if value is not None and not isinstance(value, str):
            raise _BadResponse(f"`{name}` is {_json_kind(value)}, not a string")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    tokens = {name: usage.get(name) for name in ("prompt_tokens", "completion_tokens")}
    tokens = {k: v if type(v) is int and v >= 0 else 0 for k, v in tokens.items()}  # not bools
    model = data.get("model")
    found["model"] = model if isinstance(model, str) else None
    return {**_valid_unicode(found), **tokens}


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds a 429/503 asks us to wait: retry-after-ms, then Retry-After (seconds or a date)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return float(value) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def estimate_tokens(messages: list[dict], params: dict) -> int:
    """A cheap upper-ish estimate of a request's tokens, for the tokens-per-minute budget."""
    chars, images = 0, 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    chars += len(part.get("text", ""))
                elif part.get("type") == "image_url":
                    detail = (part.get("image_url") or {}).get("detail", "auto")
                    images += IMAGE_TOKENS.get(detail, 765)
    completion = params.get("max_completion_tokens") or params.get("max_tokens") or 512
    return chars // 4 + images + int(completion)


class LLMClient:
    """Async chat client with limits, retries, schema-validated JSON and a persistent cache.

    Args:
        base_url: the API root (e.g. `http://host:8000/v1`); None: `OPENAI_BASE_URL` or OpenAI.
        model: the default model; `chat(model=...)` overrides it per call.
        api_key: None reads `OPENAI_API_KEY`; servers without auth get a placeholder.
        concurrency: most requests in flight at once.
        rpm, tpm: requests and tokens per minute (None: unlimited).
        timeout: seconds per HTTP request before it counts as failed and is retried.
        max_retries: retries after the first attempt of one request.
        backoff_base, backoff_max: retry n waits about base * 2**n seconds, capped, with jitter.
        cache_path: SQLite file of finished results; None disables the cache.
        structured_outputs: "auto" tries response_format json_schema and falls back to the
            schema in the prompt when the server rejects it; True / False force one or the other.

    Errors: whatever the server does (refuses, fails, times out, drops the connection, sends a
    body cut short or of the wrong shape or with broken text), `chat` either returns a result or
    raises an `LLMError` subclass whose message names the fault, never another exception, so
    one bad response costs a batch job that one item and nothing more. Transient faults are
    retried with backoff first: 429, 408, 409, 5xx, timeouts, connection errors and malformed
    responses (`LLMUnavailable`, `LLMMalformedResponse` when the last one was malformed); a
    refused request is not (`LLMRequestError`). A failed call is never cached. Lone surrogates
    in any text, which no UTF-8 file can hold, are replaced by U+FFFD in both directions.
    Exceptions from the caller's own arguments (a parameter that is not JSON) are not wrapped.
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str = "",
        api_key: str | None = None,
        *,
        concurrency: int = 16,
        rpm: float | None = None,
        tpm: float | None = None,
        timeout: float = 120.0,
        max_retries: int = 8,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        cache_path: str | Path | None = None,
        structured_outputs: bool | str = "auto",
    ) -> None:
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.model = model
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.structured = structured_outputs
        self.stats = UsageStats()
        self.cache = ResponseCache(cache_path) if cache_path else None
        self._sem = asyncio.Semaphore(concurrency)
        self._rpm = RateLimiter(rpm) if rpm else None
        self._tpm = RateLimiter(tpm) if tpm else None
        self._pause_until = 0.0  # shared back-off after a 429: the whole client waits
        self._validators: dict[str, jsonschema.protocols.Validator] = {}
        # The SDK's own retries are off: this client retries with its own limits and counters.
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
            timeout=timeout,
            max_retries=0,
        )

    def __repr__(self) -> str:  # never shows the key
        return f"LLMClient(base_url={self.base_url!r}, model={self.model!r})"

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.close()
        if self.cache is not None:
            self.cache.close()

    # ---- the public call ---------------------------------------------------------------------
    async def chat(
        self,
        messages: list[dict],
        schema: dict | None = None,
        *,
        schema_name: str = "result",
        model: str | None = None,
        **params: Any,
    ) -> ChatResult:
        """One chat completion: the validated JSON value when `schema` is given, else the text.

        `params` are passed to the API (temperature, max_tokens, seed, ...) and are part of the
        cache key. Raises an `LLMError` subclass when no usable result can be had.
        """
        model = model or self.model
        self.stats.calls += 1
        messages = _valid_unicode(messages)  # else the request cannot even be encoded
        key = (request_key(model, messages, schema, params, schema_name)
               if self.cache is not None else "")
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.cache_hits += 1
                self.stats.cached_prompt_tokens += hit["usage"].get("prompt_tokens", 0)
                self.stats.cached_completion_tokens += hit["usage"].get("completion_tokens", 0)
                return ChatResult(**hit, cached=True)
        try:
            async with self._sem:
                result = await self._complete(model, messages, schema, schema_name, params)
        except LLMError:
            self.stats.failures += 1
            raise
        if self.cache is not None:
            record = asdict(result)
            record.pop("cached")
            self.cache.put(key, model, record)
        return result

    # ---- internals ---------------------------------------------------------------------------
    async def _complete(
        self, model: str, messages: list[dict], schema: dict | None, name: str, params: dict
    ) -> ChatResult:
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        reply = await self._send(model, messages, schema, name, params, usage)
        if schema is None:
            return ChatResult(reply["text"], reply["text"], usage, reply["model"], reply["finish"])
        value, problem = self._validate(reply["text"], schema)
        if problem is not None:
            # One repair round: show the model its reply and what is wrong with it.
            self.stats.repairs += 1
            repair = [
                *messages,
                {"role": "assistant", "content": reply["text"]},
                {"role": "user", "content": (
                    f"That reply is not valid: {problem}. Reply again with only the corrected "
                    "JSON object, matching the required schema exactly.")},
            ]
            reply = await self._send(model, repair, schema, name, params, usage)
            value, problem = self._validate(reply["text"], schema)
            if problem is not None:
                raise LLMInvalidOutput(f"{model}: reply is not valid {name} JSON after a "
                                       f"repair request: {problem}")
        return ChatResult(value, reply["text"], usage, reply["model"], reply["finish"])

    def _validate(self, text: str, schema: dict) -> tuple[Any, str | None]:
        try:
            value = _valid_unicode(parse_json(text))  # escapes in the text can hold surrogates
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            return None, f"not JSON ({exc.__class__.__name__}: {exc})"
        digest = hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()
        validator = self._validators.get(digest)
        if validator is None:
            validator = self._validators[digest] = jsonschema.Draft202012Validator(schema)
        try:
            error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        except RecursionError:  # a reply nested deeper than the validator can walk
            return None, "schema mismatch: the JSON is nested too deeply to check"
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "top level"
            return None, f"schema mismatch at {where}: {error.message[:300]}"
        return value, None

    def _request_args(self, messages: list[dict], schema: dict | None, name: str) -> dict:
        if schema is None:
            return {"messages": messages}
        if self.structured is not False:
            return {"messages": messages, "response_format": {
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": True}}}
        # Prompt mode: the schema goes at the end of the last user message, where every
        # instruction-tuned model pays attention to it.
        instruction = ("\n\nReply with only a JSON object, no prose and no code fence, that "
                       "matches this JSON schema:\n```json\n"
                       + json.dumps({"title": name, **schema}) + "\n```")
        messages = [dict(m) for m in messages]
        last = next(i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user")
        content = messages[last]["content"]
        if isinstance(content, str):
            messages[last]["content"] = content + instruction
        else:
            messages[last]["content"] = [*content, {"type": "text", "text": instruction}]
        return {"messages": messages}

    async def _send(
        self, model: str, messages: list[dict], schema: dict | None, name: str, params: dict,
        usage: dict[str, int],
    ) -> dict:
        """One request with retries; returns text, model and finish reason, adds to `usage`."""
        estimate = estimate_tokens(messages, params)
        last_error, malformed, attempt = "", False, 0
        while True:
            await self._wait_turn(estimate)
            self.stats.requests += 1
            retry_after, malformed = None, False
            try:
                args = self._request_args(messages, schema, name)
                # The raw response, read here rather than by the SDK: its parser lets a body cut
                # short escape as json.JSONDecodeError and hands back a non-JSON page as a str,
                # while a malformed response is a transient fault to retry like a 5xx.
                raw = await self._client.chat.completions.with_raw_response.create(
                    model=model, **args, **params)
                http = raw.http_response
                return self._read(model, _read_completion(
                    http.content, http.headers.get("content-type", "")), estimate, usage)
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status in (400, 422) and "response_format" in args and self._falls_back(exc):
                    continue  # not a failed attempt: the next try sends the schema in the prompt
                if status not in RETRY_STATUSES and status < 500:
                    raise LLMRequestError(f"{model}: HTTP {status}: {_error_message(exc)}") from exc
                retry_after = retry_after_seconds(exc.response.headers)
                last_error = f"HTTP {status}: {_error_message(exc)}"
                if status == 429:
                    wait = min(retry_after if retry_after is not None else 0.0,
                               MAX_RETRY_AFTER_S)
                    self._pause_until = max(self._pause_until, time.monotonic() + wait)
            except openai.APIConnectionError as exc:  # timeouts included
                last_error = _describe(exc)
            except (_BadResponse, openai.APIResponseValidationError) as exc:
                malformed = True
                self.stats.malformed += 1
                last_error = f"malformed response: {exc}" if isinstance(
                    exc, _BadResponse) else _describe(exc)
            except openai.OpenAIError as exc:
                # Anything else the SDK raises is about its own set-up, not this response:
                # another try would fail the same way.
                raise LLMRequestError(f"{model}: {_describe(exc)}") from exc
            if attempt >= self.max_retries:
                break
            self.stats.retries += 1
            delay = self._backoff(attempt, retry_after)
            attempt += 1
            log.debug("%s: %s; retry %d in %.2fs", model, last_error, attempt, delay)
            await asyncio.sleep(delay)
        error = LLMMalformedResponse if malformed else LLMUnavailable
        raise error(f"{model}: gave up after {self.max_retries + 1} attempts; "
                    f"last error: {last_error}")

    def _read(self, model: str, reply: dict, estimate: int, usage: dict[str, int]) -> dict:
        """Count the tokens of a checked reply (`_read_completion`); refusals raise here."""
        prompt, completion = reply["prompt_tokens"], reply["completion_tokens"]
        usage["prompt_tokens"] += prompt
        usage["completion_tokens"] += completion
        self.stats.prompt_tokens += prompt
        self.stats.completion_tokens += completion
        if self._tpm is not None and prompt + completion:
            self._tpm.adjust(prompt + completion - estimate)
        if reply["refusal"]:
            raise LLMRefusal(f"{model}: refused: {reply['refusal'][:300]}")
        if reply["finish"] == "content_filter" or not (reply["content"] or "").strip():
            raise LLMRefusal(f"{model}: no content (finish_reason={reply['finish']})")
        return {"text": reply["content"], "model": reply["model"] or model,
                "finish": reply["finish"]}

    def _falls_back(self, exc: openai.APIStatusError) -> bool:
        """Switch to prompt mode when an "auto" server rejects response_format.

        Requests already in flight in structured mode get the same error; they retry in prompt
        mode too (the switch has happened) instead of failing.
        """
        if self.structured is True:
            return False
        message = _error_message(exc).lower()
        if not any(w in message for w in ("response_format", "json_schema", "structured")):
            return False
        if self.structured == "auto":
            log.warning("server does not accept response_format json_schema (%s); sending the "
                        "schema in the prompt from now on", _error_message(exc)[:200])
            self.structured = False
        return True

    async def _wait_turn(self, estimate: int) -> None:
        pause = self._pause_until - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
        if self._rpm is not None:
            await self._rpm.acquire(1)
        if self._tpm is not None:
            await self._tpm.acquire(estimate)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2**attempt)
        # "Equal jitter": at least half the step, so that clients failing together spread out.
        delay = delay / 2 + random.uniform(0, delay / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        return delay


def _describe(exc: BaseException) -> str:
    """The error and what caused it: the SDK's "Connection error." alone does not say which."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    return f"{text} ({type(cause).__name__}: {cause})" if cause is not None else text


def _error_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if body.get("message"):
            return str(body["message"])
    return str(exc.message)


__all__ = [
    "ChatResult",
    "LLMClient",
    "LLMError",
    "LLMInvalidOutput",
    "LLMMalformedResponse",
    "LLMRefusal",
    "LLMRequestError",
    "LLMUnavailable",
    "RateLimiter",
    "ResponseCache",
    "UsageStats",
    "parse_json",
    "request_key",
]
