"""Data package: sources and their errors, tokenizers, prepared token files, sequences and the global batch order."""
from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_mixln.benchmarks.tokenize import write_c4_mirror
from megatron_mixln.config import Config, ConfigError, DataConfig, load_config
from megatron_mixln.data import (EMBEDDED_CORPUS, IGNORE_INDEX, DataError, GlobalBatchSampler, SequenceDataset,
                                 TokenFile, TrainLimits, collate, dataset_folder, eval_batches, is_preparer,
                                 iter_documents, load_tokenizer, open_datasets, prepare_dataset, prepared_tokenizer,
                                 read_meta, train_limits, wait_for_dataset)
from megatron_mixln.data import prepare as prepare_module
from megatron_mixln.data.sources import source_shards
from megatron_mixln.data.tokenizers import train_bpe


def embedded_texts(count: int) -> list[str]:
    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as stream:
        return [json.loads(line)["text"] for _, line in zip(range(count), stream)]


def write_c4_jsonl(path: Path, texts: list[str]) -> Path:
    """A file in the C4 schema: text, timestamp, url."""
    with open(path, "w", encoding="utf-8") as out:
        for i, text in enumerate(texts):
            out.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z",
                                  "url": f"https://example.com/{i}"}) + "\n")
    return path


def write_token_folder(folder: Path, documents: list[list[int]], pad_id: int = 0) -> Path:
    """A prepared folder holding known tokens, in the layout prepare_dataset writes."""
    folder.mkdir(parents=True)
    for split in ("train", "eval"):
        np.asarray([t for doc in documents for t in doc], dtype=np.uint16).tofile(folder / f"{split}.tokens")
        np.save(folder / f"{split}.offsets.npy", np.concatenate([[0], np.cumsum([len(d) for d in documents])]))
    (folder / "meta.json").write_text(json.dumps({"dtype": "uint16", "pad_id": pad_id, "eos_id": 1}))
    return folder


@pytest.fixture(scope="module")
def embedded_bpe(tmp_path_factory) -> tuple[DataConfig, Path]:
    """The embedded corpus prepared once with a small BPE."""
    cfg = DataConfig(source="embedded", tokenizer="bpe", bpe_vocab_size=512, eval_fraction=0.05, seq_len=64,
                     cache_dir=str(tmp_path_factory.mktemp("cache")))
    return cfg, prepare_dataset(cfg, progress=False)


# ---------------------------------------------------------------- sequences


def test_document_mode_pads_truncates_and_masks_exactly_pad_and_last_real_positions(tmp_path):
    seq_len, pad = 6, 0
    documents = [[9], [5, 6, 7], list(range(10, 16)), list(range(20, 31)), [40, 41]]
    dataset = SequenceDataset(TokenFile(write_token_folder(tmp_path / "p", documents, pad), "train"), seq_len,
                              "document", pad)
    kept = [doc for doc in documents if len(doc) >= 2]  # a one-token document has no target and is skipped
    assert len(dataset) == len(kept)
    for (input_ids, labels), doc in zip((dataset[i] for i in range(len(dataset))), kept):
        assert input_ids.dtype == labels.dtype == np.int64 and input_ids.shape == labels.shape == (seq_len,)
        n = min(len(doc), seq_len)
        np.testing.assert_array_equal(input_ids[:n], doc[:n])
        np.testing.assert_array_equal(input_ids[n:], pad)
        np.testing.assert_array_equal(labels[:n - 1], doc[1:n])
        np.testing.assert_array_equal(labels[n - 1:], IGNORE_INDEX)
    input_ids, labels = dataset[0]
    assert input_ids.tolist() == [5, 6, 7, 0, 0, 0] and labels.tolist() == [6, 7, -100, -100, -100, -100]


