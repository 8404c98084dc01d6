"""Megatron-style tensor-parallel layers: column- and row-parallel linear, vocab-parallel embedding and
cross-entropy. With a TP size of 1 they are plain Linear / Embedding / cross-entropy, with no collective.

Each sharded parameter records `full_shape` and `partition_dim`, so initialisation can draw the full tensor
and keep this rank's slice (the same weights at any TP degree), and `tensor_model_parallel = True`, which
DeepSpeed's gradient-norm code reads to count replicated parameters (most norms) once. HybridNorm's q/k/v norm
gains are sharded like the q/k/v columns they scale (`ColumnParallelRMSNorm`, model/norms.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_mixln.parallel.mappings import copy_to_tensor_parallel, reduce_from_tensor_parallel

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group (size 1 and group None: no tensor parallelism)."""

    size: int = 1
    rank: int = 0
    group: object = None

    def shard(self, full: int, what: str) -> int:
        if full % self.size:
            raise ValueError(f"{what}={full} is not divisible by the tensor-parallel size {self.size}")
        return full // self.size


NO_TP = TensorParallel()


def sharded_parameter(full_shape: tuple[int, ...], partition_dim: int, tp: TensorParallel, what: str) -> nn.Parameter:
    """An uninitialised parameter holding this rank's slice of `full_shape` along `partition_dim`."""
    shape = list(full_shape)
    shape[partition_dim] = tp.shard(shape[partition_dim], what)
    param = nn.Parameter(torch.empty(shape))
    param.full_shape = tuple(full_shape)
    if tp.size > 1:
        param.partition_dim = partition_dim
        param.tensor_model_parallel = True
    return param


