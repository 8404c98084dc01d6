"""mixln-bench train on CPU: one row per case, and figures that agree with each other and with the FLOPs formula."""
import json
import subprocess
import sys

import pytest

from megatron_mixln.config import load_config
from megatron_mixln.train.flops import training_flops_per_token

SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=128", "model.num_heads=2",
         "train.micro_batch_size=2"]


def bench(*args, cwd):
    return subprocess.run([sys.executable, "-m", "megatron_mixln.benchmarks.train_throughput", *args],
                          capture_output=True, text=True, cwd=cwd)


def test_table_and_json_per_case(tmp_path, request):
    root = request.config.rootpath
    out = tmp_path / "bench.json"
    proc = bench("--steps", "2", "--warmup", "1", "--json", str(out), *SMALL, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads(out.read_text())
    assert saved["device"] == "CPU" and saved["datasheet_peak_flops"] is None and saved["measured_peak_flops"] > 0
    assert [(r["placement"], r["kernels"], r["execution"], r["loss"]) for r in saved["rows"]] == [
        ("pre", "torch", "eager", "fused"), ("mix", "torch", "eager", "fused")]
    model = load_config(root / "configs/tiny.yaml", SMALL).model
    for row in saved["rows"]:
        assert row["batch"] == 2 and row["seq_len"] == 128 and row["precision"] == "fp32"
        assert row["tokens_per_second"] == pytest.approx(2 * 128 / row["step_seconds"])
        assert row["model_flops_per_token"] == training_flops_per_token(model, 128)
        assert row["mfu"] == pytest.approx(row["tokens_per_second"] * row["model_flops_per_token"]
                                           / saved["measured_peak_flops"])
        assert f"| tiny | {row['placement']} | torch | eager | fused | 2 x 128 |" in proc.stdout
    assert "not a GPU figure" in proc.stdout


def test_unknown_model_is_one_line(request, tmp_path):
    proc = bench("--models", "3b", cwd=request.config.rootpath)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "model '3b' is neither one of tiny, 71m" in proc.stderr


def test_compile_and_loss_axes_one_row_each_and_the_targets_as_ratios(tmp_path, request):
    out = tmp_path / "bench.json"
    proc = bench(*SMALL, "--steps", "1", "--warmup", "1", "--json", str(out), "--placements", "mix", "pre",
                 "--executions", "eager", "compile", "--losses", "unfused", "fused", cwd=request.config.rootpath)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["placement"], r["execution"], r["loss"]) for r in rows] == [
        (p, e, loss) for p in ("mix", "pre") for e in ("eager", "compile") for loss in ("unfused", "fused")]
    by_case = {(r["placement"], r["execution"], r["loss"]): r for r in rows}
    for execution in ("eager", "compile"):
        for loss in ("unfused", "fused"):
            ratio = by_case["mix", execution, loss]["step_seconds"] / by_case["pre", execution, loss]["step_seconds"]
            assert f"- Mix-LN / Pre-LN step time, tiny torch {execution} {loss}: {ratio:.3f}" in proc.stdout


def test_targets_and_memory_lines_compare_the_right_cases():
    from megatron_mixln.benchmarks.train_throughput import memory_saved, targets

    def row(placement, kernels, execution, loss, seconds, peak=10.0):
        return dict(model="1b", placement=placement, kernels=kernels, execution=execution, loss=loss,
                    step_seconds=seconds, peak_memory_gb=peak, mfu_datasheet=0.4 / seconds)

    rows = [row("pre", "torch", "compile", "fused", 1.0), row("mix", "torch", "compile", "fused", 1.02),
            row("pre", "triton", "compile", "fused", 0.8), row("mix", "triton", "compile", "fused", 0.805),
            row("mix", "triton", "compile", "unfused", 0.79, peak=12.5)]
    lines = targets(rows)
    assert "- Mix-LN / Pre-LN step time, 1b torch compile fused: 1.020 (NOT within 1%)" in lines
    assert "- Mix-LN / Pre-LN step time, 1b triton compile fused: 1.006 (within 1%)" in lines
    assert "- triton vs torch speed-up, 1b mix compile fused: 1.267x (faster)" in lines
    assert "- 1B Mix-LN MFU (datasheet peak), triton compile fused: 49.7% (below 50%)" in lines
    assert not any("unfused" in line and "Pre-LN" in line for line in lines)  # no Pre-LN unfused case to compare
    assert memory_saved(rows) == ["- 1b mix triton compile: fused cross-entropy peak 10.00 GB vs 12.50 GB unfused, "
                                  "2.50 GB saved"]