@pytest.mark.parametrize("stream_length", [13, 16, 17])  # 17 = 2*8 + 1: the last window ends exactly at the end
def test_packed_mode_covers_the_stream_contiguously_without_padding(tmp_path, stream_length):
    seq_len = 8
    stream = list(range(100, 100 + stream_length))
    documents = [stream[:3], stream[3:10], stream[10:]]
    dataset = SequenceDataset(TokenFile(write_token_folder(tmp_path / "p", documents), "train"), seq_len, "packed", 0)
    assert len(dataset) == (stream_length - 1) // seq_len
    inputs = np.concatenate([dataset[i][0] for i in range(len(dataset))])
    labels = np.concatenate([dataset[i][1] for i in range(len(dataset))])
    np.testing.assert_array_equal(inputs, stream[:len(dataset) * seq_len])
    np.testing.assert_array_equal(labels, stream[1:len(dataset) * seq_len + 1])
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_collate_and_eval_batches_give_the_first_sequences_in_order(tmp_path):
    documents = [[i, i + 1, i + 2] for i in range(2, 40, 3)]  # 13 documents
    dataset = SequenceDataset(TokenFile(write_token_folder(tmp_path / "p", documents), "train"), 4, "document", 0)
    input_ids, labels = collate(dataset, [3, 0])
    assert input_ids.dtype == labels.dtype == torch.long and input_ids.shape == (2, 4)
    assert input_ids[0].tolist() == [11, 12, 13, 0] and labels[1].tolist() == [3, 4, -100, -100]
    batches = list(eval_batches(dataset, num_sequences=10, batch_size=4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    spread = [0, 1, 2, 3, 5, 6, 7, 9, 10, 11]  # 10 of 13 sequences, evenly over the whole split: floor(i * 13 / 10)
    assert torch.cat([b[0][:, 0] for b in batches]).tolist() == [documents[i][0] for i in spread]
    assert sum(b[0].shape[0] for b in eval_batches(dataset, num_sequences=100, batch_size=4)) == len(dataset)


# ---------------------------------------------------------------- global batch order


def test_sampler_indices_depend_only_on_seed_and_step():
    first = [GlobalBatchSampler(1000, 32, seed=7).global_indices(step) for step in (0, 5, 40)]
    again = GlobalBatchSampler(1000, 32, seed=7)
    for step, expected in zip((40, 0, 5), (first[2], first[0], first[1])):  # a fresh object, any call order
        np.testing.assert_array_equal(again.global_indices(step), expected)
    assert not np.array_equal(GlobalBatchSampler(1000, 32, seed=8).global_indices(0), first[0])


@pytest.mark.parametrize("num_samples,global_batch", [(10, 4), (37, 8), (10, 25)])
def test_sampler_visits_each_sequence_exactly_once_per_epoch(num_samples, global_batch):
    sampler = GlobalBatchSampler(num_samples, global_batch, seed=3)
    steps = num_samples * 6 // global_batch + 1
    visits = np.concatenate([sampler.global_indices(step) for step in range(steps)])
    epochs = visits[:len(visits) // num_samples * num_samples].reshape(-1, num_samples)
    assert len(epochs) >= 5
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(num_samples))
    assert not all(np.array_equal(epochs[0], epoch) for epoch in epochs[1:])  # each epoch is reshuffled


@pytest.mark.parametrize("num_samples,global_batch,steps", [(5000, 16, 400), (37, 8, 10), (40, 8, 9)])
def test_the_repeated_data_note_names_the_first_step_that_reads_a_sequence_again(num_samples, global_batch, steps):
    from megatron_mixln.train.loop import repeated_data_note
    sampler, seen, first_repeat = GlobalBatchSampler(num_samples, global_batch, seed=1), set(), None
    for step in range(1, steps + 1):  # training step s reads the sampler's batch s - 1 (data/prefetch.py)
        batch = set(sampler.global_indices(step - 1).tolist())
        if first_repeat is None and batch & seen:
            first_repeat = step
        seen |= batch
    note = repeated_data_note(steps, global_batch, num_samples)
    if first_repeat is None:
        assert note is None
    else:
        assert f"second pass starts (step {first_repeat})" in note
        assert f"{steps * global_batch / num_samples:.2f} passes over the {num_samples:,} training sequences" in note


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_rank_slices_put_together_are_the_global_batch_at_any_dp_degree(dp_size):
    sampler = GlobalBatchSampler(50, 16, seed=1)
    for step in (0, 3, 11):
        slices = [sampler.rank_indices(step, rank, dp_size) for rank in range(dp_size)]
        assert all(len(s) == 16 // dp_size for s in slices)
        np.testing.assert_array_equal(np.concatenate(slices), GlobalBatchSampler(50, 16, seed=1).global_indices(step))


def test_rank_indices_reject_a_global_batch_not_divisible_by_dp():
    with pytest.raises(ConfigError, match="global_batch_size=10 .*multiple of the data-parallel size 4"):
        GlobalBatchSampler(50, 10, seed=1).rank_indices(0, 0, 4)


# ---------------------------------------------------------------- sources


def test_local_train_and_eval_splits_are_disjoint_deterministic_and_complete(tmp_path):
    texts = [f"document number {i}." for i in range(400)]
    cfg = DataConfig(source=str(write_c4_jsonl(tmp_path / "docs.jsonl", texts)), eval_fraction=0.1)
    train, eval_ = list(iter_documents(cfg, "train")), list(iter_documents(cfg, "eval"))
    assert set(train).isdisjoint(eval_) and sorted(train + eval_) == sorted(texts)
    assert 20 <= len(eval_) <= 60  # about 10% of 400
    assert list(iter_documents(cfg, "eval")) == eval_
    cfg.max_train_documents, cfg.max_eval_documents = 7, 3
    assert list(iter_documents(cfg, "train")) == train[:7] and list(iter_documents(cfg, "eval")) == eval_[:3]


def test_c4_source_streams_train_and_its_validation_split(tmp_path, monkeypatch):
    """The c4 code path, with `datasets.load_dataset` pointed at local files in the C4 schema."""
    import datasets

    train_file = write_c4_jsonl(tmp_path / "c4-train.json", [f"train text {i}" for i in range(30)])
    validation_file = write_c4_jsonl(tmp_path / "c4-validation.json", [f"validation text {i}" for i in range(5)])
    real_load_dataset = datasets.load_dataset
    calls = []

    def local_c4(name, config=None, **kwargs):
        calls.append((name, config, kwargs.get("streaming")))
        return real_load_dataset("json", data_files={"train": str(train_file), "validation": str(validation_file)},
                                 **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", local_c4)
    cfg = DataConfig(source="c4", max_train_documents=12)
    assert list(iter_documents(cfg, "train")) == [f"train text {i}" for i in range(12)]
    assert list(iter_documents(cfg, "eval")) == [f"validation text {i}" for i in range(5)]
    assert calls[0] == ("allenai/c4", "en", True)

    # A hub dataset without a validation split holds out eval_fraction of train, like a local file.
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, **kwargs: real_load_dataset(
        "json", data_files={"train": str(train_file)}, **kwargs))
    cfg = DataConfig(source="hf:someone/corpus:en", eval_fraction=0.3)
    train, eval_ = list(iter_documents(cfg, "train")), list(iter_documents(cfg, "eval"))
    assert eval_ and set(train).isdisjoint(eval_) and len(train) + len(eval_) == 30


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    text = "First document,\nits second line.\n\n\n   \nSecond document.\n \t\nThird\n  indented line.\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as out:
        out.write("Gzipped document.\n\nAnother one.")
    expected = ["First document,\nits second line.", "Second document.", "Third\n  indented line."]
    cfg = DataConfig(source=str(tmp_path / "a.txt"), eval_fraction=0.0)
    assert list(iter_documents(cfg, "train")) == expected and list(iter_documents(cfg, "eval")) == []
    write_c4_jsonl(tmp_path / "c.jsonl", ["From jsonl."])
    cfg.source = str(tmp_path)  # a folder: its files in name order
    assert list(iter_documents(cfg, "train")) == expected + ["Gzipped document.", "Another one.", "From jsonl."]


def bad_input_cases(tmp_path: Path) -> list[tuple[str, str]]:
    """(source path, regex the error must match) for each input a user can get wrong."""
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "latin1.txt").write_bytes(b"fine\n\ncaf\xe9\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "broken"\n{"text": "fine"}\n')
    (tmp_path / "fields.jsonl").write_text('{"body": "x", "url": "u"}\n')
    (tmp_path / "empty_folder").mkdir()
    return [
        (str(tmp_path / "missing.jsonl"), r"'.*missing\.jsonl' does not exist"),
        (str(tmp_path / "empty.jsonl"), r"'.*empty\.jsonl' is empty"),
        (str(tmp_path / "latin1.jsonl"), r"'.*latin1\.jsonl' is not UTF-8 text: line 2"),
        (str(tmp_path / "latin1.txt"), r"'.*latin1\.txt' is not UTF-8 text: line 3"),
        (str(tmp_path / "bad.jsonl"), r"'.*bad\.jsonl' is not JSON lines: line 2"),
        (str(tmp_path / "fields.jsonl"), r"fields\.jsonl' has no field 'text': its fields are 'body', 'url'"),
        (str(tmp_path / "empty_folder"), r"'.*empty_folder' has no documents"),
    ]


def test_each_bad_input_gives_one_clear_error_naming_the_file(tmp_path):
    for source, message in bad_input_cases(tmp_path):
        with pytest.raises(DataError, match=message) as caught:
            list(iter_documents(DataConfig(source=source, eval_fraction=0.0), "train"))
        text = str(caught.value)
        assert "\n" not in text.strip() and text.endswith("."), text


# ---------------------------------------------------------------- tokenizers


def test_bpe_round_trips_text_exactly_and_adds_no_special_tokens(tmp_path):
    tokenizer = train_bpe(embedded_texts(300), vocab_size=512, save_dir=tmp_path)
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.vocab_size) == (0, 1, 512)
    samples = embedded_texts(5) + ["  two  spaces,\ttabs\nand new\n\nlines ", "Ünïcödé — “quotes” 日本語 🙂"]
    for text in samples:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.eos_id not in ids and tokenizer.pad_id not in ids
    from_file = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert from_file.encode(samples[0]) == tokenizer.encode(samples[0]) and from_file.eos_id == 1

    # The transformers path (the paper's "t5-base"), through a local folder since the hub is out of reach.
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="<eos>",
                            pad_token="<pad>").save_pretrained(tmp_path / "hf")
    from_folder = load_tokenizer(str(tmp_path / "hf"))
    assert (from_folder.eos_id, from_folder.pad_id, from_folder.vocab_size) == (1, 0, 512)
    assert from_folder.encode(samples[0]) == tokenizer.encode(samples[0])  # long text: no truncation, no specials


def test_sentencepiece_model_loads_with_pad_falling_back_to_eos(tmp_path):
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(embedded_texts(200)),
                                             model_prefix=str(tmp_path / "sp"), vocab_size=400, pad_id=-1,
                                             minloglevel=2)
    tokenizer = load_tokenizer(str(tmp_path / "sp.model"))
    assert tokenizer.vocab_size == 400 and tokenizer.eos_id == 2 and tokenizer.pad_id == tokenizer.eos_id
    ids = tokenizer.encode("The history of anarchism.")
    assert ids and all(0 <= i < 400 for i in ids) and tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == "The history of anarchism."


