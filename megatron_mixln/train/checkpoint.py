"""Atomic DeepSpeed checkpoints (resume) and the consolidated export (safetensors + JSON config).

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

from megatron_mixln.config import ModelConfig, model_config_from_dict

CHECKPOINTS = "checkpoints"
LATEST = "latest"
PARTIAL = ".partial"
STATE_FILE = "trainer_state.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"


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


@contextlib.contextmanager
def _weights_only_deepspeed_loading():
    """Make DeepSpeed's checkpoint loading use `torch.load(weights_only=True)`: no arbitrary unpickling."""
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine as tce
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

    original = tce.TorchCheckpointEngine.load

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler]):
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


def export_consolidated(state_dict: dict[str, torch.Tensor], model_config: ModelConfig, out: str | Path,
                        extra: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` (PAPER.md parameter names) and `config.json` into folder `out`, atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(out.name + PARTIAL)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state_dict.items()}
    save_file(tensors, str(tmp / EXPORT_WEIGHTS), metadata={"format": "pt"})
    _publish_export(tmp, out, model_config, extra)
    return out


def _publish_export(tmp: Path, out: Path, model_config: ModelConfig, extra: dict[str, Any] | None) -> None:
    """Write the export's config.json into the finished temporary folder, then move it into place whole."""
    from megatron_mixln.model.norms import norm_placement

    placements = [norm_placement(i, model_config.num_layers, model_config) for i in range(model_config.num_layers)]
    config = {"model": vars(model_config).copy(), "layer_placements": placements, **(extra or {})}
    (tmp / EXPORT_CONFIG).write_text(json.dumps(config, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def read_export(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a consolidated export: its ModelConfig and tensors (safetensors: never unpickles)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model_config, files = export_files(folder)
    tensors = {}
    for path in files:
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file ({err}).") from None
    return model_config, tensors


def export_files(folder: str | Path) -> tuple[ModelConfig, list[Path]]:
    """An export's ModelConfig and its weight files (one, or one per pipeline stage)."""
    folder = Path(folder)
    config_path = folder / EXPORT_CONFIG
    files = sorted(folder.glob("model*.safetensors"))
    if not config_path.is_file() or not files:
        raise CheckpointError(f"{folder} is not an export folder: it must hold {EXPORT_CONFIG} and "
                              f"{EXPORT_WEIGHTS} (or per-stage shards such as model-00001-of-00002.safetensors).")
    try:
        raw = json.loads(config_path.read_text())
        model_config = model_config_from_dict(raw["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{config_path} is not a megatron_mixln export config ({err!r}).") from None
    return model_config, files


def load_exported_model(folder: str | Path, device: str | torch.device = "cpu"):
    """Build the model described by an export folder and load its weights (strict names and shapes)."""
    from megatron_mixln.model import MixLNForCausalLM

    model_config, tensors = read_export(folder)
    with torch.device("meta"):  # no throw-away random initialisation
        model = MixLNForCausalLM(model_config)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"{folder} does not match its config: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}.")
    return model.to(device=device)


def module_state_from_checkpoint(folder: str | Path) -> dict[str, torch.Tensor]:
    """The model weights stored in a (TP=1, PP=1) DeepSpeed checkpoint folder, loaded with weights_only=True."""
    folder = Path(folder)
    path = folder / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {folder} was saved with tensor or pipeline parallelism; use the "
                              "consolidated export the run writes (<out_dir>/export) instead.")
    return torch.load(path, map_location="cpu", weights_only=True)["module"]


def gathered(param):
    """A context making a ZeRO-3 partitioned parameter whole (a no-op for any other parameter)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
    return contextlib.nullcontext()


def full_named_parameters(module: torch.nn.Module, model_config: ModelConfig, layout):
    """Yield (consolidated name, full CPU tensor) for every parameter of this rank's pipeline stage.

    Collective: every rank of the job must iterate (ZeRO-3 gathers, tensor-parallel all-gathers).
    """
    from megatron_mixln.model.stages import consolidated_name

    tp = layout.tensor_parallel
    for local_name, param in module.named_parameters():
        name = consolidated_name(local_name, model_config.num_layers) if layout.pp > 1 else local_name
        with gathered(param):
            value = param.detach().clone()
        dim = getattr(param, "partition_dim", None)
        if dim is not None and tp.size > 1:
            pieces = [torch.empty_like(value) for _ in range(tp.size)]
            dist.all_gather(pieces, value.contiguous(), group=tp.group)
            value = torch.cat(pieces, dim=dim)
        yield name, value.cpu()


def export_from_module(module: torch.nn.Module, model_config: ModelConfig, layout, out: str | Path,
                       extra: dict[str, Any] | None = None) -> Path:
    """Consolidated export from any layout: full tensors under PAPER.md names, one file per pipeline stage.

    Collective. The first TP/DP rank of each stage writes its stage's tensors; the folder appears whole.
    """
    out = Path(out)
    tmp = out.with_name(out.name + PARTIAL)
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    tensors = dict(full_named_parameters(module, model_config, layout))
    writer = layout.dp_rank == 0 and layout.tensor_parallel.rank == 0
    if writer:
        from safetensors.torch import save_file

        file = EXPORT_WEIGHTS if layout.pp == 1 else f"model-{layout.stage + 1:05d}-of-{layout.pp:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / file), metadata={"format": "pt"})
    _barrier()
    if _is_rank0():
        _publish_export(tmp, out, model_config, extra)
    _barrier()
    return out


@torch.no_grad()
def load_export_into(module: torch.nn.Module, folder: str | Path, model_config: ModelConfig, layout) -> None:
    """Load a consolidated export into this rank's part of the model, whatever layout wrote it.

    Each rank reads only its slices (safetensors get_slice): a TP shard of a stage's parameters.
    """
    from safetensors import safe_open

    from megatron_mixln.model.stages import consolidated_name

    saved_config, files = export_files(folder)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "norm_placement"):
        if getattr(saved_config, field) != getattr(model_config, field):
            raise CheckpointError(f"{folder} holds a model with {field}={getattr(saved_config, field)!r}, but this run "
                                  f"has model.{field}={getattr(model_config, field)!r}.")
    handles = [safe_open(str(path), framework="pt") for path in files]
    where = {name: handle for handle in handles for name in handle.keys()}
    tp = layout.tensor_parallel
    for local_name, param in module.named_parameters():
        name = consolidated_name(local_name, model_config.num_layers) if layout.pp > 1 else local_name
        if name not in where:
            raise CheckpointError(f"{folder} has no tensor {name!r}.")
        piece = where[name].get_slice(name)
        dim = getattr(param, "partition_dim", None)
        with gathered(param):
            if dim is None or tp.size == 1:
                value = piece[:]
            else:
                size = param.shape[dim]
                index = [slice(None)] * len(param.shape)
                index[dim] = slice(tp.rank * size, (tp.rank + 1) * size)
                value = piece[tuple(index)]
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"{folder}: {name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}.")
            param.data.copy_(value)
