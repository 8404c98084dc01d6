"""The whole LLaMA causal LM with HF parameter names, and its layout-independent initialisation."""
from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from megatron_mixln.config import ModelConfig
from megatron_mixln.model import ops
from megatron_mixln.model.layers import DecoderLayer, Stream, split_stream, stream_args
from megatron_mixln.model.linear_cross_entropy import linear_cross_entropy_sum
from megatron_mixln.model.norms import DEEPNORM, RMSNorm, deepnorm_init_gain, has_embedding_norm
from megatron_mixln.parallel.mappings import copy_to_tensor_parallel
from megatron_mixln.parallel.tensor_parallel import (NO_TP, ColumnParallelLinear, TensorParallel,
                                                     VocabParallelEmbedding, log_partition_summary, loss_dtype,
                                                     vocab_parallel_token_losses)

IGNORE_INDEX = -100


class Embedding(nn.Module):
    """The first pipeline stage: the (vocab-parallel) token embedding `embed_tokens` and, for Peri-LN only, the
    norm of its output `embed_layernorm` (h0 = N_emb(E(tokens))); other placements hold no norm here.

    Its local names are `embed_tokens.weight` (and `embed_layernorm.weight`); the unsplit model registers both
    submodules under `model.` (MixLNForCausalLM), so their consolidated names are `model.embed_tokens.weight` and
    `model.embed_layernorm.weight`.
    """

    def __init__(self, config: ModelConfig, tp: TensorParallel = NO_TP):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.embed_layernorm = (RMSNorm(config.hidden_size, config.rms_norm_eps, kernels=config.kernels)
                                if has_embedding_norm(config) else None)
        self.register_load_state_dict_pre_hook(_embedding_state_dict_before_the_stage_module)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        return hidden if self.embed_layernorm is None else self.embed_layernorm(hidden)


def _embedding_state_dict_before_the_stage_module(module, state_dict, prefix, *args) -> None:
    # Pipeline checkpoints written while stage 0 was the bare embedding hold its weight as `weight`; DeepSpeed
    # loads each stage's file strictly, so renaming it keeps those checkpoints resumable.
    legacy, current = prefix + "weight", prefix + "embed_tokens.weight"
    if legacy in state_dict and current not in state_dict:
        state_dict[current] = state_dict.pop(legacy)


class VocabParallelLMHead(ColumnParallelLinear):
    """The untied LM head `lm_head` (column-parallel over the vocabulary): logits, or given labels the summed
    cross-entropy, through the chunked fused projection + loss when `model.fused_cross_entropy` is set.

    The loss is computed in this module's forward, so ZeRO-3, which gathers a parameter only while its own
    module runs, gathers the head's weight for it.

    `z_loss` (set from `train.z_loss` by `set_z_loss`; 0 = off): in training mode each target token's loss adds
    z_loss * (log Z)^2, log Z the logsumexp of its logits over the whole vocabulary (PaLM's z-loss). In eval mode
    the loss is the pure cross-entropy, so held-out losses do not depend on it.

    `record_log_partition` (telemetry; off by default): while True, every forward given labels overwrites
    `log_partition_stats` with a float64 device tensor [sum of log Z, max of log Z, number of targets] over this
    forward's target tokens (max -inf without one), in train and eval mode alike, without a host sync. The
    statistics cover the whole vocabulary, so every TP rank of a replica holds the same values; across
    data-parallel ranks all-reduce sum and count with SUM and max with MAX (over the DP group: under pipeline
    parallelism only the last stage holds a head, see `log_partition_modules`). Only the latest forward's
    tokens are held, e.g. the last micro-batch of a step.
    """

    def __init__(self, config: ModelConfig, tp: TensorParallel = NO_TP):
        super().__init__(config.hidden_size, config.vocab_size, tp)
        self.fused = config.fused_cross_entropy
        self.z_loss = 0.0
        self.record_log_partition = False
        self.log_partition_stats: torch.Tensor | None = None
        self.row_scores: list[torch.Tensor] | None = None  # a list: forwards given labels append `row_scores`

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(x)
        if self.row_scores is not None:  # downstream scoring (eval mode): whole logits, one micro-batch at a time
            scores = row_scores(super().forward(x), labels, self.tp)
            self.row_scores.append(scores)
            return -scores[:, 0].sum().float()  # the summed loss, from the rows' log-probabilities
        z_loss = self.z_loss if self.training else 0.0
        record = self.record_log_partition
        if not self.fused:
            losses = token_losses(super().forward(x), labels, self.tp, z_loss, with_log_partition=record)
        else:
            group = self.tp.group if self.tp.size > 1 else None
            if group is not None:
                x = copy_to_tensor_parallel(x, group)  # its backward sums the ranks' partial input gradients
            losses = linear_cross_entropy_sum(x, self.weight, labels, self.tp.rank * self.weight.shape[0], group,
                                              z_loss=z_loss, with_log_partition=record)
        if record:
            losses, self.log_partition_stats = losses
        return losses.sum()


