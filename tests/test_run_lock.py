"""One trainer per run folder: a second trainer is refused naming the first one's host and PID, a killed trainer's
lock does not block the resume, and a train.out_dir that cannot be a folder ends in one line."""
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from megatron_mixln.config import ConfigError
from megatron_mixln.train import run_lock
from megatron_mixln.train.run_lock import LOCK_FILE, RunLock, check_out_dir
from training_runs import tmpfs

HOLD = ("import sys, time\n"
        "from megatron_mixln.train.run_lock import RunLock\n"
        "lock = RunLock(sys.argv[1])\n"
        "lock.acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")


@pytest.fixture
def other_trainer(tmp_path):
    """Start another process that takes the lock on a folder (as a trainer's rank 0 does) and holds it."""
    started = []

    def start(out, **env):
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                                   env={**os.environ, **env})
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_a_second_trainer_on_the_same_folder_is_refused_naming_the_first(tmp_path, other_trainer):
    out = tmp_path / "run"
    first = other_trainer(out, SLURM_JOB_ID="4242")
    with pytest.raises(ConfigError) as caught:
        RunLock().acquire(out)
    message = str(caught.value)
    assert "\n" not in message and message.endswith(".")
    assert f"train.out_dir={str(out)!r} is in use by another trainer" in message
    assert f"host {socket.gethostname()}, PID {first.pid}" in message and "SLURM job 4242" in message
    assert first.poll() is None  # the first trainer is untouched and still holds its folder
    with pytest.raises(ConfigError):
        RunLock().acquire(out)
    RunLock().acquire(tmp_path / "elsewhere")  # another folder is free


def test_a_killed_trainers_lock_does_not_block_the_resume(tmp_path, other_trainer):
    out = tmp_path / "run"
    first = other_trainer(out)
    first.send_signal(signal.SIGKILL)  # no clean-up ran: the lock file and its description stay behind
    first.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid
    with RunLock(out) as lock:
        assert lock.held
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=f"PID {os.getpid()}"):  # held now, also against this process
            RunLock(out).acquire()
    RunLock(out).acquire()  # released at the end of the `with`


def test_an_out_dir_that_cannot_be_a_folder_ends_in_one_line(tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("not a run")
    for path, words in ((existing, "is an existing file, not a folder"),
                        (existing / "run", f"cannot be created: {existing} is a file")):
        for attempt in (check_out_dir, lambda p: RunLock().acquire(p)):
            with pytest.raises(ConfigError) as caught:
                attempt(path)
            assert str(caught.value) == str(caught.value).splitlines()[0] and words in str(caught.value)
            assert f"train.out_dir={str(path)!r}" in str(caught.value)
    assert existing.read_text() == "not a run"
    assert check_out_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"


def test_a_read_only_file_system_is_named_in_one_line(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mount, pytest.raises(ConfigError) as caught:
        RunLock().acquire(mount / "run")
    assert "\n" not in str(caught.value) and "read-only file system" in str(caught.value).lower()


def test_a_file_system_without_locks_warns_once_and_does_not_block(tmp_path, monkeypatch, capsys):
    """What NFS without lockd answers (ENOLCK); Lustre without -o flock answers ENOSYS."""
    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(run_lock, "_warned", set())
    first, second = RunLock(), RunLock()
    first.acquire(tmp_path / "run")
    second.acquire(tmp_path / "run")  # a second trainer cannot be detected there: the run goes on
    assert not first.held and not second.held
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "no locks" in warning[0] and "make sure only one runs" in warning[0]