def test_unusable_tokenizer_specs_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"data.tokenizer='.*nope\.model' does not exist"):
        load_tokenizer(str(tmp_path / "nope.model"))
    with pytest.raises(DataError, match="needs training text"):
        load_tokenizer("bpe")
    with pytest.raises(DataError, match=r"data.tokenizer='t5-base' could not be loaded"):  # offline here
        load_tokenizer("t5-base")


# ---------------------------------------------------------------- prepare


def test_embedded_corpus_prepares_into_consistent_token_files(embedded_bpe):
    cfg, folder = embedded_bpe
    meta = read_meta(folder)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 512 and meta["max_token_id"] < 512
    assert (folder / "tokenizer.json").is_file()
    total_documents = sum(1 for _ in gzip.open(EMBEDDED_CORPUS, "rt"))
    assert meta["splits"]["train"]["documents"] + meta["splits"]["eval"]["documents"] == total_documents
    for split in ("train", "eval"):
        tokens = TokenFile(folder, split)
        assert tokens.num_documents == meta["splits"][split]["documents"] and tokens.num_tokens == len(tokens.tokens)
        ends = np.asarray(tokens.tokens)[np.asarray(tokens.offsets[1:]) - 1]
        np.testing.assert_array_equal(ends, meta["eos_id"])  # every document ends with eos
    assert 0.02 < meta["splits"]["eval"]["documents"] / total_documents < 0.08  # eval_fraction 0.05


