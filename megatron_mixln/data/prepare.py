"""Tokenise a source once into a cache folder of flat token files, keyed by everything that changes the tokens.

Only what the run will read is tokenised (`TrainLimits`), shard by shard in a process pool; the parts are joined
in shard order and cut at the limit, so any number of processes writes the same bytes. A folder is built under a
temporary name and renamed into place when complete, so a killed prepare never leaves a folder that looks valid.
Ranks that do not prepare wait for the folder on the file system (`wait_for_dataset`), not in a collective.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
import queue as queue_module
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from megatron_mixln.config import DataConfig
from megatron_mixln.data.errors import DataError, first_line
from megatron_mixln.data.instructions import DropCounts, ExampleEncoder, example_texts
from megatron_mixln.data.sources import (Shard, hub_dataset_name, local_source_files, shard_documents, shard_records,
                                         source_shards)
from megatron_mixln.data.tokenizers import Tokenizer, load_tokenizer, train_bpe

if TYPE_CHECKING:
    from megatron_mixln.config import Config

FORMAT_VERSION = 2  # bump when the folder layout or the tokenisation rule changes (2: per-shard eval hash)
ENCODE_BATCH_DOCUMENTS = 1024
TEMP_PREFIX = ".tmp-"
FAILED_SUFFIX = ".failed"
MAX_AUTO_PROCESSES = 32  # past this, a hub source's download, not the CPU, is what limits a prepare


@dataclass(frozen=True)
class TrainLimits:
    """How much of the train split to tokenise: the first documents up to max_documents, or up to the document
    that brings the total to max_tokens (eos included); None = unbounded."""

    max_documents: int | None = None
    max_tokens: int | None = None

    def reached(self, documents: int, tokens: int) -> bool:
        return ((self.max_documents is not None and documents >= self.max_documents)
                or (self.max_tokens is not None and tokens >= self.max_tokens))


def train_limits(config: Config) -> TrainLimits:
    """What a run reads: data.max_train_documents when positive, everything for -1, and for 0 the documents of
    train.steps x train.global_batch_size sequences (document mode) or the tokens they cover (packed mode)."""
    data = config.data
    if data.max_train_documents > 0:
        return TrainLimits(max_documents=data.max_train_documents)
    if data.max_train_documents < 0:
        return TrainLimits()
    sequences = config.train.steps * config.train.global_batch_size
    if data.mode == "document":
        return TrainLimits(max_documents=sequences)
    return TrainLimits(max_tokens=sequences * data.seq_len + 1)  # window i reads one token past its end


def prepare_dataset(data_cfg: DataConfig, progress: bool = True, limits: TrainLimits | None = None,
                    num_proc: int | None = None) -> Path:
    """Tokenise the train split (bounded by `limits`; None = a positive data.max_train_documents, else all) and
    the eval split (bounded by data.max_eval_documents) into `cache_dir/<name>-<key>/` unless that folder exists;
    return it. num_proc: tokenising processes (None = one per CPU core, at most one per shard and 32)."""
    data_cfg.validate()
    limits = _default_limits(data_cfg) if limits is None else limits
    key_fields = cache_key_fields(data_cfg, limits)
    folder = _folder(data_cfg, key_fields)
    cache_dir = folder.parent
    if is_prepared(folder):
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    failure_marker(folder).unlink(missing_ok=True)  # this attempt's outcome replaces an earlier one's
    # The lock makes concurrent ranks wait for the first one instead of all tokenising the same data.
    with _exclusive_lock(cache_dir / f".{folder.name}.lock") as locked:
        if is_prepared(folder):
            return folder
        if locked:  # nobody else is building this key, so any temporary folder of it is a crashed attempt
            for stale in cache_dir.glob(f"{TEMP_PREFIX}{folder.name}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        temp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{folder.name}-", dir=cache_dir))
        try:
            _build(data_cfg, key_fields, temp, progress, limits, num_proc)
            os.rename(temp, folder)
        except OSError:
            if not is_prepared(folder):  # losing a rename race to a finished folder is fine; anything else is not
                raise
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    return folder


def dataset_folder(data_cfg: DataConfig, limits: TrainLimits | None = None) -> Path:
    """The folder prepare_dataset(data_cfg, limits=limits) writes, computed without reading any data."""
    limits = _default_limits(data_cfg) if limits is None else limits
    return _folder(data_cfg, cache_key_fields(data_cfg, limits))


def is_prepared(folder: Path) -> bool:
    # meta.json is written last inside the temporary folder, and the folder only appears under its final name whole.
    return (Path(folder) / "meta.json").is_file()


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


def cache_key_fields(data_cfg: DataConfig, limits: TrainLimits | None = None) -> dict:
    """Every input that changes the tokens; seq_len and mode do not (sequences are cut at read time) except
    through the token bound of a packed run. num_proc does not: every process count writes the same bytes."""
    limits = _default_limits(data_cfg) if limits is None else limits
    fields = {
        "format": FORMAT_VERSION,
        "source": data_cfg.source,
        "source_files": _file_stamps(local_source_files(data_cfg.source)) if hub_dataset_name(data_cfg.source) is None
        else None,
        "text_field": data_cfg.text_field,
        "tokenizer": data_cfg.tokenizer,
        "bpe_vocab_size": data_cfg.bpe_vocab_size if data_cfg.tokenizer == "bpe" else None,
        "eval_fraction": data_cfg.eval_fraction,
        "train_limit": {"documents": limits.max_documents, "tokens": limits.max_tokens},
        "max_eval_documents": data_cfg.max_eval_documents,
    }
    if data_cfg.format != "text":
        # Instruction and chat folders also hold prompt lengths, and drop the prompts that fill seq_len.
        fields["examples"] = {name: getattr(data_cfg, name) for name in (
            "format", "instruction_field", "input_field", "output_field", "messages_field", "prompt_template",
            "seq_len")}
    tokenizer_path = Path(data_cfg.tokenizer).expanduser()
    if data_cfg.tokenizer != "bpe" and tokenizer_path.exists():
        files = [tokenizer_path] if tokenizer_path.is_file() else sorted(p for p in tokenizer_path.rglob("*")
                                                                         if p.is_file())
        fields["tokenizer_files"] = _file_stamps(files)
    return fields


def resolve_num_proc(num_proc: int | None, num_shards: int) -> int:
    """Processes to tokenise `num_shards` shards with: num_proc, or one per usable CPU core, never more than shards."""
    if not num_proc:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_proc = min(cores, MAX_AUTO_PROCESSES)
    return max(1, min(num_proc, num_shards))


# ---------------------------------------------------------------- other ranks: wait on the file system


def failure_marker(folder: str | Path) -> Path:
    """The file next to `folder` in which a failed preparer leaves its error for the waiting ranks."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}{FAILED_SUFFIX}"


