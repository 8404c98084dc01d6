"""Benchmark: tokenisation throughput of `mixln-prepare`'s sharded path, per process count and tokenizer.

Builds a local folder laid out like allenai/c4 (`en/c4-train.NNNNN-of-NNNNN.json.gz` shards and a README whose
YAML front matter declares the `en` config) from the embedded Wikipedia sample, or takes `--source`, and
tokenises its train split through the same code as `data.source=c4`: `datasets` streaming, one shard per file,
a spawn process pool, parts joined in shard order. Each row times one whole split (the best of --rounds), pool
start-up included, and checks that the token file is byte-identical to the one-process run. Documents/s per
process divides by the tokenising processes' own CPU time, so other load on the machine does not skew it.
Run: `mixln-bench tokenize [--num-proc 1 2 4] [--tokenizer bpe PATH/tokenizer.model] [--repeat 16] [--shards 8]`.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

BPE_TRAINING_DOCUMENTS = 2000  # the trained BPE learns from the first documents only, as a real one would
C4_README = """---
configs:
- config_name: en
  data_files:
  - split: train
    path: "en/c4-train.*-of-*.json.gz"
  - split: validation
    path: "en/c4-validation.*-of-*.json.gz"
---
A local folder laid out like allenai/c4 (`en` config only), readable with datasets.load_dataset(folder, "en").
"""


def embedded_records() -> list[dict]:
    """The embedded corpus's records, already in the C4 schema (text, timestamp, url)."""
    from megatron_mixln.data import EMBEDDED_CORPUS

    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as stream:
        return [json.loads(line) for line in stream]


def write_c4_mirror(folder: str | Path, train_shards: list[list[dict]], validation_shards: list[list[dict]]) -> Path:
    """Write C4-schema records as `en/c4-{split}.{i:05d}-of-{n:05d}.json.gz` shards plus the README that makes
    `datasets.load_dataset(folder, "en", streaming=True)` see a train and a validation split, as for allenai/c4."""
    folder = Path(folder)
    (folder / "en").mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(C4_README)
    for split, shards in (("train", train_shards), ("validation", validation_shards)):
        for index, records in enumerate(shards):
            path = folder / "en" / f"c4-{split}.{index:05d}-of-{len(shards):05d}.json.gz"
            with gzip.open(path, "wt", encoding="utf-8") as out:
                out.writelines(json.dumps(record) + "\n" for record in records)
    return folder


def llama_sentencepiece_model() -> str | None:
    """The 32k LLaMA SentencePiece model that the mistral-common package ships, when it is installed."""
    spec = importlib.util.find_spec("mistral_common")  # finds the file without importing the package
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / "tokenizer.model.v1"
    return str(path) if path.is_file() else None


def run(source: str, tokenizer: str, num_proc: int, work: Path) -> dict:
    """Tokenise the train split of `source` with `num_proc` processes; timing covers pool start and shutdown."""
    import numpy as np

    from megatron_mixln.config import DataConfig
    from megatron_mixln.data.prepare import ShardPool, TrainLimits, tokenize_split
    from megatron_mixln.data.sources import source_shards
    from megatron_mixln.data.tokenizers import load_tokenizer

    folder = work / f"run-{num_proc}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    data_cfg = DataConfig(source=source, tokenizer=tokenizer)
    shards = source_shards(data_cfg)["train"]
    dtype = np.uint16 if load_tokenizer(tokenizer).vocab_size < 2**16 else np.uint32
    start = time.perf_counter()
    with ShardPool(num_proc) as pool:
        counts = tokenize_split(pool, data_cfg, "train", shards, tokenizer, dtype, folder, TrainLimits(),
                                progress=False)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256((folder / "train.tokens").read_bytes()).hexdigest()
    return {"processes": min(num_proc, len(shards)), "documents": counts["documents"], "tokens": counts["tokens"],
            "seconds": seconds, "cpu_seconds": counts["cpu_seconds"], "sha256": digest}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mixln-bench tokenize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")
    parser.add_argument("--tokenizer", nargs="+", default=None,
                        help="tokenizer specs (default: the LLaMA SentencePiece model of mistral-common when "
                             "installed, and bpe: a byte-level BPE of --bpe-vocab-size trained on the corpus)")
    parser.add_argument("--bpe-vocab-size", type=int, default=8192)
    parser.add_argument("--source", default=None,
                        help="data.source to read instead of the generated C4-layout folder, e.g. hf:/data/c4:en")
    parser.add_argument("--shards", type=int, default=8, help="train shards of the generated folder (default 8)")
    parser.add_argument("--repeat", type=int, default=16,
                        help="copies of the embedded corpus (1,966 documents each) in the generated folder")
    parser.add_argument("--rounds", type=int, default=1, help="runs per row; the fastest is shown")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per process, as in a prepare's pool

    work = Path(tempfile.mkdtemp(prefix="mixln-bench-tokenize-"))
    try:
        if args.source is None:
            records = embedded_records() * args.repeat
            shards = [records[i::args.shards] for i in range(args.shards)]
            source = f"hf:{write_c4_mirror(work / 'c4', shards, [records[:100]])}:en"
        else:
            source = args.source
        tokenizers = args.tokenizer or [spec for spec in (llama_sentencepiece_model(), "bpe") if spec]
        rows = []
        for spec in tokenizers:
            name = spec
            if spec == "bpe":
                spec, name = _train_bpe(source, args.bpe_vocab_size, work), f"bpe{args.bpe_vocab_size} (trained)"
            elif Path(spec).is_file():
                name = Path(spec).name
            reference = None
            for num_proc in args.num_proc:
                result = min((run(source, spec, num_proc, work) for _ in range(args.rounds)),
                             key=lambda r: r["seconds"])
                reference = reference or result["sha256"]
                rows.append({**result, "tokenizer": name, "same": result["sha256"] == reference})
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"source: {source}; machine: {os.cpu_count()} CPU cores, load average {load} at the end")
        print("| tokenizer | processes | documents | seconds | documents/s | documents/s per process (CPU time) "
              "| tokens/s | same bytes as its first row |")
        print("|---|---|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['tokenizer']} | {row['processes']} | {row['documents']:,} | {row['seconds']:.2f} "
                  f"| {row['documents'] / row['seconds']:,.0f} | {row['documents'] / row['cpu_seconds']:,.0f} "
                  f"| {row['tokens'] / row['seconds']:,.0f} | {'yes' if row['same'] else 'NO'} |")
        return 0 if all(row["same"] for row in rows) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _train_bpe(source: str, vocab_size: int, work: Path) -> str:
    from itertools import islice

    from megatron_mixln.config import DataConfig
    from megatron_mixln.data.sources import iter_documents
    from megatron_mixln.data.tokenizers import train_bpe

    texts = islice(iter_documents(DataConfig(source=source), "train"), BPE_TRAINING_DOCUMENTS)
    train_bpe(texts, vocab_size, save_dir=work / "bpe")
    return str(work / "bpe" / "tokenizer.json")
