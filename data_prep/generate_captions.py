"""Stage 1 of pair generation: videos -> detailed factual captions, or captions imported.

Frames come from `read_frames`, the project's one sampler, so a caption describes exactly the
frames the trained model will see (use the same --frames/--size as `safevid prepare`). They go
to a vision chat model as base64 JPEG data URLs.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from safevid.data_prep.frames import VideoError, encode_jpeg, is_video_file, read_frames
from safevid.data_prep.generate_io import Outcome, make_reject, read_records
from safevid.data_prep.generate_rules import PromptSet

from safevid.llm_client import LLMClient, LLMError

CAPTION_FIELDS = ("id", "video_id", "video", "caption")


@dataclass
class CaptionSettings:
    videos: Path
    num_frames: int = 8
    size: int | None = 336
    image_detail: str = "low"
    jpeg_quality: int = 85
    params: dict | None = None  # extra API parameters (temperature, max_tokens, ...)
    min_words: int = 20  # shorter replies are refusals or failures, not descriptions


def list_videos(root: Path) -> list[str]:
    """Video files under `root`, as sorted relative POSIX paths (the caption ids)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and is_video_file(p))


def video_id_of(rel: str) -> str:
    return str(PurePosixPath(rel).with_suffix(""))


class VideoCaptioner:
    """Turns one video (a relative path) into a caption record or a reject."""

    def __init__(self, client: LLMClient, prompts: PromptSet, settings: CaptionSettings,
                 pool: ThreadPoolExecutor) -> None:
        self.client, self.prompts, self.s, self.pool = client, prompts, settings, pool
        self.prompt_sha = prompts.sha_of("caption_system", "caption_user")

    def _frames(self, path: Path) -> tuple[list[str], object]:
        sampled = read_frames(path, self.s.num_frames, self.s.size)
        urls = ["data:image/jpeg;base64,"
                + base64.b64encode(encode_jpeg(f, self.s.jpeg_quality)).decode("ascii")
                for f in sampled.frames]
        return urls, sampled

    async def __call__(self, key: str, rel: object) -> Outcome:
        path = self.s.videos / str(rel)
        loop = asyncio.get_running_loop()
        try:
            # Decoding is CPU work in C; a thread keeps the event loop serving other requests.
            urls, sampled = await loop.run_in_executor(self.pool, self._frames, path)
        except VideoError as exc:  # the message names the file
            return Outcome(key, reject=make_reject(key, str(path), "frames", str(exc)))
        except Exception as exc:  # noqa: BLE001 - one bad file must not end a long job
            return Outcome(key, reject=make_reject(
                key, str(path), "frames", f"{path}: cannot read video ({type(exc).__name__}: "
                f"{exc})"))
        times = ", ".join(f"{t:.1f}" for t in sampled.timestamps)
        text = self.prompts.render("caption_user", num_frames=len(urls), timestamps=times)
        content = [{"type": "text", "text": text}] + [
            {"type": "image_url", "image_url": {"url": url, "detail": self.s.image_detail}}
            for url in urls]
        messages = [{"role": "system", "content": self.prompts.render("caption_system")},
                    {"role": "user", "content": content}]
        try:
            result = await self.client.chat(messages, **(self.s.params or {}))
        except LLMError as exc:
            return Outcome(key, reject=make_reject(
                key, str(path), "caption", f"{type(exc).__name__}: {exc}",
                retryable=exc.retryable))
        caption = " ".join(str(result.content).split())
        if len(caption.split()) < self.s.min_words:
            return Outcome(key, reject=make_reject(
                key, str(path), "caption", f"{path}: reply too short to be a description "
                f"({len(caption.split())} words): {caption[:200]!r}"))
        record = {
            "id": key,
            "video_id": video_id_of(key),
            "video": key,
            "caption": caption,
            "frames": {"indices": sampled.indices, "timestamps": sampled.timestamps},
            "provenance": {
                "model": result.model,
                "prompt_sha": self.prompt_sha,
                "prompts": self.prompts.source,
                "num_frames": self.s.num_frames,
                "size": self.s.size,
                "image_detail": self.s.image_detail,
                "fps": round(sampled.fps, 3),
                "total_frames": sampled.total_frames,
                "finish_reason": result.finish_reason,
            },
        }
        return Outcome(key, records=[record])


def parse_field_map(items: list[str]) -> dict[str, str]:
    """`--field caption=description` -> {"caption": "description"}; dots reach nested keys."""
    mapping = {}
    for item in items:
        ours, sep, theirs = item.partition("=")
        if not sep or ours not in CAPTION_FIELDS or not theirs:
            raise ValueError(f"--field {item!r}: expected OURS=THEIRS with OURS one of "
                             f"{', '.join(CAPTION_FIELDS)}")
        mapping[ours] = theirs
    return mapping


def _get(record: dict, dotted: str) -> object:
    value: object = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _rows(path: Path) -> Iterator[tuple[int, dict | None, str]]:
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            for number, row in enumerate(csv.DictReader(f), 2):
                yield number, dict(row), ""
    elif path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        for number, row in enumerate(data if isinstance(data, list) else [], 1):
            yield number, row if isinstance(row, dict) else None, ""
    else:
        yield from read_records(path)


def import_captions(path: Path, mapping: dict[str, str], videos: Path | None,
                    imported_from: str) -> Iterator[tuple[str, Outcome]]:
    """Caption records from an existing file (JSONL, JSON list or CSV), as finished outcomes.

    Rows without a caption or any id are rejected, and so is a row whose video is missing
    under `videos` when that folder is given.
    """
    fields = {f: mapping.get(f, f) for f in CAPTION_FIELDS}
    seen: dict[str, int] = {}
    for number, row, _ in _rows(path):
        source = f"{path}:{number}"
        if row is None:
            yield source, Outcome(source, reject=make_reject(
                source, source, "import", f"{source}: not a JSON object (torn or invalid line)"))
            continue
        values = {f: _get(row, theirs) for f, theirs in fields.items()}
        caption = " ".join(str(values["caption"] or "").split())
        video = str(values["video"]) if values["video"] else None
        video_id = values["video_id"] or (video_id_of(video) if video else None)
        key = str(values["id"] or video_id or "")
        problem = None
        if not caption:
            problem = f"no caption in field {fields['caption']!r}"
        elif not key:
            problem = (f"no id: none of the fields {fields['id']!r}, {fields['video_id']!r}, "
                       f"{fields['video']!r} is set")
        elif key in seen:
            problem = f"duplicate id {key!r} (first at line {seen[key]})"
        elif videos is not None and video and not (videos / video).is_file():
            problem = f"video {videos / video} does not exist"
        if problem:
            yield source, Outcome(source, reject=make_reject(
                source, source, "import", f"{source}: {problem}"))
            continue
        seen[key] = number
        record = {"id": key, "video_id": str(video_id), **({"video": video} if video else {}),
                  "caption": caption, "frames": None,
                  "provenance": {"imported_from": imported_from, "line": number}}
        yield key, Outcome(key, records=[record])


__all__ = ["CaptionSettings", "VideoCaptioner", "import_captions", "list_videos",
           "parse_field_map"]
