"""The integrity of a checkpoint's files (train/checkpoint.py saves, finds and loads the folders): the CRC-32 of every
file as it is written and its manifest (`checksums.json`), reading every file back against it (or, for a folder
saved before it, against the CRC-32 torch's zip format stores per record), the cheap checks of a torch file (its
zip directory, the classes its pickle names), torch.load with weights_only and DeepSpeed's own classes only, and a
damaged file said in one sentence naming folder, file and cause (`Problem`, CheckpointDamaged).
"""
from __future__ import annotations

import contextlib
import pickle
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_mixln.saved_files import CheckpointError, DamagedFile, read_json

MANIFEST = "checksums.json"  # {"checksum": "crc32", "files": {name: {"size": bytes, "crc32": zlib.crc32}}}
_CHUNK = 16 * 2**20  # read size of the checks: large enough that zlib.crc32, not Python, sets the pace


class CheckpointDamaged(CheckpointError):
    """A checkpoint folder with a missing, truncated or unreadable file; train.resume=auto falls back past it.
    `folder` is the checkpoint folder, `cause` a few words for the fallback line."""

    def __init__(self, message: str, folder: Path, cause: str):
        super().__init__(message)
        self.folder, self.cause = folder, cause


@dataclass(frozen=True)
class Problem:
    """One rank's finding about a checkpoint folder: kind ("damaged", "unsafe", "foreign", "write"), the
    one-sentence message, and the few words of cause the fallback line quotes."""

    kind: str
    message: str
    cause: str


def problem_error(problem: Problem, folder: Path) -> CheckpointError:
    if problem.kind == "damaged":
        return CheckpointDamaged(problem.message, folder, problem.cause)
    return CheckpointError(problem.message)


class SummingFile:
    """The file object torch.save writes a checkpoint file through: it sums the bytes on their way to the disk,
    so the manifest costs no second read of what was written."""

    def __init__(self, handle):
        self.handle, self.crc32 = handle, 0

    def write(self, data) -> int:
        self.crc32 = zlib.crc32(data, self.crc32)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def deepspeed_checkpoint_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19.8 pickles into its checkpoint files, and nothing else: the loss
    scaler (ZeRO optimiser files), the ZeRO stage enum (ZeRO-1/2/3) and the parameter fragment addresses
    (ZeRO-1/2 and the bf16 optimiser). Found with torch.serialization.get_unsafe_globals_in_checkpoint."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class UnreadableFile(Exception):
    """Raised out of DeepSpeed's loading by our torch.load wrapper: which file, and the problem."""

    def __init__(self, problem: Problem):
        super().__init__(problem.message)
        self.problem = problem


class _UnsafeGlobals(Exception):
    """The classes outside the allow-list that a file's pickle names (found without unpickling it)."""

    def __init__(self, names: list[str]):
        super().__init__(", ".join(names))
        self.names = names


def _zip_directory_missing(path: Path) -> bool:
    """True when the end-of-central-directory record of a torch zip file is missing from its tail: the file was
    cut short (a full disk, a killed copy). A few KiB read; the record is the last 22 bytes plus a comment."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        handle.seek(max(0, size - 65_557))
        return b"PK\x05\x06" not in handle.read()


def file_problem(folder: Path, path: Path, err: BaseException) -> Problem:
    """A checkpoint file that could not be read or was refused, in one sentence naming folder, file and cause."""
    refused = isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err)
    if refused or isinstance(err, _UnsafeGlobals):
        names = ", ".join(err.names) if isinstance(err, _UnsafeGlobals) else _refused_global(str(err))
        return Problem("unsafe", f"checkpoint {folder} was refused: {path.name} holds {names} (Unsupported "
                                  "global), a class outside the allow-list of tensors and DeepSpeed's own "
                                  "classes, so it was not unpickled; DeepSpeed never writes one, so the file was "
                                  "altered or comes from elsewhere: restore the folder from a trusted copy or "
                                  "delete it.", f"{path.name} holds a class outside the allow-list")
    if isinstance(err, FileNotFoundError):
        cause = f"{path.name} is missing"
    elif path.is_file() and _zip_directory_missing(path):
        cause = f"{path.name} is truncated"
    elif record := re.search(r"PytorchStreamReader failed reading file ([^:]+): ([^.]+)", str(err)):
        cause = f"{path.name} is corrupt (its record {record.group(1)}: {record.group(2)})"  # a bad sector
    else:
        reason = str(err).split(". ")[0].removeprefix("PytorchStreamReader failed reading zip archive: ")
        cause = f"{path.name} is unreadable ({getattr(err, 'strerror', None) or reason})"
    return damage(folder, cause)


def damage(folder: Path, cause: str) -> Problem:
    return Problem("damaged", f"checkpoint {folder} is damaged: {cause}; resume from an older checkpoint "
                               "(train.resume=auto picks the newest intact one) or restore the file.", cause)


def _refused_global(message: str) -> str:
    """The class named in torch's weights_only refusal ("Unsupported global: GLOBAL a.b was not an allowed
    global ..."); the rest of that message (which suggests weights_only=False) is never passed on."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match.group(1) if match else "an object"


def _is_torch_reader_failure(err: RuntimeError) -> bool:
    # A torch zip archive cut short or corrupt: "PytorchStreamReader failed reading zip archive: failed finding
    # central directory" (and "... failed reading file data/3"). Any other RuntimeError is not ours to rename.
    return "PytorchStreamReader failed" in str(err)


