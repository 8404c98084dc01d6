"""The study's analysis and report (mixln-study): numbers per run from megatron_mixln.analysis, aggregated over
seeds per (placement, embedding initialisation), compared against Pre-LN with the seed-to-seed spread, written as
report.md with figures and study.json."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from megatron_mixln.study import Run, final_eval, mean_sd, metrics, run_dicts, t_critical, welch_t

PER_RUN = "study_numbers.json"  # each run's analysed numbers, kept in the run folder so a re-run is cheap


def run_numbers(run: Run, sequences: int) -> dict[str, Any] | None:
    """Held-out perplexity, the n = 1 angular-distance profile, the layer-removal losses, the per-layer gradient
    norms at the last logged step and the loss curve of one finished run (cached in the run folder)."""
    from megatron_mixln import analysis

    cache = run.folder / PER_RUN
    if cache.is_file():
        return json.loads(cache.read_text())
    if final_eval(run.folder) is None:
        return None
    [a] = analysis.analyse([run.folder], sequences=sequences, progress=False)
    gradients = a.gradients
    last = gradients.steps[-1] if gradients is not None and gradients.steps else None
    numbers = {
        "ppl": final_eval(run.folder),
        "angular_n1": [float(v) for v in a.angular[:, 0]],
        "removal_increase": [float(entry["loss_increase"]) for entry in a.removal],
        "full_loss": float(a.removal[0]["full_loss"]),
        "grad_step": last,
        "grad_norms": [float(v) for v in gradients.at(last)] if last is not None else None,
        "train_loss": [(r["step"], r["loss"]) for r in metrics(run.folder)
                       if isinstance(r.get("loss"), (int, float))],
    }
    cache.write_text(json.dumps(numbers))
    return numbers


def aggregate(runs: list[Run], numbers: dict[str, dict]) -> dict[tuple[str, str], dict]:
    """(placement, init) -> mean and sd over seeds of every number, and the per-seed perplexities."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        if numbers.get(run.name) is not None:
            groups.setdefault((run.placement, run.init), []).append(numbers[run.name])
    out = {}
    for key, items in groups.items():
        ppls = [item["ppl"] for item in items]
        stacked = {name: np.array([item[name] for item in items], dtype=float)
                   for name in ("angular_n1", "removal_increase") if all(item.get(name) for item in items)}
        grads = [item["grad_norms"] for item in items if item.get("grad_norms")]
        out[key] = {"ppl": ppls, "ppl_mean": mean_sd(ppls)[0], "ppl_sd": mean_sd(ppls)[1],
                    **{f"{name}_mean": array.mean(axis=0).tolist() for name, array in stacked.items()},
                    **{f"{name}_sd": array.std(axis=0, ddof=1).tolist() if len(array) > 1 else None
                       for name, array in stacked.items()},
                    "grad_norms_mean": np.mean(grads, axis=0).tolist() if grads else None,
                    "train_loss_mean": _mean_curve([item["train_loss"] for item in items])}
    return out


def _mean_curve(curves: list[list]) -> list[tuple[int, float]]:
    steps = sorted(set.intersection(*[{step for step, _ in curve} for curve in curves])) if curves else []
    by_run = [dict(curve) for curve in curves]
    return [(step, statistics.fmean(curve[step] for curve in by_run)) for step in steps]


def comparisons(groups: dict, placements, inits, critical: float) -> list[dict]:
    """Each placement against Pre-LN, per initialisation: the perplexity difference and Welch's t."""
    rows = []
    for init in inits:
        base = groups.get(("pre", init))
        for placement in placements:
            other = groups.get((placement, init))
            if placement == "pre" or base is None or other is None:
                continue
            t = welch_t(other["ppl"], base["ppl"])
            rows.append({"init": init, "placement": placement, "difference": other["ppl_mean"] - base["ppl_mean"],
                         "t": t, "outside_spread": abs(t) > critical})
    return rows