def write_failure_marker(folder: str | Path, err: BaseException) -> None:
    """Tell the waiting ranks why preparing `folder` failed: a DataError's own sentence, else its first line."""
    message = str(err) if isinstance(err, DataError) else (
        f"preparing {str(folder)!r} failed with {type(err).__name__}: {first_line(err)} (see the preparing rank's "
        f"log).")
    marker = failure_marker(folder)
    with contextlib.suppress(OSError):  # the preparer's own error matters more than telling the others
        marker.parent.mkdir(parents=True, exist_ok=True)
        temp = marker.with_name(f"{marker.name}.{os.getpid()}")
        temp.write_text(json.dumps({"error": message}) + "\n")
        os.replace(temp, marker)


def wait_for_dataset(folder: str | Path, rank: int | None = None, preparer: str = "rank 0", poll_s: float = 5.0,
                     report_every_s: float = 60.0, stale_after_s: float = 60.0, hint: str = "") -> Path:
    """Poll until another process has prepared `folder` (its meta.json exists) and return it; no torch.distributed,
    so no collective can time out however long the preparer takes. Raises the preparer's DataError when it leaves
    a failure marker; a marker older than stale_after_s when waiting starts is an earlier run's and is ignored."""
    folder, marker = Path(folder), failure_marker(folder)
    label = f"rank {rank}" if rank is not None else "this rank"
    started = time.time()
    next_report = started
    while True:
        if is_prepared(folder):
            return folder
        error = _marker_error(marker, newer_than=started - stale_after_s)
        if error is not None:
            raise DataError(error)
        now = time.time()
        if now >= next_report:
            print(f"{label}: waiting for {preparer} to prepare {folder} ({int((now - started) // 60)} min)"
                  + (f" {hint}" if hint and next_report == started else ""), flush=True)
            next_report += report_every_s
        time.sleep(poll_s)


