"""The loss-spike guard (train/guard.py): its rules by hand, and end to end with a fault tied to the data.

The fault (MIXLN_TEST_FAULT=batch@B) multiplies by 1e3 the LR of the update made on global batch B, whatever step
reads it: the loss spikes at the next step, skipping that step does not cure the model, and only skipping batch B's
window after a rollback avoids the harm. So:
- without the guard the loss spikes; with `skip` the outlier step leaves weights, moments and schedule untouched;
- with `rollback` the run reloads, skips the window and ends equal to a run that never read those batches, and
  close to a run whose data never had the bad batch;
- in one process, DP2 ZeRO-1, TP2 and PP2 (every rank takes the same decisions), and across a SIGTERM right after
  a rollback (exact).
"""
import math
import os
import signal
import statistics

import pytest
import torch

from megatron_mixln.config import ConfigError, GuardConfig, load_config
from megatron_mixln.data import prefetch
from megatron_mixln.data.sampling import batch_of_step
from megatron_mixln.train import checkpoint as ckpt
from megatron_mixln.train import checkpoint_files
from megatron_mixln.train import loop
from megatron_mixln.train.guard import LossSpikeGuard, _merge
from megatron_mixln.train.loop import UnstableError, train
from megatron_mixln.train.metrics import DISCARDED_FILE, read_metrics
from training_runs import tiny, train_one_after_another

BAD_BATCH = 14
STEPS = 26
# A window short enough for a 26-step run; rollback after two outliers; the checkpoint must predate batch 12.
GUARD = ["guard.window=6", "guard.warmup_steps=6", "guard.sigmas=6", "guard.rollback_outliers=2",
         "guard.rollback_within=5", "guard.skip_batches_before=2"]
RUN = [f"train.steps={STEPS}", "train.save_every=3", "train.keep_checkpoints=1", "train.lr=1e-3",
       "train.micro_batch_size=2", "train.layer_grad_norm_every=0", "train.eval_sequences=8"]
# What the rollback must do with those settings: outliers at steps 15 and 16 (the loss after the bad update), so
# the batches of steps 13-16 are skipped and the newest checkpoint before step 13 (step 12) is reloaded. The save at
# step 15 would prune step 12 (train.keep_checkpoints=1) but for the guard's way back.
SKIPPED = [13, 16]
BACK_TO = 12


def overrides(cache, out, action: str, *extra: str) -> list[str]:
    return tiny(cache, out, *RUN, *GUARD, f"guard.action={action}", *extra)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    """The one-process runs several tests compare: the fault without a guard, with rollback, a clean run, and a
    run that never reads the skipped batches (no fault, no guard)."""
    done = {}
    saved = os.environ.get("MIXLN_TEST_FAULT")
    try:
        os.environ["MIXLN_TEST_FAULT"] = f"batch@{BAD_BATCH}"
        for action in ("off", "rollback"):
            out = tmp_path_factory.mktemp(f"fault-{action}")
            done[action] = (train(load_config(None, overrides(cache, out, action))), out)
        del os.environ["MIXLN_TEST_FAULT"]
        out = tmp_path_factory.mktemp("clean")
        done["clean"] = (train(load_config(None, overrides(cache, out, "off"))), out)
        original = prefetch.batch_of_step
        prefetch.batch_of_step = lambda step, skipped: original(step, [SKIPPED])
        try:
            out = tmp_path_factory.mktemp("never-read")
            done["never_read"] = (train(load_config(None, overrides(cache, out, "off"))), out)
        finally:
            prefetch.batch_of_step = original
    finally:
        if saved is None:
            os.environ.pop("MIXLN_TEST_FAULT", None)
        else:
            os.environ["MIXLN_TEST_FAULT"] = saved
    return done


# ---------------------------------------------------------------------------------------------------- the rules


def guard_with(**fields) -> LossSpikeGuard:
    return LossSpikeGuard(GuardConfig(**{"window": 4, "warmup_steps": 4, "sigmas": 3.0, "min_rise": 0.0, **fields}),
                          [math.log(320)])


def feed(guard: LossSpikeGuard, step: int, loss: float, norm: float = 1.0, applied: bool | None = None):
    judgement = guard.judge(loss, norm)
    applied = (not (judgement.outlier and guard.vetoes)) if applied is None else applied
    return judgement, guard.after_step(step, applied)


