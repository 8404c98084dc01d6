"""End to end on a local folder laid out like allenai/c4: the same `datasets` hub path as `data.source=c4`, the
bounded sharded prepare (two processes over three shards), training, and exact resume from a stopped run."""
import gzip
import json

import pytest

from megatron_mixln.benchmarks.tokenize import write_c4_mirror
from megatron_mixln.config import load_config
from megatron_mixln.data import EMBEDDED_CORPUS, read_meta
from megatron_mixln.train.loop import train


@pytest.fixture(scope="module")
def c4_folder(tmp_path_factory):
    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as stream:
        records = [json.loads(line) for _, line in zip(range(260), stream)]
    return write_c4_mirror(tmp_path_factory.mktemp("c4") / "c4", [records[0:10], records[10:30], records[30:200]],
                           [records[200:260]])


def c4_config(folder, cache, out, *overrides):
    return load_config(None, [
        "model.vocab_size=320", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=4",
        "model.num_heads=2", "model.max_seq_len=32", "model.norm_placement=mix", "model.mix_alpha=0.5",
        f"data.source=hf:{folder}:en", "data.tokenizer=bpe", "data.bpe_vocab_size=300", "data.seq_len=32",
        "data.mode=document", "data.num_proc=2", f"data.cache_dir={cache}",
        "train.steps=6", "train.global_batch_size=4", "train.micro_batch_size=2", "train.lr=3e-3",
        "train.eval_sequences=8", "train.progress_bar=false", "train.tensorboard=false", f"train.out_dir={out}",
        *overrides])


def test_c4_layout_trains_on_what_it_reads_and_resumes_exactly(c4_folder, tmp_path):
    cache = tmp_path / "cache"
    straight = train(c4_config(c4_folder, cache, tmp_path / "straight"))
    assert sorted(straight.losses) == list(range(1, 7)) and not straight.stopped_early

    # The bound is 6 steps x 4 documents = 24: all of the first two shards (10 + 20 documents) and no more.
    (folder,) = [p for p in cache.iterdir() if (p / "meta.json").is_file()]
    meta = read_meta(folder)
    assert meta["splits"]["train"]["documents"] == 24 and meta["splits"]["train"]["shards"] == 2
    assert meta["splits"]["eval"]["documents"] == 60 and meta["processes"] == 2

    stopped = train(c4_config(c4_folder, cache, tmp_path / "resumed", "train.stop_after_step=3"))
    assert stopped.stopped_early and sorted(stopped.losses) == [1, 2, 3]
    resumed = train(c4_config(c4_folder, cache, tmp_path / "resumed", "train.resume=auto"))
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in range(1, 4):
        assert stopped.losses[step] == straight.losses[step]
    for step in range(4, 7):
        assert resumed.losses[step] == straight.losses[step]
    assert [p for p in cache.iterdir() if (p / "meta.json").is_file()] == [folder]  # one folder for all three runs
