"""The one rule for every folder a command writes: it may replace a folder only when that does not exist, is empty or
is an earlier output of the same kind, never when it is, holds or lies inside an input; and it writes it whole.

Imports nothing of the package (imports run one way: anything may use it).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PARTIAL = ".partial"  # `<out>.partial`: the folder while it is written, moved into place whole when complete
FORCE = "--force"


class OutputFolderError(ValueError):
    """An output a command refuses to write; the message is one sentence naming it and what would be valid."""


@dataclass(frozen=True)
class OutputKind:
    """What a command writes: its name in messages, and the files that mark an earlier output of the kind (a
    folder holding every file of one of `marks`, and passing `claims` where files of that name are common)."""

    name: str
    marks: tuple[tuple[str, ...], ...]
    claims: Callable[[Path], bool] | None = None

    def is_earlier_output(self, folder: Path) -> bool:
        return (any(all((folder / name).exists() for name in files) for files in self.marks)
                and (self.claims is None or self.claims(folder)))


def _refuse_non_folder(path: Path, kind: OutputKind) -> None:
    """A file, a symbolic link, or a path below a file, given as the folder to write."""
    if path.is_symlink():
        raise OutputFolderError(f"{path} is a symbolic link (to {path.resolve()}): pass the folder itself, a new "
                                f"folder or an earlier {kind.name}.")
    above = next((p for p in (path, *path.parents) if p.exists()), None)
    if above is not None and not above.is_dir():
        where = "is a file, not a folder" if above == path else f"cannot be created as {above} is a file"
        raise OutputFolderError(f"{path} {where}: pass a new folder, an empty one or an earlier {kind.name}.")


def _refuse_inputs(path: Path, inputs: Iterable[str | Path], option: str | None) -> None:
    """Never overridable (not even by `option`): writing `path` would delete or change what the command reads."""
    target = path.resolve()
    for source in inputs:
        read = Path(source).resolve()
        relation = ("is" if read == target else "holds" if read.is_relative_to(target)
                    else "is inside" if target.is_relative_to(read) else None)
        if relation is not None:
            raise OutputFolderError(f"{path} {relation} the input {source}: writing there could destroy what the "
                                    "command reads, so pass a path outside it"
                                    + (f" ({option} does not override this)." if option else "."))


def check_output_folder(out: str | Path, kind: OutputKind, inputs: Iterable[str | Path] = (), force: bool = False,
                        option: str | None = FORCE) -> Path:
    """`out` as a Path when a command may write it: it does not exist, is empty or is an earlier output of `kind`
    (or `force`), and it is not, does not hold and is not inside any of `inputs` (symbolic links resolved; `force`
    never overrides this). Otherwise an OutputFolderError naming the folder and, where it helps, `option`."""
    out = Path(out)
    _refuse_non_folder(out, kind)
    _refuse_inputs(out, inputs, option)
    if not out.exists() or force or kind.is_earlier_output(out):
        return out
    others = sorted(entry.name for entry in out.iterdir())
    if not others:
        return out
    shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    fix = f"pass a new or empty folder, or add {option} to replace it" if option else "move them away"
    raise OutputFolderError(f"{out} holds other files ({shown}) and is not an earlier {kind.name}: {fix}.")


def temporary_folder(out: str | Path) -> Path:
    """An empty `<out>.partial` to write `out` into (a leftover of a failed write is removed first)."""
    out = Path(out)
    tmp = out.with_name(out.name + PARTIAL)
    if tmp.is_symlink() or (tmp.exists() and not tmp.is_dir()):
        raise OutputFolderError(f"{tmp} is in the way of writing {out}: it is not a folder this command left; "
                                "move it away.")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_folder(tmp: Path, out: str | Path, kind: OutputKind, force: bool = False,
                   option: str | None = FORCE) -> Path:
    """Move the finished `tmp` into place as `out`, replacing an earlier one. Checked again here: a library caller
    may not have checked, and a folder may have appeared at `out` while `tmp` was written."""
    out = check_output_folder(out, kind, force=force, option=option)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


@contextmanager
def atomic_folder(out: str | Path, kind: OutputKind, force: bool = False,
                  option: str | None = FORCE) -> Iterator[Path]:
    """Write the folder `out` whole: yields an empty `<out>.partial`, moved into place as `out` when the block
    completes and removed when it (or the move) fails."""
    tmp = temporary_folder(out)
    try:
        yield tmp
        publish_folder(tmp, out, kind, force, option)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_file(path: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """`path` as a Path when a command may write the file there: not a folder, and not inside any of `inputs`."""
    path = Path(path)
    if path.is_dir():
        raise OutputFolderError(f"{path} is a folder: pass a file path to write.")
    _refuse_inputs(path, inputs, None)
    return path
