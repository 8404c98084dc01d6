"""Downstream evaluation inside training (train.downstream_*): each request's summed log-probability and greedy
match (model.llama.row_scores) against a float64 log-softmax by hand, and StepEngine.score_rows in TP2, PP2 and
DP2 ZeRO-3 equal to one process on every rank."""
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_mixln.config import load_config
from megatron_mixln.model import IGNORE_INDEX
from megatron_mixln.model.llama import MixLNForCausalLM, row_scores
from training_runs import MODEL, run_gloo_workers, tiny, train_one_after_another

OVERRIDES = [*MODEL, "data.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=4",
             "parallel.zero_stage=0", "train.seed=11", "model.init_std=0.2"]
LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"], "dp2-zero3": ["parallel.zero_stage=3"]}


def request_batches(config, count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` micro-batches of requests: a context whose positions have no target, then a continuation of 1 to 6
    tokens; row 0 of the first batch repeats the model's own greedy choice (filled in by `greedy_row`)."""
    generator = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(count):
        rows, seq = config.train.micro_batch_size, config.data.seq_len
        inputs = torch.randint(0, config.model.vocab_size, (rows, seq), generator=generator)
        labels = torch.full((rows, seq), IGNORE_INDEX)
        for row in range(rows):
            start = int(torch.randint(1, seq - 8, (1,), generator=generator))
            length = int(torch.randint(1, 7, (1,), generator=generator))
            labels[row, start - 1:start - 1 + length] = inputs[row, start:start + length]
        batches.append((inputs, labels))
    return batches


def greedy_row(model, batches) -> None:
    """Make row 0 of the first batch a greedy continuation of its context (so some rows are greedy)."""
    inputs, labels = batches[0]
    positions = (labels[0] != IGNORE_INDEX).nonzero().flatten().tolist()
    with torch.no_grad():
        for position in positions:
            choice = int(model(inputs[:1])[0, position].argmax())
            labels[0, position] = choice
            if position + 1 < inputs.shape[1]:
                inputs[0, position + 1] = choice


def by_hand(model, inputs, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 log-softmax over the whole vocabulary, summed at the targets; greedy = every target is the arg-max."""
    with torch.no_grad():
        logits = model.double()(inputs).double()
    model.float()
    logprobs = torch.log_softmax(logits, -1)
    keep = labels != IGNORE_INDEX
    picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    greedy = ((logits.argmax(-1) == labels) | ~keep).all(-1)
    return (picked * keep).sum(-1), greedy


@pytest.mark.parametrize("fused", [False, True])
def test_row_scores_are_the_float64_log_probabilities_and_greedy_matches(fused):
    config = load_config(None, [*OVERRIDES, f"model.fused_cross_entropy={str(fused).lower()}"])
    model = initialised_model(config)
    batches = request_batches(config)
    greedy_row(model, batches)
    heads = [model.lm_head]
    for inputs, labels in batches:
        expected, expected_greedy = by_hand(model, inputs, labels)
        heads[0].row_scores = []
        with torch.no_grad():
            total = model(inputs, labels)
        recorded = heads[0].row_scores[0]
        heads[0].row_scores = None
        assert torch.allclose(recorded[:, 0], expected, rtol=0, atol=1e-5), (recorded[:, 0], expected)
        assert torch.equal(recorded[:, 1].bool(), expected_greedy)
        assert float(total) == pytest.approx(-float(expected.sum()), abs=1e-4)  # the loss is unchanged by recording
        direct = row_scores(model(inputs).detach(), labels)
        assert torch.equal(direct, recorded)
    assert bool(by_hand(model, *batches[0])[1][0])  # the greedy row is one, so the check above can fail


def initialised_model(config) -> MixLNForCausalLM:
    from megatron_mixln.train.engine import build_layout, build_training_model, init_distributed

    init_distributed()  # one process: the layout's groups
    return build_training_model(config, build_layout(config)).eval()


def score_in_layout(config) -> torch.Tensor:
    from megatron_mixln.train.engine import build_engine, build_layout, build_training_model, init_distributed
    from megatron_mixln.train.step import make_step_engine

    init_distributed()
    layout = build_layout(config)
    engine, _, _ = build_engine(build_training_model(config, layout), config, layout)
    steps = make_step_engine(engine, config, layout)
    batches = request_batches(config)
    return steps.score_rows(batches)


@pytest.fixture(scope="module")
def single():
    return score_in_layout(load_config(None, OVERRIDES))


def test_score_rows_in_one_process_is_row_scores_of_the_model(single):
    config = load_config(None, OVERRIDES)
    model = initialised_model(config)
    expected = torch.cat([row_scores(model(inputs).detach(), labels) for inputs, labels in request_batches(config)])
    assert single.shape == (6, 2)
    assert torch.allclose(single, expected, rtol=0, atol=1e-6)


def _layout_worker(rank, world, store_path, result_path):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False, auto_mpi_discovery=False)
    scores = {name: score_in_layout(load_config(None, [*OVERRIDES, *overrides])) for name, overrides in LAYOUTS.items()}
    torch.save(scores, f"{result_path}.{rank}")
    dist.destroy_process_group()


def test_tp2_pp2_and_zero3_dp2_score_every_row_as_one_process_on_every_rank(single, tmp_path):
    # 3 micro-batches over 2 DP ranks: one rank runs a zero-weight padding batch, which must add no row.
    for rank, scores in enumerate(run_gloo_workers(_layout_worker, 2, tmp_path)):
        for layout, rows in scores.items():
            assert torch.allclose(rows[:, 0], single[:, 0], rtol=1e-5, atol=1e-5), (layout, rank, rows, single)
            assert torch.equal(rows[:, 1], single[:, 1]), (layout, rank)


# ------------------------------------------------------------------------------------------------ in the loop
TASKS_DIR = Path(__file__).resolve().parent.parent / "megatron_mixln" / "harness" / "tasks"
TASKS = f"{TASKS_DIR / 'mixln_tiny_mc.yaml'},{TASKS_DIR / 'mixln_tiny_ppl.yaml'}"
IN_LOOP = [f"train.downstream_tasks={TASKS}", "train.downstream_every=3", "train.downstream_limit=12"]


def downstream_records(out) -> dict[int, dict]:
    from megatron_mixln.train.metrics import read_metrics

    return {r["step"]: r for r in read_metrics(Path(out) / "metrics.jsonl") if "downstream" in r}


@pytest.fixture(scope="module")
def in_loop_runs(tmp_path_factory):
    """The tiny run with the two shipped tasks scored every 3 steps, and the same run without them."""
    from megatron_mixln.train.loop import train

    root = tmp_path_factory.mktemp("in_loop")
    scored = train(load_config(None, tiny(root / "cache", root / "scored", *IN_LOOP)))
    plain = train(load_config(None, tiny(root / "cache", root / "plain")))
    return root, scored, plain


def test_in_loop_scores_are_mixln_eval_on_the_export_and_change_no_training_step(in_loop_runs, capsys):
    from megatron_mixln.harness.command import evaluate_source

    root, scored, plain = in_loop_runs
    assert scored.losses == plain.losses  # bit for bit: the evaluation draws nothing from training's generators
    records = downstream_records(root / "scored")
    assert sorted(records) == [3, 6]
    for record in records.values():
        assert record["downstream_seconds"] > 0
        assert set(record["downstream"]) >= {"mixln_tiny_mc/acc", "mixln_tiny_mc/acc_norm",
                                             "mixln_tiny_ppl/word_perplexity", "mixln_tiny_ppl/bits_per_byte"}
    assert records[3]["downstream"] != records[6]["downstream"]  # the weights moved in between
    standalone = evaluate_source(root / "scored", TASKS.split(","), limit=12, out=root / "standalone")
    for name, value in records[6]["downstream"].items():
        task, _, metric = name.partition("/")
        assert standalone.results["results"][task][f"{metric},none"] == pytest.approx(value, rel=1e-6), name


def test_tp2_and_pp2_score_in_the_loop_as_one_process(in_loop_runs, tmp_path):
    root, _, _ = in_loop_runs
    expected = downstream_records(root / "scored")
    # Scored at the end only (downstream_every=0): the step-6 record against one process's.
    runs = [tiny(root / "cache", tmp_path / name, *IN_LOOP, "train.downstream_every=0", override)
            for name, override in (("tp2", "parallel.tp=2"), ("pp2", "parallel.pp=2"))]
    # Under NCCL's device rule, emulated: every collective of the scoring path on the device the group serves.
    for name, ranks in zip(("tp2", "pp2"), train_one_after_another(2, runs, tmp_path, emulate_nccl=True)):
        assert all("error" not in rank for rank in ranks), (name, ranks)
        if name == "tp2":  # row_scores' MAX and SUM over the TP group ran, and on the served device
            assert any(where.endswith("llama.py") for rank in ranks for _, _, where in rank["collectives"])
        records = downstream_records(tmp_path / name)
        assert sorted(records) == [6], name
        for step, record in records.items():
            for metric, value in expected[step]["downstream"].items():
                assert record["downstream"][metric] == pytest.approx(value, rel=1e-4), (name, step, metric)


def test_a_task_file_that_does_not_exist_stops_the_run_before_its_first_step(tmp_path):
    from megatron_mixln.data.errors import DataError
    from megatron_mixln.train.loop import train

    missing = tmp_path / "no_such_task.yaml"
    with pytest.raises(DataError, match="no_such_task.yaml"):
        train(load_config(None, tiny(tmp_path / "cache", tmp_path / "run", f"train.downstream_tasks={missing}")))
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or "loss" not in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_a_generation_task_is_refused_before_the_first_step(tmp_path):
    from megatron_mixln.data.errors import DataError
    from megatron_mixln.train.loop import train

    (tmp_path / "echo.jsonl").write_text('{"prompt": "Say yes:", "answer": " yes"}\n')
    (tmp_path / "echo.yaml").write_text(
        "task: mixln_echo\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: echo.jsonl\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: prompt\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: ['\\n']\nmetric_list:\n  - metric: exact_match\n")
    tasks = f"{TASKS_DIR / 'mixln_tiny_mc.yaml'},{tmp_path / 'echo.yaml'}"
    with pytest.raises(DataError, match="mixln_echo generate text.*mixln-eval on a checkpoint"):
        train(load_config(None, tiny(tmp_path / "cache", tmp_path / "run", f"train.downstream_tasks={tasks}")))


def test_analyze_plots_each_score_against_step_for_every_run():
    from types import SimpleNamespace

    from megatron_mixln.analysis import figures
    from megatron_mixln.analysis.report import markdown

    runs = [SimpleNamespace(label="pre", colour="C0", downstream={"mc/acc": [(3, 0.25), (6, 0.5)]}),
            SimpleNamespace(label="mix", colour="C1", downstream={"mc/acc": [(3, 0.3), (6, 0.55)],
                                                                  "ppl/word_perplexity": [(6, 90.0)]}),
            SimpleNamespace(label="none", colour="C2", downstream={})]
    fig, notes = figures.plot_downstream(runs)
    panels = {ax.get_title(): {line.get_label(): list(zip(*line.get_data())) for line in ax.get_lines()}
              for ax in fig.axes if ax.get_visible()}
    assert panels["mc/acc"] == {"pre": [(3, 0.25), (6, 0.5)], "mix": [(3, 0.3), (6, 0.55)]}
    assert panels["ppl/word_perplexity"] == {"mix": [(6, 90.0)]}
    assert notes == ["downstream scores: none logged none (train.downstream_tasks), so it is left out."]
    run = {"name": "mix", "label": "mix", "placement": "mix", "num_layers": 4, "kind": "run", "step": 6,
           "layer_placements": None,
           "downstream": {"mc/acc": [[3, 0.3], [6, 0.55]]}}
    text = markdown({"runs": [run],
                     "figures": {"downstream": "downstream_scores.png"}, "settings": {}, "notes": []})
    assert "| mc/acc | 0.3000 | 0.5500 |" in text and "downstream_scores.png" in text
