"""mixln-preflight: check a machine or an allocation before a run spends it, under the launchers training uses.

Every rank runs the same checks; rank 0 prints one table (check, where, verdict, detail), a row as each check
ends, then a summary line. Exit status: 1 when a row says FAIL, 0 otherwise (WARN rows included), 2 for a mistake
in the config or the launch (as mixln-train). docs/preflight.md describes every check and its thresholds.

The checks agree over a gloo group, so a rank without a GPU still reports (and the checks that need every
device are skipped with a line). What they write goes into a scratch folder in train.out_dir and one token file
in data.cache_dir; both are removed at the end, with any folder the preflight had to create for them.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_mixln.config import Config, ConfigError, config_from_dict, load_config
from megatron_mixln.parallel.launch import LaunchEnv, data_parallel_size, discover_launch_env
from megatron_mixln.storage import storage_error

OK, WARN, FAIL = "ok", "WARN", "FAIL"
# Test-only switch: the device check behaves as if CUDA showed this many GPUs on the node (ranks with a higher
# LOCAL_RANK then have none); nothing else changes. Emulates a missing device on a CPU machine.
TEST_GPUS = "MIXLN_TEST_GPUS"
SCRATCH_PREFIX = ".mixln-preflight-"
# The tiny run against one process, per step (loss and gradient norm), fp32: on CPU, DP2, PP2 and TP2 match within
# 1.1e-7; 1e-3 leaves room for a GPU's other reduction orders, while a missing or doubled reduction changes a
# gradient norm by far more (a factor near sqrt(2)).
TRAIN_TOLERANCE = 1e-3


# ------------------------------------------------------------------------------------------------ the table


class Table:
    """The rows so far; rank 0 prints each as it is added."""

    def __init__(self, show: bool):
        self.rows: list[tuple[str, str, str, str]] = []
        self.show = show
        if show:
            print(f"{'check':<10} {'where':<32} {'verdict':<7} detail", flush=True)

    def add(self, check: str, where: str, verdict: str, detail: str) -> None:
        self.rows.append((check, where, verdict, detail))
        if self.show:
            print(f"{check:<10} {where:<32} {verdict:<7} {detail}", flush=True)

    def count(self, verdict: str) -> int:
        return sum(row[2] == verdict for row in self.rows)


class Ranks:
    """This process in the launched world, and the gloo collectives the checks agree through."""

    def __init__(self, env: LaunchEnv, group):
        self.env, self.group = env, group
        self.rank, self.world = env.rank, env.world_size
        self.host = socket.gethostname()
        self.hosts = self.gather(self.host)
        self.leader = self.hosts.index(self.host) == self.rank  # the lowest rank on this host speaks for it

    def gather(self, value) -> list:
        if self.world == 1:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value, group=self.group)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)

    def where(self, rank: int) -> str:
        return f"{self.hosts[rank]} rank {rank}"


def _ranks_text(ranks: list[int], hosts: list[str]) -> str:
    by_host: dict[str, list[int]] = {}
    for rank in ranks:
        by_host.setdefault(hosts[rank], []).append(rank)
    return "; ".join(f"{host} (rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))})"
                     for host, r in by_host.items())


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 / 10 else f"{value / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------------ start-up


def join_process_group(env: LaunchEnv, timeout_minutes: float):
    """Join the world as training does (train/engine.py, init_distributed), without binding a GPU first, so that a
    rank whose LOCAL_RANK has none still joins and reports; returns the gloo group the checks agree through (the
    default group on CPU). NCCL builds its communicators at the first collective, which only ranks with a device
    reach."""
    from megatron_mixln.train.engine import init_distributed

    init_distributed(env, timeout_minutes, bind_device=False)
    return dist.new_group(backend="gloo") if torch.cuda.is_available() and env.world_size > 1 else dist.group.WORLD


# ------------------------------------------------------------------------------------------------ devices


def device_verdict(local_rank: int, count: int | None) -> tuple[str, str]:
    """(verdict, detail) for a rank's LOCAL_RANK among `count` visible GPUs (None: no CUDA, a CPU run)."""
    if count is None:
        return OK, "cpu"
    if local_rank < count:
        return OK, ""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    return FAIL, (f"LOCAL_RANK={local_rank} but this process sees {count} GPU{'s' if count != 1 else ''} "
                  f"(CUDA_VISIBLE_DEVICES={visible}): start at most {count} processes on this node, or give each "
                  "process all of the node's GPUs (no --gpus-per-task / --gpu-bind)")


