"""The SLURM templates (slurm/) and their stop / requeue logic (slurm/resumable.sh).

Without a cluster: the templates are valid and shellcheck-clean, and resumable.sh decides requeues by the exit-code
table of slurm/README.md (stub srun / scontrol). Under a real one-node SLURM (tests/slurm_cluster.py: installed and
started by the fixture, skipped with the reason where it cannot be): each template trains the tiny run on 2
processes; the stop signal reaches every rank of every launcher from srun and no launcher dies of it; a run warned
before its time limit stops with a checkpoint, requeues itself and ends with exactly the losses of an uninterrupted
run; a cancelled or failed job does not requeue; the comparison array trains two placements that mixln-compare
tabulates, also as a job that depends on the array.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_mixln.train.metrics import read_metrics
from slurm_cluster import (BIN, PARTITION, SLURM, Cluster, losses_of, one_node_run_folder,  # noqa: F401
                           slurm_cluster, submit, wait_for)  # slurm_cluster: the session fixture
from training_runs import DATA, MODEL, ROOT, TRAIN

TEMPLATES = ("torchrun", "deepspeed", "srun", "compare")


# --- without a cluster -------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def shellcheck():
    path = shutil.which("shellcheck")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "shellcheck"]):
            subprocess.run(command, env=env, capture_output=True, timeout=900)
        path = shutil.which("shellcheck")
    if path is None:
        pytest.skip("shellcheck is not installed and cannot be (apt-get install shellcheck as root)")
    return path


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_is_valid_bash_with_the_requeue_settings(name):
    path = SLURM / f"{name}.sbatch"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    for line in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 'source "$SLURM_SUBMIT_DIR/slurm/resumable.sh"', "run_resumable srun "):
        assert line in text, line
    assert re.search(r"#SBATCH --signal=B:USR1@\d+ +# EDIT", text)


def test_templates_and_resumable_sh_are_shellcheck_clean(shellcheck):
    scripts = sorted(SLURM.glob("*.sbatch")) + sorted((ROOT / "recipes").glob("*.sh"))
    files = [str(p.relative_to(ROOT)) for p in scripts] + ["slurm/resumable.sh"]
    # -x follows `source slurm/resumable.sh` (its `# shellcheck source=` path is relative to the repository).
    proc = subprocess.run([shellcheck, "-x", *files], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _executable(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


@pytest.fixture
def stub_step(tmp_path):
    """Run a template outside SLURM with a stub srun (it records the signals it gets and exits with the status
    asked for) and a stub scontrol (it records requeues); returns (exit status, records, stdout)."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    record, ready = tmp_path / "record", tmp_path / "ready"
    _executable(stubs / "srun", f"""\
trap 'echo "srun got USR1" >> {record}; got=1' USR1
trap 'echo "srun got TERM" >> {record}; got=1' TERM
touch {ready}
# With STUB_WAIT, the step runs until a signal comes, as training does.
while [ -n "${{STUB_WAIT:-}}" ] && [ -z "${{got:-}}" ]; do sleep 0.05; done
exit "$STUB_STATUS"
""")
    _executable(stubs / "scontrol", f"""\
if [ "$1" = show ]; then echo node1; else echo "scontrol $*" >> {record}; fi""")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f"export PATH={stubs}:$PATH\n")

    def run(template: str, status: int, signum: int | None = None, restarts: int | None = None,
            **extra: str) -> tuple[int, list[str], str]:
        env = {"PATH": f"{stubs}:{os.environ.get('PATH', '/usr/bin:/bin')}", "VENV": str(venv),
               "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "77", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node1",
               "HOSTFILE": str(tmp_path / "hostfile"), "STUB_STATUS": str(status), **extra}
        if restarts is not None:
            env["SLURM_RESTART_COUNT"] = str(restarts)
        if signum is not None:
            env["STUB_WAIT"] = "1"
        record.unlink(missing_ok=True)
        ready.unlink(missing_ok=True)
        proc = subprocess.Popen(["bash", str(SLURM / f"{template}.sbatch"), "configs/tiny.yaml"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if signum is not None:
            deadline = time.monotonic() + 60
            while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.02)
            os.kill(proc.pid, signum)
        out = proc.communicate(timeout=60)[0]
        records = record.read_text().splitlines() if record.exists() else []
        return proc.returncode, records, out

    return run


REQUEUE = "scontrol requeue 77"


CASES = [  # template, the step's exit status, the signal the batch shell gets, SLURM_RESTART_COUNT -> outcome
    # finished
    ("srun", 0, None, None, 0, []),
    ("srun", 0, signal.SIGUSR1, None, 0, ["srun got USR1"]),
    # stopped with a checkpoint (75): requeued while SLURM_RESTART_COUNT < MAX_REQUEUES (3), then 75
    ("srun", 75, None, None, 0, [REQUEUE]),
    ("srun", 75, signal.SIGUSR1, 2, 0, ["srun got USR1", REQUEUE]),
    ("srun", 75, signal.SIGUSR1, 3, 75, ["srun got USR1"]),
    ("deepspeed", 75, signal.SIGUSR1, None, 0, ["srun got USR1", REQUEUE]),
    # after the warning, a step killed before it could save still resumes from the last checkpoint
    ("srun", 137, signal.SIGUSR1, None, 0, ["srun got USR1", REQUEUE]),
    # torchrun exits 1 after its own signal: requeued after a warning, a failure without one
    ("torchrun", 1, signal.SIGUSR1, None, 0, ["srun got USR1", REQUEUE]),
    ("torchrun", 1, None, None, 1, []),
    ("torchrun", 2, signal.SIGUSR1, None, 2, ["srun got USR1"]),
    # failed for real: non-finite (1), config / data / launch (2), anything without a stop signal
    ("srun", 1, signal.SIGUSR1, None, 1, ["srun got USR1"]),
    ("srun", 2, None, None, 2, []),
    ("srun", 137, None, None, 137, []),
    # SIGTERM is SLURM ending the job (scancel, preemption, the time limit): the step gets SIGUSR1, no requeue
    ("srun", 75, signal.SIGTERM, None, 75, ["srun got USR1"]),
]


@pytest.mark.parametrize("template, step_status, signum, restarts, status, records", CASES, ids=[
    f"{t}-exit{s}-{g.name if g else 'nosignal'}-restarts{r or 0}" for t, s, g, r, *_ in CASES])
def test_resumable_sh_forwards_usr1_and_requeues_only_a_resumable_stop(stub_step, template, step_status, signum,
                                                                        restarts, status, records):
    returncode, got, out = stub_step(template, step_status, signum, restarts)
    assert (returncode, got) == (status, records), out
    assert out.startswith("==== mixln: job 77 run ") and "mixln-train configs/tiny.yaml" in out.splitlines()[0]


def test_max_requeues_is_a_knob(stub_step):
    assert stub_step("srun", 75, restarts=0, MAX_REQUEUES="0")[:2] == (75, [])
    assert stub_step("srun", 75, restarts=5, MAX_REQUEUES="6")[:2] == (0, [REQUEUE])


def test_compare_template_picks_the_placement_of_its_array_task(stub_step, tmp_path):
    record = tmp_path / "args"
    stubs = tmp_path / "bin"
    # This srun prints the training command it was given, one argument per line.
    _executable(stubs / "srun", f'printf "%s\\n" "$@" > {record}')
    status, _, out = stub_step("compare", 0, SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_JOB_ID="70",
                               PLACEMENTS="pre mix", RUNS_DIR="runs/cmp")
    assert status == 0, out
    command = record.read_text().splitlines()
    assert command[command.index("mixln-train"):] == ["mixln-train", "configs/tiny.yaml", "model.norm_placement=mix",
                                                      "train.out_dir=runs/cmp/tiny_mix"]
    assert out.splitlines()[-1] == "mixln-compare runs/cmp/tiny_pre runs/cmp/tiny_mix"
    status, _, out = stub_step("compare", 0, SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_JOB_ID="70", PLACEMENTS="pre mix")
    assert status == 2 and ("array task 2 has no run: the list has 2 (pre:model.norm_placement=pre "
                            "mix:model.norm_placement=mix), so submit with --array=0-1.") in out


def test_compare_template_runs_any_list_of_variants(stub_step, tmp_path):
    record = tmp_path / "args"
    _executable(tmp_path / "bin" / "srun", f'printf "%s\\n" "$@" > {record}')
    status, _, out = stub_step("compare", 0, SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_JOB_ID="71", RUNS_DIR="runs/a",
                               VARIANTS="a0:model.norm_placement=pre a25:model.norm_placement=mix,model.post_layers=6")
    assert status == 0, out
    command = record.read_text().splitlines()
    assert command[command.index("mixln-train"):] == ["mixln-train", "configs/tiny.yaml", "model.norm_placement=mix",
                                                      "model.post_layers=6", "train.out_dir=runs/a/tiny_a25"]
    assert out.splitlines()[-1] == "mixln-compare runs/a/tiny_a0 runs/a/tiny_a25"


def test_without_slurm_and_without_root_the_cluster_tests_skip_with_the_reason(monkeypatch):
    import slurm_cluster as module

    monkeypatch.setattr(module.shutil, "which", lambda tool: None)
    monkeypatch.setattr(module.os, "geteuid", lambda: 1000)
    assert module.install_reason() == (
        "SLURM is not installed and this is not root: apt-get install slurm-wlm, or run as root", None)


# --- mixln-compare -----------------------------------------------------------------------------------------------

def _fake_run(folder: Path, model: dict, steps: int, records: list[dict], cut_last_line: bool = False) -> Path:
    """A run folder as mixln-train leaves it: config.json and metrics.jsonl (nan / inf as strings)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model": {"num_layers": 4, "mix_alpha": 0.25, **model},
                                                    "train": {"steps": steps}}))
    lines = [json.dumps(r) for r in records]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n" + ('{"step": 9, "lo' if cut_last_line else ""))
    return folder


def test_mixln_compare_lists_every_run_sorted_by_perplexity(tmp_path):
    def step(n, loss, **extra):
        return {"step": n, "loss": loss, "lr": 1e-3, **extra}

    finished = _fake_run(tmp_path / "pre", {"norm_placement": "pre"}, 3, [
        step(1, 5.0), step(2, 4.0), step(3, 3.5), {"step": 3, "peak_memory_mb_per_rank": [1.0]},
        {"step": 3, "eval_loss": 3.25, "eval_ppl": math.exp(3.25)}])
    better = _fake_run(tmp_path / "mix", {"norm_placement": "mix", "post_layers": 1}, 3, [
        step(1, 5.0), step(2, 3.0), step(3, 2.9), {"step": 3, "eval_loss": 2.75, "eval_ppl": math.exp(2.75)}])
    stopped = _fake_run(tmp_path / "deepnorm", {"norm_placement": "deepnorm"}, 10, [
        step(1, 5.0), {"step": 1, "eval_loss": 4.5, "eval_ppl": math.exp(4.5)}, step(2, 4.8)], cut_last_line=True)
    diverged = _fake_run(tmp_path / "post", {"norm_placement": "post"}, 3, [
        step(1, 5.0), step(2, "nan", skipped=True)])
    (tmp_path / "empty").mkdir()
    folders = [diverged, tmp_path / "missing", stopped, tmp_path / "empty", finished, better]
    proc = subprocess.run([str(BIN / "mixln-compare"), *map(str, folders), "--json", str(tmp_path / "rows.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "| run | placement | steps done / planned | final train loss | final eval loss | eval perplexity | status |",
        "|---|---|---|---|---|---|---|",
        f"| {better} | mix (1 Post-LN of 4) | 3 / 3 | 2.9000 | 2.7500 | 15.64 | finished |",
        f"| {finished} | pre | 3 / 3 | 3.5000 | 3.2500 | 25.79 | finished |",
        f"| {stopped} | deepnorm | 2 / 10 | 4.8000 | 4.5000 (step 1) | 90.02 | stopped at step 2 |",
        f"| {diverged} | post | 2 / 3 | 5.0000 | - | - | diverged (non-finite) at step 2 |",
        f"| {tmp_path / 'missing'} | ? | 0 / ? | - | - | - | no such folder |",
        f"| {tmp_path / 'empty'} | ? | 0 / ? | - | - | - | no metrics |",
    ]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["run"], r["status"], r["skipped_steps"]) for r in rows][:4] == [
        (str(better), "finished", 0), (str(finished), "finished", 0), (str(stopped), "stopped at step 2", 0),
        (str(diverged), "diverged (non-finite) at step 2", 1)]
    assert "NaN" not in (tmp_path / "rows.json").read_text()


# --- a real one-node SLURM ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def tiny(cache: Path, out: Path, *extra: str) -> list[str]:
    return ["configs/tiny.yaml", *MODEL, *DATA, *TRAIN, f"data.cache_dir={cache}", f"train.out_dir={out}", *extra]


@pytest.mark.parametrize("template", ["torchrun", "deepspeed", "srun"])
def test_template_trains_the_tiny_run_on_two_processes(slurm_cluster, cache, tmp_path_factory, tmp_path, template):
    # In a folder of the session: tests/test_slurm_two_nodes.py compares its two-node runs with this one.
    out, log = one_node_run_folder(tmp_path_factory, template), tmp_path / "job.out"
    job = submit(slurm_cluster, template, tiny(cache, out), log)
    (state,) = wait_for(slurm_cluster, job)
    text = log.read_text()
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "0"), text[-3000:]
    assert sorted(losses_of(out)) == [1, 2, 3, 4, 5, 6]
    assert text.startswith(f"==== mixln: job {job} run 1 (SLURM_RESTART_COUNT=0, MAX_REQUEUES=3) on ")
    assert "done: step 6" in text and f"mixln: job {job}: the step finished (exit 0)" in text


# Stands in for mixln-train: records each stop signal it gets and which process sent it, then exits 75.
PROBE = """
import json, os, signal, sys, time
SIGNALS = {signal.SIGUSR1, signal.SIGTERM, signal.SIGINT}
signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # received by sigtimedwait below, which names the sender
results = os.environ["RESULTS"]
rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
def command(pid):
    try:
        line = open(f"/proc/{pid}/cmdline").read().replace("\\0", " ")
    except OSError:
        return "?"
    return next((name for name in ("slurmstepd", "torchrun", "deepspeed", "srun") if name in line), line[:80])
open(os.path.join(results, f"ready{rank}"), "w").close()
got, deadline = [], time.time() + 120
while time.time() < deadline:
    info = signal.sigtimedwait(SIGNALS, 0.1)
    if info:
        got.append([signal.Signals(info.si_signo).name, command(info.si_pid)])
        deadline = min(deadline, time.time() + 2)  # as long as a save might take: what else comes meanwhile?
with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
    json.dump({"got": got, "parent": command(os.getppid())}, f)
sys.exit(75)
"""


@pytest.fixture
def probe_venv(tmp_path):
    """A VENV whose mixln-train is the probe above (the real launchers stay: torchrun, deepspeed)."""
    (tmp_path / "probe.py").write_text(PROBE)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    _executable(venv / "bin" / "mixln-train", f"exec {sys.executable} {tmp_path / 'probe.py'}")
    (venv / "bin" / "activate").write_text(f"export PATH={venv / 'bin'}:{BIN}:$PATH\n")
    results = tmp_path / "results"
    results.mkdir()
    return venv, results


def _when_ranks_are_ready(results: Path, job: str, cluster: Cluster, ranks: int = 2) -> None:
    deadline = time.monotonic() + 120
    while not all((results / f"ready{r}").exists() for r in range(ranks)):
        assert time.monotonic() < deadline, f"the ranks of job {job} did not start\n{cluster.logs()}"
        time.sleep(0.1)


@pytest.mark.parametrize("template", ["torchrun", "deepspeed", "srun"])
def test_the_warning_reaches_every_rank_from_srun_and_no_launcher_dies_of_it(slurm_cluster, tmp_path, probe_venv,
                                                                            template):
    venv, results = probe_venv
    log = tmp_path / "job.out"
    job = submit(slurm_cluster, template, ["configs/tiny.yaml"], log, VENV=str(venv), RESULTS=str(results),
                 MAX_REQUEUES="0")
    _when_ranks_are_ready(results, job, slurm_cluster)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_cluster.env, check=True, timeout=60)
    (state,) = wait_for(slurm_cluster, job)
    text = log.read_text()
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]  # both lived to write it
    # srun passes SIGUSR1 on to every process of the step: each rank gets it from its slurmstepd. torchrun, which
    # handles SIGUSR1 too, sends one more (it may merge with the first); deepspeed's launchers ignore it.
    for rank in ranks:
        assert {name for name, _ in rank["got"]} == {"SIGUSR1"}, rank
        senders = {sender for _, sender in rank["got"]}
        assert "slurmstepd" in senders and senders <= {"slurmstepd", "torchrun"}, rank
        assert template == "torchrun" or senders == {"slurmstepd"}, rank
    # Every rank exits 75; srun and the deepspeed launcher pass it on, torchrun exits 1 after its own signal.
    stopped = "stopped after SIGUSR1 (exit 1)" if template == "torchrun" else "stopped with a checkpoint (exit 75)"
    assert f"mixln: job {job}: {stopped} but not requeued" in text, text[-3000:]
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("FAILED", "75:0", "0")


def test_a_cancelled_job_stops_with_a_checkpoint_and_stays_cancelled(slurm_cluster, tmp_path, probe_venv):
    venv, results = probe_venv
    log = tmp_path / "job.out"
    job = submit(slurm_cluster, "srun", ["configs/tiny.yaml"], log, VENV=str(venv), RESULTS=str(results))
    _when_ranks_are_ready(results, job, slurm_cluster)
    subprocess.run(["scancel", job], env=slurm_cluster.env, check=True, timeout=60)
    (state,) = wait_for(slurm_cluster, job)
    for r in range(2):  # SIGTERM straight from SLURM's slurmstepd (and the SIGUSR1 the batch shell forwards)
        got = json.loads((results / f"rank{r}.json").read_text())["got"]
        assert ["SIGTERM", "slurmstepd"] in got and {name for name, _ in got} <= {"SIGTERM", "SIGUSR1"}, got
    # Ended for good: the batch shell, which alone could requeue it, is gone once the job has left COMPLETING.
    assert (state["JobState"], state["Restarts"]) == ("CANCELLED", "0")
    assert "not requeued from here" in log.read_text()


def test_a_config_error_fails_the_job_without_a_requeue(slurm_cluster, cache, tmp_path):
    log = tmp_path / "job.out"
    job = submit(slurm_cluster, "srun", tiny(cache, tmp_path / "run", "model.mix_alpha=1.5"), log, processes=1)
    (state,) = wait_for(slurm_cluster, job)
    text = log.read_text()
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("FAILED", "2:0", "0"), text[-3000:]
    assert "error: model.mix_alpha=1.5 is invalid" in text and "the step failed (exit 2); not requeued" in text


@pytest.mark.slow
def test_a_warned_job_checkpoints_requeues_itself_and_resumes_exactly(slurm_cluster, cache, tmp_path):
    """torchrun, 2 processes: SLURM's warning (as --signal=B:USR1@N sends it: to the batch shell) mid-run."""
    args = ["train.steps=100", "train.save_every=0", "train.layer_grad_norm_every=0", "parallel.zero_stage=1"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    log = tmp_path / "run.out"
    reference = submit(slurm_cluster, "torchrun", tiny(cache, straight, *args), tmp_path / "straight.out")
    job = submit(slurm_cluster, "torchrun", tiny(cache, out, *args), log)
    deadline = time.monotonic() + 240
    while len(losses_of(out)) < 3:  # a few steps done: the warning comes mid-run
        assert time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_cluster.env, check=True, timeout=60)
    (state,) = wait_for(slurm_cluster, job, restarts=1)
    text = log.read_text()
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-3000:]
    # One log, appended: a header per run, the stop, the requeue, the resume.
    headers = re.findall(r"^==== mixln: job (\d+) run (\d) \(SLURM_RESTART_COUNT=(\d),", text, re.M)
    assert headers == [(job, "1", "0"), (job, "2", "1")]
    stopped = int(re.search(r"stopped by SIGUSR1 after step (\d+) with a checkpoint", text).group(1))
    assert 3 <= stopped < 100
    assert "requeueing (1 of at most 3)" in text
    assert re.search(rf"resumed from {re.escape(str(out))}/checkpoints/step_0*{stopped} at step {stopped}\b", text)
    assert text.rstrip().endswith(f"mixln: job {job}: the step finished (exit 0)")
    (done,) = wait_for(slurm_cluster, reference)
    assert done["JobState"] == "COMPLETED"
    assert sorted(losses_of(out)) == list(range(1, 101))
    assert losses_of(out) == losses_of(straight)  # every step, before and after the requeue, exactly