def test_the_threshold_is_the_windows_mean_plus_sigmas_standard_deviations_once_warm():
    guard = guard_with(action="skip")
    losses = [5.0, 5.2, 4.9, 5.1, 5.0, 4.8]
    for step, loss in enumerate(losses[:3], start=1):
        judgement, _ = feed(guard, step, loss)
        assert judgement.loss_threshold is None  # warm-up: 3 applied steps of 4
    feed(guard, 4, losses[3])
    window = losses[:4]
    assert guard.thresholds()[0] == pytest.approx(statistics.fmean(window) + 3 * statistics.stdev(window), rel=1e-12)
    bound = guard.thresholds()[0]
    assert not feed(guard, 5, bound - 1e-9)[0].outlier
    window = (window + [bound - 1e-9])[-4:]  # the window rolls over applied non-outlier steps
    assert guard.thresholds()[0] == pytest.approx(statistics.fmean(window) + 3 * statistics.stdev(window), rel=1e-12)
    judgement, decision = feed(guard, 6, 50.0)
    assert judgement.reason == "loss" and decision.events[0]["event"] == "outlier"
    assert guard.losses == window  # an outlier never enters the window


def test_ceilings_judge_from_the_first_step_and_the_gradient_norm_is_judged_too():
    guard = guard_with(action="skip", loss_ceiling=9.0, grad_norm_ceiling=20.0)
    assert feed(guard, 1, 9.5)[0].reason == "loss_ceiling"
    assert feed(guard, 2, 5.0, norm=25.0)[0].reason == "grad_norm_ceiling"
    for step in range(3, 8):
        feed(guard, step, 5.0 + 0.01 * step, norm=1.0 + 0.01 * step)
    assert feed(guard, 8, 5.05, norm=3.0)[0].reason == "grad_norm"


def test_a_steady_window_needs_a_rise_of_min_rise_not_only_of_sigmas():
    guard = guard_with(action="skip", min_rise=0.1)
    for step in range(1, 6):
        feed(guard, step, 5.0, norm=0.8 + 1e-4 * step)  # a standard deviation of 1e-4
    window = guard.grad_norms
    assert guard.thresholds()[1] == pytest.approx(1.1 * statistics.fmean(window), rel=1e-12)
    assert not feed(guard, 6, 5.0, norm=0.85)[0].outlier and feed(guard, 7, 5.0, norm=0.9)[0].reason == "grad_norm"


def test_rollback_after_m_outliers_within_n_steps_and_never_past_max_rollbacks():
    guard = guard_with(action="rollback", rollback_outliers=2, rollback_within=3, skip_batches_before=2,
                       max_rollbacks=1)
    for step in range(1, 9):
        feed(guard, step, 5.0 + 0.01 * (step % 2))
    _, first = feed(guard, 9, 40.0)
    assert first.rollback is None
    for step in (10, 11):
        feed(guard, step, 5.0)
    _, late = feed(guard, 12, 40.0)  # 9 and 12 are not within 3 steps
    assert late.rollback is None
    _, decision = feed(guard, 13, 40.0)
    assert decision.rollback.trigger_step == 13 and decision.rollback.first_step == 12 - 2
    guard.rolled_back(decision.rollback, 10, 13, {}, schedule_step=9)
    assert guard.skipped_batches == [[10, 13]] and guard.rollbacks == 1
    for step in range(10, 18):
        feed(guard, step, 5.0 + 0.01 * (step % 2))
    feed(guard, 18, 40.0)
    assert "already rolled back 1 times" in feed(guard, 19, 40.0)[1].stop


def test_a_loss_above_the_window_for_n_steps_rolls_back_without_any_outlier():
    guard = guard_with(action="rollback", rollback_within=4, sigmas=100.0, skip_batches_before=2)
    for step in range(1, 7):
        feed(guard, step, 5.0 - 0.01 * step)
    decisions = [feed(guard, step, 5.0 + 0.01 * step)[1] for step in range(7, 11)]
    assert [d.rollback is not None for d in decisions] == [False, False, False, True]
    assert decisions[-1].rollback.first_step == 7 - 2  # the rise began at step 7


def test_a_collapse_is_a_zero_gradient_norm_or_the_uniform_loss_after_a_lower_one():
    level = math.log(320)
    guard = guard_with(action="warn", collapse_steps=3)
    for step in range(1, 4):  # at the uniform level from the start: not a collapse (it was never lower)
        assert not feed(guard, step, level)[1].events
    feed(guard, 4, level - 1.0)
    events = [feed(guard, step, level + 0.01)[1].events for step in range(5, 8)]
    assert [bool(e) for e in events] == [False, False, True] and events[-1][0]["event"] == "collapse"
    zero = guard_with(action="skip", collapse_steps=2)
    feed(zero, 1, 5.0, norm=0.0)
    decision = feed(zero, 2, 5.0, norm=0.0)[1]
    assert "gradient norm of exactly 0" in decision.events[0]["reason"] and "collapsed" in decision.stop


