"""Per-layer torch.compile (train.compile) with every placement and kernels backend, on CPU.

- Graph breaks: dynamo captures each decoder layer as one graph with no break, for every placement, with the
  torch kernels and with the Triton kernels (custom ops `mixln::*`, run by Triton's interpreter here), with the
  (residual, pending) pair handed over between layers and the rotary table built inside the graph.
- Numerics: inductor-compiled layers against eager, losses and every gradient within rel 1e-5 in fp32.
- A training run with train.compile=true gives the eager run's losses (tests/test_parallel.py runs it under
  TP, PP and ZeRO-3 with the fused cross-entropy).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo

from megatron_mixln import ModelConfig
from megatron_mixln.config import NORM_PLACEMENTS
from megatron_mixln.model import build_model
from megatron_mixln.model.llama import compile_decoder_layers

ROOT = Path(__file__).resolve().parent.parent


def _config(placement: str, kernels: str, layers: int = 4) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=layers, num_heads=4,
                       norm_placement=placement, kernels=kernels, mix_alpha=0.5)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("placement", NORM_PLACEMENTS)
def test_each_layer_is_one_graph_without_breaks(placement, kernels):
    model = build_model(_config(placement, kernels))
    stream = model.embedding(torch.randint(0, 64, (2, 8)))
    kinds = set()
    for layer in model.model.layers:
        dynamo.reset()
        explained = dynamo.explain(layer.forward)(stream)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (
            layer.layer_index, layer.placement, [str(reason.reason) for reason in explained.break_reasons])
        code = explained.graphs[0].code
        if kernels == "triton":  # the fused kernels are nodes of the graph, not breaks around it
            assert "torch.ops.mixln.add_rms_norm" in code or "torch.ops.mixln.rms_norm" in code
            assert "torch.ops.mixln.swiglu" in code
        else:
            assert "mixln" not in code
        kinds.add((layer.placement, isinstance(stream, tuple)))
        stream = layer(stream)
    if placement == "mix":  # Post-LN layers, the first Pre-LN layer (one tensor in), then a pair in
        assert kinds == {("post", False), ("pre", False), ("pre", True)}


@pytest.mark.slow
@pytest.mark.parametrize("placement,kernels", [("mix", "torch"), ("mix", "triton"), ("peri", "triton"),
                                               ("hybrid_star", "torch"), ("deepnorm", "torch")])
def test_inductor_compiled_layers_match_eager_losses_and_gradients(placement, kernels):
    config = _config(placement, kernels)
    eager, compiled = build_model(config, seed=5), build_model(config, seed=5)
    assert compile_decoder_layers(compiled) == config.num_layers
    dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # the second forward runs the cached graphs
        ids = torch.randint(0, 64, (2, 12), generator=generator)
        labels = torch.randint(0, 64, (2, 12), generator=generator)
        losses = []
        for model in (eager, compiled):
            model.zero_grad()
            loss = model(ids, labels)
            loss.backward()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
        for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
            err = (torch.linalg.vector_norm(a.grad - b.grad) / torch.linalg.vector_norm(a.grad)).item()
            assert err < 1e-5, (name, err)
    # In place: parameter names and the state dict are those of the eager model.
    assert list(compiled.state_dict()) == list(eager.state_dict())


@pytest.mark.slow
def test_training_with_compiled_layers_gives_the_eager_losses(tmp_path):
    common = ["model.vocab_size=320", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=4",
              "model.num_heads=2", "model.max_seq_len=32", "model.mix_alpha=0.5", "data.source=embedded",
              "data.max_train_documents=150", "data.max_eval_documents=20", "data.tokenizer=bpe",
              "data.bpe_vocab_size=300", "data.seq_len=32", "data.mode=packed", "train.global_batch_size=4",
              "train.micro_batch_size=2", "train.eval_sequences=8", "train.progress_bar=false",
              "train.tensorboard=false", "train.steps=3", f"data.cache_dir={tmp_path / 'cache'}"]
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["train.compile=true"])):
        proc = subprocess.run([str(Path(sys.executable).parent / "mixln-train"), "configs/tiny.yaml", *common,
                               *extra, f"train.out_dir={tmp_path / name}"], cwd=ROOT, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in records if "loss" in r]
    assert len(losses["eager"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)


@pytest.mark.slow
def test_compiled_layers_under_activation_checkpointing_match_eager():
    """The recompute in the backward runs the compiled forward again (PyTorch's non-reentrant checkpoint)."""
    config = _config("mix", "torch")
    eager, compiled = build_model(config, seed=5), build_model(config, seed=5)
    compile_decoder_layers(compiled)
    compiled.activation_checkpointing = True
    dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    ids, labels = (torch.randint(0, 64, (2, 12), generator=generator) for _ in range(2))
    losses = []
    for model in (eager, compiled):
        loss = model(ids, labels)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert (torch.linalg.vector_norm(a.grad - b.grad) / torch.linalg.vector_norm(a.grad)).item() < 1e-5, name



def test_models_compiled_in_one_process_never_fall_back_to_eager(monkeypatch):
    """A model per placement in one process, each in training and evaluation: dozens of variants of one decoder-layer
    forward, where dynamo's default recompile limit (8) would silently run later models' layers eagerly."""
    import logging

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, backend="eager"))  # dynamo, no inductor
    monkeypatch.setattr(dynamo.config, "recompile_limit", 8)  # torch's default, whatever ran before
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logger = logging.getLogger("torch._dynamo.convert_frame")
    logger.addHandler(handler)
    dynamo.reset()
    tokens = torch.randint(0, 64, (2, 8))
    try:
        for placement in NORM_PLACEMENTS:
            model = build_model(_config(placement, "torch"))
            compile_decoder_layers(model)
            model(tokens).sum().backward()
            with torch.no_grad():
                model.eval()(tokens)
    finally:
        logger.removeHandler(handler)
        dynamo.reset()
    assert not [message for message in warnings if "recompile_limit" in message]
