"""The loss-spike guard (docs/stability.md): judge each step against the recent ones, and decide what to do.

Each step's loss and global gradient norm are compared with a rolling window of recent applied, non-outlier steps:
an outlier lies more than `guard.sigmas` standard deviations above the window's mean, or above an absolute
ceiling. The guard is judged inside the optimiser step, after the gradient norm exists and before the update:
`StepEngine` hands it the step's loss and norm where DeepSpeed checks the norm for inf/NaN (its own host read of
the norm, which every step already makes), so an outlier the guard vetoes is skipped exactly as a non-finite step
is: no weight, moment or LR-schedule change. Every rank holds the same loss and norm (all-reduced), and the
guard's state is a function of them only, so every rank takes the same decision without a word to the others.

After the step (`after_step`, on the host, no device work) the guard keeps its window and its bookkeeping and
says what the loop must do: nothing, record an event, roll back, or stop. A rollback reloads the newest checkpoint
from before the trouble, skips the global batches of the trouble and `guard.skip_batches_before` before it
(`skipped_batches`, which `data.sampling.batch_of_step` reads), and may lower the LR for a while. All of the
guard's state travels in every checkpoint (`state_dict`), so a resume, also in the middle of a rollback, is exact.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from megatron_mixln.config import GuardConfig


@dataclass
class Judgement:
    """The guard's view of one step, made inside the optimiser step."""

    loss: float
    grad_norm: float
    loss_threshold: float | None  # None: not judged (warm-up) or no bound
    grad_norm_threshold: float | None
    reason: str = ""  # why it is an outlier ("loss", "grad_norm", "loss_ceiling", "grad_norm_ceiling"); "" = not one

    @property
    def outlier(self) -> bool:
        return bool(self.reason)


@dataclass
class Decision:
    """What the loop does after a step: record `events`; then roll back (`rollback`), stop with the sentence
    `stop`, or go on (both None)."""

    events: list[dict] = field(default_factory=list)
    rollback: "RollbackPlan | None" = None
    stop: str | None = None


@dataclass(frozen=True)
class RollbackPlan:
    trigger_step: int  # the step at which the guard decided
    first_step: int  # the first step of the trouble, less guard.skip_batches_before: the checkpoint must predate it
    reason: str


def collapse_levels(dataset, vocab_size: int, sequences: int = 256) -> list[float]:
    """The losses of a model that ignores its context: ln(vocab_size) (uniform) and the unigram entropy of the
    training targets, estimated on `sequences` sequences spread over the split (nats)."""
    import numpy as np

    from megatron_mixln.data.sampling import eval_indices

    counts = np.zeros(vocab_size, dtype=np.int64)
    for index in eval_indices(len(dataset), sequences):
        labels = np.asarray(dataset[int(index)][1])
        labels = labels[(labels >= 0) & (labels < vocab_size)]
        counts += np.bincount(labels, minlength=vocab_size)
    levels = [math.log(vocab_size)]
    if counts.sum():
        p = counts[counts > 0] / counts.sum()
        levels.append(float(-(p * np.log(p)).sum()))
    return levels


def _merge(windows: list[list[int]]) -> list[list[int]]:
    """Sorted, disjoint [first, last] windows covering the same batches (touching windows are joined)."""
    merged: list[list[int]] = []
    for first, last in sorted(windows):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return merged


