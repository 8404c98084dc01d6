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
    proc = bench(*SMALL, "--steps", "1", "--warmup", "1", "--json", str(out), "--placements", "pre", "mix",
                 "--executions", "eager", "compile", "--losses", "unfused", "fused", cwd=request.config.rootpath)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    # plan_cases' order: the pairs first (Pre-LN then Mix-LN, then Mix-LN's other head and its compiled case), then
    # the rest of Mix-LN on its build, then Pre-LN's rest on a new one.
    assert [(r["placement"], r["execution"], r["loss"], r["build"].split()[0]) for r in rows] == [
        ("pre", "eager", "unfused", "built"), ("mix", "eager", "unfused", "built"),
        ("mix", "eager", "fused", "reused"), ("mix", "compile", "unfused", "reused"),
        ("mix", "compile", "fused", "reused"),
        ("pre", "eager", "fused", "built"), ("pre", "compile", "unfused", "reused"),
        ("pre", "compile", "fused", "reused")]
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


def test_plan_measures_each_targets_pair_before_any_secondary_case():
    from megatron_mixln.benchmarks.train_throughput import plan_cases

    cases = plan_cases(["1b", "130m"], ["pre", "mix"], ["triton", "torch"], ["eager", "compile"],
                       ["fused", "unfused"])
    assert len(cases) == len(set(cases)) == 2 ** 5  # every case once
    pairs = [("1b", "pre", "triton", "eager", "fused"), ("1b", "mix", "triton", "eager", "fused"),  # Mix / Pre, MFU
             ("1b", "mix", "torch", "eager", "fused"),  # triton vs torch eager
             ("1b", "mix", "triton", "eager", "unfused"),  # the fused loss's memory
             ("1b", "mix", "triton", "compile", "fused"), ("1b", "mix", "torch", "compile", "fused")]  # compiled
    assert cases[:len(pairs)] == pairs  # each pair's second case right after its first, on one Mix-LN build
    assert cases[len(pairs):2 * len(pairs)] == [("130m", *case[1:]) for case in pairs]
    # Then the secondary cases, Mix-LN's (whose model is still built) before Pre-LN's.
    secondary = cases[2 * len(pairs):]
    assert secondary[0] == ("1b", "mix", "torch", "eager", "unfused")
    assert [c[1] for c in secondary if c[0] == "1b"] == ["mix"] * 3 + ["pre"] * 7
    # A cut anywhere: the targets available from the first n cases only grow, and 3 cases hold both eager ratios.
    from megatron_mixln.benchmarks.train_throughput import targets

    def row(case):
        return dict(zip(("model", "placement", "kernels", "execution", "loss"), case), step_seconds=1.0,
                    mfu_datasheet=None)

    assert [line.split(":")[0] for line in targets([row(c) for c in cases[:3]])] == [
        "- Mix-LN / Pre-LN step time, 1b triton eager fused", "- triton vs torch speed-up, 1b mix eager fused"]


def test_switching_a_built_model_matches_a_model_built_that_way(request):
    """apply_variant sets every module that reads the kernels backend or the LM head as a fresh build would (the
    compiled switch, apply_execution, is covered by the bench run above: Pre-LN's model compiled in place)."""
    from megatron_mixln.benchmarks.train_throughput import apply_variant
    from megatron_mixln.model.llama import MixLNForCausalLM

    def settings(model):
        return [(name, getattr(m, "kernels", None), getattr(m, "fused", None)) for name, m in model.named_modules()]

    small = load_config(request.config.rootpath / "configs/tiny.yaml", SMALL).model
    model = MixLNForCausalLM(small)  # torch kernels, unfused head
    small.kernels, small.fused_cross_entropy = "triton", True
    want = settings(MixLNForCausalLM(small))
    assert settings(model) != want
    apply_variant(model, "triton", "fused")
    assert settings(model) == want


@pytest.mark.parametrize("stage", [3, 2])
def test_offload_host_plan_counts_the_buffers_deepspeed_allocates(stage, request):
    """The host-memory plan the 7B step is decided on (train/memory.py, offload_host_plan) against the host tensors
    DeepSpeed 0.19.8 holds for an offloaded optimizer after a step, counted tensor by tensor (CPU: nothing pinned)."""
    import torch

    from megatron_mixln.benchmarks.train_throughput import Build, case_config, run_case
    from megatron_mixln.train.engine import init_distributed
    from megatron_mixln.train.memory import offload_host_plan

    root = request.config.rootpath
    config = case_config(str(root / "configs/tiny.yaml"), "mix", "torch", SMALL + [
        f"parallel.zero_stage={stage}", "parallel.offload_optimizer=true"], on_gpu=False)
    init_distributed()
    build = Build(config, torch.device("cpu"))
    run_case(build, config, steps=1, warmup=0, device=torch.device("cpu"))
    zero = build.engine.optimizer
    if stage == 3:
        masters = zero.fp32_partitioned_groups_flat
        held = [*masters, *(m.grad for m in masters), zero.grad_partitions_flat_buffer]
    else:
        masters = zero.single_partition_of_fp32_groups
        held = [*masters, *(m.grad for m in masters), *zero.param_buffer_of_bit16_for_cpu_offload_groups]
    held += [state[key] for m in masters for state in [zero.optimizer.state[m]] for key in ("exp_avg", "exp_avg_sq")]
    assert all(t.device.type == "cpu" for t in held)
    plan = offload_host_plan(config, gpu_host=False)
    assert plan["bytes"] == sum(t.numel() * t.element_size() for t in held)
    assert plan["transient"] == 0
    build.close(torch.device("cpu"))


def test_an_offload_case_beyond_the_hosts_memory_is_listed_not_run(tmp_path, request, monkeypatch, capsys):
    import psutil

    from megatron_mixln.benchmarks import train_throughput

    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=2**20))
    monkeypatch.chdir(request.config.rootpath)
    out = tmp_path / "bench.json"
    assert train_throughput.main(["--placements", "mix", "--steps", "1", "--warmup", "0", "--json", str(out), *SMALL,
                                  "parallel.zero_stage=3", "parallel.offload_optimizer=true"]) == 0
    row, = json.loads(out.read_text())["rows"]
    assert row["not_run"].startswith("not run: DeepSpeed's offloaded optimizer needs ")
    assert row["host_available_gib"] == 2**20 / 2**30 and row["host_plan_gib"] > row["host_available_gib"]
    assert "| tiny | mix | torch | eager | fused | not run: " in capsys.readouterr().out