def _marker_error(marker: Path, newer_than: float) -> str | None:
    try:
        if marker.stat().st_mtime < newer_than:
            return None
        return json.loads(marker.read_text())["error"]
    except (OSError, ValueError, KeyError):  # absent, or replaced while being read: look again next poll
        return None


# ---------------------------------------------------------------- building a folder


def _default_limits(data_cfg: DataConfig) -> TrainLimits:
    # Without the run's Config there is no auto bound: a positive field caps, 0 and -1 take everything.
    return TrainLimits(max_documents=data_cfg.max_train_documents if data_cfg.max_train_documents > 0 else None)


def _folder(data_cfg: DataConfig, key_fields: dict) -> Path:
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    return Path(data_cfg.cache_dir).expanduser() / f"{_slug(data_cfg)}-{key}"


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


def _build(data_cfg: DataConfig, key_fields: dict, folder: Path, progress: bool, limits: TrainLimits,
           num_proc: int | None) -> None:
    start = time.perf_counter()
    shards = source_shards(data_cfg)
    if data_cfg.tokenizer == "bpe":
        # Trained once, here, on the first train documents (those the run reads when the bound counts documents);
        # pool workers then load the saved tokenizer.json.
        texts = chain.from_iterable(
            shard_documents(shard, "train", data_cfg) if data_cfg.format == "text"
            else example_texts(shard_records(shard, "train", data_cfg), data_cfg) for shard in shards["train"])
        tokenizer = train_bpe(islice(texts, limits.max_documents), data_cfg.bpe_vocab_size, save_dir=folder)
        tokenizer_spec = str(folder / "tokenizer.json")
    else:
        tokenizer_spec = data_cfg.tokenizer
        tokenizer = load_tokenizer(tokenizer_spec)
    _TOKENIZERS[tokenizer_spec] = tokenizer  # shards tokenised in this process reuse it
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 - 1 else np.uint32
    eval_limits = TrainLimits(max_documents=data_cfg.max_eval_documents or None)
    processes = resolve_num_proc(num_proc, max(len(shards["train"]), len(shards["eval"])))
    splits, max_token_id, dropped = {}, -1, {}
    with ShardPool(processes) as pool:
        for split, split_limits in (("train", limits), ("eval", eval_limits)):
            counts = tokenize_split(pool, data_cfg, split, shards[split], tokenizer_spec, dtype, folder,
                                    split_limits, progress)
            splits[split] = {"documents": counts["documents"], "tokens": counts["tokens"], "shards": counts["shards"]}
            max_token_id = max(max_token_id, counts["max_token_id"])
            for where, shard_counts in counts["examples"].items():  # both splits read each file: one count
                dropped.setdefault(where, DropCounts(where)).merge(shard_counts)
    shutil.rmtree(folder / "parts", ignore_errors=True)
    sentences = [sentence for counts in dropped.values() if (sentence := counts.sentence(data_cfg))]
    if splits["train"]["documents"] == 0:
        if data_cfg.format != "text" and sentences:
            raise DataError(f"data.source={data_cfg.source!r} has no usable training example: "
                            + " ".join(sentences))
        raise DataError(f"data.source={data_cfg.source!r} gave no training documents: check the source and "
                        f"data.max_train_documents.")
    for sentence in sentences:
        print(f"note: {sentence}", flush=True)
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
        "data_format": data_cfg.format,
        "examples": [counts.to_dict() for counts in dropped.values()] if data_cfg.format != "text" else None,
        "cache_key": key_fields,
        "processes": processes,
        "prepare_seconds": round(time.perf_counter() - start, 2),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------- tokenising shards


@dataclass(frozen=True)
class ShardTask:
    """One shard to tokenise into part files, reading at most what `limits` can still use."""

    data_cfg: DataConfig
    shard: Shard
    split: str
    tokenizer: str  # a spec load_tokenizer reads (a trained BPE as its saved tokenizer.json)
    dtype: str
    part: str  # path prefix of the part files: <part>.tokens, <part>.lengths.npy
    limits: TrainLimits


