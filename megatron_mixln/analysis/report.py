"""`report`: every analysis of several runs at once, as PNG figures, `analysis.json` (every number) and `report.md`."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from megatron_mixln.analysis import figures
from megatron_mixln.analysis.measures import (GradientNorms, Telemetry, _angular, gradient_norms_by_depth,
                                              downstream_curves, guard_events, layer_removal, loss_curves,
                                              telemetry_by_depth)
from megatron_mixln.analysis.runs import HeldOut, Run, choose_device, find_run, finite_or_text, held_out
from megatron_mixln.config import ConfigError
from megatron_mixln.data.errors import DataError
from megatron_mixln.output_folder import OutputKind, atomic_folder, check_output_folder

ANALYSIS_JSON = "analysis.json"
REPORT_MD = "report.md"
ANALYSIS_OUTPUT = OutputKind("analysis", ((ANALYSIS_JSON, REPORT_MD),))  # what report() writes: replaced whole


@dataclass
class RunAnalysis:
    """Everything measured for one run; a field is None where that analysis has no data (no metrics.jsonl)."""

    run: Run
    colour: Any
    label: str  # the run's name in legends and titles
    held_out: HeldOut | None = None
    angular: np.ndarray | None = None  # [L, L], see measures.angular_distances
    angular_tokens: int = 0
    removal: list[dict] | None = None
    gradients: GradientNorms | None = None
    curves: dict | None = None
    telemetry: Telemetry | None = None
    events: list[dict] | None = None  # the loss-spike guard's event records
    downstream: dict | None = None  # {"task/metric": [(step, value)]}: train.downstream_tasks during training

    @property
    def num_layers(self) -> int:
        return self.run.config.model.num_layers


class _Progress:
    """A tqdm bar per run on a terminal; plain lines on stdout otherwise (a log file gets no bar redraws)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar_wanted = enabled and sys.stderr.isatty()
        self.bar = None

    def start(self, name: str, total: int) -> None:
        if self.bar_wanted:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=name, unit="batch", dynamic_ncols=True)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            print(text, flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _unique_names(runs: list[Run]) -> None:
    """Runs are told apart by name in figures; two folders of the same name are named by their path instead."""
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = str(run.path)


def _labels(runs: list[Run], labels: list[str] | None) -> list[str]:
    """The legend name of each run: `labels` as given, else `Run.label`, with the run's name added where two
    runs would otherwise read the same (two Pre-LN seed 42 runs at different learning rates)."""
    if labels is not None:
        if len(labels) != len(runs) or not all(label.strip() for label in labels):
            raise ConfigError(f"--labels {','.join(labels)!r} is invalid: expected {len(runs)} non-empty labels, "
                              f"one per run, comma-separated, in the order the runs are named.")
        return list(labels)
    defaults = [run.label for run in runs]
    return [f"{label} ({run.name})" if defaults.count(label) > 1 else label for label, run in zip(defaults, runs)]


def analyse(runs: Iterable[str | Path | Run], data: str | None = None, sequences: int | None = None,
            steps: Iterable[int] | None = None, device: str | None = None, batch_size: int | None = None,
            progress: bool = True, labels: Iterable[str] | None = None) -> list[RunAnalysis]:
    """Measure every run: angular distances and layer removal on held-out text, gradient norms and loss curves
    from metrics.jsonl. Every input is checked (folders, steps, held-out text, device) before any model is
    loaded, so a bad one costs one sentence and no computation. labels: the runs' names in the figures, one per
    run (default: placement, α and seed, see `Run.label`)."""
    runs = [run if isinstance(run, Run) else find_run(run) for run in runs]
    if not runs:
        raise ConfigError("no run to analyse: name at least one run, export or checkpoint folder.")
    _unique_names(runs)
    names = _labels(runs, None if labels is None else list(labels))
    device = choose_device(device)
    steps = None if steps is None else list(steps)
    analyses = [RunAnalysis(run=run, colour=figures.run_colour(i), label=name)
                for i, (run, name) in enumerate(zip(runs, names))]
    for a in analyses:
        metrics = a.run.metrics_path
        if metrics is None or not metrics.is_file():
            if steps is not None:
                raise DataError(f"{a.run.path} has no metrics.jsonl next to its weights, so it has no per-layer "
                                "gradient norms for --steps; pass the run folder itself.")
            continue
        a.gradients = gradient_norms_by_depth(metrics, steps)
        a.curves = loss_curves(metrics)
        a.telemetry = telemetry_by_depth(metrics)
        a.events = guard_events(metrics)
        a.downstream = downstream_curves(metrics)
    show = progress and sys.stderr.isatty()
    for a in analyses:
        a.held_out = held_out(a.run, sequences, batch_size, data, progress=show)

    progress_out = _Progress(progress)
    for a in analyses:
        model = a.run.load_model(device)
        batches = a.held_out.batches
        progress_out.start(a.run.name, len(batches) * (a.num_layers + 2))
        progress_out.line(f"{a.run.name}: {a.run.kind} at step {a.run.step}, {a.label}; held-out text: "
                    f"{a.held_out.describe()}")
        try:
            a.angular, a.angular_tokens = _angular(model, batches, device, progress_out.tick)
            progress_out.line(f"{a.run.name}: angular distance d(l, 1) by layer: "
                        + " ".join(f"{value:.4f}" for value in a.angular[:, 0]))

            def done(entry: dict) -> None:
                progress_out.line(f"{a.run.name}: without layer {entry['layer']} ({entry['placement']}): loss "
                            f"{entry['loss']:.4f} ({entry['loss_increase']:+.4f} against {entry['full_loss']:.4f})")

            a.removal = layer_removal(model, batches, device, on_batch=progress_out.tick, on_layer=done)
        finally:
            progress_out.stop()
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return analyses


def report(runs: Iterable[str | Path | Run], out_dir: str | Path, data: str | None = None,
           sequences: int | None = None, steps: Iterable[int] | None = None, device: str | None = None,
           batch_size: int | None = None, progress: bool = True,
           labels: Iterable[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Analyse `runs` (run, export or checkpoint folders, or `Run`s) and write into `out_dir` the figures, the
    numbers (`analysis.json`, also returned) and `report.md`, which shows the figures and tabulates the numbers.

    data: a data source whose text replaces each run's own held-out split (see `runs.held_out`); sequences: how
    many held-out sequences (default: the run's train.eval_sequences); steps: the steps of the gradient-norm
    profiles (default: a few spread over training); device: cpu or cuda (default: cuda when present);
    progress: a bar on a terminal, plain lines otherwise (False: silent); labels: the runs' names in the figures.
    `out_dir` is written whole; one that holds other files than an earlier analysis is replaced only with `force`.
    """
    runs = list(runs)
    read = [path for r in runs for path in ((r.path, r.weights, r.run_dir) if isinstance(r, Run) else (r,)) if path]
    check_output_folder(out_dir, ANALYSIS_OUTPUT, read, force)  # before the analyses: a refusal comes at once
    analyses = analyse(runs, data, sequences, steps, device, batch_size, progress, labels)
    with atomic_folder(out_dir, ANALYSIS_OUTPUT, force) as out_dir:
        notes = [note for a in analyses for note in a.run.notes] + _held_out_notes(analyses)
        written: dict[str, str] = {}
        for file, plot in figures.PLOTS:
            figure, plot_notes = plot(analyses)
            notes += plot_notes
            if figure is not None:
                figures.save(figure, out_dir / file)
                written[plot.__name__.removeprefix("plot_")] = file
        settings = {"data": data, "sequences": sequences, "steps": None if steps is None else list(steps),
                    "device": str(choose_device(device)), "batch_size": batch_size}
        numbers = {"settings": settings, "runs": [_run_numbers(a) for a in analyses], "figures": written,
                   "notes": notes}
        (out_dir / ANALYSIS_JSON).write_text(json.dumps(numbers, indent=1) + "\n")
        (out_dir / REPORT_MD).write_text(markdown(numbers))
    return numbers


def _held_out_notes(analyses: list[RunAnalysis]) -> list[str]:
    texts = {(a.held_out.folder, a.held_out.split, a.held_out.seq_len, a.held_out.sequences) for a in analyses}
    if len(texts) <= 1:
        return []
    return ["the runs were evaluated on different held-out text (data source, tokenizer or sequence length differ), "
            "so their losses and distances are not directly comparable."]


# ------------------------------------------------------------------------------------------------ numbers
def _floats(values) -> list:
    return [finite_or_text(float(value)) for value in values]


def _run_numbers(a: RunAnalysis) -> dict[str, Any]:
    run, count = a.run, a.num_layers
    numbers: dict[str, Any] = {
        "name": run.name, "label": a.label, "placement": run.placement, "path": str(run.path),
        "weights": str(run.weights), "kind": run.kind, "step": run.step, "num_layers": count,
        "layer_placements": [entry["placement"] for entry in a.removal] if a.removal else None,
        "model": vars(run.config.model).copy(),
        "metrics": None if run.metrics_path is None else str(run.metrics_path),
    }
    if a.held_out is not None:
        numbers["held_out"] = {"source": a.held_out.source, "split": a.held_out.split, "folder": a.held_out.folder,
                               "seq_len": a.held_out.seq_len, "sequences": a.held_out.sequences,
                               "available_sequences": a.held_out.available,
                               "target_tokens": a.held_out.target_tokens, "real_tokens": a.angular_tokens}
    if a.angular is not None:
        # d(l, n) for n = 1 .. L - l: row l of the map without the pairs past the last layer.
        numbers["angular_distance"] = {
            "definition": "d(l, n) = arccos(cos(x_l, x_{l+n})) / pi averaged over real held-out tokens; x_l enters "
                          "layer l, x_L enters the final norm",
            "n1": _floats(a.angular[:, 0]),
            "by_layer_and_span": [_floats(a.angular[layer, :count - layer]) for layer in range(count)]}
    if a.removal is not None:
        full = a.removal[0]
        numbers["layer_removal"] = {
            "full": {"loss": finite_or_text(full["full_loss"]), "perplexity": finite_or_text(full["full_perplexity"]),
                     "tokens": full["tokens"]},
            "layers": [{key: finite_or_text(value) if isinstance(value, float) else value
                        for key, value in entry.items() if not key.startswith("full_") and key != "tokens"}
                       for entry in a.removal]}
    if a.gradients is not None:
        g = a.gradients
        numbers["gradient_norms"] = {
            "steps": g.steps, "layers": g.layers, "norms": [_floats(row) for row in g.norms],
            "other": {key: _floats(values) for key, values in g.other.items()}, "chosen_steps": g.chosen,
            "by_step": {str(step): _floats(g.at(step)) for step in g.chosen}}
    if a.telemetry is not None and a.telemetry.steps:
        t = a.telemetry
        numbers["telemetry"] = {
            "steps": t.steps, "layers": t.layers,
            "by_layer": {name: [_floats(row) for row in table] for name, table in t.by_layer.items()},
            "other": {name: {key: _floats(values) for key, values in by_key.items()}
                      for name, by_key in t.other.items()},
            "log_partition": {kind: _floats(values) for kind, values in t.log_partition.items()}}
    if a.events:
        numbers["guard_events"] = a.events
    if a.downstream:
        numbers["downstream"] = {name: [[step, finite_or_text(value)] for step, value in points]
                                 for name, points in a.downstream.items()}
    if a.curves is not None:
        numbers["loss_curves"] = {split: [[step, finite_or_text(loss)] for step, loss in points]
                                  for split, points in a.curves.items()}
    return numbers


# ------------------------------------------------------------------------------------------------ report.md
def _cell(value, digits: int = 4, scientific: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value  # a non-finite number, as text
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits - 1}e}" if scientific else f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _figure(numbers: dict, key: str, caption: str) -> list[str]:
    file = numbers["figures"].get(key)
    return [f"![{caption}]({file})", ""] if file else [f"({caption}: no run has the data.)", ""]


def markdown(numbers: dict[str, Any]) -> str:
    """report.md from the analysis.json numbers: the figures, then every number in tables."""
    runs = numbers["runs"]
    lines = ["# Mix-LN analyses", ""]
    header = ["run", "label", "placement", "layers", "weights", "step", "held-out text", "held-out loss", "perplexity"]
    rows = []
    for r in runs:
        held = r.get("held_out")
        full = (r.get("layer_removal") or {}).get("full", {})
        text = "-"
        if held:
            where = (f"all of {held['source']}" if held["split"] == "all"
                     else f"{held['split']} split of {held['source']}")
            text = f"{held['sequences']} x {held['seq_len']} tokens, {where}"
        rows.append([r["name"], r["label"], r["placement"], str(r["num_layers"]), r["kind"], _cell(r["step"]), text,
                     _cell(full.get("loss")), _cell(full.get("perplexity"), 2)])
    lines += _table(header, rows)
    if numbers["notes"]:
        lines += ["Notes:", "", *(f"- {note}" for note in numbers["notes"]), ""]

    lines += ["## Loss curves", "", *_figure(numbers, "loss_curves", "training and eval loss")]

    lines += ["## Angular distance", "",
              "d(l, n) = arccos(cos(x_l, x_{l+n})) / pi, averaged over the real tokens of the held-out text; x_l is "
              "the hidden state entering layer l (x_L: entering the final norm). Small: the layers act almost as "
              "the identity.", "",
              *_figure(numbers, "angular_profile", "angular distance d(l, 1) by layer"),
              *_figure(numbers, "angular_maps", "angular distance d(l, n) maps")]
    measured = [r for r in runs if "angular_distance" in r]
    if measured and len({r["num_layers"] for r in measured}) == 1:
        lines += ["d(l, 1):", ""]
        lines += _table(["layer", *(r["name"] for r in measured)],
                        [[str(layer), *(_cell(r["angular_distance"]["n1"][layer]) for r in measured)]
                         for layer in range(measured[0]["num_layers"])])
    for r in measured:
        count = r["num_layers"]
        lines += [f"<details><summary>{r['label']}: d(l, n), start layer l by span n</summary>", ""]
        lines += _table(["l \\ n", *map(str, range(1, count + 1))],
                        [[str(layer), *(_cell(value) for value in row), *([""] * layer)]
                         for layer, row in enumerate(r["angular_distance"]["by_layer_and_span"])])
        lines += ["</details>", ""]

    lines += ["## Layer removal", "",
              "Held-out loss with one decoder layer replaced by the identity, and its increase over the full model.",
              "", *_figure(numbers, "layer_removal", "loss increase per removed layer")]
    if any(kind in figures.POST_LN_KINDS for r in runs for kind in r["layer_placements"] or []):
        lines += ["Hatched bars are Post-LN layers (Post-LN and DeepNorm blocks end by normalising the residual "
                  "stream), so removing a Post-LN layer also removes its normalisation of the stream.", ""]
    for r in runs:
        if "layer_removal" not in r:
            continue
        full = r["layer_removal"]["full"]
        lines += [f"{r['label']} (full model: loss {_cell(full['loss'])}, perplexity {_cell(full['perplexity'], 2)}, "
                  f"{full['tokens']} target tokens):", ""]
        lines += _table(["removed layer", "placement", "loss", "perplexity", "loss increase", "perplexity increase"],
                        [[str(e["layer"]), str(e["placement"]), _cell(e["loss"]), _cell(e["perplexity"], 2),
                          _cell(e["loss_increase"]), _cell(e["perplexity_increase"], 2)]
                         for e in r["layer_removal"]["layers"]])

    lines += ["## Gradient norm by depth", "",
              "L2 norm of each decoder layer's gradient as the run logged it (train.layer_grad_norm_every).", "",
              *_figure(numbers, "gradient_profiles", "gradient norm by layer at chosen steps"),
              *_figure(numbers, "gradient_maps", "gradient norm over layer and step")]
    for r in runs:
        g = r.get("gradient_norms")
        if not g or not g["chosen_steps"]:
            continue
        lines += [f"{r['label']}:", ""]
        lines += _table(["layer", *(f"step {step}" for step in g["chosen_steps"])],
                        [[name, *(_cell(g["by_step"][str(step)][i], scientific=True) for step in g["chosen_steps"])]
                         for i, name in enumerate(g["layers"])])
    lines += ["## Stability telemetry", "",
              "Logged every train.telemetry_every steps (docs/stability.md): the residual stream's RMS and max after "
              "each layer, the largest pre-softmax attention logit, the update-to-weight ratio and the output "
              "log-partition; Post-LN layers against the rest. Guard events are marked on the loss curves.", "",
              *_figure(numbers, "telemetry_maps", "activation RMS and max attention logit over layer and step"),
              *_figure(numbers, "telemetry_curves", "telemetry of Post-LN layers against the other layers")]
    for r in runs:
        events = r.get("guard_events")
        if not events:
            continue
        lines += [f"{r['label']}: the loss-spike guard's events", ""]
        lines += _table(["step", "event", "details"],
                        [[str(e["step"]), str(e["event"]),
                          ", ".join(f"{key}={value}" for key, value in e.items() if key not in ("step", "event"))]
                         for e in events])
    lines += ["## Downstream scores during training", "",
              "lm-evaluation-harness tasks scored every train.downstream_every steps in the run's own layout "
              "(docs/evaluation.md).", "", *_figure(numbers, "downstream", "downstream scores against step")]
    for r in runs:
        scores = r.get("downstream")
        if not scores:
            continue
        steps = sorted({step for points in scores.values() for step, _ in points})
        lines += [f"{r['label']}:", ""]
        lines += _table(["score", *(f"step {step}" for step in steps)],
                        [[name, *(_cell(dict(map(tuple, points)).get(step)) for step in steps)]
                         for name, points in sorted(scores.items())])
    lines += [f"Every number is in [{ANALYSIS_JSON}]({ANALYSIS_JSON}).", ""]
    return "\n".join(lines)
