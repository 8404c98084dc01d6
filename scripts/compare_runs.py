#!/usr/bin/env python3
"""Compare two training runs of the same config and seed that differ only in `model.kernels` (scripts/gpu_check.sh).

    python scripts/compare_runs.py triton=RUN_DIR_A torch=RUN_DIR_B --steps 200 --md out.md --json out.json

Reads each run's metrics.jsonl (written by mixln-train) and checks:
  * every run logged all `--steps` steps, none skipped, every loss finite;
  * the loss curves match: |loss_A - loss_B| <= --max-abs-diff at every step both logged, and the mean of
    |loss_A - loss_B| over the last --tail common steps <= --tail-mean-diff;
  * each run learned something: its mean loss over the last --tail steps is below its step-1 loss.
Reports, per run: median tokens/s (target tokens, as mixln-train logs them) and positions/s (padding included)
over the steps after the first --skip-steps, median step time, step-1 / final / tail-mean loss, peak memory
(the `peak_memory_mb_per_rank` record: CUDA max allocated on a GPU, process max RSS on a CPU) and the held-out
loss when there is one. Writes a markdown table (--md) and JSON (--json, per-step curves included) and, with
--plot, a PNG of both curves and their difference. Exit status: 0 when every check passed, 1 otherwise.

Tolerances (the defaults, for bf16). Both runs start from the same weights and see the same batches in the same
order, so every difference comes from rounding: the Triton kernels compute in fp32 and round each output once,
while the torch path rounds some intermediates to bf16 (relative error up to 2^-8 = 0.4% each); on a GPU even
the torch path alone is not bit-reproducible (atomics in the attention and matmul backward). Such differences
stay small over a few hundred Adam steps: repeat bf16 runs of a ~100M model typically differ by ~0.005-0.02 in
per-step loss (each step's loss is a mean over ~65K tokens, and both runs see the same ones, so data noise
cancels). A kernel bug (a wrong gradient term, scale or eps, a mis-masked column) moves the curve by well over
0.05 within tens of steps, or biases it steadily. Hence: 0.05 at any single step (room for a one-off spike from
a rounding difference in the fast-changing early steps, where the loss is ~10), and 0.02 on the mean |difference|
over the last 50 steps, where a systematic offset shows and step-to-step jitter averages out. Tighten them
(e.g. 1e-3) for fp32 runs.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def _num(value):
    """A metrics value as float: mixln-train writes non-finite floats as strings ('nan', 'inf')."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_run(folder: Path, skip_steps: int, tail: int) -> dict:
    path = folder / "metrics.jsonl"
    run = {"dir": str(folder), "metrics_found": path.is_file(), "losses": {}, "skipped_steps": [],
           "tokens_per_second": {}, "positions_per_second": {}, "step_seconds": {}, "grad_norm": {},
           "peak_memory_mb": None, "memory_kind": None, "eval_loss": None, "bad_lines": 0, "steps_logged": 0,
           "last_step": 0, "median_tokens_per_second": None, "median_positions_per_second": None,
           "median_step_seconds": None, "first_loss": None, "final_loss": None, "tail_mean_loss": None}
    if not path.is_file():
        return run
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a killed run
            run["bad_lines"] += 1
            continue
        step = record.get("step")
        if "peak_memory_mb_per_rank" in record:
            peaks = [p for p in record["peak_memory_mb_per_rank"] if p is not None]
            run["peak_memory_mb"] = max(peaks) if peaks else None
            run["memory_kind"] = record.get("memory")
        elif "eval_loss" in record:
            run["eval_loss"] = _num(record["eval_loss"])
        elif "loss" in record and step is not None:
            run["losses"][step] = _num(record["loss"])
            if record.get("skipped"):
                run["skipped_steps"].append(step)
            if record.get("grad_norm") is not None:
                run["grad_norm"][step] = _num(record["grad_norm"])
            tps, seconds = _num(record.get("tokens_per_second")), _num(record.get("step_seconds"))
            if tps is not None:
                run["tokens_per_second"][step] = tps
            if seconds:
                run["step_seconds"][step] = seconds
                padding = _num(record.get("padding_fraction")) or 0.0
                target = _num(record.get("target_tokens"))
                if target is not None and padding < 1.0:
                    run["positions_per_second"][step] = target / (1.0 - padding) / seconds

    steps = sorted(run["losses"])
    run["steps_logged"] = len(steps)
    run["last_step"] = steps[-1] if steps else 0

    def median_after(series):
        values = [v for s, v in series.items() if s > skip_steps and v is not None and math.isfinite(v)]
        return statistics.median(values) if values else None

    run["median_tokens_per_second"] = median_after(run["tokens_per_second"])
    run["median_positions_per_second"] = median_after(run["positions_per_second"])
    run["median_step_seconds"] = median_after(run["step_seconds"])
    run["first_loss"] = run["losses"][steps[0]] if steps else None
    run["final_loss"] = run["losses"][steps[-1]] if steps else None
    tail_values = [run["losses"][s] for s in steps[-tail:]]
    run["tail_mean_loss"] = statistics.fmean(tail_values) if tail_values else None
    return run


