"""mixln-analyze and megatron_mixln.analysis: each measurement against an independent computation on tiny trained
runs (the model run stage by stage here, cosines in float64 with numpy, layers swapped for identity modules,
metrics.jsonl parsed line by line), the command end to end, and bad inputs as one `error:` line."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_mixln import analysis
from megatron_mixln.config import ConfigError, load_config
from megatron_mixln.data.errors import DataError
from megatron_mixln.data.prepare import prepared_tokenizer
from megatron_mixln.model import IGNORE_INDEX, hidden_state
from megatron_mixln.saved_files import CheckpointError
from megatron_mixln.train.loop import train
from megatron_mixln.train.metrics import read_metrics
from megatron_mixln.train.step import loss_sum
from training_runs import run_processes, tiny

ROOT = Path(__file__).resolve().parent.parent
# The console script as setup.py declares it, without depending on the venv's entry points being regenerated.
ANALYZE = [sys.executable, "-c", "import sys; sys.argv[0] = 'mixln-analyze'; "
                                 "from megatron_mixln.cli import analyze_main; analyze_main()"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Pre-LN and Mix-LN with 4 layers, Post-LN with 6: three tiny 6-step runs on the same held-out text."""
    cache = tmp_path_factory.mktemp("cache")
    root = tmp_path_factory.mktemp("runs")
    shapes = {"pre": ["model.norm_placement=pre"], "mix": [],
              "post6": ["model.norm_placement=post", "model.num_layers=6"]}
    for name, extra in shapes.items():
        train(load_config(None, tiny(cache, root / name, *extra)))
    return {name: root / name for name in shapes}


