"""Dry run: parameter counts and per-rank memory of model states and activations for a layout, from a model built
on the meta device.

Nothing is allocated, so a 7B config answers in seconds on a laptop. Next to our numbers it prints DeepSpeed's
own estimate (its ZeRO-2 / ZeRO-3 estimators), so a user sees both before asking a cluster for GPUs. ZeRO's
working buffers (live parameters, reduce bucket, ...) and the CUDA context are counted too (`working_memory`).

Activations are counted tensor by tensor: what autograd keeps between a micro-batch's forward and its backward
(`activation_bytes`), the same quantity tests/test_activation_memory.py measures with saved-tensor hooks.
"""
from __future__ import annotations

import torch

from megatron_mixln.config import Config, ConfigError, ModelConfig
from megatron_mixln.parallel.launch import LaunchError, data_parallel_size

GIB = 2**30
# Parameters that tensor parallelism splits (Megatron: vocab-parallel embedding and head, column/row-parallel
# attention and MLP projections, and HybridNorm's q/k/v norm gains, sharded like the q/k/v columns they scale:
# model/norms.py, ColumnParallelRMSNorm). The other norm gains are replicated on every TP rank.
TP_SPLIT = ("embed_tokens", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
            "q_norm", "k_norm", "v_norm")
# Bytes per parameter of (weights, gradients, Adam states). bf16: bf16 weights, gradients accumulated and reduced
# in fp32 (data_types.grad_accum_dtype, train/engine.py), fp32 master weights next to the two moments.
BYTES_PER_PARAM = {"bf16": (2, 4, 12), "fp32": (4, 4, 8)}


def _is_split(name: str) -> bool:
    return any(f".{part}." in f".{name}" for part in TP_SPLIT)


def parameter_counts(model_config: ModelConfig) -> dict:
    """Counts of the full (tp=1) model, from a copy built on the meta device.

    "specs" lists (tensor-parallel-split, replicated) counts per pipeline layer spec:
    [embedding, decoder layer 0..L-1, final norm + head], the units a pipeline stage is cut from.
    """
    from megatron_mixln.model.llama import MixLNForCausalLM

    with torch.device("meta"):
        model = MixLNForCausalLM(model_config)
    num_layers = model_config.num_layers
    specs = [[0, 0] for _ in range(num_layers + 2)]
    for name, param in model.named_parameters():
        parts = name.split(".")
        if "layers" in parts:
            spec = 1 + int(parts[parts.index("layers") + 1])
        else:
            spec = 0 if parts[1].startswith("embed_") else num_layers + 1  # model.embed_tokens, model.embed_layernorm
        specs[spec][0 if _is_split(name) else 1] += param.numel()
    # DeepSpeed's "largest layer": the most parameters held directly by one module (ZeRO-3 gathers one at a time).
    largest = {True: 0, False: 0}
    for module_name, module in model.named_modules():
        direct = sum(param.numel() for param in module.parameters(recurse=False))
        split = _is_split(f"{module_name}.weight")
        largest[split] = max(largest[split], direct)
    embedding = sum(specs[0])
    head = specs[-1][0]
    return {
        "total": sum(map(sum, specs)),
        "embedding": embedding,
        "head": head,
        "final_norm": specs[-1][1],
        "layers": [sum(spec) for spec in specs[1:-1]],
        "placements": model.placements,
        "specs": [tuple(spec) for spec in specs],
        "largest_module": (largest[True], largest[False]),  # (largest split module, largest replicated module)
    }


# Block kinds whose output is the pair (residual, pending branch output): two tensors enter the next layer, which
# is what a checkpointed layer keeps (layers.py, DecoderLayer.forward).
PAIR_OUTPUT = ("pre", "lns", "sandwich")


