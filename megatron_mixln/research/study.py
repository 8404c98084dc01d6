"""mixln-study: the placement study this repository commits (studies/cpu_deep_narrow/), as one command.

It trains a grid of runs of one small config (configs/study/deep_narrow.yaml): each placement, with the default
and the scaled (sqrt(2/5), the official code's) embedding initialisation, over several seeds; then analyses
them (held-out perplexity, per-layer gradient norms, angular distance, layer removal: megatron_mixln.analysis),
runs a short learning-rate sweep per placement (the largest LR that trains without diverging, and the per-layer
gradient and update norms where a run diverges), and writes a markdown report with figures and a JSON of every
number. Runs go to <out>/runs and <out>/sweep; a run that finished is not trained again, so the command resumes.

With --guard-sweep it runs the loss-spike guard study instead (studies/cpu_guard/): the LR sweep's unstable
(placement, LR) pairs with the guard off, skipping and rolling back, over seeds, with stability telemetry, into
<out>/guard/<placement>-lr<lr>-<action>-s<seed> (report.guard_report writes its report).
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron_mixln.output_folder import OutputFolderError, OutputKind, check_output_folder
from megatron_mixln.research.runs import (GUARD_EXIT, GUARD_OVERRIDES, GUARD_RUN_OVERRIDES, ROLLBACK_OVERRIDES,
                                          GuardRun, Run, classify, metrics)

PLACEMENTS = ("pre", "post", "mix", "lns", "peri")
EMBED_INITS = {"default": "false", "scaled": "true"}  # model.scaled_embed_init
SWEEP_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# A finished study holds study.json; one stopped part-way (it resumes) holds the runs it began.
STUDY_OUTPUT = OutputKind("study", (("study.json",), ("runs",), ("guard",)))


def grid(out: Path, placements, inits, seeds) -> list[Run]:
    return [Run(p, i, s, out / "runs" / f"{p}-{i}-s{s}") for p in placements for i in inits for s in seeds]


def finished(folder: Path) -> bool:
    """A run whose export was written at its end (its metrics hold a final eval record)."""
    return (folder / "export" / "config.json").is_file() and (folder / "metrics.jsonl").is_file()


def mixln_train(config: str, overrides: list[str], log: Path) -> int:
    """One `mixln-train` in its own process, one thread (two share the 2 cores), output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-c", "from megatron_mixln.cli import train_main; train_main()", config, *overrides]
    with open(log, "a") as handle:
        return subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode


def train_grid(runs: list[Run], config: str, overrides: list[str], jobs: int) -> dict[str, int]:
    """Train every run not finished yet, `jobs` at a time; returns run name -> exit status."""
    todo = [run for run in runs if not finished(run.folder)]
    print(f"study: {len(runs) - len(todo)} of {len(runs)} runs already finished; training {len(todo)}", flush=True)

    def one(run: Run) -> tuple[str, int]:
        status = mixln_train(config, [*overrides, f"model.norm_placement={run.placement}",
                                      f"model.scaled_embed_init={EMBED_INITS[run.init]}", f"train.seed={run.seed}",
                                      f"train.out_dir={run.folder}"], run.folder / "train.log")
        print(f"study: {run.name}: exit {status}", flush=True)
        return run.name, status

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(pool.map(one, todo))


# ---------------------------------------------------------------------------------------------------- sweep
def sweep_runs(out: Path, placements, lrs) -> list[tuple[str, float, Path]]:
    return [(p, lr, out / "sweep" / f"{p}-lr{lr:g}") for p in placements for lr in lrs]


