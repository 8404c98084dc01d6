"""What a resume may change: the saved run's config against the new one, before anything is loaded.

A checkpoint continues one run. Fields that shape the model or the data order (or the parallel layout the
DeepSpeed checkpoint was written in) cannot change under it; fields of the LR schedule and the optimiser can,
but only when asked (`train.resume_changes=allow`), because a silently different schedule makes a run that
no longer matches its own metrics. Everything else (logging, evaluation and saving cadence, kernels, ...) may
change freely and is listed.
"""
from __future__ import annotations

from typing import Any

from megatron_mixln.config import Config, ConfigError

# Fields that may change freely: how the run is observed and saved, not what it computes.
FREE = {"model.kernels", "model.fused_cross_entropy", "model.init_from", "train.compile", "data.cache_dir",
        "data.num_proc", "data.cache_shared",
        "data.max_eval_documents", "train.out_dir", "train.log_every", "train.layer_grad_norm_every",
        "train.telemetry_every", "train.eval_every", "train.eval_sequences", "train.save_every", "train.keep_checkpoints", "train.resume",
        "train.resume_changes", "train.stop_after_step", "train.on_nonfinite", "train.max_consecutive_skips",
        "train.tensorboard", "train.wandb", "train.wandb_project", "train.progress_bar", "train.micro_batch_size",
        "parallel.activation_checkpointing", "parallel.pipeline_partition", "parallel.startup_timeout_minutes"}
# Downstream evaluation observes the run: its tasks and schedule may change at any resume.
FREE |= {f"train.downstream_{name}" for name in ("tasks", "every", "limit", "num_fewshot")}
# The guard watches the run and may be switched on (or off) at a resume, e.g. after a spike.
FREE |= {f"guard.{name}" for name in ("action", "window", "sigmas", "min_rise", "warmup_steps", "loss_ceiling", "grad_norm_ceiling",
                                       "rollback_outliers", "rollback_within", "skip_batches_before", "lr_factor",
                                       "lr_factor_steps", "max_rollbacks", "collapse_steps", "collapse_tolerance")}
# The LR schedule and the optimiser's hyper-parameters: carried on with train.resume_changes=allow.
SCHEDULE = {"train.steps", "train.lr", "train.min_lr_ratio", "train.warmup_fraction", "train.betas",
            "train.adam_eps", "train.weight_decay", "train.grad_clip", "train.loss_reduction", "train.z_loss"}
# The parallel layout a DeepSpeed checkpoint is partitioned for (a move goes through an export).
LAYOUT = {"parallel.tp", "parallel.pp", "parallel.zero_stage", "parallel.offload_optimizer", "train.precision",
          "train.optimizer"}


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """{"model": {"lr": 1}} -> {"model.lr": 1}; lists and tuples compare as lists."""
    return {f"{section}.{name}": list(value) if isinstance(value, (list, tuple)) else value
            for section, fields in config.items() for name, value in fields.items()}


def changed_fields(saved: dict[str, Any], new: Config) -> dict[str, tuple[Any, Any]]:
    """field -> (saved value, new value) for every field that differs; fields unknown to the saved run count
    as unchanged when the new value is the default (an older run written before the field existed)."""
    old, now, defaults = flatten(saved), flatten(new.to_dict()), flatten(Config().to_dict())
    return {name: (old.get(name, defaults[name]), value) for name, value in now.items()
            if old.get(name, defaults[name]) != value}


def check_resume(saved: dict[str, Any], new: Config, source: str, data_changed: bool,
                 layout_can_change: bool = False) -> list[str]:
    """Refuse (one ConfigError sentence) a resume of `source` whose config changed what a checkpoint cannot
    follow; return the notes ("train.eval_every: 100 -> 50") of what it may follow. `data_changed`: the
    prepared data the run reads is not the saved run's (its cache key differs). `layout_can_change`: resuming
    from a consolidated export, which any layout can load."""
    changes = changed_fields(saved, new)

    def listed(names) -> str:
        return ", ".join(f"{name} {changes[name][0]!r} -> {changes[name][1]!r}" for name in sorted(names))

    fixed = [name for name in changes if name not in FREE | SCHEDULE | LAYOUT]
    if fixed:
        raise ConfigError(f"cannot resume {source}: {listed(fixed)} changed, and a checkpoint continues one model on "
                          "one data order; put the old values back or start a new run in another train.out_dir.")
    if data_changed:
        raise ConfigError(f"cannot resume {source}: the prepared data differs from the saved run's (its cache key "
                          "follows data.*, and train.steps x train.global_batch_size when data.max_train_documents=0); "
                          "put the old values back, or set data.max_train_documents explicitly for a longer run.")
    layout = [name for name in changes if name in LAYOUT and not (layout_can_change and name != "train.optimizer")]
    if layout:
        raise ConfigError(f"cannot resume {source}: {listed(layout)} changed, and its DeepSpeed checkpoint is "
                          "written for one layout, precision and optimiser; move layouts through the export "
                          "(train.resume=<out_dir>/export after train.stop_after_step).")
    schedule = [name for name in changes if name in SCHEDULE]
    if schedule and new.train.resume_changes != "allow":
        raise ConfigError(f"cannot resume {source}: {listed(schedule)} changed; set train.resume_changes=allow to "
                          "carry the new values on (the LR schedule then follows them), or put the old values back.")
    return [listed([name]) for name in sorted(changes) if name in FREE | SCHEDULE | LAYOUT]


def other_data_parallel_size(folder, out_dir: str, step: int | None, processes: str) -> str:
    """How to go on from a ZeRO checkpoint saved by another number of data-parallel ranks (the end of the refusal).

    Only the layout that saved it loads its partitioned optimiser state. A run that stops at
    train.stop_after_step writes the consolidated export with that state, which any layout loads; a signal stop
    writes none. mixln-export makes one of any checkpoint, but with the weights (and step) only.
    """
    stop = f"train.stop_after_step={step + 1}" if step is not None else "train.stop_after_step=<its step + 1>"
    weights = f"{str(out_dir).rstrip('/')}-weights"
    return (f"launch {processes} (adding {stop} also writes {out_dir}/export with the optimiser state, which any "
            f"layout resumes from as train.resume={out_dir}/export), or go on from its weights alone, the optimiser "
            f"moments starting over: mixln-export {folder} {weights}, then train.resume={weights}")
