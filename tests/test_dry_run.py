"""The dry run: exact parameter counts from the meta device, per-rank memory that scales as ZeRO / dp / tp / pp
predict, DeepSpeed's estimate next to ours, and `mixln-train CONFIG --dry-run` as a user runs it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mixln.config import load_config
from megatron_mixln.parallel.launch import LaunchError
from megatron_mixln.train.engine import deepspeed_config
from megatron_mixln.train.memory import CUDA_CONTEXT_BYTES, GIB, dry_run_report, dry_run_summary

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


def deepspeed_printed_gpu_gib(estimator, options, capsys, *args, **kwargs) -> float:
    """The per-GPU GiB that DeepSpeed's `..._all_cold` estimator prints on its row for `options`."""
    estimator(*args, **kwargs)
    [row] = [line for line in capsys.readouterr().out.splitlines() if line.strip().endswith(options)]
    return float(row.split("|")[1].strip().removesuffix("GB"))


def test_model_states_agree_with_deepspeeds_estimators(capsys):
    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                               estimate_zero3_model_states_mem_needs_all_cold)
    from deepspeed.runtime.zero.stage_1_and_2 import (estimate_zero2_model_states_mem_needs,
                                                      estimate_zero2_model_states_mem_needs_all_cold)

    # ZeRO-3: both count 18 B/param over the 64 ranks (we: 2 bf16 + 4 fp32 gradient + 12 Adam and master);
    # DeepSpeed adds 4 B x the largest layer, one gathered layer's 16-bit weights and gradients, which our plan
    # counts in the working memory's live parameters instead.
    z3 = summary(world=64, parallel__zero_stage=3)
    total, largest = z3["total"], z3["largest_layer_params"]
    _, gpu, largest_layer_memory = estimate_zero3_model_states_mem_needs(total, largest, 8, 8, cpu_offload=False,
                                                                         cpu_offload_params=False)
    assert largest_layer_memory == 4 * largest
    assert z3["bytes"]["gpu_total"] == pytest.approx(gpu - largest_layer_memory, abs=1)  # DeepSpeed rounds to int
    printed = deepspeed_printed_gpu_gib(estimate_zero3_model_states_mem_needs_all_cold,
                                        "offload_param=none, offload_optimizer=none, zero_init=1", capsys,
                                        total, largest, num_gpus_per_node=8, num_nodes=8)
    assert (z3["bytes"]["gpu_total"] + 4 * largest) / GIB == pytest.approx(printed, abs=0.0051)  # printed .2f
    # ZeRO-2: DeepSpeed counts a 16-bit gradient partition beside the fp32 one (18 B/param partitioned, ours 16).
    z2 = summary(world=64, parallel__zero_stage=2)
    _, gpu2 = estimate_zero2_model_states_mem_needs(total, 8, 8, cpu_offload=False)
    assert z2["bytes"]["gpu_total"] == pytest.approx(gpu2 - 2 * total / 64, abs=1)
    printed2 = deepspeed_printed_gpu_gib(estimate_zero2_model_states_mem_needs_all_cold, "offload_optimizer=none",
                                         capsys, total, num_gpus_per_node=8, num_nodes=8)
    assert (z2["bytes"]["gpu_total"] + 2 * total / 64) / GIB == pytest.approx(printed2, abs=0.0051)


