"""The training loop: data, DeepSpeed engine, logging, evaluation, checkpoints, resume and export.

The same loop runs in one process and under any tp x pp x dp layout; with pipeline parallelism DeepSpeed's
PipelineEngine runs the micro-batches (1F1B) inside `train_batch`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_mixln.config import Config, ConfigError
from megatron_mixln.model import causal_lm_loss, layer_index_of
from megatron_mixln.train import checkpoint as ckpt
from megatron_mixln.train.engine import (build_engine, build_layout, gradient_accumulation_steps, init_distributed,
                                         model_construction)
from megatron_mixln.train.metrics import MetricsWriter, discard_metrics_after, plot_loss_curve


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss became NaN or infinite (train.on_nonfinite=stop)."""


@dataclass
class TrainResult:
    out_dir: Path
    last_step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> mean training loss of that step
    eval_loss: float | None = None
    export_dir: Path | None = None
    stopped_early: bool = False


def _all_reduce_(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _grad_norms(module: torch.nn.Module, layout, per_layer: bool, name_of=lambda n: n,
                read_grad=None) -> tuple[float | None, dict[str, float]]:
    """Global gradient L2 norm and, when asked, one norm per decoder layer (plus embedding, final norm, head).

    Collective over the model-parallel group: tensor-parallel shards are summed over TP ranks, replicated
    parameters (the norms) counted once, pipeline stages contribute the layers they hold.
    """
    if read_grad is None:
        from deepspeed.utils import safe_get_full_grad as read_grad  # full gradients under every ZeRO stage

    keys = []
    for local_name, _ in module.named_parameters():
        index = layer_index_of(name_of(local_name))
        keys.append(f"layer_{index:03d}" if index is not None
                    else name_of(local_name).removeprefix("model.").removesuffix(".weight"))
    all_keys = sorted(set(keys))
    if layout.pp > 1:  # every stage must agree on the key list: gather the union
        gathered: list = [None] * dist.get_world_size(layout.model_parallel_group)
        dist.all_gather_object(gathered, all_keys, group=layout.model_parallel_group)
        all_keys = sorted(set().union(*gathered))
    position = {key: i for i, key in enumerate(all_keys)}
    tp_rank = layout.tensor_parallel.rank
    slots, squares = [], []
    for key, (_, param) in zip(keys, module.named_parameters()):
        grad = read_grad(param)
        if grad is not None and (getattr(param, "tensor_model_parallel", False) or tp_rank == 0):
            # Replicated parameters count on TP rank 0 only. fp32 accumulation without an upcast copy, and no
            # host sync per parameter: everything stays on the device until one transfer below.
            slots.append(position[key])
            squares.append(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32).square())
    # [found-any flag, squares per key]: one all-reduce, one device-to-host copy.
    device = squares[0].device if squares else torch.device("cpu")
    totals = torch.zeros(len(all_keys) + 1, dtype=torch.float32, device=device)
    if squares:
        totals[0] = 1.0
        totals[1:].index_add_(0, torch.tensor(slots, device=device), torch.stack(squares))
    _all_reduce_(totals, group=layout.model_parallel_group)
    totals = totals.double().cpu()
    if totals[0].item() == 0:
        return None, {}
    values = totals[1:].tolist()
    layers = {key: math.sqrt(value) for key, value in zip(all_keys, values)} if per_layer else {}
    return math.sqrt(sum(values)), layers


@torch.no_grad()
def evaluate(engine, eval_dataset, config: Config, layout) -> float:
    """Token-weighted mean loss over the first `train.eval_sequences` held-out sequences."""
    from megatron_mixln.data import eval_batches

    micro = config.train.micro_batch_size
    num = min(config.train.eval_sequences, len(eval_dataset))
    totals = torch.zeros(2, dtype=torch.float64)
    if layout.pp > 1:
        num -= num % micro  # the pipeline engine's activation buffers have one fixed shape
        for inputs, labels in eval_batches(eval_dataset, num, micro):
            loss = engine.eval_batch(iter([(inputs, labels)]), num_micro_batches=1)  # broadcast to every stage
            count = (labels != -100).sum().item()
            totals += torch.tensor([loss.double().item() * count, count], dtype=torch.float64)
    else:
        mine = (batch for index, batch in enumerate(eval_batches(eval_dataset, num, micro))
                if index % layout.dp == layout.dp_rank)  # each data-parallel rank takes every dp-th batch
        totals = loss_totals(engine.module, mine, layout.tensor_parallel)
        engine.module.train()
        _all_reduce_(totals, group=layout.dp_group)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else math.nan


