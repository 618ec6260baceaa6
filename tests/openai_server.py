"""A deterministic OpenAI-compatible chat-completions server for tests and benchmarks.

It answers `POST /v1/chat/completions` from the request alone, so a rerun gets the same answer:
with a JSON schema (`response_format` json_schema, or, when the client asks in the prompt, the
first fenced ```json block of the messages) it returns an instance of that schema built from a
hash of the request; without one it returns a short plain-text description. Faults are injected
on command, either in the constructor or later (`add_fault`, or `POST /control/faults` when the
server runs as its own process), and every request is counted, so a test can assert that a rerun
sent none.

Fault kinds: "429" (with Retry-After), "500", "slow" (answers after `delay` seconds), "malformed"
(content that is not JSON), "refusal" (the `refusal` field instead of content), "drop" (closes the
connection without answering), "reply" (a fixed `reply` object as the content). A fault applies
to requests whose text contains `match` and whose schema is named `schema` (either optional), at
most `times` times (None: always).

Faults of the response itself, each an HTTP 200 (what a cut-off proxy or a buggy server sends):
"truncated" (the JSON body cut short, Content-Length matching the cut), "empty" (no body),
"body" (a fixed whole-response `body`: valid JSON of the wrong shape, e.g. no `choices`), "html"
(a text/html page instead of JSON), "wrong_type" (the good JSON labelled text/plain), "cut"
(Content-Length promises the whole body, half is sent, then the connection closes), "bad_utf8"
(bytes that are not UTF-8 inside the JSON), "surrogate" (content with a lone UTF-16 surrogate,
`\\ud800`, which no UTF-8 file can hold), "gzip" (Content-Encoding gzip over bytes that are not
gzip).

In-process: `with OpenAIServer(latency=0.01) as server: ... server.base_url ...`.
As a process: `python tests/openai_server.py --latency 0.2` prints `READY <base_url>` and serves
until killed; `GET /control/stats`, `POST /control/faults` (a JSON list), `POST /control/reset`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

FAULT_KINDS = {"429", "500", "slow", "malformed", "refusal", "drop", "reply", "truncated", "empty",
               "body", "html", "wrong_type", "cut", "bad_utf8", "surrogate", "gzip"}
RESPONSE_FAULTS = FAULT_KINDS - {"429", "500", "slow", "malformed", "refusal", "drop", "reply"}
REFUSAL_TEXT = "I'm sorry, but I can't help with that."


@dataclass
class Fault:
    kind: str
    match: str | None = None
    schema: str | None = None
    times: int | None = 1
    delay: float = 5.0  # "slow": seconds before answering
    retry_after_ms: int = 50  # "429": sent as retry-after-ms and (rounded up) Retry-After
    reply: Any = None  # "reply": the content, serialised as JSON when not a string
    body: Any = None  # "body": the whole response, serialised as JSON when not a string

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")


@dataclass
class Raw:
    """A response sent byte for byte as given, for the faults that break the body or the HTTP."""

    data: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    cut: bool = False  # announce len(data), send half of it, close the connection


@dataclass
class Stats:
    requests: int = 0  # chat-completion requests received (faulted ones included)
    faults: dict[str, int] = field(default_factory=dict)
    by_schema: dict[str, int] = field(default_factory=dict)
    images: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    auth: set[str] = field(default_factory=set)  # Authorization headers seen


def request_text(messages: list[dict]) -> tuple[str, int]:
    """All text of the messages, and the number of images among them."""
    parts, images = [], 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    parts.append(part.get("text", ""))
                elif part.get("type") == "image_url":
                    images += 1
    return "\n".join(parts), images


def schema_from_prompt(text: str) -> dict | None:
    match = re.search(r"```json\s*(\{.*?\})\s*```", text, re.S)
    if not match:
        return None
    try:
        schema = json.loads(match.group(1))
    except json.JSONDecodeError:
        return None
    return schema if isinstance(schema, dict) and "type" in schema else None


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(parts).encode()).digest()[:8], "big")


def instance(schema: dict, seed: str, path: str = "$", index: int = 0) -> Any:
    """A deterministic instance of `schema` (the subset structured outputs use)."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        values = schema["enum"]
        # Array items step through the enum from a hashed start, so siblings differ.
        return values[(_digest(seed, path.rsplit("[", 1)[0]) + index) % len(values)]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return instance(schema[key][0], seed, path, index)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next(k for k in kind if k != "null")
    if kind == "object":
        return {
            name: instance(sub, seed, f"{path}.{name}", index)
            for name, sub in schema.get("properties", {}).items()
        }
    if kind == "array":
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        n = max(low, 2) if high is None else min(high, max(low, 2))
        return [instance(schema.get("items", {}), seed, f"{path}[{i}]", i) for i in range(n)]
    if kind == "boolean":
        return True
    if kind == "integer":
        return int(schema.get("minimum", 0)) + _digest(seed, path) % 5
    if kind == "number":
        return float(schema.get("minimum", 0)) + (_digest(seed, path) % 100) / 100
    if kind == "null":
        return None
    return f"{path.lstrip('$.')} {_digest(seed, path) % 10**8:08d}: {_snippet(seed)}"


