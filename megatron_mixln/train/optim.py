"""Optimisers handed to DeepSpeed: torch Adam/AdamW (no JIT-compiled ops) that can skip one step."""
from __future__ import annotations

import torch


class _SkippableStep:
    """`skip_next_step = True` turns the next `step()` into a no-op, whatever DeepSpeed wrapper calls it.

    DeepSpeed's bf16 and ZeRO wrappers all end in this optimiser's step() on the fp32 master weights, so
    a step skipped here leaves weights and moments untouched at every precision and ZeRO stage.
    `before_step`, when set, runs first with the gradients in place (the pipeline engine steps inside
    train_batch, so this is where its gradients can be inspected); returning True skips the step.
    """

    skip_next_step = False
    before_step = None

    def step(self, closure=None):
        if self.before_step is not None and self.before_step():
            self.skip_next_step = True
        if self.skip_next_step:
            self.skip_next_step = False
            return None
        return super().step(closure)


class Adam(_SkippableStep, torch.optim.Adam):
    pass


class AdamW(_SkippableStep, torch.optim.AdamW):
    pass


def build_optimizer(params, name: str, lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
    cls = {"adam": Adam, "adamw": AdamW}[name]
    return cls(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
