"""Atomic DeepSpeed checkpoints: save, find, load (resume). The integrity of their files (checksums, safe loading,
damaged files) is train/checkpoint_files.py; the consolidated export is train/export.py.

Layout under `<out_dir>/checkpoints/`: one folder per saved step (`step_00000100/`) and a `latest` file
naming the newest complete one. A save writes `<tag>.partial/`, renames it to `<tag>/` once every rank
has finished, and only then rewrites `latest`; a run killed during a save leaves the previous
checkpoint and `latest` untouched. Each rank sums the files it writes while writing them (CRC-32), and rank 0
writes every file's size and sum to `checksums.json` before the rename. A save that fails (a full disk, a
quota) removes its `<tag>.partial/` at once and raises one CheckpointError sentence on every rank.

Loading first reads every file of the folder back against `checksums.json`, each rank a share (a folder saved
before it: against the CRC-32 torch's zip format stores for each record), so a flipped bit is found before
anything is loaded. Loading is collective: every rank reaches the same verdict on a folder (an all-reduce of
a per-rank flag) before DeepSpeed touches the engine and again after it, so one rank's truncated shard cannot
send the ranks different ways. `load_latest_intact` (train.resume=auto) falls back to the newest intact folder
when the newest is damaged (a file missing, cut short or not matching its sum, a state file that is not UTF-8
JSON); a folder of another model shape or one holding a class outside the allow-list stops the run instead,
since an older folder of the same run would not be any different (shape) or because it means the files were
altered (class).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_mixln.saved_files import CheckpointError, DamagedFile, read_json
from megatron_mixln.train.checkpoint_files import (MANIFEST, CheckpointDamaged, Problem, SummingFile, UnreadableFile,
                                                   damage, file_problem, problem_error, safe_load, verify_share,
                                                   weights_only_deepspeed_loading)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
PARTIAL = ".partial"
DAMAGED = ".damaged"
STATE_FILE = "trainer_state.json"
STEP_FOLDER = re.compile(r"step_(\d{8,})")  # exactly what tag_for_step writes: not .partial, not .damaged


def _read_pointer(path: Path) -> str:
    """The folder name a `latest` file holds; bytes that are not UTF-8 come back as U+FFFD, which names no folder."""
    return path.read_bytes().decode("utf-8", errors="replace").strip()


def step_of(folder: str | Path) -> int:
    """The step of a checkpoint folder named as tag_for_step names it."""
    return int(STEP_FOLDER.fullmatch(Path(folder).name).group(1))


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    # NCCL serves CUDA tensors only; gloo (CPU runs) serves host tensors.
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _agree(problem: Problem | None) -> Problem | None:
    """Every rank's verdict, the same on every rank: None when no rank found a problem, else the lowest failing
    rank's. Costs one all-reduce of one number when all is well; the problems travel only when there is one."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return problem
    failed = torch.tensor([0 if problem is None else 1], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(failed)
    if int(failed.item()) == 0:
        return None
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, problem)
    return next(p for p in found if p is not None)


def _fsync_dir(path: Path) -> None:
    """Persist a folder's entries (a rename, a new file): without it a power loss can undo the rename."""
    with contextlib.suppress(OSError):  # some file systems refuse to open a folder; the data itself is synced
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind `err`: torch.save reports a failed write as a RuntimeError ("unexpected pos") whose
    context is the OSError of the file object it wrote to (ENOSPC, EDQUOT, EIO)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


# ---------------------------------------------------------------------------------------------------- finding


def _step_folders(root: Path) -> list[Path]:
    """The complete-named checkpoint folders under `root`, newest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_FOLDER.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=step_of, reverse=True)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None when it has none."""
    root = Path(out_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    folder = root / _read_pointer(pointer)
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} names {folder.name!r}, which is not a complete checkpoint folder; "
                              f"point it at one of: {', '.join(p.name for p in _step_folders(root)) or 'none'}.")
    return folder


