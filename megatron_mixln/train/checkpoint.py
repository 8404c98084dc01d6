"""Atomic DeepSpeed checkpoints: save, find, load safely (resume). The consolidated export is train/export.py.

Layout under `<out_dir>/checkpoints/`: one folder per saved step (`step_00000100/`) and a `latest` file
naming the newest complete one. A save writes `<tag>.partial/`, renames it to `<tag>/` once every rank
has finished, and only then rewrites `latest`; a run killed during a save leaves the previous
checkpoint and `latest` untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

CHECKPOINTS = "checkpoints"
LATEST = "latest"
PARTIAL = ".partial"
STATE_FILE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint or export that cannot be used; the message names the path and what is wrong."""


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None when it has none."""
    root = Path(out_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text().strip()
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} names {folder.name!r}, which is not a complete checkpoint folder; "
                              f"point it at one of: {', '.join(sorted(p.name for p in root.glob('step_*'))) or 'none'}.")
    return folder


def remove_partial_saves(out_dir: str | Path) -> None:
    """Delete leftovers of saves that were killed half-way (never referenced by `latest`)."""
    if _is_rank0() and (Path(out_dir) / CHECKPOINTS).is_dir():
        for leftover in (Path(out_dir) / CHECKPOINTS).glob(f"*{PARTIAL}"):
            shutil.rmtree(leftover, ignore_errors=True)
    _barrier()


def save_checkpoint(engine, out_dir: str | Path, step: int, trainer_state: dict[str, Any], keep: int) -> Path:
    """Save engine state (weights, optimiser, LR schedule) and `trainer_state` for step `step`, atomically."""
    root = Path(out_dir) / CHECKPOINTS
    tag = tag_for_step(step)
    partial_tag = tag + PARTIAL
    if _is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / partial_tag, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(root), tag=partial_tag, save_latest=False)
    _barrier()
    final = root / tag
    if _is_rank0():
        _atomic_write_text(root / partial_tag / STATE_FILE, json.dumps({**trainer_state, "step": step}, indent=1))
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(root / partial_tag, final)
        _atomic_write_text(root / LATEST, tag)
        for old in sorted(p for p in root.glob("step_*") if not p.name.endswith(PARTIAL))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def deepspeed_checkpoint_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19.8 pickles into its checkpoint files, and nothing else: the loss
    scaler (ZeRO optimiser files), the ZeRO stage enum (ZeRO-1/2/3) and the parameter fragment addresses
    (ZeRO-1/2 and the bf16 optimiser). Found with torch.serialization.get_unsafe_globals_in_checkpoint."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _weights_only_deepspeed_loading():
    """Make DeepSpeed's checkpoint loading use `torch.load(weights_only=True)`: no arbitrary unpickling."""
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine as tce

    original = tce.TorchCheckpointEngine.load
    allowed = deepspeed_checkpoint_globals()

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    tce.TorchCheckpointEngine.load = load
    try:
        yield
    finally:
        tce.TorchCheckpointEngine.load = original


def load_checkpoint(engine, folder: str | Path) -> dict[str, Any]:
    """Restore engine state from a checkpoint folder; returns the trainer state saved with it."""
    folder = Path(folder)
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{folder} is not a checkpoint folder: it has no {STATE_FILE} "
                              f"(expected a folder like <out_dir>/{CHECKPOINTS}/step_00000100).")
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{state_path} is not valid JSON ({err}); the checkpoint is damaged.") from None
    with _weights_only_deepspeed_loading():
        load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint in {folder}; it is incomplete or damaged.")
    return state


def module_state_from_checkpoint(folder: str | Path) -> dict[str, torch.Tensor]:
    """The model weights stored in a (TP=1, PP=1) DeepSpeed checkpoint folder, loaded with weights_only=True."""
    folder = Path(folder)
    path = folder / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {folder} was saved with tensor or pipeline parallelism; use the "
                              "consolidated export the run writes (<out_dir>/export) instead.")
    return torch.load(path, map_location="cpu", weights_only=True)["module"]
