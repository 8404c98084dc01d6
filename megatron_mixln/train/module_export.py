"""A live model of any parallel layout (TP x PP x ZeRO, this rank's stage and shards) and its optimiser, to and
from the consolidated export (train/export.py: the format on disk). `export_from_module` gathers every parameter
(and the optimiser's per-parameter states) to full tensors under consolidated names and writes them unit by unit;
`load_export_into` reads back only this rank's slices, into this layout's partitioning. Both are collective.

Why not DeepSpeed's universal checkpoint (deepspeed.checkpoint.ds_to_universal + "load_universal"), which
moves ZeRO state between layouts? With DeepSpeed 0.19.8 it does not serve these layouts: it asserts on
checkpoints without Megatron-DeepSpeed's `universal_checkpoint_info` client state (the per-parameter TP
patterns), finds no `*_optim_states.pt` in fp32 ZeRO-0 checkpoints (no DeepSpeed optimiser wrapper: the torch
optimiser's state sits in the model file) nor in pipeline ZeRO-0 ones, and only a ZeRO optimiser wrapper can
load one. The export already holds full tensors under layout-free names and is read one tensor at a time, so
the optimiser state rides along, gathered and set with DeepSpeed's own per-parameter accessors
(`safe_get_full_optimizer_state`, `safe_set_full_optimizer_state`).
"""
from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_mixln.config import ModelConfig
from megatron_mixln.output_folder import publish_folder, temporary_folder
from megatron_mixln.saved_files import CheckpointError, read_json
from megatron_mixln.train.checkpoint import PARTIAL, _barrier, _is_rank0
from megatron_mixln.train.export import (EXPORT_CONFIG, EXPORT_OPTIMIZER, EXPORT_OUTPUT, MASTER_WEIGHTS, UnitWriter,
                                         export_files, export_unit, finish_export, open_shard, read_optimizer_state)


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


def gathered(param):
    """A context making a ZeRO-3 partitioned parameter whole (a no-op for any other parameter)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
    return contextlib.nullcontext()


def names_and_parameters(module: torch.nn.Module, model_config: ModelConfig, layout):
    """(consolidated name, parameter) for this rank's stage, in the module's order (the same on every DP rank)."""
    from megatron_mixln.model.stages import consolidated_name

    for local_name, param in module.named_parameters():
        yield (consolidated_name(local_name, model_config.num_layers) if layout.pp > 1 else local_name), param


def _tp_gathered(value: torch.Tensor, param, tp) -> torch.Tensor:
    """This TP rank's shard `value` of `param` (or of a per-parameter state) made whole over the TP group
    (collective); replicated tensors (norms) are returned as they are."""
    dim = getattr(param, "partition_dim", None)
    if dim is None or tp.size == 1:
        return value
    pieces = [torch.empty_like(value) for _ in range(tp.size)]
    dist.all_gather(pieces, value.contiguous(), group=tp.group)
    return torch.cat(pieces, dim=dim)


def full_named_parameters(module: torch.nn.Module, model_config: ModelConfig, layout):
    """Yield (consolidated name, full CPU tensor) for every parameter of this rank's pipeline stage.

    Collective: every rank of the job must iterate (ZeRO-3 gathers, tensor-parallel all-gathers).
    """
    tp = layout.tensor_parallel
    for name, param in names_and_parameters(module, model_config, layout):
        with gathered(param):
            value = param.detach().clone()
        value = _tp_gathered(value, param, tp)
        yield name, value.cpu()
        del value  # the caller has it (or dropped it): not kept alive here while the next one is gathered


# ------------------------------------------------------------------------------------------------
# The optimiser's state, per parameter
# ------------------------------------------------------------------------------------------------
def deepspeed_managed(param) -> bool:
    """Whether a DeepSpeed optimiser wrapper (ZeRO-1/2/3, the BF16 optimiser) owns this parameter's fp32 master
    and optimiser state: DeepSpeed's safe_get/safe_set accessors serve it (the wrappers mark their parameters
    with these attributes; a ZeRO-3 parameter built without an engine has ds_id only). Otherwise (fp32 ZeRO-0)
    DeepSpeed hands the torch optimiser through unwrapped, and its state is keyed by the parameter itself."""
    return hasattr(param, "_z3_optimizer") or hasattr(param, "_hp_mapping")


def _torch_optimizer(optimizer, module: torch.nn.Module):
    """The torch optimiser doing the update: the one a DeepSpeed wrapper holds (its params are the flat fp32
    partitions), or `optimizer` itself when DeepSpeed passed it through."""
    wrapped = any(deepspeed_managed(param) for param in module.parameters())
    return optimizer.optimizer if wrapped else optimizer


def _state_keys(optimizer, module: torch.nn.Module) -> list[str]:
    """The optimiser's per-parameter tensor states (Adam: exp_avg, exp_avg_sq; SGD without momentum: none),
    plus the fp32 master weights where the module holds lower precision. Collective: every rank must agree,
    because each key is gathered parameter by parameter."""
    base = _torch_optimizer(optimizer, module)
    keys = []
    for param, state in base.state.items():
        keys = [key for key, value in state.items()
                if key != "step" and torch.is_tensor(value) and value.shape == param.shape]
        break
    params = list(module.parameters())
    if base is not optimizer and any(param.dtype != torch.float32 for param in params):
        keys.append(MASTER_WEIGHTS)
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, keys)
        if any(other != keys for other in everyone):
            raise RuntimeError(f"export: the ranks' optimisers hold different states {everyone}.")
    return keys


def _optimizer_scalars(optimizer, module: torch.nn.Module, scheduler, keys: list[str]) -> dict[str, Any]:
    """What optimizer_state.json holds besides the tensors: the optimiser's class, its step count (Adam's bias
    correction; the same for every parameter of our model, so the largest), the LR schedule's position."""
    base = _torch_optimizer(optimizer, module)
    steps = [float(state["step"]) for state in base.state.values() if "step" in state]
    return {"optimizer": type(base).__name__, "step": int(max(steps, default=0)), "states": keys,
            "lr_schedule_step": None if scheduler is None else int(scheduler.last_epoch)}


