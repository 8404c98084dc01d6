"""Peri-LN, HybridNorm and HybridNorm*: the placement rule, parameter names (unsplit and per pipeline stage), the
initialisation, the kernels switch, and the tensor-parallel q/k/v norm and layers against the unsharded ones in two
processes. Their formulas are checked against the float64 reference in test_model.py, whole TP / PP training runs
against the single-process run in test_parallel.py."""
import pytest
import torch
import torch.distributed as dist

import test_model_kernels
from megatron_mixln import ModelConfig, build_model
from megatron_mixln.model import norm_placement
from megatron_mixln.model.llama import Embedding, full_initial_value, stage_modules
from megatron_mixln.model.stages import consolidated_name, pipeline_layer_specs, spec_name, stage_boundaries
from training_runs import run_gloo_workers

NEW = ["peri", "hybrid", "hybrid_star"]
TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=136, num_layers=4, num_heads=4, max_seq_len=32)


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


@pytest.mark.parametrize("placement,kinds", [
    ("peri", ["sandwich"] * 6),  # Peri-LN's layers are Sandwich blocks; its embedding norm is not a layer's
    ("hybrid", ["hybrid"] * 6),
    ("hybrid_star", ["hybrid_pre"] + ["hybrid"] * 5),
])
def test_block_kinds_follow_the_global_index_at_every_pipeline_degree(placement, kinds):
    config = tiny(num_layers=6, norm_placement=placement)
    assert [norm_placement(i, 6, config) for i in range(6)] == kinds
    assert build_model(config).placements == kinds
    for pp in (1, 2, 3):
        bounds = stage_boundaries(config, pp, "uniform")
        built = [spec.build() for stage in range(pp) for spec in pipeline_layer_specs(config)[bounds[stage]:bounds[stage + 1]]]
        assert [(m.layer_index, m.placement) for m in built if hasattr(m, "placement")] == list(enumerate(kinds))


def test_non_peri_parameter_names_are_unchanged():
    # The names (and order) of a Pre-LN state dict before Peri-LN gave the embedding stage a module of its own.
    layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"] + [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    expected = (["model.embed_tokens.weight"]
                + [f"model.layers.{i}.{n}" for i in range(2)
                   for n in layer + ["input_layernorm.weight", "post_attention_layernorm.weight"]]
                + ["model.norm.weight", "lm_head.weight"])
    assert list(build_model(tiny(num_layers=2)).state_dict()) == expected
    for placement in ("pre", "post", "mix", "deepnorm", "sandwich", "lns", "hybrid", "hybrid_star"):
        assert not any("embed_layernorm" in n for n in build_model(tiny(norm_placement=placement)).state_dict())


@pytest.mark.parametrize("placement", ["pre", "mix", "sandwich", *NEW])
def test_pipeline_stage_names_map_one_to_one_onto_the_unsplit_model(placement):
    config = tiny(norm_placement=placement, mix_alpha=0.5)
    unsplit = {name: tuple(p.shape) for name, p in build_model(config).named_parameters()}
    staged = {}
    for index, module in enumerate(stage_modules(config)):
        for local, param in module.named_parameters():
            name = consolidated_name(f"{index}.{local}", config.num_layers)
            assert spec_name(name, config.num_layers) == f"{index}.{local}"
            staged[name] = tuple(param.shape)
    assert staged == unsplit
    embedding = {local for local, _ in stage_modules(config)[0].named_parameters()}
    assert embedding == ({"embed_tokens.weight", "embed_layernorm.weight"} if placement == "peri"
                         else {"embed_tokens.weight"})


def test_stage_zero_still_reads_pipeline_checkpoints_of_the_bare_embedding():
    # Stage 0 was a bare VocabParallelEmbedding (local name `0.weight`) before it held Peri-LN's norm.
    config = tiny()
    weight = torch.randn(config.vocab_size, config.hidden_size)
    stage = Embedding(config)
    stage.load_state_dict({"weight": weight})  # strict, as DeepSpeed loads a stage's file
    assert torch.equal(stage.embed_tokens.weight, weight)
    assert consolidated_name("0.weight", config.num_layers) == "model.embed_tokens.weight"