@dataclass(frozen=True)
class ShardResult:
    index: int
    documents: int
    tokens: int
    max_token_id: int
    complete: bool  # False when stopped early because earlier shards already filled the split
    part: str
    cpu_seconds: float  # the tokenising process's CPU time on this shard (throughput that other load cannot skew)
    examples: DropCounts | None = None  # instruction / chat: the records read and why some were dropped


_TOKENIZERS: dict[str, Tokenizer] = {}  # per process: a worker loads each tokenizer once, not once per shard
_WORKER: dict = {}  # in a pool worker: "queue" for progress, "stop" event


def tokenize_shard(task: ShardTask, report: Callable[[int, int], None] = lambda documents, tokens: None,
                   should_stop: Callable[[], bool] = lambda: False) -> ShardResult:
    """Tokenise one shard's documents (+ eos each) into <part>.tokens and their lengths into <part>.lengths.npy
    (instruction / chat records: also their prompt lengths into <part>.prompts.npy), stopping once the shard alone
    reaches task.limits; report(documents, tokens) after each batch."""
    tokenizer = _TOKENIZERS.get(task.tokenizer)
    if tokenizer is None:
        tokenizer = _TOKENIZERS[task.tokenizer] = load_tokenizer(task.tokenizer)
    dtype = np.dtype(task.dtype)
    limits = task.limits
    cpu_start = time.process_time()
    examples = None
    if task.data_cfg.format == "text":
        documents = islice(shard_documents(task.shard, task.split, task.data_cfg), limits.max_documents)

        def encode(batch: list) -> tuple[list[list[int]], list[int]]:
            return [ids + [tokenizer.eos_id] for ids in tokenizer.encode_batch(batch)], []
    else:  # no islice: the bound counts the examples kept, not the records read
        documents = shard_records(task.shard, task.split, task.data_cfg)
        examples = ExampleEncoder(task.data_cfg, tokenizer, task.shard.where)
        encode = examples.encode_batch
    lengths: list[int] = []
    prompt_lengths: list[int] = []
    total_tokens, max_token_id, complete = 0, -1, True
    with open(f"{task.part}.tokens", "wb") as out:
        for batch in _batches(documents, ENCODE_BATCH_DOCUMENTS):
            if should_stop():
                complete = False
                break
            encoded, prompts = encode(batch)
            if not encoded:
                continue
            if limits.max_tokens is not None:  # keep documents up to the one that reaches the token bound
                ends = np.cumsum([len(ids) for ids in encoded]) + total_tokens
                encoded = encoded[:int(np.searchsorted(ends, limits.max_tokens)) + 1]
            prompt_lengths.extend(prompts[:len(encoded)])
            flat = np.fromiter(chain.from_iterable(encoded), dtype=np.int64, count=sum(map(len, encoded)))
            max_token_id = max(max_token_id, int(flat.max()))
            if max_token_id > np.iinfo(dtype).max:
                raise DataError(f"tokenizer {tokenizer.name!r} produced id {max_token_id}, beyond its "
                                f"vocab_size={tokenizer.vocab_size}.")
            out.write(flat.astype(dtype).data)  # not ndarray.tofile, whose short write on a full disk has no errno
            lengths.extend(map(len, encoded))
            total_tokens += len(flat)
            report(len(encoded), len(flat))
            if limits.reached(len(lengths), total_tokens):
                break
    np.save(f"{task.part}.lengths.npy", np.asarray(lengths, dtype=np.int64))
    if examples is not None:
        if complete and not limits.reached(len(lengths), total_tokens):  # the whole shard was read
            examples.check_schema()
        np.save(f"{task.part}.prompts.npy", np.asarray(prompt_lengths, dtype=np.int64))
    return ShardResult(index=task.shard.index, documents=len(lengths), tokens=total_tokens,
                       max_token_id=max_token_id, complete=complete, part=task.part,
                       cpu_seconds=time.process_time() - cpu_start,
                       examples=None if examples is None else examples.counts)


def _init_worker(progress_queue, stop_event) -> None:
    # The pool already puts one process on each core; tokenizers' own threads would only oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(queue=progress_queue, stop=stop_event)


def _pool_tokenize_shard(task: ShardTask) -> ShardResult:
    index = task.shard.index
    return tokenize_shard(task, report=lambda documents, tokens: _WORKER["queue"].put((index, documents, tokens)),
                          should_stop=_WORKER["stop"].is_set)


