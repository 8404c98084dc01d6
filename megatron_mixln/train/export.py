"""The consolidated export: full tensors under HF LLaMA names (docs/method.md#parameter-names) in per-unit
safetensors shards with Hugging Face's index, plus config.json, written from any parallel layout and loaded
into any other. It is how a run leaves the stack (mixln-eval, transformers) and how it moves between layouts.
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
from megatron_mixln.train.checkpoint import PARTIAL, CheckpointError, _barrier, _is_rank0

EXPORT_WEIGHTS = "model.safetensors"  # older exports: all weights in one file
EXPORT_INDEX = "model.safetensors.index.json"  # transformers' SAFE_WEIGHTS_INDEX_NAME: name -> shard file
EXPORT_CONFIG = "config.json"


def export_unit(name: str, num_layers: int) -> int:
    """The export shard a consolidated parameter lives in: 0 the embedding, i + 1 decoder layer i, and
    num_layers + 1 the final norm and LM head. A unit never spans two pipeline stages."""
    from megatron_mixln.model import layer_index_of

    if name.startswith("model.embed_tokens."):
        return 0
    index = layer_index_of(name)
    return num_layers + 1 if index is None else index + 1


def export_unit_file(unit: int, num_layers: int) -> str:
    """Shard file name of a unit, in transformers' `model-00001-of-000NN.safetensors` pattern."""
    return f"model-{unit + 1:05d}-of-{num_layers + 2:05d}.safetensors"


class _UnitWriter:
    """Writes (name, tensor) pairs that arrive unit by unit as one safetensors file per unit.

    Only the unit being filled is referenced: it is written and dropped when the first tensor of the next
    unit arrives (or at `close`), so a writer's host memory is bounded by one layer, not a pipeline stage.
    safetensors writes straight from the tensors' memory, so a write adds no copy either.
    """

    def __init__(self, folder: Path, num_layers: int):
        self.folder, self.num_layers = folder, num_layers
        self.unit: int | None = None
        self.pending: dict[str, torch.Tensor] = {}
        self.index: dict[str, tuple[str, int]] = {}  # name -> (file, bytes), for the index at publish time
        self.done: set[int] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        unit = export_unit(name, self.num_layers)
        if unit != self.unit:
            self._flush()
            if unit in self.done:  # a safetensors file cannot be appended to; callers order by unit
                raise RuntimeError(f"export: {name} arrived after its shard was written; parameters must come "
                                   "grouped by unit (embedding, layer 0, layer 1, ..., norm + LM head).")
            self.unit = unit
        self.pending[name] = tensor.detach().to("cpu").contiguous()

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        file = export_unit_file(self.unit, self.num_layers)
        save_file(self.pending, str(self.folder / file), metadata={"format": "pt"})
        self.index.update({name: (file, t.numel() * t.element_size()) for name, t in self.pending.items()})
        self.done.add(self.unit)
        self.pending = {}  # a new dict: the written tensors are freed now, not when the next unit is full


def _return_freed_host_memory() -> None:
    """Hand heap memory freed by earlier export units back to the OS (glibc malloc_trim; a no-op elsewhere).

    glibc serves tensors below its adaptive mmap threshold (up to 32 MiB) from the heap and keeps what is
    freed; with gathered parameters and their copies interleaved, the holes fragment, and a 1B ZeRO-3 export
    measured 0.9-1.8 GB above its pre-export RSS instead of the 0.5 GB it holds at most (two 250 MB tensors).
    """
    import ctypes

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def export_consolidated(state_dict: dict[str, torch.Tensor], model_config: ModelConfig, out: str | Path,
                        extra: dict[str, Any] | None = None) -> Path:
    """Write per-unit safetensors shards (HF LLaMA names, docs/method.md#parameter-names), their index and
    `config.json` into `out`, atomically."""
    out = Path(out)
    tmp = out.with_name(out.name + PARTIAL)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = _UnitWriter(tmp, model_config.num_layers)
    # A stable sort: any state-dict order works, and names keep their order inside a unit.
    for name, tensor in sorted(state_dict.items(), key=lambda item: export_unit(item[0], model_config.num_layers)):
        writer.add(name, tensor)
    writer.close()
    _publish_export(tmp, out, model_config, extra, writer.index)
    return out


