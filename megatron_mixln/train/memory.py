"""Dry run: parameter counts and per-rank memory of model states for a layout, from a model built on the meta device.

Nothing is allocated, so a 7B config answers in seconds on a laptop. Next to our numbers it prints DeepSpeed's
own estimate (its ZeRO-2 / ZeRO-3 estimators), so a user sees both before asking a cluster for GPUs.
"""
from __future__ import annotations

import torch

from megatron_mixln.config import Config, ModelConfig
from megatron_mixln.parallel.launch import LaunchError, data_parallel_size

GIB = 2**30
# Parameters that tensor parallelism splits (Megatron: vocab-parallel embedding and head, column/row-parallel
# attention and MLP projections). Norm gains are replicated on every TP rank.
TP_SPLIT = ("embed_tokens", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
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
            spec = 0 if "embed_tokens" in parts else num_layers + 1
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


def dry_run_summary(config: Config, world_size: int, gpus_per_node: int = 8) -> dict:
    """Parameter counts and per-rank bytes of parameters, gradients and optimizer states; see dry_run_report."""
    from megatron_mixln.model.stages import stage_boundaries

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

    weight_b, grad_b, optim_b = BYTES_PER_PARAM[config.train.precision]
    weights = params * weight_b / (dp if zero >= 3 else 1)
    grads = params * grad_b / (dp if zero >= 2 else 1)
    optim = params * optim_b / (dp if zero >= 1 else 1)
    optim_gpu, optim_cpu = (0.0, optim) if parallel.offload_optimizer else (optim, 0.0)

    largest_split, largest_replicated = counts["largest_module"]
    largest_layer = max(largest_split // tp, largest_replicated)
    # DeepSpeed's estimators know no TP/PP: give them what one data-parallel group shards (the largest stage's
    # per-TP-rank parameters) over its dp ranks. With tp = pp = 1 this is exactly their intended use.
    ds_nodes = nodes if dp % nodes == 0 and dp >= nodes else 1
    deepspeed_estimate = _deepspeed_estimates(params, largest_layer, dp // ds_nodes, ds_nodes,
                                              parallel.offload_optimizer)
    return {
        **{key: counts[key] for key in ("total", "embedding", "head", "final_norm", "layers", "placements")},
        "world_size": world_size, "tp": tp, "pp": pp, "dp": dp, "zero_stage": zero, "nodes": nodes,
        "gpus_per_node": per_node, "precision": config.train.precision,
        "offload_optimizer": parallel.offload_optimizer, "stage_boundaries": bounds, "stage_params": stages,
        "largest_stage": largest_stage, "rank_params": params, "largest_layer_params": largest_layer,
        "bytes": {"parameters": weights, "gradients": grads, "optimizer_gpu": optim_gpu, "optimizer_cpu": optim_cpu,
                  "gpu_total": weights + grads + optim_gpu, "cpu_per_node": optim_cpu * per_node},
        "deepspeed": deepspeed_estimate,
    }


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
    lines.append("Model states only: activations, communication buffers and fragmentation come on top.")
    return "\n".join(lines)