def log_partition_modules(module: nn.Module) -> list[VocabParallelLMHead]:
    """The LM heads inside `module` (a whole model, a pipeline stage or a DeepSpeed engine's module): the modules
    whose `record_log_partition` / `log_partition_stats` the telemetry sets and reads (see VocabParallelLMHead).
    Empty for a pipeline stage without the head; one entry otherwise."""
    return [m for m in module.modules() if isinstance(m, VocabParallelLMHead)]


def set_z_loss(module: nn.Module, coefficient: float) -> None:
    """Give every LM head in `module` the z-loss coefficient (`train.z_loss`; 0 = off)."""
    for head in log_partition_modules(module):
        head.z_loss = float(coefficient)


class LMHead(nn.Module):
    """The final RMSNorm (applied for every placement, as the official code does) and the untied LM head.

    It takes the residual stream, so the last layer's pending branch output is added inside the final norm, and
    returns logits, or with `labels` the summed loss. As a pipeline's last stage (`project=False`) it returns
    the normalised hidden states: the labels reach only DeepSpeed's loss function, which applies `lm_head`.
    """

    def __init__(self, config: ModelConfig, tp: TensorParallel = NO_TP, project: bool = True):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels=config.kernels)
        self.lm_head = VocabParallelLMHead(config, tp)
        self.project = project

    def forward(self, stream: Stream, labels: torch.Tensor | None = None) -> torch.Tensor:
        hidden, pending = split_stream(stream)
        normed = self.norm(hidden) if pending is None else self.norm.add_and_norm(pending, hidden)[0]
        return self.lm_head(normed, labels) if self.project else normed


def stage_constructors(config: ModelConfig, tp: TensorParallel = NO_TP,
                       pipeline: bool = False) -> list[tuple[type, tuple]]:
    """The model as the sequence a pipeline cuts into stages, [embedding, decoder layer 0..L-1, LM head], as
    (class, arguments) pairs: built at once by `stage_modules`, or lazily per stage as DeepSpeed layer specs.

    Each module takes the previous one's output (token ids, then the residual stream) and returns its own;
    decoder layers carry their *global* index, so a stage decides Post-LN / Pre-LN as the unsplit model does.
    In a `pipeline` the head leaves the projection to the loss function (LMHead).
    """
    return ([(Embedding, (config, tp))]
            + [(DecoderLayer, (config, index, tp)) for index in range(config.num_layers)]
            + [(LMHead, (config, tp, not pipeline))])


def stage_modules(config: ModelConfig, tp: TensorParallel = NO_TP) -> list[nn.Module]:
    return [cls(*args) for cls, args in stage_constructors(config, tp)]


COMPILED_VARIANTS = 64  # compiled graphs one decoder-layer forward may hold (see compile_decoder_layers)


def compile_decoder_layers(module: nn.Module) -> int:
    """torch.compile each decoder layer's `forward` in place (train.compile); returns how many were compiled.

    The forward, not the module call: hooks (ZeRO-3's parameter fetching, the analyses' hooks) stay outside the
    graph, and parameter names are unchanged. Layers of one block kind share a compiled graph (dynamo guards on
    the structure, not on the layer), so a model compiles a handful of graphs, not one per layer.
    """
    layers = [m for m in module.modules() if isinstance(m, DecoderLayer)]
    # Every block kind compiles a graph per way it runs (training, evaluation, telemetry's hooks armed), and every
    # model built in the same process adds its own to the same code object's cache. Past dynamo's recompile limit
    # (8 in torch 2.13) the layer silently runs eagerly: a third compiled model in one process trained differently.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_VARIANTS)
    for layer in layers:
        layer.forward = torch.compile(layer.forward)
    return len(layers)


def gather_whole_layers_under_zero3(module: nn.Module) -> None:
    """Make each decoder layer one ZeRO-3 unit (DeepSpeed's "leaf module"): the layer's own pre-forward hook, outside
    its compiled forward, gathers all of the layer's parameters, and its gradients are reduced once the layer's
    backward is done. Otherwise ZeRO-3 gathers per submodule, from hooks that would run inside the compiled graph,
    where dynamo would trace the partitioned, empty parameters. The layer's backward hook fires when the
    gradients of its input tensors are ready, which is why the unsplit model passes a (residual, pending) pair as
    two arguments. Call before deepspeed.initialize, which installs the hooks."""
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(module, [DecoderLayer])


