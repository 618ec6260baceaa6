"""Answers from an OpenAI-compatible server (vLLM, SGLang, ...) that serves the model.

Much faster than a local transformers loop on a big benchmark. The video goes to the server
whole, as a base64 `video_url` part before the question: the server samples and preprocesses
its frames itself (vLLM: `--media-io-kwargs '{"video": {"num_frames": 16}}'`), so set its frame
count to the training one. Requests go through the project's one client (`LLMClient`):
concurrency, retries with backoff, rate limits. Greedy by default (temperature 0); with a
temperature, the seed is sent per item so that a rerun asks the same question.

A request that still fails after its retries costs only its item: it is reported as rejected
for this run and not written to the answers log, so the next run asks again.
"""

from __future__ import annotations

import asyncio
import base64
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path

from safevid.eval.bench import BenchItem
from safevid.eval.generate import Answer, is_runaway


@dataclass
class ServerSettings:
    base_url: str
    model: str
    concurrency: int = 16
    timeout: float = 600.0
    max_retries: int = 6
    backoff_base: float = 1.0
    seed: int = 0  # sent with each request when sampling (temperature > 0)


@dataclass
class ServerModel:
    """The `LocalModel` interface (`pixels`, `generate`) over HTTP."""

    settings: ServerSettings
    failures: list[tuple[BenchItem, str]] = field(default_factory=list)
    # Each item is its own request (no shared padding): a resumed batch sends only what is missing.
    items_independent: bool = True

    def pixels(self, video: Path) -> str:
        """The video file as a data URL (the server decodes it); VideoError when unreadable."""
        from safevid.data_prep.frames import VideoError

        try:
            data = Path(video).read_bytes()
        except OSError as exc:
            raise VideoError(f"cannot read {video}: {exc.strerror or exc}") from exc
        if not data:
            raise VideoError(f"{video} is empty")
        mime = mimetypes.guess_type(str(video))[0] or "video/mp4"
        return f"data:{mime};base64,{base64.b64encode(data).decode()}"

    def generate(self, items: list[BenchItem], videos: list[str], max_new_tokens: int,
                 temperature: float = 0.0) -> list[Answer]:
        """One batch, its requests in flight together; failed items are left out (and noted)."""
        return asyncio.run(self._generate(items, videos, max_new_tokens, temperature))

    async def _generate(self, items, videos, max_new_tokens, temperature) -> list[Answer]:
        from safevid.llm_client import LLMClient, LLMError, LLMRefusal

        s = self.settings
        # A client per batch: each batch runs in its own event loop.
        client = LLMClient(s.base_url, s.model, concurrency=s.concurrency, timeout=s.timeout,
                           max_retries=s.max_retries, backoff_base=s.backoff_base)

        async def one(item: BenchItem, video: str) -> Answer | None:
            messages = [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": video}},
                {"type": "text", "text": item.query}]}]
            params = {"temperature": temperature, "max_tokens": max_new_tokens}
            if temperature > 0:
                params["seed"] = s.seed
            try:
                result = await client.chat(messages, **params)
            except LLMRefusal:  # no text at all (or a content filter): an empty answer
                return Answer(item.id, "", 0, True, True, False)
            except LLMError as exc:
                self.failures.append((item, f"generation server: {exc}"))
                return None
            text = (result.text or "").strip()
            finished = result.finish_reason != "length"
            words = text.split()
            n_tokens = result.usage.get("completion_tokens") or len(words)
            # The server returns text, not ids: repetition is judged on words.
            return Answer(item.id, text, n_tokens, finished, not text,
                          is_runaway([hash(w) for w in words], finished))

        async with client:
            answers = await asyncio.gather(*(one(i, v) for i, v in zip(items, videos, strict=True)))
        return [a for a in answers if a is not None]