def zero_settings(path="configs/llama_7b.yaml", world=64, **overrides):
    """The ZeRO settings DeepSpeed resolves from the config our engine builds: ours, else DeepSpeed's defaults."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    config = load_config(ROOT / path, [f"{key.replace('__', '.')}={value}" for key, value in overrides.items()])
    return DeepSpeedZeroConfig(**deepspeed_config(config, world)["zero_optimization"])


def working_lines(s):
    return {entry["name"]: entry for entry in s["working_memory"]["lines"]}


def test_zero3_working_memory_lines_are_the_config_buckets_times_their_element_bytes():
    zero = zero_settings()
    # What train/engine.py sets and DeepSpeed 0.19.8's defaults for the rest, as the docs state them.
    assert (zero.max_live_parameters, zero.prefetch_bucket_size, zero.reduce_bucket_size) == (10**9, 5 * 10**7,
                                                                                             5 * 10**8)
    s = summary(world=64)
    lines = working_lines(s)
    assert lines["live parameters"]["bytes"] == zero.max_live_parameters * 2  # gathered bf16 weights
    assert lines["prefetch bucket"]["bytes"] == zero.prefetch_bucket_size * 2
    assert not lines["prefetch bucket"]["counted"]  # DeepSpeed prefetches inside the live-parameter limit
    assert lines["reduce bucket"]["bytes"] == zero.reduce_bucket_size * 4  # communication_data_type fp32
    assert lines["CUDA context"]["bytes"] == CUDA_CONTEXT_BYTES
    assert s["working_memory"]["bytes"] == (zero.max_live_parameters * 2 + zero.reduce_bucket_size * 4
                                            + CUDA_CONTEXT_BYTES + lines["update-norm change"]["bytes"])
    fp32 = working_lines(summary(world=64, train__precision="fp32"))
    assert fp32["live parameters"]["bytes"] == zero.max_live_parameters * 4
    assert fp32["reduce bucket"]["bytes"] == zero.reduce_bucket_size * 4
    # A model smaller than the limit never has more live parameters than it has.
    small = summary("configs/llama_71m.yaml", world=8, parallel__zero_stage=3)
    assert working_lines(small)["live parameters"]["bytes"] == small["total"] * 2


def test_zero1_and_zero2_working_memory_lines_are_their_buckets():
    zero = zero_settings(parallel__zero_stage=2)
    assert (zero.reduce_bucket_size, zero.allgather_bucket_size, zero.overlap_comm) == (5 * 10**8, 5 * 10**8, False)
    z2 = working_lines(summary(world=64, parallel__zero_stage=2))
    assert z2["reduce bucket"]["bytes"] == zero.reduce_bucket_size * 2  # staged in bf16, one buffer
    assert z2["allgather bucket"]["bytes"] == 0  # all_gather_into_tensor fills the flat weights in place
    # ZeRO-1 in bf16 with fp32 accumulation is DeepSpeed's BF16_Optimizer: the engine's fp32 all-reduce buckets.
    from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE

    z1 = working_lines(summary(world=64, parallel__zero_stage=1))
    assert z1["all-reduce bucket"]["bytes"] == MEMORY_OPT_ALLREDUCE_SIZE * 4
    offloaded = working_lines(summary(world=64, parallel__zero_stage=1, parallel__offload_optimizer="true"))
    assert offloaded["reduce bucket"]["bytes"] == zero.reduce_bucket_size * 4  # ZeRO-1 reduces into fp32


def test_a_change_of_stage3_max_live_parameters_changes_the_plan_by_exactly_its_bytes(monkeypatch):
    from megatron_mixln.train import engine

    before = summary(world=64)["bytes"]

    def fewer_live_parameters(config, dp_size):
        ds_config = deepspeed_config(config, dp_size)
        ds_config["zero_optimization"]["stage3_max_live_parameters"] = 3 * 10**8
        return ds_config

    monkeypatch.setattr(engine, "deepspeed_config", fewer_live_parameters)
    after = summary(world=64)["bytes"]
    assert before["gpu_total_with_working_memory"] - after["gpu_total_with_working_memory"] == (10**9 - 3 * 10**8) * 2
    assert after["gpu_total_with_activations"] == before["gpu_total_with_activations"]


def test_7b_plan_at_64_gpus_exceeds_zero3_buffers():
    s = summary(world=64)
    zero = zero_settings()
    buffers = (zero.max_live_parameters * 2 + zero.reduce_bucket_size * 4 + CUDA_CONTEXT_BYTES
               + working_lines(s)["update-norm change"]["bytes"])
    # The buffers alone exceed model states + activations (2.5 GiB), all the plan used to count.
    assert buffers > s["bytes"]["gpu_total_with_activations"]
    assert s["bytes"]["gpu_total_with_working_memory"] == s["bytes"]["gpu_total_with_activations"] + buffers
    assert s["bytes"]["gpu_total_with_working_memory"] > buffers
    text = dry_run_report(load_config(ROOT / "configs/llama_7b.yaml", []), 64, 8)
    [total_line] = [line for line in text.splitlines() if line.endswith("activations + working memory")]
    assert float(total_line.split()[2]) == round(s["bytes"]["gpu_total_with_working_memory"] / GIB, 2)


def test_update_norms_plan_a_host_copy_of_the_weights_and_one_weight_change_on_the_gpu():
    vocab, hidden = 32000, 4096  # the 7B's largest weight: the embedding (and the head)
    s = summary(world=64, parallel__zero_stage=3)  # layer_grad_norm_every 50 (the default)
    change = working_lines(s)["update-norm change"]
    assert (change["elements"], change["element_bytes"]) == (-(-vocab * hidden // 64), 2 + 4)  # bf16 up, fp32
    assert s["bytes"]["update_norm_host"] == s["bytes"]["parameters"] == s["total"] * 2 / 64
    assert s["bytes"]["update_norm_host_per_node"] == 8 * s["bytes"]["update_norm_host"]
    tp2 = working_lines(summary(world=8, parallel__tp=2, parallel__zero_stage=1, train__precision="fp32"))
    assert tp2["update-norm change"]["bytes"] == vocab * hidden // 2 * 4
    off = summary(world=64, parallel__zero_stage=3, train__layer_grad_norm_every=0)
    assert "update-norm change" not in working_lines(off) and off["bytes"]["update_norm_host"] == 0
    assert (s["bytes"]["gpu_total_with_working_memory"] - off["bytes"]["gpu_total_with_working_memory"]
            == change["bytes"])
    text = dry_run_report(load_config(ROOT / "configs/llama_7b.yaml", ["parallel.zero_stage=3"]), 64, 8)
    [line] = [line for line in text.splitlines() if "update-norm change" in line]
    assert line.split()[2:6] == [f"{change['bytes'] / 2**20:.2f}", "MiB", "2,048,000", "x"], line
    assert (f"CPU (per-layer update norms, every 50 steps) {s['bytes']['update_norm_host'] / GIB:.2f} GiB per rank"
            in text)
    assert "CPU (per-layer update norms" not in dry_run_report(
        load_config(ROOT / "configs/llama_7b.yaml", ["train.layer_grad_norm_every=0"]), 64, 8)


def test_report_names_every_quantity():
    text = dry_run_report(load_config(ROOT / "configs/llama_7b.yaml", ["parallel.zero_stage=3"]), 64, 8)
    for needle in ("6,738,415,616", "world 64 = tp 1 x pp 1 x dp 64", "8 nodes x 8 GPUs", "ZeRO-3",
                   "parameters", "gradients", "optimizer states", "GPU total",
                   "estimate_zero3_model_states_mem_needs", "<- this config",
                   "live parameters           1.86 GiB   1,000,000,000 x 2 B, stage3_max_live_parameters",
                   "prefetch bucket", "reduce bucket             1.86 GiB   500,000,000 x 4 B", "CUDA context",
                   "model states + activations + working memory"):
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
