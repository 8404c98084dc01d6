"""Downstream evaluation during training (train.downstream_tasks, docs/evaluation.md): lm-eval's tasks scored by
the training engine itself, in the run's own TP/PP/DP/ZeRO layout.

Every rank runs the same lm-eval evaluation on the same requests (lm-eval sees one process); the requests are
scored by `StepEngine.score_rows`, which shares the micro-batches among the DP ranks, runs them through the
engine's evaluation forward (pipeline stages, tensor-parallel shards, ZeRO-3 gathers as for any forward) and hands
every row's log-probability to every rank. Nothing is gathered beyond what one stage holds. Only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from megatron_mixln.data.errors import DataError
from megatron_mixln.data.sampling import IGNORE_INDEX

REQUEST_BATCHES = 8  # micro-batches per DP rank in one scoring call: fewer collectives, a fuller pipeline


class EngineScorer:
    """The harness LM's `score_batch` over a training StepEngine: rows padded to the training micro-batch shape
    ([micro_batch_size, seq_len], what the pipeline was built for), scored in the engine's layout."""

    def __init__(self, steps, rows: int, seq_len: int, pad_id: int):
        self.steps, self.rows, self.seq_len, self.pad_id = steps, rows, seq_len, pad_id

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count, width = input_ids.shape
        if width > self.seq_len:
            raise ValueError(f"a request of {width} positions is longer than data.seq_len={self.seq_len}")
        padded_rows = -(-count // self.rows) * self.rows
        # Host batches, as training's: the engine's forward moves them to the device.
        inputs = torch.full((padded_rows, self.seq_len), self.pad_id, dtype=torch.long, device="cpu")
        targets = torch.full((padded_rows, self.seq_len), IGNORE_INDEX, dtype=torch.long, device="cpu")
        inputs[:count, :width], targets[:count, :width] = input_ids, labels
        batches = [(inputs[i:i + self.rows], targets[i:i + self.rows]) for i in range(0, padded_rows, self.rows)]
        scores = self.steps.score_rows(batches)[:count]
        return scores[:, 0], scores[:, 1].bool()


@contextlib.contextmanager
def _random_state_kept():
    """lm-eval seeds Python's, numpy's and torch's generators; training's own draws must not notice."""
    python, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.random.set_rng_state(torch_state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def metric_values(results: dict) -> dict[str, float]:
    """`task/metric` -> value from lm-eval's results (standard errors and sample counts left out; a filter other
    than `none` kept in the name, e.g. `gsm8k/exact_match_strict-match`)."""
    values = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name, _, filter_name = key.partition(",")
            if "_stderr" in name or name == "sample_len" or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                continue
            values[f"{task}/{name}" + (f"-{filter_name}" if filter_name and filter_name != "none" else "")] = value
    return values


@dataclass
class DownstreamEvaluator:
    """What train.downstream_* asks for, built once before the first step (a wrong task name stops the run at
    once, before any training)."""

    lm: object  # harness.lm.MixLNLM over an EngineScorer
    tasks: list  # lm-eval Task / Group objects
    limit: int | None
    num_fewshot: int | None

    @classmethod
    def build(cls, config, steps, layout, meta: dict, is_main: bool) -> "DownstreamEvaluator | None":
        tcfg = config.train
        if not tcfg.downstream_tasks.strip():
            return None
        from megatron_mixln.harness.command import resolve_tasks
        from megatron_mixln.harness.lm import MixLNLM, data_tokenizer

        if not is_main:  # lm-eval logs its progress on every process; one copy is enough
            logging.getLogger("lm_eval").setLevel(logging.WARNING)
        tasks = resolve_tasks(tcfg.downstream_tasks.split(","))
        leaves = [leaf for task in tasks
                  for leaf in (task.get_all_tasks() if hasattr(task, "get_all_tasks") else [task])]  # groups' tasks
        generating = sorted({leaf.config.task for leaf in leaves if leaf.OUTPUT_TYPE == "generate_until"})
        if generating:
            raise DataError(f"train.downstream_tasks: {', '.join(generating)} generate text, which the training "
                            "engine's scorer cannot do (it scores log-likelihoods): leave them out here and run "
                            "mixln-eval on a checkpoint for them.")
        scorer = EngineScorer(steps, tcfg.micro_batch_size, config.data.seq_len, meta["pad_id"])
        lm = MixLNLM(scorer, data_tokenizer(meta, config.model.vocab_size), config.data.seq_len,
                     batch_size=tcfg.micro_batch_size * layout.dp * REQUEST_BATCHES, disable_tqdm=True)
        return cls(lm, tasks, tcfg.downstream_limit or None, tcfg.downstream_num_fewshot or None)

    def __call__(self, step: int) -> dict:
        """Score the tasks at `step` (collective: every rank calls it); the metrics record for metrics.jsonl."""
        from megatron_mixln.harness.command import simple_evaluate

        started = time.perf_counter()
        with _random_state_kept():
            results = simple_evaluate(self.lm, self.tasks, limit=self.limit, num_fewshot=self.num_fewshot,
                                      bootstrap_iters=0)
        return {"step": step, "downstream": metric_values(results),
                "downstream_seconds": time.perf_counter() - started}


def downstream_line(record: dict) -> str:
    """The console line of a downstream record."""
    scores = ", ".join(f"{name} {value:.4f}" for name, value in record["downstream"].items())
    return f"downstream: step {record['step']}: {scores} ({record['downstream_seconds']:.1f} s)"
