"""A full, read-only or forbidden file system as one sentence naming the path and what failed (exit code 2).

Such a write fails the same way if the job is simply requeued, so it is a mistake to fix by hand (free space,
another folder), like a bad config, and not the non-finite stop (exit 1) that an uncaught OSError would look like.
"""
from __future__ import annotations

import contextlib
import errno
from pathlib import Path

# ENOSPC: no space left; EDQUOT: quota exceeded; EROFS: read-only file system; EACCES / EPERM: not allowed.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class StorageError(RuntimeError):
    """A folder that cannot be written; the message is one sentence naming the path, what failed and the fix."""


def remedy(err: OSError) -> str:
    """What the user does about `err`: "free space there" for a full disk or quota, else "make it writable"."""
    return "free space there" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"


def storage_error(err: BaseException, what: str, path: str | Path | None = None,
                  instead: str = "choose another folder", outcome: str = "") -> StorageError | None:
    """`err` as one StorageError sentence when it is a full, read-only or forbidden file system, else None.
    `what` is the work that failed ("creating train.out_dir"); `path` names the file when the OS did not;
    `instead` the other way out; `outcome`, when given, replaces the advice (what was done about it)."""
    if not isinstance(err, OSError) or err.errno not in STORAGE_ERRNOS:
        return None
    where = err.filename or path
    reason = (err.strerror or errno.errorcode[err.errno]).lower()
    advice = outcome or f"{remedy(err)}, or {instead}"
    return StorageError(f"{what} failed" + (f": {where}" if where else "") + f": {reason}; {advice}.")


@contextlib.contextmanager
def writing(what: str, path: str | Path, instead: str = "choose another folder"):
    """Turn a full, read-only or forbidden file system inside the block into one StorageError sentence."""
    try:
        yield
    except OSError as err:
        problem = storage_error(err, what, path, instead)
        if problem is None:
            raise
        raise problem from err
