"""Precomputed reference log-probs: the reference model runs once over the data, not every step.

`safevid precompute-ref CONFIG [key=value ...]` (launched like training: one process per
device, the shards split over ranks) writes, for each shard, `<shard>.ref_logps.json` beside it
(or under `train.ref_logps_dir`): every pair slot's reference log-probs of chosen and rejected,
by sample key and place in the sample's pair list, with the pair id to check against. Training
with `train.reference=precomputed` reads them and builds no reference model.

Each file is stamped with a fingerprint of what the numbers depend on:
- reference: the reference model's weights and config (file contents), and the dtype;
- tokenizer: the tokenizer files (the token ids being scored);
- frames: the family and its preprocessor files (the pixels and placeholder counts);
- layout: the row layout (shared-prefix, packed or padded);
- lengths: the length rules (`data.max_length`, `data.max_prompt_length`,
  `data.max_answer_tokens`), which decide where answers are cut;
and with a digest of the shard's member index (sample keys, member sizes, pair counts), so a
shard rewritten since is known as stale at start-up; each pair's entry also carries a digest of
its texts, so a pair edited in place (same sizes) is rejected as stale, with weight 0, however
its shard's sizes came out. A run refuses to start, naming the shard and what
differs, when a file is missing, its fingerprint differs, its shard changed, or it lacks pairs
the shard has. A pair the precompute could not use (undecodable frames, too long) is stored as
null and weighs 0 in training too: the same decision the live reference run makes.

Model digests read every weight file (about 20 s for 15 GB); rank 0 computes them and the other
ranks receive the result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from safevid.config import Config, ConfigError

SUFFIX = ".ref_logps.json"
FORMAT = 1
# Which files of a model directory each fingerprint part covers.
_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.safetensors.index.json", "*.bin.index.json",
            "config.json", "*.py")  # *.py: a trust_remote_code model's own code
_TOKENIZER = ("tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "*.model",
              "chat_template*", "added_tokens.json")
_FRAMES = ("preprocessor_config.json", "video_preprocessor_config.json",
           "processor_config.json")


class RefLogpsError(ConfigError):
    """Precomputed reference log-probs that cannot be used; the message says what to do."""


def model_dir(name_or_path: str) -> Path:
    """A model's local directory: as given, or its snapshot in the hub cache."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception as exc:  # noqa: BLE001  not cached, or not a hub id at all
        raise ConfigError(f"model {name_or_path!r} is neither a local directory nor in the hub "
                          f"cache ({type(exc).__name__})") from exc


