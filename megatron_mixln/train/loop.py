"""The training recipe: data, model, engine, steps, evaluation, checkpoints, export.

The same code runs in one process and under any tp x pp x dp layout. What depends on the layout (the
communication device and collectives, loss and token accounting, non-finite steps, gradient norms, evaluation)
lives behind the step engine (train/step.py); this file never asks whether the model is pipelined.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_mixln.config import Config, ConfigError
from megatron_mixln.storage import StorageError, remedy, storage_error, writing
from megatron_mixln.output_folder import check_output_folder
from megatron_mixln.saved_files import CheckpointError, DamagedFile, read_json
from megatron_mixln.train import checkpoint as ckpt
from megatron_mixln.train import export
from megatron_mixln.train import module_export
from megatron_mixln.train.guard import LossSpikeGuard, RollbackPlan, collapse_levels
from megatron_mixln.train.engine import (build_engine, build_layout, build_training_model,  # noqa: F401
                                         gradient_accumulation_steps, init_distributed)
from megatron_mixln.train.metrics import (DISCARDED_FILE, METRICS_FILE, MetricsWriter, console_line,
                                          discard_metrics_after, plot_loss_curve, read_metrics)
from megatron_mixln.train.signals import StopRequests
from megatron_mixln.train.step import EvalResult, StepEngine, StepResult, make_step_engine
from megatron_mixln.train.downstream import DownstreamEvaluator, downstream_line
from megatron_mixln.train.telemetry import measure, telemetry_due


class NonFiniteError(RuntimeError):
    """Training stopped because a loss, a gradient or the weights stopped being finite; nothing bad was saved."""


class UnstableError(NonFiniteError):
    """The loss-spike guard stopped the run (train/guard.py): it could not bring it back within its bounds."""


@dataclass
class TrainResult:
    out_dir: Path
    last_step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss of that step (applied steps only)
    grad_norms: dict[int, float] = field(default_factory=dict)  # step -> global gradient norm before clipping
    eval_loss: float | None = None
    export_dir: Path | None = None
    stopped_early: bool = False  # train.stop_after_step, or a stop signal
    stop_signal: str | None = None  # the signal that stopped the run (SIGTERM, SIGUSR1, SIGINT), if one did
    already_finished: bool = False  # the out_dir held a finished run: nothing was trained
    skipped_steps: list[int] = field(default_factory=list)  # steps whose update was not applied (kept ones only)
    guard_events: list[dict] = field(default_factory=list)  # the loss-spike guard's events, rollbacks included


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
        candidates = ckpt.checkpoint_candidates(out)  # the one `latest` names first; older ones if it is damaged
        return ("checkpoint", candidates[0]) if candidates else ("none", None)
    folder = Path(resume)
    if (folder / ckpt.STATE_FILE).is_file():
        return "checkpoint", folder
    if (folder / export.EXPORT_CONFIG).is_file():
        return "export", folder
    raise ConfigError(f"train.resume={resume!r} is invalid: expected auto, none, a checkpoint folder holding "
                      f"{ckpt.STATE_FILE} (e.g. {out / ckpt.CHECKPOINTS / ckpt.tag_for_step(100)}), or an export "
                      f"folder holding {export.EXPORT_CONFIG} (to continue in another parallel layout).")


def _layout_summary(config: Config, layout) -> str:
    """One start-up line: the layout, and which Post-LN layers each pipeline stage holds."""
    from megatron_mixln.model.norms import POST, norm_placement
    from megatron_mixln.model.stages import post_ln_layers_of_stage, stage_boundaries

    m, p = config.model, config.parallel
    post = [i for i in range(m.num_layers) if norm_placement(i, m.num_layers, m) == POST]
    line = (f"layout: {dist.get_world_size()} processes = tp {layout.tp} x pp {layout.pp} x dp {layout.dp}, "
            f"ZeRO-{p.zero_stage}, {config.train.precision}; {m.norm_placement} placement, "
            f"Post-LN layers {post or 'none'}")
    if layout.pp > 1:
        bounds = stage_boundaries(m, layout.pp, p.pipeline_partition)
        line += "; stages (layer specs [embedding, layers, head]): " + ", ".join(
            f"{s}: specs {bounds[s]}-{bounds[s + 1] - 1} Post-LN {post_ln_layers_of_stage(m, bounds, s) or 'none'}"
            for s in range(layout.pp))
    return line


def _memory_mb() -> tuple[float, float]:
    """This rank's (current, peak) memory in MiB: CUDA allocations on a GPU, the resident set on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    import resource

    import psutil

    current = psutil.Process().memory_info().rss / 2**20
    return current, max(current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB


def _set_schedule_step(scheduler, step: int) -> None:
    """Put the LR schedule at optimiser step `step` (after loading an export, which records it, not its state)."""
    scheduler.last_epoch = step
    for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _apply_schedule(optimizer, scheduler, tcfg) -> None:
    """After a checkpoint is loaded: this config's optimiser hyper-parameters and LR schedule at the loaded
    step. The checkpoint restores the saved ones, which are the same unless train.resume_changes=allow
    carries a change; then the run really follows the new values."""
    values = {"betas": tuple(tcfg.betas), "eps": tcfg.adam_eps, "weight_decay": tcfg.weight_decay}
    for group in optimizer.param_groups:
        group.update({key: value for key, value in values.items() if key in group})
    scheduler.base_lrs = [tcfg.lr for _ in optimizer.param_groups]
    _set_schedule_step(scheduler, scheduler.last_epoch)


def _saved_run(kind: str, folder: Path) -> dict:
    """The resumed run's saved state: {"config", "data", "layout", "step", ...} (from a checkpoint or an export);
    {} when a checkpoint's own state file is unreadable (the load then finds it damaged and falls back)."""
    path = folder / (ckpt.STATE_FILE if kind == "checkpoint" else export.EXPORT_CONFIG)
    try:
        saved = read_json(path, "export the run again")
    except (OSError, DamagedFile) as err:
        if kind == "checkpoint":
            return {}
        if isinstance(err, DamagedFile):  # already one sentence naming the file
            raise
        raise CheckpointError(f"{path} cannot be read ({err}); the export in {folder} is damaged.") from None
    return saved if kind == "checkpoint" else {**saved, "config": saved.get("run_config")}


def _check_resume(config: Config, layout, kind: str, folder: Path, meta: dict) -> list[str]:
    """Refuse a resume whose config or layout changed what its checkpoint cannot follow; notes of the rest."""
    from megatron_mixln.train.resume import check_resume, other_data_parallel_size

    saved = _saved_run(kind, folder)
    if not saved.get("config"):
        return []
    saved_folder = (saved.get("data") or {}).get("folder")
    notes = check_resume(saved["config"], config, str(folder),
                         data_changed=saved_folder is not None and Path(saved_folder).name != Path(meta["folder"]).name,
                         layout_can_change=kind == "export")
    dp = (saved.get("layout") or {}).get("dp", layout.dp)
    if kind == "checkpoint" and dp != layout.dp and config.parallel.zero_stage >= 1:
        way_on = other_data_parallel_size(folder, config.train.out_dir, saved.get("step"),
                                          f"{dp * layout.tp * layout.pp} processes")
        raise ConfigError(f"cannot resume {folder}: its ZeRO-{config.parallel.zero_stage} state is partitioned over "
                          f"{dp} data-parallel ranks and this run has {layout.dp}; {way_on}.")
    return notes


def _step_record(step: int, lr: float, outcome: StepResult, seconds: float, positions: int) -> dict:
    """The metrics.jsonl record of one step; tokens are target tokens (padding excluded), memory this rank's."""
    memory, peak = _memory_mb()
    record = {"step": step, "loss": outcome.loss, "lr": lr, "grad_norm": outcome.grad_norm,
              "tokens_per_second": outcome.target_tokens / seconds, "target_tokens": outcome.target_tokens,
              "padding_fraction": 1.0 - outcome.target_tokens / positions, "step_seconds": seconds,
              "memory_mb": memory, "peak_memory_mb": peak}
    if not outcome.applied:
        record["skipped"] = True
        if outcome.outlier:
            record["outlier"] = True  # the loss-spike guard withheld it; metrics.jsonl has the event beside it
    if outcome.layer_grad_norms:
        record["layer_grad_norms"] = outcome.layer_grad_norms
    if outcome.layer_update_norms:
        record["layer_update_norms"] = outcome.layer_update_norms
    return record


def read_to_host(scalars: list[torch.Tensor]) -> list[float]:
    """Device scalars as Python floats in one device->host transfer: the loop's one sync for step values,
    made once per logged step rather than once per step (float32 values come back exactly as float() gives)."""
    if not scalars:
        return []
    device = scalars[0].device
    return torch.stack([s.detach().reshape(()).to(device, torch.float64) for s in scalars]).tolist()


def _read_pending(pending: list[tuple[int, StepResult]], result: TrainResult) -> StepResult:
    """Read the pending steps' losses and device gradient norms to the host (one transfer) into `result`, as
    every applied step's; empties `pending` and returns its last step's outcome with host values."""
    outcomes = [outcome for _, outcome in pending]
    on_device = [v for o in outcomes for v in (o.loss, o.grad_norm) if isinstance(v, torch.Tensor)]
    values = iter(read_to_host(on_device))

    def host(value):  # consumes `values` in the order `on_device` was built: loss, then grad_norm, per step
        return next(values) if isinstance(value, torch.Tensor) else value

    for step, outcome in pending:
        outcome = replace(outcome, loss=host(outcome.loss), grad_norm=host(outcome.grad_norm))
        if outcome.applied:
            result.losses[step] = outcome.loss
            if outcome.grad_norm is not None:
                result.grad_norms[step] = outcome.grad_norm
    pending.clear()
    return outcome


class StepClock:
    """A step's seconds without a host sync of its own: CUDA events on a GPU, read once the step's values
    reached the host (which waited for its work); the wall clock on a CPU, where a step is synchronous."""

    def __init__(self):
        self.on_gpu = torch.cuda.is_available()
        self._started = self._stopped = None

    def _now(self):
        if not self.on_gpu:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._started = self._now()

    def stop(self) -> None:
        self._stopped = self._now()

    def seconds(self) -> float:
        if not self.on_gpu:
            return self._stopped - self._started
        self._stopped.synchronize()  # already done after read_to_host: returns at once
        return self._started.elapsed_time(self._stopped) / 1000


def _stop_if_skips_must_stop(tcfg, step: int, outcome: StepResult, skipped_in_a_row: int, last_good: str) -> None:
    """After a skipped update: raise NonFiniteError under on_nonfinite=stop, or after too many in a row (outliers the
    guard skipped count too: a run that only skips them does not recover)."""
    what = (f"step {step}: the loss or a gradient is not finite (loss {outcome.loss:.4g}, gradient norm "
            f"{outcome.grad_norm}); the update was skipped")
    if outcome.outlier:
        what = (f"step {step}: the guard skipped an outlier (loss {outcome.loss:.4g}, gradient norm "
                f"{outcome.grad_norm:.4g})")
    elif tcfg.on_nonfinite == "stop":
        raise NonFiniteError(f"{what} and training stopped with the weights untouched (last checkpoint: "
                             f"{last_good}; set train.on_nonfinite=skip to skip such steps).")
    if skipped_in_a_row >= tcfg.max_consecutive_skips:
        raise (UnstableError if outcome.outlier else NonFiniteError)(
            f"{what}; that makes {skipped_in_a_row} skipped updates in a row, so training stopped "
            f"(train.max_consecutive_skips={tcfg.max_consecutive_skips}; last checkpoint: {last_good}"
            + ("; guard.action=rollback reloads an earlier checkpoint instead)." if outcome.outlier else ")."))


def _lower_lr_when_guard_says(scheduler, guard: LossSpikeGuard) -> None:
    """The LR schedule, times the guard's factor for the updates after a rollback (guard.lr_factor). A closure,
    not an object: LambdaLR saves no function in its state, so checkpoints stay as they were."""
    def scaled(schedule):
        return lambda step: schedule(step) * guard.lr_scale(step)

    scheduler.lr_lambdas = [scaled(schedule) for schedule in scheduler.lr_lambdas]


def guard_line(event: dict) -> str:
    """The console line of a guard event."""
    step, kind = event["step"], event["event"]
    if kind == "outlier":
        bound = event["loss_threshold"] if event["reason"].startswith("loss") else event["grad_norm_threshold"]
        value = event["loss"] if event["reason"].startswith("loss") else event["grad_norm"]
        done = {"warn": "applied (guard.action=warn)", "skip": "skipped", "rollback": "skipped"}[event["action"]]
        return f"guard: step {step} is an outlier ({event['reason']} {value:.4g} > {bound:.4g}): {done}"
    if kind == "rollback":
        first, last = event["skipped_batches"]
        return (f"guard: rolled back to step {step} after step {event['trigger_step']} ({event['reason']}); global "
                f"batches {first}-{last} are skipped; rollback {event['rollbacks']}"
                + (f"; LR x{event['lr_factor']} for updates {event['lr_lowered_updates'][0] + 1}-"
                   f"{event['lr_lowered_updates'][1]}"
                   if event["lr_factor"] < 1 else ""))
    return f"guard: step {step}: {kind} ({event['reason']}, since step {event.get('since_step')})"


def _eval_record(step: int, result: EvalResult) -> dict:
    return {"step": step, "eval_loss": result.loss, "eval_ppl": math.exp(min(result.loss, 700)),
            "eval_sequences": result.sequences, "eval_tokens": result.tokens}


def train(config: Config) -> TrainResult:
    """Run (or resume) one training run as described by `config`; returns what happened.

    Here: the data (before any collective), the process group and the out_dir lock; `_run` is the run itself.
    """
    from megatron_mixln.data import is_preparer, open_datasets
    from megatron_mixln.parallel.launch import discover_launch_env, meet_ranks
    from megatron_mixln.train.memory import check_model_fits, machine_memory
    from megatron_mixln.train.run_lock import RunLock, check_out_dir

    tcfg = config.train
    out = check_out_dir(tcfg.out_dir)

    # Data first, before any collective exists: the preparing rank tokenises (bounded by what the run reads,
    # in parallel); the others wait on the file system, so no collective timeout can hit them. Across nodes
    # (node-local caches) meet_ranks waits for every node's data for as long as its preparer keeps beating.
    launch = discover_launch_env()
    is_main = launch.rank == 0
    # A model that cannot fit is refused before hours of data preparation and before the allocator's traceback.
    check_model_fits(config, launch.world_size, launch.local_world_size or 1, *machine_memory(launch.local_rank))
    with writing("preparing the data", config.data.cache_dir, "set data.cache_dir to another folder"):
        preparer = is_preparer(config, launch.rank, launch.local_rank)
        meta, train_data, eval_data = meet_ranks(
            launch, config.parallel.startup_timeout_minutes,
            lambda: open_datasets(config, preparer=preparer, progress=is_main and tcfg.progress_bar))
    if meta["max_token_id"] >= config.model.vocab_size:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is invalid: the tokenised data holds token id "
                          f"{meta['max_token_id']}, so expected at least {meta['max_token_id'] + 1}.")

    init_distributed(launch, config.parallel.startup_timeout_minutes)
    layout = build_layout(config)
    accumulation = gradient_accumulation_steps(config, layout.dp)
    lock = RunLock()
    if is_main:
        with writing("creating train.out_dir", out, "choose another train.out_dir"):
            out.mkdir(parents=True, exist_ok=True)
    try:
        return _run(config, launch, layout, accumulation, meta, train_data, eval_data, lock)
    finally:
        lock.release()


