"""PaLM's z-loss (train.z_loss) and the log-partition statistic the stability telemetry reads, against float64.

The reference everywhere: log Z = torch.logsumexp of the logits in float64, loss = cross-entropy + z (log Z)^2 per
target token, gradients by torch.autograd on it. Checked for the plain loss, the fused chunked loss (several
chunks) and the vocab-parallel loss under TP2 (two gloo processes, against the unsharded tensors), with ignored
positions; in the model: eval mode gives the pure cross-entropy and z_loss=0 changes nothing, bit for bit. The
statistic [sum, max, count] of log Z over the targets is checked on the same three paths. One tiny training
run: step 1's logged loss with z-loss exceeds the plain run's by z mean((log Z)^2) of the initial model.
Cost here: about 25 s (the TP2 processes and two 3-step runs take most of it).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_mixln import ModelConfig
from megatron_mixln.model import build_model, token_losses
from megatron_mixln.model.layers import DecoderLayer
from megatron_mixln.model.linear_cross_entropy import linear_cross_entropy_sum
from megatron_mixln.model.llama import Embedding, LMHead, log_partition_modules, set_z_loss, stage_modules
from megatron_mixln.parallel.tensor_parallel import TensorParallel, vocab_parallel_token_losses
from training_runs import DATA, MODEL, TRAIN, counting_all_reduces, run_gloo_workers

IGNORE = -100
Z = 0.05  # large enough that the z term moves the loss and gradients well beyond float64 rounding


def _inputs(tokens=37, hidden=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g, dtype=torch.float64).requires_grad_()
    # Logits of std ~3: log Z is far from log(vocab) and differs between tokens.
    w = (torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 0.8).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::5] = IGNORE
    return h, w, labels


def _reference(logits, labels, z):
    """Sum over targets of CE + z (log Z)^2 in float64, and log Z per position (autograd gives the gradients)."""
    keep = labels != IGNORE
    log_partition = torch.logsumexp(logits.double(), dim=-1)
    ce = F.cross_entropy(logits.double(), labels, ignore_index=IGNORE, reduction="none")
    return (ce + z * log_partition.square() * keep).sum(), log_partition.detach()


def _reference_stats(log_partition, labels):
    kept = log_partition[labels != IGNORE]
    return torch.tensor([kept.sum().item(), kept.max().item(), kept.numel()], dtype=torch.float64)


def _close(a, b, rel=1e-12):
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


# ------------------------------------------------------------------------------------------------
# The three loss functions against the float64 reference.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("z", [Z, 1e-4])
def test_plain_z_loss_and_gradient_equal_the_float64_reference(z):
    h, w, labels = _inputs()
    logits = (h @ w.t()).detach().requires_grad_()
    expected, log_partition = _reference(logits, labels, z)
    (expected_grad,) = torch.autograd.grad(expected * 0.7, logits)
    assert (expected_grad[labels == IGNORE] == 0).all()
    ce_only_grad = torch.autograd.grad(_reference(logits, labels, 0.0)[0] * 0.7, logits)[0]
    assert (expected_grad - ce_only_grad).abs().max() > 1e-4 * z / Z  # the z term is really in the gradient

    losses, stats = token_losses(logits, labels, z_loss=z, with_log_partition=True)
    (grad,) = torch.autograd.grad(losses.sum() * 0.7, logits)
    assert (losses[labels == IGNORE] == 0).all()
    assert abs(losses.sum().item() - expected.item()) < 1e-12 * expected.item()
    assert _close(grad, expected_grad)
    assert _close(stats, _reference_stats(log_partition, labels))


@pytest.mark.parametrize("chunk", [6, 37])
def test_fused_chunked_z_loss_and_gradients_equal_the_float64_reference(chunk):
    h, w, labels = _inputs()
    expected, log_partition = _reference(h @ w.t(), labels, Z)
    expected_dh, expected_dw = torch.autograd.grad(expected * 2.5, (h, w))
    fused, stats = linear_cross_entropy_sum(h, w, labels, chunk=chunk, z_loss=Z, with_log_partition=True)
    dh, dw = torch.autograd.grad(fused * 2.5, (h, w))
    assert abs(fused.item() - expected.item()) < 1e-12 * expected.item()
    assert _close(dh, expected_dh) and _close(dw, expected_dw)
    assert _close(stats, _reference_stats(log_partition, labels))  # merged over 7 chunks when chunk=6


def test_positions_without_a_target_add_no_z_loss():
    h, w, labels = _inputs()
    nothing = torch.full_like(labels, IGNORE)
    for loss in (token_losses(h @ w.t(), nothing, z_loss=Z).sum(),
                 linear_cross_entropy_sum(h, w, nothing, chunk=8, z_loss=Z)):
        dh, dw = torch.autograd.grad(loss, (h, w))
        assert loss.item() == 0.0 and not dh.any() and not dw.any()


# ------------------------------------------------------------------------------------------------
# The model: training mode adds z-loss, eval mode does not, z_loss=0 is bit for bit the plain loss.
# ------------------------------------------------------------------------------------------------
CONFIG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                     norm_placement="mix", mix_alpha=0.5)


def _batch():
    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(2))
    labels[:, -4:] = IGNORE
    return ids, labels


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_model_adds_z_loss_in_training_only_and_records_log_partition(fused):
    model = build_model(dataclasses.replace(CONFIG, fused_cross_entropy=fused), seed=3)
    ids, labels = _batch()
    with torch.no_grad():
        logits = model(ids).reshape(-1, 96)
    expected, log_partition = _reference(logits, labels.reshape(-1), Z)
    plain_ce = _reference(logits, labels.reshape(-1), 0.0)[0]

    [head] = log_partition_modules(model)
    assert head is model.lm_head and head.log_partition_stats is None
    before = model(ids, labels)  # z_loss defaults to 0
    # The z-loss of a fresh model is well above fp32 noise (log Z ~ log 96 ~ 4.6 per token).
    assert expected.item() - plain_ce.item() > 0.5
    assert before.item() == pytest.approx(plain_ce.item(), rel=1e-6)
    assert head.log_partition_stats is None  # not recorded unless asked

    set_z_loss(model, Z)
    head.record_log_partition = True
    trained = model(ids, labels)
    assert trained.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(head.log_partition_stats, _reference_stats(log_partition, labels.reshape(-1)), rtol=1e-6)
    assert head.log_partition_stats.dtype == torch.float64

    model.eval()
    evaluated = model(ids, labels)
    assert torch.equal(evaluated, before)  # eval: the pure cross-entropy, exactly the z_loss=0 value
    fewer = labels.clone()
    fewer[:, :5] = IGNORE
    model(ids, fewer)
    assert head.log_partition_stats[2].item() == (fewer != IGNORE).sum().item()  # overwritten, not accumulated

    # Recording never changes the loss; z_loss=0 is the code path without z-loss, bit for bit.
    model.train()
    set_z_loss(model, 0.0)
    head.record_log_partition = False
    assert torch.equal(model(ids, labels), before)
    if not fused:
        assert torch.equal(before, F.cross_entropy(logits, labels.reshape(-1), ignore_index=IGNORE,
                                                   reduction="none").sum())


def test_z_loss_gradient_through_the_model_matches_autograd_on_the_logits():
    """The hand-written backward (fused and vocab-parallel) against autograd through F.cross_entropy + logsumexp
    on the same model in float64."""
    models = {name: build_model(dataclasses.replace(CONFIG, fused_cross_entropy=fused), seed=3, dtype=torch.float64)
              for name, fused in (("plain", False), ("fused", True), ("reference", False))}
    ids, labels = _batch()
    for name, model in models.items():
        if name == "reference":
            loss = _reference(model(ids).reshape(-1, 96), labels.reshape(-1), Z)[0]
        else:
            set_z_loss(model, Z)
            loss = model(ids, labels)
        (loss * 0.1).backward()
    reference = dict(models["reference"].named_parameters())
    for name in ("plain", "fused"):
        for param_name, param in models[name].named_parameters():
            assert _close(param.grad, reference[param_name].grad, rel=1e-10), (name, param_name)


def test_log_partition_modules_finds_the_head_in_a_stage_or_none():
    embedding, *layers, head = stage_modules(CONFIG)
    assert isinstance(embedding, Embedding) and isinstance(layers[0], DecoderLayer) and isinstance(head, LMHead)
    assert log_partition_modules(embedding) == [] and log_partition_modules(layers[0]) == []
    assert log_partition_modules(head) == [head.lm_head]
    set_z_loss(head, 1e-4)
    assert head.lm_head.z_loss == 1e-4


# ------------------------------------------------------------------------------------------------
# Tensor parallelism: two gloo processes, each with its vocabulary slice, against the unsharded float64 loss.
# ------------------------------------------------------------------------------------------------
def _tp_worker(rank, world, store_path, result_path):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    torch.set_num_threads(1)
    tp = TensorParallel(world, rank, dist.group.WORLD)
    h, w, labels = _inputs(tokens=21, vocab=48)
    local_vocab = w.shape[0] // world
    mine = slice(rank * local_vocab, (rank + 1) * local_vocab)
    expected, log_partition = _reference(h @ w.t(), labels, Z)
    expected_dh, expected_dw = torch.autograd.grad(expected * 0.5, (h, w))
    expected_stats = _reference_stats(log_partition, labels)
    results = {}

    logits = (h @ w.t()).detach().requires_grad_()
    (expected_dlogits,) = torch.autograd.grad(_reference(logits, labels, Z)[0] * 0.5, logits)
    local = logits.detach()[:, mine].clone().requires_grad_()
    with counting_all_reduces() as calls:
        losses, stats = vocab_parallel_token_losses(local, labels, tp, Z, with_log_partition=True)
    (losses.sum() * 0.5).backward()
    results["vocab_parallel"] = dict(calls=calls["n"], loss=abs(losses.sum().item() - expected.item()),
                                     grad=(local.grad - expected_dlogits[:, mine]).abs().max().item(),
                                     stats=(stats - expected_stats).abs().max().item())

    w_local = w.detach()[mine].clone().requires_grad_()
    h_local = h.detach().clone().requires_grad_()
    with counting_all_reduces() as calls:
        fused, stats = linear_cross_entropy_sum(h_local, w_local, labels, rank * local_vocab, dist.group.WORLD,
                                                chunk=8, z_loss=Z, with_log_partition=True)
    (fused * 0.5).backward()
    partial = h_local.grad.clone()  # this rank's words' share; the TP copy's backward all-reduces it
    dist.all_reduce(partial)
    results["fused"] = dict(calls=calls["n"], loss=abs(fused.item() - expected.item()),
                            grad=max((partial - expected_dh).abs().max().item(),
                                     (w_local.grad - expected_dw[mine]).abs().max().item()),
                            stats=(stats - expected_stats).abs().max().item())
    torch.save(results, f"{result_path}.{rank}")
    dist.destroy_process_group()


def test_vocab_parallel_z_loss_gradient_and_log_partition_equal_the_unsharded_ones(tmp_path):
    for results in run_gloo_workers(_tp_worker, 2, tmp_path):
        vocab_parallel, fused = results["vocab_parallel"], results["fused"]
        assert vocab_parallel["calls"] == 3 and fused["calls"] == 3 * math.ceil(21 / 8)  # z-loss adds none
        for r in (vocab_parallel, fused):
            assert r["loss"] < 1e-10 and r["grad"] < 1e-12 and r["stats"] < 1e-10, r


# ------------------------------------------------------------------------------------------------
# End to end: the logged training loss includes the z term.
# ------------------------------------------------------------------------------------------------
def test_training_with_z_loss_logs_the_z_term_at_step_one(tmp_path):
    from megatron_mixln.config import load_config
    from megatron_mixln.data import GlobalBatchSampler, collate, open_datasets
    from megatron_mixln.train.loop import train

    def config(name, *extra):
        return load_config(None, [*MODEL, *DATA, *TRAIN, "train.steps=3", "train.global_batch_size=4",
                                  "train.micro_batch_size=2", "train.eval_sequences=0", "train.layer_grad_norm_every=0",
                                  f"data.cache_dir={tmp_path / 'cache'}", f"train.out_dir={tmp_path / name}", *extra])

    z = 1e-2
    plain = train(config("plain"))
    with_z = train(config("z", f"train.z_loss={z}"))
    cfg = config("plain")
    _, train_data, _ = open_datasets(cfg, progress=False)
    inputs, labels = collate(train_data, GlobalBatchSampler(len(train_data), 4, cfg.train.seed).global_indices(0))
    with torch.no_grad():
        logits = build_model(cfg.model, seed=cfg.train.seed)(inputs).double()
    keep = labels != IGNORE
    z_term = z * torch.logsumexp(logits, dim=-1)[keep].square().mean().item()
    assert z_term > 0.2  # log Z ~ log 320 at initialisation: the term is far above the tolerance below
    assert with_z.losses[1] - plain.losses[1] == pytest.approx(z_term, rel=1e-4)
    assert all(math.isfinite(loss) for loss in with_z.losses.values()) and len(with_z.losses) == 3
