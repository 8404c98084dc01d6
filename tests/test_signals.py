"""Stop signals (SIGTERM, SIGUSR1, SIGINT): every rank stops at the same step boundary, saves a checkpoint, writes
metrics up to that step and exits with EXIT_RESUMABLE; the resumed run gives the losses of an uninterrupted one."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_mixln.config import load_config
from megatron_mixln.train import checkpoint as ckpt
from megatron_mixln.train import step as step_module
from megatron_mixln.train.loop import train
from megatron_mixln.train.metrics import read_metrics
from megatron_mixln.train.signals import EXIT_RESUMABLE
from training_runs import DATA, MODEL, ROOT, TRAIN, losses_of, tiny

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory):
    """Losses of an uninterrupted 6-step run."""
    return train(load_config(None, tiny(cache, tmp_path_factory.mktemp("straight")))).losses


def signal_after_step(monkeypatch, at_step: int, signum: int, again_during_save: bool = False):
    """Make this process receive `signum` right after step `at_step` (and, optionally, again inside the save)."""
    real_train_step = step_module.StepEngine.train_step

    def train_step_then_signal(self, step, *args, **kwargs):
        outcome = real_train_step(self, step, *args, **kwargs)
        if step == at_step:
            os.kill(os.getpid(), signum)
        return outcome

    monkeypatch.setattr(step_module.StepEngine, "train_step", train_step_then_signal)
    if again_during_save:
        real_save = ckpt.save_checkpoint

        def save_signalled_again(engine, out_dir, step, state, keep, **options):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the save is under way
            return real_save(engine, out_dir, step, state, keep, **options)

        monkeypatch.setattr(ckpt, "save_checkpoint", save_signalled_again)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_stops_at_the_step_boundary_with_a_checkpoint_and_resume_is_exact(signum, cache, straight, tmp_path,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    signal_after_step(monkeypatch, 3, signum, again_during_save=signum == signal.SIGUSR1)
    before = signal.getsignal(signum)  # SIG_IGN for SIGINT when the suite runs as a background job
    stopped = train(load_config(None, tiny(cache, out)))
    monkeypatch.undo()
    assert (stopped.stop_signal, stopped.last_step, sorted(stopped.losses)) == (signum.name, 3, [1, 2, 3])
    assert ckpt.latest_checkpoint(out).name == ckpt.tag_for_step(3)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3]
    assert signal.getsignal(signum) is before  # handlers restored
    resumed = train(load_config(None, tiny(cache, out)))
    assert resumed.stop_signal is None and sorted(resumed.losses) == [4, 5, 6]
    assert all(resumed.losses[step] == straight[step] for step in (4, 5, 6))


def launch(command: list[str], out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: the signal reaches only that job


def signal_when_training(proc: subprocess.Popen, out: Path, signum: int, after_step: int = 2) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] \
            if (out / "metrics.jsonl").is_file() else []
        if steps and max(steps) >= after_step:
            os.kill(proc.pid, signum)
            return
        time.sleep(0.2)
    raise AssertionError(f"the run did not reach step {after_step}: {proc.communicate()[0][-3000:]}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """straight(launcher, command): the folder of that command's uninterrupted run, made once per launcher (the
    signals sent to its twin do not change it)."""
    made: dict[str, Path] = {}

    def straight(launcher: str, command: list[str]) -> Path:
        if launcher not in made:
            out = tmp_path_factory.mktemp(f"straight-{launcher}")
            proc = subprocess.run([*command, f"train.out_dir={out}"], cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
            made[launcher] = out
        return made[launcher]
    return straight


@pytest.mark.slow
@pytest.mark.parametrize("launcher,signum", [("single", signal.SIGTERM), ("single", signal.SIGINT),
                                             ("torchrun", signal.SIGTERM), ("torchrun", signal.SIGUSR1)],
                         ids=["single-TERM", "single-INT", "torchrun-TERM", "torchrun-USR1"])
def test_a_killed_run_leaves_a_resumable_checkpoint_and_resumes_with_the_same_losses(launcher, signum, cache,
                                                                                     uninterrupted, tmp_path):
    command = [str(BIN / "mixln-train"), "configs/tiny.yaml", *MODEL, *DATA, *TRAIN, f"data.cache_dir={cache}",
               "train.steps=40", "train.save_every=0"]
    if launcher == "torchrun":
        # torchrun forwards SIGTERM and, listed here, SIGUSR1 to its workers, and waits for them to save.
        command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2",
                   "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown_timeout=120", *command,
                   "parallel.zero_stage=1"]
    straight = uninterrupted(launcher, command)
    out = tmp_path / "run"
    proc = launch([*command, f"train.out_dir={out}"], out)
    signal_when_training(proc, out, signum)
    output = proc.communicate(timeout=600)[0]
    if launcher == "single":
        assert proc.returncode == EXIT_RESUMABLE, output[-3000:]
        assert f"stopped by {signum.name} after step" in output
    else:  # torchrun reports its own signal; each worker exited with EXIT_RESUMABLE after saving
        assert f"received {signum.name}" in output, output[-3000:]
    reached = max(losses_of(out))
    assert 2 <= reached < 40
    assert ckpt.latest_checkpoint(out).name == ckpt.tag_for_step(reached)
    proc = subprocess.run([*command, f"train.out_dir={out}"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert losses_of(out) == losses_of(straight)  # every step, before and after the stop, exactly
