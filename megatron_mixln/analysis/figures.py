"""The analysis figures as PNGs (matplotlib, Agg): several runs in each, one colour per run throughout.

Each `plot_*` takes the `RunAnalysis` list of `report.analyse` and returns (the matplotlib Figure, or None when no
run has the data, notes): a note is one sentence saying how runs of different shapes were combined. `save`
writes a figure as the PNG named in `PLOTS`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

ANGULAR_PROFILE = "angular_distance_n1.png"
ANGULAR_MAPS = "angular_distance_maps.png"
LAYER_REMOVAL = "layer_removal.png"
GRADIENT_PROFILES = "gradient_norms_by_depth.png"
GRADIENT_MAPS = "gradient_norms_heatmap.png"
LOSS_CURVES = "loss_curves.png"
TELEMETRY_MAPS = "telemetry_heatmaps.png"
TELEMETRY_CURVES = "telemetry_post_ln_vs_rest.png"
DOWNSTREAM = "downstream_scores.png"
# Block kinds that end by normalising the residual stream (DeepNorm is Post-LN with an up-weighted residual):
# removing such a layer also removes that normalisation, so the layer-removal chart hatches their bars.
POST_LN_KINDS = ("post", "deepnorm")
POST_LN_HATCH = "//"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node; set before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def run_colour(index: int):
    """The colour of the index-th run, the same in every figure."""
    return _pyplot().get_cmap("tab10")(index % 10)


def save(fig, path: Path) -> Path:
    """Write `fig` as a PNG and free it."""
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def _grid(count: int, width: float = 4.6, height: float = 3.8, columns: int = 3, sharey: bool = False):
    plt = _pyplot()
    cols = min(columns, count)
    rows = math.ceil(count / cols)
    # Constrained layout: panel labels and a shared colour bar never overlap their neighbours.
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), dpi=120, squeeze=False,
                             layout="constrained", sharey=sharey)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _integer_ticks(ax, x: bool = False, y: bool = False) -> None:
    """Layers, spans and steps are integers: no tick at 0.5."""
    from matplotlib.ticker import MaxNLocator

    if x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def depth_positions(num_layers: int, relative: bool) -> np.ndarray:
    """Where layer l sits on a depth axis: l, or (l + 0.5) / L, the middle of its slice of the depth."""
    layers = np.arange(num_layers)
    return (layers + 0.5) / num_layers if relative else layers.astype(float)


def _depth_axis(counts: list[int], what: str) -> tuple[bool, list[str]]:
    """Whether depth must be relative (the runs' layer counts differ), and the note saying so."""
    if len(set(counts)) <= 1:
        return False, []
    return True, [f"{what}: the runs have {', '.join(map(str, sorted(set(counts))))} layers, so depth is drawn as "
                  "relative depth (layer + 0.5) / L."]


def _depth_label(relative: bool) -> str:
    return "relative depth (layer + 0.5) / L" if relative else "layer"


def _logged_step_ticks(steps: list[int], count: int = 6) -> list[int]:
    """About `count` ticks, each a step that was logged: round numbers spread over the range, each moved to the
    nearest logged step (a tick between two logged steps would label a column that was never measured)."""
    from matplotlib.ticker import MaxNLocator

    wanted = MaxNLocator(nbins=count, integer=True).tick_values(steps[0], steps[-1])
    logged = np.array(steps)
    return sorted({int(logged[np.abs(logged - tick).argmin()]) for tick in wanted})


def plot_angular_profile(analyses):
    """d(l, 1) against depth, one line per run."""
    shown = [a for a in analyses if a.angular is not None]
    if not shown:
        return None, []
    relative, notes = _depth_axis([a.num_layers for a in shown], "angular distance d(l, 1)")
    fig, ax = _pyplot().subplots(figsize=(7.5, 4.4), dpi=120, layout="constrained")
    for a in shown:
        ax.plot(depth_positions(a.num_layers, relative), a.angular[:, 0], "o-", ms=4, color=a.colour, label=a.label)
    ax.set_xlabel(_depth_label(relative))
    _integer_ticks(ax, x=not relative)
    ax.set_ylabel("angular distance d(l, 1)")
    ax.set_title("angular distance between each layer's input and output (held-out tokens)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig, notes


def plot_angular_maps(analyses):
    """d(l, n) over start layer l and span n, one panel per run on one colour scale (as the paper's figure)."""
    plt = _pyplot()
    shown = [a for a in analyses if a.angular is not None]
    if not shown:
        return None, []
    top = max(float(np.nanmax(a.angular)) for a in shown) or 1.0
    fig, axes = _grid(len(shown))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")  # l + n > L: no such pair
    image = None
    for ax, a in zip(axes, shown):
        count = a.num_layers
        # Transposed so that, as in the paper's figure, the start layer runs along x and the span up the y axis.
        image = ax.imshow(a.angular.T, origin="lower", cmap=cmap, vmin=0.0, vmax=top, aspect="auto",
                          extent=(-0.5, count - 0.5, 0.5, count + 0.5), interpolation="nearest")
        ax.set_xlabel("start layer l")
        ax.set_ylabel("span n (layers)")
        _integer_ticks(ax, x=True, y=True)
        ax.set_title(a.label, fontsize=9)
    fig.colorbar(image, ax=axes, label="angular distance d(l, n)", shrink=0.9)
    return fig, []


def _post_ln_legend_entry():
    from matplotlib.patches import Patch

    return Patch(facecolor="white", edgecolor="black", hatch=POST_LN_HATCH,
                 label="Post-LN layer (its norm is removed with it)")


def _removal_bars(ax, x, a, width: float, **kwargs):
    """One run's loss-increase bars, the Post-LN layers' hatched."""
    bars = ax.bar(x, [entry["loss_increase"] for entry in a.removal], width=width, color=a.colour, **kwargs)
    for bar, entry in zip(bars, a.removal):
        if entry["placement"] in POST_LN_KINDS:
            bar.set_hatch(POST_LN_HATCH)
            bar.set_edgecolor("black")
            bar.set_linewidth(0.5)
    return bars


def plot_layer_removal(analyses):
    """Held-out loss increase when each layer is replaced by the identity: grouped bars per layer when the runs
    have the same depth, one panel per run otherwise; Post-LN layers hatched."""
    shown = [a for a in analyses if a.removal is not None]
    if not shown:
        return None, []
    counts = {a.num_layers for a in shown}
    any_post = any(entry["placement"] in POST_LN_KINDS for a in shown for entry in a.removal)
    extra = [_post_ln_legend_entry()] if any_post else []
    if len(counts) == 1:
        count = counts.pop()
        fig, ax = _pyplot().subplots(figsize=(max(7.5, 0.35 * count * len(shown)), 4.4), dpi=120,
                                     layout="constrained")
        width = 0.8 / len(shown)
        bars = [_removal_bars(ax, np.arange(count) - 0.4 + width * (i + 0.5), a, width, label=a.label)
                for i, a in enumerate(shown)]
        axes, notes = [ax], []
        ax.legend(handles=[*bars, *extra], fontsize=8)
    else:
        fig, axes = _grid(len(shown))
        for ax, a in zip(axes, shown):
            _removal_bars(ax, np.arange(a.num_layers), a, 0.8)
            ax.set_title(a.label, fontsize=9)
        notes = [f"layer removal: the runs have {', '.join(map(str, sorted(counts)))} layers, so each run's bars "
                 "are drawn in a panel of its own."]
        if extra:
            fig.legend(handles=extra, loc="outside lower center", fontsize=8)
    for ax in axes:
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xlabel("removed layer")
        _integer_ticks(ax, x=True)
        ax.set_ylabel("loss increase without the layer (nats)")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("performance drop when one layer is replaced by the identity (held-out loss)")
    return fig, notes


def plot_gradient_profiles(analyses):
    """Per-layer gradient norm against depth, one panel per profile step on one y scale, one line per run."""
    shown = [a for a in analyses if a.gradients is not None and a.gradients.chosen]
    notes = [f"gradient norms: {a.label} has no per-layer gradient norms in its metrics.jsonl "
             "(train.layer_grad_norm_every=0, or no metrics.jsonl found), so it is left out."
             for a in analyses if a not in shown]
    if not shown:
        return None, notes
    relative, depth_notes = _depth_axis([a.num_layers for a in shown], "gradient norms by depth")
    slots = max(len(a.gradients.chosen) for a in shown)
    # One y scale for every panel: how the norms move from step to step is part of the picture.
    fig, axes = _grid(slots, sharey=True)
    lines = {}  # one legend entry per run, for the whole figure
    for slot, ax in enumerate(axes):
        drawn = [a for a in shown if slot < len(a.gradients.chosen)]
        steps = [a.gradients.chosen[slot] for a in drawn]
        for a, step in zip(drawn, steps):
            norms = a.gradients.at(step)
            [lines[id(a)]] = ax.plot(depth_positions(len(norms), relative), norms, "o-", ms=3, color=a.colour,
                                     label=a.label)
        ax.set_title(f"step {steps[0]}" if len(set(steps)) == 1
                     else f"steps {', '.join(map(str, steps))} (runs in legend order)", fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel(_depth_label(relative))
        _integer_ticks(ax, x=not relative)
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("gradient L2 norm of the layer")
        ax.grid(alpha=0.3, which="both")
    fig.legend(handles=[lines[id(a)] for a in shown], loc="outside lower center", ncols=min(len(shown), 4),
               fontsize=8)
    fig.suptitle("gradient norm of each layer by depth")
    return fig, notes + depth_notes


def plot_gradient_maps(analyses):
    """Per-layer gradient norm over layer x step, one panel per run, one logarithmic colour scale."""
    from matplotlib.colors import LogNorm

    shown = [a for a in analyses if a.gradients is not None and a.gradients.steps and a.gradients.layers]
    if not shown:
        return None, []
    values = np.concatenate([a.gradients.norms[np.isfinite(a.gradients.norms) & (a.gradients.norms > 0)]
                             for a in shown])
    norm = LogNorm(vmin=values.min(), vmax=values.max()) if values.size else None
    fig, axes = _grid(len(shown), width=5.2)
    mesh = None
    for ax, a in zip(axes, shown):
        steps = np.array(a.gradients.steps, dtype=float)
        # Cell edges half-way between logged steps, so uneven logging is drawn to scale.
        middle = (steps[1:] + steps[:-1]) / 2
        first = steps[0] - (middle[0] - steps[0] if len(steps) > 1 else 0.5)
        last = steps[-1] + (steps[-1] - middle[-1] if len(steps) > 1 else 0.5)
        edges = np.concatenate([[first], middle, [last]])
        data = np.ma.masked_invalid(np.where(a.gradients.norms > 0, a.gradients.norms, np.nan))
        mesh = ax.pcolormesh(edges, np.arange(len(a.gradients.layers) + 1) - 0.5, data, norm=norm, cmap="magma",
                             shading="flat")
        ax.set_xlabel("step")
        ax.set_xticks(_logged_step_ticks(a.gradients.steps))
        ax.set_ylabel("layer")
        _integer_ticks(ax, y=True)
        ax.set_title(a.label, fontsize=9)
    if mesh is not None and norm is not None:
        fig.colorbar(mesh, ax=axes, label="gradient L2 norm of the layer", shrink=0.9)
    fig.suptitle("gradient norm by layer and logged step")
    return fig, []


def _mark_guard_events(ax, a) -> set[str]:
    """The loss-spike guard's events of run `a` on its loss curve: an outlier step as x at its loss, a rollback as a
    shaded span from the step reloaded to the step that triggered it, a collapse as a dotted vertical line.
    Returns the kinds drawn (for one legend entry each)."""
    train = dict(a.curves["train"]) if a.curves else {}
    drawn = set()
    for event in a.events or []:
        kind, step = event["event"], event["step"]
        if kind == "outlier":
            loss = event.get("loss", train.get(step))
            try:
                loss = float(loss)
            except (TypeError, ValueError):
                continue  # a non-finite loss has no place on the axis; the table in report.md lists it
            if math.isfinite(loss):
                ax.plot([step], [loss], "x", ms=8, mew=2, color=a.colour, zorder=5)
                drawn.add(kind)
        elif kind == "rollback":
            start, end = event.get("to_step", step), event.get("trigger_step", step)
            ax.axvspan(start, end, color=a.colour, alpha=0.15, lw=0)
            drawn.add(kind)
        elif kind == "collapse":
            ax.axvline(step, color=a.colour, ls=":", lw=1.5)
            drawn.add(kind)
    return drawn


def _event_legend_entries(kinds: set[str]) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    entries = {"outlier": Line2D([], [], marker="x", ls="", color="0.3", ms=8, mew=2, label="guard: outlier step"),
               "rollback": Patch(color="0.3", alpha=0.2, label="guard: rollback (reloaded step to trigger)"),
               "collapse": Line2D([], [], ls=":", color="0.3", label="guard: collapse")}
    return [entries[kind] for kind in ("outlier", "rollback", "collapse") if kind in kinds]


def plot_loss_curves(analyses):
    """Training loss (line) and eval loss (markers) against step, one colour per run; the loss-spike guard's events
    marked on them (`_mark_guard_events`)."""
    shown = [a for a in analyses if a.curves is not None and (a.curves["train"] or a.curves["eval"])]
    notes = [f"loss curves: {a.label} has no metrics.jsonl with losses, so it is left out."
             for a in analyses if a not in shown]
    if not shown:
        return None, notes
    fig, ax = _pyplot().subplots(figsize=(7.5, 4.4), dpi=120, layout="constrained")
    for a in shown:
        if a.curves["train"]:
            ax.plot(*zip(*a.curves["train"]), lw=1.0, color=a.colour, label=f"{a.label} (train)")
        if a.curves["eval"]:
            ax.plot(*zip(*a.curves["eval"]), "o--", ms=5, color=a.colour, label=f"{a.label} (eval)")
    kinds = set().union(*(_mark_guard_events(ax, a) for a in shown))
    ax.set_xlabel("step")
    _integer_ticks(ax, x=True)
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("training and eval loss" + (" with the guard's events" if kinds else ""))
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + _event_legend_entries(kinds), fontsize=8)
    return fig, notes


def _telemetry_runs(analyses):
    return [a for a in analyses if a.telemetry is not None and a.telemetry.steps and a.telemetry.layers]


def _step_edges(steps: list[int]) -> np.ndarray:
    """Cell edges half-way between logged steps, so uneven logging is drawn to scale."""
    steps = np.array(steps, dtype=float)
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middle = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - middle[0]], middle, [2 * steps[-1] - middle[-1]]])


