"""The dry run: exact parameter counts from the meta device, per-rank memory that scales as ZeRO / dp / tp / pp
predict, DeepSpeed's estimate next to ours, and `mixln-train CONFIG --dry-run` as a user runs it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mixln.config import load_config
from megatron_mixln.parallel.launch import LaunchError
from megatron_mixln.train.memory import dry_run_report, dry_run_summary

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


def llama_params(vocab, hidden, ffn, layers, norms_per_layer=2):
    """Untied embedding and head, q/k/v/o, SwiGLU gate/up/down, RMSNorm gains, final norm; no biases."""
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + norms_per_layer * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden, per_layer


def summary(path="configs/llama_7b.yaml", world=8, gpus_per_node=8, **overrides):
    config = load_config(ROOT / path, [f"{key.replace('__', '.')}={value}" for key, value in overrides.items()])
    return dry_run_summary(config, world, gpus_per_node)


def test_7b_parameter_count_matches_the_paper_shape():
    total, per_layer = llama_params(32000, 4096, 11008, 32)
    s = summary()
    assert s["total"] == total == 6_738_415_616  # "7B" (LLaMA-7B's 6.74B)
    assert s["embedding"] == s["head"] == 32000 * 4096 and s["final_norm"] == 4096
    assert s["layers"] == [per_layer] * 32
    assert s["placements"] == ["post"] * 2 + ["pre"] * 30  # Mix-LN, alpha 6.25%


@pytest.mark.parametrize("path, shape, rounded", [
    ("configs/llama_71m.yaml", (32000, 512, 1368, 12), 71e6),
    ("configs/llama_130m.yaml", (32000, 768, 2048, 12), 134e6),  # the paper's "130M" is 134.1M with the head
])
def test_small_model_counts(path, shape, rounded):
    total, _ = llama_params(*shape)
    assert summary(path, world=1)["total"] == total
    assert total == pytest.approx(rounded, rel=0.01)


def test_sandwich_layers_count_their_four_norms():
    total, per_layer = llama_params(32000, 512, 1368, 12, norms_per_layer=4)
    s = summary("configs/llama_71m.yaml", world=1, model__norm_placement="sandwich")
    assert s["total"] == total and s["layers"] == [per_layer] * 12


def test_bytes_per_parameter_with_fp32_gradient_accumulation_under_bf16():
    p = summary(world=1, parallel__zero_stage=1)  # dp 1: nothing is partitioned
    assert p["bytes"]["parameters"] == 2 * p["total"]  # bf16
    assert p["bytes"]["gradients"] == 4 * p["total"]  # accumulated and reduced in fp32
    assert p["bytes"]["optimizer_gpu"] == 12 * p["total"]  # fp32 master + two Adam moments
    f = summary(world=8, parallel__zero_stage=0, train__precision="fp32")
    assert (f["bytes"]["parameters"], f["bytes"]["gradients"], f["bytes"]["optimizer_gpu"]) == (
        4 * f["total"], 4 * f["total"], 8 * f["total"])
    from megatron_mixln.config import ConfigError

    with pytest.raises(ConfigError, match="parallel.zero_stage=0 is invalid: expected 1, 2 or 3 with "
                                          "train.precision=bf16"):
        summary(world=8, parallel__zero_stage=0)


def test_zero_stages_partition_what_they_promise_over_dp():
    z = [summary(world=8, parallel__zero_stage=stage, train__precision="fp32")["bytes"] for stage in range(4)]
    assert z[1]["optimizer_gpu"] == pytest.approx(z[0]["optimizer_gpu"] / 8, rel=1e-12)
    assert z[1]["gradients"] == z[0]["gradients"] and z[1]["parameters"] == z[0]["parameters"]
    assert z[2]["gradients"] == pytest.approx(z[0]["gradients"] / 8, rel=1e-12)
    assert z[2]["parameters"] == z[0]["parameters"]
    assert z[3]["parameters"] == pytest.approx(z[0]["parameters"] / 8, rel=1e-12)
    assert z[3]["gpu_total"] == pytest.approx(z[0]["gpu_total"] / 8, rel=1e-12)
    # Doubling dp halves every partitioned state.
    z3_16 = summary(world=16, parallel__zero_stage=3, train__precision="fp32")["bytes"]
    assert z3_16["gpu_total"] == pytest.approx(z[3]["gpu_total"] / 2, rel=1e-12)


def test_tensor_parallelism_splits_matrices_but_not_norms():
    total, _ = llama_params(32000, 4096, 11008, 32)
    norms = 32 * 2 * 4096 + 4096
    one = summary(world=4, parallel__tp=1, parallel__zero_stage=1)
    two = summary(world=8, parallel__tp=2, parallel__zero_stage=1)  # same dp = 4
    assert (one["dp"], two["dp"]) == (4, 4)
    assert one["rank_params"] == total
    assert two["rank_params"] == (total - norms) // 2 + norms
    assert two["bytes"]["parameters"] == 2 * two["rank_params"]


def test_pipeline_stages_hold_embedding_first_and_head_last():
    _, per_layer = llama_params(32000, 4096, 11008, 32)
    embedding = head = 32000 * 4096
    s = summary(world=16, parallel__pp=2, parallel__zero_stage=1, parallel__pipeline_partition="0,17,34")
    assert s["stage_params"] == [embedding + 16 * per_layer, 16 * per_layer + 4096 + head]
    assert s["largest_stage"] == 1 and s["rank_params"] == s["stage_params"][1]
    balanced = summary(world=16, parallel__pp=4, parallel__zero_stage=1)
    assert sum(balanced["stage_params"]) == balanced["total"]
    assert max(balanced["stage_params"]) < balanced["total"] / 4 * 1.1  # the balanced partition is near even
    assert balanced["rank_params"] == max(balanced["stage_params"])


def test_offloaded_optimizer_states_are_reported_on_cpu():
    on_gpu = summary(world=8, parallel__zero_stage=3)["bytes"]
    off = summary(world=8, parallel__zero_stage=3, parallel__offload_optimizer="true")["bytes"]
    assert off["optimizer_gpu"] == 0 and off["optimizer_cpu"] == on_gpu["optimizer_gpu"]
    assert off["gpu_total"] == on_gpu["gpu_total"] - on_gpu["optimizer_gpu"]
    assert off["cpu_per_node"] == 8 * off["optimizer_cpu"]


def test_deepspeed_estimate_is_deepspeeds_own_function():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    s = summary(world=64, parallel__zero_stage=3)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(s["total"], 32000 * 4096, num_gpus_per_node=8, num_nodes=8,
                                                        cpu_offload=False, cpu_offload_params=False, zero_init=True)
    assert s["largest_layer_params"] == 32000 * 4096  # the embedding (or head): DeepSpeed's "largest layer"
    assert s["deepspeed"]["zero3"] == {"gpu": gpu, "cpu_per_node": cpu}
    # Ours counts 16 B/param partitioned; DeepSpeed adds fp32 gradients and one gathered layer: same ballpark.
    assert 0.5 < s["bytes"]["gpu_total"] / gpu < 1.0


def test_report_names_every_quantity():
    text = dry_run_report(load_config(ROOT / "configs/llama_7b.yaml", ["parallel.zero_stage=3"]), 64, 8)
    for needle in ("6,738,415,616", "world 64 = tp 1 x pp 1 x dp 64", "8 nodes x 8 GPUs", "ZeRO-3",
                   "parameters", "gradients", "optimizer states", "GPU total",
                   "estimate_zero3_model_states_mem_needs", "<- this config"):
        assert needle in text, needle


def test_world_size_not_divisible_by_gpus_per_node_is_a_launch_error():
    with pytest.raises(LaunchError, match=r"world size 12 is not a multiple of --gpus-per-node=8"):
        summary(world=12, parallel__zero_stage=3)


def test_cli_dry_run_of_7b_allocates_nothing(tmp_path):
    command = [str(BIN / "mixln-train"), "configs/llama_7b.yaml", "--dry-run", "--world-size", "64",
               "parallel.zero_stage=3"]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory
    stdout, stderr = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert os.waitstatus_to_exitcode(status) == 0, stderr[-2000:]
    assert "parameters: 6,738,415,616 (6.74B)" in stdout and "dp 64" in stdout
    # 6.7B fp32 parameters would be 27 GB; on the meta device the whole process stays well under 2 GB.
    assert usage.ru_maxrss < 2 * 2**20  # KiB on Linux


def test_cli_bad_world_size_prints_the_launch_error_sentence():
    proc = subprocess.run([str(BIN / "mixln-train"), "configs/llama_7b.yaml", "parallel.tp=4", "--dry-run",
                           "--world-size", "6", "parallel.zero_stage=3"],  # overrides on both sides of the flags
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: world size 6 is not a multiple of parallel.tp x parallel.pp = 4 x 1 = 4: launch a multiple of 4 "
        "processes (e.g. 4) or change parallel.tp / parallel.pp."]
    assert "Traceback" not in proc.stderr
