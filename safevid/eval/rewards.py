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
                 device: str | None = None, rejects: Rejects | None = None,
                 dtype: str = "auto") -> list[dict]:
    """Per pair: id, category, chosen and rejected rewards. Pairs whose frames do not decode
    are rejected (named, with the reason) and left out. `dtype` auto is training's own choice
    (bf16 on a GPU that has it, else fp32), so the rewards are the trainer's held-out ones."""
    from safevid.data.collate import batch_inputs
    from safevid.data.stream import expand_shards, read_decodable_pairs
    from safevid.dpo import Batcher
    from safevid.eval.generate import device_and_dtype
    from safevid.models.dpo_model import load

    rejects = rejects or Rejects(None)
    urls = expand_shards(shards, "--pairs")
    dev, dt = device_and_dtype(device, dtype)
    models = [load(str(d), dt, fused=True) for d in (policy_dir, reference_dir)]
    # The training path (`Batcher`): encoding, length rules, shared-prefix rows; SDPA with a
    # mask works on every device, and evaluation needs no speed from another backend.
    data = SimpleNamespace(max_answer_tokens=max_answer_tokens, max_length=0, max_prompt_length=0,
                           shared_prefix=True, packing=False, max_tokens_per_row=1 << 30)
    batchers = [Batcher(m, data) for m in models]
    for m in models:
        m.model.to(dev).eval()
    pairs = []
    for pair in read_decodable_pairs(urls, max_pairs, rejects):
        # As in training: a pair whose text cannot be encoded is rejected, not fatal.
        errors = [e for b in batchers if (e := b.encode_fresh(pair)) is not None]
        pair.video.release()
        if errors:
            rejects.add(pair.name, errors[0])
        else:
            pairs.append(pair)
    out = []
    for start in range(0, len(pairs), batch_pairs):
        chunk = pairs[start:start + batch_pairs]
        logps = []
        for m, b in zip(models, batchers, strict=True):
            for pair in chunk:  # each model's own tokenizer
                pair.encoded = None
            batch = b(chunk)
            logps.append(m.model(**batch_inputs(batch.to(dev, dt)))[0].double())
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