def test_open_datasets_serves_both_modes_from_one_prepared_folder(embedded_bpe):
    cfg, folder = embedded_bpe
    for mode in ("document", "packed"):
        # An explicit bound (-1: everything) leaves seq_len and mode read-time choices: no new folder.
        config = Config(data=DataConfig(**{**vars(cfg), "mode": mode, "max_train_documents": -1})).validate()
        meta, train, eval_ = open_datasets(config, progress=False)
        assert meta["folder"] == str(folder)
        input_ids, labels = collate(train, [0, len(train) - 1])
        assert input_ids.shape == (2, cfg.seq_len) and len(eval_) > 0
        assert int(input_ids.max()) < meta["vocab_size"]
    assert len(list(Path(cfg.cache_dir).iterdir())) == 2  # the folder and its lock file


def test_prepare_is_idempotent_and_keyed_by_what_changes_tokens(tmp_path, monkeypatch):
    source = write_c4_jsonl(tmp_path / "docs.jsonl", embedded_texts(40))
    cfg = DataConfig(source=str(source), tokenizer="bpe", bpe_vocab_size=300, cache_dir=str(tmp_path / "cache"))
    folder = prepare_dataset(cfg, progress=False)
    stamp = (folder / "train.tokens").stat().st_mtime_ns

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("prepare rebuilt a folder that already exists")

    monkeypatch.setattr(prepare_module, "_build", must_not_rebuild)
    assert prepare_dataset(DataConfig(**{**vars(cfg), "seq_len": 32, "mode": "packed"}), progress=False) == folder
    assert (folder / "train.tokens").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    assert prepare_dataset(DataConfig(**{**vars(cfg), "bpe_vocab_size": 320}), progress=False) != folder
    os.utime(source, ns=(stamp + 10**9, stamp + 10**9))  # an edited source file is tokenised again
    assert prepare_dataset(cfg, progress=False) != folder