# ---------------------------------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_by_init(groups, placements, inits, key: str, ylabel: str, title: str, path: Path, start: int = 0):
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(inits), figsize=(5.2 * len(inits), 3.8), dpi=110, squeeze=False)
    for ax, init in zip(axes[0], inits):
        for placement in placements:
            group = groups.get((placement, init))
            if not group or not group.get(f"{key}_mean"):
                continue
            mean = np.array(group[f"{key}_mean"])
            layers = np.arange(start, start + len(mean))
            ax.plot(layers, mean, marker="o", ms=3, label=placement)
            if group.get(f"{key}_sd") is not None:
                sd = np.array(group[f"{key}_sd"])
                ax.fill_between(layers, mean - sd, mean + sd, alpha=0.15)
        ax.set_title(f"{title}\n({init} embedding init)", fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def figures(out: Path, groups: dict, placements, inits, sweep: dict | None) -> dict[str, str]:
    plt = _pyplot()
    written = {}
    # Perplexity by placement, one group of bars per initialisation, error bars: seed sd.
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    width = 0.8 / max(1, len(inits))
    for j, init in enumerate(inits):
        means = [groups.get((p, init), {}).get("ppl_mean", math.nan) for p in placements]
        sds = [groups.get((p, init), {}).get("ppl_sd", 0.0) for p in placements]
        ax.bar(np.arange(len(placements)) + j * width, means, width, yerr=sds, capsize=3, label=f"{init} init")
    ax.set_xticks(np.arange(len(placements)) + width * (len(inits) - 1) / 2, placements)
    ax.set_ylabel("held-out perplexity (mean ± sd over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "perplexity.png")
    plt.close(fig)
    written["perplexity"] = "perplexity.png"
    written["angular"] = _figure_by_init(groups, placements, inits, "angular_n1", "d(l, 1)",
                                         "angular distance to the next layer", out / "angular_distance.png")
    written["removal"] = _figure_by_init(groups, placements, inits, "removal_increase", "held-out loss increase",
                                         "loss without layer l", out / "layer_removal.png")
    written["gradients"] = _figure_by_init(groups, placements, inits, "grad_norms", "gradient norm",
                                           "per-layer gradient norm, last logged step", out / "gradient_norms.png")
    # Loss curves, mean over seeds.
    fig, axes = plt.subplots(1, len(inits), figsize=(5.2 * len(inits), 3.8), dpi=110, squeeze=False)
    for ax, init in zip(axes[0], inits):
        for placement in placements:
            curve = groups.get((placement, init), {}).get("train_loss_mean")
            if curve:
                ax.plot(*zip(*curve), lw=1, label=placement)
        ax.set_title(f"training loss ({init} embedding init)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png")
    plt.close(fig)
    written["loss_curves"] = "loss_curves.png"
    if sweep:
        written.update(_sweep_figure(out, sweep))
    return written


def _sweep_figure(out: Path, sweep: dict) -> dict[str, str]:
    """Per-layer gradient and update norms of each placement's first diverging run, at and before the step it
    diverged."""
    plt = _pyplot()
    diverging = {p: v["first_divergence"] for p, v in sweep["placements"].items()
                 if v.get("first_divergence") and v["first_divergence"].get("norms")}
    if not diverging:
        return {}
    fig, axes = plt.subplots(2, 1, figsize=(8, 6.4), dpi=110)
    for placement, row in diverging.items():
        for ax, kind in zip(axes, ("grad", "update")):
            for when, style in (("before", ":"), ("at", "-")):
                entry = row["norms"].get(when)
                if not entry or not entry.get(kind):
                    continue
                layers = sorted(k for k in entry[kind] if k.startswith("layer_"))
                ax.plot(range(len(layers)), [entry[kind][k] for k in layers], style, marker="o", ms=3,
                        label=f"{placement} lr {row['lr']:g}, step {entry['step']}")
    for ax, kind in zip(axes, ("gradient norm", "update norm")):
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel(kind)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("at divergence (solid) and the logged step before (dotted)")
    fig.tight_layout()
    fig.savefig(out / "sweep_divergence.png")
    plt.close(fig)
    return {"sweep": "sweep_divergence.png"}


# ---------------------------------------------------------------------------------------------------- report
def analyse_and_report(out: Path, runs: list[Run], sweep: dict | None, args, statuses: dict[str, int]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    numbers = {}
    for run in runs:
        numbers[run.name] = run_numbers(run, args.sequences)
        print(f"study: analysed {run.name}" if numbers[run.name] else f"study: {run.name} has no final eval",
              flush=True)
    groups = aggregate(runs, numbers)
    placements = [p for p in args.placements if any(k[0] == p for k in groups)]
    inits = [i for i in args.inits if any(k[1] == i for k in groups)]
    critical = t_critical(len(args.seeds))
    compared = comparisons(groups, placements, inits, critical)
    written = figures(out, groups, placements, inits, sweep)
    study = {"command": args.command, "config": args.config, "overrides": args.overrides, "seeds": args.seeds,
             "placements": placements,
             "inits": inits, "runs": run_dicts(runs), "exit_status": statuses,
             "groups": {f"{p}/{i}": value for (p, i), value in groups.items()}, "comparisons": compared,
             "sweep": sweep, "figures": written, "t_critical": critical}
    (out / "study.json").write_text(json.dumps(study, indent=1, default=str) + "\n")
    (out / "report.md").write_text(markdown(study, groups, placements, inits, compared, sweep, written))
    return study


def _verdict(compared: list[dict], placement: str, init: str) -> str:
    row = next((r for r in compared if r["placement"] == placement and r["init"] == init), None)
    if row is None:
        return "not measured"
    direction = "lower" if row["difference"] < 0 else "higher"
    spread = "outside" if row["outside_spread"] else "within"
    return (f"{abs(row['difference']):.2f} {direction} than Pre-LN (Welch t = {row['t']:.2f}: {spread} the "
            "seed-to-seed spread)")


def _by_layer(norms: dict) -> str:
    """The decoder layers' values of a per-layer norm record (`layer_000`, ...), in depth order."""
    return " ".join(f"{norms[key]:.3g}" for key in sorted(k for k in norms if k.startswith("layer_"))) or "—"


def markdown(study: dict, groups, placements, inits, compared, sweep, written) -> str:
    seeds = ", ".join(map(str, study["seeds"]))
    lines = [
        "# Study: Pre-LN, Post-LN, Mix-LN, LNS and Peri-LN on a deep, narrow model (CPU)", "",
        f"Made by `{study['command']}` (runs of `{study['config']}`, seeds {seeds}). "
        "Held-out perplexity is exp(token-weighted mean loss) on the run's eval split; every number is in "
        "`study.json`.", "",
        "## Held-out perplexity (mean ± sd over seeds)", "",
        "| placement | " + " | ".join(f"{init} embedding init" for init in inits) + " |",
        "|---|" + "---|" * len(inits),
    ]
    for placement in placements:
        cells = []
        for init in inits:
            group = groups.get((placement, init))
            cells.append("—" if group is None else
                         f"{group['ppl_mean']:.2f} ± {group['ppl_sd']:.2f} (" +
                         ", ".join(f"{v:.2f}" for v in group["ppl"]) + ")")
        lines.append(f"| {placement} | " + " | ".join(cells) + " |")
    lines += ["", f"![perplexity]({written['perplexity']})", "", "## Against Pre-LN", "",
              f"A difference is called outside the seed-to-seed spread when |Welch t| > {study['t_critical']} "
              f"(Student's two-sided 5 % point for two groups of {len(study['seeds'])} seeds).", "",
              "| embedding init | placement | Δ perplexity vs Pre-LN | Welch t | outside the spread |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['init']} | {r['placement']} | {r['difference']:+.2f} | {r['t']:.2f} | "
              f"{'yes' if r['outside_spread'] else 'no'} |" for r in compared]
    if "mix" in placements and "pre" in placements:
        lines += ["", "**Does Mix-LN's gain survive the scaled embedding initialisation?** "
                  + "; ".join(f"with the {init} init, Mix-LN is {_verdict(compared, 'mix', init)}" for init in inits)
                  + "."]
    lines += ["", "## Depth", "",
              "The angular distance d(l, 1) = arccos(cos(x_l, x_{l+1}))/π between the hidden state entering layer l "
              "and the next (mean over seeds, band: ± sd): a layer near 0 changes little.", "",
              f"![angular distance]({written['angular']})", "",
              "Held-out loss increase when layer l is replaced by the identity (mean over seeds): a layer that can go "
              "costs little.", "", f"![layer removal]({written['removal']})", "",
              "Per-layer gradient norms at the last logged step (mean over seeds):", "",
              f"![gradient norms]({written['gradients']})", "", f"![loss curves]({written['loss_curves']})", ""]
    for init in inits:
        lines += [f"Per-layer numbers ({init} embedding init; mean over seeds):", "",
                  "| placement | d(l, 1) by layer | loss increase without layer l |", "|---|---|---|"]
        for placement in placements:
            group = groups.get((placement, init), {})
            lines.append(f"| {placement} | " + " ".join(f"{v:.3f}" for v in group.get("angular_n1_mean") or [])
                         + " | " + " ".join(f"{v:.3f}" for v in group.get("removal_increase_mean") or []) + " |")
        lines.append("")
    if sweep:
        lines += ["## Stability sweep", "",
                  f"Each placement trained {sweep['steps']} steps at each learning rate "
                  f"({', '.join(f'{lr:g}' for lr in sweep['lrs'])}), one seed, default init. A run diverged when an "
                  "update was skipped as non-finite, the loss rose more than one nat above its lowest, or the last "
                  "tenth of steps was no lower than the first five.", "",
                  "| placement | largest LR that trains | diverged at (lr: step) |", "|---|---|---|"]
        for placement, value in sweep["placements"].items():
            bad = [f"{row['lr']:g}: {row['diverged_at']}" for row in value["runs"] if row["diverged_at"] is not None]
            largest = value["max_stable_lr"]
            lines.append(f"| {placement} | {'none' if largest is None else f'{largest:g}'} | "
                         f"{', '.join(bad) or 'none'} |")
        lines += ["", "Per-layer gradient and update norms (layer 0 first) of each placement's first diverging run, at "
                  "the step it diverged:", "", "| placement | lr | step | gradient norm by layer | update norm by layer |",
                  "|---|---|---|---|---|"]
        for placement, value in sweep["placements"].items():
            bad = value["first_divergence"]
            at = (bad or {}).get("norms") or {}
            at = at.get("at") or {}
            if not at:
                continue
            grad, update = (_by_layer(at.get(key) or {}) for key in ("grad", "update"))
            lines.append(f"| {placement} | {bad['lr']:g} | {at['step']} | {grad} | {update} |")
        if "sweep" in written:
            lines += ["", f"![divergence]({written['sweep']})"]
        lines.append("")
    return "\n".join(lines)
