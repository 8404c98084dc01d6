"""The LLaMA decoder layer (attention, SwiGLU MLP) with its normalisation placement chosen by global index."""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from megatron_mixln.config import ModelConfig
from megatron_mixln.model import ops
from megatron_mixln.model.norms import (DEEPNORM, HYBRID, HYBRID_PRE, LNS, NORM_NAMES, POST, PRE, QKV_NORM_KINDS,
                                        QKV_NORM_NAMES, SANDWICH, ColumnParallelRMSNorm, RMSNorm,
                                        deepnorm_residual_scale, local_sum_of_squares, norm_placement)
from megatron_mixln.parallel.mappings import all_reduce_tensor_parallel, copy_to_tensor_parallel
from megatron_mixln.parallel.tensor_parallel import NO_TP, ColumnParallelLinear, RowParallelLinear, TensorParallel


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE in the HF LLaMA convention: fp32 inverse frequencies, rotate_half over two halves.

    Holds no buffer, so casting the model to bf16 cannot round the frequencies; in eager mode the last (cos, sin)
    is cached per (length, dtype, device), since every forward of a run asks for the same one.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self._cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def forward(self, seq_len: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            # Inside a compiled layer the table is part of the graph (a few fused element-wise ops): a Python-side
            # cache would be a mutation of module state, which breaks the graph or guards on it.
            return self._table(seq_len, dtype, device)
        key = (seq_len, dtype, device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, *self._table(seq_len, dtype, device))
        return self._cache[1], self._cache[2]

    def _table(self, seq_len: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponents)
        angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        positions = torch.arange(seq_len, device=device, dtype=angle_dtype)
        angles = torch.outer(positions, inv_freq.to(angle_dtype))
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


@torch.no_grad()
def max_causal_logit(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """max of q.k / sqrt(head_dim) over batch, heads and the (query, key) pairs the causal mask allows, as an fp32
    device scalar; q, k: [batch, heads, seq, head_dim] as attention sees them (after RoPE). Makes the
    [batch, heads, seq, seq] fp32 logits that fused attention never holds (train/memory.py counts them)."""
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(1.0 / math.sqrt(q.shape[-1]))
    seq = q.shape[-2]
    future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu_(1)
    return logits.masked_fill_(future, -math.inf).amax()


# The residual stream between layers: a tensor, or (residual, pending) whose sum is the hidden state. Layers,
# pipeline stages and the final norm all pass it on as it is, so every residual add can fuse into the next norm.
Stream = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def split_stream(stream: Stream) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (stream, None) if isinstance(stream, torch.Tensor) else (stream[0], stream[1])


def stream_args(stream: Stream) -> tuple[torch.Tensor, ...]:
    """A stream as a layer's positional arguments: (tensor,) or (residual, pending)."""
    return (stream,) if isinstance(stream, torch.Tensor) else tuple(stream)


def stream_from_args(args: tuple) -> Stream:
    """The stream a stage module was called with, from its positional arguments (what a forward hook sees): the
    inverse of `stream_args`, also for a pair passed as one tuple (a pipeline stage) or the head's one stream."""
    return args if len(args) == 2 else args[0]


def hidden_state(stream: Stream) -> torch.Tensor:
    """The hidden state a stream stands for, as one tensor (what the next layer sees)."""
    residual, pending = split_stream(stream)
    return residual if pending is None else residual + pending


class Attention(nn.Module):
    """Causal multi-head self-attention through scaled_dot_product_attention; no biases.

    Under tensor parallelism q/k/v are column-parallel (each rank owns num_heads / tp whole heads) and o_proj
    is row-parallel: one all-reduce forward, one backward (Megatron).

    `qkv_norm` (HybridNorm): q, k and v are each RMS-normalised over the full projection width (not per head)
    right after their projections, before RoPE: softmax(N_q(W_q x) N_k(W_k x)^T) N_v(W_v x). Under tensor
    parallelism the three norms share one extra all-reduce each way (ColumnParallelRMSNorm).
    """

    def __init__(self, config: ModelConfig, tp: TensorParallel = NO_TP, qkv_norm: bool = False):
        super().__init__()
        hidden, self.head_dim = config.hidden_size, config.head_dim
        self.tp = tp
        # q, k and v read the same input: copy it to the TP region once (one backward all-reduce, not three).
        self.q_proj = ColumnParallelLinear(hidden, hidden, tp, copy_input=False)
        self.k_proj = ColumnParallelLinear(hidden, hidden, tp, copy_input=False)
        self.v_proj = ColumnParallelLinear(hidden, hidden, tp, copy_input=False)
        self.o_proj = RowParallelLinear(hidden, hidden, tp)
        self.qkv_norm = qkv_norm
        if qkv_norm:
            for name in QKV_NORM_NAMES:
                self.add_module(name, ColumnParallelRMSNorm(hidden, config.rms_norm_eps, tp, config.kernels))
        self.rotary = RotaryEmbedding(self.head_dim, config.rope_theta)
        # Stability telemetry (train/telemetry.py) sets the flag for one forward-only pass on its steps; the forward
        # then keeps the largest pre-softmax logit in `max_logit`. Off, it costs one attribute test.
        self.record_max_logit = False
        self.max_logit: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        if self.tp.size > 1:
            x = copy_to_tensor_parallel(x, self.tp.group)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qkv_norm:
            q, k, v = self._normed_qkv(q, k, v)
        # -1 heads: under tensor parallelism the projections hold only this rank's heads.
        q, k, v = (t.view(batch, seq, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        cos, sin = self.rotary(seq, q.dtype, q.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.record_max_logit:
            self._record_max_logit(q, k)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))

    @torch.compiler.disable  # eager even inside a compiled layer: a graph break on telemetry steps only
    def _record_max_logit(self, q: torch.Tensor, k: torch.Tensor) -> None:
        value = max_causal_logit(q, k)
        self.max_logit = value if self.max_logit is None else torch.maximum(self.max_logit, value)

    def _normed_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.tp.size == 1:
            return self.q_norm(q), self.k_norm(k), self.v_norm(v)
        # Each norm needs its full width's sum of squares; the three travel in one all-reduce, not three. The norms
        # are still called as modules (hooks, and ZeRO-3's fetching of their gains, see them).
        sums = all_reduce_tensor_parallel(torch.cat([local_sum_of_squares(t) for t in (q, k, v)], dim=-1),
                                          self.tp.group)
        return self.q_norm(q, sums[..., 0:1]), self.k_norm(k, sums[..., 1:2]), self.v_norm(v, sums[..., 2:3])


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); gate/up column-parallel, down row-parallel."""

    def __init__(self, config: ModelConfig, tp: TensorParallel = NO_TP):
        super().__init__()
        self.tp = tp
        self.gate_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size, tp, copy_input=False)
        self.up_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size, tp, copy_input=False)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, tp)
        self.kernels = config.kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size > 1:
            x = copy_to_tensor_parallel(x, self.tp.group)  # once for gate and up
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x), self.kernels))


class DecoderLayer(nn.Module):
    """One transformer layer; its block kind (Pre-LN, Post-LN, ...) follows from its global index.

    Pre-LN / LNS:  h = x + Attn(N1(x));            y = h + MLP(N2(h))       (LNS: N1, N2 scaled by 1/sqrt(i+1))
    Post-LN:       h = N1(x + Attn(x));            y = N2(h + MLP(h))
    DeepNorm:      h = N1(a*x + Attn(x));          y = N2(a*h + MLP(h))     a = (2L)^(1/4)
    Sandwich:      h = x + N2(Attn(N1(x)));        y = h + N4(MLP(N3(h)))     (also every Peri-LN layer)
    HybridNorm:    h = x + Attn_qkv(x);            n = N(h); y = n + MLP(n)  (Attn_qkv: q, k, v normalised)
    HybridNorm* 0: h = x + Attn_qkv(N1(x));        y = h + MLP(N2(h))       (layer 0 of hybrid_star)
    """

    def __init__(self, config: ModelConfig, layer_index: int, tp: TensorParallel = NO_TP):
        super().__init__()
        self.layer_index = layer_index  # global: the same under any pipeline split
        self.placement = norm_placement(layer_index, config.num_layers, config)
        self.self_attn = Attention(config, tp, qkv_norm=self.placement in QKV_NORM_KINDS)
        self.mlp = MLP(config, tp)
        output_scale = 1.0 / math.sqrt(layer_index + 1) if self.placement == LNS else 1.0
        self.norm_names = NORM_NAMES[self.placement]
        for name in self.norm_names:
            self.add_module(name, RMSNorm(config.hidden_size, config.rms_norm_eps, output_scale, config.kernels))
        self.residual_scale = deepnorm_residual_scale(config.num_layers) if self.placement == DEEPNORM else 1.0

    def forward(self, stream: Stream, pending: torch.Tensor | None = None) -> Stream:
        """The layer on the residual stream: a tensor, or a (residual, pending) pair meaning residual + pending,
        passed as one argument (a pipeline stage) or as two (`layer(*stream)`, what the unsplit model does: module
        hooks then see both tensors, as ZeRO-3's per-layer gathering needs, see model/llama.py).

        A residual add that a norm follows is never done alone: the previous layer's last branch output
        (`pending`) is added inside this layer's first norm, and this layer's last branch output is left for
        the next layer's first norm (or the final norm). Post-LN and HybridNorm layers need their input whole.
        """
        x, pending = split_stream(stream) if pending is None else (stream, pending)
        if self.placement in (PRE, LNS):
            normed, x = self._first_norm(self.input_layernorm, x, pending)
            normed, h = self.post_attention_layernorm.add_and_norm(self.self_attn(normed), x)
            return h, self.mlp(normed)
        if self.placement in (POST, DEEPNORM):
            x = x if pending is None else x + pending
            a = self.residual_scale
            h, _ = self.post_attention_layernorm.add_and_norm(self.self_attn(x), x if a == 1.0 else a * x)
            y, _ = self.post_feedforward_layernorm.add_and_norm(self.mlp(h), h if a == 1.0 else a * h)
            return y
        if self.placement == SANDWICH:
            normed, x = self._first_norm(self.input_layernorm, x, pending)
            attn_out = self.post_attention_layernorm(self.self_attn(normed))
            normed, h = self.pre_feedforward_layernorm.add_and_norm(attn_out, x)
            return h, self.post_feedforward_layernorm(self.mlp(normed))
        # The HybridNorm kinds hand on one tensor, not a pair: their successor is a HYBRID layer, whose attention
        # reads its input whole (no norm to fuse the add into), so a pair would only move the add and make a
        # checkpointed layer keep two tensors; only the final norm after the last layer loses its fused add.
        if self.placement == HYBRID:
            x = x if pending is None else x + pending  # the attention reads the un-normalised input, as Post-LN
            normed, _ = self.post_attention_layernorm.add_and_norm(self.self_attn(x), x)  # n = N(x + Attn(x))
            return normed + self.mlp(normed)  # the FFN residual is taken after the norm
        if self.placement == HYBRID_PRE:
            normed, x = self._first_norm(self.input_layernorm, x, pending)
            normed, h = self.post_attention_layernorm.add_and_norm(self.self_attn(normed), x)
            return h + self.mlp(normed)
        raise AssertionError(f"unhandled placement {self.placement}")

    @staticmethod
    def _first_norm(norm: RMSNorm, x: torch.Tensor, pending: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return (norm(x), x) if pending is None else norm.add_and_norm(pending, x)

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}, placement={self.placement}"