def analyze(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*ANALYZE, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def padded(batch, keep: int):
    """The batch as document mode pads it: only the first `keep` positions are text (the last without a target)."""
    input_ids, labels = (t.clone() for t in batch)
    input_ids[:, keep:] = 0
    labels[:, keep - 1:] = IGNORE_INDEX
    return input_ids, labels


def reference_distances(model, batches_and_real_lengths) -> np.ndarray:
    """d(l, n) by running the stages one after the other here, in float64 numpy, over the first `length`
    positions of each sequence (its text)."""
    stages = model.stages()
    count = len(stages) - 2
    per_pair = [[[] for _ in range(count + 1)] for _ in range(count + 1)]
    with torch.no_grad():
        for (input_ids, _), length in batches_and_real_lengths:
            stream = stages[0](input_ids)
            states = [hidden_state(stream)]
            for layer in stages[1:-1]:
                stream = layer(stream)
                states.append(hidden_state(stream))
            states = [s[:, :length].reshape(-1, s.shape[-1]).double().numpy() for s in states]
            for i in range(count + 1):
                for j in range(i + 1, count + 1):
                    a, b = states[i], states[j]
                    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
                    per_pair[i][j].append(np.arccos(np.clip(cos, -1, 1)) / np.pi)
    expected = np.full((count, count), np.nan)
    for i in range(count):
        for j in range(i + 1, count + 1):
            expected[i, j - i - 1] = np.concatenate(per_pair[i][j]).mean()
    return expected


@pytest.mark.parametrize("name", ["mix", "post6"])
def test_angular_distances_equal_a_layer_by_layer_float64_computation(runs, name):
    run = analysis.find_run(runs[name])
    model = run.load_model()
    batches = analysis.held_out(run).batches
    seq_len = batches[0][0].shape[1]
    # Padding must not count: two batches cut to 9 and 20 positions of text.
    extra = [padded(batches[0], 9), padded(batches[1], 20)]
    distances = analysis.angular_distances(model, batches + extra)
    expected = reference_distances(model, [(b, seq_len) for b in batches] + [(extra[0], 9), (extra[1], 20)])

    count = run.config.model.num_layers
    assert distances.shape == (count, count)
    assert np.array_equal(np.isnan(distances), np.isnan(expected))  # exactly the pairs with l + n > L are NaN
    np.testing.assert_allclose(distances[:, 0], expected[:, 0], rtol=0, atol=1e-10)  # the n = 1 profile
    np.testing.assert_allclose(distances, expected, rtol=0, atol=1e-10)
    finite = distances[~np.isnan(distances)]
    assert ((finite > 0) & (finite <= 1)).all()
    # Angular distance is a metric on the sphere per token, so its token mean obeys the triangle inequality.
    for i in range(count):
        for j in range(i + 1, count):
            for k in range(j + 1, count + 1):
                assert distances[i, k - i - 1] <= distances[i, j - i - 1] + distances[j, k - j - 1] + 1e-12
    # Padding changes the answer, so the padded batches really were masked (not a vacuous agreement).
    unmasked = reference_distances(model, [(b, seq_len) for b in batches + extra])
    assert np.nanmax(np.abs(unmasked - distances)) > 1e-4


def test_removing_a_layer_equals_evaluating_a_model_without_it(runs):
    class Identity(torch.nn.Module):  # called as the layers are: with one tensor, or a (residual, pending) pair
        def forward(self, stream, pending=None):
            return stream if pending is None else (stream, pending)

    run = analysis.find_run(runs["mix"])
    model = run.load_model()
    held = analysis.held_out(run)
    tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in held.batches)
    entries = analysis.layer_removal(model, held.batches)

    full = float(loss_sum(model, held.batches, torch.device("cpu"))) / tokens
    logged = [r["eval_loss"] for r in read_metrics(run.metrics_path) if "eval_loss" in r][-1]
    assert full == pytest.approx(logged, rel=1e-6)  # the run's own final evaluation of the same sequences
    assert [e["layer"] for e in entries] == [0, 1, 2, 3]
    assert [e["placement"] for e in entries] == ["post", "post", "pre", "pre"]
    for entry in entries:
        without = copy.deepcopy(model)
        without.model.layers[entry["layer"]] = Identity()
        expected = float(loss_sum(without, held.batches, torch.device("cpu"))) / tokens
        assert entry["loss"] == pytest.approx(expected, rel=1e-6)
        assert entry["full_loss"] == pytest.approx(full, rel=1e-7)
        assert entry["loss_increase"] == pytest.approx(expected - full, abs=1e-6)
        assert entry["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)
        assert entry["perplexity_increase"] == pytest.approx(math.exp(expected) - math.exp(full), rel=1e-4)
        assert abs(entry["loss_increase"]) > 1e-4  # every layer of the trained model does something
    # The hooks were removed: the model is whole again.
    assert float(loss_sum(model, held.batches, torch.device("cpu"))) / tokens == pytest.approx(full, rel=1e-7)


def test_gradient_norms_by_depth_read_back_what_metrics_jsonl_holds(runs):
    path = runs["post6"] / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    logged = {r["step"]: r["layer_grad_norms"] for r in records if "layer_grad_norms" in r}
    norms = analysis.gradient_norms_by_depth(path)

    assert norms.steps == sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert norms.layers == [f"layer_{i:03d}" for i in range(6)]
    for j, step in enumerate(norms.steps):
        for i, key in enumerate(norms.layers):
            assert norms.norms[i, j] == logged[step][key]
        for key in ("embed_tokens", "norm", "lm_head"):
            assert norms.other[key][j] == logged[step][key]
    assert norms.chosen[0] == 1 and norms.chosen[-1] == 6 and len(norms.chosen) <= 5
    assert list(norms.at(4)) == [logged[4][key] for key in norms.layers]
    assert analysis.gradient_norms_by_depth(path, [2, 5]).chosen == [2, 5]
    with pytest.raises(DataError, match="no per-layer gradient norms at step 7"):
        analysis.gradient_norms_by_depth(path, [2, 7])


def test_a_checkpoint_folder_and_a_run_folder_read_the_same_weights(runs):
    from_run = analysis.find_run(runs["mix"])
    [step_folder] = (runs["mix"] / "checkpoints").glob("step_*")
    from_checkpoint = analysis.find_run(step_folder)
    assert (from_run.kind, from_checkpoint.kind) == ("export", "checkpoint")
    assert from_checkpoint.run_dir == runs["mix"] and from_checkpoint.step == 6
    a, b = from_run.load_model().state_dict(), from_checkpoint.load_model().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="does not exist"):
        analysis.find_run(runs["mix"] / "nope")


