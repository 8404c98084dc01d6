"""The full weights of a run, whatever holds them: a DeepSpeed checkpoint of any layout (tp x pp x dp) and ZeRO
stage, merged into consolidated names (`checkpoint_weights`), a consolidated export, a run folder or a
transformers folder (`read_weights`). What mixln-export, mixln-export --hf and the analyses read.
"""
from __future__ import annotations

import contextlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from megatron_mixln.config import ModelConfig, config_from_dict
from megatron_mixln.model.hf_format import RUN_RECORD, HFTensors, is_hf_folder, read_hf_config, source_names
from megatron_mixln.saved_files import CheckpointError, read_json
from megatron_mixln.train import checkpoint as ckpt
from megatron_mixln.train.checkpoint_files import deepspeed_checkpoint_globals, load_checkpoint_file
from megatron_mixln.train.export import EXPORT_CONFIG, export_files, read_export


@dataclass
class Weights:
    """Full weights under consolidated names, with what is known of the run that made them."""

    model_config: ModelConfig
    tensors: dict[str, torch.Tensor]
    step: int | None
    data_meta: dict | None  # the prepared data's metadata (tokenizer, ...), as the run saved it
    run_config: dict | None  # the run's whole config, as Config.to_dict() wrote it
    source: Path  # the folder read: an export or a checkpoint


def read_weights(source: str | Path) -> Weights:
    """The weights of a consolidated export, of a DeepSpeed checkpoint (any layout and ZeRO stage), of a run
    folder (its latest checkpoint, else its own export), or of a transformers folder (mixln-export --hf, a LLaMA)."""
    folder = Path(source)
    if not folder.exists():
        raise CheckpointError(f"{folder} does not exist: pass a run folder, a checkpoint folder or an export folder.")
    if is_export(folder):
        model_config, tensors = read_export(folder)
        return Weights(model_config, tensors, *run_record(folder), folder)
    if is_hf_folder(folder):
        return read_hf_weights(folder)
    if (folder / ckpt.CHECKPOINTS).is_dir():
        folder = ckpt.latest_checkpoint(folder) or folder
    state_path = folder / ckpt.STATE_FILE
    if not state_path.is_file():
        if is_export(Path(source) / "export"):
            return read_weights(Path(source) / "export")  # a run folder whose checkpoints are gone
        raise CheckpointError(f"{folder} is neither a run folder with checkpoints, a checkpoint folder (no "
                              f"{ckpt.STATE_FILE}) nor an export folder (no {EXPORT_CONFIG} with a model).")
    ckpt.verify_checkpoint(folder)  # every file read whole against its saved CRC-32 before any is used
    record = run_record(folder)
    run_config = config_from_dict(record.run_config)
    tensors = checkpoint_weights(folder, run_config)  # merged over TP, PP and ZeRO partitions
    return Weights(run_config.model, tensors, *record, folder)


class RunRecord(NamedTuple):
    """What a weights folder keeps of the run that made it (None where it keeps nothing), in Weights' order."""

    step: int | None
    data_meta: dict | None
    run_config: dict | None


def run_record(folder: Path) -> RunRecord:
    """The run's record next to the weights in `folder`, without reading a tensor: an export's config.json, an
    --hf export's config.json (under RUN_RECORD; a LLaMA from elsewhere has none) or a checkpoint's
    trainer_state.json (its "config")."""
    if is_export(folder):
        saved = read_json(folder / EXPORT_CONFIG, "export the run again")
    elif is_hf_folder(folder):
        saved = read_json(folder / "config.json", "export the run again").get(RUN_RECORD) or {}
    else:
        state = read_json(folder / ckpt.STATE_FILE)
        saved = {**state, "run_config": state.get("config")}
    return RunRecord(saved.get("step"), saved.get("data"), saved.get("run_config"))


def is_export(folder: Path) -> bool:
    """A consolidated export: config.json holding our "model" section (a transformers config.json has none) next
    to safetensors weights (a run folder's config.json has the section too, but its weights are in checkpoints)."""
    if not (folder / EXPORT_CONFIG).is_file() or not any(folder.glob("model*.safetensors")):
        return False
    raw = read_json(folder / EXPORT_CONFIG, "export the run again")  # a damaged export is said as such
    return isinstance(raw, dict) and isinstance(raw.get("model"), dict)


# ------------------------------------------------------------------------------------------------
# A transformers folder (a LLaMA, or one of our --hf exports), or an export, as weights to start from
# ------------------------------------------------------------------------------------------------
def read_source_config(folder: str | Path) -> tuple[ModelConfig, str]:
    """(ModelConfig, kind) of a folder to start from: kind "llama" (transformers LlamaForCausalLM), MODEL_TYPE
    (our own HF export) or "export" (our consolidated export). Never runs code from the folder."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        read_json(folder / "config.json", "copy the folder again")  # a damaged one is said so before anything else
    if is_export(folder):
        return export_files(folder)[0], "export"
    return read_hf_config(folder)


def read_hf_weights(folder: str | Path) -> Weights:
    """A transformers LLaMA folder (or one of our --hf exports) as Weights: its model, its tensors under our names
    and, for an --hf export, the run's record (RUN_RECORD in config.json)."""
    folder = Path(folder)
    model_config, kind = read_source_config(folder)
    tensors = HFTensors(folder)
    names = source_names(tensors, model_config, folder, kind)
    return Weights(model_config, {name: tensors.piece(source)[:] for name, source in names.items()},
                   *run_record(folder), folder)


