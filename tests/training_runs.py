"""Shared by the training tests: the tiny run's overrides, runs in one or several processes (spawned workers that
call `train()` themselves, so a test can patch them), and the CPU emulation of NCCL's device rule."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parent.parent

MODEL = ["model.vocab_size=320", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=4",
         "model.num_heads=2", "model.max_seq_len=32", "model.norm_placement=mix", "model.mix_alpha=0.5"]
DATA = ["data.source=embedded", "data.max_train_documents=150", "data.max_eval_documents=20", "data.tokenizer=bpe",
        "data.bpe_vocab_size=300", "data.seq_len=32", "data.mode=packed"]
TRAIN = ["train.steps=6", "train.global_batch_size=4", "train.micro_batch_size=1", "train.lr=3e-3",
         "train.warmup_fraction=0", "train.eval_sequences=8", "train.log_every=1", "train.layer_grad_norm_every=1",
         "train.progress_bar=false", "train.tensorboard=false", "train.seed=7"]


def tiny(cache: str | Path, out: str | Path, *extra: str) -> list[str]:
    """Overrides of a tiny Mix-LN run (2 Post-LN + 2 Pre-LN layers) on the embedded text, 6 steps."""
    return [*MODEL, *DATA, *TRAIN, f"data.cache_dir={cache}", f"train.out_dir={out}", *extra]


@contextlib.contextmanager
def counting_all_reduces():
    """Counts torch.distributed.all_reduce calls made inside the block: yields {"n": calls so far}."""
    calls = {"n": 0}
    real_all_reduce = dist.all_reduce

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real_all_reduce(*args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = real_all_reduce


@contextlib.contextmanager
def leaving_out(step: int):
    """Runs inside see the batches of every optimiser step except `step`: their step `step` trains on the batch
    of step + 1, and so on (the reference for a run that skipped step `step`)."""
    from megatron_mixln.data import GlobalBatchSampler

    original = GlobalBatchSampler.global_indices

    def global_indices(self, index: int):
        return original(self, index + 1 if index >= step - 1 else index)

    GlobalBatchSampler.global_indices = global_indices
    try:
        yield
    finally:
        GlobalBatchSampler.global_indices = original


@contextlib.contextmanager
def environment(variables: dict):
    """os.environ with `variables` set inside the block, as it was after it."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class HostTensorsAreNotServed(TorchFunctionMode):
    """NCCL's rule, emulated on CPU for the training code: a tensor that code under megatron_mixln/train/ makes
    without naming a device lands on `meta`, the stand-in for "the host" on a GPU node; `recording_collectives`
    then refuses it, as NCCL refuses a host tensor ("No backend type associated with device type cpu")."""

    FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.as_tensor, torch.arange,
                 torch.randn, torch.rand, torch.randint, torch.linspace, torch.eye}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("device") is None \
                and f"{os.sep}megatron_mixln{os.sep}train{os.sep}" in sys._getframe(1).f_code.co_filename:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "reduce",
               "all_to_all_single", "reduce_scatter")


@contextlib.contextmanager
def recording_collectives(record: list, served: str = "cpu"):
    """Append (collective, device types of its tensors, calling file) for every tensor collective, and refuse,
    as NCCL refuses a host tensor, any tensor not on the device type the group serves (c10d itself would
    pass a `meta` tensor through)."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name, function):
        def recorded(*args, **kwargs):
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in list(args) + list(kwargs.values()) if isinstance(a, (list, tuple))
                        for t in a if isinstance(t, torch.Tensor)]
            devices = sorted({t.device.type for t in tensors})
            record.append((name, devices, sys._getframe(1).f_code.co_filename))
            if any(device != served for device in devices):
                raise RuntimeError(f"No backend type associated with device type {devices} in {name} "
                                   f"(this process group serves {served} tensors)")
            return function(*args, **kwargs)
        return recorded

    for name, function in originals.items():
        setattr(dist, name, wrap(name, function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)


def losses_of(out: str | Path) -> dict[int, float]:
    """step -> loss in a run's metrics.jsonl; safe while the run appends to it (read_metrics skips a torn last
    line)."""
    from megatron_mixln.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r}


def result_summary(result) -> dict:
    return {"losses": {str(k): v for k, v in result.losses.items()},
            "grad_norms": {str(k): v for k, v in result.grad_norms.items()},
            "skipped": result.skipped_steps, "stopped_early": result.stopped_early, "eval_loss": result.eval_loss}


def _worker(rank: int, world: int, port: int, runs: list[list[str]], config: str | None, env: dict,
            leave_out: int | None, emulate_nccl: bool, result_path: str, run_envs: list[dict],
            run_leave_outs: list[int | None]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                      PYTHONWARNINGS="ignore", **env)
    torch.set_num_threads(1)  # two processes on two cores slow each other ~10x with the default threads
    from megatron_mixln.config import load_config
    from megatron_mixln.train.loop import train

    for index, overrides in enumerate(runs):
        collectives: list = []
        out: dict = {}
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(environment(run_envs[index]))
                if (left_out := run_leave_outs[index] or leave_out) is not None:
                    stack.enter_context(leaving_out(left_out))
                if emulate_nccl:
                    stack.enter_context(recording_collectives(collectives))
                    stack.enter_context(HostTensorsAreNotServed())
                out = result_summary(train(load_config(config, overrides)))
        except BaseException as err:  # reported to the test, which asserts on it
            out = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        out["collectives"] = collectives
        Path(f"{result_path}.{index}.{rank}").write_text(json.dumps(out))
        if "error" in out:  # a peer may be waiting in a collective of this run: the later runs cannot start
            return
    # As mixln-train does (only where every rank got here): else gloo may abort the process at exit (engine.py).
    from megatron_mixln.train.engine import leave_process_group

    leave_process_group()


def run_processes(world: int, overrides: list[str], tmp_path: Path, env: dict | None = None,
                  leave_out: int | None = None, emulate_nccl: bool = False) -> list[dict]:
    """Train in `world` spawned processes (gloo); returns each rank's summary (or its error)."""
    return train_one_after_another(world, [overrides], tmp_path, env=env, leave_out=leave_out,
                                   emulate_nccl=emulate_nccl)[0]


