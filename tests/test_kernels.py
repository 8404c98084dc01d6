"""Fused Triton kernels (RMSNorm, residual-add + RMSNorm, SwiGLU) against a float64 PyTorch reference.

Runs on CPU under Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py). With
MIXLN_TEST_DEVICE=cuda (and TRITON_INTERPRET=0 in the environment) the same tests run on a GPU; that is what
kernels/gpu_check.sh does. Inputs are fresh random each run; the seed is in every failure message and
MIXLN_TEST_SEED=<seed> replays it.

Tolerances (kernels/checks.py, which mixln-preflight applies on a cluster's devices too): fp32 outputs within 1e-5
of the float64 reference relative to its largest magnitude; bf16 / fp16 outputs within two units of their rounding
(u = 2^-8 / 2^-11) of each element, plus two units of the tensor's RMS for values produced by sums that cancel:
|out - ref| <= 2u (|ref| + rms(ref)).
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import triton
import triton.language as tl

from megatron_mixln.kernels import (
    add_rms_norm,
    add_rms_norm_reference,
    rms_norm,
    rms_norm_backward,
    rms_norm_forward,
    rms_norm_reference,
    swiglu,
    swiglu_backward,
    swiglu_forward,
    swiglu_reference,
)
from megatron_mixln.kernels import _common
from megatron_mixln.kernels.checks import EPS, error_ratio
from megatron_mixln.kernels._common import cast_for_store, elementwise_launch, norm_launch, persistent_programs, \
    round_to_bf16

DEVICE = torch.device(os.environ.get("MIXLN_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("MIXLN_TEST_DEVICE=cuda but no CUDA device is visible", allow_module_level=True)

# The paper's odd sizes (none a power of two) plus a tiny shape; rows kept small, hidden sizes are what matter.
SHAPES = [(2, 3, 7), (3, 5, 1368), (7, 5461), (1, 11008), (17, 4096)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class Rand:
    """Fresh random tensors on DEVICE from one recorded seed."""

    def __init__(self, seed: int):
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, shape, dtype, row_scales: bool = False) -> torch.Tensor:
        t = torch.randn(shape, generator=self.gen, dtype=torch.float64)
        if row_scales:  # rows of very different magnitudes: a wrong row's rstd cannot pass
            t = t * 10.0 ** (4 * torch.rand(shape[:-1] + (1,), generator=self.gen, dtype=torch.float64) - 2)
        return t.to(dtype).to(DEVICE)

    def weight(self, n, dtype) -> torch.Tensor:
        w = 1.0 + 0.5 * torch.randn(n, generator=self.gen, dtype=torch.float64)
        return w.to(dtype).to(DEVICE)


@pytest.fixture
def rand() -> Rand:
    seed = int(os.environ.get("MIXLN_TEST_SEED", 0)) or int.from_bytes(os.urandom(4), "little")
    return Rand(seed)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str, seed: int) -> None:
    """`out` equals the float64 `ref` to the precision of `dtype` (kernels/checks.py's contract: the module
    docstring gives the bounds)."""
    assert tuple(out.shape) == tuple(ref.shape), f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{what}: non-finite output (an element never written?) [seed {seed}]"
    ratio = error_ratio(out, ref, dtype)
    assert ratio <= 1, f"{what}: {ratio:.2f}x the {dtype} tolerance [seed {seed}]"


def float64_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64).requires_grad_(True)


# ---------------------------------------------------------------------------------------------------------
# RMSNorm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_output_and_grads_match_float64(shape, dtype, rand):
    x = rand.normal(shape, dtype, row_scales=True).requires_grad_(True)
    w = rand.weight(shape[-1], dtype).requires_grad_(True)
    dy = rand.normal(shape, dtype)
    y = rms_norm(x, w, EPS)
    y.backward(dy)

    x64, w64 = float64_leaf(x), float64_leaf(w)
    y64 = rms_norm_reference(x64, w64, EPS)
    y64.backward(dy.to("cpu", torch.float64))
    assert y.dtype == dtype
    assert_matches(y, y64, dtype, "y", rand.seed)
    assert_matches(x.grad, x64.grad, dtype, "dx", rand.seed)
    assert_matches(w.grad, w64.grad, dtype, "dw", rand.seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_scale_multiplies_output_and_grads(dtype, rand):
    shape, scale = (3, 5, 1368), 1.0 / math.sqrt(7)  # LayerNorm Scaling at layer 6
    x = rand.normal(shape, dtype).requires_grad_(True)
    w = rand.weight(shape[-1], dtype).requires_grad_(True)
    dy = rand.normal(shape, dtype)
    y = rms_norm(x, w, EPS, scale=scale)
    y.backward(dy)
    x64, w64 = float64_leaf(x), float64_leaf(w)
    y64 = rms_norm_reference(x64, w64, EPS, scale=scale)
    y64.backward(dy.to("cpu", torch.float64))
    assert_matches(y, y64, dtype, "y", rand.seed)
    assert_matches(x.grad, x64.grad, dtype, "dx", rand.seed)
    assert_matches(w.grad, w64.grad, dtype, "dw", rand.seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_launchers_write_every_element_of_poisoned_outputs(shape, dtype, rand):
    x = rand.normal(shape, dtype)
    w = rand.weight(shape[-1], dtype)
    dy = rand.normal(shape, dtype)
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    y, _, rstd = rms_norm_forward(x, w, EPS, out=out)
    assert y is out
    dx_out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    dx, dw = rms_norm_backward(dy, x, w, rstd, dx_out=dx_out)
    assert dx is dx_out
    x64, w64 = float64_leaf(x), float64_leaf(w)
    y64 = rms_norm_reference(x64, w64, EPS)
    y64.backward(dy.to("cpu", torch.float64))
    assert_matches(y, y64, dtype, "y", rand.seed)
    assert_matches(dx, x64.grad, dtype, "dx", rand.seed)
    assert_matches(dw, w64.grad, dtype, "dw", rand.seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_non_contiguous_inputs(dtype, rand):
    # A transposed view (copied once) and a row-strided slice of a wider tensor (used in place).
    w = rand.weight(1368, dtype).requires_grad_(True)
    transposed = rand.normal((5, 3, 1368), dtype, row_scales=True).transpose(0, 1).requires_grad_(True)
    sliced_base = rand.normal((7, 1368 + 40), dtype, row_scales=True)
    sliced = sliced_base[:, 13:13 + 1368].requires_grad_(True)
    assert not transposed.is_contiguous() and not sliced.is_contiguous()
    for x in (transposed, sliced):
        w.grad = None
        dy = rand.normal(tuple(x.shape[::-1]), dtype).transpose(0, -1)  # a non-contiguous gradient too
        y = rms_norm(x, w, EPS)
        y.backward(dy)
        x64, w64 = float64_leaf(x), float64_leaf(w)
        y64 = rms_norm_reference(x64, w64, EPS)
        y64.backward(dy.to("cpu", torch.float64))
        assert_matches(y, y64, dtype, "y", rand.seed)
        assert_matches(x.grad, x64.grad, dtype, "dx", rand.seed)
        assert_matches(w.grad, w64.grad, dtype, "dw", rand.seed)


def test_rms_norm_expanded_gradient_from_sum(rand):
    x = rand.normal((4, 6, 1368), torch.float32).requires_grad_(True)
    w = rand.weight(1368, torch.float32).requires_grad_(True)
    rms_norm(x, w, EPS).sum().backward()  # autograd hands the kernel a stride-0 gradient
    x64, w64 = float64_leaf(x), float64_leaf(w)
    rms_norm_reference(x64, w64, EPS).sum().backward()
    assert_matches(x.grad, x64.grad, torch.float32, "dx", rand.seed)
    assert_matches(w.grad, w64.grad, torch.float32, "dw", rand.seed)


@pytest.mark.parametrize("needs", ["x", "weight"])
def test_rms_norm_grad_of_only_one_input(needs, rand):
    x = rand.normal((7, 5461), torch.bfloat16).requires_grad_(needs == "x")
    w = rand.weight(5461, torch.bfloat16).requires_grad_(needs == "weight")
    dy = rand.normal((7, 5461), torch.bfloat16)
    rms_norm(x, w, EPS).backward(dy)
    x64, w64 = float64_leaf(x), float64_leaf(w)
    rms_norm_reference(x64, w64, EPS).backward(dy.to("cpu", torch.float64))
    if needs == "x":
        assert w.grad is None
        assert_matches(x.grad, x64.grad, torch.bfloat16, "dx", rand.seed)
    else:
        assert x.grad is None
        assert_matches(w.grad, w64.grad, torch.bfloat16, "dw", rand.seed)


def test_rms_norm_fp32_weight_on_bf16_input_promotes_like_the_reference(rand):
    x = rand.normal((17, 4096), torch.bfloat16).requires_grad_(True)
    w = rand.weight(4096, torch.float32).requires_grad_(True)
    y = rms_norm(x, w, EPS)
    assert y.dtype == rms_norm_reference(x, w, EPS).dtype == torch.float32
    dy = rand.normal((17, 4096), torch.float32)
    y.backward(dy)
    x64, w64 = float64_leaf(x), float64_leaf(w)
    rms_norm_reference(x64, w64, EPS).backward(dy.to("cpu", torch.float64))
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    # The normalised value is rounded to bf16 before the weight multiply: bf16's unit bounds the output.
    assert_matches(y, rms_norm_reference(x64, w64, EPS), torch.bfloat16, "y", rand.seed)
    assert_matches(x.grad, x64.grad, torch.bfloat16, "dx", rand.seed)
    assert_matches(w.grad, w64.grad, torch.float32, "dw", rand.seed)


def test_rms_norm_reference_is_hf_llama_formula(rand):
    x = rand.normal((3, 5, 1368), torch.bfloat16, row_scales=True)
    w = rand.weight(1368, torch.bfloat16)
    # transformers' LlamaRMSNorm.forward, written out.
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hf = w * (hidden * torch.rsqrt(variance + EPS)).to(torch.bfloat16)
    assert torch.equal(rms_norm_reference(x, w, EPS), hf)


def test_rms_norm_of_zero_rows_and_empty_input(rand):
    x = rand.normal((4, 1368), torch.float32)
    x[1] = 0.0
    w = rand.weight(1368, torch.float32)
    y = rms_norm(x, w, EPS)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    empty = torch.empty((0, 1368), device=DEVICE, requires_grad=True)
    out = rms_norm(empty, w.requires_grad_(True), EPS)
    out.sum().backward()
    assert out.shape == (0, 1368) and torch.equal(w.grad, torch.zeros_like(w))


def test_rms_norm_rejects_a_weight_of_the_wrong_size(rand):
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(rand.normal((2, 8), torch.float32), rand.weight(7, torch.float32), EPS)


# ---------------------------------------------------------------------------------------------------------
# Residual add + RMSNorm


def _add_rms_norm_float64(x, r, w, g_normed, g_summed, scale=1.0):
    """Float64 reference of add_rms_norm's outputs and gradients for the loss <normed, g_n> + <summed, g_s>.

    The kernel, like the torch path, normalises the sum rounded to the stream dtype, so the reference
    normalises that same (exact) value.
    """
    summed = (x + r).detach()
    s64, w64 = float64_leaf(summed), float64_leaf(w)
    y64 = rms_norm_reference(s64, w64, EPS, scale)
    y64.backward(g_normed.to("cpu", torch.float64))
    d_sum = s64.grad + (g_summed.to("cpu", torch.float64) if g_summed is not None else 0.0)
    return y64, summed, d_sum, w64.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_rms_norm_outputs_and_grads_match_float64(shape, dtype, rand):
    x = rand.normal(shape, dtype, row_scales=True).requires_grad_(True)
    r = rand.normal(shape, dtype, row_scales=True).requires_grad_(True)
    w = rand.weight(shape[-1], dtype).requires_grad_(True)
    g_n, g_s = rand.normal(shape, dtype), rand.normal(shape, dtype)
    normed, summed = add_rms_norm(x, r, w, EPS)
    # `summed` used downstream too (the next residual): its gradient joins the norm's.
    torch.autograd.backward([normed, summed], [g_n, g_s])

    y64, summed_ref, d_sum, dw64 = _add_rms_norm_float64(x, r, w, g_n, g_s)
    assert summed.dtype == dtype and torch.equal(summed, summed_ref), f"summed != x + residual [seed {rand.seed}]"
    assert_matches(normed, y64, dtype, "normed", rand.seed)
    assert_matches(x.grad, d_sum, dtype, "dx", rand.seed)
    assert_matches(r.grad, d_sum, dtype, "dresidual", rand.seed)
    assert_matches(w.grad, dw64, dtype, "dw", rand.seed)


def test_add_rms_norm_summed_is_exactly_x_plus_residual_in_fp32(rand):
    x = rand.normal((7, 5461), torch.float32, row_scales=True)
    r = rand.normal((7, 5461), torch.float32, row_scales=True)
    _, summed = add_rms_norm(x, r, rand.weight(5461, torch.float32), EPS)
    assert torch.equal(summed, x + r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_add_rms_norm_post_ln_tail_with_summed_unused(dtype, rand):
    shape, scale = (3, 5, 1368), 1.0 / math.sqrt(3)
    x = rand.normal(shape, dtype).requires_grad_(True)
    r = rand.normal(shape, dtype).requires_grad_(True)
    w = rand.weight(1368, dtype).requires_grad_(True)
    g_n = rand.normal(shape, dtype)
    normed, _ = add_rms_norm(x, r, w, EPS, scale=scale)
    normed.backward(g_n)
    y64, _, d_sum, dw64 = _add_rms_norm_float64(x, r, w, g_n, None, scale)
    assert_matches(normed, y64, dtype, "normed", rand.seed)
    assert_matches(x.grad, d_sum, dtype, "dx", rand.seed)
    assert_matches(r.grad, d_sum, dtype, "dresidual", rand.seed)
    assert_matches(w.grad, dw64, dtype, "dw", rand.seed)


def test_add_rms_norm_with_only_summed_used_passes_its_gradient_through(rand):
    x = rand.normal((7, 5461), torch.float32).requires_grad_(True)
    r = rand.normal((7, 5461), torch.float32).requires_grad_(True)
    w = rand.weight(5461, torch.float32).requires_grad_(True)
    g_s = rand.normal((7, 5461), torch.float32)
    _, summed = add_rms_norm(x, r, w, EPS)
    summed.backward(g_s)
    assert torch.equal(x.grad, g_s) and torch.equal(r.grad, g_s)
    assert w.grad is None or torch.equal(w.grad, torch.zeros_like(w))


def test_add_rms_norm_grads_of_x_and_residual_are_independent_tensors(rand):
    x = rand.normal((17, 4096), torch.bfloat16).requires_grad_(True)
    r = rand.normal((17, 4096), torch.bfloat16).requires_grad_(True)
    w = rand.weight(4096, torch.bfloat16)
    normed, summed = add_rms_norm(x, r, w, EPS)
    torch.autograd.backward([normed, summed], [rand.normal((17, 4096), torch.bfloat16)] * 2)
    kept = r.grad.clone()
    x.grad.zero_()
    assert torch.equal(r.grad, kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_add_rms_norm_non_contiguous_inputs(dtype, rand):
    x = rand.normal((5, 3, 1368), dtype).transpose(0, 1).requires_grad_(True)
    r = rand.normal((3, 5, 1368 + 24), dtype)[..., 24:].requires_grad_(True)
    w = rand.weight(1368, dtype).requires_grad_(True)
    g_n, g_s = rand.normal((3, 5, 1368), dtype), rand.normal((3, 5, 1368), dtype)
    normed, summed = add_rms_norm(x, r, w, EPS)
    torch.autograd.backward([normed, summed], [g_n, g_s])
    y64, summed_ref, d_sum, dw64 = _add_rms_norm_float64(x, r, w, g_n, g_s)
    assert torch.equal(summed, summed_ref)
    assert_matches(normed, y64, dtype, "normed", rand.seed)
    assert_matches(x.grad, d_sum, dtype, "dx", rand.seed)
    assert_matches(r.grad, d_sum, dtype, "dresidual", rand.seed)
    assert_matches(w.grad, dw64, dtype, "dw", rand.seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_rms_norm_launchers_write_every_element_of_poisoned_outputs(shape, dtype, rand):
    x, r = rand.normal(shape, dtype), rand.normal(shape, dtype)
    w = rand.weight(shape[-1], dtype)
    g_n, g_s = rand.normal(shape, dtype), rand.normal(shape, dtype)
    nan = dict(dtype=dtype, device=DEVICE)
    out, summed_out = torch.full(shape, float("nan"), **nan), torch.full(shape, float("nan"), **nan)
    y, summed, rstd = rms_norm_forward(x, w, EPS, residual=r, out=out, summed_out=summed_out)
    assert y is out and summed is summed_out
    dx_out = torch.full(shape, float("nan"), **nan)
    dx, dw = rms_norm_backward(g_n, summed, w, rstd, d_summed=g_s, dx_out=dx_out)
    assert dx is dx_out
    y64, summed_ref, d_sum, dw64 = _add_rms_norm_float64(x, r, w, g_n, g_s)
    assert torch.equal(summed, summed_ref)
    assert_matches(y, y64, dtype, "normed", rand.seed)
    assert_matches(dx, d_sum, dtype, "dx", rand.seed)
    assert_matches(dw, dw64, dtype, "dw", rand.seed)


def test_add_rms_norm_reference_is_add_then_norm(rand):
    x, r = rand.normal((3, 5, 1368), torch.bfloat16), rand.normal((3, 5, 1368), torch.bfloat16)
    w = rand.weight(1368, torch.bfloat16)
    normed, summed = add_rms_norm_reference(x, r, w, EPS, 0.5)
    assert torch.equal(summed, x + r) and torch.equal(normed, rms_norm_reference(x + r, w, EPS, 0.5))


# ---------------------------------------------------------------------------------------------------------
# SwiGLU


def _swiglu_float64(gate, up, dy):
    g64, u64 = float64_leaf(gate), float64_leaf(up)
    y64 = swiglu_reference(g64, u64)
    y64.backward(dy.to("cpu", torch.float64))
    return y64, g64.grad, u64.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_output_and_grads_match_float64(shape, dtype, rand):
    gate = (3 * rand.normal(shape, torch.float64)).to(dtype).requires_grad_(True)  # into SiLU's tails too
    up = rand.normal(shape, dtype).requires_grad_(True)
    dy = rand.normal(shape, dtype)
    y = swiglu(gate, up)
    y.backward(dy)
    y64, dg64, du64 = _swiglu_float64(gate, up, dy)
    assert y.dtype == dtype
    assert_matches(y, y64, dtype, "y", rand.seed)
    assert_matches(gate.grad, dg64, dtype, "dgate", rand.seed)
    assert_matches(up.grad, du64, dtype, "dup", rand.seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_on_halves_of_a_fused_gate_up_projection(dtype, rand):
    # The model's layout: gate and up are row-strided views into one (tokens, 2 * intermediate) tensor.
    fused = rand.normal((3, 5, 2 * 5461), dtype).requires_grad_(True)
    gate, up = fused.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    dy = rand.normal((3, 5, 5461), dtype)
    y = swiglu(gate, up)
    y.backward(dy)
    y64, dg64, du64 = _swiglu_float64(gate, up, dy)
    assert_matches(y, y64, dtype, "y", rand.seed)
    assert_matches(fused.grad[..., :5461], dg64, dtype, "dgate", rand.seed)
    assert_matches(fused.grad[..., 5461:], du64, dtype, "dup", rand.seed)


def test_swiglu_transposed_inputs(rand):
    gate = rand.normal((1368, 6), torch.bfloat16).t().requires_grad_(True)
    up = rand.normal((6, 1368), torch.bfloat16).requires_grad_(True)
    dy = rand.normal((1368, 6), torch.bfloat16).t()
    y = swiglu(gate, up)
    y.backward(dy)
    y64, dg64, du64 = _swiglu_float64(gate, up, dy)
    assert_matches(y, y64, torch.bfloat16, "y", rand.seed)
    assert_matches(gate.grad, dg64, torch.bfloat16, "dgate", rand.seed)
    assert_matches(up.grad, du64, torch.bfloat16, "dup", rand.seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_launchers_write_every_element_of_poisoned_outputs(shape, dtype, rand):
    gate, up, dy = rand.normal(shape, dtype), rand.normal(shape, dtype), rand.normal(shape, dtype)
    nan = dict(dtype=dtype, device=DEVICE)
    out = torch.full(shape, float("nan"), **nan)
    dg_out, du_out = torch.full(shape, float("nan"), **nan), torch.full(shape, float("nan"), **nan)
    assert swiglu_forward(gate, up, out=out) is out
    dg, du = swiglu_backward(dy, gate, up, dgate_out=dg_out, dup_out=du_out)
    assert dg is dg_out and du is du_out
    y64, dg64, du64 = _swiglu_float64(gate, up, dy)
    assert_matches(out, y64, dtype, "y", rand.seed)
    assert_matches(dg, dg64, dtype, "dgate", rand.seed)
    assert_matches(du, du64, dtype, "dup", rand.seed)


def test_swiglu_backward_recomputes_silu_from_saved_inputs(rand):
    gate = rand.normal((7, 5461), torch.bfloat16).requires_grad_(True)
    up = rand.normal((7, 5461), torch.bfloat16).requires_grad_(True)
    y = swiglu(gate, up)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 2 and saved[0] is gate and saved[1] is up  # no silu(gate) kept alive


def test_swiglu_extreme_gates_stay_finite(rand):
    gate = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4]], device=DEVICE).requires_grad_(True)
    up = torch.ones_like(gate).requires_grad_(True)
    y = swiglu(gate, up)
    y.backward(torch.ones_like(y))
    y64, dg64, du64 = _swiglu_float64(gate, up, torch.ones_like(y))
    assert_matches(y, y64, torch.float32, "y", rand.seed)
    assert_matches(gate.grad, dg64, torch.float32, "dgate", rand.seed)
    assert_matches(up.grad, du64, torch.float32, "dup", rand.seed)


# ---------------------------------------------------------------------------------------------------------
# NaN and inf: kept by the bf16 rounding, and by every kernel as by the reference


@triton.jit
def _round_to_bf16_kernel(X, Y, Y_BF16, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(X + offsets, mask=mask)
    tl.store(Y + offsets, round_to_bf16(x), mask=mask)
    tl.store(Y_BF16 + offsets, cast_for_store(x, Y_BF16.dtype.element_ty), mask=mask)


# fp32 bit patterns: the GPU's arithmetic NaN 0x7FFFFFFF and its negative, signalling and quiet NaNs of both
# signs, +-inf, values that round past bf16's largest (to +-inf) and just below it, bf16's largest, +-0, ties
# to even, normal and subnormal values.
ROUNDING_PATTERNS = [0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0xFF800001, 0x7FC00000, 0xFFC00000, 0x7F800000,
                     0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x7F7F0000, 0xFF7F0000, 0x00000000,
                     0x80000000, 0x3F800000, 0x3F808000, 0x3F818000, 0xBF80C000, 0x40490FDB, 0x00000001,
                     0x00008000, 0x80018000, 0x007FFFFF, 0x807F8000]


def test_round_to_bf16_matches_torch_and_keeps_nan_and_inf():
    bits = torch.tensor(ROUNDING_PATTERNS, dtype=torch.int64).to(torch.int32)  # wraps to the same 32 bits
    x = bits.view(torch.float32).to(DEVICE)
    out, stored = torch.empty_like(x), torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _round_to_bf16_kernel[(1,)](x, out, stored, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    out, stored, x = out.cpu(), stored.cpu(), x.cpu()
    assert torch.equal(stored.float().view(torch.int32), out.view(torch.int32)), "a store rounds as round_to_bf16"
    expected = x.to(torch.bfloat16).float()
    as_hex = lambda t: [f"{b & 0xFFFFFFFF:08X}" for b in t.view(torch.int32).tolist()]  # noqa: E731
    nan = torch.isnan(x)
    assert torch.equal(torch.isnan(expected), nan) and nan.sum() == 6
    assert torch.equal(out[~nan].view(torch.int32), expected[~nan].view(torch.int32)), \
        list(zip(as_hex(x[~nan]), as_hex(out[~nan]), as_hex(expected[~nan])))
    # A NaN stays a quiet NaN of its sign (torch's CPU cast makes every NaN 0xFFFF, so the sign is the input's).
    out_bits = out[nan].view(torch.int32)
    assert torch.isnan(out[nan]).all() and torch.equal(torch.signbit(out[nan]), torch.signbit(x[nan])), \
        list(zip(as_hex(x[nan]), as_hex(out[nan])))
    assert ((out_bits & 0x00400000) != 0).all() and ((out_bits & 0xFFFF) == 0).all(), as_hex(out[nan])


@pytest.fixture
def gpu_nan_bits(monkeypatch):
    """NaNs made by the kernels' fp32 arithmetic carry the GPU's bits (0x7FFFFFFF), not numpy's (0xFFC00000)."""
    if DEVICE.type == "cpu":  # on a GPU they already do
        monkeypatch.setattr(_common, "GPU_NAN_IN_INTERPRETER", tl.constexpr(True))


