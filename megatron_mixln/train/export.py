"""The consolidated export's format on disk: full tensors under HF LLaMA names (docs/method.md#parameter-names) in
per-unit safetensors shards with Hugging Face's index, plus config.json; writing one from full tensors
(`export_consolidated`, `UnitWriter`) and reading it (`read_export`, `export_files`, `load_exported_model`). It is
how a run leaves the stack (mixln-eval, transformers) and how it moves between layouts: train/module_export.py
writes it from a live module of any TP/PP/ZeRO layout and loads it into another.

Written by a run, it also carries the optimiser: each per-parameter state (Adam's exp_avg and exp_avg_sq, and
the fp32 master weights where the module is bf16) under the same consolidated names in per-unit shards of
their own (`exp_avg-00002-of-00006.safetensors`), listed with the optimiser's step count and the LR schedule's
position in `optimizer_state.json`. transformers and mixln-eval read the index, so they never see them.

`train/weights.py` reads the same tensors from a DeepSpeed checkpoint of any layout and ZeRO stage (mixln-export).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from megatron_mixln.config import ModelConfig, model_config_from_dict
from megatron_mixln.output_folder import OutputKind, atomic_folder
from megatron_mixln.saved_files import CheckpointError, read_json

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


class UnitWriter:
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


def export_consolidated(state_dict: dict[str, torch.Tensor], model_config: ModelConfig, out: str | Path,
                        extra: dict[str, Any] | None = None, force: bool = False) -> Path:
    """Write per-unit safetensors shards (HF LLaMA names, docs/method.md#parameter-names), their index and
    `config.json` into `out`, atomically (an `out` that is not an earlier export is replaced only with `force`)."""
    with atomic_folder(out, EXPORT_OUTPUT, force) as tmp:
        writer = UnitWriter(tmp, model_config.num_layers)
        # A stable sort: any state-dict order works, and names keep their order inside a unit.
        for name, tensor in sorted(state_dict.items(), key=lambda item: export_unit(item[0], model_config.num_layers)):
            writer.add(name, tensor)
        writer.close()
        finish_export(tmp, model_config, extra, writer.index)
    return Path(out)


def _check_complete(tmp: Path, model_config: ModelConfig, index: dict[str, tuple[str, int]], prefix: str) -> None:
    """Refuse to publish an export missing a shard (a rank that did not write its stage)."""
    expected = {export_unit_file(unit, model_config.num_layers, prefix) for unit in range(model_config.num_layers + 2)}
    written = {file for file, _ in index.values()}
    if written != expected:
        raise RuntimeError(f"export in {tmp} is incomplete: shards {sorted(expected - written)} were not written "
                           f"(and {sorted(written - expected)} were not expected).")


def finish_export(tmp: Path, model_config: ModelConfig, extra: dict[str, Any] | None,
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


# ------------------------------------------------------------------------------------------------
# Reading what an export holds besides the weights' index: the optimiser's state, one shard
# ------------------------------------------------------------------------------------------------


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


def open_shard(path: Path):
    """A safetensors shard of an export, opened for reading slices; one cut short or garbled is named as damaged."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is damaged: it is not a readable safetensors file ({err}); export the run "
                              "again.") from None