def test_the_state_survives_a_checkpoint_and_a_rollback_keeps_what_it_decided():
    guard = guard_with(action="rollback")
    for step in range(1, 7):
        feed(guard, step, 5.0 + 0.1 * step)
    state = guard.state_dict()
    again = guard_with(action="rollback")
    again.load_state_dict(state)
    assert again.state_dict() == state and again.thresholds() == guard.thresholds()
    guard.skipped_batches, guard.rollbacks = [[3, 4]], 2
    guard.load_state_dict({"losses": [1.0, 2.0]}, keep_rollbacks=True)
    assert guard.skipped_batches == [[3, 4]] and guard.rollbacks == 2 and guard.losses == [1.0, 2.0]


def test_the_lr_is_lowered_for_the_updates_after_a_rollback():
    guard = guard_with(action="rollback", lr_factor=0.5, lr_factor_steps=3, rollback_outliers=1)
    for step in range(1, 6):
        feed(guard, step, 5.0 + 0.01 * (step % 2))
    plan = feed(guard, 6, 40.0)[1].rollback
    event = guard.rolled_back(plan, 2, 6, {}, schedule_step=4)
    assert [guard.lr_scale(s) for s in range(3, 9)] == [1.0, 0.5, 0.5, 0.5, 1.0, 1.0] and event["lr_factor"] == 0.5


@pytest.mark.parametrize("windows", [[], [[3, 4]], [[1, 2], [5, 5], [9, 12]], [[2, 3], [4, 6], [5, 8]]])
def test_batch_of_step_is_the_step_th_batch_outside_every_window(windows):
    merged = _merge([list(w) for w in windows])
    outside = [b for b in range(1, 60) if not any(first <= b <= last for first, last in merged)]
    assert [batch_of_step(step, merged) for step in range(1, 30)] == outside[:29]


# ---------------------------------------------------------------------------------------------------- one process


def test_without_the_guard_the_bad_batch_makes_the_loss_spike(runs):
    losses = runs["off"][0].losses
    clean = runs["clean"][0].losses
    assert losses[BAD_BATCH] == clean[BAD_BATCH]  # the loss of the bad step itself is computed before its update
    assert losses[BAD_BATCH + 1] > clean[BAD_BATCH + 1] + 1.0
    assert runs["off"][0].eval_loss > runs["clean"][0].eval_loss + 1.0


def test_rollback_reloads_skips_the_window_and_ends_as_a_run_that_never_read_it(runs):
    result, out = runs["rollback"]
    events = result.guard_events
    assert [(e["event"], e["step"]) for e in events] == [("outlier", BAD_BATCH + 1), ("outlier", BAD_BATCH + 2),
                                                         ("rollback", BACK_TO)]
    assert events[-1]["skipped_batches"] == SKIPPED and events[-1]["trigger_step"] == BAD_BATCH + 2
    never_read = runs["never_read"][0]
    assert result.losses == never_read.losses  # exact: the same batches after an exact reload
    assert result.eval_loss == never_read.eval_loss
    # and close to a run whose data never had the bad batch (4 of 26 batches differ): the stated tolerance
    assert abs(result.eval_loss - runs["clean"][0].eval_loss) < 0.05 < runs["off"][0].eval_loss - result.eval_loss
    records = read_metrics(out / "metrics.jsonl")
    steps = [r["step"] for r in records if "loss" in r and "event" not in r]
    assert steps == list(range(1, STEPS + 1))  # each step once: the discarded ones were moved aside
    discarded = read_metrics(out / DISCARDED_FILE)
    assert [r["step"] for r in discarded if "lr" in r] == list(range(BACK_TO + 1, BAD_BATCH + 3))
    # telemetry in full at each event step (train.telemetry_every=0 here), set aside with the steps it measured
    telemetry = [r for r in discarded if r.get("telemetry")]
    assert [r["step"] for r in telemetry] == [BAD_BATCH + 1, BAD_BATCH + 2]
    assert set(telemetry[0]["activation_rms"]) >= {"layer_000", "layer_003"}
    assert any(r.get("event") == "rollback" for r in records)
    state = ckpt.read_json(ckpt.latest_checkpoint(out) / ckpt.STATE_FILE, "")
    assert state["guard"]["skipped_batches"] == [SKIPPED] and state["guard"]["rollbacks"] == 1


