"""The placement study's runs and how they are judged, shared by mixln-study (study.py) and its report (report.py):
the run records (Run, GuardRun), a run's metrics and final held-out perplexity, the seed statistics (mean and
spread, Welch's t against its critical value) and the outcome of one run (`classify`: trained / recovered /
diverged), and the guard study's settings per action."""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

# Two-sided 5 % points of Student's t by degrees of freedom: |Welch t| above the one for 2 (seeds - 1) degrees
# of freedom is called outside the seed-to-seed spread (4 for two groups of three seeds: 2.78).
T_CRITICAL = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def t_critical(seeds: int) -> float:
    return T_CRITICAL.get(2 * (seeds - 1), 2.0)


@dataclass(frozen=True)
class Run:
    placement: str
    init: str
    seed: int
    folder: Path

    @property
    def name(self) -> str:
        return self.folder.name


def metrics(folder: Path) -> list[dict]:
    from megatron_mixln.train.metrics import read_metrics

    return read_metrics(folder / "metrics.jsonl")


def final_eval(folder: Path) -> float | None:
    evals = [r["eval_ppl"] for r in metrics(folder) if isinstance(r.get("eval_ppl"), (int, float))]
    return evals[-1] if evals else None


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def welch_t(a: list[float], b: list[float]) -> float:
    """Welch's t statistic of mean(a) - mean(b); inf when both groups have no spread and differ."""
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    scale = math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))
    return (ma - mb) / scale if scale > 0 else (0.0 if ma == mb else math.copysign(math.inf, ma - mb))


# ---------------------------------------------------------------------------------------------------- outcome
# The sweep's outcome of one run (docs/study.md "How a run is classified"). A spike: the loss rises this many
# nats above its lowest so far (batch-to-batch noise at this scale is a tenth of a nat).
SPIKE_RISE = 1.0
# Recovered: by the end the loss is back to within this many nats of its lowest before the spike.
RECOVERY_MARGIN = 0.1
# Trained at all: the end is this many nats below the start (the unigram level is 1.4 nats below ln(4096)).
MIN_PROGRESS = 0.5
# Stuck at the uniform distribution: the end within this many nats of ln(vocab).
UNIFORM_MARGIN = 0.1
OUTCOMES = ("trained", "recovered", "diverged")


def _loss(record: dict) -> float:
    value = record.get("loss")
    return float(value) if isinstance(value, (int, float)) else math.nan