def files_digest(directory: Path, patterns: tuple[str, ...]) -> str:
    """blake2b over the names and contents of the files matching `patterns`."""
    h = hashlib.blake2b(digest_size=16)
    names = sorted({p.name for pat in patterns for p in directory.glob(pat) if p.is_file()})
    for name in names:
        h.update(name.encode() + b"\0")
        with open(directory / name, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest() if names else "none"


def ref_source(cfg: Config) -> str:
    return cfg.model.ref_name_or_path or cfg.model.name_or_path


def fingerprint(cfg: Config, family: str, dtype: str, layout: str, quantized: bool) -> dict:
    """What the reference log-probs depend on, part by part (see the module docstring)."""
    import transformers

    ref = model_dir(ref_source(cfg))
    policy = model_dir(cfg.model.name_or_path)
    return {
        # ZeRO++'s int8 weight gathers change the numbers; so may another transformers (its
        # model code and processors).
        "reference": {"weights": files_digest(ref, _WEIGHTS), "dtype": dtype,
                      "quantized_weights": quantized, "transformers": transformers.__version__},
        # The pairs are encoded with the policy's tokenizer and frame settings.
        "tokenizer": files_digest(policy, _TOKENIZER),
        "frames": {"family": family, "preprocessor": files_digest(policy, _FRAMES)},
        # The row layout, not the attention backend or the packing, which differ by rounding
        # only (the precompute packs its rows differently from any training run anyway).
        "layout": {"layout": layout},
        "lengths": {"max_length": cfg.data.max_length,
                    "max_prompt_length": cfg.data.max_prompt_length,
                    "max_answer_tokens": cfg.data.max_answer_tokens},
    }


def differences(saved: dict, current: dict) -> list[str]:
    return [f"{part}: file {saved.get(part)} vs this run {current.get(part)}"
            for part in sorted(set(saved) | set(current)) if saved.get(part) != current.get(part)]


def ref_file(shard: str, ref_dir: str = "") -> Path:
    """Beside the shard, or in `ref_dir` under a name that keeps shards of different
    directories apart (two mixture sources may both have train-000000.tar). The directory is
    named as given (made absolute, links not followed), so every node computes the same name."""
    path = Path(shard)
    if not ref_dir:
        return path.with_name(path.name + SUFFIX)
    parent = os.path.abspath(path.parent)
    where = hashlib.blake2b(parent.encode(), digest_size=4).hexdigest()
    return Path(ref_dir) / f"{path.name}.{where}{SUFFIX}"


def text_digest(pair) -> str:
    """The pair's texts: a pair edited since (a label fix swapping chosen and rejected, a
    corrected prompt) no longer matches its stored log-probs, even where the shard's sizes
    stay the same."""
    h = hashlib.blake2b(digest_size=8)
    h.update("\0".join((pair.prompt, pair.chosen, pair.rejected)).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _entry_ok(entry) -> bool:
    return entry is None or (
        isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)
        and all(isinstance(v, int | float) for v in entry[1:3]) and isinstance(entry[3], str))


def shard_digest(url: str, refs: list) -> str:
    """The shard's member index (`refs`, its `load_index`: keys, member offsets and sizes,
    pair counts) and size: a shard written again with other contents has another digest."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(Path(url).stat().st_size).encode())
    for r in refs:
        h.update(json.dumps([r.key, r.json, r.jpgs, r.pairs]).encode())
    return h.hexdigest()


def write_shard_file(path: Path, fp: dict, url: str, digest: str,
                     samples: dict[str, list]) -> None:
    """`digest` is the shard's as it was when its pairs were read (a shard rewritten meanwhile
    then shows as stale, not as current)."""
    from safevid.atomic import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"format": FORMAT, "fingerprint": fp,
                                        "shard": Path(url).name, "shard_digest": digest,
                                        "samples": samples}))


class RefTable:
    """The reference log-probs of every pair of some shards, checked against this run."""

    def __init__(self, values: dict[tuple[str, str], list]):
        # (shard as given, sample key) -> [[id, chosen, rejected, text digest] | null]: the
        # shard named as the loaders name it (`Video.shard`), so no rank resolves paths.
        self.values = values

    @classmethod
    def load(cls, urls: list[str], fp: dict, ref_dir: str = "") -> RefTable:
        """Read and check the files of `urls`; RefLogpsError lists every shard that fails."""
        from safevid.data.indexed import load_index

        values: dict[tuple[str, str], list] = {}
        problems: list[str] = []
        for url in urls:
            path = ref_file(url, ref_dir)
            if not path.is_file():
                problems.append(f"{url}: no reference log-probs ({path} is missing)")
                continue
            try:
                doc = json.loads(path.read_text())
                saved_fp, samples = doc["fingerprint"], doc["samples"]
                if doc.get("format") != FORMAT or not isinstance(samples, dict) or not all(
                        isinstance(v, list) and all(map(_entry_ok, v)) for v in samples.values()):
                    raise ValueError(f"not a format-{FORMAT} reference log-probs file")
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                problems.append(f"{path}: unreadable ({type(exc).__name__}: {exc})")
                continue
            diffs = differences(saved_fp, fp)
            if diffs:
                problems.append(f"{path}: computed for another setting; {'; '.join(diffs)}")
                continue
            refs = load_index([url])
            if doc.get("shard_digest") != shard_digest(url, refs):
                problems.append(f"{path}: stale: {url} has changed since its reference "
                                "log-probs were computed")
                continue
            missing = [f"{r.key} ({r.pairs} pairs, {len(samples.get(r.key) or [])} in the file)"
                       for r in refs
                       if len(samples.get(r.key) or []) != r.pairs]
            if missing:
                problems.append(f"{path}: missing pairs of {len(missing)} sample(s): "
                                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
                continue
            values.update({(url, key): entries for key, entries in samples.items()})
        if problems:
            raise RefLogpsError(
                "train.reference=precomputed cannot use the precomputed reference log-probs:\n  "
                + "\n  ".join(problems)
                + "\nRun `safevid precompute-ref` with this run's config (the same model, "
                  "reference, layout, length rules and shards), or set train.reference=live.")
        return cls(values)

    def lookup(self, pair) -> tuple[float, float] | str:
        """(chosen, rejected) reference log-probs of `pair`, or why there are none."""
        entries = self.values.get((pair.video.shard, pair.video.key))
        if entries is None or not 0 <= pair.index < len(entries):
            return "no precomputed reference log-probs for this pair"
        entry = entries[pair.index]
        if entry is None:
            return "the reference could not score this pair when precomputed (weight 0 there too)"
        if entry[0] != pair.id:
            return f"precomputed reference log-probs are for pair {entry[0]!r}, not this one"
        if entry[3] != text_digest(pair):
            return ("stale: the pair's text has changed since its reference log-probs were "
                    "computed; rerun safevid precompute-ref")
        return float(entry[1]), float(entry[2])


def distinct_shards(urls: list[str]) -> list[str]:
    """`urls` without repeats, a file named twice (`a.tar`, `./a.tar`, a shard in two mixture
    sources or in both the training and evaluation sets) counted once."""
    seen: dict[str, str] = {}
    for url in urls:
        seen.setdefault(os.path.realpath(url), url)
    return list(seen.values())


def quantized_weights(ds: dict) -> bool:
    """Whether the reference's parameters are gathered in int8 (ZeRO++'s qwZ)."""
    zero = ds.get("zero_optimization", {})
    return bool(zero.get("zero_quantized_weights") or zero.get("zero_quantized_nontrainable_weights"))


def split_shards(counts: list[int], world: int) -> list[list[int]]:
    """Shard indices per rank, balanced by pair count (largest first to the least loaded)."""
    loads, out = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += counts[i]
    return [sorted(x) for x in out]


def main(argv: list[str] | None = None) -> int:
    """`safevid precompute-ref CONFIG [key=value ...]`."""
    from safevid.rank import DEFAULT_CONFIG, run_rank

    p = argparse.ArgumentParser(prog="safevid precompute-ref",
                                description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default=None, help=f"YAML run config ({DEFAULT_CONFIG})")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    from safevid.precompute import precompute

    return run_rank("safevid precompute-ref", args.config, args.overrides, precompute)