def broken_response(fault: Fault, response: dict) -> Raw:
    """The good `response` damaged the way `fault` says."""
    data = json.dumps(response).encode()
    if fault.kind == "truncated":
        return Raw(data[: len(data) // 2])
    if fault.kind == "empty":
        return Raw(b"")
    if fault.kind == "body":
        body = fault.body
        return Raw((body if isinstance(body, str) else json.dumps(body)).encode())
    if fault.kind == "html":
        return Raw(b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")
    if fault.kind == "wrong_type":
        return Raw(data, "text/plain")
    if fault.kind == "cut":
        return Raw(data, cut=True)
    if fault.kind == "bad_utf8":
        content = response["choices"][0]["message"]["content"] or ""
        return Raw(data.replace(json.dumps(content).encode(), b'"caf\xe9 \xff\xfe"', 1))
    if fault.kind == "surrogate":
        # Inside the first string of JSON content (so it survives schema validation), or in
        # front of plain text; ensure_ascii sends it as the escape \ud800.
        message = response["choices"][0]["message"]
        content = message["content"] or ""
        quote = content.find(': "') if content.startswith("{") else -1
        at = quote + 3 if quote >= 0 else 0
        message["content"] = content[:at] + "\ud800" + content[at:]
        return Raw(json.dumps(response).encode())
    if fault.kind == "gzip":
        return Raw(data, headers={"Content-Encoding": "gzip"})
    raise ValueError(f"not a response fault: {fault.kind}")


def _snippet(text: str, words: int = 12) -> str:
    return " ".join(text.split()[-words:])


class OpenAIServer:
    """The server on 127.0.0.1 in a background thread (or the foreground with `serve_forever`)."""

    def __init__(
        self,
        latency: float = 0.0,
        structured_outputs: bool = True,
        faults: list[Fault | dict] | None = None,
        port: int = 0,
        expect_api_key: str | None = None,
    ) -> None:
        self.latency = latency
        self.structured_outputs = structured_outputs
        self.expect_api_key = expect_api_key
        self.port = port
        self.stats = Stats()
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        for fault in faults or []:
            self.add_fault(fault)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._server: asyncio.base_events.Server | None = None

    # ---- control -----------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> int:
        return self.stats.requests

    def add_fault(self, fault: Fault | dict | str, **kwargs: Any) -> None:
        if isinstance(fault, str):
            fault = Fault(fault, **kwargs)
        elif isinstance(fault, dict):
            fault = Fault(**fault)
        with self._lock:
            self._faults.append(fault)

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self.stats = Stats()

    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def _take_fault(self, text: str, schema_name: str | None) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.match is not None and fault.match not in text:
                    continue
                if fault.schema is not None and fault.schema != schema_name:
                    continue
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                self.stats.faults[fault.kind] = self.stats.faults.get(fault.kind, 0) + 1
                return fault
        return None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> OpenAIServer:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("test server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._server.serve_forever()
        except asyncio.CancelledError:
            pass

    # ---- HTTP --------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: many requests per connection
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                answer = await self._handle(method, target.split("?", 1)[0], headers, body)
                if answer is None:  # "drop"
                    writer.transport.abort()
                    return
                status, payload, extra = answer
                raw = payload if isinstance(payload, Raw) else Raw(json.dumps(payload).encode())
                reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
                          429: "Too Many Requests", 500: "Internal Server Error"}.get(status, "")
                out = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {raw.content_type}",
                       f"Content-Length: {len(raw.data)}", "Connection: keep-alive"]
                out += [f"{k}: {v}" for k, v in {**extra, **raw.headers}.items()]
                head = ("\r\n".join(out) + "\r\n\r\n").encode()
                if raw.cut:
                    writer.write(head + raw.data[: len(raw.data) // 2])
                    await writer.drain()
                    writer.transport.abort()
                    return
                writer.write(head + raw.data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass  # server shutting down with the connection open: end quietly
        finally:
            writer.close()

    async def _handle(
        self, method: str, path: str, headers: dict, body: bytes
    ) -> tuple[int, Any, dict] | None:  # the payload: a JSON value, or Raw bytes
        if path == "/control/stats":
            s = self.stats
            return 200, {"requests": s.requests, "faults": s.faults, "by_schema": s.by_schema,
                         "images": s.images, "max_in_flight": s.max_in_flight}, {}
        if path == "/control/reset" and method == "POST":
            self.reset()
            return 200, {"ok": True}, {}
        if path == "/control/faults" and method == "POST":
            for fault in json.loads(body or b"[]"):
                self.add_fault(fault)
            return 200, {"ok": True}, {}
        if path.rstrip("/").endswith("/chat/completions") and method == "POST":
            return await self._chat(headers, json.loads(body))
        return 404, {"error": {"message": f"no route {path}", "type": "not_found"}}, {}

    async def _chat(self, headers: dict, req: dict) -> tuple[int, Any, dict] | None:
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            return await self._answer(headers, req)
        finally:
            stats.in_flight -= 1

    async def _answer(self, headers: dict, req: dict) -> tuple[int, Any, dict] | None:
        stats = self.stats
        auth = headers.get("authorization", "")
        stats.auth.add(auth)
        if self.expect_api_key is not None and auth != f"Bearer {self.expect_api_key}":
            return 401, {"error": {"message": "invalid api key", "type": "auth"}}, {}
        messages = req.get("messages", [])
        text, images = request_text(messages)
        stats.images += images
        fmt = req.get("response_format") or {}
        schema, schema_name = None, None
        if fmt.get("type") == "json_schema":
            if not self.structured_outputs:
                message = "response_format json_schema is not supported by this server"
                return 400, {"error": {"message": message, "type": "invalid_request_error",
                                       "param": "response_format"}}, {}
            schema_name = fmt["json_schema"].get("name")
            schema = fmt["json_schema"].get("schema", {})
        else:
            schema = schema_from_prompt(text)
            schema_name = schema.get("title") if schema else None
        stats.by_schema[schema_name or "text"] = stats.by_schema.get(schema_name or "text", 0) + 1

        fault = self._take_fault(text, schema_name)
        if self.latency:
            await asyncio.sleep(self.latency)
        refusal = None
        if fault is not None:
            if fault.kind == "429":
                retry = {"retry-after-ms": str(fault.retry_after_ms),
                         "Retry-After": str(-(-fault.retry_after_ms // 1000))}
                return 429, {"error": {"message": "rate limit reached", "type": "requests"}}, retry
            if fault.kind == "500":
                return 500, {"error": {"message": "internal error", "type": "server_error"}}, {}
            if fault.kind == "drop":
                return None
            if fault.kind == "slow":
                await asyncio.sleep(fault.delay)
        if fault is not None and fault.kind == "malformed":
            content: str | None = '{"truncated": "this is not json'
        elif fault is not None and fault.kind == "refusal":
            content, refusal = None, REFUSAL_TEXT
        elif fault is not None and fault.kind == "reply":
            content = fault.reply if isinstance(fault.reply, str) else json.dumps(fault.reply)
        elif schema is not None:
            content = json.dumps(instance(schema, text))
        else:
            content = (f"A video of {images} frames. The scene shows {_snippet(text, 20)}. "
                       f"Reference {_digest(text) % 10**8:08d}.")
        prompt_tokens = len(text) // 4 + 85 * images
        completion_tokens = len(content or refusal or "") // 4
        response = {
            "id": f"chatcmpl-{_digest(text, str(time.time_ns())) % 10**12}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.get("model", "test-model"),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
                "finish_reason": "stop",
            }],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
        if fault is not None and fault.kind in RESPONSE_FAULTS:
            return 200, broken_response(fault, response), {}
        return 200, response, {}

    def serve_forever(self) -> None:
        asyncio.run(self._main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--no-structured-outputs", action="store_true")
    args = parser.parse_args()
    server = OpenAIServer(latency=args.latency, port=args.port,
                          structured_outputs=not args.no_structured_outputs)
    server.start()
    print(f"READY {server.base_url}", flush=True)
    try:
        server._thread.join()  # the server thread runs until the process is killed
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