def this_device(env: LaunchEnv) -> dict:
    """What this rank sees: {"verdict", "detail", "uuid", "cuda"}; a GPU is also asked to add two numbers."""
    emulated = os.environ.get(TEST_GPUS)
    if emulated is not None:
        verdict, detail = device_verdict(env.local_rank, int(emulated))
        if verdict == OK:
            detail = f"cpu (emulated GPU {env.local_rank} of {emulated}, {TEST_GPUS})"
        return {"verdict": verdict, "detail": detail, "uuid": None, "cuda": False}
    if not torch.cuda.is_available():
        return {"verdict": OK, "detail": "cpu", "uuid": None, "cuda": False}
    verdict, detail = device_verdict(env.local_rank, torch.cuda.device_count())
    if verdict != OK:
        return {"verdict": verdict, "detail": detail, "uuid": None, "cuda": True}
    props = torch.cuda.get_device_properties(env.local_rank)
    try:
        torch.cuda.set_device(env.local_rank)
        works = torch.ones(2, device="cuda").sum().item() == 2
        problem = "" if works else "1 + 1 != 2 on it"
    except RuntimeError as err:
        problem = str(err).strip().splitlines()[0]
    detail = f"cuda:{env.local_rank} {props.name}, {_gib(props.total_memory)}"
    return {"verdict": FAIL if problem else OK, "detail": detail + (f": {problem}" if problem else ""),
            "uuid": str(getattr(props, "uuid", "")) or None, "cuda": True}


def check_devices(ranks: Ranks, table: Table) -> list[bool]:
    """One row per rank; two ranks of one host on the same GPU fail too. Whether each rank has its device."""
    device = this_device(ranks.env)
    seen = ranks.gather({**device, "local_rank": ranks.env.local_rank})
    first_with: dict[tuple[str, str], int] = {}
    good = []
    for rank, report in enumerate(seen):
        verdict, detail = report["verdict"], report["detail"]
        if report["uuid"] is not None:
            other = first_with.setdefault((ranks.hosts[rank], report["uuid"]), rank)
            if other != rank:
                verdict, detail = FAIL, f"{detail}: the same GPU as rank {other}; give each process its own"
        table.add("device", f"{ranks.where(rank)} (local {report['local_rank']})", verdict, detail)
        good.append(verdict == OK)
    return good