def test_an_export_older_than_the_latest_checkpoint_is_said_so(runs, tmp_path):
    import shutil

    copy_ = shutil.copytree(runs["mix"], tmp_path / "resumed")
    assert analysis.find_run(copy_).notes == []
    config = json.loads((copy_ / "export" / "config.json").read_text())
    (copy_ / "export" / "config.json").write_text(json.dumps({**config, "step": 3}))  # as after stop_after_step=3
    run = analysis.find_run(copy_)
    assert run.kind == "export" and run.step == 3
    [note] = run.notes
    assert "export is from step 3 but its latest checkpoint is from step 6" in note
    (copy_ / "export" / "config.json").unlink()  # no export at all: the latest checkpoint
    assert (analysis.find_run(copy_).kind, analysis.find_run(copy_).step) == ("checkpoint", 6)


def test_data_source_is_encoded_with_the_runs_own_tokenizer(runs, tmp_path):
    text = tmp_path / "held_out.jsonl"
    documents = [f"The river number {i} flows through the old town and into the sea near the harbour."
                 for i in range(12)]
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    run = analysis.find_run(runs["pre"])
    held = analysis.held_out(run, data=str(text))
    tokenizer = prepared_tokenizer(run.data_meta["folder"])  # the BPE the run trained on its own text
    stream = [token for d in documents for token in tokenizer.encode(d) + [tokenizer.eos_id]]
    seq_len = run.config.data.seq_len
    assert held.split == "all" and held.source == str(text)  # every document of the file, none held back
    assert held.available == (len(stream) - 1) // seq_len  # packed windows of the whole file
    assert held.sequences == run.config.train.eval_sequences  # the run's own evaluation size by default
    assert held.batches[0][0][0].tolist() == stream[:seq_len]


def test_the_command_writes_figures_numbers_and_report_that_match_the_library(runs, tmp_path):
    out = tmp_path / "analysis"
    proc = analyze(runs["pre"], runs["mix"], runs["post6"], "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "without layer 3 (pre)" in proc.stdout and "\r" not in proc.stdout  # plain lines when not a TTY
    numbers = json.loads((out / "analysis.json").read_text())
    report = (out / "report.md").read_text()

    import matplotlib.image

    assert len(numbers["figures"]) == 6
    for file in numbers["figures"].values():
        assert f"]({file})" in report
        image = matplotlib.image.imread(out / file)
        assert image.shape[0] > 300 and image.shape[1] > 500 and image[..., :3].std() > 0.05
    # post6 has 6 layers and the others 4: depth profiles over relative depth, removal bars in panels, said once each.
    notes = numbers["notes"]
    assert sum("relative depth" in note for note in notes) == 2 and sum("panel" in note for note in notes) == 1
    assert all(f"- {note}" in report for note in notes)
    # Mix-LN and Post-LN have Post-LN layers: the report says what removing one also removes; Pre-LN alone has none.
    sentence = "removing a Post-LN layer also removes its normalisation"
    assert report.count(sentence) == 1
    pre_only = {**numbers, "runs": [r for r in numbers["runs"] if r["name"] == "pre"]}
    assert sentence not in analysis.markdown(pre_only)

    by_name = {r["name"]: r for r in numbers["runs"]}
    assert set(by_name) == {"pre", "mix", "post6"}
    for name, folder in runs.items():
        saved = by_name[name]
        run = analysis.find_run(folder)
        model = run.load_model()
        batches = analysis.held_out(run).batches
        distances = analysis.angular_distances(model, batches)
        count = run.config.model.num_layers
        assert saved["angular_distance"]["n1"] == pytest.approx(list(distances[:, 0]), abs=1e-12)
        for layer, row in enumerate(saved["angular_distance"]["by_layer_and_span"]):
            assert row == pytest.approx(list(distances[layer, :count - layer]), abs=1e-12)
        removal = analysis.layer_removal(model, batches)
        assert [e["loss"] for e in saved["layer_removal"]["layers"]] == pytest.approx([e["loss"] for e in removal],
                                                                                      rel=1e-9)
        assert saved["layer_removal"]["full"]["loss"] == pytest.approx(removal[0]["full_loss"], rel=1e-9)
        assert f"| {saved['layer_removal']['full']['loss']:.4f} |" in report
        grads = analysis.gradient_norms_by_depth(run.metrics_path)
        assert saved["gradient_norms"]["steps"] == grads.steps
        assert saved["gradient_norms"]["norms"] == grads.norms.tolist()
        assert saved["gradient_norms"]["chosen_steps"] == grads.chosen
        assert saved["placement"] == run.placement and saved["label"] == run.label
        eval_losses = [r["eval_loss"] for r in read_metrics(folder / "metrics.jsonl") if "eval_loss" in r]
        assert [point[1] for point in saved["loss_curves"]["eval"]] == eval_losses


# ------------------------------------------------------------------------------------------------ figures
@pytest.fixture(scope="module")
def analysed(runs):
    """The three runs measured on one held-out sequence each: enough to draw every figure."""
    return analysis.analyse([runs["pre"], runs["mix"], runs["post6"]], sequences=1, device="cpu", progress=False)


def test_an_hf_export_measures_what_its_run_folder_does(runs, analysed, tmp_path):
    from megatron_mixln.hf_interop import export_hf
    from megatron_mixln.model.hf_format import RUN_RECORD

    hf = export_hf(runs["mix"], tmp_path / "hf").out  # what `mixln-export RUN OUT --hf` writes
    [from_hf] = analysis.analyse([hf], sequences=1, device="cpu", progress=False)
    [from_run] = [a for a in analysed if a.run.name == "mix"]
    run = from_hf.run
    assert (run.kind, run.step, run.run_dir, run.label) == ("hf export", 6, runs["mix"], from_run.label)
    assert from_hf.held_out.describe() == from_run.held_out.describe()  # the run's own held-out text, via mixln_run
    # The same fp32 weights through another reader: the measures agree to rounding.
    np.testing.assert_allclose(from_hf.angular, from_run.angular, rtol=0, atol=1e-6)
    assert [e["loss"] for e in from_hf.removal] == pytest.approx([e["loss"] for e in from_run.removal], rel=1e-6)
    assert from_hf.removal[0]["full_loss"] == pytest.approx(from_run.removal[0]["full_loss"], rel=1e-6)
    # A transformers folder without the run's record (a LLaMA from elsewhere) has no held-out data to name.
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != RUN_RECORD}))
    with pytest.raises(CheckpointError, match=r"hf keeps no run config \(the run's data and sequence length\)"):
        analysis.find_run(hf)


