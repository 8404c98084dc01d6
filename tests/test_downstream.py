"""Downstream evaluation inside training (train.downstream_*): each request's summed log-probability and greedy
match (model.llama.row_scores) against a float64 log-softmax by hand, and StepEngine.score_rows in TP2, PP2 and
DP2 ZeRO-3 equal to one process on every rank."""
import os

import pytest
import torch
import torch.distributed as dist

from megatron_mixln.config import load_config
from megatron_mixln.model import IGNORE_INDEX
from megatron_mixln.model.llama import MixLNForCausalLM, row_scores
from training_runs import MODEL, run_gloo_workers

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
