"""The dry run's activation estimate against what autograd really keeps: a real model's forward on CPU, every
tensor saved for the backward summed once per storage (saved-tensor hooks), parameters left out.

That sum is what the estimate predicts: the bytes alive between a micro-batch's forward and its backward. With
activation checkpointing, a checkpointed layer keeps its input stream (a tuple for Pre-LN layers, which autograd
never sees, so the checkpoint call's arguments are counted too) and the backward recomputes one layer at a time,
so the measurement adds the largest layer's own saved tensors, measured without checkpointing.
"""
import os
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
from torch.utils._pytree import tree_flatten

from megatron_mixln.config import load_config
from megatron_mixln.model.llama import build_model
from megatron_mixln.train.memory import activation_bytes, dry_run_report, dry_run_summary, stage_activation_bytes

ROOT = Path(__file__).parent.parent
# The estimate counts every tensor, so it lands within ~1% (the rotary tables it leaves out). 10% still fails on
# any missing term: in the tiny model the logits are ~30% of the total and one decoder layer ~18%.
TOLERANCE = 0.10


def saved_bytes(model, input_ids, labels, checkpointing: bool) -> tuple[int, dict[int, int]]:
    """(bytes kept for the backward, {layer index: bytes first saved inside that layer}) of one forward + loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept, per_layer, current = {}, {}, [None]

    def remember(tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in kept:
            kept[key] = storage.nbytes()
            if current[0] is not None:
                per_layer[current[0]] = per_layer.get(current[0], 0) + storage.nbytes()
        return tensor

    hooks = [layer.register_forward_pre_hook(lambda module, args, i=i: current.__setitem__(0, i))
             for i, layer in enumerate(model.model.layers)]
    hooks.append(model.head.register_forward_pre_hook(lambda module, args: current.__setitem__(0, None)))
    checkpoint = torch.utils.checkpoint.checkpoint

    def recording_checkpoint(function, *args, **kwargs):
        for value in tree_flatten(args)[0]:
            if isinstance(value, torch.Tensor):
                remember(value)  # what the recompute needs; kept alive by the checkpoint, not by a saved tensor
        return checkpoint(function, *args, **kwargs)

    model.train()
    model.activation_checkpointing = checkpointing
    torch.utils.checkpoint.checkpoint = recording_checkpoint
    try:
        with torch.autograd.graph.saved_tensors_hooks(remember, lambda tensor: tensor):
            loss = model(input_ids, labels)  # the summed loss, as training computes it
    finally:
        torch.utils.checkpoint.checkpoint = checkpoint
        for hook in hooks:
            hook.remove()
    loss.backward()  # the graph the estimate describes really runs backward
    assert all(p.grad is not None for p in model.parameters())
    return sum(kept.values()), per_layer


def measured_activations(config) -> dict[bool, int]:
    """{checkpointing: measured bytes} for one micro-batch of `config` on CPU."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if config.train.precision == "bf16" else None
    model = build_model(config.model, dtype=dtype)
    shape = (config.train.micro_batch_size, config.data.seq_len)
    input_ids = torch.randint(0, config.model.vocab_size, shape)
    labels = torch.randint(0, config.model.vocab_size, shape)
    full, per_layer = saved_bytes(model, input_ids, labels, checkpointing=False)
    checkpointed, _ = saved_bytes(model, input_ids, labels, checkpointing=True)
    return {False: full, True: checkpointed + max(per_layer.values())}


def estimated_activations(config) -> dict[bool, int]:
    act = activation_bytes(config)
    bounds = [0, config.model.num_layers + 2]
    return {checkpointing: stage_activation_bytes(act, bounds, 0, 1, checkpointing) for checkpointing in (False, True)}


