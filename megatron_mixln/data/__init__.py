"""Data: sources (C4, hub datasets, the embedded Wikipedia sample, local files), tokenizers, prepared token files,
fixed-length sequences and the global batch order; `open_datasets` is how a run gets its data, on every rank."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from megatron_mixln.config import DataConfig
from megatron_mixln.data.errors import DataError
from megatron_mixln.data.prepare import (TrainLimits, dataset_folder, prepare_dataset, prepared_tokenizer, read_meta,
                                         train_limits, wait_for_dataset, write_failure_marker)
from megatron_mixln.data.sources import EMBEDDED_CORPUS, iter_documents
from megatron_mixln.data.token_files import TokenFile
from megatron_mixln.data.tokenizers import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from megatron_mixln.config import Config
    from megatron_mixln.data.sampling import IGNORE_INDEX, GlobalBatchSampler, SequenceDataset, collate, eval_batches

_SAMPLING = ("IGNORE_INDEX", "GlobalBatchSampler", "SequenceDataset", "collate", "eval_batches")

__all__ = [
    "DataError", "load_tokenizer", "Tokenizer", "iter_documents", "prepare_dataset", "prepared_tokenizer",
    "read_meta", "TokenFile", "SequenceDataset", "GlobalBatchSampler", "collate", "eval_batches", "open_datasets",
    "IGNORE_INDEX", "EMBEDDED_CORPUS", "TrainLimits", "train_limits", "dataset_folder", "wait_for_dataset",
    "is_preparer",
]


def __getattr__(name: str):
    # sampling imports torch (a second per process); tokenising workers import this package but never need it.
    if name in _SAMPLING:
        from megatron_mixln.data import sampling

        return getattr(sampling, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_preparer(config: Config, rank: int, local_rank: int) -> bool:
    """Whether this process tokenises: global rank 0 into a shared data.cache_dir, else local rank 0 of each node."""
    return rank == 0 if config.data.cache_shared else local_rank == 0


def open_datasets(config: Config, preparer: bool = True, progress: bool = True, rank: int | None = None
                  ) -> tuple[dict, SequenceDataset, SequenceDataset]:
    """Prepare the data (the preparer) or wait for it on the file system (everyone else), then open both splits:
    (meta, train, eval); meta["folder"] is the prepared folder. Needs no torch.distributed, so call it before the
    process group exists: a long prepare then cannot run into a collective timeout."""
    if isinstance(config, DataConfig):
        raise TypeError("open_datasets takes the whole Config (its train.steps and train.global_batch_size bound "
                        "the data), not config.data")
    data_cfg, limits = config.data, train_limits(config)
    folder = dataset_folder(data_cfg, limits)  # the same path on every rank, found without reading any data
    if preparer:
        try:
            prepare_dataset(data_cfg, progress=progress, limits=limits, num_proc=data_cfg.num_proc or None)
        except Exception as err:
            write_failure_marker(folder, err)
            raise
    else:
        if rank is None and os.environ.get("RANK", "").isdigit():
            rank = int(os.environ["RANK"])
        wait_for_dataset(
            folder, rank=rank,
            preparer="rank 0" if data_cfg.cache_shared else "local rank 0 of this node",
            hint="(data.cache_shared=true: data.cache_dir must be a folder every node sees; otherwise set "
                 "data.cache_shared=false)" if data_cfg.cache_shared else "")
    from megatron_mixln.data.sampling import SequenceDataset

    meta = {**read_meta(folder), "folder": str(folder)}
    train, eval_ = (SequenceDataset(TokenFile(folder, split), data_cfg.seq_len, data_cfg.mode, meta["pad_id"])
                    for split in ("train", "eval"))
    return meta, train, eval_
