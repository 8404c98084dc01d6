"""Rank discovery for every launcher: torchrun, the deepspeed launcher, srun (SLURM variables), mpirun (mpi4py).

`apply_launch_env(discover_launch_env())` leaves RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in
os.environ, so torch.distributed / deepspeed.init_distributed start the same way whoever launched the process;
`wait_for_ranks` first meets every rank there, saying who is missing, within a bounded time.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

# Markers of an MPI launcher: Open MPI, MPICH / Intel MPI (hydra), PMIx (Open MPI 5, prrte), MVAPICH.
MPI_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_SIZE")
# srun without MASTER_PORT: a port derived from the job id, below Linux's ephemeral range (32768-60999).
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000
# While ranks wait for each other: the first "waiting for" line after this many seconds (or half the timeout),
# then one every WAIT_LINE_EVERY_S; the store is asked every WAIT_POLL_S.
FIRST_WAIT_LINE_S, WAIT_LINE_EVERY_S, WAIT_POLL_S = 5.0, 30.0, 0.2
# A rank preparing its data beats this often (or 4 times per startup timeout, if shorter).
HEARTBEAT_S = 5.0
READY = "ready"  # a rank's beat once its data is prepared
_RENDEZVOUS = "mixln_rendezvous"  # key prefix in rank 0's store
_rendezvous_server = None  # rank 0's store server, kept for the process's life: torch's env:// store shares it
_met = None  # (MASTER_ADDR, MASTER_PORT) once this process has met every rank there
# Meetings so far per (MASTER_ADDR, MASTER_PORT, rank): every rank meets the others equally often (once per run it
# trains), and the n-th meeting has its own keys.
_meetings: dict[tuple[str, int, int], int] = {}
T = TypeVar("T")


class LaunchError(ValueError):
    """A launch environment a user can fix; the message is one sentence naming the variable(s) and what is valid."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "deepspeed" | "slurm" | "mpi" | "single"
    local_world_size: int | None = None  # processes on this node, when the launcher says


def discover_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Who this process is: from RANK/WORLD_SIZE (torchrun, deepspeed), else srun's SLURM_*, else MPI, else alone."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return _from_torch_variables(env)
    if _is_srun_task(env):
        return _from_slurm(env)
    if any(name in env for name in MPI_VARIABLES):
        return _from_mpi(env)
    return LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                     master_port=_port(env) or free_port(), launcher="single", local_world_size=1)


def apply_launch_env(env: LaunchEnv) -> None:
    """Export `env` as the variables torch.distributed's env:// rendezvous and DeepSpeed read."""
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    if env.local_world_size is not None:
        # LOCAL_SIZE is the deepspeed launcher's name for it (DeepSpeed's CPU accelerator counts devices by it).
        os.environ.update(LOCAL_WORLD_SIZE=str(env.local_world_size), LOCAL_SIZE=str(env.local_world_size))


def wait_for_ranks(env: LaunchEnv, timeout_minutes: float, say=print) -> None:
    """Meet every rank at MASTER_ADDR:MASTER_PORT before torch.distributed starts, or raise one LaunchError.

    Rank 0 opens the store there (torch's env:// rendezvous then shares it: multi_tenant) and a port taken by
    another process is said at once; every rank waits at most `timeout_minutes` (parallel.startup_timeout_minutes)
    for the others, printing how many are missing, instead of torch's silent wait. Under torchrun the agent
    already holds the store on MASTER_PORT and has started every rank. A process that has already met the others
    (`meet_ranks`) returns at once.
    """
    if env.world_size > 1 and _met != (env.master_addr, env.master_port):
        _join(env, timeout_minutes, say)


