"""A real SLURM on this machine for the tests: Debian's `slurm-wlm`, installed with apt-get when `sbatch` is
missing and this process may (root, apt-get present), then one `slurmctld` and one `slurmd` per node with every
state, spool, log and pid file in a temporary folder and their own free ports, so two test sessions on one
machine do not meet. No munge and no cgroups: `auth/none`, `cred/none`, `proctrack/linuxproc`, `task/none`, all
as root. Where it cannot be had, the fixtures skip with the reason.

- `slurm_cluster` (tests/test_slurm.py): one node, this host, on 127.0.0.1.
- `slurm_hosts` (tests/test_slurm_two_nodes.py): several hosts emulated with network namespaces joined by a
  bridge. Each host has its own address on a private /24 that this machine does not use, its own host name
  (`unshare --uts`), its own /etc/hosts (`/etc/netns/NAME/hosts`, mounted over /etc/hosts as `ip netns exec` does),
  its own `slurmd`, and a node-local folder: `Cluster.local_dir` is one path that each host sees onto its own
  folder (a bind mount in that host's mount namespace). slurmctld runs in this machine's own namespace, on the
  bridge. Everything made for it (namespaces, veth pairs, the bridge, /etc/netns entries) is removed at the
  end, also when the start fails.

By hand (e.g. to try a template): `python tests/slurm_cluster.py FOLDER [NODES]` starts one, prints the
SLURM_CONF to export and stops it on Ctrl-C.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from training_runs import losses_of  # noqa: F401  (the SLURM tests import it from here too)

from training_runs import ROOT

PARTITION = "debug"
BIN = Path(sys.executable).parent
SLURM = ROOT / "slurm"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}
PACKAGES = ("slurm-wlm", "iproute2")  # iproute2: `ip`, for the emulated hosts (not in every minimal image)


# What launchers set for their processes (torchrun, the deepspeed launcher, megatron_mixln's apply_launch_env).
LAUNCH_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE"}


@dataclass
class Host:
    """One emulated host: a SLURM node in its own network namespace (netns None: this machine itself)."""
    node: str
    address: str
    netns: str | None = None
    veth: str | None = None  # this machine's end of the namespace's veth pair


@dataclass
class Network:
    """The namespaces, veth pairs, bridge and /etc/netns entries made for emulated hosts (remove_network undoes
    them); filled in as each is made, so that a start that fails half-way is undone too."""
    bridge: str
    gateway: str  # the bridge's address on this machine: slurmctld's
    hosts: list[Host]
    made: list[tuple[str, str]]  # ("bridge" | "veth" | "netns" | "etc", name), in the order made


@dataclass
class Cluster:
    folder: Path
    conf: Path
    hosts: list[Host]
    cpus: int
    daemons: dict[str, subprocess.Popen]
    install_seconds: float | None = None  # how long apt-get took, when this session installed slurm-wlm
    network: Network | None = None
    local_dir: Path | None = None  # a path every emulated host sees onto its own folder (node_local_dir)

    @property
    def node(self) -> str:
        return self.hosts[0].node

    @property
    def nodes(self) -> list[str]:
        return [host.node for host in self.hosts]

    def node_local_dir(self, node: str) -> Path:
        """Where `node`'s own folder behind `local_dir` lies, as this machine sees it."""
        return self.folder / "nodes" / node

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
        return "".join(f"--- {path.name}\n" + path.read_text()[-3000:]
                       for path in sorted(self.folder.glob("slurm*.log")))


def install_reason() -> tuple[str | None, float | None]:
    """(why SLURM cannot be had here or None, seconds apt-get took or None): installs slurm-wlm (and iproute2 for
    the emulated hosts) when missing."""
    if all(shutil.which(tool) for tool in ("sbatch", "slurmctld", "slurmd", "ip")):
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
            return f"installing {' and '.join(PACKAGES)} failed ({' '.join(command)}: {last[0]})", None
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


# --- emulated hosts: network namespaces on a bridge ---------------------------------------------------------------