def test_a_crashed_prepare_leaves_nothing_that_is_ever_used(tmp_path, monkeypatch):
    source = write_c4_jsonl(tmp_path / "docs.jsonl", embedded_texts(40))
    cfg = DataConfig(source=str(source), tokenizer="bpe", bpe_vocab_size=300, cache_dir=str(tmp_path / "cache"))
    real_tokenize_split = prepare_module.tokenize_split

    def crash_on_eval(pool, data_cfg, split, *args, **kwargs):
        if split == "eval":
            raise KeyboardInterrupt  # killed half-way: the train split is on disk already
        return real_tokenize_split(pool, data_cfg, split, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "tokenize_split", crash_on_eval)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg, progress=False)
    monkeypatch.undo()
    cache = Path(cfg.cache_dir)
    assert not [p for p in cache.iterdir() if (p / "meta.json").exists()]

    # A process killed outright leaves its temporary folder behind, even one that looks complete.
    reference = prepare_dataset(DataConfig(**{**vars(cfg), "cache_dir": str(tmp_path / "reference")}), progress=False)
    leftover = cache / f"{prepare_module.TEMP_PREFIX}{reference.name}-otherhost-123-abc"
    leftover.mkdir()
    (leftover / "meta.json").write_text("{}")
    (leftover / "train.tokens").write_bytes(b"\x00\x01")
    folder = prepare_dataset(cfg, progress=False)
    assert folder.name == reference.name and not leftover.exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(prepare_module.TEMP_PREFIX)]
    assert read_meta(folder)["splits"] == read_meta(reference)["splits"]
    np.testing.assert_array_equal(TokenFile(folder, "train").tokens, TokenFile(reference, "train").tokens)


