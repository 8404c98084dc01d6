"""mixln-study: the divergence rule and the statistics it reports, and the command end to end on a toy grid."""
import json
import math

import pytest

from megatron_mixln.study import divergence, main, t_critical, welch_t


def records(losses, skipped=()):
    return [{"step": i + 1, "loss": loss, **({"skipped": True} if i + 1 in skipped else {})}
            for i, loss in enumerate(losses)]


def test_divergence_is_a_skip_a_one_nat_rise_or_no_progress():
    falling = [8.0 - 0.05 * i for i in range(30)]
    assert divergence(records(falling)) is None
    assert divergence(records(falling, skipped={12})) == 12
    assert divergence(records(falling[:10] + [float("nan")] + falling[11:])) == 11
    spiking = falling[:15] + [falling[14] + 1.2] + falling[16:]  # 1.2 nats above the lowest so far
    assert divergence(records(spiking)) == 16
    assert divergence(records(falling[:15] + [falling[14] + 0.8] + falling[16:])) is None  # within one nat
    assert divergence(records([8.0 + 0.01 * (i % 3) for i in range(30)])) == 30  # flat: no progress


def test_welch_t_and_the_critical_points():
    a, b = [10.0, 11.0, 12.0], [13.0, 14.0, 15.0]
    assert welch_t(a, b) == pytest.approx(-3 / math.sqrt(2 / 3))  # (11 - 14) / sqrt(1/3 + 1/3)
    assert welch_t(a, a) == 0.0 and welch_t([1.0, 1.0], [2.0, 2.0]) == -math.inf
    assert t_critical(3) == 2.78 and t_critical(2) == 4.30


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