@pytest.fixture
def figure():
    """Calls a figures.plot_* function, draws its figure (tick labels exist only then) and closes it afterwards."""
    import matplotlib.pyplot as plt

    drawn = []

    def draw(plot, analyses):
        fig, _ = plot(analyses)
        fig.canvas.draw()
        drawn.append(fig)
        return fig

    yield draw
    for fig in drawn:
        plt.close(fig)


def legend_texts(fig) -> list[str]:
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    return [text.get_text() for legend in legends for text in legend.get_texts()]


def shown_ticks(ax, axis: str) -> list[tuple[float, str]]:
    """(position, label text) of the major ticks inside the axis' view limits."""
    which = ax.xaxis if axis == "x" else ax.yaxis
    low, high = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    return [(tick, label.get_text()) for tick, label in zip(which.get_majorticklocs(), which.get_majorticklabels())
            if low <= tick <= high]


def test_legends_name_placement_alpha_and_seed_not_the_folder(analysed, figure):
    from megatron_mixln.analysis import figures

    expected = {"pre": "Pre-LN, seed 7", "mix": "Mix-LN (α=0.5), seed 7", "post6": "Post-LN, seed 7"}
    assert [a.label for a in analysed] == [expected[a.run.name] for a in analysed]
    same_depth = analysed[:2]
    for plot, shown in [(figures.plot_loss_curves, analysed), (figures.plot_angular_profile, analysed),
                        (figures.plot_layer_removal, same_depth), (figures.plot_gradient_profiles, analysed)]:
        texts = legend_texts(figure(plot, shown))
        for a in shown:
            assert any(text.startswith(a.label) for text in texts), (plot.__name__, texts)
        assert not any(a.run.name in text for a in shown for text in texts), (plot.__name__, texts)