def run_sweep(out: Path, config: str, overrides: list[str], placements, lrs, steps: int, jobs: int) -> dict:
    """Short runs per (placement, LR), each classified (`classify`); the largest LR each placement trains at
    without diverging, and the per-layer gradient and update norms at the step where its first run that spiked
    or diverged went wrong."""
    runs = sweep_runs(out, placements, lrs)
    todo = [(p, lr, folder) for p, lr, folder in runs if not (folder / "metrics.jsonl").is_file()
            or not any(r.get("peak_memory_mb_per_rank") for r in metrics(folder))]

    def one(item) -> None:
        placement, lr, folder = item
        mixln_train(config, [*overrides, f"model.norm_placement={placement}", f"train.lr={lr}",
                             f"train.steps={steps}", "train.on_nonfinite=skip", "train.max_consecutive_skips=3",
                             "train.layer_grad_norm_every=1", "train.log_every=1", "train.eval_sequences=0",
                             f"train.out_dir={folder}"], folder / "train.log")
        print(f"study: sweep {folder.name} done", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo))
    result: dict = {"lrs": list(lrs), "steps": steps, "placements": {}}
    for placement in placements:
        rows = []
        for p, lr, folder in runs:
            if p != placement:
                continue
            records = metrics(folder)
            outcome = classify(records, planned_steps=steps)
            at = outcome["diverged_at"] if outcome["outcome"] == "diverged" else outcome["first_spike"]
            losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
            rows.append({"lr": lr, "outcome": outcome["outcome"], "diverged_at": outcome["diverged_at"],
                         "first_spike": outcome["first_spike"], "final_loss": losses[-1] if losses else None,
                         "norms": _norms_at(records, at) if at is not None else None})
        stable = [row["lr"] for row in rows if row["outcome"] != "diverged"]
        # The first LR (ascending) whose run spiked or diverged: its norms are the report's.
        first_bad = next((row for row in sorted(rows, key=lambda r: r["lr"]) if row["outcome"] != "trained"), None)
        result["placements"][placement] = {"runs": rows, "max_stable_lr": max(stable) if stable else None,
                                           "first_divergence": first_bad}
    return result


# ---------------------------------------------------------------------------------------------------- guard sweep
GUARD_ACTIONS = ("off", "skip", "rollback")
def parse_guard_lrs(values: list[str], placements) -> list[tuple[str, float]]:
    """`--guard-lrs` values: `1e-2` (every placement) or `mix=1e-2` (that placement only) -> (placement, lr)."""
    pairs = []
    for value in values:
        placement, _, lr = value.rpartition("=")
        try:
            rate = float(lr)
        except ValueError:
            rate = math.nan
        if not rate > 0 or (placement and placement not in placements):
            raise ValueError(f"--guard-lrs {value} is invalid: expected a positive learning rate, or PLACEMENT=LR "
                             f"with PLACEMENT one of --guard-placements ({', '.join(placements)})")
        pairs += [(p, rate) for p in ([placement] if placement else placements) if (p, rate) not in pairs]
    return pairs


def guard_grid(out: Path, pairs, actions, seeds) -> list[GuardRun]:
    """Seed by seed, so a study cut short has every (placement, LR, action) at the same seeds."""
    return [GuardRun(p, lr, a, s, out / "guard" / f"{p}-lr{lr:g}-{a}-s{s}")
            for s in seeds for p, lr in pairs for a in actions]


def guard_overrides(action: str) -> list[str]:
    """The guard's settings for one action (GUARD_OVERRIDES; the rollback's need checkpoints)."""
    if action == "off":
        return ["guard.action=off"]
    return [f"guard.action={action}", *GUARD_OVERRIDES, *(ROLLBACK_OVERRIDES if action == "rollback" else ())]


def run_guard_sweep(runs: list[GuardRun], config: str, overrides: list[str], steps: int, jobs: int) -> dict:
    """Train every guard run whose process has not ended yet, `jobs` at a time, one thread each; returns run
    name -> exit status (also of runs trained before, from their GUARD_EXIT)."""
    import json
    import time

    todo = [run for run in runs if not (run.folder / GUARD_EXIT).is_file()]
    print(f"study: {len(runs) - len(todo)} of {len(runs)} guard runs already done; training {len(todo)}", flush=True)

    def one(run: GuardRun) -> None:
        began = time.monotonic()
        status = mixln_train(config, [*GUARD_RUN_OVERRIDES, *guard_overrides(run.action), *overrides,
                                      f"train.steps={steps}", f"model.norm_placement={run.placement}",
                                      f"train.lr={run.lr}", f"train.seed={run.seed}", f"train.out_dir={run.folder}"],
                             run.folder / "train.log")
        seconds = time.monotonic() - began
        (run.folder / GUARD_EXIT).write_text(json.dumps({"exit": status, "seconds": round(seconds, 1)}) + "\n")
        print(f"study: guard {run.name}: exit {status} after {seconds:.0f} s", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo))
    return {run.name: json.loads((run.folder / GUARD_EXIT).read_text())
            for run in runs if (run.folder / GUARD_EXIT).is_file()}


