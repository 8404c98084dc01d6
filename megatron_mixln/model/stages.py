"""The unsplit model's stage modules as DeepSpeed pipeline layer specs: [embedding, decoder layer 0..L-1, LM head].

Each decoder layer spec carries its *global* index, so a stage decides Post-LN / Pre-LN exactly as the
unsplit model does (the first stage may hold every Post-LN layer of Mix-LN). Inside a stage, layers hand the
residual stream on as in the unsplit model, (residual, pending) pairs included; between stages it travels whole.
Parameter names map one to one onto the consolidated names (docs/method.md#parameter-names), which makes
checkpoints portable between layouts.
"""
from __future__ import annotations

import re

import torch

from megatron_mixln.config import ModelConfig
from megatron_mixln.model.llama import stage_constructors, stage_modules
from megatron_mixln.parallel.tensor_parallel import NO_TP, TensorParallel


def num_specs(config: ModelConfig) -> int:
    return config.num_layers + 2


# Parts of the embedding stage (model/llama.py, Embedding), registered under `model.` in the unsplit model.
EMBEDDING_PARTS = ("embed_tokens.", "embed_layernorm.")


def consolidated_name(spec_name: str, num_layers: int) -> str:
    """`3.self_attn.q_proj.weight` (spec 3 = layer 2) -> `model.layers.2.self_attn.q_proj.weight`, etc."""
    index, rest = spec_name.split(".", 1)
    index = int(index)
    if index == 0:
        # `0.weight`: pipeline checkpoints from when stage 0 was the bare embedding (still exported and resumed).
        return f"model.{rest}" if rest.startswith(EMBEDDING_PARTS) else f"model.embed_tokens.{rest}"
    if index <= num_layers:
        return f"model.layers.{index - 1}.{rest}"
    return rest if rest.startswith("lm_head") else f"model.{rest}"  # norm / lm_head


def spec_name(name: str, num_layers: int) -> str:
    """Inverse of consolidated_name."""
    if name.startswith(tuple("model." + part for part in EMBEDDING_PARTS)):
        return "0." + name[len("model."):]
    match = re.match(r"model\.layers\.(\d+)\.(.*)", name)
    if match:
        return f"{int(match.group(1)) + 1}.{match.group(2)}"
    return f"{num_layers + 1}." + (name if name.startswith("lm_head") else name[len("model."):])


def pipeline_layer_specs(config: ModelConfig, tp: TensorParallel = NO_TP) -> list:
    """The unsplit model's stage modules (model/llama.py) as DeepSpeed layer specs: each stage builds its own."""
    from deepspeed.pipe import LayerSpec

    return [LayerSpec(cls, *args) for cls, args in stage_constructors(config, tp, pipeline=True)]


def spec_parameter_counts(config: ModelConfig) -> list[int]:
    """Parameters of each spec (full, unsharded), counted on the meta device: what "parameters" balances."""
    with torch.device("meta"):
        modules = stage_modules(config)
    return [sum(p.numel() for p in module.parameters()) for module in modules]


def stage_boundaries(config: ModelConfig, pp: int, partition: str) -> list[int]:
    """Spec index where each stage starts, plus the end: explicit, uniform, or balanced by parameter count."""
    from deepspeed.runtime import utils as ds_utils

    explicit = [int(b) for b in partition.split(",")] if partition not in ("parameters", "uniform") else None
    if explicit is not None:
        return explicit
    if partition == "uniform":
        bounds = ds_utils.partition_uniform(num_items=num_specs(config), num_parts=pp)
    else:
        bounds = ds_utils.partition_balanced(weights=spec_parameter_counts(config), num_parts=pp)
    return [int(b) for b in bounds]


def post_ln_layers_of_stage(config: ModelConfig, bounds: list[int], stage: int) -> list[int]:
    """Global indices of the Post-LN decoder layers a stage holds (for tests and the start-up summary)."""
    from megatron_mixln.model.norms import POST, norm_placement

    layers = [i - 1 for i in range(bounds[stage], bounds[stage + 1]) if 1 <= i <= config.num_layers]
    return [i for i in layers if norm_placement(i, config.num_layers, config) == POST]


def build_pipeline(config: ModelConfig, layout, seed: int, partition: str = "parameters",
                   activation_checkpointing: bool = False):
    """The pipeline module of this rank's stage, initialised exactly like the unsplit model."""
    from deepspeed.pipe import PipelineModule

    from megatron_mixln.model.layers import hidden_state
    from megatron_mixln.model.llama import initialize_weights

    tp = layout.tensor_parallel
    bounds = stage_boundaries(config, layout.pp, partition)

    class MixLNPipeline(PipelineModule):
        def _partition_layers(self, method="parameters"):
            # Our boundaries (explicit or computed once, identically on every rank) replace DeepSpeed's.
            self.parts = bounds
            self._set_bounds(start=bounds[self.stage_id], stop=bounds[self.stage_id + 1])

        def forward(self, inputs):
            # Inside the stage layers pass (residual, pending) pairs; the stage hands on one tensor, because
            # DeepSpeed partitions exactly one activation over the TP ranks when it sends it to the next stage.
            return hidden_state(super().forward(inputs))

    # loss_fn is installed by the training step engine (train/step.py), which owns loss and token accounting.
    module = MixLNPipeline(
        layers=pipeline_layer_specs(config, tp), topology=layout.grid._topo, loss_fn=None,
        partition_method=partition,
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        checkpointable_layers=["DecoderLayer"] if activation_checkpointing else None)
    initialize_weights(module, config, seed, tp, name_of=lambda local: consolidated_name(local, config.num_layers))
    module.stage_bounds = bounds
    return module