class _ParallelLinear(nn.Module):
    """Shared by the column- and row-parallel layers: a bias-free weight of full shape (out, in), sharded."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, partition_dim: int):
        super().__init__()
        self.tp = tp
        what = "out_features" if partition_dim == 0 else "in_features"
        self.weight = sharded_parameter((out_features, in_features), partition_dim, tp, what)

    def extra_repr(self) -> str:
        out, inp = self.weight.full_shape
        return f"in_features={inp}, out_features={out}, tp={self.tp.size}"


class ColumnParallelLinear(_ParallelLinear):
    """y = x W^T with W split by output rows: each rank produces its slice of y (no gather).

    `copy_input=False` when the caller already passed x through copy_to_tensor_parallel once for several
    layers reading the same input (q/k/v, gate/up): one backward all-reduce instead of one per layer.
    """

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel = NO_TP, copy_input: bool = True):
        super().__init__(in_features, out_features, tp, partition_dim=0)
        self.copy_input = copy_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size > 1 and self.copy_input:
            x = copy_to_tensor_parallel(x, self.tp.group)
        return F.linear(x, self.weight)


class RowParallelLinear(_ParallelLinear):
    """y = x W^T with W split by input columns: each rank holds its slice of x, partial products are summed."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel = NO_TP):
        super().__init__(in_features, out_features, tp, partition_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        return reduce_from_tensor_parallel(out, self.tp.group) if self.tp.size > 1 else out


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary rows are split over TP ranks; each rank looks up its own ids, then sum."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallel = NO_TP):
        super().__init__()
        self.tp = tp
        self.weight = sharded_parameter((num_embeddings, embedding_dim), 0, tp, "vocab_size")
        self.vocab_start = tp.rank * self.weight.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel(out, self.tp.group)


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The cross-entropy's dtype: fp32, or float64 for a float64 model (reference tests compare in it)."""
    return torch.promote_types(dtype, torch.float32)


def cross_entropy_parts(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group=None,
                        z_loss: float = 0.0):
    """Per-row cross-entropy of fp32 (or float64) `logits` [rows, local vocab] and what its gradient needs.

    With a `group`, the logits are this rank's vocabulary slice starting at `vocab_start`, and the statistics
    take three all-reduces (max, target logit, sum of exp; Megatron's vocab-parallel cross-entropy). Returns
    (loss [rows], softmax [rows, local vocab], safe local labels, whether this rank holds each label, log Z [rows]),
    log Z being the logsumexp of the row over the whole vocabulary (every rank's slice). With `z_loss`, the loss
    adds PaLM's z-loss z_loss * (log Z)^2. `loss_gradient` turns these into d loss / d logits.
    """
    local_vocab = logits.shape[-1]
    row_max = logits.max(dim=-1).values
    if group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - row_max.unsqueeze(-1)
    local_labels = labels - vocab_start
    mine = (local_labels >= 0) & (local_labels < local_vocab)
    safe_labels = local_labels.masked_fill(~mine, 0)
    target = shifted.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
    exp = shifted.exp()
    sum_exp = exp.sum(dim=-1)
    if group is not None:
        dist.all_reduce(target, group=group)
        dist.all_reduce(sum_exp, group=group)
    log_sum_exp = sum_exp.log()
    loss = log_sum_exp - target
    log_partition = row_max + log_sum_exp
    if z_loss:
        loss = loss + z_loss * log_partition.square()
    return loss, exp.div_(sum_exp.unsqueeze(-1)), safe_labels, mine, log_partition


def loss_gradient(softmax: torch.Tensor, safe_labels: torch.Tensor, mine: torch.Tensor, log_partition: torch.Tensor,
                  z_loss: float = 0.0) -> torch.Tensor:
    """d loss / d logits from `cross_entropy_parts`' outputs, in place on `softmax`: softmax - onehot(label) (on the
    rank that holds the label), plus the z-loss's 2 z_loss log Z softmax."""
    if z_loss:
        softmax.mul_((1 + 2 * z_loss * log_partition).unsqueeze(-1))
    return softmax.scatter_add_(-1, safe_labels.unsqueeze(-1), -mine.to(softmax.dtype).unsqueeze(-1))


def log_partition_summary(log_partition: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """float64 [sum, max, count] of log Z over the rows where `keep` (max -inf where there is none), on the device:
    masks, not boolean indexing, which would wait for the device to learn the count."""
    values = log_partition.detach().double()
    return torch.stack([(values * keep).sum(), values.masked_fill(~keep, -math.inf).max(), keep.sum().double()])


def merge_log_partition_summaries(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The summary of two row sets from theirs: sums and counts add, the max is the larger."""
    return torch.stack([a[0] + b[0], torch.maximum(a[1], b[1]), a[2] + b[2]])


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy (+ z-loss) from vocab-sharded logits with three all-reduces (max, target logit, sum
    of exp); also returns log Z per token, which carries no gradient."""

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group, z_loss):
        loss, softmax, safe_labels, mine, log_partition = cross_entropy_parts(
            logits.to(loss_dtype(logits.dtype)), labels, vocab_start, group, z_loss)
        ctx.save_for_backward(softmax, safe_labels, mine, log_partition)
        ctx.z_loss = z_loss
        ctx.mark_non_differentiable(log_partition)
        return loss, log_partition

    @staticmethod
    def backward(ctx, grad_loss, grad_log_partition):
        softmax, safe_labels, mine, log_partition = ctx.saved_tensors
        grad = loss_gradient(softmax.clone(), safe_labels, mine, log_partition, ctx.z_loss)
        return grad * grad_loss.unsqueeze(-1), None, None, None, None


def vocab_parallel_token_losses(logits: torch.Tensor, labels: torch.Tensor, tp: TensorParallel,
                                z_loss: float = 0.0, with_log_partition: bool = False):
    """Per-position cross-entropy (+ `z_loss` (log Z)^2), 0 where the label is IGNORE_INDEX; logits [..., vocab / tp]
    are this rank's vocabulary slice, never gathered (TP size 1: the whole vocabulary, no collective).
    `with_log_partition`: returns (losses, the float64 [sum, max, count] of log Z over the targets) instead."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    per_token, log_partition = _VocabParallelCrossEntropy.apply(flat_logits, flat_labels.masked_fill(~keep, 0),
                                                                tp.rank * logits.shape[-1], tp.group, z_loss)
    if with_log_partition:
        return per_token * keep, log_partition_summary(log_partition, keep)
    return per_token * keep


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Mean of `vocab_parallel_token_losses` over positions with a target (like F.cross_entropy: NaN without one)."""
    return vocab_parallel_token_losses(logits, labels, tp).sum() / (labels != IGNORE_INDEX).sum()


def mark_norm_owners(module: nn.Module, tp: TensorParallel) -> None:
    """Tell DeepSpeed's gradient-norm code which rank counts each parameter, so the norm (and clipping) is
    that of the whole model under TP and PP alike.

    DeepSpeed counts a parameter on the first rank of the model-parallel group (all pipeline stages and TP
    ranks of one replica) or wherever `model_parallel` is set. Without this, a later pipeline stage's
    parameters would be left out of the norm. Shards count everywhere; replicated norms on TP rank 0 only.
    """
    for param in module.parameters():
        param.model_parallel = bool(getattr(param, "tensor_model_parallel", False)) or tp.rank == 0