def classify(records: list[dict], vocab_size: int | None = None, planned_steps: int | None = None) -> dict:
    """The outcome of one run from its step records (metrics.jsonl: each kept step once), one of:

    - ``diverged``: a broken run. Any of: a non-finite loss in the last tenth of the steps; fewer steps than
      `planned_steps` (the run stopped); the final loss (mean of the last tenth of the steps, at least one) not
      MIN_PROGRESS nats below the start (mean of the first five); the final loss within UNIFORM_MARGIN of
      ln(`vocab_size`); or a spike (below) it did not come back from: the final loss more than RECOVERY_MARGIN
      above the lowest loss before its first spike.
    - ``recovered``: not diverged, after at least one spike: a step whose loss is non-finite or more than
      SPIKE_RISE nats above the lowest loss of the steps before it.
    - ``trained``: neither.

    Returns {"outcome", "first_spike" (step or None), "spikes" (steps that start a spike), "peak" (the highest
    finite loss from the first spike on, or None), "pre_spike_best", "start", "final", "diverged_at" (the step
    a diverged run went wrong at: its first spike, its first non-finite step in the last tenth, or its last
    step), "reason"}.
    """
    steps = [r for r in records if "loss" in r and isinstance(r.get("step"), int)]
    out = {"outcome": "trained", "first_spike": None, "spikes": [], "peak": None, "pre_spike_best": None,
           "start": None, "final": None, "diverged_at": None, "reason": ""}
    if not steps:
        return {**out, "outcome": "diverged", "reason": "no step records"}
    losses = [_loss(r) for r in steps]
    lowest, in_spike = math.inf, False
    for record, loss in zip(steps, losses):
        rising = not math.isfinite(loss) or loss > lowest + SPIKE_RISE
        if rising and not in_spike:
            out["spikes"].append(record["step"])
            if out["first_spike"] is None:
                out["first_spike"], out["pre_spike_best"] = record["step"], lowest
        in_spike = rising
        if math.isfinite(loss):
            lowest = min(lowest, loss)
    if out["first_spike"] is not None:
        after = [loss for r, loss in zip(steps, losses) if r["step"] >= out["first_spike"] and math.isfinite(loss)]
        out["peak"] = max(after) if after else None
    head = [loss for loss in losses[:5] if math.isfinite(loss)]
    tail_records = steps[-max(1, len(steps) // 10):]
    tail = [_loss(r) for r in tail_records]
    out["start"] = statistics.fmean(head) if head else None
    out["final"] = statistics.fmean(tail) if all(map(math.isfinite, tail)) else math.nan

    def broken(step: int, reason: str) -> dict:
        return {**out, "outcome": "diverged", "diverged_at": step, "reason": reason}

    bad_tail = next((r["step"] for r, loss in zip(tail_records, tail) if not math.isfinite(loss)), None)
    if bad_tail is not None:
        return broken(bad_tail, "a non-finite loss in the last tenth of the steps")
    if planned_steps is not None and steps[-1]["step"] < planned_steps:
        return broken(steps[-1]["step"], f"stopped at step {steps[-1]['step']} of {planned_steps}")
    if out["start"] is None or out["final"] > out["start"] - MIN_PROGRESS:
        return broken(steps[-1]["step"], f"the final loss is not {MIN_PROGRESS} nats below the start")
    if vocab_size and abs(out["final"] - math.log(vocab_size)) <= UNIFORM_MARGIN:
        return broken(steps[-1]["step"], "the final loss is at ln(vocab): the uniform distribution")
    if out["first_spike"] is not None:
        if not math.isfinite(out["pre_spike_best"]) or out["final"] > out["pre_spike_best"] + RECOVERY_MARGIN:
            return broken(out["first_spike"], "the loss did not come back to its level before the spike")
        return {**out, "outcome": "recovered", "reason": "spiked, then came back below its level before the spike"}
    return out


# The guard's settings for a 100-step run (docs/study.md "The guard study"): the defaults (a 50-step window and
# warm-up) would judge nothing before step 50, and the sweep's spikes came at steps 8 to 20. A window of 8
# fills by step 8; two outliers within 8 steps roll back to a checkpoint saved every 4 steps (two kept: the
# guard keeps its way back itself), skipping the trouble's batches and 4 before them, at half the LR for the
# next 20 updates (a fifth of the run) so the replay does not walk into the same spike.
GUARD_OVERRIDES = ("guard.window=8", "guard.warmup_steps=8")
ROLLBACK_OVERRIDES = ("guard.rollback_outliers=2", "guard.rollback_within=8", "guard.skip_batches_before=4",
                      "train.save_every=4", "train.keep_checkpoints=2", "guard.lr_factor=0.5",
                      "guard.lr_factor_steps=20")
# Every guard run: loss every step, telemetry every other step (one extra forward each), the held-out loss at
# the end, non-finite updates skipped as in the LR sweep.
GUARD_RUN_OVERRIDES = ("train.log_every=1", "train.telemetry_every=2", "train.eval_sequences=128",
                       "train.on_nonfinite=skip", "train.max_consecutive_skips=3", "train.layer_grad_norm_every=0")
GUARD_EXIT = "study_exit.json"  # written when a guard run's process ends: the run is not trained again


@dataclass(frozen=True)
class GuardRun:
    placement: str
    lr: float
    action: str
    seed: int
    folder: Path

    @property
    def name(self) -> str:
        return self.folder.name


def run_dicts(runs: list[Run]) -> list[dict]:
    return [{**asdict(run), "folder": str(run.folder)} for run in runs]
