"""AdamW and the learning-rate schedule (linear warm-up, then cosine / linear / constant)."""

from __future__ import annotations

import math

import torch

from safevid.config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of `cfg.lr` for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_optimizer(params, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    # A client AdamW avoids compiling DeepSpeed's CPU Adam on first use (about 40 s).
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas),
                             weight_decay=cfg.weight_decay, fused=fused or None)


def build_scheduler(cfg: TrainConfig):
    """A factory DeepSpeed calls with its wrapped optimizer."""
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
