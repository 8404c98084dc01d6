"""Learning-rate schedule of the paper: linear warmup over a fraction of steps, then cosine to a floor."""
from __future__ import annotations

import math


def lr_multiplier(step: int, total_steps: int, warmup_fraction: float, min_lr_ratio: float) -> float:
    """Factor on the peak LR for optimiser step `step` (0-based: the LR the (step+1)-th update uses)."""
    warmup = int(warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
