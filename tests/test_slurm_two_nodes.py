"""The SLURM templates across two hosts: what a one-node cluster never runs (the node list to MASTER_ADDR, torchrun's
rendezvous on another host, the deepspeed hostfile and --node_rank, srun across nodes, a requeue that lands on
other nodes, a node whose process dies).

The hosts are network namespaces on a bridge (tests/slurm_cluster.py, `slurm_hosts`): each with its own address,
host name, /etc/hosts, slurmd and node-local folder, which is the data cache here (data.cache_shared=false, so each
node prepares its own copy). One process per node, gloo, fp32: the losses must equal a one-node run's of the same
layout (DP2, TP2) exactly; for DP2 the one that tests/test_slurm.py made in this session when it did.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import slurm_cluster as cluster_module
from slurm_cluster import (FINAL_STATES, Cluster, losses_of, one_node_run_folder, slurm_hosts,  # noqa: F401
                           submit, wait_for)  # slurm_hosts: the session fixture
from training_runs import tiny

STEPS = 6  # training_runs.TRAIN's
# A job whose trainer on one node died must end this soon after (measured: 1 to 10 s, slurm/README.md); without
# srun --kill-on-bad-exit the other node waited for it parallel.startup_timeout_minutes (10 min).
DEATH_BOUND_S = 60


def tiny_run(cluster: Cluster, out: Path, *extra: str) -> list[str]:
    """The tiny run with each node's own data cache."""
    return ["configs/tiny.yaml", *tiny(cluster.local_dir, out, "data.cache_shared=false", *extra)]


def hostnames(cluster: Cluster, nodelist: str) -> list[str]:
    return cluster.scontrol("show", "hostnames", nodelist).split()


def trainers(job: str) -> dict[int, int]:
    """rank -> pid of the job's mixln-train processes on every host (the namespaces share this machine's pids)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                       if b"=" in item)
        except OSError:  # ended meanwhile
            continue
        if len(argv) > 1 and argv[1].endswith(b"/mixln-train") and env.get(b"SLURM_JOB_ID") == job.encode():
            found[int(env.get(b"RANK") or env[b"SLURM_PROCID"])] = int(pid)  # torchrun / deepspeed, else srun
    return found


def wait_for_trainers(cluster: Cluster, job: str, count: int = 2) -> dict[int, int]:
    deadline = time.monotonic() + 240
    while len(found := trainers(job)) < count:
        assert time.monotonic() < deadline, f"job {job}: {len(found)} of {count} trainers started\n{cluster.logs()}"
        time.sleep(0.05)
    return found


def pending(pid: int, signum: int) -> bool:
    """Whether `signum` waits to be delivered to process `pid` (to the process or to one of its threads)."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = re.findall(r"^(?:ShdPnd|SigPnd):\s*([0-9a-f]+)$", status, re.M)
    return any(int(mask, 16) >> (signum - 1) & 1 for mask in masks)


def warn_after_the_first_step(cluster: Cluster, job: str, out: Path) -> None:
    """SLURM's warning as --signal=B:USR1@N sends it (to the batch shell) once step 1 is logged, while the trainers
    are held (SIGSTOP), so that it reaches them long before the last of the tiny run's fast (~0.1 s) steps; they go
    on (SIGCONT) once each of them holds the SIGUSR1 that srun passed on."""
    held = wait_for_trainers(cluster, job).values()
    deadline = time.monotonic() + 240
    while not losses_of(out):
        assert time.monotonic() < deadline, f"job {job} made no step\n{cluster.logs()}"
        time.sleep(0.01)
    for pid in held:
        os.kill(pid, signal.SIGSTOP)
    try:
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster.env, check=True, timeout=60)
        while not all(pending(pid, signal.SIGUSR1) for pid in held):
            assert time.monotonic() < deadline, f"the warning did not reach the trainers of job {job}"
            time.sleep(0.05)
    finally:
        for pid in held:
            os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def twin(slurm_hosts, tmp_path_factory):
    """(template, overrides) -> the folder of a one-node run of the same layout (2 processes on one node):
    tests/test_slurm.py's when this session made it (no overrides), else one made here on one of the hosts."""
    made = {}

    def folder(template: str, *extra: str) -> Path:
        theirs = one_node_run_folder(tmp_path_factory, template)
        if not extra and sorted(losses_of(theirs)) == list(range(1, STEPS + 1)):
            return theirs
        if (template, extra) not in made:
            base = tmp_path_factory.mktemp(f"one-node-{template}")
            job = submit(slurm_hosts, template, tiny_run(slurm_hosts, base / "run", *extra), base / "job.out")
            (state,) = wait_for(slurm_hosts, job)
            assert state["JobState"] == "COMPLETED", (base / "job.out").read_text()[-3000:]
            made[template, extra] = base / "run"
        return made[template, extra]

    return folder


