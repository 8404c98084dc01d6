"""Stability telemetry (train.telemetry_every, docs/stability.md): per layer, the residual stream's RMS and max, the
largest pre-softmax attention logit and the update-to-weight ratio, and the output log-partition, measured on a step's
own micro-batches by one extra forward-only pass through the step engine's evaluation path.

Nothing is hooked or armed between telemetry steps: `measure` registers its hooks and sets the attention and head
flags for its one pass and removes them before it returns. Every rank calls it at the same step; its collectives are
the evaluation pass's own and one SUM and one MAX all-reduce over the whole world.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_mixln.model.layers import DecoderLayer, hidden_state
from megatron_mixln.train.step import Batch, StepEngine, StepResult, squared_norm

EMBEDDING_KEY = "embed_tokens"  # the stream the embedding stage hands to layer 0 (after Peri-LN's embedding norm)


def telemetry_due(train_config, step: int) -> bool:
    """Whether optimiser step `step` is a telemetry step (train.telemetry_every > 0 and step a multiple of it)."""
    every = train_config.telemetry_every
    return every > 0 and step % every == 0


class _Slots:
    """Device accumulators indexed like `steps.layer_keys`, the same shape on every rank whatever it holds."""

    def __init__(self, steps: StepEngine):
        size, device = len(steps.layer_keys), steps.device
        self.index = {key: i for i, key in enumerate(steps.layer_keys)}
        self.device = device
        # Tensor-parallel ranks hold the same residual stream and the same log-partition: counted once, on TP rank 0.
        self.counts_here = steps.tp.rank == 0
        self.squares = torch.zeros(size, dtype=torch.float64, device=device)
        self.elements = torch.zeros(size, dtype=torch.float64, device=device)
        self.weight_squares = torch.zeros(size, dtype=torch.float64, device=device)
        self.max_abs = torch.full((size,), -math.inf, dtype=torch.float64, device=device)
        self.max_logit = torch.full((size,), -math.inf, dtype=torch.float64, device=device)
        self.log_partition = torch.zeros(2, dtype=torch.float64, device=device)  # sum, count
        self.log_partition_max = torch.full((1,), -math.inf, dtype=torch.float64, device=device)

    def stream(self, key: str, stream) -> None:
        hidden = hidden_state(stream).detach()
        slot = self.index[key]
        low, high = torch.aminmax(hidden)  # max |x| without an |x| copy of the activation
        largest = torch.maximum(-low, high).to(self.device, torch.float64)
        self.max_abs[slot] = torch.maximum(self.max_abs[slot], largest)
        if self.counts_here:
            self.squares[slot] += squared_norm(hidden).to(self.device)
            self.elements[slot] += hidden.numel()

    def head(self, head) -> None:
        stats = head.log_partition_stats  # float64 [sum, max, count] of this forward's targets (model/llama.py)
        if stats is None:
            return
        stats = stats.to(self.device)
        self.log_partition_max[0] = torch.maximum(self.log_partition_max[0], stats[1])
        if self.counts_here:
            self.log_partition[0] += stats[0]
            self.log_partition[1] += stats[2]


def _embeddings(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The embedding stage module(s) in `module`: a pipeline's first stage holds it; the unsplit model keeps it
    outside its module tree (MixLNForCausalLM.stages())."""
    from megatron_mixln.model.llama import Embedding, MixLNForCausalLM

    found = []
    for m in module.modules():
        if isinstance(m, Embedding):
            found.append(m)
        elif isinstance(m, MixLNForCausalLM):
            found.append(m.embedding)
    return found


def _arm(stack: ExitStack, steps: StepEngine, slots: _Slots) -> list[tuple[str, torch.nn.Module]]:
    """Hooks and flags for one pass, undone when `stack` closes; returns (layer key, attention) pairs to read."""
    from megatron_mixln.model.llama import log_partition_modules

    module = steps.module
    attentions = []
    for embedding in _embeddings(module):
        stack.callback(embedding.register_forward_hook(
            lambda _m, _args, out: slots.stream(EMBEDDING_KEY, out)).remove)
    for layer in (m for m in module.modules() if isinstance(m, DecoderLayer)):
        key = f"layer_{layer.layer_index:03d}"
        stack.callback(layer.register_forward_hook(lambda _m, _args, out, key=key: slots.stream(key, out)).remove)
        attention = layer.self_attn
        attention.record_max_logit, attention.max_logit = True, None
        stack.callback(setattr, attention, "record_max_logit", False)
        stack.callback(setattr, attention, "max_logit", None)
        attentions.append((key, attention))
    for head in log_partition_modules(module):
        head.record_log_partition, head.log_partition_stats = True, None
        stack.callback(setattr, head, "record_log_partition", False)
        stack.callback(setattr, head, "log_partition_stats", None)
        # The head keeps only its latest forward's statistics: gather them after every micro-batch.
        stack.callback(head.register_forward_hook(lambda m, _args, _out: slots.head(m)).remove)
    return attentions


