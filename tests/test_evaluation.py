"""Evaluation: token-weighted, the same in every layout, with every DP rank running the same number of forwards
(ZeRO-3 gathers parameters in each forward: ranks with different counts would deadlock)."""
import pytest

from megatron_mixln.config import load_config
from megatron_mixln.train import step as step_module
from megatron_mixln.train.loop import train
from megatron_mixln.train.metrics import read_metrics
from training_runs import tiny, train_one_after_another

# 5 sequences in micro-batches of 2: 3 batches over 2 data-parallel ranks, the last one 1 row short.
EVAL = ["train.steps=1", "train.micro_batch_size=2", "train.eval_sequences=5", "train.optimizer=sgd"]


def eval_record(out):
    return next(r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def single(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    train(load_config(None, tiny(cache, out, *EVAL)))
    return eval_record(out)


def test_padding_batches_carry_no_weight(cache, single, tmp_path, monkeypatch):
    forwards = []
    real_loss_sum = step_module.MicroBatchSteps._loss_sum

    def counting(self, batches):
        forwards.append(len(batches))
        return real_loss_sum(self, batches)

    monkeypatch.setattr(step_module.MicroBatchSteps, "_loss_sum", counting)
    # micro-batch 4: one batch of 4 rows + one of 1 real row and 3 padding rows.
    train(load_config(None, tiny(cache, tmp_path, *EVAL, "train.micro_batch_size=4", "train.global_batch_size=4")))
    record = eval_record(tmp_path)
    assert forwards == [2]
    assert (record["eval_sequences"], record["eval_tokens"]) == (5, 5 * 32)


EVAL_LAYOUTS = {"dp2-zero3": ["parallel.zero_stage=3"], "pp2": ["parallel.pp=2"], "tp2": ["parallel.tp=2"]}


@pytest.fixture(scope="module")
def two_process_runs(cache, tmp_path_factory):
    """Per layout of EVAL_LAYOUTS: (its ranks' summaries, its out_dir), all trained in one launch of two processes
    (a launch costs more than these one-step runs)."""
    folder = tmp_path_factory.mktemp("two-process")
    results = train_one_after_another(2, [tiny(cache, folder / name, *EVAL, *layout)
                                          for name, layout in EVAL_LAYOUTS.items()], folder)
    return {name: (ranks, folder / name) for name, ranks in zip(EVAL_LAYOUTS, results)}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(EVAL_LAYOUTS))
def test_uneven_evaluation_equals_the_single_process_one(layout, single, two_process_runs):
    ranks, out = two_process_runs[layout]
    for rank in ranks:
        assert "error" not in rank, rank.get("traceback", rank["error"])
    record = eval_record(out)
    assert (record["eval_sequences"], record["eval_tokens"]) == (single["eval_sequences"], single["eval_tokens"]) \
        == (5, 5 * 32)
    assert record["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-6)
