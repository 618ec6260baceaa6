"""Pieces of a DPO step that are not the loop itself: batching, rank slices, metrics, evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from safevid.data.collate import (
    EncodedPair,
    Layout,
    Limits,
    MicroBatch,
    PairTooLong,
    VideoTokens,
    batch_inputs,
    collate,
    encode_pair,
)
from safevid.data.stream import Pair, Video, read_decodable_pairs
from safevid.data_prep.rejects import Rejects
from safevid.losses import preference_loss, reward_metrics
from safevid.models.dpo_model import LoadedModel
from safevid.models.family import VideoInput

STEP_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
             "logps/chosen", "logps/rejected", "tokens")


class Batcher:
    """Pairs -> a MicroBatch on CPU: frames through the family's preprocessing, text through the
    chat template and the length rules, rows in the configured layout. Runs in the prefetch
    thread during training (and on the main thread in evaluation)."""

    def __init__(self, loaded: LoadedModel, data_cfg):
        self.loaded, self.family, self.cfg = loaded, loaded.family, data_cfg
        self.limits = Limits(data_cfg.max_answer_tokens, data_cfg.max_length,
                             data_cfg.max_prompt_length)
        self.layout = self.layout_of(data_cfg)

    @staticmethod
    def layout_of(data_cfg) -> Layout:
        return Layout(data_cfg.shared_prefix, data_cfg.packing, data_cfg.max_tokens_per_row)

    def check_video(self, video: Video) -> str | None:
        """Decode and preprocess `video` now; why it cannot be used, or None. A property of
        the video, alike on every rank."""
        error = video.decode_error()
        if error is None:
            try:
                self.prepare(video)
            except Exception as exc:  # noqa: BLE001  any failure of the family's preprocessing
                error = f"cannot preprocess frames: {type(exc).__name__}: {str(exc)[:200]}"
                video.error = error
        return error

    def prepare(self, video: Video) -> VideoInput:
        """The family's input for `video`, made once while the video is in use."""
        if video.prepared is None:
            video.prepared = self.family.prepare_video(video.frames(), video.meta)
        return video.prepared

    def _stand_in(self, pair: Pair) -> tuple[EncodedPair, VideoInput]:
        """What an unusable pair is run as: it keeps its slot (the same forwards, the vision
        tower called on every rank) and weighs nothing. Two blank frames and one-token texts:
        small, and usable whatever made the pair unusable (its own frames may be the cause)."""
        video = self.family.prepare_video(np.zeros((2, 32, 32, 3), np.uint8), None)
        tokens = VideoTokens(self.family.video_token_id, video.tokens)
        stand_in = Pair(pair.id, ".", ".", ".", None)
        return encode_pair(stand_in, self.loaded.tokenizer, tokens, Limits(4, 0, 0)), video

    def encode(self, pair: Pair) -> str | None:
        """Encode `pair` once (kept on it); the reason it cannot be used, or None.

        A failure is a property of the pair, so every rank that meets it decides alike; it is
        never an exception on the one rank that holds the pair, which would leave the others
        waiting in a ZeRO-3 gather.
        """
        if pair.encoded is None:
            try:
                tokens = VideoTokens(self.family.video_token_id, self.prepare(pair.video).tokens)
                pair.encoded = encode_pair(pair, self.loaded.tokenizer, tokens, self.limits)
            except PairTooLong as exc:
                return str(exc)
            except Exception as exc:  # noqa: BLE001  any tokenizer or template failure
                return f"cannot encode: {type(exc).__name__}: {str(exc)[:200]}"
        return None

    def encode_fresh(self, pair: Pair) -> str | None:
        """`encode` with this batcher's tokenizer even if another one encoded the pair."""
        pair.encoded = None
        return self.encode(pair)

    def __call__(self, pairs: list[Pair]) -> MicroBatch:
        for p in pairs:  # normally encoded already, in the prefetch thread
            if p.valid and self.encode(p) is not None:
                p.valid = False
        encoded, videos, video_of_pair = [], [], []
        index: dict[int, int] = {}
        for p in pairs:
            if p.valid:
                enc, key = p.encoded, id(p.video)
                if key not in index:
                    index[key] = len(videos)
                    videos.append(self.prepare(p.video))
                video_of_pair.append(index[key])
            else:
                enc, video = self._stand_in(p)
                video_of_pair.append(len(videos))
                videos.append(video)
            encoded.append(enc)
        return collate(encoded, videos, video_of_pair, self.family,
                       self.loaded.tokenizer.pad_token_id, self.layout)


def pair_losses(loss_cfg, logps: torch.Tensor, lengths: torch.Tensor,
                ref_logps: torch.Tensor | None):
    """`preference_loss` on interleaved sequences (2i chosen, 2i+1 rejected) with the config's
    settings; returns (losses, chosen rewards, rejected rewards), one value per pair."""
    return preference_loss(
        logps[0::2], logps[1::2],
        None if ref_logps is None else ref_logps[0::2],
        None if ref_logps is None else ref_logps[1::2],
        loss_type=loss_cfg.type, beta=loss_cfg.beta, label_smoothing=loss_cfg.label_smoothing,
        simpo_gamma=loss_cfg.simpo_gamma, chosen_lengths=lengths[0::2],
        rejected_lengths=lengths[1::2], nll_weight=loss_cfg.nll_weight,
        ipo_form=loss_cfg.ipo_form,
    )


