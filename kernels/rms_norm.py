"""Fused RMSNorm and residual-add + RMSNorm in Triton (forward and backward), with their PyTorch reference.

Semantics are Hugging Face LLaMA's, kept bit-for-bit in the order of operations:

    y = weight * (x_fp32 * rsqrt(mean(x_fp32 ** 2) + eps)).to(x.dtype) * scale

The normalised value is rounded to the input dtype *before* the weight multiply (as `LlamaRMSNorm` does),
then `weight * normed * scale` is computed in fp32 and rounded once to the output dtype, which is
`torch.promote_types(x.dtype, weight.dtype)` like the reference's. `scale` folds LayerNorm Scaling's
1/sqrt(layer + 1) into the same pass.

Three layers, as in Liger-Kernel: the Triton kernels; launchers (`rms_norm_forward`, `rms_norm_backward`)
that take and return tensors; and `torch.library` custom ops (`mixln::rms_norm`, `mixln::add_rms_norm`, with a
registered backward) behind `rms_norm` and `add_rms_norm`, which torch.compile sees as ops, not graph breaks.
Backward: dx = rstd * (g - n * mean(g * n)) with g = dy * weight * scale and n = x * rstd, all in fp32; the
weight gradient sum(dy * n) * scale is reduced in fp32 registers per program and summed once at the end. The
backward uses the unrounded fp32 `n` (the torch path's autograd uses `n` rounded to x.dtype; the two
differ by at most one rounding of x.dtype per term, and are identical in fp32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_mixln.kernels._common import (
    as_rows,
    cast_for_store,
    check_device,
    check_out,
    is_interpreted,
    norm_launch,
    persistent_programs,
    round_to,
)


# ----------------------------------------------------------------------------------------------------------
# PyTorch reference (the model's torch path; the tests evaluate it in float64)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, scale: float = 1.0) -> torch.Tensor:
    """HF LLaMA RMSNorm in plain PyTorch, times `scale`: weight * (x_f * rsqrt(mean(x_f^2) + eps)).to(x.dtype).

    x_f is x in fp32 (float64 stays float64, so the same function serves as the float64 test reference).
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * normed.to(x.dtype)
    if scale != 1.0:
        y = y * scale
    return y


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm_reference(x + residual), x + residual) in plain PyTorch."""
    summed = x + residual
    return rms_norm_reference(summed, weight, eps, scale), summed


# ----------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, Y, S, W, RSTD,
    stride_x, stride_r, stride_y, stride_s,
    n_rows, n_cols, eps, scale,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One tile of BLOCK_M rows per program; the whole row fits in BLOCK_N (masked past n_cols).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]

    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # The sum is rounded to the stream dtype exactly as `x + residual` in torch, and the norm is taken
        # of that rounded value, so the fused op equals rms_norm(x + residual) bit for bit in the inputs.
        summed = x + r
        tl.store(S + rows64 * stride_s + cols[None, :], cast_for_store(summed, S.dtype.element_ty), mask=mask)
        x = round_to(summed, S.dtype.element_ty)

    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    tl.store(RSTD + rows, rstd, mask=row_mask)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    normed = round_to(x * rstd[:, None], X.dtype.element_ty)  # HF: cast to the input dtype before the weight
    y = w[None, :] * normed * scale
    tl.store(Y + rows64 * stride_y + cols[None, :], cast_for_store(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DS, DX, DW_PARTIAL,
    stride_dy, stride_x, stride_ds, stride_dx,
    n_rows, n_cols, rows_per_program, scale,
    HAS_DS: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Persistent: each program walks its own contiguous range of rows, BLOCK_M at a time, and keeps the
    # weight gradient of those rows in fp32 registers; it writes one partial row of dW at the end.
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) * scale
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    for block_start in range(row_start, row_end, BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        normed = x * rstd[:, None]
        if COMPUTE_DX:
            g = dy * w[None, :]
            dot = tl.sum(g * normed, axis=1) / n_cols
            dx = rstd[:, None] * (g - normed * dot[:, None])
            if HAS_DS:  # gradient arriving through the `summed` output of add_rms_norm
                dx += tl.load(DS + rows64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows64 * stride_dx + cols[None, :], cast_for_store(dx, DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * normed

    if COMPUTE_DW:
        dw = tl.sum(dw_acc, axis=0) * scale
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=col_mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers: tensors in, tensors out


def _check_weight(weight: torch.Tensor, n_cols: int, op: str) -> None:
    if weight.dim() != 1 or weight.shape[0] != n_cols:
        raise ValueError(f"{op}: weight must have shape ({n_cols},) to match the last dimension of the input, "
                         f"got {tuple(weight.shape)}")


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, scale: float = 1.0,
                     residual: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                     summed_out: torch.Tensor | None = None):
    """Run the forward kernel. Returns (y, summed, rstd).

    With `residual`, the input normalised is summed = x + residual (returned, in x's dtype); otherwise
    summed is None. rstd is fp32 of shape (rows,), needed by `rms_norm_backward`. `out` / `summed_out`
    are optional contiguous output buffers (the tests pass NaN-filled ones).
    """
    op = "add_rms_norm" if residual is not None else "rms_norm"
    check_device(x, _rms_norm_fwd_kernel, op)
    n_cols = x.shape[-1]
    _check_weight(weight, n_cols, op)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"add_rms_norm: residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
        stream_dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(stream_dtype), residual.to(stream_dtype)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    check_out(out, x.shape, out_dtype, x.device, "out")
    y = out if out is not None else torch.empty(x.shape, dtype=out_dtype, device=x.device)
    summed = None
    if residual is not None:
        check_out(summed_out, x.shape, x.dtype, x.device, "summed_out")
        summed = summed_out if summed_out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)

    x2 = as_rows(x)
    n_rows = x2.shape[0]
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0 or n_cols == 0:
        return y, summed, rstd
    r2 = as_rows(residual) if residual is not None else x2
    s2 = summed.view(-1, n_cols) if summed is not None else x2
    y2 = y.view(-1, n_cols)
    interpreted = is_interpreted(_rms_norm_fwd_kernel)
    launch = norm_launch(n_rows, n_cols, interpreted)
    grid = (triton.cdiv(n_rows, launch.block_m),)
    _rms_norm_fwd_kernel[grid](
        x2, r2, y2, s2, weight.contiguous(), rstd,
        x2.stride(0), r2.stride(0), y2.stride(0), s2.stride(0),
        n_rows, n_cols, float(eps), float(scale),
        HAS_RESIDUAL=residual is not None, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
        num_warps=launch.num_warps,
    )
    return y, summed, rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      scale: float = 1.0, d_summed: torch.Tensor | None = None, *, compute_dx: bool = True,
                      compute_dw: bool = True, dx_out: torch.Tensor | None = None):
    """Run the backward kernel. Returns (dx, dw); either is None when not asked for.

    `x` is the tensor that was normalised (for add_rms_norm, the summed output) and `rstd` the forward's.
    `d_summed`, the gradient reaching add_rms_norm's summed output, is added into dx in the same pass.
    dx has x's dtype and shape, dw weight's dtype.
    """
    check_device(x, _rms_norm_bwd_kernel, "rms_norm backward")
    n_cols = x.shape[-1]
    _check_weight(weight, n_cols, "rms_norm backward")
    dx = dw = None
    if compute_dx:
        check_out(dx_out, x.shape, x.dtype, x.device, "dx_out")
        dx = dx_out if dx_out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x2 = as_rows(x)
    n_rows = x2.shape[0]
    if not (compute_dx or compute_dw):
        return dx, dw
    if n_rows == 0:
        if compute_dw:
            dw = torch.zeros_like(weight)
        return dx, dw
    dy2 = as_rows(dy)
    ds2 = as_rows(d_summed) if (d_summed is not None and compute_dx) else dy2
    dx2 = dx.view(-1, n_cols) if compute_dx else dy2
    interpreted = is_interpreted(_rms_norm_bwd_kernel)
    launch = norm_launch(n_rows, n_cols, interpreted)
    programs, rows_per_program = persistent_programs(n_rows, launch, x.device, interpreted)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device) if compute_dw else rstd
    _rms_norm_bwd_kernel[(programs,)](
        dy2, x2, weight.contiguous(), rstd, ds2, dx2, dw_partial,
        dy2.stride(0), x2.stride(0), ds2.stride(0), dx2.stride(0),
        n_rows, n_cols, rows_per_program, float(scale),
        HAS_DS=d_summed is not None and compute_dx, COMPUTE_DX=compute_dx, COMPUTE_DW=compute_dw,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, num_warps=launch.num_warps,
    )
    if compute_dw:
        dw = dw_partial.sum(0).to(weight.dtype)
    return dx, dw


# ----------------------------------------------------------------------------------------------------------
# PyTorch custom ops (`torch.library`) and the public API
#
# Registered as ops, not autograd.Functions: torch.compile sees each as one opaque node with a fake (meta)
# implementation and a registered backward, so a compiled layer keeps its fused kernels and has no graph
# break. Eager calls take the same path. The backward op always computes both dx and dw (a custom op returns
# tensors, never None); the weight gradient is one small reduction.


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


@torch.library.custom_op("mixln::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    x_rows = as_rows(x)
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _, _, rstd = rms_norm_forward(x_rows, weight, eps, scale, out=y.view(x_rows.shape))
    return y, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps, scale):
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty((_rows(x),), dtype=torch.float32))


@torch.library.custom_op("mixln::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rms_norm_forward(x, weight, eps, scale, residual=residual)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, scale):
    stream = torch.promote_types(x.dtype, residual.dtype)
    return (x.new_empty(x.shape, dtype=torch.promote_types(stream, weight.dtype)), x.new_empty(x.shape, dtype=stream),
            x.new_empty((_rows(x),), dtype=torch.float32))


@torch.library.custom_op("mixln::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, scale: float,
                          d_summed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw); `x` is what was normalised, `d_summed` the gradient reaching add_rms_norm's `summed` output."""
    x_rows = as_rows(x)
    dx, dw = rms_norm_backward(dy.reshape(x_rows.shape), x_rows, weight, rstd, scale,
                               d_summed=None if d_summed is None else d_summed.reshape(x_rows.shape))
    return dx.view(x.shape), dw


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, scale, d_summed):
    return x.new_empty(x.shape), torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _, scale = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.scale = scale