def test_labels_replace_the_default_names_and_repeated_defaults_are_told_apart(runs, figure):
    from megatron_mixln.analysis import figures

    [step_folder] = (runs["mix"] / "checkpoints").glob("step_*")
    default = analysis.analyse([runs["mix"], step_folder], sequences=1, device="cpu", progress=False)
    # Same placement, alpha and seed: each default name also carries the run's own name.
    assert [a.label for a in default] == ["Mix-LN (α=0.5), seed 7 (mix)", "Mix-LN (α=0.5), seed 7 (mix@step_6)"]
    named = analysis.analyse([runs["mix"], step_folder], sequences=1, device="cpu", progress=False,
                             labels=["Mix-LN final", "Mix-LN checkpoint"])
    assert legend_texts(figure(figures.plot_angular_profile, named)) == ["Mix-LN final", "Mix-LN checkpoint"]
    with pytest.raises(ConfigError, match="expected 2 non-empty labels"):
        analysis.analyse([runs["mix"], step_folder], labels=["Mix-LN", ""])


def test_layer_axes_have_integer_tick_labels(analysed, figure):
    from megatron_mixln.analysis import figures

    same_depth = analysed[:2]  # over layers; runs of different depths are drawn over relative depth instead
    layer_axes = [(figure(figures.plot_angular_profile, same_depth).axes, "x"),
                  (figure(figures.plot_layer_removal, same_depth).axes, "x"),
                  (figure(figures.plot_layer_removal, analysed).axes, "x"),
                  (figure(figures.plot_gradient_profiles, same_depth).axes, "x"),
                  (figure(figures.plot_gradient_maps, analysed).axes[:3], "y"),
                  (figure(figures.plot_angular_maps, analysed).axes[:3], "x")]
    for axes, axis in layer_axes:
        for ax in axes:
            if not ax.get_visible():
                continue
            ticks = shown_ticks(ax, axis)
            assert len(ticks) >= 3, ticks
            assert all(tick == round(tick) and label == str(round(tick)) for tick, label in ticks), ticks


def test_gradient_profile_panels_share_one_y_scale_one_legend_and_a_title(analysed, figure):
    from megatron_mixln.analysis import figures

    fig = figure(figures.plot_gradient_profiles, analysed)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == len(analysed[0].gradients.chosen) > 1
    assert len({ax.get_ylim() for ax in panels}) == 1
    # The shared scale spans every panel's data, not just the first one's.
    low, high = panels[0].get_ylim()
    values = np.concatenate([a.gradients.at(step) for a in analysed for step in a.gradients.chosen])
    assert low <= values.min() and values.max() <= high
    assert [ax.get_legend() for ax in panels] == [None] * len(panels)
    assert len(fig.legends) == 1 and legend_texts(fig) == [a.label for a in analysed]
    assert fig.get_suptitle()


def test_heat_map_ticks_fall_on_logged_steps(runs, analysed, figure):
    from megatron_mixln.analysis import figures
    from megatron_mixln.analysis.report import RunAnalysis

    # Uneven logging, as a resumed run or a changed train.layer_grad_norm_every gives.
    steps = [3, 10, 17, 24, 50, 51, 120, 250, 333]
    norms = np.random.default_rng(0).uniform(0.01, 1.0, size=(4, len(steps)))
    uneven = RunAnalysis(run=analysis.find_run(runs["mix"]), colour="C0", label="uneven",
                         gradients=analysis.GradientNorms(steps=steps, layers=[f"layer_{i:03d}" for i in range(4)],
                                                          norms=norms))
    for shown in ([uneven], analysed):
        fig = figure(figures.plot_gradient_maps, shown)
        for ax, a in zip(fig.axes, shown):
            ticks = shown_ticks(ax, "x")
            assert len(ticks) >= 3, ticks
            assert {tick for tick, _ in ticks} <= set(a.gradients.steps)
            assert all(label == str(round(tick)) for tick, label in ticks)


