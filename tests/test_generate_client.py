"""LLMClient against a real HTTP server on 127.0.0.1: results, retries, repair, limits, cache."""

from __future__ import annotations

import asyncio
import time

import pytest
from openai_server import Fault, OpenAIServer

from safevid.llm_client import (
    LLMClient,
    LLMInvalidOutput,
    LLMRefusal,
    LLMRequestError,
    LLMUnavailable,
    RateLimiter,
)

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["safe", "unsafe"]},
                   "notes": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
    "required": ["label", "notes"],
    "additionalProperties": False,
}
FAKE_KEY = "sk-test-CLIENTKEY-7f3a9c"


def ask(text: str) -> list[dict]:
    return [{"role": "system", "content": "You label things."},
            {"role": "user", "content": text}]


def run(server: OpenAIServer, calls, **kwargs):
    """Run `calls(client)` with a fresh client; fast retries so no test waits on backoff."""
    opts = dict(model="test-model", api_key=FAKE_KEY, backoff_base=0.001, backoff_max=0.01,
                timeout=5.0)
    opts.update(kwargs)

    async def go():
        async with LLMClient(server.base_url, **opts) as client:
            return await calls(client), client.stats

    return asyncio.run(go())


@pytest.fixture()
def server():
    with OpenAIServer() as s:
        yield s


def test_schema_result_and_usage(server):
    result, stats = run(server, lambda c: c.chat(ask("a cat"), SCHEMA, temperature=0))
    assert result.content["label"] in {"safe", "unsafe"} and result.content["notes"]
    assert result.usage["prompt_tokens"] > 0 and result.usage["completion_tokens"] > 0
    assert not result.cached and result.model == "test-model"
    assert stats.requests == 1 and stats.prompt_tokens == result.usage["prompt_tokens"]
    assert stats.cost(1.0, 2.0) == pytest.approx(
        (stats.prompt_tokens + 2 * stats.completion_tokens) / 1e6)
    text, _ = run(server, lambda c: c.chat(ask("describe")))
    assert isinstance(text.content, str) and text.content == text.text


def test_retries_every_transient_fault(server):
    for kind in ("429", "500", "drop", "slow"):
        server.add_fault(Fault(kind, retry_after_ms=150, delay=3.0))
    started = time.monotonic()
    result, stats = run(server, lambda c: c.chat(ask("x"), SCHEMA), timeout=1.0)
    assert result.content["label"] in {"safe", "unsafe"}
    assert server.requests == 5 and stats.retries == 4 and stats.requests == 5
    assert server.stats.faults == {"429": 1, "500": 1, "drop": 1, "slow": 1}
    # The slow answer (3 s) is cut off at the client's 1 s timeout, not waited for, and the 429
    # adds the 150 ms it asked for; backoff is ~1 ms a retry.
    elapsed = time.monotonic() - started
    assert 1.15 <= elapsed < 2.5, elapsed


def test_retry_after_is_honoured(server):
    # The 429 asks for 300 ms in retry-after-ms and, rounded up, 1 s in Retry-After: the finer
    # header wins. Sooner means it was ignored (backoff alone is ~1 ms), 1 s or more that the
    # coarse header was used.
    server.add_fault(Fault("429", retry_after_ms=300))
    started = time.monotonic()
    run(server, lambda c: c.chat(ask("x"), SCHEMA))
    elapsed = time.monotonic() - started
    assert server.requests == 2
    assert 0.3 <= elapsed < 0.8, elapsed


def test_gives_up_after_max_retries(server):
    server.add_fault("500", times=None)
    with pytest.raises(LLMUnavailable, match="gave up after 3 attempts") as info:
        run(server, lambda c: c.chat(ask("x"), SCHEMA), max_retries=2)
    assert info.value.retryable and server.requests == 3


def test_malformed_json_gets_one_repair(server):
    server.add_fault("malformed")
    result, stats = run(server, lambda c: c.chat(ask("x"), SCHEMA))
    assert result.content["notes"] and stats.repairs == 1 and server.requests == 2
    server.add_fault("malformed", times=2)
    with pytest.raises(LLMInvalidOutput, match="after a repair request"):
        run(server, lambda c: c.chat(ask("y"), SCHEMA))