# (telemetry field, colour-bar label, logarithmic colour scale) of the heat maps
TELEMETRY_MAP_FIELDS = (("activation_rms", "RMS of the residual stream after the layer", True),
                        ("max_attention_logit", "max attention logit q.k/sqrt(d)", False))


def plot_telemetry_maps(analyses):
    """Heat maps over layer x telemetry step: the residual stream's RMS after each layer (logarithmic colours) and
    the maximum attention logit, one row per run, one colour scale per quantity over all runs."""
    from matplotlib.colors import LogNorm, Normalize

    shown = _telemetry_runs(analyses)
    if not shown:
        return None, []
    plt = _pyplot()
    fig, axes = plt.subplots(len(shown), len(TELEMETRY_MAP_FIELDS), figsize=(5.2 * len(TELEMETRY_MAP_FIELDS),
                             3.6 * len(shown)), dpi=120, squeeze=False, layout="constrained")
    for column, (name, label, logarithmic) in enumerate(TELEMETRY_MAP_FIELDS):
        values = np.concatenate([a.telemetry.by_layer[name].ravel() for a in shown])
        values = values[np.isfinite(values) & ((values > 0) if logarithmic else True)]
        if values.size == 0:
            norm = None
        elif logarithmic:
            norm = LogNorm(vmin=values.min(), vmax=max(values.max(), values.min() * 1.001))
        else:
            norm = Normalize(vmin=values.min(), vmax=max(values.max(), values.min() + 1e-9))
        mesh = None
        for row, a in enumerate(shown):
            ax, t = axes[row][column], a.telemetry
            data = t.by_layer[name]
            data = np.ma.masked_invalid(np.where(data > 0, data, np.nan) if logarithmic else data)
            mesh = ax.pcolormesh(_step_edges(t.steps), np.arange(len(t.layers) + 1) - 0.5, data, norm=norm,
                                 cmap="magma" if logarithmic else "viridis", shading="flat")
            ax.set_xlabel("step")
            ax.set_xticks(_logged_step_ticks(t.steps))
            ax.set_ylabel("layer")
            _integer_ticks(ax, y=True)
            ax.set_title(a.label, fontsize=9)
        if mesh is not None and norm is not None:
            fig.colorbar(mesh, ax=[axes[row][column] for row in range(len(shown))], label=label, shrink=0.9)
    fig.suptitle("stability telemetry by layer and telemetry step")
    return fig, []