def prepared_tokens(cluster: Cluster, node: str) -> bytes:
    """The train tokens that `node` prepared in its own folder."""
    (folder,) = [p for p in cluster.node_local_dir(node).iterdir() if (p / "meta.json").is_file()]
    return (folder / "train.tokens").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("template, extra, layout", [  # deepspeed: in the requeue test below
    ("torchrun", [], "tp 1 x pp 1 x dp 2"),
    ("srun", ["parallel.tp=2"], "tp 2 x pp 1 x dp 1"),  # every layer's collectives across the hosts
], ids=["torchrun-dp2", "srun-tp2"])
def test_a_two_node_job_trains_exactly_as_on_one_node(slurm_hosts, twin, tmp_path, template, extra, layout):
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm_hosts, template, tiny_run(slurm_hosts, out, *extra), log, nodes=2, processes=1)
    (state,) = wait_for(slurm_hosts, job)
    text = log.read_text()
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "0"), text[-3000:]
    nodes = hostnames(slurm_hosts, state["NodeList"])
    # One process on each of two hosts, each node's data prepared there.
    assert len(nodes) == 2 and f"layout: 2 processes = {layout}," in text
    assert prepared_tokens(slurm_hosts, nodes[0]) == prepared_tokens(slurm_hosts, nodes[1])
    assert sorted(losses_of(out)) == list(range(1, STEPS + 1))
    assert losses_of(out) == losses_of(twin(template, *extra))  # fp32, every step, exactly