SUBNET_PREFIX = "10.213"  # a private range; the /24 taken is one this machine has no address or route in
_networks_made = itertools.count()
ETC_NETNS = Path("/etc/netns")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def namespaces_reason() -> str | None:
    """Why emulated hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "nsenter", "unshare", "mount") if shutil.which(tool) is None]
    if missing:
        return f"network namespaces need {' and '.join(missing)}, missing here"
    return None


def _unused_subnet() -> str:
    """"10.213.N" such that no address or route of this machine lies in 10.213.N.0/24 (N from the pid on, so that
    two sessions at once take different ones)."""
    taken = _ip("-4", "-o", "addr", "show").stdout + _ip("-4", "route", "show", "table", "all").stdout
    for offset in range(254):
        subnet = f"{SUBNET_PREFIX}.{(os.getpid() + offset) % 254 + 1}"
        if f"{subnet}." not in taken:
            return subnet
    raise RuntimeError(f"every {SUBNET_PREFIX}.N.0/24 is in use on this machine")


def make_network(count: int) -> Network:
    """`count` hosts node1..nodeN, each in a namespace with a veth pair on one bridge. Names carry this process's
    id and a count of its networks (interface names: at most 15 characters)."""
    tag = f"{os.getpid()}x{next(_networks_made)}"
    subnet = _unused_subnet()
    network = Network(bridge=f"mxbr{tag}", gateway=f"{subnet}.1", hosts=[], made=[])
    try:
        _ip("link", "add", network.bridge, "type", "bridge")
        network.made.append(("bridge", network.bridge))
        _ip("addr", "add", f"{network.gateway}/24", "dev", network.bridge)
        _ip("link", "set", network.bridge, "up")
        hosts = [Host(f"node{i}", f"{subnet}.{10 + i}", f"mixln{tag}-node{i}", f"mxv{tag}n{i}")
                 for i in range(1, count + 1)]
        etc_hosts = "127.0.0.1 localhost\n" + "".join(f"{h.address} {h.node}\n" for h in hosts) + \
            f"{network.gateway} {socket.gethostname()}\n"
        for host in hosts:
            _ip("netns", "add", host.netns)
            network.made.append(("netns", host.netns))
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", f"{host.veth}p")
            network.made.append(("veth", host.veth))
            _ip("link", "set", f"{host.veth}p", "netns", host.netns)
            _ip("link", "set", host.veth, "master", network.bridge, "up")
            inside = ["netns", "exec", host.netns, "ip"]
            _ip(*inside, "addr", "add", f"{host.address}/24", "dev", f"{host.veth}p")
            _ip(*inside, "link", "set", f"{host.veth}p", "up")
            _ip(*inside, "link", "set", "lo", "up")
            if not ETC_NETNS.is_dir():
                ETC_NETNS.mkdir()
                network.made.append(("etc", str(ETC_NETNS)))  # removed when empty
            etc = ETC_NETNS / host.netns
            etc.mkdir()
            network.made.append(("etc", str(etc)))
            (etc / "hosts").write_text(etc_hosts)
            network.hosts.append(host)
    except BaseException:
        remove_network(network)
        raise
    return network


def remove_network(network: Network) -> None:
    """Remove what make_network made, newest first; whatever is already gone is skipped."""
    for kind, name in reversed(network.made):
        if name == str(ETC_NETNS):
            with contextlib.suppress(OSError):  # another network may use it
                os.rmdir(name)
        elif kind == "etc":
            shutil.rmtree(name, ignore_errors=True)
        elif kind == "netns":
            _ip("netns", "delete", name, check=False)
        else:  # a veth pair goes with either end; the bridge
            _ip("link", "delete", name, check=False)
    network.made.clear()


# --- the cluster --------------------------------------------------------------------------------------------------

def write_config(folder: Path, cpus: int, hosts: list[Host], controller: str) -> Path:
    """slurm.conf for slurmctld on this machine at address `controller` and one slurmd per host."""
    ctld_host = socket.gethostname().split(".")[0]  # slurmctld refuses to start on a host SlurmctldHost does not name
    ctld_port, slurmd_port = _free_ports(2)
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    # A host of its own (a namespace) is named by its node; the one-node cluster's node is this machine.
    nodes = "".join(f"NodeName={h.node} NodeHostname={h.node if h.netns else ctld_host} NodeAddr={h.address} "
                    f"CPUs={cpus} State=UNKNOWN\n" for h in hosts)
    conf = folder / "slurm.conf"
    conf.write_text(f"""\
