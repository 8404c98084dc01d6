"""Finding what to analyse: a run folder, an export (--hf too) or a checkpoint, its model, and its held-out text."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_mixln.config import Config, ConfigError, ModelConfig, config_from_dict
from megatron_mixln.data.errors import DataError
from megatron_mixln.model.hf_format import is_hf_folder
from megatron_mixln.saved_files import CheckpointError
from megatron_mixln.train import checkpoint as ckpt
from megatron_mixln.train import export
from megatron_mixln.train.metrics import METRICS_FILE
from megatron_mixln.train.weights import is_export, read_weights, run_record

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, labels) as data.sampling.collate returns them
ALL = "all"  # HeldOut.split of a local --data source: every document of it


def placement_label(model: ModelConfig) -> str:
    """`mix (1 Post-LN of 4)` for Mix-LN (the count is what distinguishes two Mix-LN runs), the placement otherwise."""
    if model.norm_placement != "mix":
        return model.norm_placement
    from megatron_mixln.model.norms import num_post_ln_layers

    return f"mix ({num_post_ln_layers(model)} Post-LN of {model.num_layers})"


# How a paper writes each model.norm_placement (docs/method.md's section titles).
PLACEMENT_NAMES = {"pre": "Pre-LN", "post": "Post-LN", "mix": "Mix-LN", "deepnorm": "DeepNorm",
                   "sandwich": "Sandwich-LN", "lns": "LNS", "peri": "Peri-LN", "hybrid": "HybridNorm",
                   "hybrid_star": "HybridNorm*"}


def run_label(config: Config) -> str:
    """A figure legend's name for a run: `Mix-LN (α=0.25), seed 1`, `Pre-LN, seed 42`."""
    model = config.model
    name = PLACEMENT_NAMES.get(model.norm_placement, model.norm_placement)
    if model.norm_placement == "mix":
        # post_layers overrides mix_alpha: then the count is what the config says.
        name += (f" (α={model.mix_alpha:g})" if model.post_layers is None
                 else f" ({model.post_layers} Post-LN of {model.num_layers})")
    return f"{name}, seed {config.train.seed}"


@dataclass
class Run:
    """One model to analyse: the weights folder read (`kind` "export", "hf export" or "checkpoint"), the run's full
    config, the step the weights are from, the run folder holding metrics.jsonl (None when it is not found) and
    the prepared-data record saved with the weights (None for older exports)."""

    path: Path  # as given
    weights: Path
    kind: str
    config: Config
    step: int | None
    run_dir: Path | None
    data_meta: dict[str, Any] | None
    name: str
    notes: list[str] = field(default_factory=list)  # one sentence each, for the report

    @property
    def metrics_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / METRICS_FILE

    @property
    def placement(self) -> str:
        return placement_label(self.config.model)

    @property
    def label(self) -> str:
        """How figures name the run (see `run_label`)."""
        return run_label(self.config)

    def load_model(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        """The unsplit model with these weights, in eval mode. fp32 by default: a bf16 run's weights are exact in
        fp32, and cosines near 1 need the precision (arccos magnifies rounding near 0 distance)."""
        # read_weights merges a checkpoint's TP shards, pipeline layer files and ZeRO-3 partitions into
        # consolidated names, so a checkpoint of any layout loads as the unsplit model, as an export does.
        weights = read_weights(self.weights)
        model = export.model_with_weights(weights.model_config, weights.tensors, self.weights, device)
        return model.to(dtype=dtype).eval()


def _run_dir_near(folder: Path, config: Config, *candidates: Path) -> Path | None:
    """The run folder of weights in `folder`: the first candidate holding metrics.jsonl, else the run's own
    train.out_dir if it still holds one (runs are moved after training, so the layout around the weights wins)."""
    for candidate in (*candidates, Path(config.train.out_dir)):
        if (candidate / METRICS_FILE).is_file():
            return candidate
    return None


def find_run(path: str | Path) -> Run:
    """The weights and config behind `path`: a run folder (its export, else its latest checkpoint), an export
    folder (mixln-export, with or without --hf), or a checkpoint folder. One CheckpointError sentence when it is
    none of them."""
    path = Path(path)
    expected = (f"expected a run folder (a train.out_dir), an export folder (mixln-export, with or without --hf) or "
                f"a checkpoint folder (<run>/{ckpt.CHECKPOINTS}/step_N)")
    if not path.is_dir():
        raise CheckpointError(f"{path} {'is a file' if path.exists() else 'does not exist'}: {expected}.")
    if is_export(path / "export"):
        run = _from_weights(path / "export", "export", path)
        newest = _latest_checkpoint_step(path)
        if newest is not None and run.step is not None and newest > run.step:
            # A run resumed after train.stop_after_step keeps its old export until it finishes.
            run.notes.append(f"{run.name}: its export is from step {run.step} but its latest checkpoint is from step "
                             f"{newest}; the export is analysed (name the checkpoint folder to analyse that one).")
    elif is_export(path):
        run = _from_weights(path, "export", path.parent)
    elif is_hf_folder(path):
        run = _from_weights(path, "hf export", path.parent)
    elif (path / ckpt.STATE_FILE).is_file():
        run = _from_weights(path, "checkpoint", path)
    elif (path / ckpt.CHECKPOINTS).is_dir() or (path / METRICS_FILE).is_file():
        latest = ckpt.latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path} holds neither an export nor a complete checkpoint to analyse: "
                                       "let the run finish (or stop it with train.stop_after_step), then try again.")
        run = _from_weights(latest, "checkpoint", path)
    else:
        raise CheckpointError(f"{path} is not a run folder, an export folder (mixln-export, with or without "
                                   f"--hf) or a checkpoint folder: it holds no export/, no {ckpt.CHECKPOINTS}/, no "
                                   f"{export.EXPORT_INDEX}, no config.json naming a model_type and no "
                                   f"{ckpt.STATE_FILE}.")
    run.path = path
    return run