# ------------------------------------------------------------------------------------------------
# mixln-export: the same tensors from a DeepSpeed checkpoint of any layout
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _weights_only_loads():
    """Every torch.load inside reads with weights_only=True and DeepSpeed's own checkpoint classes only, even
    DeepSpeed's zero_to_fp32, which asks for weights_only=False: TORCH_FORCE_WEIGHTS_ONLY_LOAD is torch's own
    switch for that. A checkpoint copied from elsewhere then cannot run code when it is exported."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_checkpoint_globals()):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _load_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint in {path.parent} is incomplete.")
    return load_checkpoint_file(path)


def _pipeline_shard(folder: Path, tp_rank: int, num_layers: int) -> dict[str, torch.Tensor]:
    """One TP rank's weights from a pipeline checkpoint: DeepSpeed writes each layer spec's state dict as
    `layer_<spec>-model_<tp rank>-model_states.pt` (what the module holds, bf16 under bf16)."""
    from megatron_mixln.model.stages import consolidated_name

    shard = {}
    for spec in range(num_layers + 2):
        path = folder / f"layer_{spec:02d}-model_{tp_rank:02d}-model_states.pt"
        shard.update({consolidated_name(f"{spec}.{key}", num_layers): value
                      for key, value in _load_file(path).items()})
    return shard


def _zero3_shard(folder: Path, tp_rank: int, tp: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One TP rank's weights from a ZeRO-3 checkpoint, rebuilt by DeepSpeed's zero_to_fp32 from the fp32
    partitions of every DP rank, cast to the module's dtype (what the run's own export holds: the bf16
    module weights are the rounding of these masters). zero_to_fp32 knows one model-parallel rank per
    folder, so under TP it reads a folder holding links to that rank's files only."""
    import tempfile

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.ExitStack() as stack:
        root, tag = folder.parent, folder.name
        if tp > 1:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mixln-export-")))
            tag = f"mp_rank_{tp_rank:02d}"
            (root / tag).mkdir()
            for path in folder.glob(f"*_mp_rank_{tp_rank:02d}_*_states.pt"):
                (root / tag / path.name).symlink_to(path.resolve())
        # zero_to_fp32 narrates every file it reads on stdout; mixln-export prints one line.
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            try:
                state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
            except pickle.UnpicklingError:  # weights_only refused a class; torch's text would advise unsafe loading
                raise CheckpointError(f"{folder} was refused: one of its files holds a class outside the allow-list "
                                      "of tensors and DeepSpeed's classes; restore it from a trusted copy.") from None
            except (FileNotFoundError, ValueError) as err:
                raise CheckpointError(f"{folder} is not a complete, readable ZeRO-3 checkpoint ({err}).") from None
    return {name: value.detach().to(dtype) for name, value in state.items()}  # plain tensors, not Parameters


def checkpoint_weights(folder: str | Path, run_config) -> dict[str, torch.Tensor]:
    """Full weights under consolidated names, in the module's dtype, from a DeepSpeed checkpoint folder of any
    layout (tp x pp x dp) and ZeRO stage: the tensors the run's own export holds at that step.

    Where the weights are:
    - ZeRO-3 (no pipeline): partitioned over the DP ranks in `*_optim_states.pt`; DeepSpeed's zero_to_fp32
      rebuilds them (one TP rank at a time).
    - every other stage: whole in the module files DeepSpeed writes per TP rank, `mp_rank_<tp>_model_states.pt`,
      or per pipeline layer spec, `layer_<spec>-model_<tp>-model_states.pt`. zero_to_fp32 could rebuild
      ZeRO-1/2 ones too, but it rejects the BF16 optimiser's files ("not a zero checkpoint"), and the module
      file already holds exactly the module's tensors.
    DeepSpeed's tools know nothing of our tensor parallelism, so the TP shards are merged here: concatenated
    along each parameter's partition dim (column-parallel q/k/v/gate/up, the embedding and LM head rows on
    dim 0, row-parallel o/down on dim 1), norms replicated (TP rank 0's copy), and pipeline layer names are
    mapped with `consolidated_name`. Loads run with weights_only=True.
    """
    from megatron_mixln.model import MixLNForCausalLM
    from megatron_mixln.parallel.tensor_parallel import TensorParallel

    folder = Path(folder)
    model_config, parallel = run_config.model, run_config.parallel
    tp, pp, zero = parallel.tp, parallel.pp, parallel.zero_stage
    dtype = torch.bfloat16 if run_config.train.precision == "bf16" else torch.float32
    with _weights_only_loads():
        if pp > 1:
            shards = [_pipeline_shard(folder, rank, model_config.num_layers) for rank in range(tp)]
        elif zero == 3:
            shards = [_zero3_shard(folder, rank, tp, dtype) for rank in range(tp)]
        else:
            shards = [_load_file(folder / f"mp_rank_{rank:02d}_model_states.pt")["module"] for rank in range(tp)]
    # Which dim each parameter is split on: the model as a TP rank builds it, on the meta device (no memory).
    with torch.device("meta"):
        reference = MixLNForCausalLM(model_config, TensorParallel(tp, 0, None) if tp > 1 else TensorParallel())
    weights = {}
    for name, param in reference.named_parameters():
        missing = [rank for rank, shard in enumerate(shards) if name not in shard]
        if missing:
            raise CheckpointError(f"{folder} has no {name!r} for tensor-parallel rank {missing[0]}: it is not a "
                                  f"checkpoint of this run's model (tp={tp}, pp={pp}, ZeRO-{zero}).")
        pieces = [shard.pop(name) for shard in shards]
        dim = getattr(param, "partition_dim", None)
        value = pieces[0] if dim is None else torch.cat(pieces, dim=dim)
        full_shape = tuple(getattr(param, "full_shape", param.shape))
        if tuple(value.shape) != full_shape:
            raise CheckpointError(f"{folder}: {name} has shape {tuple(value.shape)} after merging {tp} "
                                  f"tensor-parallel shards, expected {full_shape}.")
        weights[name] = value.to(dtype)
        del pieces
    return weights
