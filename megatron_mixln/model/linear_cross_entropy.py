"""The LM head's projection and the cross-entropy fused and chunked over tokens (`model.fused_cross_entropy`).

The unfused head materialises the logits [tokens x vocab] in the model dtype, their fp32 copy for the loss and
the fp32 gradient of that copy: at 32000 words and 4096 tokens per micro-batch, about 1.6 GB, the largest
activation of a small model. Here the tokens go through in chunks; each chunk's logits live only while its
loss and gradients are computed, so the head's extra memory is one chunk's logits plus the weight gradient.

As in Liger-Kernel's fused linear cross-entropy, the gradients are computed in the forward pass (it returns
the *sum* of the per-token losses, whose gradient with respect to each loss is 1) and the backward only scales
them by the incoming gradient: no second projection. Under tensor parallelism the weight is this rank's
vocabulary slice and each chunk's statistics are vocab-parallel (`cross_entropy_parts`); the hidden states'
gradient is this rank's partial sum, completed by the all-reduce of the copy into the TP region before it.
The optional z-loss (`train.z_loss`) adds its gradient, 2 z log Z softmax, to each chunk's (`loss_gradient`).
"""
from __future__ import annotations

import math

import torch

from megatron_mixln.parallel.tensor_parallel import (IGNORE_INDEX, cross_entropy_parts, log_partition_summary,
                                                     loss_dtype, loss_gradient, merge_log_partition_summaries)


# Fewer tokens per chunk would make each chunk's matmuls too small to run at speed (a 1024 x 32000 fp32 logits
# chunk is 131 MB).
MIN_CHUNK_TOKENS = 1024


def chunk_tokens(tokens: int, local_vocab: int, hidden: int) -> int:
    """Tokens per chunk: about as many logits as the hidden states hold (Liger's rule), a power of two, at least
    MIN_CHUNK_TOKENS (or all the tokens, when there are fewer)."""
    chunks = max(1, math.ceil(local_vocab / hidden))
    liger = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(tokens / chunks)))))
    return max(1, min(tokens, max(liger, MIN_CHUNK_TOKENS)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, group, chunk, z_loss, with_log_partition):
        keep = labels != IGNORE_INDEX
        labels = labels.masked_fill(~keep, 0)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        accumulate = loss_dtype(hidden.dtype)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        summary = None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            x = hidden[rows]
            loss, softmax, safe_labels, mine, log_partition = cross_entropy_parts(
                (x @ weight.t()).to(accumulate), labels[rows], vocab_start, group, z_loss)
            total += (loss * keep[rows]).sum()
            if with_log_partition:
                here = log_partition_summary(log_partition, keep[rows])
                summary = here if summary is None else merge_log_partition_summaries(summary, here)
            if need_grad:
                grad = loss_gradient(softmax, safe_labels, mine, log_partition, z_loss).mul_(keep[rows].unsqueeze(-1))
                grad = grad.to(weight.dtype)
                grad_hidden[rows] = grad @ weight
                grad_weight += grad.t() @ x
        if need_grad:  # accumulated in fp32 over the chunks, kept in the weight's dtype (half the bytes in bf16)
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        if not with_log_partition:
            return total
        ctx.mark_non_differentiable(summary)
        return total, summary

    @staticmethod
    def backward(ctx, grad_total, *grad_summary):
        grad_hidden, grad_weight = ctx.saved_tensors

        def scaled(grad: torch.Tensor) -> torch.Tensor:
            # In fp32, rounded once: a bf16 copy of the scale (e.g. 1/tokens) is off by up to 0.4 %.
            return (grad.to(grad_total.dtype) * grad_total).to(grad.dtype)

        return (scaled(grad_hidden) if ctx.needs_input_grad[0] else None,
                scaled(grad_weight) if ctx.needs_input_grad[1] else None, None, None, None, None, None, None)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_start: int = 0,
                             group=None, chunk: int | None = None, z_loss: float = 0.0,
                             with_log_partition: bool = False):
    """Sum over positions with a target of cross-entropy(hidden @ weight^T, label) (+ `z_loss` (log Z)^2, PaLM's
    z-loss), fp32, without the whole logits tensor. `weight` is [local vocab, hidden] (this rank's slice from
    `vocab_start` under TP, with its `group`); labels equal to IGNORE_INDEX add nothing. `chunk`: tokens per chunk
    (default: `chunk_tokens`). `with_log_partition`: returns (the sum, the float64 [sum, max, count] of log Z over the
    targets: `log_partition_summary`) instead."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    chunk = chunk or chunk_tokens(flat.shape[0], weight.shape[0], weight.shape[1])
    return _LinearCrossEntropy.apply(flat, weight, flat_labels, vocab_start, group, chunk, z_loss,
                                    with_log_partition)