ClusterName=mixlntest
SlurmctldHost={ctld_host}({controller})
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
SlurmdSpoolDir={folder / "spool" / "%n"}
SlurmctldPidFile={folder / "slurmctld.pid"}
SlurmdPidFile={folder / "slurmd-%n.pid"}
SlurmctldLogFile={folder / "slurmctld.log"}
SlurmdLogFile={folder / "slurmd-%n.log"}
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
{nodes}PartitionName={PARTITION} Nodes={",".join(h.node for h in hosts)} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _wait_until(condition, timeout: float, what: str, cluster: Cluster | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} within {timeout:.0f} s" + (f"\n{cluster.logs()}" if cluster else ""))


def _slurmd_command(cluster: Cluster, host: Host) -> list[str]:
    command = ["slurmd", "-D", "-f", str(cluster.conf), "-N", host.node]
    (cluster.folder / "spool" / host.node).mkdir(parents=True, exist_ok=True)
    if host.netns is None:
        return command
    # In the host's network namespace, with its own host name, /etc/hosts and folder at local_dir, in a mount
    # namespace of its own; every step inherits all of it. Not `ip netns exec`, which would also mount a new
    # /sys without the cgroup tree that slurmd needs; it mounts /etc/netns/NAME/hosts over /etc/hosts as here.
    own = cluster.node_local_dir(host.node)
    own.mkdir(parents=True, exist_ok=True)
    setup = (f"hostname {host.node} && mount --bind /etc/netns/{host.netns}/hosts /etc/hosts && "
             f'mount --bind {own} {cluster.local_dir} && exec "$@"')
    return ["nsenter", f"--net=/run/netns/{host.netns}", "unshare", "--uts", "--mount", "--propagation", "slave",
            "sh", "-c", setup, "sh", *command]


def start(folder: Path, cpus: int | None = None, nodes: int = 1) -> Cluster:
    """Start slurmctld and the slurmd of each node (foreground daemons, children of this process) and wait for
    every node to idle. nodes=1: this host on 127.0.0.1; more: emulated hosts (make_network)."""
    cpus = cpus or os.cpu_count() or 1
    folder.mkdir(parents=True, exist_ok=True)
    network = make_network(nodes) if nodes > 1 else None
    try:
        hosts = network.hosts if network else [Host(node_name(), "127.0.0.1")]
        conf = write_config(folder, cpus, hosts, network.gateway if network else "127.0.0.1")
        cluster = Cluster(folder, conf, hosts, cpus, {}, network=network,
                          local_dir=folder / "node-local" if network else None)
        if cluster.local_dir:
            cluster.local_dir.mkdir()
    except BaseException:
        if network:
            remove_network(network)
        raise
    env = cluster.env
    # -D: stay in the foreground, so the PID is the daemon's own and stopping it needs no pid-file reading.
    # -i: ignore state left by an earlier cluster in this folder.
    commands = {"slurmctld": ["slurmctld", "-D", "-i", "-f", str(conf)]}
    commands.update({f"slurmd-{host.node}": _slurmd_command(cluster, host) for host in hosts})
    try:
        for name, command in commands.items():
            log = open(folder / f"{name}.stdout", "w")
            cluster.daemons[name] = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                     stdin=subprocess.DEVNULL, start_new_session=True)
            if name == "slurmctld":
                _wait_until(lambda: cluster.scontrol("ping", check=False).count("UP") > 0
                            or cluster.daemons[name].poll() is not None, 60, "slurmctld did not answer", cluster)

        def nodes_idle() -> bool:
            for name, daemon in cluster.daemons.items():
                if daemon.poll() is not None:
                    raise RuntimeError(f"{name} exited with {daemon.returncode}\n{cluster.logs()}")
            states = re.findall(r"State=(\S+)", cluster.scontrol("show", "node", check=False))
            return len(states) == len(hosts) and all(state == "IDLE" for state in states)

        _wait_until(nodes_idle, 60, f"nodes {', '.join(cluster.nodes)} did not become idle", cluster)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def stop(cluster: Cluster) -> None:
    """Kill whatever jobs are left (a failed test's), stop the daemons by PID (SIGTERM, SIGKILL after 20 s), then
    remove the emulated hosts' network."""
    try:
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
        for name in sorted(cluster.daemons, key=lambda name: name == "slurmctld"):  # the slurmds first
            daemon = cluster.daemons[name]
            if daemon.poll() is not None:
                continue
            daemon.terminate()
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=20)
    finally:
        if cluster.network:
            remove_network(cluster.network)