def compare(runs: dict[str, dict], args) -> dict:
    names = list(runs)
    a, b = (runs[n] for n in names)
    checks = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    for name, run in runs.items():
        if not run["metrics_found"]:
            check(f"{name}: metrics.jsonl written", False, f"no {run['dir']}/metrics.jsonl")
            continue
        complete = run["steps_logged"] == args.steps and run["last_step"] == args.steps
        check(f"{name}: all {args.steps} steps logged", complete,
              f"{run['steps_logged']} steps logged, last step {run['last_step']}")
        bad = [s for s, v in run["losses"].items() if v is None or not math.isfinite(v)]
        check(f"{name}: every loss finite, no skipped update", not bad and not run["skipped_steps"],
              f"non-finite losses at steps {bad[:10]}, skipped updates {run['skipped_steps'][:10]}"
              if bad or run["skipped_steps"] else f"{run['steps_logged']} finite losses")
        learned = (run["tail_mean_loss"] is not None and run["first_loss"] is not None
                   and math.isfinite(run["tail_mean_loss"]) and run["tail_mean_loss"] < run["first_loss"])
        check(f"{name}: loss went down", learned,
              f"step-1 loss {_fmt(run['first_loss'], 4)}, mean of the last {args.tail} "
              f"{_fmt(run['tail_mean_loss'], 4)}")

    common = sorted(set(a["losses"]) & set(b["losses"]))
    diffs = {s: abs(a["losses"][s] - b["losses"][s]) for s in common}
    finite = {s: d for s, d in diffs.items() if math.isfinite(d)}
    result = {"common_steps": len(common), "max_abs_diff": None, "max_abs_diff_step": None,
              "tail_mean_abs_diff": None, "tail_mean_signed_diff": None, "step1_abs_diff": diffs.get(1)}
    if common:
        worst = max(diffs, key=lambda s: diffs[s] if math.isfinite(diffs[s]) else math.inf)
        result["max_abs_diff"], result["max_abs_diff_step"] = diffs[worst], worst
        tail_steps = common[-args.tail:]
        tail = [diffs[s] for s in tail_steps]
        result["tail_mean_abs_diff"] = statistics.fmean(tail)
        result["tail_mean_signed_diff"] = statistics.fmean(a["losses"][s] - b["losses"][s] for s in tail_steps)
        check(f"|loss {names[0]} - loss {names[1]}| <= {args.max_abs_diff} at every step",
              len(finite) == len(diffs) and result["max_abs_diff"] <= args.max_abs_diff,
              f"max {_fmt(result['max_abs_diff'], 4)} at step {worst}, over {len(common)} common steps")
        check(f"mean |difference| over the last {len(tail_steps)} common steps <= {args.tail_mean_diff}",
              math.isfinite(result["tail_mean_abs_diff"]) and result["tail_mean_abs_diff"] <= args.tail_mean_diff,
              f"{_fmt(result['tail_mean_abs_diff'], 4)} (signed mean {names[0]} - {names[1]}: "
              f"{_fmt(result['tail_mean_signed_diff'], 4)})")
    else:
        check("the two runs have steps in common", False, "no step logged by both runs")

    ta, tb = a["median_tokens_per_second"], b["median_tokens_per_second"]
    result["speedup"] = ta / tb if ta and tb else None
    result["checks"] = checks
    result["ok"] = all(c["ok"] for c in checks)
    return result