class MixLNModel(nn.Module):
    """Holds the embedding, the decoder layers and the final norm under HF LlamaModel's names (and Peri-LN's
    embedding norm as `embed_layernorm`, registered only when there is one, so other state dicts are unchanged)."""

    def __init__(self, embed_tokens: nn.Module, layers: list[nn.Module], norm: nn.Module,
                 embed_layernorm: nn.Module | None = None):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.embed_layernorm = embed_layernorm  # None: a plain attribute, no parameter
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class MixLNForCausalLM(nn.Module):
    """LLaMA with an untied LM head; `forward(input_ids)` returns logits [batch, seq, vocab]
    (under tensor parallelism: this rank's vocabulary slice, for vocab-parallel cross-entropy).

    Built from `stage_modules`, the same modules a pipeline stage holds, and run the way a pipeline stage runs
    them: each through `nn.Module.__call__`, so forward hooks, ZeRO-3's parameter fetching and per-module
    compilation see every layer. Parameters keep HF LLaMA names (model.embed_tokens, model.layers.i, model.norm,
    lm_head; Peri-LN adds model.embed_layernorm).
    """

    def __init__(self, config: ModelConfig, tp: TensorParallel = NO_TP):
        super().__init__()
        self.config = config
        self.tp = tp
        embedding, *layers, head = stage_modules(config, tp)
        self.model = MixLNModel(embedding.embed_tokens, layers, head.norm, embedding.embed_layernorm)
        self.lm_head = head.lm_head
        # The first and last stages' parts are registered above under their HF names; the stage modules themselves
        # stay outside the module tree, so every parameter has exactly one name.
        self.__dict__["embedding"] = embedding
        self.__dict__["head"] = head
        self.activation_checkpointing = False  # recompute each decoder layer in the backward pass

    def stages(self) -> list[nn.Module]:
        return [self.embedding, *self.model.layers, self.head]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                hf_loss: bool = False) -> torch.Tensor:
        """Logits; or, given `labels`, the loss in fp32 (`model.fused_cross_entropy` chunks it without whole logits).

        Our convention (training's): labels already shifted (labels[:, t] is the target of position t), IGNORE_INDEX
        where there is none, and the *sum* over the targets. `hf_loss=True`: transformers' LlamaForCausalLM
        convention, labels unshifted (usually input_ids itself; shifted here), -100 ignored, and the *mean*.
        """
        if labels is not None and hf_loss:
            shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
            return self(input_ids, shifted) / (shifted != IGNORE_INDEX).sum()
        stream = self.embedding(input_ids)
        for layer in self.model.layers:
            # A (residual, pending) pair goes in as two arguments, so module hooks see both tensors.
            if self.activation_checkpointing and self.training:
                stream = torch.utils.checkpoint.checkpoint(layer, *stream_args(stream), use_reentrant=False)
            else:
                stream = layer(*stream_args(stream))
        return self.head(stream, labels=labels)  # by keyword: forward pre-hooks see the stream alone

    @property
    def placements(self) -> list[str]:
        return [layer.placement for layer in self.model.layers]


def token_losses(logits: torch.Tensor, labels: torch.Tensor, tp: TensorParallel = NO_TP, z_loss: float = 0.0,
                 with_log_partition: bool = False):
    """Per-position cross-entropy (fp32; float64 for a float64 model), 0 where the label is IGNORE_INDEX; labels
    are already shifted.

    Under tensor parallelism `logits` is this rank's vocabulary slice and the loss is vocab-parallel. `z_loss` adds
    z_loss * (log Z)^2 per target (log Z: logsumexp over the whole vocabulary), through the vocab-parallel loss's
    hand-written gradient at any TP size. `with_log_partition`: returns (losses, the float64 [sum, max, count] of
    log Z over the targets) instead.
    """
    if tp.size > 1 or z_loss:
        return vocab_parallel_token_losses(logits, labels, tp, z_loss, with_log_partition)
    losses = F.cross_entropy(logits.to(loss_dtype(logits.dtype)).reshape(-1, logits.shape[-1]), labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none")
    if not with_log_partition:
        return losses
    # Telemetry only: one more pass over the logits, leaving the loss exactly as without it.
    log_partition = torch.logsumexp(logits.detach().to(loss_dtype(logits.dtype)).reshape(-1, logits.shape[-1]), -1)
    return losses, log_partition_summary(log_partition, labels.reshape(-1) != IGNORE_INDEX)


@torch.no_grad()
def row_scores(logits: torch.Tensor, labels: torch.Tensor, tp: TensorParallel = NO_TP) -> torch.Tensor:
    """float64 [rows, 2] per row of [rows, seq] `labels` (shifted, IGNORE_INDEX where none): the summed
    log-probability of the row's targets, and 1.0 where every target is the greedy (arg-max) token, else 0.0 - what
    lm-eval's loglikelihood requests return. Under TP `logits` is this rank's vocabulary slice; the result is the
    same on every TP rank (a MAX and a SUM all-reduce over the TP group, nothing gathered)."""
    losses = token_losses(logits, labels, tp).reshape(labels.shape)
    keep = labels != IGNORE_INDEX
    top = logits.float().amax(-1)
    offset = tp.rank * logits.shape[-1]
    local = keep & (labels >= offset) & (labels < offset + logits.shape[-1])
    target = torch.where(local, logits.float().gather(-1, (labels - offset).clamp(0, logits.shape[-1] - 1)
                                                      .unsqueeze(-1)).squeeze(-1), torch.zeros_like(top))
    if tp.size > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp.group)
        dist.all_reduce(target, group=tp.group)  # each target's logit lives on one rank
    greedy = ((target >= top) | ~keep).all(-1)
    return torch.stack([-losses.double().sum(-1), greedy.double()], dim=-1)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, tp: TensorParallel = NO_TP) -> torch.Tensor:
    """Mean cross-entropy over positions whose label is not IGNORE_INDEX (NaN when there is none)."""
    return token_losses(logits, labels, tp).sum() / (labels != IGNORE_INDEX).sum()


