"""The consolidated export: full tensors under HF LLaMA names (docs/method.md#parameter-names) in per-unit
safetensors shards with Hugging Face's index, plus config.json, written from any parallel layout and loaded
into any other. It is how a run leaves the stack (mixln-eval, transformers) and how it moves between layouts.

Written by a run, it also carries the optimiser: each per-parameter state (Adam's exp_avg and exp_avg_sq, and
the fp32 master weights where the module is bf16) under the same consolidated names in per-unit shards of
their own (`exp_avg-00002-of-00006.safetensors`), listed with the optimiser's step count and the LR schedule's
position in `optimizer_state.json`. transformers and mixln-eval read the index, so they never see them.

Why not DeepSpeed's universal checkpoint (deepspeed.checkpoint.ds_to_universal + "load_universal"), which
moves ZeRO state between layouts? With DeepSpeed 0.19.8 it does not serve these layouts: it asserts on
checkpoints without Megatron-DeepSpeed's `universal_checkpoint_info` client state (the per-parameter TP
patterns), finds no `*_optim_states.pt` in fp32 ZeRO-0 checkpoints (no DeepSpeed optimiser wrapper: the torch
optimiser's state sits in the model file) nor in pipeline ZeRO-0 ones, and only a ZeRO optimiser wrapper can
load one. The export already holds full tensors under layout-free names and is read one tensor at a time, so
the optimiser state rides along, gathered and set with DeepSpeed's own per-parameter accessors
(`safe_get_full_optimizer_state`, `safe_set_full_optimizer_state`).

`train/weights.py` reads the same tensors from a DeepSpeed checkpoint of any layout and ZeRO stage (mixln-export).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_mixln.config import ModelConfig, model_config_from_dict
from megatron_mixln.output_folder import OutputKind, atomic_folder, publish_folder, temporary_folder
from megatron_mixln.saved_files import CheckpointError, read_json
from megatron_mixln.train.checkpoint import PARTIAL, _barrier, _is_rank0

EXPORT_WEIGHTS = "model.safetensors"  # older exports: all weights in one file
EXPORT_INDEX = "model.safetensors.index.json"  # transformers' SAFE_WEIGHTS_INDEX_NAME: name -> shard file
EXPORT_CONFIG = "config.json"
EXPORT_OPTIMIZER = "optimizer_state.json"  # the optimiser's step, LR-schedule position, state name -> shard file
MASTER_WEIGHTS = "fp32"  # the state name of fp32 master weights (as in DeepSpeed's universal checkpoint)
EXPORT_OUTPUT = OutputKind("consolidated export", ((EXPORT_INDEX, EXPORT_CONFIG),))  # replaced without --force


def export_unit(name: str, num_layers: int) -> int:
    """The export shard a consolidated parameter lives in: 0 the embedding, i + 1 decoder layer i, and
    num_layers + 1 the final norm and LM head: the pipeline layer spec that holds it, so a unit never spans two
    pipeline stages."""
    from megatron_mixln.model.stages import spec_name

    return int(spec_name(name, num_layers).split(".", 1)[0])


def export_unit_file(unit: int, num_layers: int, prefix: str = "model") -> str:
    """Shard file name of a unit, in transformers' `model-00001-of-000NN.safetensors` pattern (optimiser
    states: the state's name for `model`, e.g. `exp_avg-00001-of-000NN.safetensors`)."""
    return f"{prefix}-{unit + 1:05d}-of-{num_layers + 2:05d}.safetensors"


class _UnitWriter:
    """Writes (name, tensor) pairs that arrive unit by unit as one safetensors file per unit.

    Only the unit being filled is referenced: it is written and dropped when the first tensor of the next
    unit arrives (or at `close`), so a writer's host memory is bounded by one layer, not a pipeline stage.
    safetensors writes straight from the tensors' memory, so a write adds no copy either.
    """

    def __init__(self, folder: Path, num_layers: int, prefix: str = "model"):
        self.folder, self.num_layers, self.prefix = folder, num_layers, prefix
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

        file = export_unit_file(self.unit, self.num_layers, self.prefix)
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
                        extra: dict[str, Any] | None = None, force: bool = False) -> Path:
    """Write per-unit safetensors shards (HF LLaMA names, docs/method.md#parameter-names), their index and
    `config.json` into `out`, atomically (an `out` that is not an earlier export is replaced only with `force`)."""
    with atomic_folder(out, EXPORT_OUTPUT, force) as tmp:
        writer = _UnitWriter(tmp, model_config.num_layers)
        # A stable sort: any state-dict order works, and names keep their order inside a unit.
        for name, tensor in sorted(state_dict.items(), key=lambda item: export_unit(item[0], model_config.num_layers)):
            writer.add(name, tensor)
        writer.close()
        _finish_export(tmp, model_config, extra, writer.index)
    return Path(out)