def _rms_norm_grad(ctx, dy, _d_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_backward_op(dy, x, weight, rstd, ctx.scale, None)
    return dx, dw, None, None


def _add_rms_norm_setup(ctx, inputs, output):
    x, residual, weight, _, scale = inputs
    ctx.save_for_backward(output[1], weight, output[2])  # summed, weight, rstd
    ctx.scale = scale
    ctx.input_dtypes = (x.dtype, residual.dtype)


def _add_rms_norm_grad(ctx, dy, d_summed, _d_rstd):
    summed, weight, rstd = ctx.saved_tensors
    dsum, dw = _rms_norm_backward_op(dy, summed, weight, rstd, ctx.scale, d_summed)
    # x and residual receive the same gradient (d summed); autograd copies before accumulating.
    return dsum.to(ctx.input_dtypes[0]), dsum.to(ctx.input_dtypes[1]), dw, None, None


_rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)
_add_rms_norm_op.register_autograd(_add_rms_norm_grad, setup_context=_add_rms_norm_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, scale: float = 1.0) -> torch.Tensor:
    """Fused RMSNorm over the last dimension, HF LLaMA semantics, times `scale`. Differentiable in x and weight."""
    return _rms_norm_op(x, weight, float(eps), float(scale))[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass over memory. Differentiable in x, residual, weight.

    Use `summed` as the next residual (Pre-LN hand-over) or drop it (Post-LN tail); gradients reaching it
    are added to those of the norm inside the backward kernel.
    """
    if residual.shape != x.shape:  # checked here too: the op's fake implementation would not notice
        raise ValueError(f"add_rms_norm: residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
    y, summed, _ = _add_rms_norm_op(x, residual, weight, float(eps), float(scale))
    return y, summed