def meet_ranks(env: LaunchEnv, timeout_minutes: float, prepare: Callable[[], T], say=print) -> T:
    """Start-up with data: meet every rank (as `wait_for_ranks`), run `prepare()` (this rank's data), then wait
    until every rank has prepared its own; returns what `prepare` returned.

    Preparing ranks beat in the store every few seconds, so the wait for another rank's data is bounded by the data,
    not by a constant: it lasts as long as that rank keeps beating (a node rebuilding its node-local cache for an
    hour beside one whose cache exists), and a rank that stops beating for `timeout_minutes` (killed, hung
    outside Python) or fails (its error, in one sentence) ends every rank with one LaunchError.
    """
    import torch.distributed as dist

    if env.world_size == 1:
        return prepare()
    store, keys = _join(env, timeout_minutes, say)
    seconds = timeout_minutes * 60
    try:
        with _Heartbeat(store.clone(), keys.beat(env.rank), min(HEARTBEAT_S, seconds / 4)):
            result = prepare()
    except BaseException as err:
        with contextlib.suppress(Exception):  # the others stop with this rank's reason instead of a timeout
            store.set(keys.failed(env.rank), _one_line(err))
            store.add(keys.failed_count, 1)
        raise
    try:
        store.set(keys.beat(env.rank), READY)
        store.add(keys.ready_count, 1)
        _wait_until_prepared(env, store, keys, seconds, _WaitLines(say, time.monotonic(), seconds))
    except dist.DistError:
        raise _lost_rank_0(env) from None
    return result


def _join(env: LaunchEnv, timeout_minutes: float, say):
    """Every rank announces itself in the store, then waits (bounded) until all have: (store, keys)."""
    global _rendezvous_server, _met
    import torch.distributed as dist

    where, seconds = f"{env.master_addr}:{env.master_port}", timeout_minutes * 60
    limit = f"parallel.startup_timeout_minutes={timeout_minutes:g} ({seconds:g} s)"
    started = time.monotonic()
    clock = _WaitLines(say, started, seconds)
    meeting = (env.master_addr, env.master_port, env.rank)
    _meetings[meeting] = _meetings.get(meeting, -1) + 1
    keys = _Keys.for_this_launch(_meetings[meeting])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if env.rank == 0 and not agent_store:
        _rendezvous_server = store = _open_store(env, seconds)
    else:
        _wait_until_listening(env, started + seconds, clock, limit)
    try:
        if env.rank != 0 or agent_store:
            store = dist.TCPStore(env.master_addr, env.master_port, is_master=False,
                                  timeout=timedelta(seconds=max(1.0, started + seconds - time.monotonic())))
        store.set(keys.beat(env.rank), "0")
        store.add(keys.joined_count, 1)
        while (joined := store.add(keys.joined_count, 0)) < env.world_size:
            if time.monotonic() >= started + seconds:
                missing = [rank for rank in range(env.world_size) if not store.check([keys.beat(rank)])]
                raise LaunchError(
                    f"{_ranks(missing)} of WORLD_SIZE={env.world_size} did not reach {where} within {limit}: start "
                    "every rank with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE, or raise "
                    "parallel.startup_timeout_minutes.")
            if env.rank == 0:  # one line for the job, from the rank that holds the store
                clock.maybe_say(f"waiting for {env.world_size - joined} of {env.world_size} ranks at {where}")
            time.sleep(WAIT_POLL_S)
        # From here on, how long the others take is bounded by their heartbeats; the store timeout only covers
        # one request.
        store.set_timeout(timedelta(seconds=max(60.0, seconds)))
    except dist.DistError:  # rank 0 went away, or another process answers on its port (rank 0 says which)
        raise _lost_rank_0(env) from None
    _met = (env.master_addr, env.master_port)
    return store, keys