# configs/tiny.yaml's model (the demo's) at its micro-batch of 16 x 128 tokens. model.kernels=torch: the kernels a
# CPU runs (the fused Triton path, what GPUs run, is checked under Triton's interpreter below).
@pytest.mark.parametrize("overrides", [
    ["model.norm_placement=mix"],  # Post-LN then Pre-LN: one- and two-tensor layer inputs
    ["model.norm_placement=sandwich"],  # four norms per layer
    ["train.precision=bf16", "parallel.zero_stage=1"],  # bf16 values, fp32 norm copies and loss copy
    ["model.fused_cross_entropy=true"],  # no logits: the head's input and weight gradients from the forward
], ids=["mix-fp32", "sandwich-fp32", "mix-bf16", "mix-fused-loss"])
def test_estimate_matches_what_autograd_keeps_with_and_without_checkpointing(overrides):
    config = load_config(ROOT / "configs/tiny.yaml", ["model.kernels=torch", *overrides])
    measured, estimated = measured_activations(config), estimated_activations(config)
    for checkpointing in (False, True):
        assert estimated[checkpointing] == pytest.approx(measured[checkpointing], rel=TOLERANCE), (
            checkpointing, estimated, measured)
    assert measured[True] < 0.7 * measured[False]  # checkpointing really saves memory here, and the estimate says so
    assert estimated[True] < 0.7 * estimated[False]


def test_a_71m_shape_within_tolerance_and_dominated_by_the_logits_at_small_batch():
    # configs/llama_71m.yaml at 2 x 256 tokens, fp32 on CPU: 32k-vocab logits against 12 narrow layers.
    config = load_config(ROOT / "configs/llama_71m.yaml", ["model.kernels=torch", "train.precision=fp32",
                                                           "parallel.zero_stage=0", "train.micro_batch_size=2",
                                                           "data.seq_len=256", "model.num_layers=4"])
    measured, estimated = measured_activations(config), estimated_activations(config)
    assert estimated[False] == pytest.approx(measured[False], rel=TOLERANCE)
    assert estimated[True] == pytest.approx(measured[True], rel=TOLERANCE)
    act = activation_bytes(config)
    assert act["logits"] == 4 * 2 * 256 * 32000  # fp32 tokens x vocab
    assert act["logits"] > 3 * max(act["layers"])  # the largest single term at this size: why the estimate counts it


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton kernels run on CPU only under "
                    "TRITON_INTERPRET=1, which tests/conftest.py sets unless the environment already sets it")
def test_fused_triton_kernels_keep_what_the_estimate_says():
    # The fused path is what model.kernels=auto runs on a GPU; here under Triton's interpreter, on a smaller model.
    shape = ["model.num_layers=2", "train.micro_batch_size=2"]
    config = load_config(ROOT / "configs/tiny.yaml", ["model.kernels=triton", *shape])
    measured, estimated = measured_activations(config), estimated_activations(config)
    for checkpointing in (False, True):
        assert estimated[checkpointing] == pytest.approx(measured[checkpointing], rel=TOLERANCE)
    reference = measured_activations(load_config(ROOT / "configs/tiny.yaml", ["model.kernels=torch", *shape]))
    assert measured[False] < reference[False]  # fused norms keep no fp32 copy, fused SwiGLU no silu(gate)
    assert estimated[False] < estimated_activations(load_config(ROOT / "configs/tiny.yaml",
                                                                ["model.kernels=torch", *shape]))[False]


def summary(path="configs/llama_7b.yaml", world=8, **overrides):
    config = load_config(ROOT / path, [f"{key.replace('__', '.')}={value}" for key, value in overrides.items()])
    return dry_run_summary(config, world, 8)


def test_tensor_parallelism_splits_attention_and_mlp_activations_but_not_the_hidden_size_ones():
    one = summary(world=8, parallel__tp=1)["activations"]
    two = summary(world=8, parallel__tp=2)["activations"]
    assert two["logits"] * 2 == one["logits"]  # vocab-parallel loss
    assert two["layer_inputs"] == one["layer_inputs"]  # the residual stream is whole on every TP rank
    assert 0.5 * one["layers"][0] < two["layers"][0] < one["layers"][0]  # replicated norm and linear inputs stay


