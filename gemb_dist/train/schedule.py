"""Learning-rate schedule: linear warmup to the peak lr, then cosine, linear or constant decay to `min_lr_ratio`."""

from __future__ import annotations

import math

import torch

from gemb_dist.config import OptimizerConfig


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Factor applied to the peak lr before optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"optimizer.schedule must be one of cosine, linear, constant; got {schedule!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimizerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `total_steps` optimizer steps; its state is saved with every checkpoint."""
    if total_steps <= 0:
        raise ValueError(f"total training steps must be positive, got {total_steps}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            step,
            total_steps=total_steps,
            warmup_steps=config.warmup_steps,
            schedule=config.schedule,
            min_lr_ratio=config.min_lr_ratio,
        ),
    )