class LossSpikeGuard:
    """See the module docstring. `collapse_levels`: the losses a collapsed model sits at (ln vocab, the unigram
    entropy of the training data)."""

    def __init__(self, config: GuardConfig, collapse_levels: list[float]):
        self.config = config
        self.collapse_levels = collapse_levels
        # What a checkpoint holds (state_dict); the rest is the current step's scratch.
        self.losses: list[float] = []  # the window: recent applied steps that were not outliers
        self.grad_norms: list[float] = []
        self.judged_steps = 0  # applied steps seen; warm-up counts these
        self.outlier_steps: list[int] = []  # outliers within the last rollback_within steps
        self.above_since: int | None = None  # first step of the current run of losses above the window's mean
        self.collapse_since: int | None = None
        self.best_loss = math.inf
        self.skipped_batches: list[list[int]] = []  # [first, last] global batches (1-based) a rollback skipped
        self.rollbacks = 0
        self.lr_lowered = [0, 0]  # the LR is lowered for optimiser (schedule) steps in [first, end)
        self.outliers = 0  # counted over the run, for the logs
        self.judgement: Judgement | None = None  # this step's, set by judge()

    # ------------------------------------------------------------------ state
    @property
    def active(self) -> bool:
        return self.config.action != "off"

    @property
    def vetoes(self) -> bool:
        """Whether an outlier's update is withheld (skip, rollback) rather than only recorded (warn)."""
        return self.config.action in ("skip", "rollback")

    def state_dict(self) -> dict:
        return {"losses": self.losses, "grad_norms": self.grad_norms, "judged_steps": self.judged_steps,
                "outlier_steps": self.outlier_steps, "above_since": self.above_since,
                "collapse_since": self.collapse_since, "best_loss": self.best_loss if math.isfinite(self.best_loss)
                else None, "skipped_batches": self.skipped_batches, "rollbacks": self.rollbacks,
                "lr_lowered": self.lr_lowered, "outliers": self.outliers}

    def load_state_dict(self, state: dict, keep_rollbacks: bool = False) -> None:
        """Restore a checkpoint's guard state. `keep_rollbacks`: a rollback reloads the window of the checkpoint
        but keeps what it has decided since (the skipped batches, the count, the lowered LR)."""
        state = state or {}
        self.losses = [float(v) for v in state.get("losses", [])]
        self.grad_norms = [float(v) for v in state.get("grad_norms", [])]
        self.judged_steps = int(state.get("judged_steps", 0))
        self.outlier_steps = [int(v) for v in state.get("outlier_steps", [])]
        self.above_since = state.get("above_since")
        self.collapse_since = state.get("collapse_since")
        best = state.get("best_loss")
        self.best_loss = math.inf if best is None else float(best)
        if not keep_rollbacks:
            self.skipped_batches = _merge([list(w) for w in state.get("skipped_batches", [])])
            self.rollbacks = int(state.get("rollbacks", 0))
            self.lr_lowered = [int(v) for v in state.get("lr_lowered", [0, 0])]
            self.outliers = int(state.get("outliers", 0))

    def keep_before(self, step: int) -> int | None:
        """Under rollback: the step the checkpoint pruning must keep one checkpoint before, so that a rollback
        decided after a save at `step` still finds one from before its skipped batches."""
        if self.config.action != "rollback":
            return None
        starts = [s for s in (self.above_since, self.collapse_since, *self.outlier_steps[:1]) if s is not None]
        return min([*starts, step + 1]) - self.config.skip_batches_before

    def lr_scale(self, schedule_step: int) -> float:
        """The factor on the scheduled LR at optimiser step `schedule_step` (lowered after a rollback)."""
        first, end = self.lr_lowered
        return self.config.lr_factor if first <= schedule_step < end else 1.0

    # ------------------------------------------------------------------ inside the optimiser step
    def thresholds(self) -> tuple[float | None, float | None]:
        """(loss, gradient norm) above which a step is an outlier: once warm, the window's mean + the larger of
        sigmas x its standard deviation and min_rise x the mean; the ceilings, where lower; None: no bound yet."""
        cfg = self.config
        loss_bound, norm_bound = None, None
        if self.judged_steps >= cfg.warmup_steps and len(self.losses) >= 2:
            loss_bound, norm_bound = (statistics.fmean(values) + max(cfg.sigmas * statistics.stdev(values),
                                                                     cfg.min_rise * abs(statistics.fmean(values)))
                                      for values in (self.losses, self.grad_norms))
        if cfg.loss_ceiling:
            loss_bound = cfg.loss_ceiling if loss_bound is None else min(loss_bound, cfg.loss_ceiling)
        if cfg.grad_norm_ceiling:
            norm_bound = cfg.grad_norm_ceiling if norm_bound is None else min(norm_bound, cfg.grad_norm_ceiling)
        return loss_bound, norm_bound

    def judge(self, loss: float, grad_norm: float) -> Judgement:
        """This step's judgement from its loss and pre-clip global gradient norm (both finite here: a non-finite
        step is skipped before the guard is asked)."""
        loss_bound, norm_bound = self.thresholds()
        reason = ""
        if loss_bound is not None and loss > loss_bound:
            reason = "loss_ceiling" if loss_bound == self.config.loss_ceiling else "loss"
        elif norm_bound is not None and grad_norm > norm_bound:
            reason = "grad_norm_ceiling" if norm_bound == self.config.grad_norm_ceiling else "grad_norm"
        self.judgement = Judgement(loss, grad_norm, loss_bound, norm_bound, reason)
        return self.judgement

    # ------------------------------------------------------------------ after the step
    def after_step(self, step: int, applied: bool) -> Decision:
        """Update the window and the trouble bookkeeping with step `step`; what the loop must do now."""
        judgement, self.judgement = self.judgement, None
        decision = Decision()
        if judgement is None:  # a non-finite step: the loop's own rule (train.on_nonfinite) handles it
            return decision
        cfg = self.config
        mean_before = statistics.fmean(self.losses) if self.losses else None
        if judgement.outlier:
            self.outliers += 1
            self.outlier_steps.append(step)
            decision.events.append({"step": step, "event": "outlier", "action": cfg.action,
                                    "reason": judgement.reason, "loss": judgement.loss,
                                    "grad_norm": judgement.grad_norm, "loss_threshold": judgement.loss_threshold,
                                    "grad_norm_threshold": judgement.grad_norm_threshold,
                                    "guard_outliers": self.outliers})
        elif applied:
            self.losses = (self.losses + [judgement.loss])[-cfg.window:]
            self.grad_norms = (self.grad_norms + [judgement.grad_norm])[-cfg.window:]
        if applied:
            self.judged_steps += 1
        self.outlier_steps = [s for s in self.outlier_steps if s > step - cfg.rollback_within]

        # The loss staying above the window: a rise that no single step makes an outlier.
        warm = self.judged_steps >= cfg.warmup_steps
        if warm and mean_before is not None and judgement.loss > mean_before:
            self.above_since = step if self.above_since is None else self.above_since
        else:
            self.above_since = None

        collapse = self._collapse(step, judgement)
        if collapse is not None:
            decision.events.append({"step": step, "event": "collapse", "action": cfg.action, "reason": collapse,
                                    "loss": judgement.loss, "grad_norm": judgement.grad_norm,
                                    "since_step": self.collapse_since})
        self.best_loss = min(self.best_loss, judgement.loss) if applied and not judgement.outlier else self.best_loss

        trouble = None
        if collapse is not None:
            trouble = (self.collapse_since, f"collapse ({collapse})")
        elif len(self.outlier_steps) >= cfg.rollback_outliers:
            trouble = (self.outlier_steps[0], f"{len(self.outlier_steps)} outliers within {cfg.rollback_within} steps")
        elif self.above_since is not None and step - self.above_since + 1 >= cfg.rollback_within:
            trouble = (self.above_since, f"the loss above the window's mean for {step - self.above_since + 1} steps")
        if trouble is None:
            return decision
        if cfg.action == "rollback":
            if self.rollbacks >= cfg.max_rollbacks:
                decision.stop = (f"step {step}: {trouble[1]}, and the guard already rolled back {self.rollbacks} times "
                                 f"(guard.max_rollbacks={cfg.max_rollbacks}), so training stopped")
            else:
                decision.rollback = RollbackPlan(step, max(1, trouble[0] - cfg.skip_batches_before), trouble[1])
        elif collapse is not None and cfg.action == "skip":
            decision.stop = (f"step {step}: the run collapsed ({collapse} since step {self.collapse_since}) and skipping "
                             "steps cannot bring it back, so training stopped (guard.action=rollback reloads an "
                             "earlier checkpoint instead)")
        if collapse is not None:
            self.collapse_since = None  # one event per collapse under warn
        return decision

    def _collapse(self, step: int, judgement: Judgement) -> str | None:
        """A reason once the run has sat collapsed for guard.collapse_steps steps in a row, else None."""
        cfg = self.config
        stuck = None
        if judgement.grad_norm == 0.0:
            stuck = "a gradient norm of exactly 0"
        else:
            for level in self.collapse_levels:
                if abs(judgement.loss - level) <= cfg.collapse_tolerance and self.best_loss < level - 2 * cfg.collapse_tolerance:
                    stuck = f"the loss at {level:.3f}, the level of a model that predicts no context"
                    break
        if stuck is None:
            self.collapse_since = None
            return None
        self.collapse_since = step if self.collapse_since is None else self.collapse_since
        return stuck if step - self.collapse_since + 1 >= cfg.collapse_steps else None

    # ------------------------------------------------------------------ rollback
    def rolled_back(self, plan: RollbackPlan, first_batch: int, last_batch: int, checkpoint_state: dict,
                    schedule_step: int) -> dict:
        """After the loop reloaded a checkpoint for `plan`: take that checkpoint's window, skip global batches
        first_batch..last_batch, lower the LR from `schedule_step` on; returns the event record's fields."""
        self.load_state_dict(checkpoint_state, keep_rollbacks=True)
        self.rollbacks += 1
        self.skipped_batches = _merge(self.skipped_batches + [[first_batch, last_batch]])
        if self.config.lr_factor < 1 and self.config.lr_factor_steps:
            self.lr_lowered = [schedule_step, schedule_step + self.config.lr_factor_steps]
        self.judgement = None
        return {"event": "rollback", "trigger_step": plan.trigger_step, "reason": plan.reason,
                "skipped_batches": [first_batch, last_batch], "rollbacks": self.rollbacks,
                "lr_factor": self.lr_scale(schedule_step), "lr_lowered_updates": self.lr_lowered}