def checkpoint_candidates(out_dir: str | Path) -> list[Path]:
    """The folders train.resume=auto may continue from, in the order it tries them: the one `latest` names, then
    older step folders, newest first. Folders newer than `latest` are left out: a save that died between its
    two renames never became the run's checkpoint. Without a `latest`, every step folder. Empty: a fresh run."""
    root = Path(out_dir) / CHECKPOINTS
    folders = _step_folders(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return folders
    match = STEP_FOLDER.fullmatch(_read_pointer(pointer))
    if match is None:  # not a name a save writes (edited by hand): every step folder, newest first
        return folders
    newest = int(match.group(1))
    return [root / match.group(0), *(p for p in folders if step_of(p) < newest)]


def remove_partial_saves(out_dir: str | Path) -> None:
    """Delete leftovers of saves that were killed half-way (never referenced by `latest`)."""
    root = Path(out_dir) / CHECKPOINTS
    if _is_rank0() and root.is_dir():
        for leftover in root.glob(f"*{PARTIAL}"):
            shutil.rmtree(leftover, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (root / (LATEST + ".tmp")).unlink()
    _barrier()


# ---------------------------------------------------------------------------------------------------- saving


@contextlib.contextmanager
def _recording_write_failures(engine, failures: list[tuple[str, OSError]], written: dict[str, dict[str, int]]):
    """During engine.save_checkpoint: every file DeepSpeed writes goes through a file object we open and fsync
    (so a failed write keeps its errno, and a renamed folder holds data that reached the disk), and its size and
    CRC-32 are recorded in `written` under its name; a failed write or folder creation is recorded in `failures`
    instead of raised, and this rank writes nothing more.

    Recording instead of raising keeps this rank in step with DeepSpeed's collectives inside the save (its
    final barrier, ZeRO-3 gathers): a rank that left the save early would leave the others waiting there."""
    from deepspeed.runtime.checkpoint_engine import checkpoint_engine as base
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine as tce

    original_save, original_makedirs = tce.TorchCheckpointEngine.save, base.CheckpointEngine.makedirs
    original_script = engine._copy_recovery_script

    def save(self, state_dict, path: str):
        if failures:
            return
        try:
            with open(path, "wb") as handle:
                summing = SummingFile(handle)
                torch.save(state_dict, summing, _use_new_zipfile_serialization=self.zipfile_serialization)
                handle.flush()
                os.fsync(handle.fileno())
                written[Path(path).name] = {"size": handle.tell(), "crc32": summing.crc32}
        except RuntimeError as err:  # torch's writer: "[enforce fail at inline_container.cc] unexpected pos"
            cause = _os_error_in(err)
            if cause is None:
                raise
            failures.append((path, cause))
        except OSError as err:  # open, flush, fsync, close
            failures.append((path, err))

    def makedirs(self, path, exist_ok=False):
        try:
            original_makedirs(self, path, exist_ok=exist_ok)
        except OSError as err:
            failures.append((path, err))

    def copy_recovery_script(save_path):  # DeepSpeed copies zero_to_fp32.py next to the checkpoints (rank 0)
        if failures:
            return
        try:
            original_script(save_path)
        except OSError as err:
            failures.append((os.path.join(save_path, "zero_to_fp32.py"), err))

    tce.TorchCheckpointEngine.save, base.CheckpointEngine.makedirs = save, makedirs
    engine._copy_recovery_script = copy_recovery_script
    try:
        yield
    finally:
        tce.TorchCheckpointEngine.save, base.CheckpointEngine.makedirs = original_save, original_makedirs
        del engine._copy_recovery_script  # back to the class's method


def _save_failed(root: Path, tag: str, path: str | Path, err: OSError) -> Problem:
    previous = _read_pointer(root / LATEST) if (root / LATEST).is_file() else None
    return Problem("write", f"saving checkpoint {tag} in {root} failed: writing {Path(path).name} failed "
                             f"({(err.strerror or str(err)).lower()}); the half-written {tag}{PARTIAL} was removed "
                             + (f"and {root / LATEST} still names {previous}" if previous else
                                "(the run has no earlier checkpoint)")
                             + "; free space (or lower train.keep_checkpoints) and resume with train.resume=auto.",
                    (err.strerror or str(err)).lower())


def _abandon_save(root: Path, partial_tag: str, problem: Problem) -> CheckpointError:
    """Every rank agreed the save failed: rank 0 removes the half-written folder now (it holds disk space the
    user needs back) and every rank raises the same sentence."""
    if _is_rank0():
        shutil.rmtree(root / partial_tag, ignore_errors=True)
        with contextlib.suppress(OSError):
            (root / (LATEST + ".tmp")).unlink()
    _barrier()
    return CheckpointError(problem.message)


def _all_ranks_files(written: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The files every rank wrote, with their sizes and sums (each rank writes its own files)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(written)
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, written)
    return {name: sums for rank_files in found for name, sums in rank_files.items()}


def save_checkpoint(engine, out_dir: str | Path, step: int, trainer_state: dict[str, Any], keep: int,
                    keep_before: int | None = None) -> Path:
    """Save engine state (weights, optimiser, LR schedule) and `trainer_state` for step `step`, atomically, with
    the size and CRC-32 of every file in `checksums.json`. Old checkpoints beyond the `keep` newest are removed,
    except the newest one before step `keep_before` (the loss-spike guard's way back, train/guard.py).

    On a failed write on any rank (ENOSPC, EDQUOT, EIO, ...) every rank raises the same CheckpointError; the
    `<tag>.partial` folder is gone and `latest` still names the previous checkpoint."""
    root = Path(out_dir) / CHECKPOINTS
    tag = tag_for_step(step)
    partial_tag = tag + PARTIAL
    problem = None
    if _is_rank0():
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(root / partial_tag, ignore_errors=True)
        except OSError as err:
            problem = _save_failed(root, tag, root, err)
    if (problem := _agree(problem)) is not None:
        raise _abandon_save(root, partial_tag, problem)

    failures: list[tuple[str, OSError]] = []
    written: dict[str, dict[str, int]] = {}
    with _recording_write_failures(engine, failures, written):
        engine.save_checkpoint(str(root), tag=partial_tag, save_latest=False)
    problem = _save_failed(root, tag, *failures[0]) if failures else None
    if (problem := _agree(problem)) is not None:
        raise _abandon_save(root, partial_tag, problem)
    files = _all_ranks_files(written)

    final = root / tag
    if _is_rank0():
        writing = root / partial_tag / STATE_FILE
        try:
            # Everything that needs space first; the renames after it do not.
            state = json.dumps({**trainer_state, "step": step}, indent=1)  # ASCII: json escapes the rest
            _atomic_write_text(writing, state)
            files[STATE_FILE] = {"size": len(state), "crc32": zlib.crc32(state.encode())}
            writing = root / partial_tag / MANIFEST
            _atomic_write_text(writing, json.dumps({"checksum": "crc32", "files": files}, indent=1))
            writing = root / (LATEST + ".tmp")
            writing.write_text(tag)
            with open(writing, "rb+") as handle:
                os.fsync(handle.fileno())
            _fsync_dir(root / partial_tag)
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.replace(root / partial_tag, final)
            os.replace(writing, root / LATEST)
            _fsync_dir(root)
        except OSError as err:
            problem = _save_failed(root, tag, writing, err)
        else:
            # Keep the `keep` newest up to this step. Never this save itself, and never a folder newer than it:
            # that one is from before a resume from an older checkpoint, and is replaced when its step is saved.
            older = [p for p in _step_folders(root) if step_of(p) < step]
            way_back = next((p for p in older if keep_before is not None and step_of(p) < keep_before), None)
            for old in older[keep - 1:]:
                if old != way_back:
                    shutil.rmtree(old, ignore_errors=True)
    if (problem := _agree(problem)) is not None:
        raise _abandon_save(root, partial_tag, problem)
    return final


# ---------------------------------------------------------------------------------------------------- loading


def verify_checkpoint(folder: str | Path) -> None:
    """Check every file of a checkpoint folder in this process, as a resume does before loading: raises
    CheckpointDamaged (missing, cut short, not matching its sum) or CheckpointError (a class outside the allow-list)."""
    folder = Path(folder)
    _, problem = _read_state(folder)
    if problem is None:
        problem = verify_share(folder, 0, 1)
    if problem is not None:
        raise problem_error(problem, folder)


def _shape_difference(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """name -> shape in the checkpoint vs in this model: what differs, in words."""
    differences = []
    for name, shape in current.items():
        if name not in saved:
            differences.append(f"{name} is missing there")
        elif tuple(saved[name]) != tuple(shape):
            differences.append(f"{name} is {list(saved[name])} there and {list(shape)} in this model")
    differences += [f"{name} is not in this model" for name in saved if name not in current]
    return differences


def _foreign_shape(engine, folder: Path, saved: dict[str, Any]) -> Problem | None:
    """Compare the parameter shapes a checkpoint holds with this engine's model, before DeepSpeed loads it:
    under ZeRO-3 a different shape would surface only as a tensor-size error deep in the optimiser."""
    if saved.get("param_shapes") and engine.zero_optimization():
        before = {n: s for group in saved["param_shapes"] for n, s in group.items()}
        now = {n: s for group in engine._get_zero_param_shapes() for n, s in group.items()}
    elif isinstance(saved.get("module"), dict):
        before = {n: t.shape for n, t in saved["module"].items() if isinstance(t, torch.Tensor)}
        now = {n: t.shape for n, t in engine.module.state_dict().items()}
    else:
        return None  # a pipeline stage without ZeRO: its layer files are checked as DeepSpeed loads them
    differences = _shape_difference(before, now)
    return _foreign(folder, differences) if differences else None


def _foreign(folder: Path, differences: list[str]) -> Problem:
    more = f" (and {len(differences) - 1} more differences)" if len(differences) > 1 else ""
    return Problem("foreign", f"checkpoint {folder} was saved by a model of another shape: {differences[0]}{more}; "
                               f"resume it with the model settings it was saved with (its {STATE_FILE} holds them) "
                               "or start a new run in another train.out_dir.", "another model shape")


def _state_dict_mismatch(folder: Path, err: RuntimeError) -> Problem | None:
    """torch's load_state_dict refusal ("Error(s) in loading state_dict for X:" and one line per parameter,
    ~40-70 lines) as one sentence; None for any other RuntimeError."""
    message = str(err)
    if not message.startswith("Error(s) in loading state_dict for"):
        return None
    differences = [f"{m.group(1)} is {m.group(2)} there and {m.group(3)} in this model" for m in re.finditer(
        r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[\d, ]*\])\) from checkpoint, "
        r"the shape in current model is torch\.Size\((\[[\d, ]*\])\)", message)]
    for label, words in (("Missing key(s)", "is missing there"), ("Unexpected key(s)", "is not in this model")):
        for line in re.findall(re.escape(label) + r" in state_dict: (.*)", message):
            differences += [f"{name} {words}" for name in re.findall(r'"([^"]+)"', line)]
    return _foreign(folder, differences or [message.splitlines()[0]])