def _weight_squares(steps: StepEngine, slots: _Slots) -> None:
    """Per-layer ||w||^2 of the weights now (after the update), counted like the update norms: TP shards and
    pipeline stages add up; data-parallel replicas hold the same weights (counted 1/dp each) except under ZeRO-3,
    where each DP rank holds its own partition."""
    zero3 = any(hasattr(p, "ds_tensor") for p in steps.module.parameters())
    share = 1.0 if zero3 else 1.0 / steps.layout.dp
    for slot, weight in steps._counted_local_weights():
        slots.weight_squares[slot] += squared_norm(weight).to(slots.device) * share


@torch.no_grad()
def measure(steps: StepEngine, micro_batches: Sequence[Batch], outcome: StepResult) -> dict:
    """One metrics.jsonl record's telemetry fields for the step just taken on `micro_batches` (this rank's
    (input_ids, labels) host tensors) with result `outcome`. Collective: every rank calls it at the same step.

    activation_rms / activation_max: the residual stream each decoder layer hands to the next (Post-LN layers'
    normalised output, a Pre-LN pair's residual + pending sum), and the embedding output as "embed_tokens", over
    every position of the global batch; max_attention_logit: max over heads and causally allowed (query, key)
    pairs of q.k/sqrt(head_dim) after RoPE; update_ratio: ||w_after - w_before|| / ||w_after|| per layer key,
    present when the update was applied and its per-layer norms were read (outcome.layer_update_norms);
    log_partition_mean / _max: log Z of the output softmax over target tokens.
    """
    slots = _Slots(steps)
    with ExitStack() as stack:
        attentions = _arm(stack, steps, slots)
        steps._evaluation_loss_sum(list(micro_batches))  # the plain loss sum (no fault, no token scaling)
        for key, attention in attentions:
            if attention.max_logit is not None:
                slots.max_logit[slots.index[key]] = attention.max_logit.to(slots.device, torch.float64)
    _weight_squares(steps, slots)

    size = len(steps.layer_keys)
    sums = torch.cat([slots.squares, slots.elements, slots.weight_squares, slots.log_partition])
    maxima = torch.cat([slots.max_abs, slots.max_logit, slots.log_partition_max])
    steps.all_reduce(sums)
    steps.all_reduce(maxima, op=dist.ReduceOp.MAX)
    values = torch.cat([sums, maxima]).cpu().tolist()  # the one host sync
    squares, elements, weight_squares = values[:size], values[size:2 * size], values[2 * size:3 * size]
    log_z_sum, log_z_count = values[3 * size:3 * size + 2]
    maxima_at = 3 * size + 2
    max_abs, max_logit = values[maxima_at:maxima_at + size], values[maxima_at + size:maxima_at + 2 * size]
    log_z_max = values[maxima_at + 2 * size]

    keys = steps.layer_keys
    record = {"telemetry": True,
              "activation_rms": {k: math.sqrt(s / n) for k, s, n in zip(keys, squares, elements) if n > 0},
              "activation_max": {k: m for k, m, n in zip(keys, max_abs, elements) if n > 0},
              "max_attention_logit": {k: m for k, m in zip(keys, max_logit) if m > -math.inf}}
    ratios = {key: norm / math.sqrt(weight_squares[keys.index(key)])
              for key, norm in outcome.layer_update_norms.items() if weight_squares[keys.index(key)] > 0}
    if ratios:
        record["update_ratio"] = ratios
    if log_z_count > 0:
        record["log_partition_mean"] = log_z_sum / log_z_count
        record["log_partition_max"] = log_z_max
    return record