# --- jobs --------------------------------------------------------------------------------------------------------

def submit(cluster: Cluster, template: str, args: list[str], out: Path, *options: str, processes: int = 2,
           nodes: int = 1, **env: str) -> str:
    """sbatch a template from the repository folder (as a user does) on this cluster; returns the job id.

    The template's GPU node settings are overridden for CPU processes: `nodes` nodes with `processes` processes
    each, no GPU, one core a task.
    """
    layout = [f"--ntasks-per-node={processes}"] if template == "srun" else []
    command = ["sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", "--cpus-per-task=1", *layout,
               f"--partition={PARTITION}", f"--output={out}", "--export=ALL", *options,
               str(SLURM / f"{template}.sbatch"), *args]
    environ = {**cluster.env, "VENV": str(BIN.parent), "GPUS_PER_NODE": str(processes), "OMP_NUM_THREADS": "1",
               "PYTHONWARNINGS": "ignore", "HOSTFILE": str(out.parent / f"hostfile-{out.stem}"), **env}
    proc = subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def wait_for(cluster: Cluster, job: str, timeout: float = 300, restarts: int = 0) -> list[dict[str, str]]:
    """Poll until every task of the job has ended after `restarts` requeues, or one requeued more often (for the
    caller to fail on). `sbatch --wait` would wait too, but it polls at 2, 4, 8, 16 and then 32 s, which added
    ~25 s to a 16 s job here."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = cluster.scontrol("show", "job", "--oneliner", job)
        tasks = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in text.splitlines() if line.strip()]
        if tasks and (all(t["JobState"] in FINAL_STATES and int(t["Restarts"]) >= restarts for t in tasks)
                      or any(int(t["Restarts"]) > restarts for t in tasks)):
            return tasks
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not end within {timeout} s:\n{text}\n{cluster.logs()}")


def one_node_run_folder(tmp_path_factory, template: str) -> Path:
    """Where tests/test_slurm.py trains the tiny run on one node (2 processes) under `template`, for this session:
    the two-node tests compare with it when the same session has made it."""
    return tmp_path_factory.getbasetemp() / "slurm-one-node-runs" / template


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


HOSTS = 3  # two for a job, and a third that a requeued job can move to


@pytest.fixture(scope="session")
def slurm_hosts(tmp_path_factory):
    """A running SLURM of HOSTS emulated hosts for this session (skips with the reason where namespaces or SLURM
    cannot be had)."""
    reason = install_reason()[0] or namespaces_reason()  # the install brings `ip` where it is missing
    if reason:
        pytest.skip(reason)
    try:
        cluster = start(tmp_path_factory.mktemp("slurm-hosts"), nodes=HOSTS)
    except RuntimeError as err:  # root in a container without CAP_NET_ADMIN / CAP_SYS_ADMIN, say
        if "Operation not permitted" not in str(err):
            raise
        pytest.skip(f"network namespaces cannot be made here: {str(err).splitlines()[0]}")
    try:
        yield cluster
    finally:
        stop(cluster)


if __name__ == "__main__":
    reason, _ = install_reason()
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    reason = reason or (namespaces_reason() if count > 1 else None)
    if reason:
        sys.exit(reason)
    for signum in (signal.SIGINT, signal.SIGTERM):  # `kill` stops it as Ctrl-C does (also started with `&`)
        signal.signal(signum, signal.default_int_handler)
    running = start(Path(sys.argv[1]).resolve(), nodes=count)
    print(f"export SLURM_CONF={running.conf}   # Ctrl-C stops the cluster", flush=True)
    if running.local_dir:
        print(f"node-local folder: {running.local_dir} (each node's: {running.folder / 'nodes'}/NODE)", flush=True)
    try:
        while all(d.poll() is None for d in running.daemons.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop(running)
