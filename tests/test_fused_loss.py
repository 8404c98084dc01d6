"""The fused, chunked LM head + cross-entropy (model.fused_cross_entropy) against the unfused path and float64.

In one process: the loss and both gradients equal F.cross_entropy over the whole logits in float64, for every
chunk size (one token, uneven last chunk, all tokens), with ignored labels, and under a scaled or non-finite
incoming gradient (the training objective multiplies the sum; a NaN must reach every gradient so the update is
skipped). In the model: fused and unfused agree in fp32 and bf16. Under tensor parallelism (two gloo
processes): the vocab-parallel chunks equal the unsharded float64 loss with three all-reduces per chunk. The
pipeline and ZeRO-3 paths run in tests/test_parallel.py. Memory: every tensor the chunked head allocates is
recorded (a dispatch mode): none is [tokens x vocab].
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_mixln import ModelConfig
from megatron_mixln.model import build_model
from megatron_mixln.model.linear_cross_entropy import chunk_tokens, linear_cross_entropy_sum
from training_runs import counting_all_reduces, run_gloo_workers

IGNORE = -100


def _inputs(tokens=37, hidden=16, vocab=50, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g, dtype=dtype) * 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::5] = IGNORE
    return h, w, labels


def _reference(h, w, labels, scale=1.0):
    loss = F.cross_entropy(h @ w.t(), labels, ignore_index=IGNORE, reduction="sum")
    return (loss.detach(), *torch.autograd.grad(loss * scale, (h, w)))


@pytest.mark.parametrize("chunk", [1, 6, 16, 37, 64])
def test_chunked_loss_and_gradients_equal_the_whole_logits_in_float64(chunk):
    h, w, labels = _inputs()
    loss, dh, dw = _reference(h, w, labels, scale=2.5)
    fused = linear_cross_entropy_sum(h, w, labels, chunk=chunk)
    fdh, fdw = torch.autograd.grad(fused * 2.5, (h, w))
    assert fused.dtype == torch.float64
    assert abs(fused.item() - loss.item()) < 1e-12 * loss.abs().item()
    assert torch.allclose(fdh, dh, rtol=1e-10, atol=1e-12) and torch.allclose(fdw, dw, rtol=1e-10, atol=1e-12)
    if chunk == 6:  # finite differences through an uneven last chunk (one forward per input element: small)
        h, w, labels = _inputs(tokens=13, hidden=8, vocab=20)
        assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy_sum(a, b, labels, chunk=chunk), (h, w))


def test_ignored_tokens_add_nothing_and_a_nan_gradient_reaches_every_parameter():
    h, w, labels = _inputs()
    everything_ignored = linear_cross_entropy_sum(h, w, torch.full_like(labels, IGNORE), chunk=8)
    assert everything_ignored.item() == 0.0
    dh, dw = torch.autograd.grad(everything_ignored, (h, w))
    assert not dh.any() and not dw.any()
    # The step engine poisons a non-finite loss by multiplying it by NaN: the update must then be skipped.
    dh, dw = torch.autograd.grad(linear_cross_entropy_sum(h, w, labels, chunk=8) * math.nan, (h, w))
    assert dh.isnan().all() and dw.isnan().all()


def test_a_bf16_gradient_is_scaled_in_fp32_and_rounded_once():
    """The objective scales the summed loss by e.g. micro-batches x dp / tokens; a bf16 copy of that scale would
    be off by up to 0.4 %, the same way in every element: the backward scales in fp32 and rounds once."""
    h, w, labels = (t.detach().to(torch.bfloat16).requires_grad_() if t.is_floating_point() else t
                    for t in _inputs(tokens=40, hidden=16, vocab=50, dtype=torch.float32))
    scale = 4 / 3000  # 0.0013333..., not a bf16 value
    assert torch.tensor(scale, dtype=torch.bfloat16).item() != pytest.approx(scale, rel=1e-3)
    unscaled = torch.autograd.grad(linear_cross_entropy_sum(h, w, labels, chunk=16), (h, w))
    scaled = torch.autograd.grad(linear_cross_entropy_sum(h, w, labels, chunk=16) * scale, (h, w))
    for got, one in zip(scaled, unscaled):
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, (one.float() * torch.tensor(scale)).to(torch.bfloat16))


def test_without_gradients_nothing_is_kept_for_a_backward():
    h, w, labels = _inputs()
    with torch.no_grad():
        loss = linear_cross_entropy_sum(h, w, labels, chunk=8)
    assert loss.grad_fn is None
    assert loss.item() == pytest.approx(_reference(h, w, labels)[0].item(), rel=1e-12)


def test_chunk_size_holds_about_as_many_logits_as_hidden_states():
    # 16384 tokens x 32000 words at hidden 2048: 16 chunks of 1024 tokens (Liger's rule), a power of two.
    assert chunk_tokens(16384, 32000, 2048) == 1024
    assert chunk_tokens(65536, 16000, 2048) == 8192  # TP 2: each rank holds half the vocabulary
    assert chunk_tokens(4096, 32000, 2048) == 1024  # never below 1024 tokens (MIN_CHUNK_TOKENS) ...
    assert chunk_tokens(300, 32000, 2048) == 300 and chunk_tokens(1, 8, 2048) == 1  # ... unless there are fewer


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_model_with_fused_head_matches_the_unfused_model(dtype, tolerance):
    config = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         norm_placement="mix", mix_alpha=0.5)
    plain = build_model(config, seed=3, dtype=dtype)
    fused = build_model(dataclasses.replace(config, fused_cross_entropy=True), seed=3, dtype=dtype)
    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(2))
    labels[:, -4:] = IGNORE
    losses = []
    for model in (plain, fused):
        loss = model(ids, labels)
        (loss * 0.01).backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=tolerance)
    for (name, a), (_, b) in zip(plain.named_parameters(), fused.named_parameters()):
        err = (torch.linalg.vector_norm((a.grad - b.grad).float()) / torch.linalg.vector_norm(a.grad.float())).item()
        assert err < tolerance, (name, err)
    # Logits without labels are the same tensor either way (analyses, evaluation by logits, HF export).
    assert torch.equal(plain(ids), fused(ids))


def test_the_fused_head_never_holds_the_whole_logits():
    """The fused head allocates a chunk's logits and the weight gradient, never [tokens x vocab]."""
    h, w, labels = _inputs(tokens=3000, hidden=16, vocab=512, dtype=torch.float32)
    sizes = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    sizes.append(t.numel())
            return out

    with Record():
        loss = linear_cross_entropy_sum(h, w, labels)
        loss.backward()
    chunk = chunk_tokens(3000, 512, 16)
    assert chunk == 1024
    assert max(sizes) == chunk * 512  # a chunk's logits (1024 tokens x 512 words); never 3000 x 512
    sizes.clear()
    with Record():
        F.cross_entropy(h @ w.t(), labels, ignore_index=IGNORE, reduction="sum").backward()
    assert max(sizes) == 3000 * 512  # the unfused head's whole logits


