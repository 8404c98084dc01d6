"""mixln-preflight: it passes on this machine and fails with a clear line on a broken setup (an unwritable
train.out_dir, a missing device, a data.cache_dir that is not one folder), in one process and under torchrun
with two processes (gloo); its pieces against independent figures; bad inputs as one line."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training_runs import tmpfs

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
# Small measurements (the defaults are sized for GPU nodes), 2 training steps; micro-batches of 8 so that the
# config also trains with 2 data-parallel ranks.
FAST = ["--steps", "2", "--message-mib", "1", "--write-mib", "4", "train.micro_batch_size=8"]


def preflight(nproc: int, *args: str, env: dict | None = None, per_rank_cache: str | None = None):
    """mixln-preflight configs/tiny.yaml FAST ARGS, alone or under torchrun; `per_rank_cache` gives each rank its
    own data.cache_dir (that folder + LOCAL_RANK), as two nodes that mount different folders would see."""
    command = [str(BIN / "mixln-preflight"), "configs/tiny.yaml", *FAST, *args]
    if per_rank_cache is not None:
        command = ["sh", "-c", 'exec "$@" "data.cache_dir=$CACHE/$LOCAL_RANK"', "sh", *command]
    if nproc > 1:
        command = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "--no-python", *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {}),
           **({"CACHE": per_rank_cache} if per_rank_cache else {})}
    env.pop("TRITON_INTERPRET", None)  # conftest's: the command sets it itself on CPU, as for a user
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def row(stdout: str, check: str, *words: str) -> str:
    """The one table row of `check` holding every one of `words`."""
    found = [line for line in stdout.splitlines() if line.startswith(check + " ") and all(w in line for w in words)]
    assert len(found) == 1, (check, words, stdout)
    return found[0]


def verdict(line: str) -> str:
    return next(word for word in line.split() if word in ("ok", "WARN", "FAIL"))


def folder_state(*folders: Path) -> dict:
    return {str(p): p.read_bytes() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_passes_in_one_process_and_leaves_only_what_was_there(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a file of the user's: kept, as is every byte of the cache
    before = folder_state(out)
    proc = preflight(1, f"train.out_dir={out}", f"data.cache_dir={cache}")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    text = proc.stdout
    assert verdict(row(text, "device", "rank 0")) == "ok" and row(text, "device").endswith(" cpu")
    assert "n/a (1 rank)" in row(text, "allreduce", "world")
    kernels = row(text, "kernels", "Triton interpreter")
    assert verdict(kernels) == "ok" and "+-inf" in kernels
    space = row(text, "out_dir", "space")
    from megatron_mixln.config import load_config
    from megatron_mixln.train.memory import parameter_counts

    params = parameter_counts(load_config(ROOT / "configs" / "tiny.yaml").model)["total"]
    one = params * (4 + 8) / 2**20  # fp32 weights + Adam's two fp32 moments per parameter, saved once
    assert verdict(space) == "ok" and f"{params:,} parameters, {one:.1f} MiB per checkpoint" in space
    assert f"+ the export = {4 * one:.1f} MiB" in space  # train.keep_checkpoints=2: 3 at once, and the export
    assert verdict(row(text, "out_dir", "speed")) == "ok"
    assert verdict(row(text, "cache_dir", "shared")) == "ok"
    assert verdict(row(text, "training", "2 steps", "1 rank")) == "ok"
    assert text.splitlines()[-1].endswith(": ready") and "0 FAIL" in text.splitlines()[-1]
    assert folder_state(out) == before and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not cache.exists()  # it made the folder for its token file, and removed both


@pytest.mark.slow
def test_fails_in_one_process_on_a_read_only_out_dir_and_a_missing_device(tmp_path):
    with tmpfs(tmp_path / "read-only", "ro,size=1m") as mount:
        proc = preflight(1, f"train.out_dir={mount / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                         env={"MIXLN_TEST_GPUS": "0"})
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    text = proc.stdout
    device = row(text, "device", "rank 0")
    assert verdict(device) == "FAIL" and "LOCAL_RANK=0 but this process sees 0 GPUs" in device
    out_dir = row(text, "out_dir")
    assert verdict(out_dir) == "FAIL" and "read-only file system" in out_dir and str(mount) in out_dir
    assert verdict(row(text, "training")) == "FAIL" and "skipped" in row(text, "training")
    assert verdict(row(text, "kernels")) == "FAIL"  # no rank had a device to run them on
    assert text.splitlines()[-1].endswith(": not ready")
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_passes_under_torchrun_through_the_sbatch_template_with_tensor_parallelism(tmp_path):
    # slurm/preflight.sbatch outside SLURM: a stub srun runs its command once (one node), a stub scontrol names
    # this host; the template's torchrun then starts 2 processes with its c10d rendezvous.
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in (("srun", 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"'),
                       ("scontrol", "echo localhost")):
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(0o755)
    from megatron_mixln.parallel.launch import free_port

    out, cache = tmp_path / "run", tmp_path / "cache"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(ROOT),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "GPUS_PER_NODE": "2",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "preflight.sbatch"), "configs/tiny.yaml", *FAST,
                           f"train.out_dir={out}", f"data.cache_dir={cache}", "parallel.tp=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    text = proc.stdout
    assert text.startswith("==== mixln: job 4242 run 1") and "mixln-preflight configs/tiny.yaml" in text
    for rank in (0, 1):
        assert verdict(row(text, "device", f"rank {rank} (local {rank})")) == "ok"
    for where in ("world", "node"):
        line = row(text, "allreduce", where)
        assert verdict(line) == "ok" and "2 ranks, 1.0 MiB fp32 message" in line
    training = row(text, "training", "tp 2 x pp 1 x dp 1")
    assert verdict(training) == "ok" and "match one process" in training
    assert verdict(row(text, "cache_dir")) == "ok" and verdict(row(text, "out_dir", "space")) == "ok"
    assert text.splitlines()[-1].endswith("over 2 ranks on 1 host: ready")
    assert not out.exists() and not cache.exists()


@pytest.mark.slow
def test_fails_under_torchrun_on_each_broken_setup_with_a_line_naming_it(tmp_path):
    caches = tmp_path / "caches"  # rank 0 reads caches/0, rank 1 caches/1: two "nodes", two folders
    with tmpfs(tmp_path / "read-only", "ro,size=1m") as mount:
        proc = preflight(2, f"train.out_dir={mount / 'run'}", per_rank_cache=str(caches),
                         env={"MIXLN_TEST_GPUS": "1"})  # one GPU on the node: LOCAL_RANK=1 has none
    assert proc.returncode != 0, proc.stdout + proc.stderr[-3000:]
    text = proc.stdout
    assert verdict(row(text, "device", "rank 0")) == "ok"
    missing = row(text, "device", "rank 1")
    assert verdict(missing) == "FAIL" and "LOCAL_RANK=1 but this process sees 1 GPU " in missing
    assert "skipped: a rank has no device" in row(text, "allreduce")
    assert verdict(row(text, "out_dir")) == "FAIL" and "read-only file system" in row(text, "out_dir")
    cache = row(text, "cache_dir")
    assert verdict(cache) == "FAIL" and "(rank 1) do not see the file" in cache and str(caches / "0") in cache
    assert "data.cache_shared=true every node must see one folder" in cache
    assert verdict(row(text, "training")) == "FAIL"
    assert text.splitlines()[-1].endswith(": not ready")
    assert not any(caches.rglob("*.mixln-preflight-*"))  # the token file is gone again


def test_bad_inputs_are_one_line_with_exit_2(tmp_path, capsys):
    from megatron_mixln.cli import _preflight, _run

    for argv, expected in [
        (["configs/tiny.yaml", "train.nope=1"], "train.nope is not a known field"),
        (["configs/tiny.yaml", "--tiny", str(tmp_path / "missing.yaml")], "--tiny"),
        (["configs/tiny.yaml", "train.global_batch_size=12", "train.micro_batch_size=8"],
         "train.global_batch_size=12 is invalid"),
    ]:
        assert _run(_preflight, argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err, err
    for argv in (["configs/tiny.yaml", "--steps", "0"], ["configs/tiny.yaml", "--message-mib", "nan"]):
        with pytest.raises(SystemExit) as stop:
            _run(_preflight, argv)
        assert stop.value.code == 2 and "is not a positive" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the pieces


def test_device_verdict_names_the_local_rank_the_count_and_the_fix(monkeypatch):
    from megatron_mixln.preflight import device_verdict

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert device_verdict(0, None) == ("ok", "cpu")
    assert device_verdict(1, 2)[0] == "ok"
    status, detail = device_verdict(2, 2)
    assert status == "FAIL" and "LOCAL_RANK=2 but this process sees 2 GPUs (CUDA_VISIBLE_DEVICES=2,3)" in detail


def test_bus_bandwidth_is_nccl_tests_definition():
    from megatron_mixln.preflight import bus_bandwidth

    # nccl-tests (doc/PERFORMANCE.md): algbw = S / t; all-reduce busbw = algbw * 2(n-1)/n.
    assert math.isclose(bus_bandwidth(8, 2**30, 0.01), 2**30 / 0.01 * 14 / 8)
    assert math.isclose(bus_bandwidth(2, 10**6, 1e-3), 1e9)  # two ranks: each byte crosses once


def test_error_ratio_is_the_kernel_tests_tolerance_and_checks_where_nan_and_inf_are():
    from megatron_mixln.kernels.checks import error_ratio

    ref = torch.tensor([1.0, -2.0, 4.0, math.inf, math.nan], dtype=torch.float64)
    out = ref.clone()
    assert error_ratio(out, ref, torch.float32) == 0
    out[2] = 4.0 * (1 + 2e-5)  # 8e-5 absolute = 2e-5 of max|ref| = 4: twice the fp32 tolerance (1e-5)
    assert math.isclose(error_ratio(out, ref, torch.float32), 2.0, rel_tol=1e-3)
    moved = ref.clone().float()
    moved[3], moved[4] = math.nan, math.inf
    assert error_ratio(moved, ref, torch.float32) == math.inf
    # bf16: 2u (|ref| + rms(ref)) per element, u = 2^-8.
    ref = torch.tensor([1.0, 1.0], dtype=torch.float64)
    out = torch.tensor([1.0 + 2 * 2**-8 * 2 * 0.5, 1.0], dtype=torch.float64)
    assert math.isclose(error_ratio(out, ref, torch.bfloat16), 0.5)


def test_compare_runs_finds_a_step_that_differs_or_is_missing():
    from megatron_mixln.preflight import compare_runs

    ref = {"losses": {"1": 8.0, "2": 7.5}, "grad_norms": {"1": 0.5, "2": 0.4}}
    same = {"losses": {1: 8.0, 2: 7.5}, "grad_norms": {1: 0.5, 2: 0.4 * (1 + 3e-6)}}
    worst, problem = compare_runs(same, ref)
    assert problem is None and math.isclose(worst, 3e-6, rel_tol=1e-6)
    assert compare_runs({**same, "losses": {1: 8.0}}, ref)[1] is not None
    assert compare_runs({**same, "losses": {1: 8.0, 2: math.nan}}, ref) == (math.inf, "step 2: loss nan vs 7.5")


@pytest.mark.parametrize("world, parallel", [
    (64, ["parallel.tp=8", "parallel.pp=8", "parallel.zero_stage=1"]),
    (16, ["parallel.tp=16"]),
    (6, ["parallel.pp=2", "parallel.zero_stage=1", "parallel.pipeline_partition=0,17,34"]),  # llama_7b's 34 specs
])
def test_tiny_layout_config_fits_every_layout(tmp_path, world, parallel):
    from megatron_mixln.config import load_config
    from megatron_mixln.preflight import reference_config, tiny_layout_config
    from megatron_mixln.train.engine import gradient_accumulation_steps

    user = load_config(ROOT / "configs" / "llama_7b.yaml", parallel)
    tiny = tiny_layout_config(ROOT / "configs" / "tiny.yaml", user, world, tmp_path, steps=3)
    p, m = tiny.parallel, tiny.model
    assert (p.tp, p.pp, p.zero_stage) == (user.parallel.tp, user.parallel.pp, user.parallel.zero_stage)
    assert m.num_heads % p.tp == 0 and m.intermediate_size % p.tp == 0 and m.vocab_size % p.tp == 0
    assert m.num_layers + 2 >= p.pp and tiny.train.precision == "fp32"
    dp = world // (p.tp * p.pp)
    assert gradient_accumulation_steps(tiny, dp) >= 1  # the batch divides over the data-parallel ranks
    reference = reference_config(tiny, tmp_path)
    assert (reference.parallel.tp, reference.parallel.pp, reference.parallel.zero_stage) == (1, 1, 0)
    assert reference.model == m and reference.train.global_batch_size == tiny.train.global_batch_size