def repeated_data_note(steps: int, global_batch_size: int, train_sequences: int) -> str | None:
    """The line a run prints when it reads its training split more than once (the demo's embedded sample): the
    training loss then drops when the second pass starts, on sequences the model has seen."""
    if train_sequences == 0 or steps * global_batch_size <= train_sequences:
        return None
    return (f"note: {steps} steps of {global_batch_size} sequences make {steps * global_batch_size / train_sequences:.2f}"
            f" passes over the {train_sequences:,} training sequences; the training loss drops when the second pass "
            f"starts (step {train_sequences // global_batch_size + 1}), on sequences the model has seen; the held-out "
            "loss does not.")


def _take_run_lock(lock, out: Path, is_main: bool) -> None:
    """Rank 0 takes the out_dir lock; every rank raises the same sentence when another trainer holds it."""
    refusal = None
    if is_main:
        try:
            lock.acquire(out)
        except ConfigError as err:
            refusal = str(err)
    shared = [refusal]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise ConfigError(shared[0])


def _run(config: Config, launch, layout, accumulation: int, meta: dict, train_data, eval_data, lock) -> TrainResult:
    """The recipe, once the data is open and the process group is up: lock, resume, model, engine, steps,
    evaluation, checkpoints, export."""
    from megatron_mixln.data import GlobalBatchSampler
    from megatron_mixln.data.sampling import batch_of_step
    from megatron_mixln.data.prefetch import BatchPrefetcher

    tcfg = config.train
    out = Path(tcfg.out_dir)
    is_main = launch.rank == 0
    _take_run_lock(lock, out, is_main)
    resume_kind, resume_from = _resume_source(config)
    # The export written at the end replaces an earlier export only: anything else is refused now, not after training.
    check_output_folder(out / "export", export.EXPORT_OUTPUT, option=None)
    # Before anything is built or loaded: a changed model, data or layout stops here in one line.
    changes = _check_resume(config, layout, resume_kind, resume_from, meta) if resume_kind != "none" else []

    model = build_training_model(config, layout)
    if is_main:
        print(_layout_summary(config, layout))
    engine, optimizer, scheduler = build_engine(model, config, layout)
    steps: StepEngine = make_step_engine(engine, config, layout)
    downstream = DownstreamEvaluator.build(config, steps, layout, meta, is_main)  # a wrong task name stops here
    guard = None
    if config.guard.action != "off":
        guard = steps.guard = LossSpikeGuard(config.guard, collapse_levels(train_data, config.model.vocab_size))
        _lower_lr_when_guard_says(scheduler, guard)

    start_step, state = 0, {}
    if resume_kind == "checkpoint":
        if tcfg.resume == "auto":  # the newest intact checkpoint: a damaged `latest` falls back, saying so
            resume_from, state = ckpt.load_latest_intact(engine, out)
        else:
            state = ckpt.load_checkpoint(engine, resume_from)
        start_step = int(state["step"])
        if guard is not None:
            guard.load_state_dict(state.get("guard"))
        _apply_schedule(optimizer, scheduler, tcfg)
    elif resume_kind == "export":
        # The weights, and the optimiser's state (moments, step count) where the export carries it.
        loaded = module_export.load_export_into(engine.module, resume_from, config.model, layout,
                                                optimizer=engine.optimizer)
        start_step = loaded.step
        _set_schedule_step(scheduler, loaded.schedule_step)
    if is_main:
        # Records past the start step (work lost with a killed process, or every step of a run killed before its
        # first checkpoint) go to metrics.discarded.jsonl, so metrics.jsonl holds each step once.
        dropped = discard_metrics_after(out, start_step)
        moved = f"{dropped} metric records of lost steps moved to {DISCARDED_FILE}" if dropped else ""
        if resume_kind != "none":
            print(f"resumed from {resume_from} at step {start_step}"
                  + (f" ({loaded.note})" if resume_kind == "export" else "")
                  + (f"; changed: {'; '.join(changes)}" if changes else "") + (f"; {moved}" if moved else ""))
        elif moved:
            print(f"no checkpoint in {out} to resume from, so training starts at step 1; {moved}")
    if is_main:
        with writing("writing the run's config", out / "config.json", "choose another train.out_dir"):
            (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))

    writer = MetricsWriter(out, enabled=is_main, monitor=engine.monitor, start_step=start_step)
    result = TrainResult(out_dir=out, last_step=start_step)
    if start_step >= tcfg.steps:  # a finished run started again: nothing to add (and no second final record)
        if is_main:
            print(f"train.out_dir={str(out)!r} holds a finished run (step {start_step} of {tcfg.steps}): nothing to do; "
                  "raise train.steps (with train.resume_changes=allow) to train on, or choose another train.out_dir.")
        result.eval_loss = next((r["eval_loss"] for r in reversed(read_metrics(out / METRICS_FILE))
                                 if isinstance(r.get("eval_loss"), float)), None)
        result.already_finished = True
        return result
    if tcfg.stop_after_step and start_step >= tcfg.stop_after_step:  # the same command after a planned stop
        if is_main:
            print(f"train.out_dir={str(out)!r} already stopped at step {start_step} (train.stop_after_step="
                  f"{tcfg.stop_after_step}): nothing to do; remove or raise train.stop_after_step to train on.")
        result.already_finished = result.stopped_early = True
        return result
    if is_main and tcfg.eval_sequences and len(eval_data) == 0:
        print(f"no held-out data: data.source={config.data.source!r} with data.eval_fraction="
              f"{config.data.eval_fraction} leaves no eval sequences, so there is no evaluation in this run.")
    if is_main and (note := repeated_data_note(tcfg.steps, tcfg.global_batch_size, len(train_data))):
        print(note)
    sampler = GlobalBatchSampler(len(train_data), tcfg.global_batch_size, tcfg.seed)

    def prefetch_from(first_step: int) -> BatchPrefetcher:
        return BatchPrefetcher.for_training(train_data, sampler, first_step, tcfg.steps, dp_rank=layout.dp_rank,
                                            dp=layout.dp, micro_batch_size=tcfg.micro_batch_size,
                                            accumulation=accumulation,
                                            skipped=guard.skipped_batches if guard is not None else ())
    positions = tcfg.global_batch_size * config.data.seq_len
    last_saved = start_step if resume_kind == "checkpoint" else None
    skipped_in_a_row = int(state.get("skipped_in_a_row", 0))

    def last_good() -> str:
        return f"step {last_saved}" if last_saved is not None else "none yet"

    def save(step: int) -> None:
        nonlocal last_saved
        if not steps.weights_are_finite():
            raise NonFiniteError(f"step {step}: the weights are not finite, so nothing was saved (last good "
                                 f"checkpoint: {last_good()}); lower train.lr or set train.grad_clip.")
        ckpt.save_checkpoint(engine, out, step, {"step": step, "seed": tcfg.seed, "config": config.to_dict(),
                                                 "data": meta, "skipped_in_a_row": skipped_in_a_row,
                                                 "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
                                                 **({"guard": guard.state_dict()} if guard is not None else {})},
                             keep=tcfg.keep_checkpoints, keep_before=guard.keep_before(step) if guard else None)
        last_saved = step

    def record_guard_event(event: dict) -> None:
        result.guard_events.append(event)
        writer.write(event)
        if is_main:
            print(guard_line(event), flush=True)

    def roll_back(plan: RollbackPlan, pending: list) -> int:
        """Reload the newest checkpoint from before `plan.first_step`, skip the trouble's batches, go on; returns
        the step reloaded. Every rank takes the same plan (the guard's state is the same everywhere)."""
        nonlocal last_saved, skipped_in_a_row
        if pending:
            _read_pending(pending, result)
        folder = next((f for f in ckpt.checkpoint_candidates(out) if ckpt.step_of(f) < plan.first_step), None)
        if folder is None:
            raise UnstableError(f"step {plan.trigger_step}: {plan.reason}, and there is no checkpoint from before step "
                                f"{plan.first_step} to roll back to (last checkpoint: {last_good()}); save more often "
                                "(train.save_every) or lower guard.skip_batches_before.")
        first_batch = batch_of_step(plan.first_step, guard.skipped_batches)
        last_batch = batch_of_step(plan.trigger_step, guard.skipped_batches)
        reloaded = ckpt.load_checkpoint(engine, folder)
        back_to = int(reloaded["step"])
        _apply_schedule(optimizer, scheduler, tcfg)
        event = {"step": back_to, **guard.rolled_back(plan, first_batch, last_batch, reloaded.get("guard"),
                                                        scheduler.last_epoch)}
        _set_schedule_step(scheduler, scheduler.last_epoch)  # the lowered LR, if the guard lowers it
        skipped_in_a_row = int(reloaded.get("skipped_in_a_row", 0))
        for kept in (result.losses, result.grad_norms):
            for later in [s for s in kept if s > back_to]:
                del kept[later]
        result.skipped_steps[:] = [s for s in result.skipped_steps if s <= back_to]
        if is_main:
            moved = discard_metrics_after(out, back_to)
            writer.restart_at(back_to)
            event["records_moved"] = moved
        record_guard_event(event)
        save(back_to)  # the same weights with the rollback in their state: a resume from here is exact
        return back_to

    def stop_if_metrics_failed(step: int) -> None:
        """Rank 0 could not append to metrics.jsonl (a full disk, a quota): save a checkpoint, so that the steps
        trained so far are not lost, and stop every rank with the same sentence, saying where it is."""
        if not steps.any_rank(writer.failure is not None):
            return
        try:
            if last_saved != step:
                save(step)
            folder = out / ckpt.CHECKPOINTS / ckpt.tag_for_step(step)
            saved = f"the run stopped with a checkpoint of step {step} in {folder}"
        except CheckpointError as err:
            saved = f"saving a checkpoint of step {step} failed too ({str(err).rstrip('.')})"
        message = [None]
        if is_main:
            failed_step, err = writer.failure
            message[0] = str(storage_error(err, f"appending step {failed_step}'s record", writer.path, outcome=(
                f"{saved}; {remedy(err)} and run the same command to resume")))
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(message, src=0)
        raise StorageError(message[0])

    def evaluate(step: int) -> EvalResult:
        evaluation = steps.evaluate(eval_data, tcfg.eval_sequences)
        if evaluation.loss is not None:
            writer.write(_eval_record(step, evaluation))
        return evaluation

    def score_downstream(step: int) -> None:
        record = downstream(step)
        if is_main:
            writer.write(record)
            (progress.write if progress is not None else print)(downstream_line(record))

    # A bar on a terminal; under SLURM (stdout a file) one plain line per logged step instead.
    progress = None
    if is_main and tcfg.progress_bar and sys.stdout.isatty():
        from tqdm import tqdm

        progress = tqdm(total=tcfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    lines = is_main and progress is None
    loop_started = time.perf_counter()
    step = start_step
    with StopRequests(launch.rank) as stop:  # from here a stop signal ends the run at a step boundary
        try:
            clock = StepClock()
            pending: list[tuple[int, StepResult]] = []  # steps whose loss has not been read to the host yet
            first_step, rollback = start_step + 1, None
            while first_step <= tcfg.steps:  # once, or again from a checkpoint after each guard rollback
                with prefetch_from(first_step) as prefetcher:  # leaving in any way stops and joins its thread
                    batches = iter(prefetcher)
                    for step in range(first_step, tcfg.steps + 1):
                        clock.start()
                        _, micro_batches, global_targets, batch = next(batches)
                        lr = scheduler.get_last_lr()[0]  # the LR this step's update applies
                        telemetry = telemetry_due(tcfg, step)  # its update-to-weight ratios need the update norms
                        want_layer_norms = telemetry or bool(tcfg.layer_grad_norm_every
                                                             and step % tcfg.layer_grad_norm_every == 0)
                        outcome = steps.train_step(step, micro_batches, global_targets, want_layer_norms, batch)
                        clock.stop()
                        pending.append((step, outcome))

                        if outcome.applied:
                            skipped_in_a_row = 0
                        else:
                            skipped_in_a_row += 1
                            result.skipped_steps.append(step)
                        if progress is not None:
                            progress.update(1)
                        if step % tcfg.log_every == 0 or step == tcfg.steps or not outcome.applied:
                            outcome = _read_pending(pending, result)
                            if is_main:
                                record = _step_record(step, lr, outcome, clock.seconds(), positions)
                                writer.write(record)
                                if lines:
                                    seconds_per_step = (time.perf_counter() - loop_started) / (step - start_step)
                                    print(console_line(record, tcfg.steps, seconds_per_step * (tcfg.steps - step)),
                                          flush=True)
                            if progress is not None:
                                progress.set_postfix(loss=f"{outcome.loss:.4f}", refresh=False)
                        decision = guard.after_step(step, outcome.applied) if guard is not None else None
                        if telemetry or (decision is not None and decision.events):  # in full at every event
                            writer.write({"step": step, **measure(steps, micro_batches, outcome)})
                        if decision is not None:
                            for event in decision.events:
                                record_guard_event(event)
                            if decision.stop is not None:
                                raise UnstableError(f"{decision.stop} (last checkpoint: {last_good()}).")
                            if decision.rollback is not None:
                                rollback = decision.rollback
                                break
                        if not outcome.applied:
                            _stop_if_skips_must_stop(tcfg, step, outcome, skipped_in_a_row, last_good())

                        if tcfg.eval_every and step % tcfg.eval_every == 0 and step != tcfg.steps:
                            evaluate(step)
                        if downstream is not None and tcfg.downstream_every and step % tcfg.downstream_every == 0 \
                                and step != tcfg.steps:
                            score_downstream(step)
                        stop_now = tcfg.stop_after_step and step >= tcfg.stop_after_step and step != tcfg.steps
                        if (tcfg.save_every and step % tcfg.save_every == 0) or stop_now:
                            save(step)
                        if stop_now:
                            result.stopped_early = True
                            break
                        if step != tcfg.steps and steps.any_rank(stop.received is not None or writer.failure is not None):
                            stop_if_metrics_failed(step)
                            # Every rank stops here, on whichever rank's signal: save (unless just saved) and leave.
                            if last_saved != step:
                                save(step)
                            result.stopped_early, result.stop_signal = True, stop.received or "a signal on another rank"
                            break
                if rollback is None:
                    break
                step = roll_back(rollback, pending)
                first_step, rollback = step + 1, None
                if progress is not None:
                    progress.n = step
            if pending:  # left early between logged steps
                _read_pending(pending, result)
            result.last_step = step
            peaks: list = [None] * dist.get_world_size()
            dist.all_gather_object(peaks, _memory_mb()[1])
            writer.write({"step": step, "peak_memory_mb_per_rank": peaks,
                          "memory": "cuda max allocated" if torch.cuda.is_available() else "process max RSS"})
            stop_if_metrics_failed(step)  # a failure at the last step, or at train.stop_after_step
            if not result.stopped_early:
                if last_saved != step:
                    save(step)
                result.eval_loss = evaluate(step).loss
                if downstream is not None:
                    score_downstream(step)
            # The consolidated export also at train.stop_after_step: it is how a run moves to another layout.
            # Not after a stop signal: the time left before the job is killed belongs to the checkpoint.
            if result.stop_signal is None:
                result.export_dir = module_export.export_from_module(
                    engine.module, config.model, layout, out / "export",
                    extra={"step": step, "data": meta, "run_config": config.to_dict()},
                    optimizer=engine.optimizer, scheduler=scheduler)
            if writer.failure is not None:  # only the final evaluation's record can be missing here
                print(f"warning: {storage_error(writer.failure[1], 'appending the evaluation record', writer.path)}",
                      file=sys.stderr)
            if not result.stopped_early and is_main:
                plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png",
                                title=f"{config.model.norm_placement} placement, {config.model.num_layers} layers")
        finally:
            if progress is not None:
                progress.close()
            writer.close()
    return result