def _norms_at(records: list[dict], step: int) -> dict:
    """Per-layer gradient and update norms of the last step before `step` that recorded them, and of `step`."""
    with_norms = [r for r in records if "layer_grad_norms" in r and r["step"] <= step]
    before = with_norms[-2] if len(with_norms) > 1 else (with_norms[-1] if with_norms else None)
    at = next((r for r in records if r["step"] == step and "layer_grad_norms" in r), None)
    pick = lambda r: None if r is None else {"step": r["step"], "grad": r["layer_grad_norms"],  # noqa: E731
                                             "update": r.get("layer_update_norms", {})}
    return {"before": pick(before), "at": pick(at or (with_norms[-1] if with_norms else None))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mixln-study", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="study folder (runs, figures, report.md, study.json): a new or empty "
                                               "one, or an earlier study to resume")
    parser.add_argument("--force", action="store_true",
                        help="write into OUT even when it holds other files (never when it holds the --config file)")
    parser.add_argument("--config", default="configs/study/deep_narrow.yaml", help="the runs' config")
    parser.add_argument("--placements", nargs="+", default=list(PLACEMENTS))
    parser.add_argument("--inits", nargs="+", default=list(EMBED_INITS), choices=list(EMBED_INITS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default 2)")
    parser.add_argument("--sweep-lrs", nargs="*", type=float, default=list(SWEEP_LRS),
                        help="learning rates of the stability sweep (none: no sweep)")
    parser.add_argument("--sweep-steps", type=int, default=150)
    parser.add_argument("--sweep-placements", nargs="+", help="placements the sweep runs (default: --placements)")
    parser.add_argument("--sequences", type=int, default=128, help="held-out sequences for the analyses")
    parser.add_argument("--guard-sweep", action="store_true",
                        help="run the loss-spike guard study instead of the placement grid and LR sweep: each "
                             "--guard-placements x --guard-lrs x --guard-actions x --guard-seeds run, then its report")
    parser.add_argument("--guard-placements", nargs="+", default=["pre", "mix"])
    parser.add_argument("--guard-lrs", nargs="+", default=["mix=3e-3", "mix=1e-2", "pre=3e-2", "pre=1e-1"],
                        help="LR for every guard placement (1e-2), or for one (mix=1e-2); default: where the "
                             "committed LR sweep spiked or diverged")
    parser.add_argument("--guard-actions", nargs="+", default=list(GUARD_ACTIONS), choices=["off", "warn", "skip",
                                                                                            "rollback"])
    parser.add_argument("--guard-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--guard-steps", type=int, default=100, help="steps per guard run (default 100, as the "
                                                                     "committed LR sweep)")
    parser.add_argument("overrides", nargs="*", help="section.field=value for every run, e.g. train.steps=300")
    args = parser.parse_intermixed_args(argv)
    args.command = "mixln-study " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))

    from megatron_mixln.research.report import analyse_and_report

    try:
        pairs = parse_guard_lrs(args.guard_lrs, args.guard_placements) if args.guard_sweep else []
        check_output_folder(args.out, STUDY_OUTPUT, [args.config], args.force)
    except (ValueError, OutputFolderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.guard_sweep:
        from megatron_mixln.research.report import guard_report

        guard_runs = guard_grid(args.out, pairs, args.guard_actions, args.guard_seeds)
        statuses = run_guard_sweep(guard_runs, args.config, args.overrides, args.guard_steps, args.jobs)
        guard_report(args.out, guard_runs, statuses, args)
        return 0
    runs = grid(args.out, args.placements, args.inits, args.seeds)
    statuses = train_grid(runs, args.config, args.overrides, args.jobs)
    sweep = (run_sweep(args.out, args.config, args.overrides, args.sweep_placements or args.placements,
                       args.sweep_lrs, args.sweep_steps, args.jobs) if args.sweep_lrs else None)
    analyse_and_report(args.out, runs, sweep, args, statuses)
    return 0


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