def _wait_until_prepared(env: LaunchEnv, store, keys: _Keys, seconds: float, clock: _WaitLines) -> None:
    """Until every rank has said READY; raises the first failed rank's error, or names ranks whose heartbeat
    stopped for `seconds`. Heartbeats are read every few seconds only (world_size keys per read)."""
    last_beat: dict[int, tuple[bytes, float]] = {}  # rank -> (its last beat seen, when it changed)
    next_look = 0.0
    while store.add(keys.ready_count, 0) < env.world_size:
        if store.add(keys.failed_count, 0) > 0:
            failed = next(rank for rank in range(env.world_size) if store.check([keys.failed(rank)]))
            raise LaunchError(f"rank {failed} could not prepare its data, so no rank can start: "
                              f"{store.get(keys.failed(failed)).decode()}")
        now = time.monotonic()
        if now >= next_look:
            beats = store.multi_get([keys.beat(rank) for rank in range(env.world_size)])
            preparing = [rank for rank, beat in enumerate(beats) if beat != READY.encode()]
            for rank in preparing:
                if last_beat.get(rank, (None,))[0] != beats[rank]:
                    last_beat[rank] = (beats[rank], now)
            silent = [rank for rank in preparing if now - last_beat[rank][1] >= seconds]
            if silent:
                raise LaunchError(
                    f"{_ranks(silent)} stopped reporting while preparing data (no heartbeat for "
                    f"parallel.startup_timeout_minutes={seconds / 60:g}, {seconds:g} s): see that rank's log (killed, "
                    "out of memory, or hung), then launch every rank again.")
            if env.rank == 0:
                clock.maybe_say(f"waiting for {_ranks(preparing)} of {env.world_size} to prepare their data")
            next_look = now + min(HEARTBEAT_S, seconds / 4)
        time.sleep(WAIT_POLL_S)


class _Keys:
    """This meeting's keys in rank 0's store. Under torchrun the agent's store outlives a restart of the workers,
    so the keys carry the run id and the restart count; a process that trains several runs one after another
    meets the others once per run, so they carry the meeting's number too."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.joined_count, self.ready_count, self.failed_count = (f"{prefix}/{name}" for name in
                                                                  ("joined", "ready", "failed"))

    @classmethod
    def for_this_launch(cls, meeting: int) -> _Keys:
        run = os.environ.get("TORCHELASTIC_RUN_ID", "")
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "")
        return cls(f"{_RENDEZVOUS}/{run}/{restart}/{meeting}")

    def beat(self, rank: int) -> str:
        return f"{self.prefix}/beat/rank{rank}"

    def failed(self, rank: int) -> str:
        return f"{self.prefix}/failed/rank{rank}"


class _Heartbeat:
    """While its `with` block runs, a daemon thread counts up `key` every `interval` seconds on its own client
    (a TCPStore client is not shared between threads)."""

    def __init__(self, store, key: str, interval: float):
        self.store, self.key, self.interval = store, key, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mixln-heartbeat", daemon=True)

    def _run(self) -> None:
        beats = itertools.count(1)
        while not self.stop.wait(self.interval):
            try:
                self.store.set(self.key, str(next(beats)))
            except Exception:  # noqa: BLE001  rank 0 gone: the main thread finds out when it next asks
                return

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if not isinstance(err, ValueError) or not text:  # our user errors are one sentence already; others get a name
        text = f"{type(err).__name__}{': ' + text if text else ''}"
    return text[:500]


def _lost_rank_0(env: LaunchEnv) -> LaunchError:
    return LaunchError(f"lost rank 0's store at {env.master_addr}:{env.master_port} while the ranks were starting: "
                       "see rank 0's error, then launch every rank again.")


def _ranks(ranks: list[int], shown: int = 8) -> str:
    """"rank 1", "ranks 1, 3", or the first `shown` "and N more"."""
    more = f" and {len(ranks) - shown} more" if len(ranks) > shown else ""
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks[:shown]))}{more}"


class _WaitLines:
    """Says a waiting line no earlier than FIRST_WAIT_LINE_S (or half the timeout) in, then every WAIT_LINE_EVERY_S."""

    def __init__(self, say, started: float, seconds: float):
        self.say, self.seconds, self.next = say, seconds, started + min(FIRST_WAIT_LINE_S, seconds / 2)

    def maybe_say(self, line: str) -> None:
        if time.monotonic() >= self.next:
            # Flushed: a job log is a file, and a waiting process writes nothing else.
            self.say(f"{line} (timeout {self.seconds:g} s)", flush=True)
            self.next = time.monotonic() + WAIT_LINE_EVERY_S


def _open_store(env: LaunchEnv, seconds: float):
    """Rank 0's TCPStore server on MASTER_PORT, or a LaunchError when another process already listens there."""
    import torch.distributed as dist

    try:
        return dist.TCPStore(env.master_addr, env.master_port, world_size=env.world_size, is_master=True,
                             wait_for_workers=False, multi_tenant=True, timeout=timedelta(seconds=seconds))
    except dist.DistNetworkError:
        if _can_listen(env.master_port):
            raise
    raise LaunchError(f"MASTER_PORT={env.master_port} is already in use on {socket.gethostname()}, where rank 0 "
                      "must open the rendezvous: give every rank another free MASTER_PORT, or stop the process that "
                      "holds it.")


