"""A real one-node SLURM on localhost for the tests (tests/test_slurm.py): Debian's `slurm-wlm`, installed with
apt-get when `sbatch` is missing and this process may (root, apt-get present), then one `slurmctld` and one
`slurmd` with every state, spool, log and pid file in a temporary folder and their own free ports, so two test
sessions on one machine do not meet. No munge and no cgroups: `auth/none`, `cred/none`, `proctrack/linuxproc`,
`task/none`, all as root. Where it cannot be had, `slurm_cluster` skips with the reason.

By hand (e.g. to try a template): `python tests/slurm_cluster.py FOLDER` starts one, prints the SLURM_CONF to
export and stops it on Ctrl-C.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

PARTITION = "debug"
PACKAGES = ("slurm-wlm",)


# What launchers set for their processes (torchrun, the deepspeed launcher, megatron_mixln's apply_launch_env).
LAUNCH_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE"}


@dataclass
class Cluster:
    folder: Path
    conf: Path
    node: str
    cpus: int
    daemons: dict[str, subprocess.Popen]
    install_seconds: float | None = None  # how long apt-get took, when this session installed slurm-wlm

    @property
    def env(self) -> dict[str, str]:
        """os.environ for SLURM's client commands: this cluster's config, no SLURM_* of an enclosing job and no
        rank variables (an in-process train() earlier in the test session exports RANK=0, WORLD_SIZE=1, ...,
        which a job would inherit through sbatch's --export=ALL and take as its own launch)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "TORCHELASTIC_", "MIXLN_TEST_"))
               and k not in LAUNCH_VARIABLES}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def scontrol(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def job(self, job_id: str | int) -> dict[str, str]:
        """`scontrol show job` as a dict (works without accounting; finished jobs stay for MinJobAge)."""
        text = self.scontrol("show", "job", "--oneliner", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", text.splitlines()[0]))

    def logs(self) -> str:
        return "".join(f"--- {name}.log\n" + (self.folder / f"{name}.log").read_text()[-3000:]
                       for name in ("slurmctld", "slurmd") if (self.folder / f"{name}.log").is_file())


def install_reason() -> tuple[str | None, float | None]:
    """(why SLURM cannot be had here or None, seconds apt-get took or None): installs slurm-wlm when missing."""
    if all(shutil.which(tool) for tool in ("sbatch", "slurmctld", "slurmd")):
        return None, None
    if os.geteuid() != 0:
        return "SLURM is not installed and this is not root: apt-get install slurm-wlm, or run as root", None
    if shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install slurm-wlm with", None
    started = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
            return f"installing slurm-wlm failed ({' '.join(command)}: {last[0]})", None
    return None, time.monotonic() - started


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def node_name() -> str:
    """The node is named as the host: the templates take MASTER_ADDR from the node list, so it must resolve."""
    host = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(host)
        return host
    except OSError:
        return "localhost"


def write_config(folder: Path, cpus: int, node: str) -> Path:
    host = socket.gethostname().split(".")[0]  # slurmctld refuses to start on a host SlurmctldHost does not name
    ctld_port, slurmd_port = _free_ports(2)
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(f"""\
ClusterName=mixlntest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=5
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Test pending jobs every second (defaults: 60 and 30 s), so that a requeued job starts once cred_expire is over.
SchedulerParameters=sched_interval=1,bf_interval=1
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldPidFile={folder / "slurmctld.pid"}
SlurmdPidFile={folder / "slurmd.pid"}
SlurmctldLogFile={folder / "slurmctld.log"}
SlurmdLogFile={folder / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
ReturnToService=2
JobRequeue=1
# Finished jobs stay visible to `scontrol show job` (there is no accounting database) for the whole session.
MinJobAge=86400
# The time between SIGTERM and SIGKILL when a job is cancelled, preempted or out of time: enough to save.
KillWait=60
InactiveLimit=0
PropagateResourceLimits=NONE
NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _wait_until(condition, timeout: float, what: str, cluster: Cluster | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} within {timeout:.0f} s" + (f"\n{cluster.logs()}" if cluster else ""))


def start(folder: Path, cpus: int | None = None) -> Cluster:
    """Start slurmctld and slurmd (foreground daemons, children of this process) and wait for the node to idle."""
    cpus = cpus or os.cpu_count() or 1
    folder.mkdir(parents=True, exist_ok=True)
    node = node_name()
    conf = write_config(folder, cpus, node)
    cluster = Cluster(folder, conf, node, cpus, {})
    env = cluster.env
    # -D: stay in the foreground, so the PID is the daemon's own and stopping it needs no pid-file reading.
    # -i: ignore state left by an earlier cluster in this folder.
    commands = {"slurmctld": ["slurmctld", "-D", "-i", "-f", str(conf)],
                "slurmd": ["slurmd", "-D", "-f", str(conf), "-N", node]}
    try:
        for name, command in commands.items():
            log = open(folder / f"{name}.stdout", "w")
            cluster.daemons[name] = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                     stdin=subprocess.DEVNULL, start_new_session=True)
            if name == "slurmctld":
                _wait_until(lambda: cluster.scontrol("ping", check=False).count("UP") > 0
                            or cluster.daemons[name].poll() is not None, 60, "slurmctld did not answer", cluster)

        def node_idle() -> bool:
            for name, daemon in cluster.daemons.items():
                if daemon.poll() is not None:
                    raise RuntimeError(f"{name} exited with {daemon.returncode}\n{cluster.logs()}")
            return "State=IDLE" in cluster.scontrol("show", "node", node, check=False)

        _wait_until(node_idle, 60, f"node {node} did not become idle", cluster)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def stop(cluster: Cluster) -> None:
    """Kill whatever jobs are left (a failed test's), then stop the daemons by PID: SIGTERM, SIGKILL after 20 s."""
    if cluster.daemons.get("slurmctld") is not None and cluster.daemons["slurmctld"].poll() is None:
        # Every process of every job, batch shells included, so that no training outlives the cluster.
        subprocess.run(["scancel", f"--partition={PARTITION}", "--signal=KILL", "--full"], env=cluster.env,
                       capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and subprocess.run(
                ["squeue", "--noheader", "--states=RUNNING,COMPLETING"], env=cluster.env, capture_output=True,
                text=True, timeout=60).stdout.strip():
            time.sleep(0.5)
        subprocess.run(["scancel", f"--partition={PARTITION}"], env=cluster.env, capture_output=True, timeout=60)
    for name in ("slurmd", "slurmctld"):
        daemon = cluster.daemons.get(name)
        if daemon is None or daemon.poll() is not None:
            continue
        daemon.terminate()
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=20)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node SLURM for this session (skips with the reason where it cannot be installed)."""
    reason, seconds = install_reason()
    if reason:
        pytest.skip(reason)
    if seconds is not None:
        print(f"installed slurm-wlm with apt-get in {seconds:.0f} s", file=sys.stderr)
    cluster = start(tmp_path_factory.mktemp("slurm"))
    cluster.install_seconds = seconds
    try:
        yield cluster
    finally:
        stop(cluster)


if __name__ == "__main__":
    reason, _ = install_reason()
    if reason:
        sys.exit(reason)
    running = start(Path(sys.argv[1]).resolve())
    print(f"export SLURM_CONF={running.conf}   # Ctrl-C stops the cluster", flush=True)
    try:
        while all(d.poll() is None for d in running.daemons.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop(running)