# (telemetry field, y label, logarithmic y) of the Post-LN-versus-the-rest curves
TELEMETRY_CURVE_FIELDS = (("activation_rms", "residual-stream RMS", True),
                          ("activation_max", "residual-stream max |x|", True),
                          ("max_attention_logit", "max attention logit", False),
                          ("update_ratio", "update / weight norm", True))


def post_ln_rows(a) -> np.ndarray:
    """Which of run `a`'s telemetry layers are Post-LN kinds (by norm_placement of the run's config)."""
    from megatron_mixln.model.norms import norm_placement

    model = a.run.config.model
    return np.array([norm_placement(int(key[len("layer_"):]), model.num_layers, model) in POST_LN_KINDS
                     for key in a.telemetry.layers], dtype=bool)


def plot_telemetry_curves(analyses):
    """Per telemetry quantity, its mean over a run's Post-LN layers (solid) and over its other layers (dashed)
    against step, and the output log-partition; one colour per run."""
    shown = _telemetry_runs(analyses)
    if not shown:
        return None, []
    panels = len(TELEMETRY_CURVE_FIELDS) + 1
    fig, axes = _grid(panels, width=4.6, height=3.4, columns=3)
    for ax, (name, label, logarithmic) in zip(axes, TELEMETRY_CURVE_FIELDS):
        for a in shown:
            post, data = post_ln_rows(a), a.telemetry.by_layer[name]
            for rows, style, group in ((post, "-", "Post-LN layers"), (~post, "--", "other layers")):
                if rows.any() and np.isfinite(data[rows]).any():
                    with np.errstate(all="ignore"):
                        mean = np.nanmean(np.where(np.isfinite(data[rows]), data[rows], np.nan), axis=0)
                    ax.plot(a.telemetry.steps, mean, style, lw=1.2, color=a.colour, label=f"{a.label}: {group}")
        ax.set_ylabel(label + " (mean over layers)")
        if logarithmic and any(line.get_ydata().size for line in ax.get_lines()):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax = axes[-1]
    for a in shown:
        for kind, style in (("mean", "-"), ("max", ":")):
            values = a.telemetry.log_partition.get(kind)
            if values is not None and np.isfinite(values).any():
                ax.plot(a.telemetry.steps, values, style, lw=1.2, color=a.colour, label=f"{a.label}: log Z {kind}")
    ax.set_ylabel("output log-partition log Z")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    extra, extra_labels = ax.get_legend_handles_labels()
    fig.legend(handles + extra, labels + extra_labels, loc="outside lower center", ncol=2, fontsize=8)
    fig.suptitle("stability telemetry: Post-LN layers (solid) against the other layers (dashed)")
    return fig, []


