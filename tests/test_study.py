"""mixln-study: the run classification (trained / recovered / diverged) on hand-made loss curves, the statistics it
reports, the guard study's runner and report on fake run folders (no training), and the command end to end on a
toy grid (slow)."""
import json
import math
from types import SimpleNamespace

import pytest

from megatron_mixln.research.runs import classify, t_critical, welch_t
from megatron_mixln.research.study import guard_grid, main, parse_guard_lrs, run_guard_sweep


def records(losses, skipped=()):
    return [{"step": i + 1, "loss": loss, **({"skipped": True} if i + 1 in skipped else {})}
            for i, loss in enumerate(losses)]


FALLING = [8.3 - 0.05 * i for i in range(40)]  # 8.3 -> 6.35, a run that trains


def test_a_falling_curve_trained_and_a_small_bump_is_no_spike():
    result = classify(records(FALLING))
    assert result["outcome"] == "trained" and result["first_spike"] is None and result["diverged_at"] is None
    assert result["start"] == pytest.approx(8.2)  # mean of the first five: 8.3 .. 8.1
    assert result["final"] == pytest.approx(statistics_mean(FALLING[-4:]))  # the last tenth of 40 steps
    bump = FALLING[:20] + [FALLING[19] + 0.9] + FALLING[21:]  # 0.9 nats above the lowest: noise, not a spike
    assert classify(records(bump))["outcome"] == "trained"


def statistics_mean(values):
    return sum(values) / len(values)


def test_a_spike_that_comes_back_is_recovered_and_one_that_does_not_is_diverged():
    # The committed sweep's Mix-LN at 3e-3: 7.1 -> 12.3 at step 20, back within five steps, ending lowest.
    curve = FALLING[:19] + [12.3, 11.0, 9.5, 8.0, 7.4] + [7.3 - 0.05 * i for i in range(16)]
    result = classify(records(curve))
    assert result["outcome"] == "recovered" and result["first_spike"] == 20 and result["spikes"] == [20]
    assert result["pre_spike_best"] == pytest.approx(FALLING[18]) and result["peak"] == 12.3
    # The same spike, but the loss stays 0.3 nats above its best before the spike: broken at the spike.
    stuck = FALLING[:29] + [12.3] + [FALLING[28] + 0.3] * 10  # still 1.0 nat below the start
    result = classify(records(stuck))
    assert result["outcome"] == "diverged" and result["diverged_at"] == 30
    assert "did not come back" in result["reason"]
    # A non-finite loss mid-run is a spike; back to the old level it is recovered, non-finite at the end diverged.
    nan_mid = FALLING[:10] + [math.nan] + FALLING[11:]
    assert classify(records(nan_mid))["outcome"] == "recovered"
    assert classify(records(nan_mid))["first_spike"] == 11
    nan_end = FALLING[:38] + [math.nan, FALLING[39]]
    result = classify(records(nan_end))
    assert result["outcome"] == "diverged" and result["diverged_at"] == 39
    # Two spikes: each counted once however many steps it stays up.
    twice = FALLING[:10] + [11.0, 11.0] + FALLING[12:25] + [11.0] + FALLING[26:]
    assert classify(records(twice))["spikes"] == [11, 26]


def test_no_progress_uniform_and_a_stopped_run_are_diverged():
    flat = [8.3 + 0.01 * (i % 3) for i in range(40)]
    result = classify(records(flat))
    assert result["outcome"] == "diverged" and result["diverged_at"] == 40 and "0.5 nats" in result["reason"]
    # 9.0 -> ln(4096) = 8.32: 0.68 nats of progress, but the model predicts the uniform distribution.
    to_uniform = [9.0 - (9.0 - math.log(4096)) * min(1.0, i / 10) for i in range(40)]
    assert classify(records(to_uniform))["outcome"] == "trained"  # without the vocabulary it cannot tell
    assert classify(records(to_uniform), vocab_size=4096)["outcome"] == "diverged"
    result = classify(records(FALLING[:30]), planned_steps=40)
    assert result["outcome"] == "diverged" and result["diverged_at"] == 30 and "stopped" in result["reason"]
    assert classify(records(FALLING), planned_steps=40)["outcome"] == "trained"
    assert classify([])["outcome"] == "diverged"


def test_welch_t_and_the_critical_points():
    a, b = [10.0, 11.0, 12.0], [13.0, 14.0, 15.0]
    assert welch_t(a, b) == pytest.approx(-3 / math.sqrt(2 / 3))  # (11 - 14) / sqrt(1/3 + 1/3)
    assert welch_t(a, a) == 0.0 and welch_t([1.0, 1.0], [2.0, 2.0]) == -math.inf
    assert t_critical(3) == 2.78 and t_critical(2) == 4.30