def _latest_checkpoint_step(run_dir: Path) -> int | None:
    with contextlib.suppress(CheckpointError, OSError, ValueError, TypeError):
        folder = ckpt.latest_checkpoint(run_dir)
        if folder is not None:
            return int(run_record(folder).step)
    return None  # no checkpoint, or one this note cannot read: the export is what there is to analyse


def _from_weights(folder: Path, kind: str, around: Path) -> Run:
    """The Run of the weights in `folder` (of `kind`), found around `around` (the folder named, or its parent): the
    config and data record are the ones saved with the weights (run_record), as mixln-eval reads them."""
    step, data_meta, raw = run_record(folder)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{folder} keeps no run config (the run's data and sequence length): analyse a "
                                   "run, checkpoint or export that mixln-train, mixln-export or mixln-export --hf "
                                   "wrote.")
    checkpoint = kind == "checkpoint"
    config = config_from_dict(raw, source=str(folder / (ckpt.STATE_FILE if checkpoint else export.EXPORT_CONFIG)))
    if checkpoint:  # a checkpoint folder given on its own sits in <run>/checkpoints/
        run_dir = _run_dir_near(folder, config, around, folder.parent.parent)
        name = (run_dir or folder).name
        if around == folder:  # a checkpoint chosen by hand: its step is part of what is being compared
            name = f"{name}@step_{step}"
    else:
        run_dir = _run_dir_near(folder, config, around)
        name = (run_dir or around).name
    return Run(path=folder, weights=folder, kind=kind, config=config, step=step, run_dir=run_dir,
               data_meta=data_meta, name=name)


# ------------------------------------------------------------------------------------------------ held-out text
@dataclass
class HeldOut:
    """Held-out text as batches: `sequences` sequences (of the `available` ones, spread over them all) holding
    `target_tokens` positions with a target, from split `split` ("eval", or "all" for a local --data source) of
    the prepared folder `folder` (of data source `source`)."""

    batches: list[Batch]
    sequences: int
    available: int
    target_tokens: int
    source: str
    split: str
    folder: str
    seq_len: int

    def text(self) -> str:
        """Where the text comes from, e.g. `the eval split of c4` or `all of notes.jsonl`."""
        return f"all of {self.source}" if self.split == ALL else f"the {self.split} split of {self.source}"

    def describe(self) -> str:
        return (f"{self.sequences} of {self.available} sequences of {self.seq_len} tokens ({self.target_tokens} "
                f"targets) from {self.text()}")