def test_rollback_needs_a_checkpoint_from_before_the_trouble_which_pruning_keeps(runs, cache, tmp_path, monkeypatch):
    # keep_checkpoints=1 above: the step-12 checkpoint survived the save at step 16 (it was the way back). Without a
    # checkpoint early enough the run stops with one sentence.
    monkeypatch.setenv("MIXLN_TEST_FAULT", f"batch@{BAD_BATCH}")
    with pytest.raises(UnstableError, match=r"no checkpoint from before step 13 to roll back to .*train.save_every"):
        train(load_config(None, overrides(cache, tmp_path, "rollback", "train.save_every=20")))
    with pytest.raises(ConfigError, match=r"guard.action='rollback' is invalid: .*set train.save_every"):
        load_config(None, overrides(cache, tmp_path, "rollback", "train.save_every=0"))


def test_skip_leaves_weights_moments_and_schedule_untouched_at_the_outlier(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXLN_TEST_FAULT", f"batch@{BAD_BATCH}")
    out = tmp_path / "skip"
    outlier = BAD_BATCH + 1
    result = train(load_config(None, overrides(cache, out, "skip", "train.save_every=1", "train.keep_checkpoints=3",
                                               f"train.stop_after_step={outlier}")))
    assert result.skipped_steps == [outlier] and result.guard_events[0]["step"] == outlier
    before, after = (checkpoint_files.load_checkpoint_file(out / "checkpoints" / ckpt.tag_for_step(s) /
                                               "mp_rank_00_model_states.pt") for s in (outlier - 1, outlier))
    for part in ("module", "optimizer", "lr_scheduler"):  # ZeRO-0 keeps the optimiser's state in this file
        assert _same_tensors(before[part], after[part]), part
    assert before["optimizer"]["state"] and before["lr_scheduler"]["last_epoch"] == outlier - 1
    record = next(r for r in read_metrics(out / "metrics.jsonl") if r.get("step") == outlier and "lr" in r)
    assert record["skipped"] is True and record["outlier"] is True


def _same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_tensors(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("precision,zero", [("bf16", 1), ("fp32", 3)])
def test_the_guard_is_asked_by_deepspeeds_optimisers(precision, zero, cache, tmp_path, monkeypatch):
    """bf16 and ZeRO-1/2/3 skip through DeepSpeed's own norm check (is_invalid_grad_norm): the outlier is vetoed
    there, and a step the guard was not asked about would raise."""
    monkeypatch.setenv("MIXLN_TEST_FAULT", f"batch@{BAD_BATCH}")
    result = train(load_config(None, overrides(cache, tmp_path, "skip", f"train.precision={precision}",
                                               f"parallel.zero_stage={zero}", f"train.stop_after_step={BAD_BATCH + 1}")))
    assert result.skipped_steps == [BAD_BATCH + 1] and result.guard_events[0]["event"] == "outlier"


def test_a_sigterm_right_after_a_rollback_resumes_exactly(runs, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXLN_TEST_FAULT", f"batch@{BAD_BATCH}")
    line = loop.guard_line

    def signal_at_the_rollback(event):
        if event["event"] == "rollback":
            os.kill(os.getpid(), signal.SIGTERM)  # stops at the next step boundary, mid-way through the replay
        return line(event)

    monkeypatch.setattr(loop, "guard_line", signal_at_the_rollback)
    config = load_config(None, overrides(cache, tmp_path, "rollback"))
    stopped = train(config)
    assert stopped.stop_signal == "SIGTERM" and stopped.last_step == BACK_TO + 1
    monkeypatch.setattr(loop, "guard_line", line)
    resumed = train(config)
    expected = runs["rollback"][0]
    assert {**stopped.losses, **resumed.losses} == expected.losses and resumed.eval_loss == expected.eval_loss
    assert resumed.guard_events == []  # nothing is decided twice: the window was in the checkpoint


# ---------------------------------------------------------------------------------------------------- layouts


@pytest.mark.slow
def test_every_layout_rolls_back_the_same_way_on_every_rank(runs, cache, tmp_path):
    layouts = {"dp2-zero1": ["parallel.zero_stage=1"], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"]}
    results = train_one_after_another(
        2, [overrides(cache, tmp_path / name, "rollback", *extra) for name, extra in layouts.items()], tmp_path,
        env={"MIXLN_TEST_FAULT": f"batch@{BAD_BATCH}"})
    expected = runs["rollback"][0]
    for name, ranks in zip(layouts, results):
        assert all("error" not in rank for rank in ranks), (name, ranks)
        assert ranks[0]["skipped"] == ranks[1]["skipped"] == [], name
        losses = {int(step): loss for step, loss in ranks[0]["losses"].items()}
        assert sorted(losses) == list(range(1, STEPS + 1)), name
        assert max(abs(losses[s] - expected.losses[s]) for s in losses) < 1e-4, name
        events = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if r.get("event") == "rollback"]
        assert [(e["step"], e["skipped_batches"]) for e in events] == [(BACK_TO, SKIPPED)], name
