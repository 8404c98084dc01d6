"""Optimisers handed to DeepSpeed: torch Adam/AdamW/SGD (no JIT-compiled ops) that honour DeepSpeed's overflow
contract. SGD (plain, no momentum) is there for equivalence tests: its update is proportional to the gradient,
so a gradient-scale bug (DP averaging, clipping) shows in the weights, where Adam would normalise it away.

DeepSpeed's optimiser wrappers (bf16, ZeRO-1/2/3) compute the global gradient norm before the update and, when
it is not finite, skip the base optimiser's step and set `overflow`; the engine then leaves the LR schedule
where it is and counts the step as skipped. In fp32 without ZeRO there is no wrapper: DeepSpeed calls this
optimiser directly. `GuardedStep` gives that path the same contract, so a bad step is skipped the same way in
every layout and nothing is carried over to the next step.
"""
from __future__ import annotations

import math

import torch


class GuardedStep:
    """`guard()`, when set (fp32 ZeRO-0 only; see train/step.py), returns the global pre-clip gradient norm
    (a collective) and clips the gradients; a non-finite norm skips this update and sets `overflow`, which
    DeepSpeed reads right after `step()` to skip the LR schedule too."""

    guard = None
    overflow = False
    _global_grad_norm = None  # DeepSpeed copies it into engine.get_global_grad_norm()

    def step(self, closure=None):
        if self.guard is not None:
            self._global_grad_norm = self.guard()
            self.overflow = not math.isfinite(self._global_grad_norm)
            if self.overflow:
                self.zero_grad(set_to_none=True)
                return None
        return super().step(closure)


class Adam(GuardedStep, torch.optim.Adam):
    pass


class AdamW(GuardedStep, torch.optim.AdamW):
    pass


class SGD(GuardedStep, torch.optim.SGD):
    pass


def build_optimizer(params, name: str, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                    fused: bool | None = None):
    """`fused` (default: on a GPU host): PyTorch's fused Adam/AdamW, one kernel for all of a group's tensors where
    the for-each implementation launches several per tensor; the same update up to rounding. The group keeps the
    choice wherever its tensors live: with parallel.offload_optimizer, DeepSpeed 0.19.8 steps this optimiser on its
    fp32 partitions in host memory (zero/stage_1_and_2.py and zero/stage3.py, `_optimizer_step`), so on a GPU host
    they run torch's fused CPU kernel (multithreaded, one pass; the per-tensor path would make partition-sized
    temporaries in host memory). A CPU-only host keeps the per-tensor implementation, offloaded or not, whose
    arithmetic is bit for bit the same on per-parameter tensors and on ZeRO's flat partitions: the exact moves
    between ZeRO stages, which the tests check on CPU, rely on that. The fused kernels promise no such thing (the
    CPU kernel's vector tails round differently from its vector body, so an element's last bit can depend on where
    a partition starts): on a GPU host, moves between layouts, and offload on or off, agree to fp32 rounding."""
    if name == "sgd":
        return SGD(params, lr=lr, weight_decay=weight_decay)
    cls = {"adam": Adam, "adamw": AdamW}[name]
    fused = torch.cuda.is_available() if fused is None else fused
    return cls(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused or None)