class ShardPool:
    """A spawn-context process pool for shards, started on first use; `processes` <= 1 means no pool at all."""

    def __init__(self, processes: int):
        self.processes = processes
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None

    def executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._executor is None:
            # spawn, not fork: torch and tokenizers hold threads and locks a forked child would inherit broken.
            context = multiprocessing.get_context("spawn")
            self.queue, self.stop = context.Queue(), context.Event()
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self.processes, mp_context=context, initializer=_init_worker, initargs=(self.queue, self.stop))
        return self._executor

    def __enter__(self) -> "ShardPool":
        return self

    def __exit__(self, *exc) -> None:
        if self._executor is not None:
            self.stop.set()
            self._executor.shutdown(wait=True, cancel_futures=True)


def tokenize_split(pool: ShardPool, data_cfg: DataConfig, split: str, shards: list[Shard], tokenizer_spec: str,
                   dtype, folder: Path, limits: TrainLimits, progress: bool = True) -> dict:
    """Tokenise `shards` in order into folder/{split}.tokens and folder/{split}.offsets.npy, cut at `limits`.

    At most pool.processes shards are in flight; none is started once the shards finished so far fill the split,
    and those still running are told to stop. Errors surface in shard order, only from shards the split uses."""
    parts = folder / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    tasks = [ShardTask(data_cfg=data_cfg, shard=shard, split=split, tokenizer=tokenizer_spec,
                       dtype=np.dtype(dtype).name, part=str(parts / f"{split}-{shard.index:06d}"), limits=limits)
             for shard in shards]
    width = min(pool.processes, len(tasks))
    bar = _ProgressBar(split, limits, progress, width)
    joined = _JoinedSplit(folder, split, dtype, limits)
    try:
        if width <= 1:
            for task in tasks:
                if joined.full:
                    break
                # In order, in this process: the shard only needs what the earlier ones left.
                remaining = TrainLimits(
                    None if limits.max_documents is None else limits.max_documents - joined.documents,
                    None if limits.max_tokens is None else limits.max_tokens - joined.tokens)
                joined.add(tokenize_shard(dataclasses.replace(task, limits=remaining), report=bar.add))
        else:
            _run_in_pool(pool, tasks, width, joined, bar)
    finally:
        bar.close()
    return joined.finish()


def _run_in_pool(pool: ShardPool, tasks: list[ShardTask], width: int, joined: "_JoinedSplit",
                 bar: "_ProgressBar") -> None:
    executor = pool.executor()
    in_flight: dict[concurrent.futures.Future, int] = {}
    finished: dict[int, concurrent.futures.Future] = {}
    next_task = 0
    try:
        while True:
            while not joined.full and next_task < len(tasks) and len(in_flight) < width:
                in_flight[executor.submit(_pool_tokenize_shard, tasks[next_task])] = next_task
                next_task += 1
            if not in_flight:
                break
            done, _ = concurrent.futures.wait(in_flight, timeout=0.5, return_when=concurrent.futures.FIRST_COMPLETED)
            _drain(pool.queue, bar)
            for future in done:
                finished[in_flight.pop(future)] = future
            while not joined.full and joined.shards in finished:
                joined.add(finished.pop(joined.shards).result())  # a shard's error is raised once it is needed
            if joined.full:
                pool.stop.set()
    finally:
        pool.stop.set()
        concurrent.futures.wait(in_flight)
        _drain(pool.queue, bar)
        pool.stop.clear()


def _drain(progress_queue, bar: "_ProgressBar") -> None:
    while True:
        try:
            _, documents, tokens = progress_queue.get_nowait()
        except queue_module.Empty:
            return
        bar.add(documents, tokens)