# ------------------------------------------------------------------------------------------------
# Tensor parallelism: two gloo processes, this rank's vocabulary slice.
# ------------------------------------------------------------------------------------------------
def _tp_worker(rank, world, store_path, result_path):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    h, w, labels = _inputs(tokens=21, vocab=48)
    loss, dh, dw = _reference(h, w, labels, scale=0.5)
    local_vocab = w.shape[0] // world
    w_local = w.detach()[rank * local_vocab:(rank + 1) * local_vocab].clone().requires_grad_()
    h_local = h.detach().clone().requires_grad_()
    with counting_all_reduces() as calls:
        fused = linear_cross_entropy_sum(h_local, w_local, labels, rank * local_vocab, dist.group.WORLD, chunk=8)
    (fused * 0.5).backward()
    # This rank's hidden-state gradient is a partial sum over its words; the TP copy's backward all-reduces it.
    partial = h_local.grad.clone()
    dist.all_reduce(partial)
    torch.save({"calls": calls["n"], "loss": abs(fused.item() - loss.item()),
                "dh": (partial - dh).abs().max().item(),
                "dw": (w_local.grad - dw[rank * local_vocab:(rank + 1) * local_vocab]).abs().max().item()},
               f"{result_path}.{rank}")
    dist.destroy_process_group()


def test_vocab_parallel_chunks_equal_the_unsharded_loss_with_three_all_reduces_per_chunk(tmp_path):
    world = 2
    for r in run_gloo_workers(_tp_worker, world, tmp_path):
        assert r["calls"] == 3 * math.ceil(21 / 8)  # max, target logit, sum of exp, per chunk
        assert r["loss"] < 1e-10 and r["dh"] < 1e-10 and r["dw"] < 1e-10, r