def parameter_seed(seed: int, name: str) -> int:
    """A generator seed from (run seed, parameter name): the same full tensor whatever the parallel layout."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def init_std(name: str, shape: tuple[int, ...], config: ModelConfig, placement: str | None) -> float:
    """Standard deviation of the normal initialisation of parameter `name` (HF LLaMA + the paper's switches)."""
    if name.endswith("embed_tokens.weight"):
        return math.sqrt(2.0 / 5.0) if config.scaled_embed_init else config.init_std
    if placement == DEEPNORM and (".self_attn." in name or ".mlp." in name):
        # Xavier-normal; gain (8L)^(-1/4) on v, o and the FFN, 1 on q and k (DeepNet).
        gain = 1.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else deepnorm_init_gain(config.num_layers)
        fan_out, fan_in = shape
        return gain * math.sqrt(2.0 / (fan_in + fan_out))
    if config.scaled_init and name.endswith(("o_proj.weight", "down_proj.weight")):
        return config.init_std / math.sqrt(2.0 * config.num_layers)
    return config.init_std


def full_initial_value(name: str, shape: tuple[int, ...], config: ModelConfig, placement: str | None,
                       seed: int) -> torch.Tensor:
    """The fp32 initial value of the *full* (unsharded) parameter `name`; norm gains are ones."""
    if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(parameter_seed(seed, name))
    return torch.empty(shape).normal_(0.0, init_std(name, shape, config, placement), generator=generator)


def layer_index_of(name: str) -> int | None:
    """The global layer index in a parameter name like `model.layers.7.mlp.up_proj.weight`, else None."""
    parts = name.split(".")
    if "layers" in parts:
        position = parts.index("layers") + 1
        if position < len(parts) and parts[position].isdigit():
            return int(parts[position])
    return None


def shard_of(full: torch.Tensor, param: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """This TP rank's slice of a full tensor, along the parameter's partition dimension (if it is sharded)."""
    dim = getattr(param, "partition_dim", None)
    return full if dim is None or tp.size == 1 else full.chunk(tp.size, dim=dim)[tp.rank]


@torch.no_grad()
def initialize_weights(module: nn.Module, config: ModelConfig, seed: int, tp: TensorParallel = NO_TP,
                       name_of=lambda name: name, gathered=None) -> None:
    """Fill every parameter from its own seeded generator: draw the full tensor, keep this rank's slice.

    Initial weights therefore never depend on the TP/PP layout or on construction order. `name_of` maps a
    local parameter name to its consolidated name (docs/method.md#parameter-names), e.g. for pipeline stages; `gathered(param)`
    is a context that makes a ZeRO-3 partitioned parameter whole while it is written.
    """
    import contextlib

    from megatron_mixln.model.norms import norm_placement

    for local_name, param in module.named_parameters():
        name = name_of(local_name)
        index = layer_index_of(name)
        placement = norm_placement(index, config.num_layers, config) if index is not None else None
        with (gathered(param) if gathered is not None else contextlib.nullcontext()):
            full_shape = tuple(getattr(param, "full_shape", param.shape))
            param.data.copy_(shard_of(full_initial_value(name, full_shape, config, placement, seed), param, tp))


def build_model(config: ModelConfig, seed: int = 0, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, tp: TensorParallel = NO_TP) -> MixLNForCausalLM:
    """Build and initialise the model (fp32 unless `dtype` is given); with `tp`, this rank's shard of it."""
    config.validate()
    ops.check_backend(config.kernels)
    model = MixLNForCausalLM(config, tp)
    initialize_weights(model, config, seed, tp)
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model