# ---------------------------------------------------------------- bounded, sharded, parallel prepare


def embedded_records(start: int, stop: int) -> list[dict]:
    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as stream:
        return [json.loads(line) for line in stream][start:stop]


@pytest.fixture(scope="module")
def c4_mirror(tmp_path_factory) -> tuple[Path, list[list[dict]], list[dict]]:
    """A local folder laid out like allenai/c4 (README front matter declaring config `en`): three train shards of
    unequal size and one validation shard, C4-schema records from the embedded corpus."""
    train = [embedded_records(0, 80), embedded_records(80, 140), embedded_records(140, 210)]
    validation = embedded_records(1900, 1940)
    folder = write_c4_mirror(tmp_path_factory.mktemp("mirror") / "c4", train, [validation])
    return folder, train, validation


def texts_of(records: list[dict]) -> list[str]:
    return [record["text"] for record in records]


def decoded_documents(folder: Path, split: str) -> list[str]:
    """Each prepared document decoded without its eos (the trained BPE is lossless)."""
    tokenizer, tokens = prepared_tokenizer(folder), TokenFile(folder, split)
    assert all(tokens.document(i)[-1] == tokenizer.eos_id for i in range(tokens.num_documents))
    return [tokenizer.decode(tokens.document(i)[:-1].tolist()) for i in range(tokens.num_documents)]


def mirror_config(folder: Path, cache: Path, *overrides: str):
    return load_config(None, [f"data.source=hf:{folder}:en", "data.tokenizer=bpe", "data.bpe_vocab_size=300",
                              f"data.cache_dir={cache}", "data.num_proc=1", "model.vocab_size=320",
                              "model.max_seq_len=64", "data.seq_len=64", *overrides])


def test_a_local_c4_mirror_opens_exactly_as_c4_does(c4_mirror, monkeypatch):
    import datasets

    folder, train, validation = c4_mirror
    real_load_dataset, calls = datasets.load_dataset, []

    def recording(name, config=None, **kwargs):
        calls.append((name, config, kwargs))
        return real_load_dataset(str(folder) if name == "allenai/c4" else name, config, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recording)
    mirror, c4 = source_shards(DataConfig(source=f"hf:{folder}:en")), source_shards(DataConfig(source="c4"))
    assert calls == [(str(folder), "en", {"streaming": True}), ("allenai/c4", "en", {"streaming": True})]
    for shards in (mirror, c4):  # one shard per data file, train and validation
        assert [s.index for s in shards["train"]] == [0, 1, 2] and len(shards["eval"]) == 1
        assert not any(s.held_out for s in shards["train"] + shards["eval"])
    assert "train, shard 2 of 3" in mirror["train"][1].where
    for source in (f"hf:{folder}:en", "c4"):
        cfg = DataConfig(source=source)
        assert list(iter_documents(cfg, "train")) == texts_of(train[0] + train[1] + train[2])
        assert list(iter_documents(cfg, "eval")) == texts_of(validation)