@pytest.mark.slow
def test_a_warned_two_node_job_requeues_onto_other_nodes_and_resumes_exactly(slurm_hosts, twin, tmp_path):
    """deepspeed: the warning mid-run; the first node is drained meanwhile, so the requeued run has another first
    node (MASTER_ADDR), another hostfile and a node whose data is prepared anew."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm_hosts, "deepspeed", tiny_run(slurm_hosts, out), log, nodes=2, processes=1)
    wait_for_trainers(slurm_hosts, job)
    first = hostnames(slurm_hosts, slurm_hosts.job(job)["NodeList"])
    slurm_hosts.scontrol("update", f"NodeName={first[0]}", "State=DRAIN", "Reason=mixln-test")
    try:
        warn_after_the_first_step(slurm_hosts, job, out)
        (state,) = wait_for(slurm_hosts, job, restarts=1)
    finally:
        slurm_hosts.scontrol("update", f"NodeName={first[0]}", "State=RESUME")
    text = log.read_text()
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-3000:]
    headers = re.findall(r"^==== mixln: job (\d+) run (\d) \(SLURM_RESTART_COUNT=(\d),.* on (\S+) at ", text, re.M)
    assert [header[:3] for header in headers] == [(job, "1", "0"), (job, "2", "1")]
    runs = [hostnames(slurm_hosts, header[3]) for header in headers]
    assert runs[0] == first and first[0] not in runs[1] and len(runs[1]) == 2
    stopped = int(re.search(r"stopped by SIGUSR1 after step (\d+) with a checkpoint", text).group(1))
    assert 1 <= stopped < STEPS
    assert f"mixln: job {job}: stopped with a checkpoint (exit 75); requeueing (1 of at most 3)" in text
    assert re.search(rf"resumed from {re.escape(str(out))}/checkpoints/step_0*{stopped} at step {stopped}\b", text)
    assert prepared_tokens(slurm_hosts, runs[1][0]) == prepared_tokens(slurm_hosts, runs[1][1])
    assert sorted(losses_of(out)) == list(range(1, STEPS + 1))
    assert losses_of(out) == losses_of(twin("deepspeed"))  # before and after the requeue, exactly


@pytest.mark.slow
def test_a_job_whose_trainer_dies_on_one_node_ends_at_once(slurm_hosts, tmp_path):
    """torchrun: rank 1's process is killed (as by the OOM killer) while the ranks start. Its node's torchrun
    fails; srun --kill-on-bad-exit then ends the other node's, whose rank would wait for rank 1."""
    log = tmp_path / "job.out"
    job = submit(slurm_hosts, "torchrun", tiny_run(slurm_hosts, tmp_path / "run"), log, nodes=2, processes=1)
    os.kill(wait_for_trainers(slurm_hosts, job)[1], signal.SIGKILL)
    killed = time.monotonic()
    while (state := slurm_hosts.job(job))["JobState"] not in FINAL_STATES:
        assert time.monotonic() - killed < DEATH_BOUND_S, \
            f"job {job} still {state['JobState']} {DEATH_BOUND_S} s after its rank 1 died\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    text = log.read_text()
    print(f"job {job} ended {time.monotonic() - killed:.1f} s after its rank 1 died")
    assert (state["JobState"], state["Restarts"]) == ("FAILED", "0"), text[-3000:]
    assert re.search(r"srun: error: node\d: task 1: Exited with exit code 1$", text, re.M), text[-3000:]
    assert "Terminating StepId=" in text  # --kill-on-bad-exit ended the other node's task
    assert f"mixln: job {job}: the step failed (exit 1); not requeued" in text


# --- the emulated hosts themselves ---------------------------------------------------------------------------------

def test_without_root_the_two_node_tests_skip_with_the_reason(monkeypatch):
    monkeypatch.setattr(cluster_module.os, "geteuid", lambda: 1000)
    assert cluster_module.namespaces_reason() == "network namespaces need root"


def _leftovers(tag: str) -> list[str]:
    """What is left of make_network's network `tag`: interfaces, namespaces, /etc/netns entries."""
    listed = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout + \
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return re.findall(rf"\b(?:mxbr|mxv|mixln){re.escape(tag)}\S*", listed) + \
        [str(p) for p in Path("/etc/netns").glob(f"mixln{tag}-*")]


def test_a_network_that_fails_half_way_is_removed_whole(monkeypatch):
    reason = cluster_module.namespaces_reason()
    if reason:
        pytest.skip(reason)
    real_ip, real_remove, removed = cluster_module._ip, cluster_module.remove_network, []

    def failing_for_node2(*args, check=True):
        if args[:2] == ("netns", "add") and args[2].endswith("-node2"):
            raise RuntimeError("ip netns add failed: no more namespaces")
        return real_ip(*args, check=check)

    def remove(network):
        removed.append((network.bridge.removeprefix("mxbr"),
                        [kind for kind, name in network.made if name != str(cluster_module.ETC_NETNS)]))
        real_remove(network)

    monkeypatch.setattr(cluster_module, "_ip", failing_for_node2)
    monkeypatch.setattr(cluster_module, "remove_network", remove)
    with pytest.raises(RuntimeError, match="no more namespaces"):
        cluster_module.make_network(3)
    ((tag, made),) = removed
    assert made == ["bridge", "netns", "veth", "etc"]  # the bridge and node1, all of which is gone now
    assert _leftovers(tag) == []