@pytest.mark.slow
def test_the_comparison_array_and_its_summary_job(slurm_cluster, cache, tmp_path):
    runs = tmp_path / "runs"
    log = tmp_path / "compare.out"
    array = submit(slurm_cluster, "compare", tiny(cache, tmp_path / "ignored"), tmp_path / "compare-%a.out",
                   "--array=0-1", processes=1, PLACEMENTS="pre mix", RUNS_DIR=str(runs))
    # The documented way to get the table once every task has ended, whatever its end.
    summary = subprocess.run(["sbatch", "--parsable", f"--dependency=afterany:{array}", f"--partition={PARTITION}",
                              f"--output={log}",
                              "--wrap", f"{BIN / 'mixln-compare'} {runs}/tiny_pre {runs}/tiny_mix "
                                        f"--json {tmp_path / 'compare.json'}"],
                             cwd=ROOT, env=slurm_cluster.env, capture_output=True, text=True, timeout=60)
    assert summary.returncode == 0, summary.stderr
    tasks = wait_for(slurm_cluster, array)
    assert [(t["ArrayTaskId"], t["JobState"]) for t in sorted(tasks, key=lambda t: t["ArrayTaskId"])] == [
        ("0", "COMPLETED"), ("1", "COMPLETED")]
    task_log = (tmp_path / "compare-1.out").read_text()
    assert "model.norm_placement=mix" in task_log.splitlines()[0]
    # Each task prints the summary command; run it as printed.
    printed = task_log.rstrip().splitlines()[-1]
    assert printed == f"mixln-compare {runs}/tiny_pre {runs}/tiny_mix"
    table = subprocess.run([str(BIN / printed.split()[0]), *printed.split()[1:]], capture_output=True, text=True,
                           timeout=120, check=True).stdout
    rows = [line for line in table.splitlines() if line.startswith(f"| {runs}")]
    ppl = {r["step"]: r for r in read_metrics(runs / "tiny_mix" / "metrics.jsonl") if "eval_ppl" in r}[6]["eval_ppl"]
    assert len(rows) == 2 and any("| mix (2 Post-LN of 4) | 6 / 6 |" in r and f"| {ppl:.2f} | finished |" in r
                                  for r in rows), table
    assert any("| pre | 6 / 6 |" in r and r.endswith("| finished |") for r in rows), table
    values = [float(r.split("|")[6]) for r in rows]
    assert values == sorted(values) and all(math.isfinite(v) for v in values)
    (done,) = wait_for(slurm_cluster, summary.stdout.strip())
    assert done["JobState"] == "COMPLETED" and all(row in log.read_text() for row in rows)
    assert [r["placement"] for r in json.loads((tmp_path / "compare.json").read_text())] == [
        rows[0].split("|")[2].strip(), rows[1].split("|")[2].strip()]


