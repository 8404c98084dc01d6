"""Evaluation: token-weighted, the same in every layout, with every DP rank running the same number of forwards
(ZeRO-3 gathers parameters in each forward: ranks with different counts would deadlock)."""
import pytest

from megatron_mixln.config import load_config
from megatron_mixln.train import step as step_module
from megatron_mixln.train.loop import train
from megatron_mixln.train.metrics import read_metrics
from training_runs import run_processes, tiny

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


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.zero_stage=3"], ["parallel.pp=2"], ["parallel.tp=2"]],
                         ids=["dp2-zero3", "pp2", "tp2"])
def test_uneven_evaluation_equals_the_single_process_one(layout, cache, single, tmp_path):
    for rank in run_processes(2, tiny(cache, tmp_path / "run", *EVAL, *layout), tmp_path):
        assert "error" not in rank, rank.get("traceback")
    record = eval_record(tmp_path / "run")
    assert (record["eval_sequences"], record["eval_tokens"]) == (single["eval_sequences"], single["eval_tokens"]) \
        == (5, 5 * 32)
    assert record["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-6)
