"""Judge-free metrics: the DPO reward of a policy against a reference on held-out preference
pairs, per category. Every run can compute them: no judge, no generation, only two forwards.

For each pair, reward(answer) = beta * (log p_policy(answer) - log p_reference(answer)), summed
over the answer's tokens, on exactly the training path (shards, frames, chat template, rows,
log-prob head): the numbers equal the trainer's own held-out evaluation (`eval_heldout.jsonl`).
Reported per top-level category and overall: reward accuracy (the fraction of pairs whose
chosen answer gets the higher reward; a policy equal to its reference scores 0, since no pair
is ranked strictly) and the mean margin (chosen minus rejected reward).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

from safevid.data_prep.rejects import Rejects

OVERALL = "overall"


@torch.no_grad()
def pair_rewards(policy_dir: str | Path, reference_dir: str | Path, shards: str, beta: float,
                 max_pairs: int = 512, batch_pairs: int = 4, max_answer_tokens: int = 512,
                 device: str | None = None, rejects: Rejects | None = None) -> list[dict]:
    """Per pair: id, category, chosen and rejected rewards. Pairs whose frames do not decode
    are rejected (named, with the reason) and left out."""
    from safevid.data.collate import collate, encode_pair
    from safevid.data.stream import expand_shards, frames_per_video, read_decodable_pairs
    from safevid.models.llava_next_video import batch_inputs, load

    rejects = rejects or Rejects(None)
    urls = expand_shards(shards, "--pairs")
    frames = frames_per_video(urls[0])
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = [load(str(d), frames, torch.float32, fused=True) for d in (policy_dir, reference_dir)]
    for m in models:
        m.model.to(dev).eval()
    pairs = []
    for pair in read_decodable_pairs(urls, max_pairs, rejects):
        try:  # as in training: a pair whose text cannot be encoded is rejected, not fatal
            for m in models:
                encode_pair(pair, m.tokenizer, m.video, max_answer_tokens)
            pairs.append(pair)
        except Exception as exc:  # noqa: BLE001  any tokenizer or template failure
            rejects.add(f"{pair.video.key}/{pair.id}",
                        f"cannot encode: {type(exc).__name__}: {str(exc)[:200]}")
    cfg = SimpleNamespace(max_answer_tokens=max_answer_tokens, packing=False)
    out = []
    for start in range(0, len(pairs), batch_pairs):
        chunk = pairs[start:start + batch_pairs]
        logps = []
        for m in models:
            # The same encoding and rows as training (`Batcher`), one sequence per row.
            enc = [encode_pair(p, m.tokenizer, m.video, cfg.max_answer_tokens) for p in chunk]
            batch = collate(chunk, enc, m.frames, m.video, m.tokenizer.pad_token_id, False, 1)
            logps.append(m.model(**batch_inputs(batch.to(dev, torch.float32)))[0].double())
        for pair in chunk:
            pair.video.release()
        ratio = beta * (logps[0] - logps[1])
        for i, pair in enumerate(chunk):
            out.append({"id": pair.id, "category": pair.category,
                        "rewards/chosen": float(ratio[2 * i]),
                        "rewards/rejected": float(ratio[2 * i + 1])})
    return out


def summarize(rows: list[dict]) -> dict:
    """{"overall": {...}, "categories": {top-level category: {...}}}: pairs, accuracy, margin."""
    groups: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        margin = row["rewards/chosen"] - row["rewards/rejected"]
        groups[OVERALL].append(margin)
        groups[(row["category"] or "(none)").split("/")[0]].append(margin)

    def stats(m: list[float]) -> dict:
        return {"pairs": len(m), "reward_accuracy": sum(x > 0 for x in m) / len(m),
                "reward_margin": sum(m) / len(m)}

    return {OVERALL: stats(groups.pop(OVERALL)) if rows else {"pairs": 0},
            "categories": {c: stats(m) for c, m in sorted(groups.items())}}


def table(summary: dict) -> str:
    lines = [f"{'category':<22} {'pairs':>5} {'accuracy':>9} {'margin':>8}"]
    groups = [(OVERALL, summary[OVERALL]), *summary["categories"].items()]
    for name, g in groups:
        if g.get("pairs"):
            lines.append(f"{name:<22} {g['pairs']:>5} {g['reward_accuracy']:>9.3f} "
                         f"{g['reward_margin']:>8.2f}")
    return "\n".join(lines)