def test_post_ln_layers_are_hatched_exactly_where_norm_placement_says(analysed, figure):
    from megatron_mixln.analysis import figures
    from megatron_mixln.model.norms import norm_placement

    def expected(a):
        model = a.run.config.model
        return [norm_placement(i, model.num_layers, model) in ("post", "deepnorm") for i in range(model.num_layers)]

    for shown in (analysed, analysed[:2]):  # one panel per run (depths differ), grouped bars (same depth)
        fig = figure(figures.plot_layer_removal, shown)
        containers = [container for ax in fig.axes for container in ax.containers]
        assert len(containers) == len(shown)
        for container, a in zip(containers, shown):
            assert [bool(bar.get_hatch()) for bar in container] == expected(a)
        assert sum("Post-LN layer" in text for text in legend_texts(fig)) == 1
    # The runs hold hatched and plain bars both: the check above could fail either way.
    assert expected(analysed[1]) == [True, True, False, False] and not any(expected(analysed[0]))


@pytest.mark.parametrize("case", ["missing run", "not a run", "empty data", "unlogged step", "no gpu",
                                  "bad steps", "label count"])
def test_bad_inputs_are_one_error_line_and_leave_the_output_alone(runs, tmp_path, case):
    if case == "no gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "config.json").write_text('{"lr": 0.001}')  # a config.json, but of no model
    args = {"missing run": [runs["pre"], tmp_path / "no_such_run"],
            "not a run": [runs["pre"], tmp_path / "notes"],
            "empty data": [runs["pre"], "--data", empty],
            "unlogged step": [runs["pre"], runs["mix"], "--steps", "2,60"],
            "no gpu": [runs["pre"], "--device", "cuda"],
            "bad steps": [runs["pre"], "--steps", "two"],
            "label count": [runs["pre"], runs["mix"], "--labels", "Pre-LN baseline"]}[case]
    proc = analyze(*args, "--out", out, "--force")  # even --force replaces nothing when the analysis fails
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    if case == "bad steps":  # argparse's own usage error
        assert "is not a comma-separated list of steps" in proc.stderr
    else:
        [line] = error_lines(proc.stderr)
        expected = {"missing run": "no_such_run does not exist",
                    "not a run": "notes is not a run folder, an export folder (mixln-export, with or without --hf) "
                                 "or a checkpoint folder",
                    "empty data": "empty.txt' is empty",
                    "unlogged step": "no per-layer gradient norms at step 60", "no gpu": "no CUDA device",
                    "label count": "--labels 'Pre-LN baseline' is invalid: expected 2 non-empty labels"}[case]
        assert expected in line and line.count(". ") == 0, line
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_help_needs_no_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", *ANALYZE[1:], "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: mixln-analyze ")
    for option in ("RUN", "--out", "--data", "--sequences", "--steps", "--device", "--labels"):
        assert option in proc.stdout
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:") and line.count("|") == 2}
    assert "megatron_mixln" in imported and not imported & {"torch", "deepspeed", "matplotlib", "datasets"}


@pytest.mark.slow
def test_a_tensor_parallel_run_reads_the_same_through_its_export_and_its_checkpoint(runs, tmp_path):
    cache = Path(analysis.find_run(runs["mix"]).config.data.cache_dir)
    ranks = run_processes(2, tiny(cache, tmp_path / "tp2", "parallel.tp=2"), tmp_path)
    assert all("error" not in rank for rank in ranks), ranks
    exported = analysis.find_run(tmp_path / "tp2")
    [step_folder] = (tmp_path / "tp2" / "checkpoints").glob("step_*")
    checkpoint = analysis.find_run(step_folder)
    batches = analysis.held_out(exported).batches
    a, b = exported.load_model(), checkpoint.load_model()
    np.testing.assert_array_equal(analysis.angular_distances(a, batches), analysis.angular_distances(b, batches))
    removal = analysis.layer_removal(b, batches)
    logged = [r["eval_loss"] for r in read_metrics(tmp_path / "tp2" / "metrics.jsonl") if "eval_loss" in r][-1]
    assert removal[0]["full_loss"] == pytest.approx(logged, rel=1e-6)
    # Same seed and data as the single-process Mix-LN run: the layout changes nothing the analysis sees.
    single = analysis.layer_removal(analysis.find_run(runs["mix"]).load_model(), batches)
    assert [e["loss"] for e in removal] == pytest.approx([e["loss"] for e in single], rel=1e-4)
