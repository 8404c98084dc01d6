"""RMSNorm and the placement rule: which normalisation scheme global layer i uses (docs/method.md)."""
from __future__ import annotations

import math

import torch
from torch import nn

from megatron_mixln.config import ModelConfig
from megatron_mixln.model import ops

# The block kind of one decoder layer. "mix" is not a block kind: it resolves to "post" or "pre" per layer.
PRE, POST, DEEPNORM, SANDWICH, LNS = "pre", "post", "deepnorm", "sandwich", "lns"

# Parameter names of each block kind's norms, in order of use (official code / HF LLaMA naming).
NORM_NAMES = {
    PRE: ("input_layernorm", "post_attention_layernorm"),
    LNS: ("input_layernorm", "post_attention_layernorm"),
    POST: ("post_attention_layernorm", "post_feedforward_layernorm"),
    DEEPNORM: ("post_attention_layernorm", "post_feedforward_layernorm"),
    SANDWICH: ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
}


def num_post_ln_layers(config: ModelConfig) -> int:
    """Mix-LN's Post-LN layer count: `post_layers` when given, else floor(mix_alpha * L)."""
    if config.post_layers is not None:
        return config.post_layers
    # The epsilon keeps e.g. 0.3 * 10 = 2.9999999999999996 from flooring to 2.
    return min(config.num_layers, math.floor(config.mix_alpha * config.num_layers + 1e-9))


def norm_placement(layer_index: int, num_layers: int, config: ModelConfig) -> str:
    """Block kind of the layer with 0-based *global* index `layer_index` in a model of `num_layers` layers.

    A pure function of the global index: a pipeline stage calls it for each layer it holds, never with
    the index inside the stage.
    """
    if not 0 <= layer_index < num_layers:
        raise ValueError(f"layer_index={layer_index} is outside [0, {num_layers})")
    placement = config.norm_placement
    if placement == "mix":
        return POST if layer_index < num_post_ln_layers(config) else PRE
    return placement


def deepnorm_residual_scale(num_layers: int) -> float:
    """DeepNet's alpha for a decoder-only model: (2L)^(1/4)."""
    return (2.0 * num_layers) ** 0.25


def deepnorm_init_gain(num_layers: int) -> float:
    """DeepNet's beta for a decoder-only model: (8L)^(-1/4) (the official Mix-LN code wrongly uses +1/4)."""
    return (8.0 * num_layers) ** -0.25


class RMSNorm(nn.Module):
    """HF LLaMA's RMSNorm with a learnable gain; `output_scale` (not a parameter) implements LayerNorm Scaling.

    `kernels` picks the backend (model/ops.py); the parameter is the same whichever runs.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, output_scale: float = 1.0, kernels: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.output_scale = output_scale
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.output_scale, self.kernels)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) in one fused pass: a Post-LN tail or a Pre-LN hand-over."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps, self.output_scale, self.kernels)

    def extra_repr(self) -> str:
        scale = f", output_scale={self.output_scale:.4g}" if self.output_scale != 1.0 else ""
        return f"{self.weight.shape[0]}, eps={self.eps}{scale}, kernels={self.kernels}"