def _local_state(optimizer, param, key: str) -> torch.Tensor:
    """This rank's full (DP-unpartitioned) copy of one state of `param`; a TP shard under TP. Collective
    under ZeRO (DeepSpeed's accessors gather over the DP group)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if deepspeed_managed(param):
        if key == MASTER_WEIGHTS:
            return safe_get_full_fp32_param(param)
        return safe_get_full_optimizer_state(param, key)
    return optimizer.state[param][key].detach().clone()


def full_optimizer_states(module: torch.nn.Module, model_config: ModelConfig, layout, optimizer, keys: list[str]):
    """Yield (consolidated name, {state: full CPU tensor}) for every parameter of this rank's stage, in the
    order of `full_named_parameters`. Collective, like it (ZeRO gathers, TP all-gathers)."""
    tp = layout.tensor_parallel
    for name, param in names_and_parameters(module, model_config, layout):
        states = {key: _tp_gathered(_local_state(optimizer, param, key), param, tp).cpu() for key in keys}
        yield name, states
        del states


def export_from_module(module: torch.nn.Module, model_config: ModelConfig, layout, out: str | Path,
                       extra: dict[str, Any] | None = None, optimizer=None, scheduler=None) -> Path:
    """Consolidated export from any layout: full tensors under HF LLaMA names, one shard file per unit
    (embedding, each decoder layer, final norm + LM head) plus `model.safetensors.index.json`.

    With `optimizer` (the engine's: a DeepSpeed wrapper, or the bare torch optimiser under fp32 ZeRO-0) and
    `scheduler`, also its per-parameter states in per-unit shards of their own and `optimizer_state.json`, so
    `load_export_into` can continue the run in any layout with its moments.

    Collective: every rank iterates all its parameters (ZeRO-3 gathers and TP all-gathers). The first TP/DP
    rank of each stage writes its stage unit by unit, holding one unit at a time (weights and states); the
    other ranks drop each gathered tensor at once. Rank 0 writes the indexes and config and moves the folder
    into place whole.
    """
    out = Path(out)
    tmp = temporary_folder(out) if _is_rank0() else out.with_name(out.name + PARTIAL)
    _barrier()
    try:
        keys = _state_keys(optimizer, module) if optimizer is not None else []
        writes = layout.dp_rank == 0 and layout.tensor_parallel.rank == 0
        writer = UnitWriter(tmp, model_config.num_layers) if writes else None
        state_writers = {key: UnitWriter(tmp, model_config.num_layers, key) for key in keys} if writes else {}
        states = full_optimizer_states(module, model_config, layout, optimizer, keys) if keys else None
        unit = None
        for name, value in full_named_parameters(module, model_config, layout):
            if writer is not None:
                writer.add(name, value)  # the first tensor of a unit writes and frees the previous unit
            del value  # a non-writer's copy is freed here, before the next parameter is gathered
            if states is not None:
                state_name, values = next(states)
                assert state_name == name, (state_name, name)  # both walk the module's parameters in order
                for key, state_writer in state_writers.items():
                    state_writer.add(name, values.pop(key))
                del values  # as `value`: a non-writer's copies are freed before the next parameter is gathered
            if export_unit(name, model_config.num_layers) != unit:
                unit = export_unit(name, model_config.num_layers)
                _return_freed_host_memory()
        index, state_index = {}, {}
        if writer is not None:
            writer.close()
            index = writer.index
            for key, state_writer in state_writers.items():
                state_writer.close()
                state_index[key] = state_writer.index
        if dist.is_initialized():  # also the barrier: rank 0 hears from every writer after its last shard is closed
            parts = [None] * dist.get_world_size() if _is_rank0() else None
            dist.gather_object((index, state_index), parts, dst=0)
            index = {name: entry for part, _ in (parts or []) for name, entry in part.items()}
            state_index = {key: {name: entry for _, part in (parts or []) for name, entry in part.get(key, {}).items()}
                           for key in keys}
        if _is_rank0():
            scalars = _optimizer_scalars(optimizer, module, scheduler, keys) if optimizer is not None else None
            finish_export(tmp, model_config, extra, index, scalars, state_index)
            publish_folder(tmp, out, EXPORT_OUTPUT, option=None)  # the run's own export: any earlier one is replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed export leaves no half-written folder behind
        raise
    _barrier()
    return out


# ------------------------------------------------------------------------------------------------
# Loading an export into a run of any layout
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedExport:
    """What `load_export_into` restored: the step the export was written at, the LR schedule's position (the
    export's own when it recorded one, else `step`) and the optimiser states it carried over (none: weights only)."""

    step: int
    schedule_step: int
    states: tuple[str, ...] = ()
    optimizer_step: int | None = None  # the optimiser's restored step count; None: not restored

    @property
    def note(self) -> str:
        """How the resume line describes it."""
        if self.optimizer_step is None:
            return "weights only: optimiser moments start fresh"
        if not self.states:
            return "weights and LR schedule; the optimiser keeps no per-parameter state"
        return f"weights and optimiser state: {', '.join(self.states)} at optimiser step {self.optimizer_step}"


# Where each DeepSpeed wrapper keeps the flat fp32 partitions its torch optimiser updates (and keys its state by).
_FLAT_MASTERS = ("fp32_partitioned_groups_flat",  # ZeRO-3 (outside a step its torch optimiser holds no params)
                 "single_partition_of_fp32_groups",  # ZeRO-1/2
                 "fp32_groups_flat_partition")  # the BF16 optimiser


def _create_state(optimizer, base, keys: list[str], step: int) -> None:
    """Give the torch optimiser zeroed per-parameter states when it has none yet, then set its step count.

    Torch optimisers, and DeepSpeed's wrappers around them, create their state at the first step, which a run
    resumed from an export has not taken. The state is torch Adam's own layout (`Adam._init_group`): a float32
    scalar step on the host (on the device when capturable or fused) and moments shaped like the tensor it
    updates. A ZeRO-1/2 or BF16 wrapper then links its parameters' fragments to the new state, as after its
    first step, so DeepSpeed's safe_set_full_optimizer_state reaches it.
    """
    if not base.state and keys:  # SGD without momentum keeps no state, and has no step count to restore
        flats = next((getattr(optimizer, attr) for attr in _FLAT_MASTERS if hasattr(optimizer, attr)),
                     [param for group in base.param_groups for param in group["params"]])
        on_device = any(group.get("capturable") or group.get("fused") for group in base.param_groups)
        for flat in flats:
            step_device = flat.device if on_device else "cpu"
            base.state[flat] = {"step": torch.tensor(0.0, dtype=torch.float32, device=step_device),
                                **{key: torch.zeros_like(flat, memory_format=torch.preserve_format) for key in keys}}
        if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
            optimizer._hp_optimizer_states_linked = False
            optimizer._lazy_init_hp_params_optimizer_state()
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].fill_(float(step))
        else:
            state["step"] = step


