"""RMSNorm and the placement rule: which normalisation scheme global layer i uses (docs/method.md)."""
from __future__ import annotations

import math

import torch
from torch import nn

from megatron_mixln.config import ModelConfig
from megatron_mixln.model import ops
from megatron_mixln.parallel.mappings import all_reduce_tensor_parallel
from megatron_mixln.parallel.tensor_parallel import NO_TP, TensorParallel, sharded_parameter

# The block kind of one decoder layer. Placements that are not block kinds resolve per layer: "mix" to "post" or
# "pre", "peri" to "sandwich" (its layers are Sandwich blocks; what makes it Peri-LN is the embedding norm), and
# "hybrid_star" to "hybrid_pre" for layer 0 and "hybrid" for the others.
PRE, POST, DEEPNORM, SANDWICH, LNS = "pre", "post", "deepnorm", "sandwich", "lns"
HYBRID, HYBRID_PRE = "hybrid", "hybrid_pre"

# Parameter names of each block kind's norms on the residual stream, in order of use (official code / HF LLaMA
# naming); the q/k/v norms of the HybridNorm kinds live inside the attention (QKV_NORM_NAMES).
NORM_NAMES = {
    PRE: ("input_layernorm", "post_attention_layernorm"),
    LNS: ("input_layernorm", "post_attention_layernorm"),
    POST: ("post_attention_layernorm", "post_feedforward_layernorm"),
    DEEPNORM: ("post_attention_layernorm", "post_feedforward_layernorm"),
    SANDWICH: ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    HYBRID: ("post_attention_layernorm",),
    HYBRID_PRE: ("input_layernorm", "post_attention_layernorm"),
}
# HybridNorm's norms of the q, k and v projections (`self_attn.q_norm`, ...), and the block kinds that have them.
QKV_NORM_NAMES = ("q_norm", "k_norm", "v_norm")
QKV_NORM_KINDS = (HYBRID, HYBRID_PRE)


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
    if placement == "peri":
        return SANDWICH
    if placement == "hybrid_star":
        # HybridNorm*: the first layer keeps Pre-LN attention and FFN (plus the q/k/v norms).
        return HYBRID_PRE if layer_index == 0 else HYBRID
    return placement


def has_embedding_norm(config: ModelConfig) -> bool:
    """Whether the embedding output is normalised (`model.embed_layernorm`): Peri-LN only."""
    return config.norm_placement == "peri"


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


def local_sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """Sum of x^2 over the last dim, kept as a dim of 1, in fp32 (float64 stays float64), as RMSNorm's statistic."""
    return x.to(torch.promote_types(x.dtype, torch.float32)).pow(2).sum(-1, keepdim=True)


class ColumnParallelRMSNorm(RMSNorm):
    """RMSNorm over the *full* width of a column-parallel activation: HybridNorm's q/k/v norms.

    Under tensor parallelism this rank holds a slice of the width (the columns of q/k/v_proj it owns), while the
    statistic is the mean square over the whole width. So the local sums of squares are summed over the TP group
    with `all_reduce_tensor_parallel` (all-reduce forward and backward: every rank's slice depends on every rank's
    partial sum), and the gain is sharded like the columns (partition_dim 0, `tensor_model_parallel`), so
    initialisation, export and the gradient norm treat it as they treat q/k/v_proj.

    At TP 1 it is a plain RMSNorm through the kernels switch. Under TP it runs in PyTorch, in the same order of
    operations, because a fused kernel takes its statistic over the slice it sees.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, tp: TensorParallel = NO_TP, kernels: str = "auto"):
        super().__init__(hidden_size, eps, kernels=kernels)
        self.tp = tp
        self.full_width = hidden_size
        self.weight = sharded_parameter((hidden_size,), 0, tp, "hidden_size")
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor, sum_of_squares: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise this rank's slice `x`; `sum_of_squares` is the full width's statistic when the caller already
        all-reduced it (batched with other norms'), else this norm reduces its own."""
        if self.tp.size == 1:
            return super().forward(x)
        if sum_of_squares is None:
            sum_of_squares = all_reduce_tensor_parallel(local_sum_of_squares(x), self.tp.group)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = xf * torch.rsqrt(sum_of_squares / self.full_width + self.eps)
        return self.weight * normed.to(x.dtype)  # HF order: round to the input dtype, then the gain

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("a column-parallel norm follows a projection, never a residual add")

    def extra_repr(self) -> str:
        return f"{self.full_width}, eps={self.eps}, tp={self.tp.size}, kernels={self.kernels}"
