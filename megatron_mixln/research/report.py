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

from megatron_mixln.research.runs import (GUARD_OVERRIDES, GUARD_RUN_OVERRIDES, OUTCOMES, ROLLBACK_OVERRIDES, Run,
                                          classify, final_eval, mean_sd, metrics, run_dicts, t_critical, welch_t)

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
        lines += sweep_markdown(sweep, written)
    return "\n".join(lines)

def sweep_markdown(sweep: dict, written: dict) -> list[str]:
    """The report's stability-sweep section: each run's outcome (`classify`; a sweep made before it, as the
    committed studies/cpu_deep_narrow, has only "diverged_at", the old one-nat rule's step) and the per-layer norms."""
    lines: list[str] = []
    lines += ["## Stability sweep", "",
              f"Each placement trained {sweep['steps']} steps at each learning rate "
              f"({', '.join(f'{lr:g}' for lr in sweep['lrs'])}), one seed, default init. Each run is classified "
              "(`megatron_mixln.research.runs.classify`): **trained** (no spike), **recovered** (a loss more than 1 nat "
              "above its lowest so far, or a non-finite one, then back to within 0.1 nats of the lowest before "
              "it by the end: the mean of the last tenth of the steps) or **diverged** (non-finite at the end, "
              "stopped, no 0.5-nat progress from the start, or a spike it did not come back from).", "",
              "| placement | largest LR that does not diverge | spiked and recovered (lr: step) | "
              "diverged (lr: step) |", "|---|---|---|---|"]
    if any("outcome" not in row for value in sweep["placements"].values() for row in value["runs"]):
        lines[-3:-2] = ["This sweep was classified before: its \"diverged\" is the old rule's flag (an update skipped "
                        "as non-finite, a loss one nat above its lowest, or no progress), which a recovered spike "
                        "also raises.", ""]
    for placement, value in sweep["placements"].items():
        # Rows of a sweep made before the classification (no "outcome") count any flag as diverged.
        outcome = lambda row: row.get("outcome") or ("trained" if row["diverged_at"] is None  # noqa: E731
                                                     else "diverged")
        spiked = [f"{row['lr']:g}: {row.get('first_spike')}" for row in value["runs"]
                  if outcome(row) == "recovered"]
        bad = [f"{row['lr']:g}: {row['diverged_at']}" for row in value["runs"] if outcome(row) == "diverged"]
        largest = value["max_stable_lr"]
        lines.append(f"| {placement} | {'none' if largest is None else f'{largest:g}'} | "
                     f"{', '.join(spiked) or 'none'} | {', '.join(bad) or 'none'} |")
    lines += ["", "Per-layer gradient and update norms (layer 0 first) of each placement's first run that spiked "
              "or diverged, at that step:", "",
              "| placement | lr | step | gradient norm by layer | update norm by layer |",
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
    return lines



# ---------------------------------------------------------------------------------------------------- guard study
# A telemetry quantity "rises" at the first telemetry step where it exceeds this many times its own median over
# the early run (the first half of the telemetry steps up to the spike).
RISE_FACTOR = 2.0
LEAD_QUANTITIES = ("activation_rms", "activation_max", "max_attention_logit", "update_ratio")
ACTION_COLOURS = {"off": "tab:red", "warn": "tab:orange", "skip": "tab:blue", "rollback": "tab:green"}


def _run_model(folder: Path):
    """The run's model config (config.json of its folder), or None."""
    from megatron_mixln.config import model_config_from_dict

    path = folder / "config.json"
    return model_config_from_dict(json.loads(path.read_text())["model"]) if path.is_file() else None


def _all_events(folder: Path) -> list[dict]:
    """The guard's events, of kept steps (metrics.jsonl) and of those a rollback discarded."""
    from megatron_mixln.analysis.measures import guard_events
    from megatron_mixln.train.metrics import DISCARDED_FILE

    return [event for name in ("metrics.jsonl", DISCARDED_FILE) if (folder / name).is_file()
            for event in guard_events(folder / name)]


def telemetry_lead(folder: Path, spike_step: int, post_ln: list[bool] | None = None,
                   factor: float = RISE_FACTOR) -> dict | None:
    """What the telemetry showed before a spike at `spike_step` (a loss `classify` calls a spike).

    Per quantity of LEAD_QUANTITIES and decoder layer: the baseline is the median over the early run (the first
    half of the telemetry steps up to and including the spike step); the layer "rises" at the first later
    telemetry step up to the spike step whose value exceeds `factor` x baseline. The update ratio is divided by
    the step's LR first, so the warm-up's growing LR is not read as a rise. A telemetry record of step s is of
    the weights after step s's update, logged before step s + 1's loss, so lead = spike_step - rise step is how
    many steps before the loss the telemetry showed it (0: only at the spike step). Returns None when fewer
    than two telemetry steps precede the spike; else {"spike_step", "baseline_steps", "quantities": {q:
    {"rise_step": {layer: step or None}, "lead" (of the earliest layer, or None), "first_layers"}},
    "jump" (`_jump`)}}, "post_ln_rms_lead" and "post_ln_max_lead" (the Post-LN layers' activation RMS and max;
    None without Post-LN layers or no rise), "max_logit_lead"}. `post_ln`: which layers (depth order) are Post-LN.
    """
    from megatron_mixln.analysis.measures import telemetry_by_depth
    from megatron_mixln.train.metrics import read_metrics

    telemetry = telemetry_by_depth(folder / "metrics.jsonl")
    upto = [j for j, step in enumerate(telemetry.steps) if step <= spike_step]
    if len(upto) < 2 or not telemetry.layers:
        return None
    early, later = upto[:max(1, len(upto) // 2)], upto[max(1, len(upto) // 2):]
    lrs = {r["step"]: r["lr"] for r in read_metrics(folder / "metrics.jsonl")
           if isinstance(r.get("lr"), (int, float)) and isinstance(r.get("step"), int)}
    result = {"spike_step": spike_step, "baseline_steps": [telemetry.steps[j] for j in early], "quantities": {}}
    for quantity in LEAD_QUANTITIES:
        table = np.array(telemetry.by_layer[quantity], dtype=float)
        if quantity == "update_ratio":
            table = table / np.array([lrs.get(step, math.nan) or math.nan for step in telemetry.steps])
        rises = {}
        for i, layer in enumerate(telemetry.layers):
            base = np.nanmedian(table[i, early]) if np.isfinite(table[i, early]).any() else math.nan
            rise = next((telemetry.steps[j] for j in later if base > 0 and table[i, j] > factor * base), None)
            rises[layer] = rise
        risen = [step for step in rises.values() if step is not None]
        first = min(risen) if risen else None
        result["quantities"][quantity] = {
            "rise_step": rises, "lead": None if first is None else spike_step - first,
            "first_layers": [layer for layer, step in rises.items() if first is not None and step == first]}
        result["quantities"][quantity]["jump"] = _jump(telemetry.steps, telemetry.layers, table, spike_step)
    for quantity, key in (("activation_rms", "post_ln_rms_lead"), ("activation_max", "post_ln_max_lead")):
        rises = result["quantities"][quantity]["rise_step"]
        post = [rises[layer] for layer, is_post in zip(telemetry.layers, post_ln or []) if is_post and rises[layer]]
        result[key] = spike_step - min(post) if post else None
    result["max_logit_lead"] = result["quantities"]["max_attention_logit"]["lead"]
    return result


def _jump(steps: list[int], layers: list[str], table: np.ndarray, spike_step: int) -> dict | None:
    """The update that made the spike: per layer, the ratio of the last telemetry record before the spike's loss
    (the weights that produced it) to the record before that; the layer with the largest, and the median of the
    same ratio over all layers and earlier pairs of records (what an ordinary early step does)."""
    before = [j for j, step in enumerate(steps) if step <= spike_step - 1]
    if len(before) < 2:
        return None
    a, b = before[-2], before[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = table[:, b] / table[:, a]
        earlier = (table[:, before[1:-1]] / table[:, before[:-2]]).ravel() if len(before) > 2 else np.array([])
    finite = {layer: float(r) for layer, r in zip(layers, ratios) if math.isfinite(r)}
    if not finite:
        return None
    largest = max(finite, key=finite.get)
    earlier = earlier[np.isfinite(earlier)]
    return {"from": steps[a], "to": steps[b], "ratio": finite, "largest": largest, "largest_ratio": finite[largest],
            "typical_ratio": float(np.median(earlier)) if earlier.size else None}


def guard_run_numbers(run, status: dict | None, steps: int) -> dict:
    """One guard run: its outcome (`classify`), final held-out loss, the guard's interventions and their cost,
    and (guard off, after a spike) what its telemetry showed before the spike."""
    records = metrics(run.folder) if (run.folder / "metrics.jsonl").is_file() else []
    model = _run_model(run.folder)
    outcome = classify(records, vocab_size=model.vocab_size if model else None, planned_steps=steps)
    events = _all_events(run.folder)
    rollbacks = [e for e in events if e["event"] == "rollback"]
    outliers = [e for e in events if e["event"] == "outlier"]
    evals = [r for r in records if isinstance(r.get("eval_loss"), (int, float))]
    numbers = {"name": run.name, "placement": run.placement, "lr": run.lr, "action": run.action, "seed": run.seed,
               "exit": (status or {}).get("exit"), "seconds": (status or {}).get("seconds"), **outcome,
               "eval_loss": evals[-1]["eval_loss"] if evals else None,
               "eval_ppl": evals[-1].get("eval_ppl") if evals else None,
               "outliers": len(outliers),
               "outliers_skipped": sum(1 for e in outliers if e.get("action") in ("skip", "rollback")),
               "collapses": sum(1 for e in events if e["event"] == "collapse"),
               "rollbacks": len(rollbacks),
               "steps_replayed": sum(e["trigger_step"] - e["step"] for e in rollbacks),
               "batches_skipped": sum(e["skipped_batches"][1] - e["skipped_batches"][0] + 1 for e in rollbacks),
               "lead": None}
    if run.action == "off" and outcome["first_spike"] is not None:
        post_ln = [_is_post_ln(model, i) for i in range(model.num_layers)] if model is not None else None
        numbers["lead"] = telemetry_lead(run.folder, outcome["first_spike"], post_ln)
    return numbers


def guard_groups(numbers: list[dict]) -> dict[tuple[str, float, str], dict]:
    """(placement, lr, action) -> over seeds: outcome counts, held-out loss and perplexity mean and sd, and the
    guard's interventions summed."""
    groups: dict[tuple[str, float, str], list[dict]] = {}
    for item in numbers:
        groups.setdefault((item["placement"], item["lr"], item["action"]), []).append(item)
    out = {}
    for key, items in groups.items():
        losses = [i["eval_loss"] for i in items if i["eval_loss"] is not None and math.isfinite(i["eval_loss"])]
        ppls = [i["eval_ppl"] for i in items if i["eval_ppl"] is not None and math.isfinite(i["eval_ppl"])]
        out[key] = {"runs": len(items), "seeds": [i["seed"] for i in items],
                    **{outcome: sum(i["outcome"] == outcome for i in items) for outcome in OUTCOMES},
                    "stopped": sum(1 for i in items if i["exit"] not in (0, None)),
                    "eval_loss": mean_sd(losses) if losses else None, "eval_ppl": mean_sd(ppls) if ppls else None,
                    "evaluated": len(losses),
                    **{name: sum(i[name] for i in items)
                       for name in ("steps_replayed", "batches_skipped", "outliers_skipped", "rollbacks")}}
    return out


def guard_conversions(numbers: list[dict], actions) -> list[dict]:
    """Per (placement, lr, seed): the guard-off run's outcome beside each action's."""
    by_key = {(i["placement"], i["lr"], i["seed"], i["action"]): i for i in numbers}
    rows = []
    for placement, lr, seed in sorted({(i["placement"], i["lr"], i["seed"]) for i in numbers}):
        row = {"placement": placement, "lr": lr, "seed": seed}
        for action in actions:
            item = by_key.get((placement, lr, seed, action))
            row[action] = None if item is None else item["outcome"]
        rows.append(row)
    return rows


def guard_verdict(groups: dict, conversions: list[dict], actions) -> dict:
    """How many guard-off runs diverged, how many of those each action turned into a run that trained or
    recovered, how many runs that were fine without the guard it broke, and what that cost."""
    verdict = {"off_diverged": sum(1 for r in conversions if r.get("off") == "diverged"),
               "off_spiked": sum(1 for r in conversions if r.get("off") in ("recovered", "diverged")), "actions": {}}
    for action in actions:
        if action == "off":
            continue
        fixed = sum(1 for r in conversions if r.get("off") == "diverged" and r.get(action) in ("trained", "recovered"))
        broke = sum(1 for r in conversions if r.get("off") in ("trained", "recovered") and r.get(action) == "diverged")
        cost = {name: sum(g[name] for (p, lr, a), g in groups.items() if a == action)
                for name in ("steps_replayed", "batches_skipped", "outliers_skipped", "rollbacks")}
        verdict["actions"][action] = {"fixed": fixed, "broke": broke, **cost}
    return verdict


def guard_figure(out: Path, runs, numbers: list[dict]) -> str | None:
    """Loss curves per (placement, LR), one colour per action, every seed, the guard's events marked by the
    analysis package's own marker (megatron_mixln.analysis.figures._mark_guard_events)."""
    from types import SimpleNamespace

    from megatron_mixln.analysis.figures import _event_legend_entries, _mark_guard_events
    from megatron_mixln.analysis.measures import guard_events, loss_curves

    panels = sorted({(run.placement, run.lr) for run in runs})
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.2), dpi=110, squeeze=False)
    for ax, (placement, lr) in zip(axes[0], panels):
        kinds, labelled = set(), set()
        for run in runs:
            path = run.folder / "metrics.jsonl"
            if (run.placement, run.lr) != (placement, lr) or not path.is_file():
                continue
            colour = ACTION_COLOURS.get(run.action, "0.4")
            a = SimpleNamespace(curves=loss_curves(path), events=guard_events(path), colour=colour)
            if a.curves["train"]:
                ax.plot(*zip(*a.curves["train"]), lw=0.9, alpha=0.8, color=colour,
                        label=None if run.action in labelled else f"guard {run.action}")
                labelled.add(run.action)
            kinds |= _mark_guard_events(ax, a)
        ax.set_title(f"{placement} at LR {lr:g} (all seeds)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=handles + _event_legend_entries(kinds), fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "guard_loss_curves.png")
    plt.close(fig)
    return "guard_loss_curves.png"


def telemetry_figure(out: Path, runs, numbers: list[dict]) -> str | None:
    """For each guard-off run that spiked: each telemetry quantity against step, its largest value over the Post-LN
    layers (solid) and over the other layers (dashed), divided by the same curve's early-run median (the lead's
    baseline), with the spike step marked."""
    from megatron_mixln.analysis.measures import telemetry_by_depth

    spiked = [(run, item) for run, item in zip(runs, numbers) if item.get("lead")]
    if not spiked:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(LEAD_QUANTITIES), figsize=(4.2 * len(LEAD_QUANTITIES), 3.8), dpi=110)
    for index, (run, item) in enumerate(spiked):
        telemetry = telemetry_by_depth(run.folder / "metrics.jsonl")
        model = _run_model(run.folder)
        post = np.array([_is_post_ln(model, i) for i in range(len(telemetry.layers))], dtype=bool)
        steps = np.array(telemetry.steps)
        early = np.isin(steps, item["lead"]["baseline_steps"])
        lrs = {r["step"]: r["lr"] for r in metrics(run.folder) if isinstance(r.get("lr"), (int, float))}
        colour = f"C{index % 10}"
        for ax, quantity in zip(axes, LEAD_QUANTITIES):
            table = np.array(telemetry.by_layer[quantity], dtype=float)
            if quantity == "update_ratio":
                table = table / np.array([lrs.get(int(step), math.nan) for step in steps])
            for rows, style, what in ((post, "-", "Post-LN"), (~post, "--", "other")):
                if not rows.any():
                    continue
                with np.errstate(all="ignore"):
                    curve = np.nanmax(table[rows], axis=0)
                base = np.nanmedian(curve[early]) if early.any() else math.nan
                ax.plot(steps, curve / base, style, lw=1, color=colour,
                        label=f"{run.placement} lr {run.lr:g} s{run.seed} {what}")
            ax.axvline(item["first_spike"], color=colour, ls=":", lw=1)
    for ax, quantity in zip(axes, LEAD_QUANTITIES):
        ax.set_yscale("log")
        ax.set_title(quantity + (" / LR" if quantity == "update_ratio" else ""), fontsize=9)
        ax.set_xlabel("step (dotted: the spike)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("largest over layers / early-run median")
    axes[-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "guard_telemetry.png")
    plt.close(fig)
    return "guard_telemetry.png"


def _is_post_ln(model, index: int) -> bool:
    from megatron_mixln.model.norms import norm_placement

    return model is not None and norm_placement(index, model.num_layers, model) in ("post", "deepnorm")


def _pm(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def _layer_list(layers: list[str], total: int) -> str:
    """Layer indices, shortened when many rose at once (then no one layer led)."""
    names = [layer.removeprefix("layer_") for layer in layers]
    if len(names) <= 4:
        return ", ".join(names)
    return f"{'all' if len(names) == total else len(names)} of {total} layers: {names[0]} … {names[-1]}"


def _lead_text(lead) -> str:
    return "none by the spike" if lead is None else f"{lead} step{'s' if lead != 1 else ''}"


def guard_markdown(study: dict) -> str:
    groups, verdict = study["groups"], study["verdict"]
    lines = ["# The loss-spike guard on the LR sweep's unstable runs (CPU)", "",
             f"Made by `{study['command']}` (runs of `{study['config']}`, {study['steps']} steps, seeds "
             f"{', '.join(map(str, study['seeds']))}). Guard settings: {' '.join(study['guard_overrides'])}; "
             f"rollback adds {' '.join(study['rollback_overrides'])}. Every run: {' '.join(study['run_overrides'])}. "
             "Every number is in `study.json`.", "",
             "A run is classified (`megatron_mixln.research.runs.classify`, docs/study.md) as **trained** (no spike), "
             "**recovered** (a spike, then back to within 0.1 nats of its best before the spike by the end: the "
             "mean of the last tenth of the steps) or **diverged** (a non-finite loss at the end, the run stopped, "
             "no 0.5-nat progress from the start, the loss at ln(vocab), or a spike it did not come back from). A "
             "spike: a loss more than 1 nat above the lowest before it.", "",
             "## Outcomes and cost, per placement × LR × guard action (over seeds)", "",
             "| placement | LR | guard | trained / recovered / diverged | stopped | held-out loss | held-out ppl "
             "| steps replayed | batches skipped | outliers skipped | rollbacks |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, g in groups.items():
        placement, lr, action = key.split("/")
        lines.append(f"| {placement} | {lr} | {action} | {g['trained']} / {g['recovered']} / {g['diverged']} | "
                     f"{g['stopped']} | {_pm(g['eval_loss'])} (n={g['evaluated']}) | "
                     f"{_pm(g['eval_ppl'], 1)} | "
                     f"{g['steps_replayed']} | {g['batches_skipped']} | {g['outliers_skipped']} | {g['rollbacks']} |")
    lines += ["", "Held-out loss: the run's final evaluation (a run the guard stopped has none). Steps replayed: the "
              "sum over rollbacks of the trigger step minus the step reloaded. Batches skipped: global batches a "
              "rollback left out.", "", "## Did the guard turn a diverging run into a trained one?", "",
              "| placement | LR | seed | " + " | ".join(study["actions"]) + " |",
              "|---|---|---|" + "---|" * len(study["actions"])]
    for row in study["conversions"]:
        lines.append(f"| {row['placement']} | {row['lr']:g} | {row['seed']} | "
                     + " | ".join(str(row.get(a)) for a in study["actions"]) + " |")
    lines += ["", f"Guard-off runs that spiked: {verdict['off_spiked']}; that diverged: {verdict['off_diverged']}."]
    for action, v in verdict["actions"].items():
        lines.append(f"- **{action}**: turned {v['fixed']} of {verdict['off_diverged']} diverging runs into runs "
                     f"that trained or recovered; broke {v['broke']} that trained or recovered without the guard; "
                     f"cost {v['steps_replayed']} steps replayed, {v['batches_skipped']} batches skipped, "
                     f"{v['outliers_skipped']} outlier updates skipped, {v['rollbacks']} rollbacks in all.")
    if study.get("figure"):
        lines += ["", f"![loss curves]({study['figure']})", "",
                  "x: an outlier step; shaded: a rollback (from the step reloaded to the step that triggered it). "
                  "A rollback run's discarded steps are not drawn (metrics.discarded.jsonl)."]
    lines += ["", "## The telemetry before each spike of the guard-off runs", "",
              "Per quantity and layer: the first telemetry step, up to the spike, at which it exceeded "
              f"{RISE_FACTOR:g} × "
              "its median over the first half of the telemetry steps before the spike (update ratio per unit LR). "
              "Lead: spike step − that step (0: only at the spike step; the record of step s is logged before step "
              "s + 1's loss).", "",
              "| run | spike step | activation RMS | activation max | max attention logit | update ratio / LR | "
              "Post-LN layers' RMS | Post-LN layers' max | max logit |", "|---|---|---|---|---|---|---|---|---|"]
    for item in study["runs"]:
        lead = item.get("lead")
        if item["action"] != "off" or item["first_spike"] is None:
            continue
        if lead is None:
            lines.append(f"| {item['name']} | {item['first_spike']} | too few telemetry steps before the spike | "
                         "| | | | | |")
            continue
        cells = []
        for quantity in LEAD_QUANTITIES:
            q = lead["quantities"][quantity]
            cells.append("no rise" if q["lead"] is None else
                         f"{_lead_text(q['lead'])} ({_layer_list(q['first_layers'], len(q['rise_step']))})")
        lines.append(f"| {item['name']} | {item['first_spike']} | " + " | ".join(cells) +
                     f" | {_lead_text(lead['post_ln_rms_lead'])} | {_lead_text(lead['post_ln_max_lead'])} | "
                     f"{_lead_text(lead['max_logit_lead'])} |")
    if study.get("telemetry_figure"):
        lines += ["", f"![telemetry before the spikes]({study['telemetry_figure']})", "",
                  "Each quantity's largest value over the Post-LN layers (solid) and over the other layers (dashed), "
                  "divided by its median over the lead's baseline steps; dotted: the spike."]
    lines += ["", "Layers in brackets: those that rose first (layer index). A Post-LN layer hands on its normalised "
              "output, so its activation RMS stays near its norm's gain by construction; its activation max can "
              "still rise.", "",
              "The update that made each spike: per quantity, the layer whose value grew most between the last two "
              "telemetry records before the spike's loss (ratio), against the median ratio of earlier pairs of "
              "records over all layers (what an ordinary early update does).", "",
              "| run | records | activation RMS | activation max | max attention logit | update ratio / LR |",
              "|---|---|---|---|---|---|"]
    for item in study["runs"]:
        lead = item.get("lead")
        if item["action"] != "off" or not lead:
            continue
        jumps = [lead["quantities"][q].get("jump") for q in LEAD_QUANTITIES]
        known = [j for j in jumps if j]
        if not known:
            continue
        cells = ["—" if j is None else f"layer {j['largest'].removeprefix('layer_')}: × {j['largest_ratio']:.3g} "
                 f"(typical × {'—' if j['typical_ratio'] is None else format(j['typical_ratio'], '.3g')})"
                 for j in jumps]
        lines.append(f"| {item['name']} | {known[0]['from']} → {known[0]['to']} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def guard_report(out: Path, runs, statuses: dict, args) -> dict:
    """The guard study's numbers per run, aggregated, figure, study.json and report.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    numbers = [guard_run_numbers(run, statuses.get(run.name), args.guard_steps) for run in runs]
    groups = guard_groups(numbers)
    conversions = guard_conversions(numbers, args.guard_actions)
    study = {"command": args.command, "config": args.config, "overrides": args.overrides, "steps": args.guard_steps,
             "seeds": args.guard_seeds, "actions": args.guard_actions, "guard_overrides": list(GUARD_OVERRIDES),
             "rollback_overrides": list(ROLLBACK_OVERRIDES), "run_overrides": list(GUARD_RUN_OVERRIDES),
             "runs": numbers, "groups": {f"{p}/{lr:g}/{a}": g for (p, lr, a), g in groups.items()},
             "conversions": conversions, "verdict": guard_verdict(groups, conversions, args.guard_actions),
             "figure": guard_figure(out, runs, numbers), "telemetry_figure": telemetry_figure(out, runs, numbers)}
    (out / "study.json").write_text(json.dumps(study, indent=1, default=str) + "\n")
    (out / "report.md").write_text(guard_markdown(study))
    return study