def test_1f1b_keeps_pp_micro_batches_on_the_first_stage_and_one_on_the_last():
    # 7B at tp 2 x pp 4 x dp 8, global batch 512 / (micro 4 x dp 8) = 16 micro-batches per step.
    s = summary(world=64, parallel__tp=2, parallel__pp=4, parallel__zero_stage=1)
    per_stage = s["activations"]["without_checkpointing"]["per_stage"]
    act = activation_bytes(load_config(ROOT / "configs/llama_7b.yaml", ["parallel.tp=2", "parallel.pp=4",
                                                                        "parallel.zero_stage=1"]), tp=2)
    bounds = s["stage_boundaries"]
    for stage in range(4):
        one_micro_batch = sum(act["specs"][bounds[stage]:bounds[stage + 1]])
        assert per_stage[stage] == (4 - stage) * one_micro_batch
    assert s["activations"]["without_checkpointing"]["stage"] == 0
    few = summary(world=64, parallel__tp=2, parallel__pp=4, parallel__zero_stage=1, train__global_batch_size=64)
    assert few["activations"]["without_checkpointing"]["in_flight"] == 2  # only 64 / (4 x 8) micro-batches exist


def test_checkpointing_keeps_layer_inputs_plus_one_recomputed_layer():
    s = summary(world=8, parallel__zero_stage=1)["activations"]
    act = activation_bytes(load_config(ROOT / "configs/llama_7b.yaml", []))
    expected = act["embedding"] + sum(act["layer_inputs"]) + act["head"] + max(act["layers"])
    assert s["with_checkpointing"]["bytes"] == expected
    assert s["without_checkpointing"]["bytes"] == act["embedding"] + sum(act["layers"]) + act["head"]
    # Mix-LN 7B: 2 Post-LN layers pass one tensor on, Pre-LN layers a (residual, pending) pair.
    one = act["tokens"] * 4096 * 2
    assert act["layer_inputs"][:4] == [one, one, one, 2 * one]


def test_report_shows_both_modes_marks_the_config_and_adds_activations_to_the_total():
    config = load_config(ROOT / "configs/llama_71m.yaml", ["parallel.activation_checkpointing=true"])
    text = dry_run_report(config, 1, 8)
    s = dry_run_summary(config, 1, 8)
    assert "per-rank activations (64 x 256 = 16,384 tokens per micro-batch, bf16" in text
    [with_line] = [line for line in text.splitlines() if line.strip().startswith("with checkpointing")]
    assert with_line.endswith("<- this config")
    assert s["bytes"]["gpu_total_with_activations"] == pytest.approx(
        s["bytes"]["gpu_total"] + s["activations"]["with_checkpointing"]["bytes"])
    assert "loss's fp32 log-probabilities" in text and "model states + activations" in text


def test_the_fused_cross_entropy_keeps_no_logits_and_the_estimate_says_so():
    # The 71M shape at 4 x 256 tokens: the fused loss keeps hidden- and weight-sized gradients (1024 x 512 and
    # 32000 x 512) instead of the fp32 logits (1024 x 32000), half of them at this shape.
    shape = ["model.kernels=torch", "train.precision=fp32", "parallel.zero_stage=0", "train.micro_batch_size=4",
             "data.seq_len=256", "model.num_layers=2"]
    plain = load_config(ROOT / "configs/llama_71m.yaml", shape)
    fused = load_config(ROOT / "configs/llama_71m.yaml", [*shape, "model.fused_cross_entropy=true"])
    measured, estimated = measured_activations(fused), estimated_activations(fused)
    for checkpointing in (False, True):
        assert estimated[checkpointing] == pytest.approx(measured[checkpointing], rel=TOLERANCE)
    assert activation_bytes(fused)["logits"] == 0
    saved = measured_activations(plain)[False] - measured[False]
    assert saved == pytest.approx(4 * 1024 * 32000 - 4 * 32000 * 512, rel=0.02)
    assert saved == pytest.approx(estimated_activations(plain)[False] - estimated[False], rel=0.02)
