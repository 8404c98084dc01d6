"""Non-finite steps: a NaN loss, or a NaN gradient under a finite loss, injected at step 3 (MIXLN_TEST_FAULT),
never reaches the weights, in fp32 and bf16, ZeRO-0/1/3 and a 2-stage pipeline.

`skip` must leave exactly the weights of a run that never saw step 3's batch (independently built by shifting
the batch order); `stop` must stop before the update; nothing non-finite is ever saved.
"""
import math

import pytest
import torch

from megatron_mixln.config import ConfigError, load_config
from megatron_mixln.train import checkpoint as ckpt
from megatron_mixln.train.loop import NonFiniteError, train
from megatron_mixln.train.metrics import read_metrics
from training_runs import (exported_weights, leaving_out, max_relative_difference, module_state, tiny,
                           train_one_after_another)

BAD_STEP = 3
ONE_PROCESS = [("fp32", 0), ("fp32", 1), ("fp32", 3), ("bf16", 1), ("bf16", 3)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def layout_overrides(precision: str, zero: int) -> list[str]:
    return [f"train.precision={precision}", f"parallel.zero_stage={zero}", "train.grad_clip=1.0"]


@pytest.fixture(scope="module")
def left_out(cache, tmp_path_factory):
    """Per (precision, ZeRO stage): the weights after 5 steps of a 6-step schedule that never sees step 3's batch."""
    weights = {}

    def reference(precision: str, zero: int):
        if (precision, zero) not in weights:
            out = tmp_path_factory.mktemp(f"leave-out-{precision}-{zero}")
            with leaving_out(BAD_STEP):
                result = train(load_config(None, tiny(cache, out, *layout_overrides(precision, zero),
                                                      f"train.stop_after_step={5}")))
            assert result.stopped_early and sorted(result.losses) == [1, 2, 3, 4, 5]
            weights[(precision, zero)] = exported_weights(out)
        return weights[(precision, zero)]

    return reference


@pytest.mark.parametrize("fault", ["loss", "grad"])
@pytest.mark.parametrize("precision,zero", ONE_PROCESS)
def test_skip_gives_the_weights_of_a_run_without_that_batch(precision, zero, fault, cache, left_out, tmp_path,
                                                            monkeypatch):
    reference = left_out(precision, zero)
    monkeypatch.setenv("MIXLN_TEST_FAULT", f"{fault}@{BAD_STEP}")
    out = tmp_path / "run"
    result = train(load_config(None, tiny(cache, out, *layout_overrides(precision, zero), "train.on_nonfinite=skip")))
    assert result.skipped_steps == [BAD_STEP] and sorted(result.losses) == [1, 2, 4, 5, 6]
    if fault == "grad":  # the loss itself stayed finite: only the gradient check can have caught it
        record = next(r for r in read_metrics(out / "metrics.jsonl") if r.get("step") == BAD_STEP and "loss" in r)
        assert math.isfinite(record["loss"]) and record["skipped"] is True
    weights = exported_weights(out)
    assert all(torch.equal(weights[name], reference[name]) for name in reference), \
        max_relative_difference(weights, reference)
    # The LR schedule advanced with applied updates only: step 4 used step 3's rate.
    lrs = {r["step"]: r["lr"] for r in read_metrics(out / "metrics.jsonl") if "lr" in r}
    assert lrs[BAD_STEP + 1] == lrs[BAD_STEP]


@pytest.mark.parametrize("fault", ["loss", "grad"])
@pytest.mark.parametrize("precision,zero", [("fp32", 0), ("bf16", 1)])
def test_stop_stops_before_the_update_and_names_the_last_checkpoint(precision, zero, fault, cache, tmp_path,
                                                                   monkeypatch):
    from megatron_mixln.train import step as step_module

    snapshots = {}
    real_train_step = step_module.StepEngine.train_step

    def train_step_and_snapshot(self, step, *args, **kwargs):
        outcome = real_train_step(self, step, *args, **kwargs)
        snapshots[step] = {name: p.detach().clone() for name, p in self.module.named_parameters()}
        return outcome

    monkeypatch.setattr(step_module.StepEngine, "train_step", train_step_and_snapshot)
    monkeypatch.setenv("MIXLN_TEST_FAULT", f"{fault}@{BAD_STEP}")
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=f"step {BAD_STEP}: .*last checkpoint: step 2"):
        train(load_config(None, tiny(cache, out, *layout_overrides(precision, zero), "train.save_every=2")))
    assert sorted(snapshots) == [1, 2, 3]
    assert all(torch.equal(snapshots[3][name], snapshots[2][name]) for name in snapshots[2])
    assert ckpt.latest_checkpoint(out).name == ckpt.tag_for_step(2)


PIPELINE_LAYOUTS = [("fp32", 0), ("bf16", 1)]
FAULTS = ["loss", "grad"]