def test_guard_lrs_per_placement_and_a_bad_one_exits_2_before_anything_is_written(tmp_path, capsys):
    assert parse_guard_lrs(["mix=1e-2", "3e-2"], ["pre", "mix"]) == [("mix", 1e-2), ("pre", 3e-2), ("mix", 3e-2)]
    for bad in ("post=1e-2", "mix=fast", "0"):
        with pytest.raises(ValueError, match=f"--guard-lrs {bad} is invalid"):
            parse_guard_lrs([bad], ["pre", "mix"])
    assert main([str(tmp_path / "g"), "--guard-sweep", "--guard-lrs", "post=1e-2"]) == 2
    assert "--guard-lrs post=1e-2 is invalid" in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_the_guard_sweep_passes_each_actions_settings_and_does_not_train_a_run_twice(tmp_path, monkeypatch):
    import megatron_mixln.research.study as study

    calls = []

    def fake_train(config, overrides, log):
        calls.append(overrides)
        log.parent.mkdir(parents=True, exist_ok=True)
        return 0 if "guard.action=off" in overrides else 1

    monkeypatch.setattr(study, "mixln_train", fake_train)
    runs = guard_grid(tmp_path, [("mix", 1e-2)], ["off", "rollback"], [0, 1])
    assert [run.name for run in runs] == ["mix-lr0.01-off-s0", "mix-lr0.01-rollback-s0", "mix-lr0.01-off-s1",
                                          "mix-lr0.01-rollback-s1"]  # seed by seed: a cut-short study stays even
    statuses = run_guard_sweep(runs, "c.yaml", ["guard.sigmas=5"], steps=60, jobs=1)
    assert {name: s["exit"] for name, s in statuses.items()} == {
        "mix-lr0.01-off-s0": 0, "mix-lr0.01-rollback-s0": 1, "mix-lr0.01-off-s1": 0, "mix-lr0.01-rollback-s1": 1}
    off = next(c for c in calls if "guard.action=off" in c)
    rollback = next(c for c in calls if "guard.action=rollback" in c)
    assert not any(o.startswith("guard.window") for o in off) and "train.telemetry_every=2" in off
    assert {"guard.window=8", "train.save_every=4", "guard.lr_factor=0.5", "train.steps=60", "train.lr=0.01",
            "train.seed=0", f"train.out_dir={tmp_path / 'guard' / 'mix-lr0.01-rollback-s0'}"} <= set(rollback)
    # The caller's overrides come after the study's guard settings (they win), before the run's identity.
    assert rollback.index("guard.window=8") < rollback.index("guard.sigmas=5") < rollback.index("train.lr=0.01")
    calls.clear()
    assert run_guard_sweep(runs, "c.yaml", [], steps=60, jobs=2) == statuses and calls == []