def _preflight(engine, folder: Path) -> Problem | None:
    """This rank's share of the checks made before DeepSpeed loads anything: every file of the folder is read
    whole by one rank (its zip directory, its pickle's class names and its CRC-32), and each rank checks that its
    own model-states file exists and holds this model's parameter shapes."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if (problem := verify_share(folder, rank, world)) is not None:
        return problem
    own = Path(engine._get_ckpt_name(str(folder.parent), folder.name))
    if not own.is_file():
        return file_problem(folder, own, FileNotFoundError())
    try:
        saved = safe_load(own, mmap=True, map_location="cpu")  # mmap: shapes without reading the tensors
    except UnreadableFile as err:
        return err.problem
    return _foreign_shape(engine, folder, saved)


def _read_state(folder: Path) -> tuple[dict[str, Any] | None, Problem | None]:
    state_path = folder / STATE_FILE
    if not folder.is_dir():
        cause = f"{folder.name} does not exist"
    elif not state_path.is_file():
        cause = f"it has no {STATE_FILE}"
    else:
        try:
            return read_json(state_path), None
        except DamagedFile as err:
            return None, damage(folder, f"{STATE_FILE} {err.why}")
        except OSError as err:
            return None, damage(folder, f"{STATE_FILE} is unreadable ({err.strerror})")
    return None, Problem("damaged", f"{folder} is not a usable checkpoint folder: {cause} (expected a folder like "
                                     f"<out_dir>/{CHECKPOINTS}/step_00000100 written by a completed save).", cause)


def load_checkpoint(engine, folder: str | Path) -> dict[str, Any]:
    """Restore engine state (weights, optimiser, LR schedule) from a checkpoint folder; returns the trainer state
    saved with it. Collective: every rank calls it and every rank raises the same sentence.

    Raises CheckpointDamaged (a CheckpointError) for a missing, truncated or unreadable file, and CheckpointError
    for a file holding a class outside the allow-list or a checkpoint of another model shape or layout."""
    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    folder = Path(folder)
    state, problem = _read_state(folder)
    if problem is None:
        problem = _preflight(engine, folder)
    if (problem := _agree(problem)) is not None:
        raise problem_error(problem, folder)
    # The preflight found every file whole and this model's shapes; what DeepSpeed still reports is caught here
    # (a bad sector inside a tensor record, a pipeline stage's layer file of another shape) and agreed on again.
    # Such a failure on some ranks only, while the others go on into DeepSpeed's own collectives, cannot be
    # rescued from here: the preflight is there so that damaged files never get that far.
    try:
        with weights_only_deepspeed_loading():
            load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        problem = None if load_path is not None else Problem(
            "damaged", f"checkpoint {folder} is damaged: DeepSpeed found no model-states file it could load; "
                       "resume from an older checkpoint or restore the folder.", "no loadable model-states file")
    except UnreadableFile as err:
        problem = err.problem
    except RuntimeError as err:
        if (problem := _state_dict_mismatch(folder, err)) is None:
            raise
    except ZeRORuntimeException as err:  # "The checkpoint being loaded used a DP world size of 2 but ..."
        if "DP world size" not in str(err):
            raise
        from megatron_mixln.train.resume import other_data_parallel_size

        way_on = other_data_parallel_size(folder, "<out_dir>", (state or {}).get("step"),
                                          "as many processes as the run that saved it")
        problem = Problem("foreign", f"checkpoint {folder} was saved with another number of data-parallel ranks "
                                      f"({str(err).split('. ')[0].removeprefix('The checkpoint being loaded used ')}"
                                      f"); {way_on}.", "another data-parallel size")
    if (problem := _agree(problem)) is not None:
        raise problem_error(problem, folder)
    _relink_optimizer_states(engine.optimizer)
    return state


def _relink_optimizer_states(optimizer) -> None:
    """After a load into an engine that has already stepped (a guard rollback): DeepSpeed 0.19.8's bf16 and
    ZeRO-1/2 optimisers re-link each parameter's fp32 fragment when they load optimiser states
    (`_link_all_hp_params`), which drops the fragment's link to the Adam moments, but they leave
    `_hp_optimizer_states_linked` set, so the moments are never linked again and safe_get_full_optimizer_state (the
    export) fails. A fresh engine has not linked them yet and links them at its first step, as before."""
    if getattr(optimizer, "_hp_optimizer_states_linked", False):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def load_latest_intact(engine, out_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """train.resume=auto: load the newest intact checkpoint of `out_dir` into `engine`; returns (folder, trainer
    state), or None when the run has no checkpoint (a fresh start). Collective: call it on every rank.

    Tries the folder `latest` names, then older `step_*` folders newest first. A damaged one (missing,
    truncated or unreadable file, no trainer_state.json) is renamed `<tag>.damaged` (kept for inspection,
    never tried again) and rank 0 prints `checkpoint step_X is damaged (cause); resuming from step_Y instead`.
    Each attempt loads module, optimiser and LR schedule whole, so a half-done load of a damaged folder leaves
    nothing behind. Raises CheckpointError when no folder is intact, and at once for a folder of another model
    shape or one holding a class outside the allow-list (an older folder cannot fix either)."""
    root = Path(out_dir) / CHECKPOINTS
    damaged: list[CheckpointDamaged] = []
    for folder in checkpoint_candidates(out_dir):
        try:
            state = load_checkpoint(engine, folder)
        except CheckpointDamaged as err:
            damaged.append(err)
            continue
        if damaged:
            _set_aside(root, damaged, folder)
        return folder, state
    if not damaged:
        return None
    raise CheckpointError(f"no intact checkpoint in {root}: " + "; ".join(f"{err.folder.name} is damaged ({err.cause})"
                                                                          for err in damaged)
                          + "; restore one of them, or move the folder aside to start the run over.")


def _set_aside(root: Path, damaged: list[CheckpointDamaged], resumed: Path) -> None:
    """After falling back: say so in one line, rename the damaged folders `<tag>.damaged` (so that neither a later
    resume nor the pruning of old checkpoints mistakes them for good ones) and point `latest` at the folder
    resumed from."""
    if _is_rank0():
        for err in damaged:
            if err.folder.is_dir():
                with contextlib.suppress(OSError):  # left in place, it is only tried (and passed over) again
                    shutil.rmtree(err.folder.with_name(err.folder.name + DAMAGED), ignore_errors=True)
                    os.replace(err.folder, err.folder.with_name(err.folder.name + DAMAGED))
        with contextlib.suppress(OSError):  # until the next save, `latest` may still name the damaged folder
            _atomic_write_text(root / LATEST, resumed.name)
        what = "; ".join(f"{err.folder.name} is damaged ({err.cause})" for err in damaged)
        print(f"checkpoint {what}; resuming from {resumed.name} instead (the damaged folder is kept as "
              f"<tag>{DAMAGED} in {root})", flush=True)
    _barrier()
