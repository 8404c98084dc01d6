"""Model FLOPs per token, counted from the config: the numerator of MFU (docs/performance.md).

Only matrix products count (PaLM / Megatron convention): norms, activations, RoPE and the softmax are a few
FLOPs per element and are left out, as torch's FlopCounterMode leaves them out. Per token of a sequence of
length s, with L layers, hidden h, FFN width f and vocabulary V (every placement has the same matmuls; HybridNorm's
q/k/v norms and the extra norms of Sandwich / Peri-LN are elementwise):

    forward matmul parameters   N = L (4 h^2 + 3 h f) + h V        (q, k, v, o; gate, up, down; the LM head)
    forward                     2 N + 4 L s h                      (q k^T and the weighted sum of v, full s x s)
    training                    3 x forward = 6 N + 12 L s h       (the backward of a product costs two products)

The attention term counts the whole s x s score matrix, as PaLM, Megatron-LM and torchtitan do, although a causal
kernel computes about half of it; activation recomputation (`train.activation_checkpointing`) is not counted:
it is hardware FLOPs, not model FLOPs.
"""
from __future__ import annotations

from megatron_mixln.config import ModelConfig


def matmul_parameters(config: ModelConfig) -> int:
    """Weights that take part in a matrix product per token: every projection and the LM head (not the
    embedding, a lookup)."""
    h, f = config.hidden_size, config.intermediate_size
    return config.num_layers * (4 * h * h + 3 * h * f) + h * config.vocab_size


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    return 2 * matmul_parameters(config) + 4 * config.num_layers * seq_len * config.hidden_size


def training_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Model FLOPs of one training token (forward and backward), the numerator of MFU."""
    return 3 * forward_flops_per_token(config, seq_len)