def assert_non_finite_like(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str, seed: int) -> None:
    """NaN, +inf and -inf where the float64 reference has them; elsewhere as `assert_matches`."""
    out64, ref64 = out.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    for name, where in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert torch.equal(where(out64), where(ref64)), (f"{what}: {name} at {where(out64).nonzero().tolist()}, "
                                                         f"reference at {where(ref64).nonzero().tolist()} [seed {seed}]")
    finite = torch.isfinite(ref64)
    assert_matches(out64[finite], ref64[finite], dtype, what, seed)


def with_inf(t: torch.Tensor, *where: tuple[int, int, float]) -> torch.Tensor:
    t = t.clone()
    for row, col, value in where:
        t[row, col] = value
    return t.requires_grad_(True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_of_rows_holding_inf_is_non_finite_like_the_reference(dtype, rand, gpu_nan_bits):
    x = with_inf(rand.normal((4, 40), dtype), (1, 5, math.inf), (2, 7, -math.inf))
    w = rand.weight(40, dtype).requires_grad_(True)
    dy = rand.normal((4, 40), dtype)
    y = rms_norm(x, w, EPS)
    y.backward(dy)
    x64, w64 = float64_leaf(x), float64_leaf(w)
    y64 = rms_norm_reference(x64, w64, EPS)
    y64.backward(dy.to("cpu", torch.float64))
    assert y64.isnan().any() and x64.grad.isnan().any() and w64.grad.isnan().any()
    assert_non_finite_like(y, y64, dtype, "y", rand.seed)
    assert_non_finite_like(x.grad, x64.grad, dtype, "dx", rand.seed)
    assert_non_finite_like(w.grad, w64.grad, dtype, "dw", rand.seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_of_rows_holding_inf_is_non_finite_like_the_reference(dtype, rand, gpu_nan_bits):
    x = with_inf(rand.normal((4, 40), dtype), (1, 5, math.inf))
    r = with_inf(rand.normal((4, 40), dtype), (2, 7, -math.inf))
    w = rand.weight(40, dtype).requires_grad_(True)
    g_n, g_s = rand.normal((4, 40), dtype), rand.normal((4, 40), dtype)
    normed, summed = add_rms_norm(x, r, w, EPS)
    torch.autograd.backward([normed, summed], [g_n, g_s])
    y64, summed_ref, d_sum, dw64 = _add_rms_norm_float64(x, r, w, g_n, g_s)
    assert y64.isnan().any() and d_sum.isnan().any() and dw64.isnan().any()
    assert_non_finite_like(summed, summed_ref, dtype, "summed", rand.seed)
    assert_non_finite_like(normed, y64, dtype, "normed", rand.seed)
    assert_non_finite_like(x.grad, d_sum, dtype, "dx", rand.seed)
    assert_non_finite_like(r.grad, d_sum, dtype, "dresidual", rand.seed)
    assert_non_finite_like(w.grad, dw64, dtype, "dw", rand.seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_of_inf_is_non_finite_like_the_reference(dtype, rand, gpu_nan_bits):
    # silu(+inf) = inf, silu(-inf) = -inf * 0 = NaN, and the gate gradient at +inf is 1 + inf * 0 = NaN.
    gate = with_inf(rand.normal((4, 40), dtype), (0, 3, math.inf), (1, 4, -math.inf))
    up = with_inf(rand.normal((4, 40), dtype), (2, 5, -math.inf))
    dy = rand.normal((4, 40), dtype)
    y = swiglu(gate, up)
    y.backward(dy)
    y64, dg64, du64 = _swiglu_float64(gate, up, dy)
    assert y64.isnan().any() and dg64.isnan().any() and du64.isnan().any()
    assert_non_finite_like(y, y64, dtype, "y", rand.seed)
    assert_non_finite_like(gate.grad, dg64, dtype, "dgate", rand.seed)
    assert_non_finite_like(up.grad, du64, dtype, "dup", rand.seed)


# ---------------------------------------------------------------------------------------------------------
# Launch shapes


def test_interpreter_launches_process_several_rows_per_program():
    # One row per program is ~15x slower under the interpreter (kernels/README.md).
    for n_rows, n_cols in [(17, 4096), (15, 1368), (7, 5461), (4, 11008)]:
        launch = norm_launch(n_rows, n_cols, interpreted=True)
        assert launch.block_m >= min(n_rows, 4) and launch.block_n >= n_cols
        programs, rows_per_program = persistent_programs(n_rows, launch, torch.device("cpu"), interpreted=True)
        assert rows_per_program >= min(n_rows, 4) and programs * rows_per_program >= n_rows
        assert elementwise_launch(n_rows, n_cols, interpreted=True).block_m >= min(n_rows, 4)


def test_gpu_launch_shapes_cover_every_column_with_power_of_two_blocks():
    for n_cols in (512, 768, 1368, 2048, 4096, 5461, 8192, 11008):
        launch = norm_launch(32768, n_cols, interpreted=False)
        assert launch.block_n >= n_cols and launch.block_n & (launch.block_n - 1) == 0
        assert launch.block_m == 1 or launch.block_m * launch.block_n <= 2048  # ~16 fp32 per thread at 4 warps


# ---------------------------------------------------------------------------------------------------------
# Benchmark script


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU the script benchmarks instead (kernels/gpu_check.sh)")
def test_bench_without_gpu_says_so_in_one_line_and_runs_the_smoke_pass(tmp_path, capsys):
    from megatron_mixln.kernels.bench import main

    out = tmp_path / "smoke.json"
    assert main(["--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("No CUDA GPU") and "interpreter" in lines[0]
    assert any("all kernels match the float64 reference" in line for line in lines)
    import json

    smoke = json.loads(out.read_text())["smoke"]
    assert smoke and all(row["ok"] for row in smoke)


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type == "cuda", reason="the GPU run compiles the kernels for real")
def test_every_kernel_variant_compiles_for_hopper_without_register_spills():
    # Triton's bundled ptxas builds for sm_90 without a GPU: GPU-only compile errors fail here, on CPU.
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    run = subprocess.run([sys.executable, "-m", "megatron_mixln.kernels.bench", "--compile-report"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and ("fwd" in line or "bwd" in line)]
    assert len(rows) >= 20, run.stdout
    spills = [row for row in rows if row.rstrip(" |").split("|")[-1].strip() not in ("0", "?")]
    assert not spills, f"register spills: {spills}"


@pytest.mark.skipif(DEVICE.type == "cuda", reason="checks the CPU error path")
def test_cpu_tensor_without_the_interpreter_is_refused_in_one_sentence():
    import subprocess
    import sys

    code = ("import torch\nfrom megatron_mixln.kernels import rms_norm\n"
            "try:\n    rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)\nexcept RuntimeError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="0"),
                         capture_output=True, text=True, timeout=300)
    assert "need CUDA tensors" in run.stdout and "TRITON_INTERPRET=1" in run.stdout, run.stdout + run.stderr
