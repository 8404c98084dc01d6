"""Document streams: C4 and other Hugging Face datasets, the embedded Wikipedia sample, and local text / jsonl files.

Every source is a list of shards read through `datasets` streaming: the files of a hub dataset's split
(`IterableDataset.shard`), or one local file each. Shards are independent, so prepare.py tokenises them in
parallel and concatenates them in shard order. Sources with a single split hold out `eval_fraction` of each
shard's documents, chosen by a hash of (shard index, index within the shard) that any worker can compute alone.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any, Iterable, Iterator

from megatron_mixln.config import DataConfig
from megatron_mixln.data.errors import DataError, first_line

EMBEDDED_CORPUS = Path(__file__).resolve().parent / "assets" / "enwiki_sample.jsonl.gz"
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz")
SPLITS = ("train", "eval")
# One HEAD request tells whether the hub answers; a refused connection or unknown host fails at once, this bounds a
# network that drops packets.
HUB_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True, eq=False)
class Shard:
    """One independently readable piece of a split, `index` in its reading order: a local file (`path`), or
    shard `index` of `num_shards` of a hub split (`dataset`, a picklable streaming `datasets.IterableDataset`)."""

    index: int
    num_shards: int
    where: str  # names the shard in error messages
    held_out: bool  # the shard feeds both splits: keep a document by its eval hash
    path: Path | None = None
    dataset: Any = None


def iter_documents(data_cfg: DataConfig, split: str) -> Iterator[str]:
    """Yield the non-empty document strings of one split ("train" or "eval") in shard order, serially, bounded by
    a positive max_*_documents."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: expected one of {', '.join(SPLITS)}.")
    limit = data_cfg.max_train_documents if split == "train" else data_cfg.max_eval_documents
    documents = chain.from_iterable(shard_documents(shard, split, data_cfg)
                                    for shard in source_shards(data_cfg)[split])
    return islice(documents, limit) if limit > 0 else documents


def source_shards(data_cfg: DataConfig) -> dict[str, list[Shard]]:
    """The shards of each split ("train", "eval"), in reading order; opens a hub dataset once (no data read)."""
    hub_dataset = hub_dataset_name(data_cfg.source)
    if hub_dataset is not None:
        return _hub_shards(*hub_dataset, data_cfg)
    files = local_source_files(data_cfg.source)  # here, so a missing path fails before iteration starts
    shards = [Shard(index=i, num_shards=len(files), where=repr(str(path)), held_out=True, path=path)
              for i, path in enumerate(files)]
    return {"train": shards, "eval": shards if data_cfg.eval_fraction > 0 else []}


def shard_documents(shard: Shard, split: str, data_cfg: DataConfig) -> Iterator[str]:
    """The non-empty documents of `split` in one shard, in order."""
    if shard.path is not None:
        documents = _file_documents(shard.path, data_cfg.text_field)
    else:
        records = (shard.dataset if shard.num_shards == 1
                   else shard.dataset.shard(num_shards=shard.num_shards, index=shard.index))
        documents = _record_texts(records, data_cfg.text_field, shard.where)
    if shard.held_out:
        documents = held_out_split(documents, split, data_cfg.eval_fraction, shard.index)
    return documents


def shard_records(shard: Shard, split: str, data_cfg: DataConfig) -> Iterator[dict]:
    """The records of `split` in one shard, in order, as read (data.format instruction and chat)."""
    if shard.path is not None:
        if shard.path.name.endswith(TEXT_SUFFIXES):
            raise DataError(f"data file {str(shard.path)!r} is plain text, but data.format={data_cfg.format} reads "
                            "records: expected a .json or .jsonl file (or data.format=text).")
        records = _file_records(shard.path)
    else:
        records = (shard.dataset if shard.num_shards == 1
                   else shard.dataset.shard(num_shards=shard.num_shards, index=shard.index))
    if shard.held_out:
        records = held_out_split(records, split, data_cfg.eval_fraction, shard.index)
    return records


def hub_dataset_name(source: str) -> tuple[str, str | None] | None:
    """("allenai/c4", "en") for "c4", (NAME, CONFIG) for "hf:NAME[:CONFIG]", None for local sources."""
    if source == "c4":
        return "allenai/c4", "en"
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        if not name:
            raise DataError(f"data.source={source!r} is invalid: expected hf:NAME or hf:NAME:CONFIG.")
        return name, config or None
    return None