def step_pairs(stream, pairs_per_step: int, rank: int, world: int) -> list[Pair]:
    """This rank's contiguous share of the step's pairs. The indexed loader reads only that
    share; the sequential stream reads the whole step on every rank."""
    if hasattr(stream, "step_pairs"):
        return stream.step_pairs(rank, world)
    pairs = stream.take(pairs_per_step)
    share = pairs_per_step // world
    return pairs[rank * share:(rank + 1) * share]


class StepPrefetcher:
    """Prepares the next step while the current one trains: tar reads, JPEG decoding and the
    family's frame preprocessing (in `decode_threads` threads), tokenization, length rules and
    collation into the step's micro-batches (on CPU; the training thread only copies them to
    the device).

    Each step comes with the stream position after it, so a checkpoint records where the
    trained steps end, not how far the prefetching has read.
    """

    def __init__(self, stream, pairs_per_step: int, rank: int, world: int,
                 decode_threads: int, rejects: Rejects, steps: int, batcher: Batcher,
                 micro_batch_pairs: int, ref_table=None):
        from concurrent.futures import ThreadPoolExecutor

        self.args = (stream, pairs_per_step, rank, world)
        self.rejects, self.remaining, self.batcher = rejects, steps, batcher
        self.micro, self.ref_table = micro_batch_pairs, ref_table
        self.decoder = ThreadPoolExecutor(max(1, decode_threads))
        self.loader = ThreadPoolExecutor(1)
        self.pending = self._submit()

    def _submit(self):
        # Only the steps that will run: reading further would reject pairs nobody trains on.
        self.remaining -= 1
        return self.loader.submit(self._load) if self.remaining >= 0 else None

    def _load(self) -> tuple[list[Pair], list[MicroBatch], tuple[int, int]]:
        stream = self.args[0]
        pairs = step_pairs(*self.args)
        batches = micro_batches(pairs, self.batcher, self.micro, self.rejects, self.decoder,
                                self.ref_table)
        return pairs, batches, stream.position

    def next(self) -> tuple[list[Pair], list[MicroBatch], tuple[int, int]]:
        pairs, batches, position = self.pending.result()
        self.pending = self._submit()
        return pairs, batches, position

    def close(self) -> None:
        self.loader.shutdown(wait=True, cancel_futures=True)
        self.decoder.shutdown(wait=True)


def micro_batches(pairs: list[Pair], batcher: Batcher, micro: int, rejects: Rejects,
                  decoder=None, ref_table=None) -> list[MicroBatch]:
    """`pairs` screened and collated, `micro` pairs to a micro-batch (on CPU).

    Each distinct video is decoded and preprocessed once (in `decoder`, an executor, when
    given); each pair is encoded under the length rules and gets its precomputed reference
    log-probs from `ref_table` when given. A pair whose frames do not decode, or whose text
    cannot be encoded or fit, keeps its slot (every rank runs the same number of forwards) but
    is rejected by name and weighs nothing. The decided outcome depends on the pair alone, so
    it is the same on every rank."""
    videos = list({id(p.video): p.video for p in pairs}.values())
    usable = list({id(p.video): p.video for p in pairs if p.valid}.values())
    checked = (decoder.map if decoder is not None else map)(batcher.check_video, usable)
    errors = dict(zip(map(id, usable), checked, strict=True))
    for pair in pairs:
        if not pair.valid:  # the loader already rejected it (an unreadable sample, a stand-in)
            continue
        error = errors[id(pair.video)] or batcher.encode(pair)
        if error is None and ref_table is not None:
            error = attach_ref(pair, ref_table)
        if error is not None:
            pair.valid = False
            rejects.add(pair.name, error)
    batches = [batcher(pairs[i:i + micro]) for i in range(0, len(pairs), micro)]
    for video in videos:
        video.release()
    return batches


def attach_ref(pair: Pair, ref_table) -> str | None:
    """Put the pair's precomputed reference log-probs on it; why there are none, or None."""
    found = ref_table.lookup(pair)
    if isinstance(found, str):
        return found
    pair.ref = found
    return None