@pytest.mark.parametrize("placement", NEW)
def test_new_norm_gains_start_at_one_and_projections_keep_the_plain_initialisation(placement):
    big = dict(hidden_size=256, intermediate_size=512, num_heads=4, vocab_size=2000, num_layers=4)
    state = build_model(tiny(**big, norm_placement=placement), seed=3).state_dict()
    plain = build_model(tiny(**big), seed=3).state_dict()
    norms = [n for n in state if n.endswith("norm.weight")]
    assert ("model.embed_layernorm.weight" in norms) == (placement == "peri")
    assert all(torch.equal(state[n], torch.ones(256)) for n in norms)
    # Same seed, same name, same value: the DeepNorm branch of init_std must not fire on the new layers.
    for name, value in plain.items():
        if name in state:
            assert torch.equal(state[name], value), name
    assert state["model.layers.1.self_attn.v_proj.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(full_initial_value("model.layers.0.self_attn.q_norm.weight", (256,), tiny(), "hybrid", 0),
                       torch.ones(256))


@pytest.mark.parametrize("placement", NEW)
def test_triton_kernels_match_torch(placement):
    # The same check as the existing placements' (two layers: hybrid_star's layer 0 and a hybrid layer).
    test_model_kernels.test_triton_model_trains_like_the_torch_model(placement)


