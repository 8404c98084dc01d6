"""model.init_from: start a run from a transformers LLaMA folder, one of our --hf exports or a consolidated export,
in any TP/PP/ZeRO layout, each rank reading only its slices as `load_export_into` reads an export."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from megatron_mixln.config import ConfigError
from megatron_mixln.model.hf_format import HFTensors, check_same_model, source_names
from megatron_mixln.train.module_export import (deepspeed_managed, gathered, load_export_into, names_and_parameters,
                                               tp_slice)
from megatron_mixln.train.checkpoint import _is_rank0, checkpoint_candidates
from megatron_mixln.train.weights import read_source_config


def init_from_applies(config) -> bool:
    """Whether model.init_from initialises this run: only a fresh start; a resumed run continues its own weights
    (train.resume=auto finds a checkpoint, or names a checkpoint or export)."""
    if not config.model.init_from:
        return False
    if config.train.resume == "none":
        return True
    if config.train.resume == "auto":
        return not checkpoint_candidates(Path(config.train.out_dir))
    return False


def load_init_from(module, config, layout) -> None:
    """Overwrite this rank's part of a freshly built model (any TP/PP layout; ZeRO-3 partitioned parameters are
    gathered while written) with the weights of `config.model.init_from`: a transformers LLaMA folder, one of our
    HF exports or a consolidated export. Each rank reads only its slices, one tensor at a time."""
    source = Path(config.model.init_from)
    where = f"model.init_from={str(source)!r}"
    if not source.is_dir():
        raise ConfigError(f"{where} is invalid: expected a Hugging Face LLaMA folder (config.json + safetensors) or "
                          "an export folder, and it does not exist.")
    source_config, kind = read_source_config(source)
    check_same_model(source_config, config.model, where)
    if kind == "export":
        load_export_into(module, source, config.model, layout)  # weights only: the optimiser starts fresh
    else:
        tensors = HFTensors(source)
        names = source_names(tensors, source_config, source, kind)
        tp = layout.tensor_parallel
        with torch.no_grad():
            for name, param in names_and_parameters(module, config.model, layout):
                value = tp_slice(tensors.piece(names[name]), param, tp)
                with gathered(param):
                    param.data.copy_(value)
                if deepspeed_managed(param):  # after the engine: its fp32 master is a copy to set too
                    from deepspeed.utils import safe_set_full_fp32_param

                    safe_set_full_fp32_param(param, value.float())
                del value
    if _is_rank0():
        print(f"initialised the model from {source} ({kind}: {source_config.num_layers} layers, "
              f"{source_config.norm_placement})", file=sys.stdout, flush=True)