@pytest.mark.parametrize("source_kind,limits", [
    ("mirror", TrainLimits(max_documents=150)),  # ends inside the third shard
    ("folder", TrainLimits(max_tokens=60_000)),  # a local folder of .json.gz files; eval held out of each
])
def test_parallel_sharded_prepare_writes_the_bytes_of_a_serial_one(c4_mirror, tmp_path, source_kind, limits):
    folder, train, validation = c4_mirror
    source = f"hf:{folder}:en" if source_kind == "mirror" else str(folder / "en")
    cfg = DataConfig(source=source, tokenizer="bpe", bpe_vocab_size=300, eval_fraction=0.2)
    serial = prepare_dataset(DataConfig(**{**vars(cfg), "cache_dir": str(tmp_path / "one")}), False, limits, 1)
    parallel = prepare_dataset(DataConfig(**{**vars(cfg), "cache_dir": str(tmp_path / "two")}), False, limits, 2)
    assert read_meta(parallel)["processes"] == 2 and read_meta(serial)["processes"] == 1
    for name in ("tokenizer.json", "train.tokens", "train.offsets.npy", "eval.tokens", "eval.offsets.npy"):
        assert (serial / name).read_bytes() == (parallel / name).read_bytes(), name
    assert sorted(p.name for p in parallel.iterdir()) == sorted(p.name for p in serial.iterdir())  # no part files

    documents = decoded_documents(parallel, "train")
    if source_kind == "mirror":  # the first 150 train documents in shard order; eval is the validation shard
        assert documents == texts_of(train[0] + train[1] + train[2])[:150]
        assert decoded_documents(parallel, "eval") == texts_of(validation)
    else:  # the fewest documents that reach the token bound, from a folder whose files also give the eval split
        offsets = TokenFile(parallel, "train").offsets
        assert offsets[-2] < 60_000 <= offsets[-1]
        every = texts_of(train[0] + train[1] + train[2] + validation)
        held_out = decoded_documents(parallel, "eval")
        assert 0.1 < len(held_out) / len(every) < 0.3 and set(held_out).isdisjoint(documents)
        assert [t for t in every if t not in held_out][:len(documents)] == documents


def test_the_run_reads_bound_is_what_prepare_tokenises(c4_mirror, tmp_path):
    folder, train, validation = c4_mirror
    every_train_text = texts_of(train[0] + train[1] + train[2])

    config = mirror_config(folder, tmp_path, "train.steps=7", "train.global_batch_size=4", "data.mode=document")
    assert train_limits(config) == TrainLimits(max_documents=28)
    meta, train_data, eval_data = open_datasets(config, progress=False)
    assert meta["splits"]["train"]["documents"] == len(train_data) == 28
    assert decoded_documents(Path(meta["folder"]), "train") == every_train_text[:28]
    assert decoded_documents(Path(meta["folder"]), "eval") == texts_of(validation) and len(eval_data) == 40

    config = mirror_config(folder, tmp_path, "train.steps=5", "train.global_batch_size=2", "data.mode=packed")
    assert train_limits(config) == TrainLimits(max_tokens=5 * 2 * 64 + 1)
    meta, train_data, _ = open_datasets(config, progress=False)
    offsets = TokenFile(meta["folder"], "train").offsets
    assert offsets[-2] < 641 <= offsets[-1] and len(train_data) >= 10  # just enough for every step's windows

    # A source smaller than the bound gives all it has (the sampler then runs several epochs).
    config = mirror_config(folder, tmp_path, "train.steps=1000", "train.global_batch_size=4")
    meta, train_data, _ = open_datasets(config, progress=False)
    assert len(train_data) == len(every_train_text) < 4000

    # The bound is part of the cache key: the same run finds its folder again, another run gets its own.
    assert dataset_folder(config.data, train_limits(config)) == Path(meta["folder"])
    longer = mirror_config(folder, tmp_path, "train.steps=1001", "train.global_batch_size=4")
    assert dataset_folder(longer.data, train_limits(longer)) != Path(meta["folder"])
    assert train_limits(mirror_config(folder, tmp_path, "data.max_train_documents=-1")) == TrainLimits()
    assert train_limits(mirror_config(folder, tmp_path, "data.max_train_documents=9")) == TrainLimits(9)
    with pytest.raises(ConfigError, match=r"^data.max_train_documents=-2 is invalid: expected -1 .*, 0 .* or a "):
        mirror_config(folder, tmp_path, "data.max_train_documents=-2")
    with pytest.raises(ConfigError, match=r"^data.num_proc=-1 is invalid"):
        mirror_config(folder, tmp_path, "data.num_proc=-1")