def plot_downstream(analyses):
    """Each downstream score (train.downstream_tasks: task/metric) against step, one panel per score, one colour per
    run: how the placements compare on the tasks while they train."""
    names = sorted({name for a in analyses if a.downstream for name in a.downstream})
    if not names:
        return None, []
    notes = [f"downstream scores: {a.label} logged none (train.downstream_tasks), so it is left out."
             for a in analyses if not a.downstream]
    fig, axes = _grid(len(names))
    for ax, name in zip(axes, names):
        for a in analyses:
            if a.downstream and a.downstream.get(name):
                ax.plot(*zip(*a.downstream[name]), "o-", ms=4, lw=1.2, color=a.colour, label=a.label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        _integer_ticks(ax, x=True)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle("downstream scores during training (lm-evaluation-harness)")
    return fig, notes


# (file, figure) in the order report.md shows them
PLOTS = ((LOSS_CURVES, plot_loss_curves), (ANGULAR_PROFILE, plot_angular_profile), (ANGULAR_MAPS, plot_angular_maps),
         (LAYER_REMOVAL, plot_layer_removal), (GRADIENT_PROFILES, plot_gradient_profiles),
         (GRADIENT_MAPS, plot_gradient_maps), (TELEMETRY_MAPS, plot_telemetry_maps),
         (TELEMETRY_CURVES, plot_telemetry_curves), (DOWNSTREAM, plot_downstream))