NOT_RUN = {"error": "not run: an earlier run in the same processes failed"}


def train_one_after_another(world: int, runs: list[list[str]], tmp_path: Path, config: str | Path | None = None,
                            env: dict | None = None, leave_out: int | None = None, emulate_nccl: bool = False,
                            run_envs: list[dict] | None = None,
                            run_leave_outs: list[int | None] | None = None) -> list[list[dict]]:
    """Train each of `runs` (overrides of `config`) in turn in the same `world` spawned processes (gloo), which
    join the process group once: a launch costs several seconds (torch and DeepSpeed imported in every process),
    a tiny run one or two. `env` and `leave_out` hold for every run; `run_envs[i]` (variables set for run i
    only) and `run_leave_outs[i]` (instead of `leave_out`) for one. Returns, per run, each rank's summary or its
    error (NOT_RUN after a failed run)."""
    from megatron_mixln.parallel.launch import free_port

    run_envs = run_envs or [{} for _ in runs]
    run_leave_outs = run_leave_outs or [None for _ in runs]
    assert len(run_envs) == len(run_leave_outs) == len(runs)
    result_path = str(tmp_path / f"result-{os.getpid()}-{len(list(tmp_path.iterdir()))}")
    mp.start_processes(_worker, args=(world, free_port(), [list(run) for run in runs],
                                      None if config is None else str(config), env or {}, leave_out, emulate_nccl,
                                      result_path, run_envs, run_leave_outs), nprocs=world, start_method="spawn",
                       join=True)
    return [[json.loads(path.read_text()) if (path := Path(f"{result_path}.{index}.{rank}")).exists() else NOT_RUN
             for rank in range(world)] for index in range(len(runs))]


def module_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The model weights in a (TP=1, PP=1) DeepSpeed checkpoint folder, read as mixln-export reads them."""
    from megatron_mixln.train.checkpoint_files import deepspeed_checkpoint_globals

    with torch.serialization.safe_globals(deepspeed_checkpoint_globals()):
        return torch.load(Path(folder) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]


def run_gloo_workers(worker, world: int, tmp_path: Path) -> list:
    """worker(rank, world, store_path, result_path) in `world` spawned processes joined by a FileStore; each
    rank torch.saves its result to f"{result_path}.{rank}". Returns the results, by rank."""
    mp.start_processes(worker, args=(world, str(tmp_path / "store"), str(tmp_path / "result")), nprocs=world,
                       start_method="spawn", join=True)
    return [torch.load(f"{tmp_path / 'result'}.{rank}", weights_only=True) for rank in range(world)]


def exported_weights(out: str | Path) -> dict[str, torch.Tensor]:
    from megatron_mixln.train.export import read_export

    return read_export(Path(out) / "export")[1]


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp(min=1e-30)).item()
               for k in a)


class MaliciousPickle:
    """Runs code when unpickled (records it in `ran`): what a checkpoint must never be allowed to do."""

    ran = False

    def __reduce__(self):
        return (MaliciousPickle._run, ())

    @staticmethod
    def _run():
        MaliciousPickle.ran = True
        return MaliciousPickle


@contextlib.contextmanager
def tmpfs(mount: Path, options: str):
    """A real small file system (e.g. options "size=6m", "ro,size=1m") at `mount`; skips the test where mounting
    is not allowed (it needs root, as here and in CI)."""
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        import pytest

        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