def test_who_prepares_depends_on_whether_the_cache_is_shared():
    shared, local = load_config(None, []), load_config(None, ["data.cache_shared=false"])
    ranks = [(0, 0), (1, 1), (8, 0), (9, 1)]  # (rank, local rank) on two nodes of 8
    assert [is_preparer(shared, r, lr) for r, lr in ranks] == [True, False, False, False]
    assert [is_preparer(local, r, lr) for r, lr in ranks] == [True, False, True, False]


def run_preparer(config, delay: float, outcome: dict) -> "threading.Thread":
    """The preparing rank, as another thread: starts after `delay`, records what open_datasets raised."""
    import threading
    import time

    def prepare():
        time.sleep(delay)
        try:
            open_datasets(config, preparer=True, progress=False)
        except DataError as err:
            outcome["error"] = str(err)

    thread = threading.Thread(target=prepare)
    thread.start()
    return thread


def local_config(tmp_path: Path, texts: list[str] | None = None, raw: str | None = None):
    source = tmp_path / "docs.jsonl"
    if raw is None:
        write_c4_jsonl(source, texts)
    else:
        source.write_text(raw)
    return load_config(None, [f"data.source={source}", "data.tokenizer=bpe", "data.bpe_vocab_size=300",
                              f"data.cache_dir={tmp_path / 'cache'}", "data.eval_fraction=0.1",
                              "model.vocab_size=320", "train.steps=5", "train.global_batch_size=4"])


def test_waiting_ranks_poll_the_file_system_until_the_preparer_finishes(tmp_path, capsys):
    config = local_config(tmp_path, embedded_texts(40))
    folder = dataset_folder(config.data, train_limits(config))
    # An earlier run's failure (an hour old) must not stop this run's waiting ranks.
    folder.parent.mkdir(parents=True)
    stale = prepare_module.failure_marker(folder)
    stale.write_text(json.dumps({"error": "an old failure."}))
    os.utime(stale, (os.path.getmtime(stale) - 3600,) * 2)

    outcome: dict = {}
    thread = run_preparer(config, 0.5, outcome)
    assert wait_for_dataset(folder, rank=3, poll_s=0.05, report_every_s=0.2) == folder
    thread.join()
    assert not outcome and not stale.exists()  # the prepare that started removed the old marker
    assert "rank 3: waiting for rank 0 to prepare " in capsys.readouterr().out
    meta, train_data, _ = open_datasets(config, preparer=False)  # prepared: returns at once
    assert meta["folder"] == str(folder) and meta["splits"]["train"]["documents"] == 20


def test_waiting_ranks_raise_the_preparers_own_error(tmp_path):
    config = local_config(tmp_path, raw='{"text": "fine"}\n{"text": "broken"\n')
    outcome: dict = {}
    thread = run_preparer(config, 0.3, outcome)
    with pytest.raises(DataError) as caught:
        wait_for_dataset(dataset_folder(config.data, train_limits(config)), poll_s=0.05)
    thread.join()
    assert str(caught.value) == outcome["error"]
    assert re.search(r"docs\.jsonl' is not JSON lines: line 2", outcome["error"])


def test_shards_past_the_bound_are_not_needed_even_when_broken(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_c4_jsonl(folder / "a.jsonl", embedded_texts(30))
    (folder / "b.jsonl").write_text('{"text": "fine"}\n{"text": "broken"\n')
    write_c4_jsonl(folder / "c.jsonl", embedded_texts(60)[30:])
    cfg = DataConfig(source=str(folder), tokenizer="bpe", bpe_vocab_size=300, eval_fraction=0.0,
                     cache_dir=str(tmp_path / "cache"))
    # The bound ends in the first shard. A pool of 2 starts the broken second one alongside it (and it fails
    # first), but a serial read never reaches it, so the parallel prepare may not fail on it either.
    prepared = prepare_dataset(cfg, False, TrainLimits(max_documents=20), num_proc=2)
    assert decoded_documents(prepared, "train") == embedded_texts(20)
    assert read_meta(prepared)["splits"]["train"]["shards"] == 1
    with pytest.raises(DataError, match=r"b\.jsonl' is not JSON lines: line 2"):
        prepare_dataset(cfg, False, TrainLimits(max_documents=40), num_proc=2)