@torch.no_grad()
def loss_totals(module: torch.nn.Module, batches, tp=None) -> torch.Tensor:
    """[sum of per-token losses, number of target tokens] of `module` (put in eval mode) over `batches`."""
    from megatron_mixln.parallel.tensor_parallel import NO_TP

    module.eval()
    device = next(module.parameters()).device
    totals = torch.zeros(2, dtype=torch.float64)
    for inputs, labels in batches:
        labels = labels.to(device)
        loss = causal_lm_loss(module(inputs.to(device)), labels, tp or NO_TP)
        count = (labels != -100).sum().item()
        totals += torch.tensor([loss.double().item() * count, count], dtype=torch.float64)
    return totals


def _resume_source(config: Config) -> tuple[str, Path | None]:
    """("checkpoint" | "export" | "none", folder): where to continue from; refuses to silently overwrite a run."""
    out = Path(config.train.out_dir)
    resume = config.train.resume
    if resume == "none":
        if (out / ckpt.CHECKPOINTS / ckpt.LATEST).exists() or (out / "metrics.jsonl").exists():
            raise ConfigError(f"train.resume=none but train.out_dir={str(out)!r} already holds a run: "
                              "use train.resume=auto to continue it or choose another train.out_dir.")
        return "none", None
    if resume == "auto":
        ckpt.remove_partial_saves(out)
        latest = ckpt.latest_checkpoint(out)
        return ("checkpoint", latest) if latest is not None else ("none", None)
    folder = Path(resume)
    if (folder / ckpt.STATE_FILE).is_file():
        return "checkpoint", folder
    if (folder / ckpt.EXPORT_CONFIG).is_file():
        return "export", folder
    raise ConfigError(f"train.resume={resume!r} is invalid: expected auto, none, a checkpoint folder holding "
                      f"{ckpt.STATE_FILE} (e.g. {out / ckpt.CHECKPOINTS / ckpt.tag_for_step(100)}), or an export "
                      f"folder holding {ckpt.EXPORT_CONFIG} (to continue in another parallel layout).")


def build_training_model(config: Config, layout) -> torch.nn.Module:
    """This rank's part of the model, initialised exactly as the single-process model would be."""
    from megatron_mixln.model import ops
    from megatron_mixln.model.llama import MixLNForCausalLM, initialize_weights
    from megatron_mixln.model.stages import build_pipeline
    from megatron_mixln.parallel.tensor_parallel import mark_norm_owners

    ops.check_backend(config.model.kernels)
    seed = config.train.seed
    if layout.pp > 1:
        model = build_pipeline(config.model, layout, seed, config.parallel.pipeline_partition,
                               config.parallel.activation_checkpointing)
    else:
        with model_construction(config, layout):
            model = MixLNForCausalLM(config.model, layout.tensor_parallel)
        model.model.activation_checkpointing = config.parallel.activation_checkpointing
        initialize_weights(model, config.model, seed, layout.tensor_parallel,
                           gathered=ckpt.gathered if config.parallel.zero_stage == 3 else None)
    mark_norm_owners(model, layout.tensor_parallel)
    return model


def _layout_summary(config: Config, layout) -> str:
    """One start-up line: the layout, and which Post-LN layers each pipeline stage holds."""
    from megatron_mixln.model.norms import POST, norm_placement
    from megatron_mixln.model.stages import post_ln_layers_of_stage, stage_boundaries

    m, p = config.model, config.parallel
    post = [i for i in range(m.num_layers) if norm_placement(i, m.num_layers, m) == POST]
    line = (f"layout: {dist.get_world_size()} processes = tp {layout.tp} x pp {layout.pp} x dp {layout.dp}, "
            f"ZeRO-{p.zero_stage}; {m.norm_placement} placement, Post-LN layers {post or 'none'}")
    if layout.pp > 1:
        bounds = stage_boundaries(m, layout.pp, p.pipeline_partition)
        line += "; stages (layer specs [embedding, layers, head]): " + ", ".join(
            f"{s}: specs {bounds[s]}-{bounds[s + 1] - 1} Post-LN {post_ln_layers_of_stage(m, bounds, s) or 'none'}"
            for s in range(layout.pp))
    return line