def ref_logps_of(pairs: list[Pair], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Precomputed reference log-probs of a micro-batch, interleaved like the model's output
    (2i chosen, 2i+1 rejected), made on the step's device; 0 for pairs of weight 0."""
    values = [v for p in pairs for v in (p.ref if p.valid and p.ref is not None else (0.0, 0.0))]
    return torch.tensor(values, dtype=dtype, device=device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """The largest peak memory of any rank so far, in MiB: resident set size (the process's
    high-water mark) and, on a GPU, allocated device memory. One small all-reduce."""
    import resource

    values = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]  # KiB on Linux
    if device.type == "cuda":
        values.append(torch.cuda.max_memory_allocated(device) / 2**20)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    out = {"memory/peak_rss_mib": float(t[0])}
    if device.type == "cuda":
        out["memory/peak_gpu_mib"] = float(t[1])
    return out


def count_valid(pairs: list[Pair], device: torch.device) -> int:
    """Usable pairs in this step over all ranks: the denominator of the step's mean loss."""
    n = torch.tensor([float(sum(p.valid for p in pairs))], dtype=torch.float64, device=device)
    dist.all_reduce(n)
    return int(n.item())


def accumulate_step_metrics(sums: dict[str, torch.Tensor], losses: torch.Tensor,
                            chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                            logps: torch.Tensor, weight: torch.Tensor, tokens: int,
                            device: torch.device) -> None:
    """Add one micro-batch's weighted per-pair metrics into `sums`, all on `device`.

    Every tensor is made on the step's device: a CPU scalar among CUDA tensors made the first
    GPU step crash in the reduction.
    """
    values = {"loss": losses, **reward_metrics(chosen_rewards, rejected_rewards),
              "logps/chosen": logps[0::2], "logps/rejected": logps[1::2]}
    for key, value in values.items():
        term = (value.detach().to(device, torch.float64) * weight.to(device, torch.float64)).sum()
        sums[key] = sums[key] + term if key in sums else term
    count = torch.tensor(float(tokens), dtype=torch.float64, device=device)
    sums["tokens"] = sums["tokens"] + count if "tokens" in sums else count


def stack_step_metrics(sums: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The step's sums as one float64 vector on `device`, ready for a single all-reduce."""
    return torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device)
                        for k in STEP_KEYS])


def reduce_step_metrics(sums: dict, valid_pairs: int, device: torch.device) -> dict:
    """Sum over ranks, then means over the step's valid pairs (tokens stay a total)."""
    vec = stack_step_metrics(sums, device)
    dist.all_reduce(vec)
    out = {k: float(v) / max(valid_pairs, 1) for k, v in zip(STEP_KEYS, vec.tolist(), strict=True)}
    out["tokens"] = int(vec[-1].item())
    return out


@torch.no_grad()
def evaluate(engine, ref_engine, batcher: Batcher, sets: dict[str, list[str]], cfg, rank: int,
             world: int, out_dir: Path | None, device: torch.device, dtype: torch.dtype,
             ref_table=None, rejects: Rejects | None = None) -> dict:
    """Reward accuracy and margin on each named set of shards, spread over all ranks.

    Each rank runs the same number of forwards (the pair list is padded with repeats that are
    dropped afterwards): under ZeRO-3 an unequal count would deadlock the parameter gathers.
    Pairs that cannot be decoded, encoded or given their reference log-probs are left out by
    every rank and recorded in `rejects` (give it on one rank only: all ranks read every pair).
    """
    rejects = rejects or Rejects(None)
    engine.eval()
    m = cfg.train.micro_batch_pairs
    results: dict[str, float] = {}
    for name, urls in sets.items():
        if not urls:
            continue
        # Decoding and encoding are deterministic, so every rank drops the same pairs here.
        pairs = []
        for p in read_decodable_pairs(urls, cfg.data.eval_max_pairs, rejects):
            error = batcher.encode(p) or (attach_ref(p, ref_table) if ref_table is not None else None)
            if error is None:
                pairs.append(p)
            else:
                rejects.add(p.name, error)
            p.video.release()
        if not pairs:
            continue
        per_rank = math.ceil(len(pairs) / (world * m)) * m
        padded = pairs + [pairs[0]] * (per_rank * world - len(pairs))
        table = torch.zeros(len(padded), 4, dtype=torch.float64, device=device)
        for start in range(rank * per_rank, (rank + 1) * per_rank, m):
            chunk = padded[start:start + m]
            batch = batcher(chunk).to(device, dtype)
            for pair in chunk:
                pair.video.release()
            logps, lengths = engine(**batch_inputs(batch))
            ref = (ref_engine(**batch_inputs(batch))[0] if ref_engine is not None
                   else ref_logps_of(chunk, device, logps.dtype) if ref_table is not None else None)
            _, chosen_r, rejected_r = pair_losses(cfg.loss, logps, lengths, ref)
            table[start:start + m] = torch.stack(
                [chosen_r, rejected_r, logps[0::2], logps[1::2]], dim=1).double()
        dist.all_reduce(table)
        table = table[:len(pairs)]
        results[f"eval/{name}/accuracy"] = float((table[:, 0] > table[:, 1]).double().mean())
        results[f"eval/{name}/margin"] = float((table[:, 0] - table[:, 1]).mean())
        results[f"eval/{name}/pairs"] = len(pairs)
        if out_dir is not None:
            with open(out_dir / f"eval_{name}.jsonl", "w") as f:
                for pair, row in zip(pairs, table.tolist(), strict=True):
                    f.write(json.dumps({"id": pair.id, "rewards/chosen": row[0],
                                        "rewards/rejected": row[1], "logps/chosen": row[2],
                                        "logps/rejected": row[3]}) + "\n")
    engine.train()
    return results
