"""Tensor-parallel collectives as paired autograd functions (Megatron's mappings): what one direction
all-reduces, the other passes through, except for a statistic shared inside the TP region, which is all-reduced
both ways (`all_reduce_tensor_parallel`)."""
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


class _AllReduceTensorParallel(torch.autograd.Function):
    """Forward: all-reduce (sum) partial statistics into the shared one. Backward: all-reduce the gradient too.

    Unlike a row-parallel output, whose sum leaves the TP region (every rank then holds the same full value and
    gradient), a shared statistic is consumed *inside* the region: each rank uses it on its own slice only (a
    column-parallel activation's RMSNorm over the full width, HybridNorm's q/k/v norms). So each rank's incoming
    gradient covers only its own slice's use of the statistic, while its partial sum fed every rank's copy:
    d loss / d partial_r = sum over ranks r' of d loss_r' / d statistic, an all-reduce. An identity backward would
    leave every rank with a wrong gradient for its slice.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # the collective needs a contiguous buffer of its own
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """The sum over the TP group of a statistic every rank goes on using (all-reduce forward and backward)."""
    return _AllReduceTensorParallel.apply(x, group)
