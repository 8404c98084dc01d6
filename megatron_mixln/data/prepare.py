"""Tokenise a source once into a cache folder of flat token files, keyed by everything that changes the tokens.

A folder is built under a temporary name and renamed into place when complete, so a killed prepare never leaves
a folder that looks valid.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from itertools import chain, islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from megatron_mixln.config import DataConfig
from megatron_mixln.data.errors import DataError
from megatron_mixln.data.sources import SPLITS, hub_dataset_name, iter_documents, local_source_files
from megatron_mixln.data.tokenizers import Tokenizer, load_tokenizer

FORMAT_VERSION = 1  # bump when the folder layout or the tokenisation rule changes
ENCODE_BATCH_DOCUMENTS = 1024
TEMP_PREFIX = ".tmp-"


def prepare_dataset(data_cfg: DataConfig, progress: bool = True) -> Path:
    """Tokenise the train and eval splits into `cache_dir/<name>-<key>/` unless that folder exists; return it."""
    data_cfg.validate()
    key_fields = cache_key_fields(data_cfg)
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(data_cfg.cache_dir).expanduser()
    folder = cache_dir / f"{_slug(data_cfg)}-{key}"
    if is_prepared(folder):
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    # The lock makes concurrent ranks wait for the first one instead of all tokenising the same data.
    with _exclusive_lock(cache_dir / f".{folder.name}.lock") as locked:
        if is_prepared(folder):
            return folder
        if locked:  # nobody else is building this key, so any temporary folder of it is a crashed attempt
            for stale in cache_dir.glob(f"{TEMP_PREFIX}{folder.name}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        temp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{folder.name}-", dir=cache_dir))
        try:
            _build(data_cfg, key_fields, temp, progress)
            os.rename(temp, folder)
        except OSError:
            if not is_prepared(folder):  # losing a rename race to a finished folder is fine; anything else is not
                raise
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    return folder


def is_prepared(folder: Path) -> bool:
    # meta.json is written last inside the temporary folder, and the folder only appears under its final name whole.
    return (folder / "meta.json").is_file()


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    if not is_prepared(folder):
        raise DataError(f"{str(folder)!r} is not a prepared dataset: it has no meta.json; run prepare_dataset first.")
    return json.loads((folder / "meta.json").read_text())


def prepared_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer a prepared folder was made with (its own tokenizer.json when a BPE was trained)."""
    folder = Path(folder)
    meta = read_meta(folder)
    return load_tokenizer(str(folder / "tokenizer.json") if meta["tokenizer"] == "bpe" else meta["tokenizer"])


def cache_key_fields(data_cfg: DataConfig) -> dict:
    """Every input that changes the tokens; seq_len and mode do not (sequences are cut at read time)."""
    fields = {
        "format": FORMAT_VERSION,
        "source": data_cfg.source,
        "source_files": _file_stamps(local_source_files(data_cfg.source)) if hub_dataset_name(data_cfg.source) is None
        else None,
        "text_field": data_cfg.text_field,
        "tokenizer": data_cfg.tokenizer,
        "bpe_vocab_size": data_cfg.bpe_vocab_size if data_cfg.tokenizer == "bpe" else None,
        "eval_fraction": data_cfg.eval_fraction,
        "max_train_documents": data_cfg.max_train_documents,
        "max_eval_documents": data_cfg.max_eval_documents,
    }
    tokenizer_path = Path(data_cfg.tokenizer).expanduser()
    if data_cfg.tokenizer != "bpe" and tokenizer_path.exists():
        files = [tokenizer_path] if tokenizer_path.is_file() else sorted(p for p in tokenizer_path.rglob("*")
                                                                         if p.is_file())
        fields["tokenizer_files"] = _file_stamps(files)
    return fields


def _file_stamps(files: list[Path]) -> list[list]:
    return [[str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] for path in files]


def _slug(data_cfg: DataConfig) -> str:
    """A readable folder-name prefix such as `enwiki_sample-bpe8192`."""
    if hub_dataset_name(data_cfg.source) is not None or data_cfg.source == "embedded":
        source = data_cfg.source
    else:
        source = Path(data_cfg.source).name.split(".")[0]
    tokenizer = f"bpe{data_cfg.bpe_vocab_size}" if data_cfg.tokenizer == "bpe" else Path(data_cfg.tokenizer).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{source}-{tokenizer}")[:80]


def _build(data_cfg: DataConfig, key_fields: dict, folder: Path, progress: bool) -> None:
    start = time.perf_counter()
    if data_cfg.tokenizer == "bpe":
        tokenizer = load_tokenizer("bpe", iter_documents(data_cfg, "train"), data_cfg.bpe_vocab_size, save_dir=folder)
    else:
        tokenizer = load_tokenizer(data_cfg.tokenizer)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 - 1 else np.uint32
    splits, max_token_id = {}, -1
    for split in SPLITS:
        documents = tqdm(iter_documents(data_cfg, split), desc=f"tokenising {split}", unit=" docs",
                         disable=not progress, mininterval=1.0)
        counts = _write_split(documents, tokenizer, dtype, folder / f"{split}.tokens", folder / f"{split}.offsets.npy")
        splits[split] = {"documents": counts["documents"], "tokens": counts["tokens"]}
        max_token_id = max(max_token_id, counts["max_token_id"])
    if splits["train"]["documents"] == 0:
        raise DataError(f"data.source={data_cfg.source!r} gave no training documents: check the source and "
                        f"data.max_train_documents.")
    meta = {
        "format": FORMAT_VERSION,
        "source": data_cfg.source,
        "text_field": data_cfg.text_field,
        "tokenizer": data_cfg.tokenizer,
        "tokenizer_name": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "max_token_id": max_token_id,
        "dtype": np.dtype(dtype).name,
        "splits": splits,
        "cache_key": key_fields,
        "prepare_seconds": round(time.perf_counter() - start, 2),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _write_split(documents: Iterable[str], tokenizer: Tokenizer, dtype, tokens_path: Path,
                 offsets_path: Path) -> dict:
    """Append each document's tokens + eos to a flat file; offsets[i] is where document i starts."""
    lengths, max_token_id = [], -1
    with open(tokens_path, "wb") as out:
        for batch in _batches(documents, ENCODE_BATCH_DOCUMENTS):
            encoded = [ids + [tokenizer.eos_id] for ids in tokenizer.encode_batch(batch)]
            flat = np.fromiter(chain.from_iterable(encoded), dtype=np.int64, count=sum(map(len, encoded)))
            max_token_id = max(max_token_id, int(flat.max()))
            if max_token_id > np.iinfo(dtype).max:
                raise DataError(f"tokenizer {tokenizer.name!r} produced id {max_token_id}, beyond its "
                                f"vocab_size={tokenizer.vocab_size}.")
            flat.astype(dtype).tofile(out)
            lengths.extend(map(len, encoded))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(offsets_path, offsets)
    return {"documents": len(lengths), "tokens": int(offsets[-1]), "max_token_id": max_token_id}


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[bool]:
    """An flock on `path`; yields False (unlocked) on file systems without locks, where the rename still keeps
    the folder whole."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