def hub_unreachable(datasets_too: bool = False) -> str | None:
    """Why the Hugging Face hub cannot be used from this process ("HF_HUB_OFFLINE is set", "... is unreachable:
    ..."), or None when it answers; `datasets_too` also honours HF_DATASETS_OFFLINE.

    Asked before a hub name is loaded. Out of reach, huggingface_hub would retry each file 5 times over 23 s and log
    every try; instead the libraries are switched to offline mode here, so a tokenizer in the local cache still
    loads and anything else fails at once, which the caller turns into one sentence.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if datasets_too and os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_DATASETS_OFFLINE is set"
    reason = _probe_hub(constants.ENDPOINT)
    if reason is not None:
        _go_offline()
    return reason


@functools.lru_cache(maxsize=None)
def _probe_hub(endpoint: str) -> str | None:
    from huggingface_hub.utils import get_session

    try:  # the library's own session: its proxies, certificates and HF_ENDPOINT; no retries
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as err:  # any answer, even an HTTP error status, means the hub is reachable
        return f"{endpoint} is unreachable: {first_line(err)}"
    return None


def _go_offline() -> None:
    """Offline mode for huggingface_hub, transformers (reads huggingface_hub's flag) and datasets in this process,
    and through the environment for the processes it starts (a prepare's tokenising pool)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:  # read at its import from the environment; set here once it is loaded
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True


def local_source_files(source: str) -> list[Path]:
    """The files a local source (a path, or "embedded") reads, in reading order."""
    path = EMBEDDED_CORPUS if source == "embedded" else Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data.source={source!r} does not exist: expected c4, hf:NAME[:CONFIG], embedded, "
                        f"or a path to a .txt/.jsonl/.json(.gz) file or a folder of them.")
    if path.is_file():
        if not path.name.endswith(JSON_SUFFIXES + TEXT_SUFFIXES):
            raise DataError(f"data file {str(path)!r} has an unknown type: expected a name ending in "
                            + ", ".join(JSON_SUFFIXES + TEXT_SUFFIXES) + ".")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(JSON_SUFFIXES + TEXT_SUFFIXES))
    if not files:
        raise DataError(f"data folder {str(path)!r} has no documents: it holds no file ending in "
                        + ", ".join(JSON_SUFFIXES + TEXT_SUFFIXES) + ".")
    return files


def held_out_split(documents: Iterable[str], split: str, eval_fraction: float, shard_index: int = 0
                   ) -> Iterator[str]:
    """Keep the documents of `split`: document i of the shard is held out for eval when a hash of
    (shard_index, i) falls below eval_fraction."""
    want_eval = split == "eval"
    for index, document in enumerate(documents):
        if is_held_out(shard_index, index, eval_fraction) == want_eval:
            yield document