def write_run(folder, losses, lrs=None, events=(), discarded=(), telemetry=None, eval_loss=None):
    """A fake guard-study run folder: config.json (4 layers of Mix-LN: layer 0 is Post-LN) and metrics.jsonl."""
    folder.mkdir(parents=True)
    model = {"num_layers": 4, "norm_placement": "mix", "mix_alpha": 0.25, "vocab_size": 256, "hidden_size": 32,
             "intermediate_size": 64, "num_heads": 2, "max_seq_len": 32}
    (folder / "config.json").write_text(json.dumps({"model": model}))
    lines = []
    for i, loss in enumerate(losses):
        step = i + 1
        lines.append({"step": step, "loss": loss, "lr": (lrs or {}).get(step, 0.01)})
        if telemetry and step in telemetry:
            lines.append({"step": step, "telemetry": True, **telemetry[step]})
    lines += list(events)
    if eval_loss is not None:
        lines.append({"step": len(losses), "eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss)})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if discarded:
        (folder / "metrics.discarded.jsonl").write_text("".join(json.dumps(e) + "\n" for e in discarded))


def fake_telemetry():
    """Every other step of 40: layer 0's (Post-LN) activation RMS triples from step 8, layer 2's max attention logit
    from step 10; the update ratio grows only with the warm-up LR (lr = 0.001 * step up to step 10)."""
    layers = [f"layer_{i:03d}" for i in range(4)]
    records = {}
    for step in range(2, 41, 2):
        lr = 0.001 * min(step, 10)
        records[step] = {
            "activation_rms": {k: 3.0 if (k == "layer_000" and step >= 8) else 1.0 for k in layers},
            "activation_max": {k: 4.0 for k in layers},
            "max_attention_logit": {k: 5.0 if (k == "layer_002" and step >= 10) else 2.0 for k in layers},
            "update_ratio": {k: 0.5 * lr for k in layers}}
    return records, {step: 0.001 * min(step, 10) for step in range(1, 41)}


def test_the_guard_report_counts_outcomes_costs_conversions_and_the_telemetry_lead(tmp_path):
    from megatron_mixln.research.report import guard_report, telemetry_lead

    base = [8.3 - 0.05 * i for i in range(40)]
    recovered = base[:11] + [11.0, 9.0] + base[13:]  # spike at step 12, back by step 13
    stuck = base[:11] + [11.0] + [base[10] + 0.4] * 28
    telemetry, lrs = fake_telemetry()
    runs = guard_grid(tmp_path, [("mix", 1e-2)], ["off", "skip", "rollback"], [0, 1])
    folders = {run.name: run.folder for run in runs}
    outlier = lambda step, action: {"step": step, "event": "outlier", "action": action, "loss": 11.0}  # noqa: E731
    write_run(folders["mix-lr0.01-off-s0"], recovered, lrs, telemetry=telemetry, eval_loss=6.5)
    write_run(folders["mix-lr0.01-off-s1"], stuck, lrs, telemetry=telemetry, eval_loss=7.5)
    write_run(folders["mix-lr0.01-skip-s0"], recovered[:14], lrs, events=[outlier(s, "skip") for s in (12, 13, 14)])
    write_run(folders["mix-lr0.01-skip-s1"], base, lrs, eval_loss=6.4)
    write_run(folders["mix-lr0.01-rollback-s0"], base, lrs, eval_loss=6.3,
              events=[{"step": 8, "event": "rollback", "trigger_step": 14, "skipped_batches": [9, 14],
                       "rollbacks": 1}], discarded=[outlier(12, "rollback"), outlier(13, "rollback")])
    write_run(folders["mix-lr0.01-rollback-s1"], base, lrs, eval_loss=6.5)
    statuses = {name: {"exit": 1 if name == "mix-lr0.01-skip-s0" else 0, "seconds": 1.0} for name in folders}
    args = SimpleNamespace(command="mixln-study x --guard-sweep", config="c.yaml", overrides=[], guard_steps=40,
                           guard_seeds=[0, 1], guard_actions=["off", "skip", "rollback"])
    study = guard_report(tmp_path, runs, statuses, args)

    groups = study["groups"]
    assert [groups["mix/0.01/off"][k] for k in ("trained", "recovered", "diverged")] == [0, 1, 1]
    assert [groups["mix/0.01/skip"][k] for k in ("trained", "recovered", "diverged", "stopped")] == [1, 0, 1, 1]
    assert groups["mix/0.01/off"]["eval_loss"] == pytest.approx((7.0, math.sqrt(0.5)))
    assert groups["mix/0.01/skip"]["evaluated"] == 1 and groups["mix/0.01/skip"]["outliers_skipped"] == 3
    rollback = groups["mix/0.01/rollback"]
    assert (rollback["steps_replayed"], rollback["batches_skipped"], rollback["rollbacks"]) == (6, 6, 1)
    assert rollback["outliers_skipped"] == 2  # the discarded steps' outliers count too
    assert study["verdict"]["off_diverged"] == 1 and study["verdict"]["off_spiked"] == 2
    skip = study["verdict"]["actions"]["skip"]
    assert (skip["fixed"], skip["broke"], skip["outliers_skipped"]) == (1, 1, 3)
    assert (study["verdict"]["actions"]["rollback"]["fixed"], study["verdict"]["actions"]["rollback"]["broke"]) == (1, 0)

    # The lead before the spike at step 12: baseline over telemetry steps 2, 4, 6; a rise is searched at 8, 10, 12.
    lead = next(r["lead"] for r in study["runs"] if r["name"] == "mix-lr0.01-off-s0")
    assert lead["baseline_steps"] == [2, 4, 6]
    assert lead["quantities"]["activation_rms"]["lead"] == 4 and lead["quantities"]["activation_rms"][
        "first_layers"] == ["layer_000"]
    assert lead["post_ln_rms_lead"] == 4 and lead["max_logit_lead"] == 2
    assert lead["quantities"]["max_attention_logit"]["first_layers"] == ["layer_002"]
    assert lead["quantities"]["update_ratio"]["lead"] is None  # the warm-up's LR, divided out
    assert lead["quantities"]["activation_max"]["lead"] is None
    # (Without the LR division the warm-up would read as a rise: at step 8 the ratio is 0.004, 2 x median 0.002.)
    assert telemetry_lead(folders["mix-lr0.01-off-s0"], 3) is None  # one telemetry step before: too few

    report = (tmp_path / "report.md").read_text()
    assert "| mix | 0.01 | off | 0 / 1 / 1 | 0 | 7.000 ± 0.707 (n=2) |" in report
    assert "| mix | 0.01 | 1 | diverged | trained | trained |" in report
    assert ("| mix-lr0.01-off-s0 | 12 | 4 steps (000) | no rise | 2 steps (002) | no rise | 4 steps | none by the "
            "spike | 2 steps |") in report
    # The update before the spike's loss (records 8 -> 10): layer 2's max logit x 2.5, earlier pairs x 1 (median).
    jump = lead["quantities"]["max_attention_logit"]["jump"]
    assert (jump["from"], jump["to"], jump["largest"]) == (8, 10, "layer_002")
    assert jump["largest_ratio"] == pytest.approx(2.5) and jump["typical_ratio"] == pytest.approx(1.0)
    assert "| mix-lr0.01-off-s0 | 8 → 10 |" in report
    assert (tmp_path / study["figure"]).stat().st_size > 10000
    assert (tmp_path / study["telemetry_figure"]).stat().st_size > 10000
    assert json.loads((tmp_path / "study.json").read_text())["verdict"] == study["verdict"]


def test_the_sweep_section_reads_both_the_old_flags_and_the_new_outcomes():
    from pathlib import Path

    from megatron_mixln.research.report import sweep_markdown

    committed = json.loads((Path(__file__).parent.parent / "studies/cpu_deep_narrow/study.json").read_text())
    text = "\n".join(sweep_markdown(committed["sweep"], {}))
    assert "the old rule's flag" in text and "| mix | 0.001 | none | 0.003: 20, 0.01: 11, 0.03: 8, 0.1: 5 |" in text
    new = {"steps": 40, "lrs": [1e-3, 1e-2], "placements": {"mix": {"max_stable_lr": 1e-2, "first_divergence": None,
           "runs": [{"lr": 1e-3, "outcome": "trained", "diverged_at": None, "first_spike": None},
                    {"lr": 1e-2, "outcome": "recovered", "diverged_at": None, "first_spike": 11}]}}}
    text = "\n".join(sweep_markdown(new, {}))
    assert "old rule" not in text and "| mix | 0.01 | 0.01: 11 | none |" in text


@pytest.mark.slow
def test_the_study_trains_analyses_sweeps_and_reports_and_resumes_without_retraining(tmp_path, capsys):
    out = tmp_path / "study"
    argv = [str(out), "--placements", "pre", "mix", "--inits", "default", "--seeds", "0", "1", "--jobs", "2",
            "--sweep-lrs", "3e-3", "3", "--sweep-steps", "20", "--sequences", "8", "model.num_layers=4",
            "train.steps=20", "train.layer_grad_norm_every=5", "train.eval_sequences=8",
            f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(argv) == 0
    study = json.loads((out / "study.json").read_text())
    assert set(study["groups"]) == {"pre/default", "mix/default"}
    for group in study["groups"].values():
        assert len(group["ppl"]) == 2 and all(math.isfinite(v) for v in group["ppl"])
        assert len(group["angular_n1_mean"]) == 4 and len(group["removal_increase_mean"]) == 4
    [row] = study["comparisons"]
    assert row["placement"] == "mix" and row["difference"] == pytest.approx(
        study["groups"]["mix/default"]["ppl_mean"] - study["groups"]["pre/default"]["ppl_mean"])
    assert set(study["sweep"]["placements"]) == {"pre", "mix"}
    for value in study["sweep"]["placements"].values():
        rows = {row["lr"]: row for row in value["runs"]}
        assert rows[3.0]["diverged_at"] is not None  # lr 3 cannot train this model
        assert value["max_stable_lr"] in (None, 3e-3)
    report = (out / "report.md").read_text()
    assert "| pre |" in report and "| mix |" in report and "Stability sweep" in report
    # The per-layer norms where each placement first diverged, one value per decoder layer (4 here).
    for placement in ("pre", "mix"):
        [row] = [line for line in report.splitlines() if line.startswith(f"| {placement} | 3 |")]
        grad_norms = [float(v) for v in row.split("|")[4].split()]  # numbers (nan where the step blew up)
        assert len(grad_norms) == 4, row
    for figure in study["figures"].values():
        assert (out / figure).stat().st_size > 5000
    capsys.readouterr()
    assert main(argv) == 0  # everything finished: nothing is trained again
    assert "4 of 4 runs already finished; training 0" in capsys.readouterr().out