def _check_complete(tmp: Path, model_config: ModelConfig, index: dict[str, tuple[str, int]], prefix: str) -> None:
    """Refuse to publish an export missing a shard (a rank that did not write its stage)."""
    expected = {export_unit_file(unit, model_config.num_layers, prefix) for unit in range(model_config.num_layers + 2)}
    written = {file for file, _ in index.values()}
    if written != expected:
        raise RuntimeError(f"export in {tmp} is incomplete: shards {sorted(expected - written)} were not written "
                           f"(and {sorted(written - expected)} were not expected).")


def _finish_export(tmp: Path, model_config: ModelConfig, extra: dict[str, Any] | None,
                   index: dict[str, tuple[str, int]], optimizer: dict[str, Any] | None = None,
                   state_index: dict[str, dict[str, tuple[str, int]]] | None = None) -> None:
    """Write the shard index, config.json and (with `optimizer`, the optimiser's scalars) optimizer_state.json
    into the temporary folder once every shard is in it."""
    from megatron_mixln.model.norms import norm_placement

    _check_complete(tmp, model_config, index, "model")
    if optimizer is not None:
        for key in optimizer["states"]:
            _check_complete(tmp, model_config, state_index[key], key)
        maps = {key: {name: file for name, (file, _) in state_index[key].items()} for key in optimizer["states"]}
        (tmp / EXPORT_OPTIMIZER).write_text(json.dumps({**optimizer, "weight_map": maps}, indent=1, sort_keys=True))
    weights = {"metadata": {"total_size": sum(size for _, size in index.values())},
               "weight_map": {name: file for name, (file, _) in index.items()}}
    (tmp / EXPORT_INDEX).write_text(json.dumps(weights, indent=2, sort_keys=True) + "\n")
    placements = [norm_placement(i, model_config.num_layers, model_config) for i in range(model_config.num_layers)]
    config = {"model": vars(model_config).copy(), "layer_placements": placements, **(extra or {})}
    (tmp / EXPORT_CONFIG).write_text(json.dumps(config, indent=1))


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
        weight_map = read_json(index_path, "export the run again")["weight_map"]
        valid = isinstance(weight_map, dict) and all(
            isinstance(file, str) and Path(file).name == file and file.endswith(".safetensors")
            for file in weight_map.values())
    except (KeyError, TypeError):
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
        raw = read_json(config_path, "export the run again")
        model_config = model_config_from_dict(raw["model"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{config_path} is not a megatron_mixln export config ({err!r}).") from None
    return model_config, files


def load_exported_model(folder: str | Path, device: str | torch.device = "cpu"):
    """Build the model described by an export folder and load its weights (strict names and shapes)."""
    model_config, tensors = read_export(folder)
    return model_with_weights(model_config, tensors, folder, device)


def model_with_weights(model_config: ModelConfig, tensors: dict[str, torch.Tensor], folder: str | Path,
                       device: str | torch.device = "cpu"):
    """The unsplit model holding `tensors` (consolidated names, strict names and shapes), read from `folder`."""
    from megatron_mixln.model import MixLNForCausalLM

    # The training run's kernels choice (triton on its GPUs) need not suit this machine; it changes no weight.
    model_config = dataclasses.replace(model_config, kernels="auto")
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


def _names_and_parameters(module: torch.nn.Module, model_config: ModelConfig, layout):
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
    for name, param in _names_and_parameters(module, model_config, layout):
        with gathered(param):
            value = param.detach().clone()
        value = _tp_gathered(value, param, tp)
        yield name, value.cpu()
        del value  # the caller has it (or dropped it): not kept alive here while the next one is gathered


# ------------------------------------------------------------------------------------------------
# The optimiser's state, per parameter
# ------------------------------------------------------------------------------------------------
def _deepspeed_managed(param) -> bool:
    """Whether a DeepSpeed optimiser wrapper (ZeRO-1/2/3, the BF16 optimiser) owns this parameter's fp32 master
    and optimiser state: DeepSpeed's safe_get/safe_set accessors serve it (the wrappers mark their parameters
    with these attributes; a ZeRO-3 parameter built without an engine has ds_id only). Otherwise (fp32 ZeRO-0)
    DeepSpeed hands the torch optimiser through unwrapped, and its state is keyed by the parameter itself."""
    return hasattr(param, "_z3_optimizer") or hasattr(param, "_hp_mapping")


def _torch_optimizer(optimizer, module: torch.nn.Module):
    """The torch optimiser doing the update: the one a DeepSpeed wrapper holds (its params are the flat fp32
    partitions), or `optimizer` itself when DeepSpeed passed it through."""
    wrapped = any(_deepspeed_managed(param) for param in module.parameters())
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

    if _deepspeed_managed(param):
        if key == MASTER_WEIGHTS:
            return safe_get_full_fp32_param(param)
        return safe_get_full_optimizer_state(param, key)
    return optimizer.state[param][key].detach().clone()


def full_optimizer_states(module: torch.nn.Module, model_config: ModelConfig, layout, optimizer, keys: list[str]):
    """Yield (consolidated name, {state: full CPU tensor}) for every parameter of this rank's stage, in the
    order of `full_named_parameters`. Collective, like it (ZeRO gathers, TP all-gathers)."""
    tp = layout.tensor_parallel
    for name, param in _names_and_parameters(module, model_config, layout):
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
        writer = _UnitWriter(tmp, model_config.num_layers) if writes else None
        state_writers = {key: _UnitWriter(tmp, model_config.num_layers, key) for key in keys} if writes else {}
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
            _finish_export(tmp, model_config, extra, index, scalars, state_index)
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


def read_optimizer_state(folder: str | Path) -> dict[str, Any] | None:
    """An export's optimizer_state.json (None when the export has none: written by mixln-export or older)."""
    path = Path(folder) / EXPORT_OPTIMIZER
    if not path.is_file():
        return None
    try:
        meta = read_json(path, "export the run again")
        valid = (isinstance(meta.get("states"), list) and isinstance(meta.get("step"), int)
                 and all(isinstance(meta["weight_map"].get(key), dict) for key in meta["states"]))
    except (AttributeError, KeyError, TypeError):
        valid = False
    if not valid:
        raise CheckpointError(f"{path} is not an optimiser state index: it must be JSON with \"step\", \"states\" "
                              "and a \"weight_map\" of state -> tensor name -> shard file; export the run again.")
    return meta


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


def _open_shard(path: Path):
    """A safetensors shard of an export, opened for reading slices; one cut short or garbled is named as damaged."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is damaged: it is not a readable safetensors file ({err}); export the run "
                              "again.") from None


def _tp_slice(piece, param, tp) -> torch.Tensor:
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
    handles = {path.name: _open_shard(path) for path in files}
    where = {name: handle for handle in handles.values() for name in handle.keys()}
    state_files = {key: meta["weight_map"][key] for key in keys if key != MASTER_WEIGHTS}
    for key, weight_map in (meta["weight_map"].items() if meta is not None else ()):
        for file in set(weight_map.values()):
            if Path(file).name != file or not (folder / file).is_file():
                raise CheckpointError(f"{folder / EXPORT_OPTIMIZER} lists {file}, which is not in {folder}: the "
                                      "export is incomplete; copy the missing shard or export again.")
            handles.setdefault(file, _open_shard(folder / file))
    if meta is not None:
        _create_state(optimizer, base, [key for key in keys if key != MASTER_WEIGHTS], meta["step"])
    masters = meta["weight_map"].get(MASTER_WEIGHTS, {}) if meta is not None else {}
    tp = layout.tensor_parallel
    for name, param in _names_and_parameters(module, model_config, layout):
        if name not in where:
            raise CheckpointError(f"{folder} has no tensor {name!r}.")
        # The fp32 master, where a bf16 run exported one, is the weight (the module's bf16 is its rounding).
        source = handles[masters[name]] if name in masters else where[name]
        value = _tp_slice(source.get_slice(name), param, tp)
        with gathered(param):
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"{folder}: {name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}.")
            param.data.copy_(value)
        if _deepspeed_managed(param):
            safe_set_full_fp32_param(param, value.float())
        del value  # freed before the next tensor is read, not when it is rebound
        for key, weight_map in state_files.items():
            if name not in weight_map:
                raise CheckpointError(f"{folder}: the optimiser state {key} has no tensor {name!r}; export again.")
            value = _tp_slice(handles[weight_map[name]].get_slice(name), param, tp).float()
            if _deepspeed_managed(param):
                safe_set_full_optimizer_state(param, value, key)
            else:
                base.state[param][key].copy_(value)
            del value
    if meta is None:
        return LoadedExport(step=step, schedule_step=step)
    schedule = meta.get("lr_schedule_step")
    return LoadedExport(step=step, schedule_step=step if schedule is None else int(schedule), states=tuple(keys),
                        optimizer_step=int(meta["step"]))
