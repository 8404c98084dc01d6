"""mixln-study: the placement study this repository commits (studies/cpu_deep_narrow/), as one command.

It trains a grid of runs of one small config (configs/study/deep_narrow.yaml): each placement, with the default
and the scaled (sqrt(2/5), the official code's) embedding initialisation, over several seeds; then analyses
them (held-out perplexity, per-layer gradient norms, angular distance, layer removal: megatron_mixln.analysis),
runs a short learning-rate sweep per placement (the largest LR that trains without diverging, and the per-layer
gradient and update norms where a run diverges), and writes a markdown report with figures and a JSON of every
number. Runs go to <out>/runs and <out>/sweep; a run that finished is not trained again, so the command resumes.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_mixln.output_folder import OutputFolderError, OutputKind, check_output_folder

PLACEMENTS = ("pre", "post", "mix", "lns", "peri")
EMBED_INITS = {"default": "false", "scaled": "true"}  # model.scaled_embed_init
SWEEP_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# A finished study holds study.json; one stopped part-way (it resumes) holds the runs it began.
STUDY_OUTPUT = OutputKind("study", (("study.json",), ("runs",)))
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


# ---------------------------------------------------------------------------------------------------- sweep
def sweep_runs(out: Path, placements, lrs) -> list[tuple[str, float, Path]]:
    return [(p, lr, out / "sweep" / f"{p}-lr{lr:g}") for p in placements for lr in lrs]


def divergence(records: list[dict]) -> int | None:
    """The first step at which a run diverged, or None: a skipped (non-finite) update, a loss more than one nat
    above the lowest so far, or no progress at all (the last tenth of steps no lower than the first five)."""
    steps = [r for r in records if "loss" in r]
    lowest = math.inf
    for record in steps:
        loss = record["loss"] if isinstance(record["loss"], (int, float)) else math.nan
        if record.get("skipped") or not math.isfinite(loss) or loss > lowest + 1.0:
            return record["step"]
        lowest = min(lowest, loss)
    if len(steps) >= 20:
        head = statistics.fmean(r["loss"] for r in steps[:5])
        tail = statistics.fmean(r["loss"] for r in steps[-max(1, len(steps) // 10):])
        if tail >= head:
            return steps[-1]["step"]
    return None


def run_sweep(out: Path, config: str, overrides: list[str], placements, lrs, steps: int, jobs: int) -> dict:
    """Short runs per (placement, LR); the largest LR each placement trains at without diverging, and the
    per-layer gradient and update norms at the step its first diverging run went wrong."""
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
            at = divergence(records)
            losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
            rows.append({"lr": lr, "diverged_at": at, "final_loss": losses[-1] if losses else None,
                         "norms": _norms_at(records, at) if at is not None else None})
        stable = [row["lr"] for row in rows if row["diverged_at"] is None]
        first_bad = next((row for row in sorted(rows, key=lambda r: r["lr"]) if row["diverged_at"] is not None), None)
        result["placements"][placement] = {"runs": rows, "max_stable_lr": max(stable) if stable else None,
                                           "first_divergence": first_bad}
    return result


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
    parser.add_argument("overrides", nargs="*", help="section.field=value for every run, e.g. train.steps=300")
    args = parser.parse_intermixed_args(argv)
    args.command = "mixln-study " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))

    from megatron_mixln.study_report import analyse_and_report

    try:
        check_output_folder(args.out, STUDY_OUTPUT, [args.config], args.force)
    except OutputFolderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = grid(args.out, args.placements, args.inits, args.seeds)
    statuses = train_grid(runs, args.config, args.overrides, args.jobs)
    sweep = (run_sweep(args.out, args.config, args.overrides, args.sweep_placements or args.placements,
                       args.sweep_lrs, args.sweep_steps, args.jobs) if args.sweep_lrs else None)
    analyse_and_report(args.out, runs, sweep, args, statuses)
    return 0


def run_dicts(runs: list[Run]) -> list[dict]:
    return [{**asdict(run), "folder": str(run.folder)} for run in runs]


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