def tp_slice(piece, param, tp) -> torch.Tensor:
    """This TP rank's part of a full tensor (a safetensors slice: only that part is read)."""
    dim = getattr(param, "partition_dim", None)
    if dim is None or tp.size == 1:
        return piece[:]
    size = param.shape[dim] if not hasattr(param, "ds_shape") else param.ds_shape[dim]
    index = [slice(None)] * len(piece.get_shape())
    index[dim] = slice(tp.rank * size, (tp.rank + 1) * size)
    return piece[tuple(index)]


@torch.no_grad()
def load_export_into(module: torch.nn.Module, folder: str | Path, model_config: ModelConfig, layout,
                     optimizer=None) -> LoadedExport:
    """Load a consolidated export into this rank's part of the model, whatever layout wrote it; with
    `optimizer` (the engine's) also the optimiser state the export carries, into this layout's partitioning.

    Each rank reads only its slices (safetensors get_slice): a TP shard of a stage's parameters, one tensor
    at a time. Under a DeepSpeed wrapper the fp32 master weights are set too (they are a copy: loading only the
    module would let the first update start from the old weights). The LR schedule is the caller's
    (`LoadedExport.schedule_step`). Reads every layout an export has had: per-unit shards, one file, or one
    file per stage.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    folder = Path(folder)
    saved_config, files = export_files(folder)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "norm_placement"):
        if getattr(saved_config, field) != getattr(model_config, field):
            raise CheckpointError(f"{folder} holds a model with {field}={getattr(saved_config, field)!r}, but this run "
                                  f"has model.{field}={getattr(model_config, field)!r}.")
    step = int(read_json(folder / EXPORT_CONFIG, "export the run again").get("step", 0))
    meta = read_optimizer_state(folder) if optimizer is not None else None
    keys: list[str] = list(meta["states"]) if meta is not None else []
    base = _torch_optimizer(optimizer, module) if meta is not None else None
    if meta is not None and meta.get("optimizer") != type(base).__name__:
        raise CheckpointError(f"{folder} holds the state of a {meta.get('optimizer')} optimiser, but this run's is "
                              f"{type(base).__name__}; set train.optimizer to the exported run's.")
    handles = {path.name: open_shard(path) for path in files}
    where = {name: handle for handle in handles.values() for name in handle.keys()}
    state_files = {key: meta["weight_map"][key] for key in keys if key != MASTER_WEIGHTS}
    for key, weight_map in (meta["weight_map"].items() if meta is not None else ()):
        for file in set(weight_map.values()):
            if Path(file).name != file or not (folder / file).is_file():
                raise CheckpointError(f"{folder / EXPORT_OPTIMIZER} lists {file}, which is not in {folder}: the "
                                      "export is incomplete; copy the missing shard or export again.")
            handles.setdefault(file, open_shard(folder / file))
    if meta is not None:
        _create_state(optimizer, base, [key for key in keys if key != MASTER_WEIGHTS], meta["step"])
    masters = meta["weight_map"].get(MASTER_WEIGHTS, {}) if meta is not None else {}
    tp = layout.tensor_parallel
    for name, param in names_and_parameters(module, model_config, layout):
        if name not in where:
            raise CheckpointError(f"{folder} has no tensor {name!r}.")
        # The fp32 master, where a bf16 run exported one, is the weight (the module's bf16 is its rounding).
        source = handles[masters[name]] if name in masters else where[name]
        value = tp_slice(source.get_slice(name), param, tp)
        with gathered(param):
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"{folder}: {name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}.")
            param.data.copy_(value)
        if deepspeed_managed(param):
            safe_set_full_fp32_param(param, value.float())
        del value  # freed before the next tensor is read, not when it is rebound
        for key, weight_map in state_files.items():
            if name not in weight_map:
                raise CheckpointError(f"{folder}: the optimiser state {key} has no tensor {name!r}; export again.")
            value = tp_slice(handles[weight_map[name]].get_slice(name), param, tp).float()
            if deepspeed_managed(param):
                safe_set_full_optimizer_state(param, value, key)
            else:
                base.state[param][key].copy_(value)
            del value
    if meta is None:
        return LoadedExport(step=step, schedule_step=step)
    schedule = meta.get("lr_schedule_step")
    return LoadedExport(step=step, schedule_step=step if schedule is None else int(schedule), states=tuple(keys),
                        optimizer_step=int(meta["step"]))