# ------------------------------------------------------------------------------------------------ all-reduce


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_reduce_busbw(group, size: int, nbytes: int, device: torch.device, iterations: int = 20,
                     warmup: int = 5) -> dict:
    """nccl-tests' all_reduce_perf for one message of `nbytes` (fp32) over `group` of `size` ranks: whether the sum
    is right, and the mean seconds per all-reduce on this rank (busbw = 2(n-1)/n x bytes / time, from the slowest
    rank's time)."""
    elements = max(1, nbytes // 4)
    check = torch.full((elements,), float(dist.get_rank(group) + 1), device=device)
    dist.all_reduce(check, group=group)
    right = bool((check == size * (size + 1) / 2).all())
    data = torch.zeros(elements, device=device)
    for _ in range(warmup):
        dist.all_reduce(data, group=group)
    _synchronize(device)
    dist.all_reduce(torch.zeros(1, device=device), group=group)  # start the clock together
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(iterations):
        dist.all_reduce(data, group=group)
    _synchronize(device)
    return {"right": right, "seconds": (time.perf_counter() - started) / iterations}


def bus_bandwidth(size: int, nbytes: int, seconds: float) -> float:
    """nccl-tests' bus bandwidth of an all-reduce, in bytes per second."""
    return 2 * (size - 1) / size * nbytes / seconds


def check_bandwidth(ranks: Ranks, table: Table, devices_ok: bool, message_mib: float, min_busbw: float) -> None:
    """All-reduce bus bandwidth over the world and within each node (all nodes at once)."""
    if ranks.world == 1:
        table.add("allreduce", "world", OK, "n/a (1 rank)")
        return
    if not devices_ok:
        table.add("allreduce", "world", FAIL, "skipped: a rank has no device (see the device rows)")
        return
    nbytes = int(message_mib * 2**20)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    hosts = list(dict.fromkeys(ranks.hosts))
    members = {host: [r for r in range(ranks.world) if ranks.hosts[r] == host] for host in hosts}
    node_groups = {host: dist.new_group(members[host]) for host in hosts}  # every rank creates every group
    world = all_reduce_busbw(dist.group.WORLD, ranks.world, nbytes, device)
    mine = members[ranks.host]
    node = all_reduce_busbw(node_groups[ranks.host], len(mine), nbytes, device) if len(mine) > 1 else None
    results = ranks.gather({"world": world, "node": node})

    def row(where: str, group_ranks: list[int], key: str) -> float | None:
        reports = [results[r][key] for r in group_ranks]
        n, seconds = len(group_ranks), max(report["seconds"] for report in reports)
        busbw = bus_bandwidth(n, nbytes, seconds)
        wrong = [r for r, report in zip(group_ranks, reports) if not report["right"]]
        detail = (f"busbw {busbw / 1e9:.2f} GB/s ({n} ranks, {_gib(nbytes)} fp32 message, "
                  f"{seconds * 1e3:.3f} ms per all-reduce, {device.type})")
        if wrong:
            table.add("allreduce", where, FAIL, f"wrong sum on {_ranks_text(wrong, ranks.hosts)}; {detail}")
        elif busbw < min_busbw * 1e9:
            table.add("allreduce", where, WARN, f"{detail}: below --min-busbw {min_busbw:g} GB/s")
        else:
            table.add("allreduce", where, OK, detail)
        return busbw

    row("world", list(range(ranks.world)), "world")
    per_node = {}
    for host in hosts:
        if len(members[host]) > 1:
            per_node[host] = row(f"node {host}", members[host], "node")
        else:
            table.add("allreduce", f"node {host}", OK, "n/a (1 rank)")
    if len(per_node) > 1:  # a node far slower than the others is a node to leave out
        median = sorted(per_node.values())[len(per_node) // 2]
        slow = [host for host, value in per_node.items() if value < median / 2]
        if slow:
            table.add("allreduce", "nodes", WARN, f"{', '.join(slow)} below half the median node busbw "
                                                  f"({median / 1e9:.2f} GB/s)")


# ------------------------------------------------------------------------------------------------ kernels


def _import_kernels(cuda: bool):
    """The kernels package, defined for this device: (module, None), or (None, why not). On CPU they run under
    Triton's interpreter, which TRITON_INTERPRET=1 selects when the kernels are defined (at import), so it is set
    before the import; MIXLN_TEST_GPU_NAN=1 gives the interpreter's NaNs a GPU's bits (kernels/README.md)."""
    if cuda:
        import megatron_mixln.kernels as kernels
        from megatron_mixln.kernels._common import interpreter_requested

        if interpreter_requested():
            return None, "TRITON_INTERPRET is set: unset it, or the kernels run in Triton's CPU interpreter"
        return kernels, None
    if "megatron_mixln.kernels.rms_norm" in sys.modules:
        from megatron_mixln.kernels import rms_norm
        from megatron_mixln.kernels._common import is_interpreted

        if not is_interpreted(rms_norm._rms_norm_fwd_kernel):
            return None, ("skipped: the kernels were defined without Triton's interpreter before the check ran "
                          "(run mixln-preflight as its own process)")
    # Left set: Triton reads it again when a kernel first runs. The GPU-NaN switch is read at the import only.
    os.environ["TRITON_INTERPRET"] = "1"
    saved = os.environ.get("MIXLN_TEST_GPU_NAN")
    os.environ["MIXLN_TEST_GPU_NAN"] = "1"
    try:
        import megatron_mixln.kernels as kernels
    finally:
        if saved is None:
            os.environ.pop("MIXLN_TEST_GPU_NAN")
        else:
            os.environ["MIXLN_TEST_GPU_NAN"] = saved
    return kernels, None


def run_kernel_checks(device: torch.device) -> dict:
    """{"verdict", "detail", "worst"}: every kernel, fp32 and bf16, finite and +-inf inputs, on `device`."""
    try:
        K, why_not = _import_kernels(device.type == "cuda")
    except ImportError as err:
        return {"verdict": FAIL, "detail": f"cannot import the Triton kernels: {err}", "worst": None}
    if K is None:
        return {"verdict": WARN if why_not.startswith("skipped") else FAIL, "detail": why_not, "worst": None}
    from megatron_mixln.kernels.checks import error_ratio, kernel_cases  # after K: the import set the interpreter

    worst, failures = 0.0, []
    for dtype in (torch.float32, torch.bfloat16):
        for non_finite in (False, True):
            try:
                with warnings.catch_warnings():  # the interpreter's numpy warns where inf * 0 makes the NaN expected
                    warnings.simplefilter("ignore", RuntimeWarning)
                    cases = list(kernel_cases(K, device, dtype, non_finite))
            except Exception as err:  # a kernel that does not compile or launch on this device
                failures.append(f"{str(dtype)[6:]}: {type(err).__name__}: {str(err).strip()[:200]}")
                continue
            for op, pairs in cases:
                for name, out, ref in pairs:
                    ratio = error_ratio(out, ref, dtype)
                    worst = max(worst, ratio)
                    if ratio > 1:
                        what = ("NaN/inf not where the reference has them" if math.isinf(ratio)
                                else f"{ratio:.1f}x the tolerance")
                        failures.append(f"{op} {name} {str(dtype)[6:]}{' +-inf' if non_finite else ''}: {what}")
    if failures:
        return {"verdict": FAIL, "detail": "; ".join(failures[:3]) + (f" (+{len(failures) - 3} more)"
                                                                        if len(failures) > 3 else ""), "worst": worst}
    return {"verdict": OK, "detail": "", "worst": worst}


def check_kernels(ranks: Ranks, table: Table, device_ok: bool) -> None:
    """Each GPU checks its own kernels; on CPU (Triton's interpreter) one rank per host does."""
    cuda = torch.cuda.is_available()
    mine = None
    if device_ok and (cuda or ranks.leader):
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        mine = run_kernel_checks(device)
    results = ranks.gather(mine)
    checked = [r for r, result in enumerate(results) if result is not None]
    if not checked:
        table.add("kernels", "all", FAIL, "skipped: no rank has a device")
        return
    what = ("rms_norm, add_rms_norm, swiglu forward + backward vs float64 torch, fp32 and bf16, finite and "
            "+-inf inputs")
    for rank in checked:
        if results[rank]["verdict"] != OK:
            table.add("kernels", ranks.where(rank), results[rank]["verdict"], results[rank]["detail"])
    good = [r for r in checked if results[r]["verdict"] == OK]
    if good:
        worst = max(results[r]["worst"] for r in good)
        where = "Triton interpreter" if not cuda else "GPU"
        table.add("kernels", ranks.where(good[0]) if len(good) == 1 else f"{len(good)} ranks", OK,
                  f"{what} ({where}): worst error {worst:.2f}x the tests' tolerance")


# ------------------------------------------------------------------------------------------------ folders


class Scratch:
    """What the preflight creates, so that it removes exactly that: files, and folders it had to make."""

    def __init__(self):
        self.files: list[Path] = []
        self.trees: list[Path] = []
        self.made: list[Path] = []  # folders created, deepest last

    def make_folder(self, folder: Path) -> None:
        missing = []
        for parent in [folder, *folder.parents]:
            if parent.exists():
                break
            missing.append(parent)
        folder.mkdir(parents=True, exist_ok=True)
        self.made += reversed(missing)

    def clean(self) -> None:
        for path in self.files:
            with contextlib.suppress(OSError):
                path.unlink()
        for tree in self.trees:
            shutil.rmtree(tree, ignore_errors=True)
        for folder in reversed(self.made):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: nothing else was put there meanwhile


def checkpoint_bytes(config: Config, world_size: int) -> tuple[int, float]:
    """(parameters, bytes of one checkpoint over all ranks), from the dry run's plan (train/memory.py)."""
    from megatron_mixln.train.memory import dry_run_summary

    plan = dry_run_summary(config, world_size, gpus_per_node=world_size)
    return plan["total"], plan["bytes"]["checkpoint"]


def write_speed(folder: Path, nbytes: int, scratch: Scratch) -> float:
    """Bytes per second of writing `nbytes` of random data to a new file in `folder`, fsync included."""
    path = folder / f"write-speed-{socket.gethostname()}-{os.getpid()}"
    scratch.files.append(path)
    chunk = os.urandom(min(nbytes, 8 * 2**20))
    started = time.perf_counter()
    with open(path, "wb") as handle:
        written = 0
        while written < nbytes:
            written += handle.write(chunk[:nbytes - written])
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return nbytes / seconds


def _shared_file(ranks: Ranks, folder: Path | None, writers: list[int], scratch: Scratch, what: str,
                 instead: str) -> list[dict]:
    """Each writer rank puts a token file into `folder`; every rank then reads each writer's file. Per rank:
    {"error": sentence or None, "sees": [writers whose token it read back]}."""
    error, token = None, None
    if ranks.rank in writers and folder is not None:
        token = secrets.token_hex(16)
        path = folder / f"{SCRATCH_PREFIX}{token}"
        try:
            scratch.make_folder(folder)
            path.write_text(token)
            scratch.files.append(path)
        except OSError as err:
            error = str(storage_error(err, f"writing into {what}", path, instead) or f"writing {path}: {err}")
            token = None
    tokens = ranks.gather(token)
    sees = []
    for writer in writers:
        with contextlib.suppress(OSError):
            if tokens[writer] and (folder / f"{SCRATCH_PREFIX}{tokens[writer]}").read_text() == tokens[writer]:
                sees.append(writer)
    report = ranks.gather({"error": error, "sees": sees})
    ranks.barrier()  # every rank has read before any file goes
    for path in list(scratch.files):
        if path.name.startswith(SCRATCH_PREFIX) and path.parent == folder:
            with contextlib.suppress(OSError):
                path.unlink()
            scratch.files.remove(path)
    return report


def check_out_dir(ranks: Ranks, table: Table, config: Config, scratch: Scratch, write_mib: float) -> Path | None:
    """train.out_dir: writable, one folder on every node, free space and write speed against the checkpoints the
    run will keep. Returns the scratch folder (inside out_dir) for the training check, or None."""
    out = Path(config.train.out_dir).absolute()
    folder, error = None, None
    if ranks.rank == 0:
        folder = out / f"{SCRATCH_PREFIX}{secrets.token_hex(4)}"
        try:
            scratch.make_folder(out)
            folder.mkdir()
            scratch.trees.append(folder)
        except OSError as err:
            error = str(storage_error(err, "creating a folder in train.out_dir", folder, "choose another "
                                      "train.out_dir") or f"creating {folder}: {err}")
            folder = None
    folder, error = ranks.gather((folder, error))[0]
    if error is not None:
        table.add("out_dir", ranks.where(0), FAIL, error)
        return None
    seen = _shared_file(ranks, folder, [0], scratch, "train.out_dir", "choose another train.out_dir")
    blind = [r for r, report in enumerate(seen) if 0 not in report["sees"]]
    if blind:
        table.add("out_dir", "shared", FAIL, f"{_ranks_text(blind, ranks.hosts)} do not see the folder rank 0 "
                  f"made in train.out_dir={str(out)!r}: every node must see one train.out_dir (a shared file "
                  "system), since rank 0 completes each checkpoint that all ranks write")
        return None

    measured = None
    if ranks.leader:
        try:
            measured = {"free": shutil.disk_usage(folder).free, "speed": write_speed(folder, int(write_mib * 2**20),
                                                                                     scratch)}
        except OSError as err:
            measured = {"error": str(storage_error(err, "writing into train.out_dir", folder,
                                                   "choose another train.out_dir") or err)}
    measured = [m for m in ranks.gather(measured) if m is not None]
    errors = [m["error"] for m in measured if "error" in m]
    if errors:
        table.add("out_dir", "write", FAIL, errors[0])
        return None
    params, one = checkpoint_bytes(config, ranks.world)
    keep = config.train.keep_checkpoints
    need = (keep + 2) * one  # keep checkpoints, the one being saved, and the export written at the end
    free = min(m["free"] for m in measured)
    plan = (f"plan: {params:,} parameters, {_gib(one)} per checkpoint, {keep + 1} at once while saving "
            f"(train.keep_checkpoints={keep}) + the export = {_gib(need)}")
    if free < one:
        table.add("out_dir", "space", FAIL, f"{_gib(free)} free in {out}: not one checkpoint fits; {plan}")
    elif free < need:
        table.add("out_dir", "space", WARN, f"{_gib(free)} free in {out}: less than the run keeps; {plan}")
    else:
        table.add("out_dir", "space", OK, f"{_gib(free)} free in {out}; {plan}")
    speed = sum(m["speed"] for m in measured)  # every host wrote at once, as every rank does in a save
    save_s = one / speed
    limit_s = config.parallel.startup_timeout_minutes * 60
    detail = (f"{speed / 1e6:.0f} MB/s ({len(measured)} host{'s' if len(measured) > 1 else ''} writing "
              f"{_gib(write_mib * 2**20)} each, fsync'd): a checkpoint in ~{save_s:.1f} s")
    if save_s > limit_s:
        table.add("out_dir", "speed", WARN, f"{detail}, more than the collective timeout "
                  f"parallel.startup_timeout_minutes={config.parallel.startup_timeout_minutes:g} ({limit_s:g} s): "
                  "raise it")
    else:
        table.add("out_dir", "speed", OK, detail)
    return folder


def check_cache_dir(ranks: Ranks, table: Table, config: Config, scratch: Scratch) -> None:
    """data.cache_dir: with data.cache_shared=true rank 0 prepares and every node must read the same folder;
    with false each host's first rank prepares its own, which must then not be one folder shared by hosts."""
    folder = Path(config.data.cache_dir).absolute()
    shared = config.data.cache_shared
    leaders = [r for r in range(ranks.world) if ranks.hosts.index(ranks.hosts[r]) == r]
    writers = [0] if shared else leaders
    seen = _shared_file(ranks, folder, writers, scratch, "data.cache_dir", "choose another data.cache_dir")
    errors = [(r, report["error"]) for r, report in enumerate(seen) if report["error"]]
    for rank, error in errors:
        table.add("cache_dir", ranks.where(rank), FAIL, error)
    if errors:
        return
    expected = {r: (0 if shared else ranks.hosts.index(ranks.hosts[r])) for r in range(ranks.world)}
    blind = [r for r in range(ranks.world) if expected[r] not in seen[r]["sees"]]
    if blind:
        rule = ("true every node must see one folder (a shared file system); set data.cache_shared=false for "
                "node-local folders" if shared else "false each host's ranks must see its own folder")
        table.add("cache_dir", "shared", FAIL,
                  f"{_ranks_text(blind, ranks.hosts)} do not see the file {ranks.where(expected[blind[0]])} wrote "
                  f"into its data.cache_dir={str(folder)!r}: with data.cache_shared={rule}")
        return
    if not shared and any(len(seen[r]["sees"]) > 1 for r in leaders):
        table.add("cache_dir", "shared", WARN, f"data.cache_dir={str(folder)!r} is one folder seen by "
                  f"{len(leaders)} hosts but data.cache_shared=false, so each host would prepare into it at once: "
                  "set data.cache_shared=true")
        return
    table.add("cache_dir", "shared" if shared else "per host", OK,
              f"{str(folder)!r}: " + (f"one folder on every host ({len(leaders)})" if shared
                                     else f"each of {len(leaders)} host{'s' if len(leaders) > 1 else ''} has its own"))


# ------------------------------------------------------------------------------------------------ training


def tiny_layout_config(tiny_path: str | Path, config: Config, world_size: int, folder: Path, steps: int) -> Config:
    """The tiny config in `config`'s layout (parallel.*) over `world_size` processes, fp32, `steps` steps, its data
    and output in `folder`. Its widths become multiples of parallel.tp and its depth covers parallel.pp; its
    batch, a multiple of the data-parallel size."""
    tiny = load_config(tiny_path)
    parallel, model = config.parallel, tiny.model
    tp, pp = parallel.tp, parallel.pp
    dp = data_parallel_size(world_size, tp, pp)
    heads = math.lcm(model.num_heads, tp)
    hidden = -(-model.hidden_size // (2 * heads)) * 2 * heads  # an even head dimension
    raw = tiny.to_dict()
    raw["model"].update(num_heads=heads, hidden_size=hidden, num_layers=max(model.num_layers, pp),
                        intermediate_size=-(-model.intermediate_size // tp) * tp,
                        vocab_size=-(-model.vocab_size // tp) * tp, init_from=None, kernels="auto")
    raw["data"].update(cache_dir=str(folder / "data"), cache_shared=True, num_proc=1)
    raw["train"].update(steps=steps, micro_batch_size=2, global_batch_size=2 * dp * max(1, -(-4 // dp)),
                        precision="fp32", out_dir=str(folder / "layout"), resume="none", eval_sequences=0,
                        eval_every=0, save_every=0, layer_grad_norm_every=0, log_every=1, tensorboard=False,
                        wandb=False, progress_bar=False, compile=False, stop_after_step=0)
    raw["parallel"] = {**parallel.__dict__}
    if parallel.pipeline_boundaries() is not None:  # boundaries of the real model do not fit the tiny one
        raw["parallel"]["pipeline_partition"] = "parameters"
    return config_from_dict(raw, source=str(tiny_path))


def reference_config(layout: Config, folder: Path) -> Config:
    raw = layout.to_dict()
    raw["parallel"] = {"startup_timeout_minutes": layout.parallel.startup_timeout_minutes}
    raw["train"]["out_dir"] = str(folder / "reference")
    return config_from_dict(raw)


def _quiet_training(tiny: Config) -> dict:
    """train(tiny) with its console lines kept aside: {"losses", "grad_norms"} or {"error", "log"}."""
    from megatron_mixln.train.loop import train

    log = io.StringIO()
    deepspeed_logger = logging.getLogger("DeepSpeed")
    level = deepspeed_logger.level
    deepspeed_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(log):
            result = train(tiny)
        return {"losses": result.losses, "grad_norms": result.grad_norms}
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}", "log": log.getvalue()[-2000:]}
    finally:
        deepspeed_logger.setLevel(level)


def compare_runs(layout: dict, reference: dict) -> tuple[float, str | None]:
    """(worst relative difference over every step's loss and gradient norm, what differs or None)."""
    worst = 0.0
    for key, name in (("losses", "loss"), ("grad_norms", "gradient norm")):
        a, b = {int(k): v for k, v in layout[key].items()}, {int(k): v for k, v in reference[key].items()}
        if a.keys() != b.keys():
            return math.inf, f"{name} of steps {sorted(a)} vs the reference's {sorted(b)}"
        for step in a:
            if not (math.isfinite(a[step]) and math.isfinite(b[step])):
                return math.inf, f"step {step}: {name} {a[step]} vs {b[step]}"
            worst = max(worst, abs(a[step] - b[step]) / max(abs(b[step]), 1e-30))
    return worst, None


def _reference_process(config: Config, folder: Path) -> subprocess.Popen:
    """This module's reference mode in a new process of world size 1 (on rank 0's device)."""
    path = folder / "reference.json"
    path.write_text(json.dumps(config.to_dict()))
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", OMP_NUM_THREADS=
               os.environ.get("OMP_NUM_THREADS", "1"))
    for name in ("LOCAL_SIZE", "CROSS_RANK", "TORCHELASTIC_USE_AGENT_STORE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "-m", "megatron_mixln.preflight", "--reference", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def check_training(ranks: Ranks, table: Table, config: Config, folder: Path | None, devices_ok: bool,
                   tiny_path: str, steps: int) -> None:
    """A few steps of the tiny config in the launched layout, against the same steps in one process."""
    if not devices_ok or folder is None:
        table.add("training", "all", FAIL, "skipped: needs every rank's device and a writable, shared "
                                           "train.out_dir (see the rows above)")
        return
    from megatron_mixln.data import prepare_dataset, train_limits

    tiny = tiny_layout_config(tiny_path, config, ranks.world, folder, steps)
    p, dp = tiny.parallel, data_parallel_size(ranks.world, tiny.parallel.tp, tiny.parallel.pp)
    layout = f"tp {p.tp} x pp {p.pp} x dp {dp}, ZeRO-{p.zero_stage}"
    reference, problem = None, None
    if ranks.rank == 0:  # prepared once, before either run reads it
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                prepare_dataset(tiny.data, progress=False, limits=train_limits(tiny), num_proc=1)
        except Exception as err:
            problem = f"preparing its data in {folder / 'data'} failed: {type(err).__name__}: {err}"
        if problem is None and ranks.world > 1:
            reference = _reference_process(reference_config(tiny, folder), folder)
    problem = ranks.gather(problem)[0]
    if problem is not None:
        table.add("training", "world", FAIL, problem)
        return
    ours = _quiet_training(tiny)
    if ranks.rank != 0:
        ranks.gather(None)
        return
    theirs = ours
    if reference is not None:
        try:
            log, _ = reference.communicate(timeout=config.parallel.startup_timeout_minutes * 60)
        except subprocess.TimeoutExpired:
            reference.kill()
            log = f"no result within parallel.startup_timeout_minutes={config.parallel.startup_timeout_minutes:g}"
        path = folder / "reference.json.result"
        theirs = json.loads(path.read_text()) if path.is_file() else {"error": "no result", "log": log[-2000:]}
    failed = ours if "error" in ours else theirs if "error" in theirs else None
    ranks.gather(None)
    run = f"{steps} steps of {Path(tiny_path).name} ({layout}, fp32)"
    if failed is not None:
        which = "in the launched layout" if failed is ours else "in one process (the reference)"
        last = [line for line in failed.get("log", "").splitlines() if line.strip()][-1:]
        table.add("training", "world", FAIL, f"{run} failed {which}: {failed['error']}"
                  + (f" (last line: {last[0]})" if last else ""))
        return
    losses = " ".join(f"{ours['losses'][k]:.4f}" for k in sorted(ours["losses"]))
    if ranks.world == 1:
        worst, problem = compare_runs(ours, ours)
        table.add("training", "world", FAIL if problem else OK,
                  f"{run}: losses {losses} (1 rank: this run is the single-process reference)"
                  + (f"; {problem}" if problem else ""))
        return
    worst, problem = compare_runs(ours, theirs)
    if problem or worst > TRAIN_TOLERANCE:
        table.add("training", "world", FAIL, f"{run} differs from one process: {problem or ''}"
                  f"{'' if problem else f'relative difference {worst:.2g} > {TRAIN_TOLERANCE:g}'}; losses {losses}")
    else:
        table.add("training", "world", OK, f"{run} match one process: losses {losses}, worst relative "
                                           f"difference {worst:.2g} (tolerance {TRAIN_TOLERANCE:g})")


def _reference_main(path: str) -> int:
    """Train the reference config at `path` in this process; its result next to it, as JSON."""
    result = _quiet_training(config_from_dict(json.loads(Path(path).read_text())))
    if "error" in result:
        print(result["log"] + result["error"])
    Path(path + ".result").write_text(json.dumps(result))
    from megatron_mixln.train.engine import leave_process_group

    leave_process_group()
    return 0


# ------------------------------------------------------------------------------------------------ the command


def run(config: Config, tiny: str, steps: int, message_mib: float | None, write_mib: float | None,
        min_busbw: float) -> int:
    """Every check, in order; the table on rank 0; 1 when a row says FAIL."""
    env = discover_launch_env()
    from megatron_mixln.train.engine import gradient_accumulation_steps

    # A layout or batch this launch cannot train: one line and exit 2 on every rank, as mixln-train would.
    gradient_accumulation_steps(config, data_parallel_size(env.world_size, config.parallel.tp, config.parallel.pp))
    if not Path(tiny).is_file():
        raise ConfigError(f"--tiny {tiny!r} does not exist: pass the tiny config (configs/tiny.yaml in the "
                          "repository).")
    gpu = torch.cuda.is_available()
    message_mib = message_mib or (256.0 if gpu else 16.0)
    write_mib = write_mib or (1024.0 if gpu else 64.0)
    ranks = Ranks(env, join_process_group(env, config.parallel.startup_timeout_minutes))
    table = Table(show=ranks.rank == 0)
    scratch = Scratch()
    try:
        good = check_devices(ranks, table)
        device_ok, devices_ok = good[ranks.rank], all(good)
        check_bandwidth(ranks, table, devices_ok, message_mib, min_busbw)
        check_kernels(ranks, table, device_ok)
        folder = check_out_dir(ranks, table, config, scratch, write_mib)
        check_cache_dir(ranks, table, config, scratch)
        check_training(ranks, table, config, folder, devices_ok, tiny, steps)
    except BaseException:
        scratch.clean()  # no barrier: the other ranks may be anywhere
        raise
    ranks.barrier()  # every rank is done with the scratch folder
    scratch.clean()
    failed, warned = table.count(FAIL), table.count(WARN)
    if ranks.rank == 0:
        print(f"preflight: {table.count(OK)} ok, {warned} WARN, {failed} FAIL over {ranks.world} "
              f"rank{'s' if ranks.world > 1 else ''} on {len(set(ranks.hosts))} host"
              f"{'s' if len(set(ranks.hosts)) > 1 else ''}" + (": not ready" if failed else ": ready"), flush=True)
    return 1 if ranks.gather(failed)[0] else 0


if __name__ == "__main__" and sys.argv[1:2] == ["--reference"]:
    sys.exit(_reference_main(sys.argv[2]))