def is_held_out(shard_index: int, index: int, eval_fraction: float) -> bool:
    # A hash rather than `index % k`: any fraction works, and periodic structure in a file cannot bias the eval set.
    digest = hashlib.blake2b(shard_index.to_bytes(8, "little") + index.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < eval_fraction * 2**64


def _hub_shards(name: str, config: str | None, data_cfg: DataConfig) -> dict[str, list[Shard]]:
    """C4 and other hub datasets (or a local folder laid out like one): their validation split for eval, else a
    held-out fraction of train. One shard per data file of the split."""
    import datasets

    offline = None if Path(name).expanduser().exists() else hub_unreachable(datasets_too=True)
    try:
        splits = datasets.load_dataset(name, config, streaming=True)
    except Exception as err:  # offline, unknown name, missing config: all end the same way for the user
        if offline is not None:
            raise DataError(f"data.source={data_cfg.source!r} streams {name} from the Hugging Face hub, which is out "
                            f"of reach ({offline}): point data.source at a local copy (hf:PATH[:CONFIG], e.g. "
                            f"hf:/data/c4:en, or a .jsonl/.txt file or folder) or use embedded.") from err
        raise DataError(f"data.source={data_cfg.source!r} could not be opened with datasets.load_dataset({name!r}, "
                        f"{config!r}): {first_line(err)}") from err
    if "train" not in splits:
        raise DataError(f"data.source={data_cfg.source!r} has no train split: its splits are {', '.join(splits)}.")
    held_out = "validation" not in splits

    def shards(hub_split: str) -> list[Shard]:
        dataset = splits[hub_split]
        count = dataset.num_shards
        return [Shard(index=i, num_shards=count, where=f"{name} ({hub_split}, shard {i + 1} of {count})",
                      held_out=held_out, dataset=dataset) for i in range(count)]

    train = shards("train")
    if not held_out:
        return {"train": train, "eval": shards("validation")}
    return {"train": train, "eval": train if data_cfg.eval_fraction > 0 else []}


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    """Stream one local file through `datasets`; on failure, find the offending line and say which it is."""
    yield from _file_items(path, lambda records: _record_texts(records, text_field, repr(str(path))))


def _file_records(path: Path) -> Iterator[dict]:
    """The records of one local .json / .jsonl file, as `datasets` reads them."""
    yield from _file_items(path, lambda records: records)


def _file_items(path: Path, from_records) -> Iterator:
    import logging

    import datasets

    # The json builder logs its own "Failed to load JSON ..." line; we report the failing line ourselves.
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    if path.stat().st_size == 0:
        raise DataError(f"data file {str(path)!r} is empty: expected at least one document.")
    is_text = path.name.endswith(TEXT_SUFFIXES)
    count = 0
    try:
        if is_text:
            lines = datasets.load_dataset("text", data_files=str(path), split="train", streaming=True)
            documents = _paragraphs(row["text"] for row in lines)
        else:
            records = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
            documents = from_records(records)
        for document in documents:
            count += 1
            yield document
    except DataError:
        raise
    except Exception as err:  # pyarrow, UnicodeDecodeError, StopIteration on an empty gzip, ...
        raise _diagnose(path, is_text, err) from err
    if count == 0:
        raise DataError(f"data file {str(path)!r} contains no documents: expected non-empty text.")


def _record_texts(records: Iterable[dict], text_field: str, where: str) -> Iterator[str]:
    """The `text_field` of each record, skipping empty texts (C4 schema: text, timestamp, url)."""
    for number, record in enumerate(records, start=1):
        if text_field not in record:
            raise DataError(f"record {number} of {where} has no field {text_field!r}: its fields are "
                            f"{', '.join(map(repr, record))}; set data.text_field to one of them.")
        text = record[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"record {number} of {where} holds a value of type {type(text).__name__} in field "
                            f"{text_field!r}: expected a string.")
        if text.strip():
            yield text


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Group text lines into documents separated by blank (empty or whitespace-only) lines."""
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            yield "\n".join(current)
            current = []
    if current:
        yield "\n".join(current)


def _diagnose(path: Path, is_text: bool, err: Exception) -> DataError:
    """Re-read a file that `datasets` failed on, line by line, to name the first bad line."""
    opener = gzip.open if path.name.endswith(".gz") else open
    has_content = False
    try:
        with opener(path, "rb") as stream:
            for number, raw in enumerate(stream, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as decode_err:
                    return DataError(f"data file {str(path)!r} is not UTF-8 text: line {number} has an undecodable "
                                     f"byte at column {decode_err.start + 1}.")
                has_content = has_content or bool(line.strip())
                if is_text or not line.strip():
                    continue
                try:
                    json.loads(line)
                except json.JSONDecodeError as json_err:
                    if path.name.endswith((".json", ".json.gz")) and _is_json_document(path, opener):
                        break  # one JSON document rather than JSON lines: this line is fine, the problem is elsewhere
                    return DataError(f"data file {str(path)!r} is not JSON lines: line {number} is not valid JSON "
                                     f"({json_err.msg} at column {json_err.colno}).")
    except (OSError, EOFError) as read_err:  # unreadable, or a corrupt or truncated gzip
        return DataError(f"data file {str(path)!r} could not be read: {first_line(read_err)}.")
    if not has_content:
        return DataError(f"data file {str(path)!r} contains no documents: expected non-empty text.")
    return DataError(f"data file {str(path)!r} could not be read by datasets: {type(err).__name__}: {first_line(err)}.")


def _is_json_document(path: Path, opener) -> bool:
    with opener(path, "rb") as stream:
        try:
            json.load(stream)
            return True
        except ValueError:
            return False