@pytest.mark.parametrize("recipe,size,expected", [
    ("table1.sh", "130m", ["post:model.norm_placement=post", "deepnorm:model.norm_placement=deepnorm",
                           "pre:model.norm_placement=pre", "mix:model.norm_placement=mix"]),
    ("alpha_sweep.sh", "1b", [f"post{n}:model.norm_placement=mix,model.post_layers={n}"
                              for n in (0, 4, 6, 8, 10, 12, 24)]),
])
def test_recipes_submit_one_array_of_the_papers_runs(recipe, size, expected, tmp_path):
    """recipes/*.sh with a stub sbatch: the array size and, through compare.sbatch's own parsing, each task's
    overrides."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    record = tmp_path / "sbatch.args"
    _executable(stubs / "sbatch", f'printf "%s\\n" "$@" > {record}; printf "%s\\n" "${{VARIANTS:-}}|'
                                  f'${{PLACEMENTS:-}}" >> {record}')
    proc = subprocess.run(["bash", str(ROOT / "recipes" / recipe), size], capture_output=True, text=True,
                          env={"PATH": f"{stubs}:{os.environ['PATH']}"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = record.read_text().splitlines()
    assert lines[0] == f"--array=0-{len(expected) - 1}" and lines[2] == f"configs/llama_{size}.yaml"
    variants, placements = lines[-1].split("|")
    listed = variants.split() if variants else [f"{p}:model.norm_placement={p}" for p in placements.split()]
    assert listed == expected
    assert proc.stdout.strip().endswith(" ".join(f"runs/llama_{size}_{v.split(':')[0]}" for v in expected))