def activation_bytes(config: Config, tp: int = 1) -> dict:
    """Bytes autograd keeps between the forward and the backward of one micro-batch on one TP rank, per layer spec
    [embedding, decoder layer 0..L-1, head and loss] (the units a pipeline stage is cut from).

    Counted tensor by tensor (T = micro_batch_size x seq_len tokens, a = 2 bytes in bf16, 4 in fp32):
    - a decoder layer: the inputs of q/k/v and of gate/up (T x hidden each, whole on every TP rank); each norm's
      input and fp32 rstd (the PyTorch reference norm, model.kernels=torch, also keeps an fp32 copy of the input
      and the normalised value); attention's q, k, v, output and fp32 log-sum-exp, heads split over TP (fused
      attention: no seq x seq matrix); SwiGLU's gate and up (the PyTorch reference also silu(gate)) and its output
      as down_proj's input, intermediate size split over TP.
    - the embedding: the int64 token ids. The head: the final norm, lm_head's input, the labels and the loss's fp32
      copy of the logits (log-probabilities, T x vocab / TP): for small models the largest single term. With
      model.fused_cross_entropy no logits are kept: the gradients of lm_head's input (T x hidden) and of its
      weight (vocab / TP x hidden), computed in the forward, wait for the backward instead.
    "specs" is that per spec; "checkpointed" the same with each decoder layer reduced to its input stream (one or
    two T x hidden tensors), which is all a checkpointed layer keeps until its recompute.
    """
    from megatron_mixln.model.norms import norm_placement

    model, tokens = config.model, config.train.micro_batch_size * config.data.seq_len
    value = 2 if config.train.precision == "bf16" else 4
    hidden, ffn, heads = model.hidden_size, model.intermediate_size, model.num_heads
    # model.kernels=auto is Triton on the GPUs a dry run plans for; apex fuses the norms but not SwiGLU.
    fused_norms, fused_swiglu = model.kernels in ("auto", "triton", "apex"), model.kernels in ("auto", "triton")
    width = tokens * hidden * value  # one T x hidden activation
    norm = width + 4 * tokens if fused_norms else tokens * hidden * (4 + value) + 4 * tokens
    attention = 4 * tokens * (hidden // tp) * value + 4 * tokens * (heads // tp)
    swiglu = (3 if fused_swiglu else 4) * tokens * (ffn // tp) * value
    placements = [norm_placement(i, model.num_layers, model) for i in range(model.num_layers)]
    layers = [2 * width + (4 if kind == "sandwich" else 2) * norm + attention + swiglu for kind in placements]
    inputs = [width * (2 if i > 0 and placements[i - 1] in PAIR_OUTPUT else 1) for i in range(model.num_layers)]
    split_mask = tokens if tp > 1 else 0  # the vocab-parallel embedding and loss keep a bool mask of their ids
    embedding = 8 * tokens + split_mask
    fused = model.fused_cross_entropy
    logits = 0 if fused else 4 * tokens * (model.vocab_size // tp)
    # The fused loss keeps its finished gradients instead: lm_head's input's (as big as `width`) and the weight's.
    weight_grad = value * (model.vocab_size // tp) * hidden if fused else 0
    head = norm + width + logits + weight_grad + 8 * tokens + split_mask
    return {"tokens": tokens, "value_bytes": value, "fused_kernels": fused_norms and fused_swiglu,
            "fused_cross_entropy": model.fused_cross_entropy,
            "layers": layers, "layer_inputs": inputs, "embedding": embedding, "head": head, "logits": logits,
            "specs": [embedding, *layers, head], "checkpointed": [embedding, *inputs, head]}


def stage_activation_bytes(act: dict, bounds: list[int], stage: int, in_flight: int, checkpointing: bool) -> int:
    """Activation bytes of pipeline stage `stage` (layer specs bounds[stage]:bounds[stage + 1]) with `in_flight`
    micro-batches between their forward and backward. With checkpointing, each micro-batch keeps its layers'
    inputs, and the backward recomputes one layer at a time, holding that layer's activations once more."""
    specs = range(bounds[stage], bounds[stage + 1])
    kept = act["checkpointed"] if checkpointing else act["specs"]
    recompute = max((act["specs"][i] for i in specs if 0 < i < len(act["specs"]) - 1), default=0)
    return in_flight * sum(kept[i] for i in specs) + (recompute if checkpointing else 0)


def _state_bytes(params: float, precision: str, zero: int, dp: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) bytes of `params` parameters on one rank under ZeRO-`zero`."""
    weight_b, grad_b, optim_b = BYTES_PER_PARAM[precision]
    return (params * weight_b / (dp if zero >= 3 else 1), params * grad_b / (dp if zero >= 2 else 1),
            params * optim_b / (dp if zero >= 1 else 1))


# The CUDA context with PyTorch's kernels and NCCL's communicators, a typical size, not measured here: Hugging Face's
# "Model training anatomy" (transformers docs, model_memory_anatomy) finds the kernels alone take 1-2 GB (1.3 GB on
# a V100); lazy module loading (PyTorch's default with CUDA >= 11.7) makes the context smaller, NCCL adds back.
CUDA_CONTEXT_BYTES = GIB
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def working_memory(ds_config: dict, rank_params: int, pp: int, update_norm_elements: int = 0,
                   telemetry: dict | None = None) -> dict:
    """ZeRO's working buffers on one GPU, from the DeepSpeed config our engine builds (train/engine.py,
    deepspeed_config) with DeepSpeed 0.19.8's defaults where it sets nothing (deepspeed/runtime/zero/config.py,
    DeepSpeedZeroConfig: reduce_bucket_size and allgather_bucket_size 5e8, stage3_prefetch_bucket_size 5e7,
    stage3_max_live_parameters 1e9, overlap_comm on for ZeRO-3 only, contiguous_gradients on), plus the CUDA context.

    Each buffer is counted where DeepSpeed allocates it (sizes in elements, bytes per element of its dtype):
    - ZeRO-3 (zero/stage3.py, zero/partitioned_param_coordinator.py): gathered weights up to
      stage3_max_live_parameters (at most the rank's own parameters); the prefetch of stage3_prefetch_bucket_size
      is capped at max_live - live (fetch_sub_module), so it lives inside that limit and is not added; one
      contiguous reduce bucket of reduce_bucket_size in communication_data_type (IPG buffer, allocated whole).
    - ZeRO-1/2 (zero/stage_1_and_2.py, setup_buckets): reduce_bucket_size in the reduction dtype, twice with
      overlap_comm (no overlap under a pipeline); allgather_bucket_size allocates nothing: NCCL's
      all_gather_into_tensor writes straight into the flat weights (runtime/utils.py, all_gather_dp_groups).
    - ZeRO-0, and ZeRO-1 in bf16 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer,
      engine.py _do_optimizer_sanity_check): the engine all-reduces flattened fp32 gradient copies in buckets of
      MEMORY_OPT_ALLREDUCE_SIZE elements (engine.py, allreduce_gradients), a constant the config cannot change.
    - Per-layer update norms (train/step.py, squared_change), every train.layer_grad_norm_every steps:
      `update_norm_elements`, the largest weight share, uploaded from its host copy in the weights' dtype and
      widened to fp32 (0: norms off, no line).
    - Stability telemetry (train/telemetry.py), every train.telemetry_every steps: `telemetry`, what
      `telemetry_attention_bytes` gives (None: telemetry off, no line).
    Each line: name, bytes, elements, bytes per element, the setting and where its value comes from, and whether
    it adds to the total.
    """
    from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ours = ds_config["zero_optimization"]
    zero = DeepSpeedZeroConfig(**ours)
    bf16 = ds_config["bf16"]["enabled"]
    weight_b = 2 if bf16 else 4
    comm_b = DTYPE_BYTES[ds_config.get("communication_data_type", "bf16" if bf16 else "fp32")]
    accum_b = DTYPE_BYTES[ds_config.get("data_types", {}).get("grad_accum_dtype", "bf16" if bf16 else "fp32")]
    offload = "offload_optimizer" in ours

    def line(name, elements, element_b, setting, counted=True, allocated=True):
        return {"name": name, "bytes": elements * element_b if allocated else 0, "elements": elements,
                "element_bytes": element_b, "setting": setting, "counted": counted}

    def setting(key):
        return f"{key} ({'train/engine.py' if key in ours else 'DeepSpeed default'})"

    lines = []
    if zero.stage == 3:
        lines += [line("live parameters", min(zero.max_live_parameters, rank_params), weight_b,
                       setting("stage3_max_live_parameters")),
                  line("prefetch bucket", zero.prefetch_bucket_size, weight_b, setting("stage3_prefetch_bucket_size"),
                       counted=False),
                  line("reduce bucket", zero.reduce_bucket_size if zero.contiguous_gradients else 0, comm_b,
                       setting("reduce_bucket_size"))]
    elif zero.stage == 0 or (zero.stage == 1 and bf16 and accum_b == 4 and not offload):
        lines.append(line("all-reduce bucket", min(MEMORY_OPT_ALLREDUCE_SIZE, rank_params), 4,
                          "MEMORY_OPT_ALLREDUCE_SIZE (DeepSpeed engine constant)"))
    else:
        buffers = 2 if zero.overlap_comm and pp == 1 else 1
        # ZeRO-1 reduces into its fp32 accumulator, ZeRO-2 stages gradients in the weights' dtype.
        reduce_b = accum_b if zero.stage == 1 else weight_b
        lines.append(line("reduce bucket" + (" x 2" if buffers == 2 else ""),
                          buffers * zero.reduce_bucket_size if zero.contiguous_gradients else 0, reduce_b,
                          setting("reduce_bucket_size") + (", overlap_comm" if buffers == 2 else "")))
    if zero.stage in (1, 2):
        lines.append(line("allgather bucket", zero.allgather_bucket_size, weight_b, setting("allgather_bucket_size"),
                          allocated=False))
    if update_norm_elements:
        lines.append(line("update-norm change", update_norm_elements, weight_b + 4 if bf16 else 4,
                          "the largest weight share, uploaded and widened to fp32 (train.layer_grad_norm_every"
                          + (", and every telemetry step" if telemetry else "") + ")"))
    if telemetry:
        lines.append({**line("telemetry attention logits", telemetry["elements"], 4, telemetry["setting"]),
                      "bytes": telemetry["bytes"]})
    lines.append(line("CUDA context", CUDA_CONTEXT_BYTES, 1, "typical size (CUDA, PyTorch's kernels, NCCL)"))
    return {"lines": lines, "bytes": sum(entry["bytes"] for entry in lines if entry["counted"])}


def telemetry_attention_bytes(config: Config, tp: int = 1) -> dict:
    """The telemetry step's extra device memory (train.telemetry_every): the maximum attention logit is taken from
    one layer's q.k^T written out in fp32 (model/layers.py, max_causal_logit), micro_batch x heads / tp x seq x seq,
    which fused attention never holds; beside it the larger of the causal mask (seq x seq bools) and, in bf16, the
    fp32 copies of q and k that the product reads (freed before the mask is made). One layer at a time, in a
    forward without gradients, after the step: what it adds is this, not a layer's activations."""
    model, seq, micro = config.model, config.data.seq_len, config.train.micro_batch_size
    elements = micro * (model.num_heads // tp) * seq * seq
    copies = 2 * 4 * micro * seq * (model.hidden_size // tp) if config.train.precision == "bf16" else 0
    return {"elements": elements, "bytes": 4 * elements + max(seq * seq, copies),
            "setting": f"one layer's {micro} x {model.num_heads // tp} heads x {seq} x {seq} fp32 q.k, with its "
                       f"causal mask{' or q and k in fp32' if copies else ''} (every train.telemetry_every="
                       f"{config.train.telemetry_every} steps)"}


def _pinned(nbytes: int) -> int:
    """What a pinned host tensor of `nbytes` takes: PyTorch's CachingHostAllocator (ATen/core/CachingHostAllocator.h,
    no pinned_max_round_threshold set) rounds every pinned allocation up to a power of two."""
    return 1 << (int(nbytes) - 1).bit_length() if nbytes > 1 else int(nbytes)


def offload_host_plan(config: Config, dp: int = 1, gpu_host: bool = True, rank_params: int | None = None) -> dict:
    """Host memory DeepSpeed 0.19.8 allocates for one rank's offloaded optimizer (parallel.offload_optimizer), buffer
    by buffer, as its ZeRO code allocates them for the config train/engine.py builds (offload_optimizer
    {"device": "cpu"}: pin_memory is DeepSpeed's default, true; torch's Adam, whose two fp32 moments appear at the
    first step). Pinned buffers exist only on a GPU host (`gpu_host`), rounded up to a power of two (`_pinned`);
    `transient` is the largest pageable buffer alive while its pinned copy is made (tensor.pin_memory() copies),
    at the engine's start, before the first step creates the moments; `peak` is the larger of the two moments.

    - ZeRO-3 (zero/stage3.py): per sub-group of stage3 sub_group_size (1e9) elements, the fp32 master partition
      (_create_fp32_partitions, pageable) and its fp32 gradient (initialize_optimizer_states, pinned); one flat
      gradient partition of every parameter in the gradient-accumulation dtype (_setup_for_real_optimizer,
      grad_partitions_flat_buffer, pinned): 4 + 4 + 4 B/param in fp32 accumulation, before the moments.
    - ZeRO-1/2 (zero/stage_1_and_2.py): per parameter group, the fp32 master partition (pinned), a copy of the
      partition in the weights' dtype (param_buffer_of_bit16_for_cpu_offload_groups, pinned) and the fp32
      gradient partition (initialize_optimizer_states, pinned): 4 + 2 (bf16) + 4 B/param before the moments.
    `rank_params`: the parameters the busiest rank holds before ZeRO when tensor or pipeline parallelism splits the
    model (dry_run_summary's figure); each parameter's share is scaled to it. Returns {"lines": [(name, bytes,
    setting)], "bytes": the total after the first step, "transient", "peak": the larger of the total and the
    start's, "bytes_per_param"}; no lines without offload.
    """
    parallel = config.parallel
    if not parallel.offload_optimizer:
        return {"lines": [], "bytes": 0, "transient": 0, "peak": 0}
    from megatron_mixln.model.llama import MixLNForCausalLM

    with torch.device("meta"):
        model = MixLNForCausalLM(config.model)
    numels = [p.numel() for p in model.parameters()]
    scale = (rank_params or sum(numels)) / sum(numels)
    shares = [-(-round(n * scale) // dp) for n in numels]  # this rank's partition of each parameter
    total = sum(shares)
    bf16 = config.train.precision == "bf16"
    weight_b, accum_b = (2 if bf16 else 4), 4  # train/engine.py accumulates gradients in fp32
    moments = 0 if config.train.optimizer == "sgd" else 8  # Adam/AdamW: exp_avg and exp_avg_sq in fp32

    def pinned(nbytes):
        return _pinned(nbytes) if gpu_host else nbytes

    if parallel.zero_stage == 3:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        limit = DeepSpeedZeroConfig().sub_group_size
        groups, current = [], 0
        for share in shares:  # DeepSpeed's _create_fp16_sub_groups: close a sub-group once it reaches the limit
            current += share
            if current >= limit:
                groups.append(current)
                current = 0
        groups += [current] if current else []
        lines = [("fp32 master partitions", 4 * total, f"{len(groups)} sub-groups of stage3 sub_group_size "
                  f"{limit:.0e}, pageable"),
                 ("fp32 gradients", sum(pinned(4 * g) for g in groups), "one per sub-group"
                  + (", pinned" if gpu_host else "")),
                 ("flat gradient partition", pinned(accum_b * total), "grad_accum_dtype fp32, all parameters"
                  + (", pinned" if gpu_host else ""))]
        transient = accum_b * total if gpu_host else 0
    else:
        lines = [("fp32 master partition", pinned(4 * total), "pinned" if gpu_host else "pageable"),
                 (f"{'bf16' if bf16 else 'fp32'} weight copy", pinned(weight_b * total),
                  "param_buffer_of_bit16_for_cpu_offload_groups" + (", pinned" if gpu_host else "")),
                 ("fp32 gradient partition", pinned(4 * total), "pinned" if gpu_host else "pageable")]
        transient = 4 * total if gpu_host else 0
    lines.append(("optimizer moments", moments * total, f"train.optimizer={config.train.optimizer}, torch's, "
                  "created at the first step"))
    steady = sum(nbytes for _, nbytes, _ in lines)
    # The pageable original lives while its pinned copy is made, at the engine's start, before the moments exist.
    peak = max(steady, steady - moments * total + transient)
    return {"lines": lines, "bytes": steady, "transient": transient, "peak": peak,
            "bytes_per_param": steady / total}


def dry_run_summary(config: Config, world_size: int, gpus_per_node: int = 8) -> dict:
    """Parameter counts, per-rank bytes of parameters, gradients and optimizer states, and activations; see
    dry_run_report."""
    from megatron_mixln.model.stages import stage_boundaries
    from megatron_mixln.train.engine import deepspeed_config

    parallel = config.parallel
    tp, pp, zero = parallel.tp, parallel.pp, parallel.zero_stage
    dp = data_parallel_size(world_size, tp, pp)
    if gpus_per_node < 1:
        raise LaunchError(f"--gpus-per-node={gpus_per_node} is invalid: expected a positive integer.")
    if world_size > gpus_per_node and world_size % gpus_per_node:
        raise LaunchError(f"world size {world_size} is not a multiple of --gpus-per-node={gpus_per_node}: launch "
                          f"whole nodes (e.g. {gpus_per_node * (world_size // gpus_per_node + 1)}) or fewer than "
                          f"{gpus_per_node + 1} processes.")
    nodes, per_node = max(1, world_size // gpus_per_node), min(world_size, gpus_per_node)

    counts = parameter_counts(config.model)
    spec_params = [split // tp + replicated for split, replicated in counts["specs"]]  # one TP rank's share
    bounds = stage_boundaries(config.model, pp, parallel.pipeline_partition)  # the rule training uses
    stages = [sum(spec_params[a:b]) for a, b in zip(bounds, bounds[1:])]
    largest_stage = max(range(pp), key=stages.__getitem__)
    params = stages[largest_stage]  # what the busiest rank holds before ZeRO partitions it

    weights, grads, optim = _state_bytes(params, config.train.precision, zero, dp)
    optim_gpu, optim_cpu = (0.0, optim) if parallel.offload_optimizer else (optim, 0.0)
    activations = _activation_summary(config, tp, pp, dp, bounds, stages)
    largest_split, largest_replicated = counts["largest_module"]
    largest_layer = max(largest_split // tp, largest_replicated)
    norms_every, telemetry_every = config.train.layer_grad_norm_every, config.train.telemetry_every
    norms_on = bool(norms_every or telemetry_every)  # telemetry steps read the per-layer update norms too
    # Per-layer update norms (train/step.py): on their steps, a host copy of the rank's weights (ZeRO-3: its
    # partition) in their dtype, freed after the step; on the device one weight share's change at a time.
    update_norm_host = weights if norms_on else 0.0
    largest_share = (-(-largest_layer // dp) if zero >= 3 else largest_layer) if norms_on else 0
    telemetry = telemetry_attention_bytes(config, tp) if telemetry_every else None
    working = working_memory(deepspeed_config(config, dp), params, pp, largest_share,  # the config training uses
                             telemetry)

    # DeepSpeed's estimators know no TP/PP: give them what one data-parallel group shards (the largest stage's
    # per-TP-rank parameters) over its dp ranks. With tp = pp = 1 this is exactly their intended use.
    ds_nodes = nodes if dp % nodes == 0 and dp >= nodes else 1
    deepspeed_estimate = _deepspeed_estimates(params, largest_layer, dp // ds_nodes, ds_nodes,
                                              parallel.offload_optimizer)
    weight_bytes, _, optimizer_bytes = BYTES_PER_PARAM[config.train.precision]
    return {
        **{key: counts[key] for key in ("total", "embedding", "head", "final_norm", "layers", "placements")},
        "world_size": world_size, "tp": tp, "pp": pp, "dp": dp, "zero_stage": zero, "nodes": nodes,
        "gpus_per_node": per_node, "precision": config.train.precision,
        "offload_optimizer": parallel.offload_optimizer, "stage_boundaries": bounds, "stage_params": stages,
        "largest_stage": largest_stage, "rank_params": params, "largest_layer_params": largest_layer,
        "layer_grad_norm_every": norms_every, "telemetry_every": telemetry_every,
        "bytes": {"parameters": weights, "gradients": grads, "optimizer_gpu": optim_gpu, "optimizer_cpu": optim_cpu,
                  "update_norm_host": update_norm_host, "update_norm_host_per_node": update_norm_host * per_node,
                  "gpu_total": weights + grads + optim_gpu, "cpu_per_node": optim_cpu * per_node,
                  "activations": activations["bytes"], "gpu_total_with_activations": activations["gpu_total"],
                  "working_memory": working["bytes"],
                  "gpu_total_with_working_memory": activations["gpu_total"] + working["bytes"],
                  # On disk, over all ranks: every parameter's weights in their dtype and its optimizer states.
                  "checkpoint": counts["total"] * (weight_bytes + optimizer_bytes)},
        "activations": activations,
        "working_memory": working,
        "deepspeed": deepspeed_estimate,
    }


def check_model_fits(config: Config, world_size: int, ranks_per_host: int, device_bytes: int | None,
                     host_bytes: int) -> None:
    """Before anything is allocated: refuse, in one ConfigError sentence naming the model field that makes it
    large, a model whose weights, gradients and optimizer states (the dry run's arithmetic, for this launch) do
    not fit one GPU's memory (`device_bytes`; None on a CPU run) or this host's (`host_bytes`, shared by
    `ranks_per_host` processes). Activations and buffers come on top, so passing promises nothing; this only
    turns a certain allocator failure into a sentence."""
    s = dry_run_summary(config, world_size, gpus_per_node=world_size)
    b = s["bytes"]
    states = b["parameters"] + b["gradients"] + b["optimizer_gpu"]
    if device_bytes is not None:
        need, have, where = states, device_bytes, "GPU"
        if need <= have:  # on a GPU, the host holds only the offloaded optimizer's buffers (pinned, rounded)
            plan = offload_host_plan(config, s["dp"], rank_params=s["rank_params"])
            need, have, where = plan["peak"] * ranks_per_host, host_bytes, "host"
    else:
        need, have, where = (states + b["optimizer_cpu"]) * ranks_per_host, host_bytes, "host"
    if need <= have:
        return
    m, layers = config.model, s["total"] - s["embedding"] - s["head"]
    attention = 4 * m.num_layers * m.hidden_size**2
    culprit = max([("vocab_size", s["embedding"] + s["head"]), ("hidden_size", attention),
                   ("intermediate_size", layers - attention)], key=lambda pair: pair[1])[0]
    raise ConfigError(
        f"model.{culprit}={getattr(m, culprit)!r} is invalid here: the model's {s['total']:,} parameters need "
        f"{_gib(need).strip()} of weights, gradients and optimizer states in {where} memory"
        f"{' for ' + str(ranks_per_host) + ' processes' if where == 'host' and ranks_per_host > 1 else ''} "
        f"(ZeRO-{s['zero_stage']}, {s['precision']}, tp {s['tp']} x pp {s['pp']} x dp {s['dp']}; --dry-run shows "
        f"the plan) and this machine has {_gib(have).strip()}; expected a model that fits, or a layout that splits "
        "it (parallel.tp, parallel.pp, parallel.zero_stage).")


def machine_memory(local_rank: int) -> tuple[int | None, int]:
    """(this rank's GPU memory in bytes, or None without CUDA; the host's memory in bytes)."""
    import psutil

    device = None
    if torch.cuda.is_available():
        device = torch.cuda.get_device_properties(local_rank % torch.cuda.device_count()).total_memory
    return device, psutil.virtual_memory().total


def _activation_summary(config: Config, tp: int, pp: int, dp: int, bounds: list[int], stage_params: list[int]
                        ) -> dict:
    """Activation bytes of the busiest stage with and without checkpointing, and the GPU total of the stage whose
    model states plus activations are largest (the first stage keeps the most micro-batches, the last the logits)."""
    parallel = config.parallel
    act = activation_bytes(config, tp)
    per_step = config.train.micro_batch_size * dp
    micro_batches = max(1, config.train.global_batch_size // per_step)
    # 1F1B (DeepSpeed's TrainSchedule): stage s runs pp - s forwards before its first backward.
    in_flight = [min(pp - stage, micro_batches) for stage in range(pp)]
    modes = {}
    for checkpointing in (False, True):
        per_stage = [stage_activation_bytes(act, bounds, stage, in_flight[stage], checkpointing)
                     for stage in range(pp)]
        busiest = max(range(pp), key=per_stage.__getitem__)
        modes[checkpointing] = {"bytes": per_stage[busiest], "stage": busiest, "in_flight": in_flight[busiest],
                                "per_stage": per_stage}
    chosen = modes[parallel.activation_checkpointing]
    totals = []  # per stage: model states + activations
    for stage in range(pp):
        weights, grads, optim = _state_bytes(stage_params[stage], config.train.precision, parallel.zero_stage, dp)
        totals.append(weights + grads + (0.0 if parallel.offload_optimizer else optim) + chosen["per_stage"][stage])
    return {**{key: act[key] for key in ("tokens", "value_bytes", "fused_kernels", "fused_cross_entropy", "layers",
                                          "layer_inputs", "embedding", "head", "logits")},
            "micro_batch_size": config.train.micro_batch_size, "seq_len": config.data.seq_len,
            "micro_batches": micro_batches, "checkpointing": parallel.activation_checkpointing,
            "without_checkpointing": modes[False], "with_checkpointing": modes[True],
            "bytes": chosen["bytes"], "gpu_total": max(totals),
            "gpu_total_stage": max(range(pp), key=totals.__getitem__)}


def _deepspeed_estimates(params: int, largest_layer: int, gpus_per_node: int, nodes: int, offload: bool) -> dict:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cpu2, gpu2 = estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=offload)
    cpu3, gpu3, _ = estimate_zero3_model_states_mem_needs(params, largest_layer, gpus_per_node, nodes,
                                                          cpu_offload=offload, cpu_offload_params=False,
                                                          zero_init=True)
    return {"zero2": {"gpu": gpu2, "cpu_per_node": cpu2}, "zero3": {"gpu": gpu3, "cpu_per_node": cpu3}}


def _gib(value: float) -> str:
    return f"{value / GIB:9.2f} GiB" if value >= GIB / 10 or value == 0 else f"{value / 2**20:9.2f} MiB"


def _runs(values: list) -> str:
    """"post 0-1, pre 2-31" for ["post", "post", "pre", ...]: each run of equal values with its index span."""
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            runs.append(f"{values[start]} {start}" + (f"-{i - 1}" if i - 1 > start else ""))
            start = i
    return ", ".join(runs)


def _layer_summary(layers: list[int], placements: list[str]) -> str:
    sizes = f"{layers[0]:,} each" if len(set(layers)) == 1 else "by layer " + _runs([f"{n:,}" for n in layers])
    return f"{len(layers)} decoder layers: {sizes} (placements: {_runs(placements)})"


def dry_run_report(config: Config, world_size: int, gpus_per_node: int = 8) -> str:
    """The text `mixln-train CONFIG --dry-run` prints."""
    s = dry_run_summary(config, world_size, gpus_per_node)
    b, zero, dp = s["bytes"], s["zero_stage"], s["dp"]
    weight_b, grad_b, optim_b = BYTES_PER_PARAM[s["precision"]]
    split = {"parameters": zero >= 3, "gradients": zero >= 2, "optimizer": zero >= 1}
    over = {key: f"/ dp {dp}" if on else "replicated" for key, on in split.items()}
    stage = s["largest_stage"]
    lines = [
        f"parameters: {s['total']:,} ({s['total'] / 1e9:.2f}B)" if s["total"] >= 1e8 else
        f"parameters: {s['total']:,} ({s['total'] / 1e6:.1f}M)",
        f"  embedding {s['embedding']:,}; head {s['head']:,}; final norm {s['final_norm']:,}",
        f"  {_layer_summary(s['layers'], s['placements'])}",
        f"layout: world {s['world_size']} = tp {s['tp']} x pp {s['pp']} x dp {dp} "
        f"({s['nodes']} node{'s' if s['nodes'] > 1 else ''} x {s['gpus_per_node']} GPU"
        f"{'s' if s['gpus_per_node'] > 1 else ''}), ZeRO-{zero}, {s['precision']}, "
        f"optimizer states on {'CPU' if s['offload_optimizer'] else 'GPU'}",
    ]
    if s["pp"] > 1:
        lines.append(f"  pipeline stages (layer-spec boundaries {s['stage_boundaries']}): per-TP-rank parameters "
                     + ", ".join(f"{n:,}" for n in s["stage_params"]) + f"; largest is stage {stage}")
    lines += [
        f"per-rank model states ({s['rank_params']:,} parameters on the busiest rank before ZeRO):",
        f"  parameters       {_gib(b['parameters'])}   {weight_b} B/param, {over['parameters']}",
        f"  gradients        {_gib(b['gradients'])}   {grad_b} B/param"
        f"{' (fp32 accumulation)' if s['precision'] == 'bf16' else ''}, {over['gradients']}",
        f"  optimizer states {_gib(b['optimizer_gpu'])}   {optim_b} B/param (Adam"
        f"{' + fp32 master weights' if s['precision'] == 'bf16' else ''}), {over['optimizer']}"
        f"{', offloaded to CPU' if s['offload_optimizer'] else ''}",
        f"  GPU total        {_gib(b['gpu_total'])}",
    ]
    if s["offload_optimizer"]:
        lines.append(f"  CPU (offloaded optimizer states) {_gib(b['optimizer_cpu']).strip()} per rank, "
                     f"{_gib(b['cpu_per_node']).strip()} per node")
        host = offload_host_plan(config, dp, rank_params=s["rank_params"])
        lines.append(f"  CPU (what DeepSpeed 0.19.8 allocates for it on a GPU host) {_gib(host['bytes']).strip()} per "
                     f"rank, {_gib(host['bytes'] * s['gpus_per_node']).strip()} per node, "
                     f"{host['bytes_per_param']:.1f} B/param: "
                     + ", ".join(f"{name} {_gib(nbytes).strip()}" for name, nbytes, _ in host["lines"])
                     + f" (pinned buffers rounded up to powers of two); {_gib(host['peak']).strip()} at its peak")
    if b["update_norm_host"]:
        every = " and ".join(f"every {n} steps" + (" (telemetry)" if i else "")
                             for i, n in enumerate((s["layer_grad_norm_every"], s["telemetry_every"])) if n)
        lines.append(f"  CPU (per-layer update norms, {every}) "
                     f"{_gib(b['update_norm_host']).strip()} per rank, {_gib(b['update_norm_host_per_node']).strip()} "
                     f"per node: a copy of the rank's weights, {weight_b} B/param, during those steps")
    lines += _activation_lines(s)
    lines += _working_memory_lines(s)
    lines.append(f"checkpoint on disk: {_gib(b['checkpoint']).strip()} per save over all ranks ({weight_b} B/param "
                 f"weights + {optim_b} B/param optimizer states); {config.train.keep_checkpoints} kept "
                 "(train.keep_checkpoints), one more while a save is written")
    ds = s["deepspeed"]
    current = {1: "zero2", 2: "zero2", 3: "zero3"}.get(zero)
    lines.append(f"DeepSpeed's estimate ({s['rank_params']:,} params over dp {dp}; largest layer "
                 f"{s['largest_layer_params']:,}; offload_optimizer={'cpu' if s['offload_optimizer'] else 'none'}):")
    for key, label in (("zero2", "ZeRO-1/2 (estimate_zero2_model_states_mem_needs)"),
                       ("zero3", "ZeRO-3   (estimate_zero3_model_states_mem_needs, zero_init=1)")):
        mark = "   <- this config" if key == current else ""
        lines.append(f"  {label}: per GPU {_gib(ds[key]['gpu']).strip()}, "
                     f"per node CPU {_gib(ds[key]['cpu_per_node']).strip()}{mark}")
    if current is None:
        lines.append("  (DeepSpeed has no estimator for ZeRO-0; both rows show what ZeRO would save.)")
    if current == "zero3":
        lines.append("  (DeepSpeed's ZeRO-3 row adds 4 B x largest layer for one gathered layer's 16-bit weights and "
                     "gradients; here the live-parameter limit covers that.)")
    elif current == "zero2":
        lines.append("  (DeepSpeed's ZeRO-1/2 row counts 18 B/param partitioned, a 16-bit gradient partition beside "
                     "the fp32 one, and partitions gradients under ZeRO-1 too.)")
    lines.append("Not counted: the loss's transient buffers (its backward briefly holds two more fp32 tokens x vocab "
                 "tensors), pipeline send/receive buffers, NCCL's buffers beyond the typical context, fragmentation.")
    return "\n".join(lines)


def _activation_lines(s: dict) -> list[str]:
    a, tp = s["activations"], s["tp"]
    kernels = "fused norm and SwiGLU kernels" if a["fused_kernels"] else "PyTorch reference norm and SwiGLU"
    uniform = len(set(a["layers"])) == 1
    lines = [
        f"per-rank activations ({a['micro_batch_size']} x {a['seq_len']} = {a['tokens']:,} tokens per micro-batch, "
        f"{'bf16' if a['value_bytes'] == 2 else 'fp32'}, {kernels}, fused attention):",
        f"  {'per decoder layer':<21}{_gib(max(a['layers']))}   {'' if uniform else 'the largest; '}q/k/v, MLP and "
        f"norm inputs whole; attention and SwiGLU tensors / tp {tp}",
        f"  {'layer input':<21}{_gib(max(a['layer_inputs']))}   all a checkpointed layer keeps until its recompute",
        f"  {'embedding + head':<21}{_gib(a['embedding'] + a['head'])}   "
        + ("fused cross-entropy: no logits kept, its input and weight gradients instead" if a["fused_cross_entropy"]
           else f"of which the loss's fp32 log-probabilities (tokens x vocab / tp) {_gib(a['logits']).strip()}"),
    ]
    for key in ("without_checkpointing", "with_checkpointing"):
        mode, label = a[key], key.replace("_", " ")
        where = (f"stage {mode['stage']}: {mode['in_flight']} micro-batch{'es' if mode['in_flight'] > 1 else ''} "
                 f"in flight (1F1B)" if s["pp"] > 1 else "one micro-batch")
        extra = ", each layer's input, plus one layer recomputed" if key == "with_checkpointing" else ""
        mark = "   <- this config" if a["checkpointing"] == (key == "with_checkpointing") else ""
        lines.append(f"  {label:<21}{_gib(mode['bytes'])}   {where}{extra}{mark}")
    stage = f", stage {a['gpu_total_stage']}" if s["pp"] > 1 else ""
    lines.append(f"  {'GPU total':<21}{_gib(s['bytes']['gpu_total_with_activations'])}   model states + activations"
                 f"{stage}")
    return lines


def _working_memory_lines(s: dict) -> list[str]:
    lines = ["per-rank working memory (DeepSpeed 0.19.8's buffers for the config train/engine.py builds, and the "
             "CUDA context):"]
    for entry in s["working_memory"]["lines"]:
        size = f"{entry['elements']:,} x {entry['element_bytes']} B, " if entry["name"] != "CUDA context" else ""
        note = (", inside the live-parameter limit: not added" if not entry["counted"] else
                ", nothing allocated: all_gather_into_tensor fills the flat weights in place" if not entry["bytes"]
                else "")
        lines.append(f"  {entry['name']:<21}{_gib(entry['bytes'])}   {size}{entry['setting']}{note}")
    lines.append(f"  {'GPU total':<21}{_gib(s['bytes']['gpu_total_with_working_memory'])}   model states + "
                 f"activations + working memory")
    return lines