def _publish_export(tmp: Path, out: Path, model_config: ModelConfig, extra: dict[str, Any] | None,
                    index: dict[str, tuple[str, int]]) -> None:
    """Write the shard index and config.json into the finished temporary folder, then move it into place whole."""
    from megatron_mixln.model.norms import norm_placement

    expected = {export_unit_file(unit, model_config.num_layers) for unit in range(model_config.num_layers + 2)}
    written = {file for file, _ in index.values()}
    if written != expected:  # a rank that did not write its stage: never publish a partial model
        raise RuntimeError(f"export in {tmp} is incomplete: shards {sorted(expected - written)} were not written "
                           f"(and {sorted(written - expected)} were not expected).")
    weights = {"metadata": {"total_size": sum(size for _, size in index.values())},
               "weight_map": {name: file for name, (file, _) in index.items()}}
    (tmp / EXPORT_INDEX).write_text(json.dumps(weights, indent=2, sort_keys=True) + "\n")
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


def _export_weight_map(index_path: Path) -> dict[str, str]:
    """The name -> shard file map of an export's `model.safetensors.index.json`."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        valid = isinstance(weight_map, dict) and all(
            isinstance(file, str) and Path(file).name == file and file.endswith(".safetensors")
            for file in weight_map.values())
    except (json.JSONDecodeError, KeyError, TypeError):
        valid = False
    if not valid:
        raise CheckpointError(f"{index_path} is not a safetensors shard index: it must be JSON with a \"weight_map\" "
                              "of tensor name -> shard file name (a *.safetensors file in the same folder).")
    return weight_map


def export_files(folder: str | Path) -> tuple[ModelConfig, list[Path]]:
    """An export's ModelConfig and its weight files: the shards its index lists, or for older exports
    `model.safetensors` or one file per pipeline stage."""
    folder = Path(folder)
    config_path = folder / EXPORT_CONFIG
    if (folder / EXPORT_INDEX).is_file():
        files = [folder / file for file in sorted(set(_export_weight_map(folder / EXPORT_INDEX).values()))]
        missing = [path.name for path in files if not path.is_file()]
        if missing:
            raise CheckpointError(f"{folder / EXPORT_INDEX} lists {missing[0]}, which is not in {folder}: "
                                  "the export is incomplete; copy the missing shard or export again.")
    else:
        files = sorted(folder.glob("model*.safetensors"))
    if not config_path.is_file() or not files:
        raise CheckpointError(f"{folder} is not an export folder: it must hold {EXPORT_CONFIG} and {EXPORT_INDEX} "
                              f"with its shards (older exports: {EXPORT_WEIGHTS} or per-stage "
                              "model-00001-of-00002.safetensors).")
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
        del value  # the caller has it (or dropped it): not kept alive here while the next one is gathered


def export_from_module(module: torch.nn.Module, model_config: ModelConfig, layout, out: str | Path,
                       extra: dict[str, Any] | None = None) -> Path:
    """Consolidated export from any layout: full tensors under HF LLaMA names, one shard file per unit
    (embedding, each decoder layer, final norm + LM head) plus `model.safetensors.index.json`.

    Collective: every rank iterates all its parameters (ZeRO-3 gathers and TP all-gathers). The first TP/DP
    rank of each stage writes its stage unit by unit, holding one unit at a time; the other ranks drop each
    gathered tensor at once. Rank 0 writes the index and config and moves the folder into place whole.
    """
    out = Path(out)
    tmp = out.with_name(out.name + PARTIAL)
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    writes = layout.dp_rank == 0 and layout.tensor_parallel.rank == 0
    writer = _UnitWriter(tmp, model_config.num_layers) if writes else None
    unit = None
    for name, value in full_named_parameters(module, model_config, layout):
        if writer is not None:
            writer.add(name, value)  # the first tensor of a unit writes and frees the previous unit
        del value  # a non-writer's copy is freed here, before the next parameter is gathered
        if export_unit(name, model_config.num_layers) != unit:
            unit = export_unit(name, model_config.num_layers)
            _return_freed_host_memory()
    index = {}
    if writer is not None:
        writer.close()
        index = writer.index
    if dist.is_initialized():  # also the barrier: rank 0 hears from every writer after its last shard is closed
        parts = [None] * dist.get_world_size() if _is_rank0() else None
        dist.gather_object(index, parts, dst=0)
        index = {name: entry for part in (parts or []) for name, entry in part.items()}
    if _is_rank0():
        _publish_export(tmp, out, model_config, extra, index)
    _barrier()
    return out


@torch.no_grad()
def load_export_into(module: torch.nn.Module, folder: str | Path, model_config: ModelConfig, layout) -> None:
    """Load a consolidated export into this rank's part of the model, whatever layout wrote it.

    Each rank reads only its slices (safetensors get_slice): a TP shard of a stage's parameters, one tensor
    at a time. Reads every layout an export has had: per-unit shards, one file, or one file per stage.
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
        del value  # freed before the next tensor is read, not when it is rebound