def _run_tokenizer(run: Run, progress: bool) -> str:
    """A tokenizer spec that encodes exactly as the run's did. A trained BPE lives in the run's prepared folder,
    so another source must be encoded with that file, not with a BPE trained afresh on the new text."""
    from megatron_mixln.data import dataset_folder, open_datasets, train_limits

    config = run.config
    if config.data.tokenizer != "bpe":
        return config.data.tokenizer
    recorded = Path(run.data_meta["folder"]) if run.data_meta and run.data_meta.get("folder") else None
    for folder in (recorded, dataset_folder(config.data, train_limits(config))):
        if folder is not None and (folder / "tokenizer.json").is_file():
            return str(folder / "tokenizer.json")
    # Neither is on this machine: prepare the run's own data again, which trains the same BPE on the same text.
    meta, _, _ = open_datasets(config, progress=progress)
    return str(Path(meta["folder"]) / "tokenizer.json")


def held_out(run: Run, sequences: int | None = None, batch_size: int | None = None, data: str | None = None,
             progress: bool = False) -> HeldOut:
    """The run's held-out text as batches (the run's own eval split, the sample `eval_indices` draws, as its
    evaluation does), or with `data` that data source's text, encoded with the run's tokenizer.

    A local `data` (a file, a folder, `embedded`) is held-out text as a whole: every one of its documents is
    used. A hub source (c4, hf:NAME) gives its validation split, else the fraction of it a run would hold out.
    One DataError sentence when there is no text to evaluate.
    """
    from megatron_mixln.data import eval_batches, open_datasets
    from megatron_mixln.data.sampling import eval_indices
    from megatron_mixln.data.sources import hub_dataset_name, iter_documents

    config = run.config
    split = "eval"
    what = f"the held-out split of {run.name}'s data.source={config.data.source!r}"
    if data is not None:
        data_cfg = dataclasses.replace(config.data, source=data)
        if hub_dataset_name(data) is None:
            # The whole source, read as the "train" split of a preparation that holds nothing out; it only
            # serves as held-out text here, whatever the split is called.
            data_cfg = dataclasses.replace(data_cfg, eval_fraction=0.0, max_train_documents=-1, max_eval_documents=0)
            split = ALL
            # Before the tokenizer is looked for (which may mean preparing the run's data): an empty or
            # missing file is one sentence from the data package at once.
            if next(iter_documents(data_cfg, "train"), None) is None:
                raise DataError(f"--data {data!r} holds no text to evaluate on: it has no non-empty document.")
        else:  # a single training document: the preparation insists on one, and the train split is unused
            data_cfg = dataclasses.replace(data_cfg, max_train_documents=1)
        data_cfg = dataclasses.replace(data_cfg, tokenizer=_run_tokenizer(run, progress))
        config = dataclasses.replace(config, data=data_cfg)
        what = f"--data {data!r}"
    meta, train_data, eval_data = open_datasets(config, progress=progress)
    dataset = train_data if split == ALL else eval_data
    if meta["max_token_id"] >= config.model.vocab_size:
        raise DataError(f"{what} holds token id {meta['max_token_id']}, beyond the vocabulary of {run.name} "
                        f"(model.vocab_size={config.model.vocab_size}): it was not tokenised as the run's text was.")
    wanted = sequences if sequences is not None else (config.train.eval_sequences or 256)
    indices = eval_indices(len(dataset), wanted)
    targets = int(dataset.target_counts(indices).sum()) if len(indices) else 0
    if targets == 0:
        raise DataError(f"{what} gives no held-out sequence with a target (data.seq_len={config.data.seq_len}, "
                        f"data.mode={config.data.mode}): pass a source with more text, e.g. --data embedded.")
    batches = list(eval_batches(dataset, len(indices), batch_size or config.train.micro_batch_size))
    return HeldOut(batches=batches, sequences=len(indices), available=len(dataset), target_tokens=targets,
                   source=config.data.source, split=split, folder=meta["folder"], seq_len=config.data.seq_len)


def choose_device(device: str | None) -> torch.device:
    """`cuda` when a GPU is visible and nothing is asked for; one ConfigError sentence for a missing GPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r} is invalid: expected cpu or cuda.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is visible on this machine; use "
                          "--device cpu.")
    return torch.device(device)


def finite_or_text(value: float) -> float | str:
    """JSON has no NaN / inf: written as text, as metrics.jsonl does."""
    return value if math.isfinite(value) else str(value)
