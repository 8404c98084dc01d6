"""One trainer per run folder: rank 0 holds an exclusive `flock` on `<out_dir>/.lock` for the whole run.

Two trainers writing one out_dir interleave their checkpoints, `latest` and metrics.jsonl, and each one's
resume undoes the other's work; the second one to start is refused instead, in one line naming the holder.
The lock belongs to the holder's open file: when the holder exits or is killed (kill -9, OOM killer, a node
reboot) the kernel drops it, so a stale `.lock` file never blocks a resume; the file itself stays (removing
it would race a trainer that has just opened it) and only describes the last holder (host, PID, start time,
SLURM job), for the refusal message.

File systems without working flock (NFS mounted without lockd, Lustre without `-o flock`) answer ENOLCK,
ENOSYS or EOPNOTSUPP: the run is not blocked, and one warning says a second trainer cannot be detected there.
An NFS mount with `-o nolock` grants every lock locally, so two trainers on different nodes are not detected.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from megatron_mixln.config import ConfigError

LOCK_FILE = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
_warned: set[str] = set()  # file systems already warned about, once per process


def check_out_dir(path: str | Path) -> Path:
    """train.out_dir as a folder path, or ConfigError when it cannot be one: an existing file, or a file where
    a parent folder should be. Call it before anything else touches the folder."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.out_dir={str(out)!r} is an existing file, not a folder; choose a folder path "
                          "(it is created when missing).")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"train.out_dir={str(out)!r} cannot be created: {parent} is a file; choose a "
                                  "folder path.")
            break
    return out


def _holder(text: str) -> str:
    """The refusal's description of the holder, from the lock file's content."""
    try:
        info = json.loads(text)
        described = f"host {info['host']}, PID {info['pid']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):  # the holder has not written its details yet, or an old format
        return "another process (its details are not written yet)"
    return described + (f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else "")


class RunLock:
    """`with RunLock(out_dir):` or `lock.acquire(out_dir)` ... `lock.release()`, on rank 0 only (the other ranks
    of the run share rank 0's lock; the caller broadcasts the outcome). Keep the object for the whole run:
    dropping it closes the file, and that drops the lock. `held` is False where the file system offered no lock
    (warned) or after release."""

    def __init__(self, out_dir: str | Path | None = None):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.path: Path | None = None
        self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self, out_dir: str | Path | None = None) -> None:
        """Create out_dir if needed and lock it. ConfigError (one sentence) when another trainer holds it, when
        out_dir is a file, or when the lock file cannot be created."""
        if self._handle is not None:  # already ours: a second open file would conflict with our own lock
            return
        out = check_out_dir(out_dir if out_dir is not None else self.out_dir)
        self.out_dir, self.path = out, out / LOCK_FILE
        try:
            out.mkdir(parents=True, exist_ok=True)
            # "a+": opening must not truncate: until we hold the lock, the content is the holder's description.
            handle = open(self.path, "a+")
        except OSError as err:
            raise ConfigError(f"train.out_dir={str(out)!r} cannot be used: creating {self.path} failed "
                              f"({err.strerror}); choose a folder this user can write.") from err
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _holder(handle.read())
            handle.close()
            raise ConfigError(f"train.out_dir={str(out)!r} is in use by another trainer ({holder}; lock "
                              f"{self.path}): wait for it to end or stop it, or choose another train.out_dir.") \
                from None
        except OSError as err:
            handle.close()
            if err.errno not in _UNSUPPORTED:
                raise
            key = str(out.resolve().parent)
            if key not in _warned:
                _warned.add(key)
                print(f"warning: {self.path}: this file system offers no locks ({err.strerror}), so a second "
                      f"trainer on train.out_dir={str(out)!r} would not be refused; make sure only one runs.",
                      file=sys.stderr, flush=True)
            return
        self._handle = handle
        # The lock needs no disk space; our details do. On a full disk the run still holds the folder, and a
        # second trainer's refusal just cannot name us.
        with contextlib.suppress(OSError):
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                     "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                                     "slurm_job_id": os.environ.get("SLURM_JOB_ID")}) + "\n")
            handle.flush()

    def release(self) -> None:
        """Give the folder back (closing the file drops the lock); safe to call twice."""
        if self._handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