def _clean(value):
    """JSON-safe: non-finite floats as strings (as metrics.jsonl writes them), tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _fmt(value, digits=1, comma=False):
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:,.{digits}f}" if comma else f"{value:.{digits}f}"


def markdown(runs: dict[str, dict], result: dict, args) -> str:
    names = list(runs)
    lines = [f"Training comparison: {args.label or ', '.join(names)}; median over steps > {args.skip_steps}, "
             f"tail = last {args.tail} steps", "",
             "| kernels | steps | median tokens/s | median positions/s | median step s | peak memory MB | "
             "loss step 1 | final loss | tail mean loss | eval loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        lines.append(
            f"| {name} | {run['steps_logged']}/{args.steps} | {_fmt(run['median_tokens_per_second'], 0, True)} | "
            f"{_fmt(run['median_positions_per_second'], 0, True)} | {_fmt(run['median_step_seconds'], 3)} | "
            f"{_fmt(run['peak_memory_mb'], 0, True)}{' (' + run['memory_kind'] + ')' if run['memory_kind'] else ''} | "
            f"{_fmt(run['first_loss'], 4)} | {_fmt(run['final_loss'], 4)} | {_fmt(run['tail_mean_loss'], 4)} | "
            f"{_fmt(run['eval_loss'], 4)} |")
    lines += ["", f"speed-up {names[0]} / {names[1]} (median tokens/s): "
              + (f"{result['speedup']:.3f}x" if result["speedup"] else "-"),
              f"loss difference: step 1 {_fmt(result['step1_abs_diff'], 5)}, max {_fmt(result['max_abs_diff'], 4)}"
              f" (step {result['max_abs_diff_step']}), mean over the tail {_fmt(result['tail_mean_abs_diff'], 4)}",
              "", "| check | ok | detail |", "|---|---|---|"]
    lines += [f"| {_cell(c['check'])} | {'yes' if c['ok'] else 'NO'} | {_cell(c['detail'])} |"
              for c in result["checks"]]
    lines += ["", f"training comparison: {'PASSED' if result['ok'] else 'FAILED'}"]
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for name, run in runs.items():
        steps = sorted(run["losses"])
        top.plot(steps, [run["losses"][s] for s in steps], label=name, linewidth=1)
    top.set_ylabel("training loss")
    top.legend()
    a, b = (runs[n]["losses"] for n in names)
    common = sorted(set(a) & set(b))
    bottom.plot(common, [a[s] - b[s] for s in common], linewidth=1)
    bottom.axhline(0.0, color="grey", linewidth=0.5)
    bottom.set_ylabel(f"{names[0]} - {names[1]}")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs=2, metavar="NAME=RUN_DIR", help="two runs, e.g. triton=runs/a torch=runs/b")
    parser.add_argument("--steps", type=int, required=True, help="steps each run should have logged")
    parser.add_argument("--skip-steps", type=int, default=10, help="steps left out of the throughput medians")
    parser.add_argument("--tail", type=int, default=50, help="last steps whose mean |loss difference| is checked")
    parser.add_argument("--max-abs-diff", type=float, default=0.05)
    parser.add_argument("--tail-mean-diff", type=float, default=0.02)
    parser.add_argument("--label", default="", help="a line describing the runs, for the table's title")
    parser.add_argument("--md", type=Path, help="write the markdown here (it is printed in any case)")
    parser.add_argument("--json", type=Path, help="write the JSON here")
    parser.add_argument("--plot", type=Path, help="write a PNG of the two curves and their difference here")
    args = parser.parse_args(argv)

    runs = {}
    for spec in args.runs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            parser.error(f"expected NAME=RUN_DIR, got {spec!r}")
        runs[name] = read_run(Path(folder), args.skip_steps, args.tail)
    if len(runs) != 2:
        parser.error("the two runs need different names")
    result = compare(runs, args)
    text = markdown(runs, result, args)
    print(text, end="")
    if args.md:
        args.md.write_text(text)
    if args.json:
        payload = {"label": args.label, "steps": args.steps, "skip_steps": args.skip_steps, "tail": args.tail,
                   "tolerances": {"max_abs_diff": args.max_abs_diff, "tail_mean_abs_diff": args.tail_mean_diff},
                   **{k: v for k, v in result.items()},
                   "runs": {name: {k: ({str(s): x for s, x in v.items()} if isinstance(v, dict) else v)
                                   for k, v in run.items()} for name, run in runs.items()}}
        args.json.write_text(json.dumps(_clean(payload), indent=1, allow_nan=False) + "\n")
    if args.plot:
        try:
            plot(runs, args.plot)
        except Exception as exc:  # noqa: BLE001 - the plot is a convenience; the numbers are in the JSON
            print(f"compare_runs: no plot ({type(exc).__name__}: {exc})", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