class _ProgressBar:
    """Documents tokenised so far, against the bound when there is one (tokens for a token bound), with an ETA."""

    def __init__(self, split: str, limits: TrainLimits, enabled: bool, processes: int):
        self.by_tokens = limits.max_tokens is not None and limits.max_documents is None
        self.total = limits.max_tokens if self.by_tokens else limits.max_documents
        self.count = 0
        self.bar = tqdm(total=self.total, desc=f"tokenising {split} ({processes} process{'es' * (processes > 1)})",
                        unit=" tokens" if self.by_tokens else " docs", unit_scale=True, disable=not enabled,
                        mininterval=1.0, smoothing=0.05)

    def add(self, documents: int, tokens: int) -> None:
        self.count += tokens if self.by_tokens else documents
        # Surplus shards in flight may tokenise past the bound; the bar stops at it.
        shown = self.count if self.total is None else min(self.count, self.total)
        if shown > self.bar.n:
            self.bar.update(shown - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class _JoinedSplit:
    """The split's token file and offsets, built by appending shard parts in shard order, cut at the limits."""

    def __init__(self, folder: Path, split: str, dtype, limits: TrainLimits):
        self.folder, self.split, self.dtype, self.limits = folder, split, np.dtype(dtype), limits
        self.tokens_path = folder / f"{split}.tokens"
        self.tokens_path.write_bytes(b"")
        self.documents = self.tokens = self.shards = 0
        self.cpu_seconds = 0.0
        self.max_token_id = -1
        self.kept: list[tuple[str, int]] = []  # (part, documents kept from it)
        self.examples: dict[str, DropCounts] = {}  # instruction / chat: per shard, records read and dropped

    @property
    def full(self) -> bool:
        return self.limits.reached(self.documents, self.tokens)

    def add(self, result: ShardResult) -> None:
        if result.index != self.shards or not result.complete:
            raise RuntimeError(f"shard {result.index} joined out of order (expected {self.shards}, complete "
                               f"{result.complete})")
        lengths = np.load(f"{result.part}.lengths.npy")
        keep = len(lengths)
        if self.limits.max_documents is not None:
            keep = min(keep, self.limits.max_documents - self.documents)
        if self.limits.max_tokens is not None:
            ends = np.cumsum(lengths)
            keep = min(keep, int(np.searchsorted(ends, self.limits.max_tokens - self.tokens)) + 1)
        kept_tokens = int(lengths[:keep].sum())
        with open(f"{result.part}.tokens", "rb") as part, open(self.tokens_path, "ab") as out:
            _copy_bytes(part, out, kept_tokens * self.dtype.itemsize)
        if keep == len(lengths):
            self.max_token_id = max(self.max_token_id, result.max_token_id)
        elif kept_tokens:
            kept = np.fromfile(f"{result.part}.tokens", dtype=self.dtype, count=kept_tokens)
            self.max_token_id = max(self.max_token_id, int(kept.max()))
        os.unlink(f"{result.part}.tokens")
        self.kept.append((result.part, keep))
        self.documents += keep
        self.tokens += kept_tokens
        self.shards += 1
        self.cpu_seconds += result.cpu_seconds
        if result.examples is not None:
            self.examples[result.examples.where] = result.examples

    def finish(self) -> dict:
        """Write {split}.offsets.npy (offsets[i] is where document i starts) and drop the part files."""
        offsets = np.lib.format.open_memmap(self.folder / f"{self.split}.offsets.npy", mode="w+", dtype=np.int64,
                                            shape=(self.documents + 1,))
        offsets[0], position, running = 0, 1, 0
        for part, keep in self.kept:
            lengths = np.load(f"{part}.lengths.npy")[:keep]
            offsets[position:position + keep] = running + np.cumsum(lengths)
            position += keep
            running += int(lengths.sum())
            os.unlink(f"{part}.lengths.npy")
        offsets.flush()
        del offsets
        if any(os.path.exists(f"{part}.prompts.npy") for part, _ in self.kept):
            # How many leading tokens of each document are its prompt (no target there): sampling.py masks them.
            prompts = [np.load(f"{part}.prompts.npy")[:keep] for part, keep in self.kept]
            np.save(self.folder / f"{self.split}.prompt_lengths.npy",
                    np.concatenate(prompts) if prompts else np.zeros(0, np.int64))
        for part, _ in self.kept:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{part}.prompts.npy")
        return {"documents": self.documents, "tokens": self.tokens, "max_token_id": self.max_token_id,
                "shards": self.shards, "cpu_seconds": self.cpu_seconds, "examples": self.examples}


def _copy_bytes(source, target, count: int) -> None:
    while count > 0:
        chunk = source.read(min(count, 1 << 24))
        if not chunk:
            raise OSError(f"part file {source.name!r} ended {count} bytes early")
        target.write(chunk)
        count -= len(chunk)


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