def _peak_memory_mb() -> float:
    """This rank's peak memory: CUDA allocations on a GPU, the process's maximum resident set on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _set_schedule_step(scheduler, step: int) -> None:
    """Put the LR schedule at optimiser step `step` (when weights come from an export, without its state)."""
    scheduler.last_epoch = step
    for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _install_pipeline_hooks(engine, base_optimizer, layout, name_of, stats: dict) -> None:
    """The pipeline engine steps inside train_batch, so gradients are inspected from the optimiser's pre-step
    hook: a non-finite gradient anywhere skips the update; gradient norms (pre-clip) land in `stats`."""
    module = engine.module

    def before_step() -> bool:
        finite = torch.tensor([1.0])
        for param in module.parameters():
            if param.grad is not None and not torch.isfinite(param.grad).all():
                finite.zero_()
        _all_reduce_(finite, op=dist.ReduceOp.MIN)
        stats["nonfinite"] = finite.item() == 0
        if not stats["nonfinite"]:
            stats["norms"] = _grad_norms(module, layout, stats.get("want_layers", False), name_of,
                                         read_grad=lambda p: p.grad)
        return stats["nonfinite"]  # never apply a non-finite update (stop mode then raises)

    def clip_and_record() -> None:
        # DeepSpeed's fp32 clipping, keeping the pre-clip norm it computes (the hook sees clipped grads).
        from deepspeed.runtime.utils import clip_grad_norm_

        stats["pre_clip_norm"] = float(clip_grad_norm_(
            parameters=module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu))

    base_optimizer.before_step = before_step
    engine.clip_fp32_gradients = clip_and_record


def train(config: Config) -> TrainResult:
    """Run (or resume) one training run as described by `config`; returns what happened."""
    from megatron_mixln.data import GlobalBatchSampler, collate, open_datasets
    from megatron_mixln.model.stages import consolidated_name

    tcfg = config.train
    init_distributed()
    layout = build_layout(config)
    is_main = dist.get_rank() == 0
    accumulation = gradient_accumulation_steps(config, layout.dp)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    out = Path(tcfg.out_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    resume_kind, resume_from = _resume_source(config)

    # Data: rank 0 tokenises (once, cached); the others wait, then open the same files.
    if is_main:
        meta, train_data, eval_data = open_datasets(config.data)
    dist.barrier()
    if not is_main:
        meta, train_data, eval_data = open_datasets(config.data, progress=False)
    if meta["max_token_id"] >= config.model.vocab_size:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is invalid: the tokenised data holds token id "
                          f"{meta['max_token_id']}, so expected at least {meta['max_token_id'] + 1}.")
    sampler = GlobalBatchSampler(len(train_data), tcfg.global_batch_size, tcfg.seed)

    model = build_training_model(config, layout)
    if is_main:
        print(_layout_summary(config, layout))
    engine, base_optimizer, scheduler = build_engine(model, config, layout)
    module = engine.module
    pipelined = layout.pp > 1
    name_of = (lambda local: consolidated_name(local, config.model.num_layers)) if pipelined else (lambda n: n)

    start_step = 0
    if resume_kind == "checkpoint":
        start_step = int(ckpt.load_checkpoint(engine, resume_from)["step"])
    elif resume_kind == "export":
        ckpt.load_export_into(module, resume_from, config.model, layout)
        start_step = int(json.loads((resume_from / ckpt.EXPORT_CONFIG).read_text()).get("step", 0))
        _set_schedule_step(scheduler, start_step)
    if resume_kind != "none" and is_main:
        dropped = discard_metrics_after(out, start_step)
        print(f"resumed from {resume_from} at step {start_step}"
              + (" (weights only: optimiser moments start fresh)" if resume_kind == "export" else "")
              + (f"; {dropped} metric records of lost steps moved to metrics.discarded.jsonl" if dropped else ""))
    if is_main:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))

    writer = MetricsWriter(out, enabled=is_main, tensorboard=tcfg.tensorboard)
    result = TrainResult(out_dir=out, last_step=start_step)
    progress = None
    if is_main and tcfg.progress_bar:
        from tqdm import tqdm

        progress = tqdm(total=tcfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def save(step: int) -> None:
        state = {"step": step, "seed": tcfg.seed, "config": config.to_dict(), "data": meta}
        ckpt.save_checkpoint(engine, out, step, state, keep=tcfg.keep_checkpoints)

    pipeline_stats: dict[str, Any] = {}
    if pipelined:
        _install_pipeline_hooks(engine, base_optimizer, layout, name_of, pipeline_stats)

    tokens_per_step = tcfg.global_batch_size * config.data.seq_len
    last_saved = start_step
    step = start_step
    try:
        for step in range(start_step + 1, tcfg.steps + 1):
            started = time.perf_counter()
            lr_used = scheduler.get_last_lr()[0]  # the LR this step's update applies
            indices = sampler.rank_indices(step - 1, layout.dp_rank, layout.dp)
            micro_batches = [collate(train_data, indices[i * tcfg.micro_batch_size:(i + 1) * tcfg.micro_batch_size])
                             for i in range(accumulation)]
            want_layer_norms = bool(tcfg.layer_grad_norm_every and step % tcfg.layer_grad_norm_every == 0)
            grad_norm, layer_norms = None, {}
            if pipelined:
                pipeline_stats.clear()
                pipeline_stats["want_layers"] = want_layer_norms
                loss_value = engine.train_batch(iter(micro_batches)).double().item()
                nonfinite = pipeline_stats.get("nonfinite", not math.isfinite(loss_value))
                grad_norm, layer_norms = pipeline_stats.get("norms", (None, {}))
                if grad_norm and "pre_clip_norm" in pipeline_stats:  # report norms before clipping
                    scale = pipeline_stats["pre_clip_norm"] / grad_norm
                    grad_norm, layer_norms = grad_norm * scale, {k: v * scale for k, v in layer_norms.items()}
                if nonfinite and tcfg.on_nonfinite == "stop":
                    raise NonFiniteLossError(
                        f"step {step}: the loss is not finite; stopped without updating the weights (last "
                        f"checkpoint: step {last_saved}; set train.on_nonfinite=skip to skip such steps).")
            else:
                loss_sum = torch.zeros(2, dtype=torch.float64)  # [sum of micro-batch losses, non-finite flag]
                for micro, (inputs, labels) in enumerate(micro_batches):
                    loss = causal_lm_loss(engine(inputs.to(device)), labels.to(device), layout.tensor_parallel)
                    value = loss.detach().double().item()
                    loss_sum[0] += value
                    loss_sum[1] = max(loss_sum[1].item(), 0.0 if math.isfinite(value) else 1.0)
                    engine.backward(loss)
                    if micro == accumulation - 1:
                        _all_reduce_(loss_sum, group=layout.dp_group)  # every rank agrees before stepping
                        if loss_sum[1] > 0:
                            if tcfg.on_nonfinite == "stop":
                                raise NonFiniteLossError(
                                    f"step {step}: the loss is not finite; stopped without updating the weights "
                                    f"(last checkpoint: step {last_saved}; set train.on_nonfinite=skip to skip "
                                    "such steps).")
                            base_optimizer.skip_next_step = True
                        elif want_layer_norms or config.parallel.zero_stage == 0:
                            # Under ZeRO the engine's own global norm is used (read after the step); the
                            # per-layer breakdown gathers full gradients, so it only runs every K steps.
                            grad_norm, layer_norms = _grad_norms(module, layout, want_layer_norms)
                    engine.step()
                nonfinite = loss_sum[1].item() > 0
                loss_value = loss_sum[0].item() / (accumulation * layout.dp)
            if not nonfinite:
                result.losses[step] = loss_value
            elapsed = time.perf_counter() - started
            if is_main and (step % tcfg.log_every == 0 or step == tcfg.steps or nonfinite):
                if grad_norm is None and engine.get_global_grad_norm() is not None:
                    grad_norm = float(engine.get_global_grad_norm())
                record = {"step": step, "loss": loss_value if not nonfinite else float("nan"), "lr": lr_used,
                          "grad_norm": grad_norm, "tokens_per_second": tokens_per_step / elapsed,
                          "step_seconds": elapsed}
                if nonfinite:
                    record["skipped"] = True
                if layer_norms:
                    record["layer_grad_norms"] = layer_norms
                writer.write(record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step != tcfg.steps:
                eval_loss = evaluate(engine, eval_data, config, layout)
                writer.write({"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 700))})
            stop_now = tcfg.stop_after_step and step >= tcfg.stop_after_step and step != tcfg.steps
            if (tcfg.save_every and step % tcfg.save_every == 0) or stop_now:
                save(step)
                last_saved = step
            if stop_now:
                result.stopped_early = True
                break
        result.last_step = step
        peaks: list = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, _peak_memory_mb())
        writer.write({"step": step, "peak_memory_mb_per_rank": peaks,
                      "memory": "cuda max allocated" if torch.cuda.is_available() else "process max RSS"})
        if not result.stopped_early:
            if last_saved != step:
                save(step)
            result.eval_loss = evaluate(engine, eval_data, config, layout)
            writer.write({"step": step, "eval_loss": result.eval_loss,
                          "eval_ppl": math.exp(min(result.eval_loss, 700))})
        # The consolidated export also at a stop: it is how a run moves to another parallel layout.
        result.export_dir = ckpt.export_from_module(
            module, config.model, layout, out / "export",
            extra={"step": step, "data": meta, "run_config": config.to_dict()})
        if not result.stopped_early:
            if is_main:
                plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png",
                                title=f"{config.model.norm_placement} placement, {config.model.num_layers} layers")
    finally:
        if progress is not None:
            progress.close()
        writer.close()
    return result
