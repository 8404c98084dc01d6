"""Exact resume under every ZeRO stage and layout: 6 steps straight, and 3 + resume + 3, give identical losses
and gradient norms (CPU, fp32). Loading stays safe: weights_only with DeepSpeed's own classes only."""

import pytest
import torch

from megatron_mixln.config import load_config
from megatron_mixln.train import checkpoint as ckpt
from megatron_mixln.train import checkpoint_files
from megatron_mixln.train.loop import train
from training_runs import MaliciousPickle, result_summary, tiny, train_one_after_another


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def straight_and_resumed(run, cache, out, *overrides):
    """Summaries of a straight 6-step run and of a run stopped after step 3 then resumed (train.resume=auto)."""
    straight = run(tiny(cache, out / "straight", *overrides))
    first = run(tiny(cache, out / "resumed", *overrides, "train.stop_after_step=3"))
    assert first["stopped_early"] and sorted(first["losses"], key=int) == ["1", "2", "3"]
    second = run(tiny(cache, out / "resumed", *overrides, "train.resume=auto"))
    return straight, second


def assert_identical_continuation(straight, resumed):
    assert sorted(resumed["losses"], key=int) == ["4", "5", "6"]
    for step in ("4", "5", "6"):
        assert resumed["losses"][step] == straight["losses"][step], step
        assert resumed["grad_norms"][step] == straight["grad_norms"][step], step
    assert resumed["eval_loss"] == straight["eval_loss"]


@pytest.mark.parametrize("precision,zero", [("fp32", 0), ("fp32", 1), ("fp32", 2), ("fp32", 3), ("bf16", 1)])
def test_one_process_resume_is_exact_at_every_zero_stage(precision, zero, cache, tmp_path):
    straight, resumed = straight_and_resumed(lambda overrides: result_summary(train(load_config(None, overrides))),
                                             cache, tmp_path, f"train.precision={precision}",
                                             f"parallel.zero_stage={zero}")
    assert_identical_continuation(straight, resumed)


TWO_PROCESS_LAYOUTS = {"dp2-zero1": ["parallel.zero_stage=1"], "dp2-zero2": ["parallel.zero_stage=2"],
                       "dp2-zero3": ["parallel.zero_stage=3"], "pp2-zero1": ["parallel.pp=2", "parallel.zero_stage=1"],
                       "tp2-zero3": ["parallel.tp=2", "parallel.zero_stage=3"]}


@pytest.fixture(scope="module")
def two_process_runs(cache, tmp_path_factory):
    """Per layout of TWO_PROCESS_LAYOUTS: the ranks' summaries of its straight run, its run stopped after step 3
    and that run resumed. Two launches in all (each costs more than a tiny run): one trains every straight and
    stopped run, the other, fresh processes that never trained a first half, every resume; so only what the
    checkpoint holds carries a run across."""
    folder = tmp_path_factory.mktemp("two-process")
    names = list(TWO_PROCESS_LAYOUTS)
    first_halves = train_one_after_another(2, [
        tiny(cache, folder / name / part, *TWO_PROCESS_LAYOUTS[name], *extra)
        for name in names for part, extra in (("straight", []), ("resumed", ["train.stop_after_step=3"]))], folder)
    resumes = train_one_after_another(2, [tiny(cache, folder / name / "resumed", *TWO_PROCESS_LAYOUTS[name],
                                               "train.resume=auto") for name in names], folder)
    return {name: (first_halves[2 * i], first_halves[2 * i + 1], resumes[i]) for i, name in enumerate(names)}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(TWO_PROCESS_LAYOUTS))
def test_two_process_resume_is_exact(layout, two_process_runs):
    for ranks in two_process_runs[layout]:
        for rank in ranks:
            assert "error" not in rank, rank.get("traceback", rank["error"])
    straight, first, resumed = (ranks[0] for ranks in two_process_runs[layout])
    assert first["stopped_early"] and sorted(first["losses"], key=int) == ["1", "2", "3"]
    assert_identical_continuation(straight, resumed)


@pytest.mark.parametrize("zero,file", [(0, "mp_rank_00_model_states.pt"),
                                       (1, "zero_pp_rank_0_mp_rank_00_optim_states.pt")])
def test_checkpoint_loading_refuses_arbitrary_pickles(zero, file, cache, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, tiny(cache, out, "train.steps=2", f"parallel.zero_stage={zero}")))
    path = ckpt.latest_checkpoint(out) / file
    with torch.serialization.safe_globals(checkpoint_files.deepspeed_checkpoint_globals()):
        state = torch.load(path, weights_only=True)  # DeepSpeed's own classes are allowed ...
    state["payload"] = MaliciousPickle()
    torch.save(state, path)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        train(load_config(None, tiny(cache, out, "train.steps=2", f"parallel.zero_stage={zero}")))
    assert not MaliciousPickle.ran  # ... and nothing else
