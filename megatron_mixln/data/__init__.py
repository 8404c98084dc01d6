"""Data: sources (C4, hub datasets, the embedded Wikipedia sample, local files), tokenizers, prepared token files,
fixed-length sequences and the global batch order."""
from __future__ import annotations

from megatron_mixln.config import DataConfig
from megatron_mixln.data.errors import DataError
from megatron_mixln.data.prepare import prepare_dataset, prepared_tokenizer, read_meta
from megatron_mixln.data.sampling import IGNORE_INDEX, GlobalBatchSampler, SequenceDataset, collate, eval_batches
from megatron_mixln.data.sources import EMBEDDED_CORPUS, iter_documents
from megatron_mixln.data.token_files import TokenFile
from megatron_mixln.data.tokenizers import Tokenizer, load_tokenizer

__all__ = [
    "DataError", "load_tokenizer", "Tokenizer", "iter_documents", "prepare_dataset", "prepared_tokenizer",
    "read_meta", "TokenFile", "SequenceDataset", "GlobalBatchSampler", "collate", "eval_batches", "open_datasets",
    "IGNORE_INDEX", "EMBEDDED_CORPUS",
]


def open_datasets(data_cfg: DataConfig, progress: bool = True) -> tuple[dict, SequenceDataset, SequenceDataset]:
    """Prepare the data if needed and open both splits: (meta, train, eval); meta["folder"] is the prepared folder."""
    folder = prepare_dataset(data_cfg, progress=progress)
    meta = {**read_meta(folder), "folder": str(folder)}
    train, eval_ = (SequenceDataset(TokenFile(folder, split), data_cfg.seq_len, data_cfg.mode, meta["pad_id"])
                    for split in ("train", "eval"))
    return meta, train, eval_
