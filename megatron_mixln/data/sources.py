"""Document streams: C4 and other Hugging Face datasets, the embedded Wikipedia sample, and local text / jsonl files.

Every source goes through the same `datasets` streaming iteration; local sources hold out `eval_fraction` of
their documents (chosen by a hash of the document index) because they have a single split.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

from megatron_mixln.config import DataConfig
from megatron_mixln.data.errors import DataError, first_line

EMBEDDED_CORPUS = Path(__file__).resolve().parent / "assets" / "enwiki_sample.jsonl.gz"
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz")
SPLITS = ("train", "eval")


def iter_documents(data_cfg: DataConfig, split: str) -> Iterator[str]:
    """Yield the non-empty document strings of one split ("train" or "eval"), bounded by max_*_documents."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: expected one of {', '.join(SPLITS)}.")
    limit = data_cfg.max_train_documents if split == "train" else data_cfg.max_eval_documents
    hub_dataset = hub_dataset_name(data_cfg.source)
    if hub_dataset is not None:
        documents = _hub_documents(*hub_dataset, data_cfg, split)
    else:
        files = local_source_files(data_cfg.source)  # here, so a missing path fails before iteration starts
        documents = held_out_split(_local_documents(files, data_cfg.text_field), split, data_cfg.eval_fraction)
    return islice(documents, limit) if limit > 0 else documents


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


def held_out_split(documents: Iterable[str], split: str, eval_fraction: float) -> Iterator[str]:
    """Keep the documents of `split`: document i is held out for eval when a hash of i falls below eval_fraction."""
    want_eval = split == "eval"
    for index, document in enumerate(documents):
        if is_held_out(index, eval_fraction) == want_eval:
            yield document


def is_held_out(index: int, eval_fraction: float) -> bool:
    # A hash rather than `index % k`: any fraction works, and periodic structure in a file cannot bias the eval set.
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < eval_fraction * 2**64


def _hub_documents(name: str, config: str | None, data_cfg: DataConfig, split: str) -> Iterator[str]:
    """C4 and other hub datasets: their validation split for eval, else a held-out fraction of train."""
    import datasets

    try:
        splits = datasets.load_dataset(name, config, streaming=True)
    except Exception as err:  # offline, unknown name, missing config: all end the same way for the user
        raise DataError(f"data.source={data_cfg.source!r} could not be opened with datasets.load_dataset({name!r}, "
                        f"{config!r}): {first_line(err)}") from err
    if "train" not in splits:
        raise DataError(f"data.source={data_cfg.source!r} has no train split: its splits are {', '.join(splits)}.")
    if "validation" in splits:
        hub_split = "train" if split == "train" else "validation"
        yield from _record_texts(splits[hub_split], data_cfg.text_field, f"{name} ({hub_split})")
    else:
        yield from held_out_split(_record_texts(splits["train"], data_cfg.text_field, f"{name} (train)"),
                                  split, data_cfg.eval_fraction)


def _local_documents(files: list[Path], text_field: str) -> Iterator[str]:
    for path in files:
        yield from _file_documents(path, text_field)


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    """Stream one local file through `datasets`; on failure, find the offending line and say which it is."""
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
            documents = _record_texts(records, text_field, repr(str(path)))
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