@pytest.fixture(scope="module")
def pipeline_runs(cache, tmp_path_factory):
    """PP=2, in one launch of two processes: per (precision, ZeRO stage) of PIPELINE_LAYOUTS the reference run
    that never sees step 3's batch (stopped after step 5), and per fault a run that skips step 3. Returns
    {key: (its folder, its ranks' summaries)} for keys (precision, zero) and (precision, zero, fault)."""
    folder = tmp_path_factory.mktemp("pipeline")
    runs, envs, leave_outs = {}, [], []  # key -> (out_dir, overrides); per run, in that order
    for precision, zero in PIPELINE_LAYOUTS:
        pipeline = [*layout_overrides(precision, zero), "parallel.pp=2"]
        out = folder / f"reference-{precision}-{zero}"
        runs[(precision, zero)] = (out, tiny(cache, out, *pipeline, "train.stop_after_step=5"))
        envs.append({})
        leave_outs.append(BAD_STEP)
        for fault in FAULTS:
            out = folder / f"faulty-{precision}-{zero}-{fault}"
            runs[(precision, zero, fault)] = (out, tiny(cache, out, *pipeline, "train.on_nonfinite=skip"))
            envs.append({"MIXLN_TEST_FAULT": f"{fault}@{BAD_STEP}"})
            leave_outs.append(None)
    results = train_one_after_another(2, [overrides for _, overrides in runs.values()], folder, run_envs=envs,
                                      run_leave_outs=leave_outs)
    return {key: (out, ranks) for (key, (out, _)), ranks in zip(runs.items(), results)}


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("precision,zero", PIPELINE_LAYOUTS)
def test_pipeline_skip_gives_the_weights_of_a_run_without_that_batch(precision, zero, fault, pipeline_runs):
    reference_folder, reference = pipeline_runs[(precision, zero)]
    assert "error" not in reference[0], reference[0].get("traceback")
    faulty_folder, faulty = pipeline_runs[(precision, zero, fault)]
    for rank in faulty:  # the fault is injected on the last rank only: every rank agreed to skip
        assert "error" not in rank, rank.get("traceback")
        assert rank["skipped"] == [BAD_STEP]
    weights, expected = exported_weights(faulty_folder), exported_weights(reference_folder)
    assert all(torch.equal(weights[name], expected[name]) for name in expected), \
        max_relative_difference(weights, expected)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_an_inf_activation_in_bf16_makes_the_loss_non_finite_and_the_step_skipped(kernels, cache, tmp_path,
                                                                                  monkeypatch):
    # One token's embedding overflows at step 3. The fused kernels' NaNs then carry the GPU's bits (the
    # interpreter's are numpy's), which a bit-level bf16 rounding once turned into zeros: a finite loss.
    import triton.language as tl

    from megatron_mixln.kernels import _common
    from megatron_mixln.model.llama import Embedding
    from megatron_mixln.train import step as step_module

    monkeypatch.setattr(_common, "GPU_NAN_IN_INTERPRETER", tl.constexpr(True))
    training = {"step": 0}
    real_train_step, real_embed = step_module.StepEngine.train_step, Embedding.forward

    def train_step_knowing_the_step(self, step, *args, **kwargs):
        training["step"] = step
        try:
            return real_train_step(self, step, *args, **kwargs)
        finally:
            training["step"] = 0

    def embed_with_an_overflow(self, input_ids):
        hidden = real_embed(self, input_ids)
        if training["step"] == BAD_STEP:
            hidden = hidden.clone()
            hidden[..., 0, 0] = math.inf
        return hidden

    monkeypatch.setattr(step_module.StepEngine, "train_step", train_step_knowing_the_step)
    monkeypatch.setattr(Embedding, "forward", embed_with_an_overflow)
    out = tmp_path / "run"
    result = train(load_config(None, tiny(cache, out, *layout_overrides("bf16", 1), f"model.kernels={kernels}",
                                          "train.on_nonfinite=skip", f"train.stop_after_step={BAD_STEP}")))
    assert result.skipped_steps == [BAD_STEP] and sorted(result.losses) == [1, 2]
    record = next(r for r in read_metrics(out / "metrics.jsonl") if r.get("step") == BAD_STEP and "loss" in r)
    assert not math.isfinite(float(record["loss"])) and record["skipped"] is True  # written as a string


def test_updates_skipped_in_a_row_stop_the_run_and_never_save_non_finite_weights(cache, tmp_path):
    # lr 1e6: step 1 blows the weights up (finite), every later gradient is NaN.
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="3 skipped updates in a row"):
        train(load_config(None, tiny(cache, out, "train.lr=1e6", "train.on_nonfinite=skip", "train.save_every=1",
                                     "train.max_consecutive_skips=3", "train.steps=12")))
    saved = sorted((out / ckpt.CHECKPOINTS).glob("step_*"))
    assert saved, "the checkpoints before the blow-up must be kept"
    for folder in saved:
        state = module_state(folder)
        assert all(torch.isfinite(t).all() for t in state.values()), folder


@pytest.mark.parametrize("override", ["train.lr=inf", "train.lr=nan", "train.grad_clip=inf", "train.adam_eps=nan",
                                      "train.betas=[0.9,nan]", "model.mix_alpha=nan"])
def test_non_finite_numbers_in_the_config_are_rejected(override):
    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{field}=.* is invalid: expected a finite number"):
        load_config(None, [override])