def _can_listen(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def _wait_until_listening(env: LaunchEnv, deadline: float, clock: _WaitLines, limit: str) -> None:
    """Until rank 0's store accepts connections, with a plain socket: torch's client logs a stack per retry."""
    while True:
        try:
            with socket.create_connection((env.master_addr, env.master_port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise LaunchError(f"rank 0 did not open {env.master_addr}:{env.master_port} within {limit}: start rank 0 "
                              "with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE, check that this host reaches "
                              "it, or raise parallel.startup_timeout_minutes.")
        clock.maybe_say(f"waiting for rank 0 at {env.master_addr}:{env.master_port}")
        time.sleep(WAIT_POLL_S)


def data_parallel_size(world_size: int, tp: int, pp: int) -> int:
    """dp = world_size / (tp * pp), or a LaunchError naming all three numbers when it does not divide."""
    if world_size < 1 or tp < 1 or pp < 1:
        raise LaunchError(f"world size {world_size}, parallel.tp={tp} and parallel.pp={pp} are invalid: "
                          "expected positive integers.")
    if world_size % (tp * pp):
        raise LaunchError(
            f"world size {world_size} is not a multiple of parallel.tp x parallel.pp = {tp} x {pp} = {tp * pp}: "
            f"launch a multiple of {tp * pp} processes (e.g. {tp * pp * max(1, world_size // (tp * pp))}) "
            "or change parallel.tp / parallel.pp.")
    return world_size // (tp * pp)


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list, e.g. "gpu[01-03,07],login-[1-2]-ib" -> gpu01 gpu02 gpu03 gpu07 login-1-ib ..."""
    item = r"(?:[^,\[\]]|\[[^\[\]]+\])+"  # text and [ranges], up to a comma outside brackets
    if not re.fullmatch(f"{item}(?:,{item})*", nodelist):
        raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r} is invalid: expected host names like node[01-03,07].")
    hosts = []
    for host in re.findall(item, nodelist):
        pieces = re.split(r"\[([^\]]*)\]", host)  # text, ranges, text, ranges, ..., text
        choices = [[text] if i % 2 == 0 else _expand_ranges(text, nodelist) for i, text in enumerate(pieces)]
        hosts.extend("".join(parts) for parts in itertools.product(*choices))
    return hosts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    names = []
    for part in ranges.split(","):
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()) or (dash and int(high) < int(low)):
            raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r} is invalid: [{ranges}] is not a list of numbers "
                              "and increasing ranges like 01-03,07.")
        width = len(low)  # node[08-10] keeps the zero padding of the lower bound
        names.extend(str(n).zfill(width) for n in range(int(low), int(high or low) + 1))
    return names


def _int(env: Mapping[str, str], name: str, default: int | None = None, minimum: int = 0) -> int:
    if name not in env:
        if default is None:
            raise LaunchError(f"{name} is not set: the launcher should set it.")
        return default
    try:
        value = int(env[name])
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise LaunchError(f"{name}={env[name]!r} is invalid: expected an integer >= {minimum}.")
    return value


def _port(env: Mapping[str, str]) -> int | None:
    if "MASTER_PORT" not in env:
        return None
    port = _int(env, "MASTER_PORT", minimum=1)
    if port > 65535:
        raise LaunchError(f"MASTER_PORT={env['MASTER_PORT']!r} is invalid: expected a TCP port in 1-65535.")
    return port


def _check_rank(rank_name: str, rank: int, world_name: str, world: int) -> None:
    if rank >= world:
        raise LaunchError(f"{rank_name}={rank} is invalid with {world_name}={world}: expected 0 <= {rank_name} < "
                          f"{world_name}.")


def _from_torch_variables(env: Mapping[str, str]) -> LaunchEnv:
    launcher = "deepspeed" if "CROSS_RANK" in env else "torchrun"  # the deepspeed launcher also sets CROSS_RANK
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if name not in env:
            present = [n for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if n in env]
            raise LaunchError(f"{name} is not set although {' and '.join(present)} "
                              f"{'is' if len(present) == 1 else 'are'}: launch with torchrun or deepspeed, which "
                              "set RANK, WORLD_SIZE and LOCAL_RANK, or set all three yourself.")
    rank, world, local = _int(env, "RANK"), _int(env, "WORLD_SIZE", minimum=1), _int(env, "LOCAL_RANK")
    _check_rank("RANK", rank, "WORLD_SIZE", world)
    _check_rank("LOCAL_RANK", local, "WORLD_SIZE", world)
    local_world = None
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if name in env:
            local_world = _int(env, name, minimum=1)
            _check_rank("LOCAL_RANK", local, name, local_world)
            break
    if world > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing:
            raise LaunchError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set with "
                              f"WORLD_SIZE={world}: set the rendezvous host and port of rank 0 (torchrun and deepspeed "
                              "set both).")
    return LaunchEnv(rank=rank, world_size=world, local_rank=local,
                     master_addr=env.get("MASTER_ADDR") or "127.0.0.1", master_port=_port(env) or free_port(),
                     launcher=launcher, local_world_size=local_world)


def _is_srun_task(env: Mapping[str, str]) -> bool:
    """Whether srun started this process as one task per rank.

    An sbatch script itself sees SLURM_PROCID=0 and SLURM_NTASKS=<tasks allocated> but no SLURM_STEP_ID (measured
    on Slurm 22.05): it is one process, not rank 0 of many. mpirun inside an allocation starts its daemons with
    srun, so its ranks inherit that step's SLURM_* too; then the MPI world size disagrees and MPI decides.
    """
    if "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return False
    mpi_size = next((env[name] for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE") if name in env),
                    None)
    return mpi_size is None or mpi_size == env.get("SLURM_NTASKS")


def _from_slurm(env: Mapping[str, str]) -> LaunchEnv:
    rank, world, local = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS", minimum=1), _int(env, "SLURM_LOCALID")
    _check_rank("SLURM_PROCID", rank, "SLURM_NTASKS", world)
    master_addr = env.get("MASTER_ADDR")
    if not master_addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise LaunchError("SLURM_JOB_NODELIST (or SLURM_NODELIST) is not set under srun: set MASTER_ADDR to the "
                              "first node's host name.")
        master_addr = expand_nodelist(nodelist)[0]
    port = _port(env)
    if port is None:
        # Every task must agree on the port without talking to each other: derive it from the job id.
        port = SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID", default=0) % SLURM_PORT_SPAN
    local_world = _tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE"),
                                 _int(env, "SLURM_NODEID", default=0))
    return LaunchEnv(rank=rank, world_size=world, local_rank=local, master_addr=master_addr, master_port=port,
                     launcher="slurm", local_world_size=local_world)


def _tasks_on_node(spec: str | None, node_id: int) -> int | None:
    """Tasks on node `node_id` from SLURM's "2(x3),1" form (3 nodes with 2 tasks, then one with 1)."""
    if not spec:
        return None
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_id] if node_id < len(counts) else None


def _from_mpi(env: Mapping[str, str]) -> LaunchEnv:
    try:
        from mpi4py import MPI
    except ImportError:
        found = ", ".join(name for name in MPI_VARIABLES if name in env)
        raise LaunchError(f"{found} {'is' if ',' not in found else 'are'} set (an MPI launcher) but mpi4py is not "
                          "installed: pip install 'megatron_mixln[mpi]', or launch with torchrun.") from None
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)  # the ranks sharing this node's memory
    local, local_world = node.Get_rank(), node.Get_size()
    node.Free()
    master_addr = env.get("MASTER_ADDR") or comm.bcast(socket.gethostname() if rank == 0 else None, root=0)
    # Rank 0 picks a port free on its own host; everyone else learns it from the broadcast.
    port = _port(env) or comm.bcast(free_port() if rank == 0 else None, root=0)
    return LaunchEnv(rank=rank, world_size=world, local_rank=local, master_addr=master_addr, master_port=port,
                     launcher="mpi", local_world_size=local_world)