# ------------------------------------------------------------------------------------------------
# Tensor parallelism in two processes (FileStore: no ports), against the unsharded modules.
# ------------------------------------------------------------------------------------------------
def _tp_worker(rank, world, store_path, result_path):
    from megatron_mixln.model.layers import DecoderLayer, hidden_state
    from megatron_mixln.model.llama import initialize_weights, shard_of
    from megatron_mixln.model.norms import ColumnParallelRMSNorm, RMSNorm
    from megatron_mixln.parallel.tensor_parallel import TensorParallel

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    torch.manual_seed(1000 + rank)  # different global RNG per rank: nothing may depend on it
    tp = TensorParallel(world, rank, dist.group.WORLD)
    hidden, results = 32, {}
    width = slice(rank * hidden // world, (rank + 1) * hidden // world)

    def counted(run):
        calls, real = {"n": 0}, dist.all_reduce

        def counting(*args, **kwargs):
            calls["n"] += 1
            return real(*args, **kwargs)

        dist.all_reduce = counting
        try:
            run()
        finally:
            dist.all_reduce = real
        return calls["n"]

    # One q/k/v norm: this rank's columns against the same columns of the unsharded norm. The loss is a weighted sum
    # whose per-rank parts add up to the unsharded loss, as after a row-parallel o_proj.
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, hidden, generator=generator) * 3.0
    gain = 1.0 + 0.5 * torch.randn(hidden, generator=generator)
    weights = torch.randn(2, 5, hidden, generator=generator)
    full = RMSNorm(hidden, 1e-6)
    shard = ColumnParallelRMSNorm(hidden, 1e-6, tp)
    sharded_like_columns = (shard.weight.partition_dim == 0 and shard.weight.tensor_model_parallel
                            and shard.weight.full_shape == (hidden,) and shard.weight.shape == (hidden // world,))
    with torch.no_grad():
        full.weight.copy_(gain)
        shard.weight.copy_(gain[width])
    x_full, x_local = x.clone().requires_grad_(), x[..., width].clone().requires_grad_()
    outputs = {}
    forward = counted(lambda: outputs.update(y=shard(x_local)))
    backward = counted(lambda: (outputs["y"] * weights[..., width]).sum().backward())
    y_full = full(x_full)
    (y_full * weights).sum().backward()
    results["norm"] = dict(sharded_like_columns=sharded_like_columns, forward=forward, backward=backward,
                           out=(outputs["y"] - y_full[..., width]).abs().max().item(),
                           dx=(x_local.grad - x_full.grad[..., width]).abs().max().item(),
                           dgain=(shard.weight.grad - full.weight.grad[width]).abs().max().item())

    # Whole decoder layers: hybrid_star's layer 0 (Pre-LN + q/k/v norms) and a HybridNorm layer.
    config = ModelConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_layers=2, num_heads=4,
                         norm_placement="hybrid_star")
    for index in (0, 1):
        full, shard = DecoderLayer(config, index), DecoderLayer(config, index, tp)
        name_of = lambda local: f"model.layers.{index}.{local}"  # noqa: E731
        initialize_weights(full, config, seed=7, name_of=name_of)
        initialize_weights(shard, config, seed=7, tp=tp, name_of=name_of)
        full_params = dict(full.named_parameters())
        same_init = all(torch.equal(p, shard_of(full_params[n], p, tp)) for n, p in shard.named_parameters())
        with torch.no_grad():  # gains away from one, so a gain applied to the wrong columns shows
            gains = torch.Generator().manual_seed(5)
            for name, param in full.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=gains))
            for name, param in shard.named_parameters():
                param.copy_(shard_of(full_params[name], param, tp))
        x = torch.randn(2, 5, hidden, generator=torch.Generator().manual_seed(4), requires_grad=True)
        x_full = x.detach().clone().requires_grad_()
        outputs = {}
        forward = counted(lambda: outputs.update(y=hidden_state(shard(x))))
        backward = counted(lambda: outputs["y"].pow(2).sum().backward())
        y_full = hidden_state(full(x_full))
        y_full.pow(2).sum().backward()
        # Per tensor, relative to its largest gradient (fp32 rounding; q/k gradients pass through large scores).
        grad_errors = {n: ((p.grad - shard_of(full_params[n].grad, p, tp)).abs().max()
                           / full_params[n].grad.abs().max()).item() for n, p in shard.named_parameters()}
        results[index] = dict(placement=shard.placement, same_init=same_init, forward=forward, backward=backward,
                              out=(outputs["y"] - y_full).abs().max().item(),
                              dx=(x.grad - x_full.grad).abs().max().item(), grad_errors=grad_errors)

    # Peri-LN's embedding stage: the vocab-parallel lookup, then the (replicated) embedding norm.
    config = ModelConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_layers=2, num_heads=4,
                         norm_placement="peri")
    full, shard = Embedding(config), Embedding(config, tp)
    name_of = lambda local: consolidated_name(f"0.{local}", 2)  # noqa: E731
    initialize_weights(full, config, seed=7, name_of=name_of)
    initialize_weights(shard, config, seed=7, tp=tp, name_of=name_of)
    with torch.no_grad():
        for module in (full, shard):
            module.embed_layernorm.weight.copy_(torch.linspace(0.5, 1.5, hidden))
    ids = torch.tensor([[0, 5, 33, 63, 31, 32]])
    y, y_full = shard(ids), full(ids)
    y.pow(2).sum().backward()
    y_full.pow(2).sum().backward()
    results["embedding"] = dict(
        out=(y - y_full).abs().max().item(),
        dnorm=(shard.embed_layernorm.weight.grad - full.embed_layernorm.weight.grad).abs().max().item(),
        dembed=(shard.embed_tokens.weight.grad
                - shard_of(full.embed_tokens.weight.grad, shard.embed_tokens.weight, tp)).abs().max().item())
    torch.save(results, f"{result_path}.{rank}")
    dist.destroy_process_group()


def test_tensor_parallel_qkv_norms_and_layers_match_the_unsharded_ones(tmp_path):
    world = 2
    for results in run_gloo_workers(_tp_worker, world, tmp_path):
        norm = results["norm"]
        assert norm["sharded_like_columns"]
        # The statistic is all-reduced in the forward and its gradient in the backward.
        assert (norm["forward"], norm["backward"]) == (1, 1), norm
        assert norm["out"] < 1e-6 and norm["dx"] < 1e-6 and norm["dgain"] < 1e-6, norm
        for index, placement in ((0, "hybrid_pre"), (1, "hybrid")):
            r = results[index]
            assert r["placement"] == placement and r["same_init"], r
            # Megatron's two all-reduces each way, plus one for the three q/k/v statistics together.
            assert (r["forward"], r["backward"]) == (3, 3), r
            assert r["out"] < 1e-5 and r["dx"] < 1e-5 and max(r["grad_errors"].values()) < 1e-5, r
        embedding = results["embedding"]
        assert embedding["out"] < 1e-6 and embedding["dnorm"] < 1e-5 and embedding["dembed"] < 1e-6, embedding
