"""The paper's analyses (docs/method.md#analyses) of trained runs, as a library and as `mixln-analyze`.

    from megatron_mixln import analysis

    run = analysis.find_run("runs/tiny_mix")           # a run folder, an export (--hf too) or a checkpoint folder
    model = run.load_model("cpu")                        # the unsplit model, whatever layout trained it
    text = analysis.held_out(run, sequences=64)          # the run's own eval split (or data="file.jsonl")
    D = analysis.angular_distances(model, text.batches)  # [L, L]: D[l, n - 1] = d(l, n); D[:, 0] the n = 1 profile
    drops = analysis.layer_removal(model, text.batches)  # one dict per layer: loss, perplexity, their increase
    grads = analysis.gradient_norms_by_depth(run.metrics_path)  # layer x step table from metrics.jsonl
    tele = analysis.telemetry_by_depth(run.metrics_path)  # stability telemetry (train.telemetry_every), layer x step
    events = analysis.guard_events(run.metrics_path)     # the loss-spike guard's outliers, rollbacks, collapses
    scores = analysis.downstream_curves(run.metrics_path)  # train.downstream_tasks: {"task/metric": [(step, value)]}
    analysis.report(["runs/tiny_pre", "runs/tiny_mix"], "runs/analysis")  # figures, analysis.json, report.md

Every forward runs the model's own modules; hidden states are read with forward pre-hooks on the decoder layers
and the LM head stage, and a layer is removed with a forward hook returning its input.
"""
from megatron_mixln.analysis.measures import (GradientNorms, LossResult, Telemetry, angular_distances,
                                              downstream_curves, gradient_norms_by_depth, guard_events, held_out_loss, layer_removal,
                                              loss_curves, spread_steps, telemetry_by_depth, token_mask)
from megatron_mixln.analysis.report import RunAnalysis, analyse, markdown, report
from megatron_mixln.analysis.runs import HeldOut, Run, choose_device, find_run, held_out, placement_label

__all__ = ["GradientNorms", "HeldOut", "LossResult", "Run", "RunAnalysis", "Telemetry", "analyse", "angular_distances",
           "choose_device", "downstream_curves", "find_run", "gradient_norms_by_depth", "guard_events", "held_out", "held_out_loss",
           "layer_removal", "loss_curves", "markdown", "placement_label", "report", "spread_steps",
           "telemetry_by_depth", "token_mask"]
