"""The training loop: data, DeepSpeed engine, logging, evaluation, checkpoints, resume and export."""
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
from megatron_mixln.model import build_model, causal_lm_loss, layer_index_of
from megatron_mixln.train import checkpoint as ckpt
from megatron_mixln.train.engine import (Ranks, build_engine, check_supported_layout, gradient_accumulation_steps,
                                         init_distributed)
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


def _all_reduce_(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def _grad_norms(module: torch.nn.Module, per_layer: bool) -> tuple[float | None, dict[str, float]]:
    """Global gradient L2 norm and, when asked, one norm per decoder layer (plus embedding / head / final norm).

    Reads full gradients through DeepSpeed's accessor, so it is correct under every ZeRO stage.
    """
    from deepspeed.utils import safe_get_full_grad

    keys, squares = [], []
    for name, param in module.named_parameters():
        grad = safe_get_full_grad(param)
        if grad is not None:
            index = layer_index_of(name)
            keys.append(f"layer_{index:03d}" if index is not None else name.removeprefix("model.").removesuffix(".weight"))
            squares.append(grad.detach().float().pow(2).sum())
    if not squares:
        return None, {}
    values = torch.stack(squares).double().tolist()  # one device sync for all parameters
    per_key: dict[str, float] = {}
    for key, value in zip(keys, values):
        per_key[key] = per_key.get(key, 0.0) + value
    layers = {key: math.sqrt(value) for key, value in sorted(per_key.items())} if per_layer else {}
    return math.sqrt(sum(values)), layers


@torch.no_grad()
def evaluate(module: torch.nn.Module, eval_dataset, config: Config, ranks: Ranks, device: torch.device) -> float:
    """Token-weighted mean loss over the first `train.eval_sequences` held-out sequences, split over DP ranks."""
    from megatron_mixln.data import eval_batches

    was_training = module.training
    module.eval()
    num = min(config.train.eval_sequences, len(eval_dataset))
    totals = torch.zeros(2, dtype=torch.float64)
    for batch_index, (inputs, labels) in enumerate(eval_batches(eval_dataset, num, config.train.micro_batch_size)):
        if batch_index % ranks.dp_size != ranks.dp_rank:
            continue
        logits = module(inputs.to(device))
        labels = labels.to(device)
        count = (labels != -100).sum()
        totals[0] += causal_lm_loss(logits, labels).double().item() * count.item()
        totals[1] += count.item()
    _all_reduce_(totals)
    module.train(was_training)
    if totals[1] == 0:
        return math.nan
    return (totals[0] / totals[1]).item()


def _prepare_out_dir(config: Config, ranks: Ranks) -> Path | None:
    """Decide where to resume from; refuse to silently overwrite an existing run."""
    out = Path(config.train.out_dir)
    resume = config.train.resume
    if resume == "none":
        if (out / ckpt.CHECKPOINTS / ckpt.LATEST).exists() or (out / "metrics.jsonl").exists():
            raise ConfigError(f"train.resume=none but train.out_dir={str(out)!r} already holds a run: "
                              "use train.resume=auto to continue it or choose another train.out_dir.")
        return None
    if resume == "auto":
        ckpt.remove_partial_saves(out)
        return ckpt.latest_checkpoint(out)
    folder = Path(resume)
    if not (folder / ckpt.STATE_FILE).is_file():
        raise ConfigError(f"train.resume={resume!r} is invalid: expected auto, none, or a checkpoint folder "
                          f"holding {ckpt.STATE_FILE} (e.g. {out / ckpt.CHECKPOINTS / ckpt.tag_for_step(100)}).")
    return folder


def train(config: Config) -> TrainResult:
    """Run (or resume) one training run as described by `config`; returns what happened."""
    from megatron_mixln.data import GlobalBatchSampler, collate, open_datasets

    tcfg = config.train
    ranks = init_distributed()
    check_supported_layout(config, ranks)
    accumulation = gradient_accumulation_steps(config, ranks.dp_size)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    out = Path(tcfg.out_dir)
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
    resume_from = _prepare_out_dir(config, ranks)

    # Data: rank 0 tokenises (once, cached); the others wait, then open the same files.
    if ranks.is_main:
        meta, train_data, eval_data = open_datasets(config.data)
    if dist.is_initialized():
        dist.barrier()
    if not ranks.is_main:
        meta, train_data, eval_data = open_datasets(config.data)
    if meta["max_token_id"] >= config.model.vocab_size:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is invalid: the tokenised data holds token id "
                          f"{meta['max_token_id']}, so expected at least {meta['max_token_id'] + 1}.")
    sampler = GlobalBatchSampler(len(train_data), tcfg.global_batch_size, tcfg.seed)

    model = build_model(config.model, seed=tcfg.seed)
    engine, base_optimizer, scheduler = build_engine(model, config, ranks)
    module = engine.module

    start_step = 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(engine, resume_from)
        start_step = int(state["step"])
        if ranks.is_main:
            dropped = discard_metrics_after(out, start_step)
            print(f"resumed from {resume_from} at step {start_step}"
                  + (f" ({dropped} metric records of lost steps moved to metrics.discarded.jsonl)" if dropped else ""))
    if ranks.is_main:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))

    writer = MetricsWriter(out, enabled=ranks.is_main, tensorboard=tcfg.tensorboard)
    result = TrainResult(out_dir=out, last_step=start_step)
    progress = None
    if ranks.is_main and tcfg.progress_bar:
        from tqdm import tqdm

        progress = tqdm(total=tcfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def trainer_state(step: int) -> dict[str, Any]:
        return {"step": step, "seed": tcfg.seed, "config": config.to_dict(), "data": meta}

    def save(step: int) -> None:
        ckpt.save_checkpoint(engine, out, step, trainer_state(step), keep=tcfg.keep_checkpoints)

    tokens_per_step = tcfg.global_batch_size * config.data.seq_len
    last_saved = start_step
    step = start_step
    try:
        for step in range(start_step + 1, tcfg.steps + 1):
            started = time.perf_counter()
            lr_used = scheduler.get_last_lr()[0]  # the LR this step's update applies
            indices = sampler.rank_indices(step - 1, ranks.dp_rank, ranks.dp_size)
            loss_sum = torch.zeros(2, dtype=torch.float64)  # [sum of micro-batch losses, non-finite flag]
            want_layer_norms = tcfg.layer_grad_norm_every and step % tcfg.layer_grad_norm_every == 0
            grad_norm, layer_norms = None, {}
            for micro in range(accumulation):
                micro_indices = indices[micro * tcfg.micro_batch_size:(micro + 1) * tcfg.micro_batch_size]
                inputs, labels = collate(train_data, micro_indices)
                loss = causal_lm_loss(engine(inputs.to(device)), labels.to(device))
                value = loss.detach().double().item()
                loss_sum[0] += value
                loss_sum[1] = max(loss_sum[1].item(), 0.0 if math.isfinite(value) else 1.0)
                engine.backward(loss)
                if micro == accumulation - 1:
                    _all_reduce_(loss_sum)  # every rank must agree on a non-finite step before stepping
                    if loss_sum[1] > 0:
                        if tcfg.on_nonfinite == "stop":
                            raise NonFiniteLossError(
                                f"step {step}: the loss is not finite; stopped without updating the weights "
                                f"(last checkpoint: step {last_saved}; set train.on_nonfinite=skip to skip such steps).")
                        base_optimizer.skip_next_step = True
                    else:
                        grad_norm, layer_norms = _grad_norms(module, per_layer=bool(want_layer_norms))
                engine.step()
            skipped = loss_sum[1].item() > 0
            loss_value = loss_sum[0].item() / (accumulation * ranks.dp_size)
            if not skipped:
                result.losses[step] = loss_value
            elapsed = time.perf_counter() - started
            if ranks.is_main and (step % tcfg.log_every == 0 or step == tcfg.steps or skipped):
                engine_norm = engine.get_global_grad_norm()
                if grad_norm is None and engine_norm is not None:
                    grad_norm = float(engine_norm)
                record = {"step": step, "loss": loss_value if not skipped else float("nan"),
                          "lr": lr_used,
                          "grad_norm": grad_norm, "tokens_per_second": tokens_per_step / elapsed,
                          "step_seconds": elapsed}
                if skipped:
                    record["skipped"] = True
                if layer_norms:
                    record["layer_grad_norms"] = layer_norms
                writer.write(record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step != tcfg.steps:
                eval_loss = evaluate(module, eval_data, config, ranks, device)
                writer.write({"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 700))})
            stop_now = tcfg.stop_after_step and step >= tcfg.stop_after_step and step != tcfg.steps
            if (tcfg.save_every and step % tcfg.save_every == 0) or stop_now:
                save(step)
                last_saved = step
            if stop_now:
                result.stopped_early = True
                break
        result.last_step = step
        if not result.stopped_early:
            if last_saved != step:
                save(step)
            result.eval_loss = evaluate(module, eval_data, config, ranks, device)
            writer.write({"step": step, "eval_loss": result.eval_loss,
                          "eval_ppl": math.exp(min(result.eval_loss, 700))})
            if ranks.is_main:
                result.export_dir = ckpt.export_consolidated(
                    module.state_dict(), config.model, out / "export", extra={"step": step, "data": meta, "run_config": config.to_dict()})
                plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png",
                                title=f"{config.model.norm_placement} placement, {config.model.num_layers} layers")
    finally:
        if progress is not None:
            progress.close()
        writer.close()
    return result