def test_schema_mismatch_is_repaired(server):
    server.add_fault("reply", reply={"label": "maybe", "notes": []})
    result, stats = run(server, lambda c: c.chat(ask("x"), SCHEMA))
    assert result.content["label"] in {"safe", "unsafe"} and stats.repairs == 1


def test_refusal_is_not_retried(server):
    server.add_fault("refusal")
    with pytest.raises(LLMRefusal, match="can't help") as info:
        run(server, lambda c: c.chat(ask("x"), SCHEMA))
    assert not info.value.retryable and server.requests == 1


def test_auth_error_is_a_request_error():
    with OpenAIServer(expect_api_key="sk-other") as server:
        with pytest.raises(LLMRequestError, match="HTTP 401"):
            run(server, lambda c: c.chat(ask("x")))
        assert server.requests == 1  # not retried: it would fail the same way


def test_falls_back_to_schema_in_prompt():
    with OpenAIServer(structured_outputs=False) as server:
        async def two(c):
            return [await c.chat(ask("one"), SCHEMA), await c.chat(ask("two"), SCHEMA)]

        results, stats = run(server, two)
        assert all(r.content["label"] in {"safe", "unsafe"} for r in results)
        # One rejected json_schema request, then prompt mode for good.
        assert server.requests == 3 and stats.retries == 0


def test_cache_persists_and_never_holds_the_key(server, tmp_path):
    cache = tmp_path / "cache.sqlite"
    first, _ = run(server, lambda c: c.chat(ask("cached"), SCHEMA, seed=1), cache_path=cache)
    again, stats = run(server, lambda c: c.chat(ask("cached"), SCHEMA, seed=1), cache_path=cache)
    assert server.requests == 1 and again.cached and again.content == first.content
    assert stats.cache_hits == 1 and stats.cached_prompt_tokens == first.usage["prompt_tokens"]
    other, _ = run(server, lambda c: c.chat(ask("cached"), SCHEMA, seed=2), cache_path=cache)
    assert server.requests == 2  # different params, different request
    assert f"Bearer {FAKE_KEY}" in server.stats.auth
    for path in tmp_path.iterdir():
        assert FAKE_KEY.encode() not in path.read_bytes(), path
    assert FAKE_KEY not in repr(LLMClient(server.base_url, "m", api_key=FAKE_KEY))


def test_concurrency_is_bounded():
    with OpenAIServer(latency=0.05) as server:
        async def many(c):
            return await asyncio.gather(*(c.chat(ask(f"q{i}")) for i in range(12)))

        run(server, many, concurrency=3)
        assert server.stats.max_in_flight == 3


def test_rate_limiter_bucket_and_rate():
    # 6000/min: 100 a second, with a one-second bucket of 100 that starts full.
    async def timed():
        limiter = RateLimiter(6000)
        started = time.monotonic()
        for _ in range(100):
            await limiter.acquire()
        burst = time.monotonic() - started
        for _ in range(30):
            await limiter.acquire()
        return burst, time.monotonic() - started

    burst, total = asyncio.run(timed())
    assert burst < 0.1, burst  # the bucket's worth goes at once
    # The 30 beyond the bucket wait for 0.3 s of refill. Sleeping longer than asked refills
    # more for the next one, so only the last sleep's overshoot adds up; 0.5 s leaves room
    # for a busy machine but not for half the rate (0.6 s) or no bucket (1.3 s).
    assert 0.29 <= total < 0.5, total


def test_requests_per_minute_limit(server):
    async def many(c):
        return await asyncio.gather(*(c.chat(ask(f"q{i}")) for i in range(80)))

    started = time.monotonic()
    run(server, many, concurrency=64)  # no limit: what the 80 requests cost by themselves
    free = time.monotonic() - started
    started = time.monotonic()
    run(server, many, rpm=3000, concurrency=64)  # 50/s with a one-second bucket of 50
    limited = time.monotonic() - started
    # The 30 beyond the bucket take 0.6 s; the requests overlap that wait, so the limited run
    # takes at most the wait plus the free run's time (with 0.5 s for a busy machine).
    assert 0.55 <= limited < 0.6 + free + 0.5, (limited, free)