def safe_load(path: str | Path, mmap: bool = False, map_location=None):
    """torch.load of a DeepSpeed checkpoint file with weights_only=True and DeepSpeed's own classes allowed;
    a truncated, unreadable or refused file raises UnreadableFile naming it."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(deepspeed_checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except RuntimeError as err:
        if not _is_torch_reader_failure(err):
            raise
        raise UnreadableFile(file_problem(path.parent, path, err)) from err
    except (OSError, EOFError, pickle.UnpicklingError, UnicodeDecodeError) as err:
        # OSError: missing, EIO, or EINVAL from torch's reader on a small cut-short file; EOFError,
        # UnicodeDecodeError: a pickle stream cut or garbled; UnpicklingError: weights_only refused a class.
        raise UnreadableFile(file_problem(path.parent, path, err)) from err


def load_checkpoint_file(path: str | Path) -> Any:
    """One DeepSpeed checkpoint file on the host, read as a resume reads it (weights_only, DeepSpeed's classes
    only); a damaged or refused file raises one CheckpointError sentence naming it."""
    try:
        return safe_load(path, map_location="cpu")
    except UnreadableFile as err:
        raise problem_error(err.problem, Path(path).parent) from None


@contextlib.contextmanager
def weights_only_deepspeed_loading():
    """Make DeepSpeed's checkpoint loading use `torch.load(weights_only=True)`: no arbitrary unpickling."""
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine as tce

    original = tce.TorchCheckpointEngine.load

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location=map_location)

    tce.TorchCheckpointEngine.load = load
    try:
        yield
    finally:
        tce.TorchCheckpointEngine.load = original


def _check_file(folder: Path, path: Path) -> Problem | None:
    """Cheap checks of one checkpoint file, without reading its tensors: the zip directory at its end (cut
    short?) and the classes its pickle names (only tensors and DeepSpeed's own classes)."""
    try:
        if _zip_directory_missing(path):
            return file_problem(folder, path, EOFError())
        with torch.serialization.safe_globals(deepspeed_checkpoint_globals()):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except RuntimeError as err:
        if not _is_torch_reader_failure(err):
            raise
        return file_problem(folder, path, err)
    except (OSError, ValueError, pickle.UnpicklingError) as err:  # not a torch zip; a garbled pickle stream
        return file_problem(folder, path, err)
    return file_problem(folder, path, _UnsafeGlobals(sorted(unsafe))) if unsafe else None


def _read_manifest(folder: Path) -> tuple[dict[str, dict[str, int]], Problem | None]:
    """name -> {"size", "crc32"} from a checkpoint's checksums.json; {} for a folder saved before it existed."""
    path = folder / MANIFEST
    if not path.is_file():
        return {}, None
    try:
        files = read_json(path)["files"]
        if all(Path(name).name == name and isinstance(sums.get("size"), int) and isinstance(sums.get("crc32"), int)
               for name, sums in files.items()):  # names of files in the folder itself, nothing outside it
            return files, None
    except DamagedFile as err:
        return {}, damage(folder, f"{MANIFEST} {err.why}")
    except (OSError, TypeError, KeyError, AttributeError):
        pass
    return {}, damage(folder, f"{MANIFEST} is not a checksum manifest (name -> size and crc32)")


def _crc32_of_file(path: Path) -> int:
    crc, buffer = 0, bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while read := handle.readinto(buffer):
            crc = zlib.crc32(view[:read], crc)
    return crc


def _verify_file(folder: Path, path: Path, saved: dict[str, int] | None) -> Problem | None:
    """Read one file whole and compare it with the size and CRC-32 its save recorded; a torch file without them
    (saved before checksums.json) against the CRC-32 of each record in its zip, which zipfile checks on reading."""
    try:
        if saved is None:
            if path.suffix == ".pt":
                with zipfile.ZipFile(path) as archive:
                    for record in archive.infolist():
                        with archive.open(record) as member:
                            while member.read(_CHUNK):
                                pass
            return None
        size = path.stat().st_size
        if size != saved["size"]:
            return damage(folder, f"{path.name} is truncated" if size < saved["size"] else
                           f"{path.name} has {size} bytes, {saved['size']} when it was saved")
        if _crc32_of_file(path) != saved["crc32"]:
            return damage(folder, f"{path.name} does not match the CRC-32 saved in {MANIFEST}")
    except zipfile.BadZipFile as err:  # "Bad CRC-32 for file 'archive/data/3'", "Bad magic number for file header"
        return damage(folder, f"{path.name} is corrupt ({str(err).rstrip('.')})")
    except OSError as err:
        return file_problem(folder, path, err)
    return None


def verify_share(folder: Path, rank: int, world: int) -> Problem | None:
    """This rank's share of the checks of every file a load reads: the `*.pt` files and those checksums.json lists
    (a missing one included). Each file is checked by one rank, the largest spread first over all ranks."""
    saved, problem = _read_manifest(folder)
    if problem is not None:
        return problem

    def size(name: str) -> int:
        return saved[name]["size"] if name in saved else (folder / name).stat().st_size

    names = sorted({path.name for path in folder.glob("*.pt")} | set(saved), key=lambda name: (-size(name), name))
    for name in names[rank::world]:
        path = folder / name
        if path.suffix == ".pt" and (problem := _check_file(folder, path)) is not None:
            return problem  # a class outside the allow-list is named as such, before any sum is compared
        if (problem := _verify_file(folder, path, saved.get(name))) is not None:
            return problem
    return None
