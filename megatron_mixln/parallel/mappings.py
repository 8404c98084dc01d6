"""Tensor-parallel collectives as paired autograd functions (Megatron's mappings): what one direction
all-reduces, the other passes through."""
from __future__ import annotations

import torch
import torch.distributed as dist


class _CopyToTensorParallel(torch.autograd.Function):
    """Forward: identity (every TP rank already holds the full input). Backward: all-reduce the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Forward: all-reduce the partial sums of the TP ranks. Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTensorParallel.apply(x, group)


def reduce_from_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTensorParallel.apply(x, group)
