"""SwiGLU activation, silu(gate) * up, in Triton (forward and backward), with its PyTorch reference.

All arithmetic is fp32; each output is rounded once to gate's dtype. The backward recomputes sigmoid(gate)
from gate instead of storing silu(gate) (Liger-Kernel's choice: one fewer activation-sized tensor kept):

    d_up   = dy * silu(gate)
    d_gate = dy * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))

gate and up may be row-strided views, e.g. the two halves of a fused gate/up projection's output; the kernels
take the row strides and copy nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from megatron_mixln.kernels._common import as_rows, cast_for_store, check_device, check_out, elementwise_launch, \
    is_interpreted


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in plain PyTorch."""
    return F.silu(gate) * up


@triton.jit
def _swiglu_fwd_kernel(
    G, U, Y, stride_g, stride_u, stride_y, n_rows, n_cols, n_col_tiles,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # a contiguous tensor is one long row: columns can pass 2^31
    rows = (pid // n_col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows[:, None]
    cols64 = cols[None, :]
    g = tl.load(G + rows64 * stride_g + cols64, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows64 * stride_u + cols64, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + rows64 * stride_y + cols64, cast_for_store(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU, stride_dy, stride_g, stride_u, stride_dg, stride_du, n_rows, n_cols, n_col_tiles,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # a contiguous tensor is one long row: columns can pass 2^31
    rows = (pid // n_col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows[:, None]
    cols64 = cols[None, :]
    dy = tl.load(DY + rows64 * stride_dy + cols64, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows64 * stride_g + cols64, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows64 * stride_u + cols64, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    du = dy * silu
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + rows64 * stride_dg + cols64, cast_for_store(dg, DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows64 * stride_du + cols64, cast_for_store(du, DU.dtype.element_ty), mask=mask)


def _check_pair(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate shape {tuple(gate.shape)} must equal up shape {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate dtype {gate.dtype} must equal up dtype {up.dtype}")


def _flat_if_contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Contiguous tensors are launched as one long row (a pure 1-D element-wise kernel); others as rows."""
    if all(t.is_contiguous() for t in tensors):
        return [t.view(1, -1) for t in tensors]
    return [as_rows(t) for t in tensors]


def _grid(n_rows: int, n_cols: int, interpreted: bool):
    launch = elementwise_launch(n_rows, n_cols, interpreted)
    n_col_tiles = triton.cdiv(n_cols, launch.block_n)
    return launch, n_col_tiles, (triton.cdiv(n_rows, launch.block_m) * n_col_tiles,)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up, in gate's dtype and shape. `out`: an optional contiguous output buffer."""
    check_device(gate, _swiglu_fwd_kernel, "swiglu")
    _check_pair(gate, up)
    check_out(out, gate.shape, gate.dtype, gate.device, "out")
    y = out if out is not None else torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if y.numel() == 0:
        return y
    g2, u2, y2 = _flat_if_contiguous(gate, up, y)
    n_rows, n_cols = g2.shape
    launch, n_col_tiles, grid = _grid(n_rows, n_cols, is_interpreted(_swiglu_fwd_kernel))
    _swiglu_fwd_kernel[grid](
        g2, u2, y2, g2.stride(0), u2.stride(0), y2.stride(0), n_rows, n_cols, n_col_tiles,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, num_warps=launch.num_warps,
    )
    return y


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *,
                    dgate_out: torch.Tensor | None = None, dup_out: torch.Tensor | None = None):
    """(d_gate, d_up) for y = silu(gate) * up, recomputing sigmoid(gate). Both in gate's dtype and shape."""
    check_device(gate, _swiglu_bwd_kernel, "swiglu backward")
    _check_pair(gate, up)
    check_out(dgate_out, gate.shape, gate.dtype, gate.device, "dgate_out")
    check_out(dup_out, gate.shape, gate.dtype, gate.device, "dup_out")
    dg = dgate_out if dgate_out is not None else torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = dup_out if dup_out is not None else torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if dg.numel() == 0:
        return dg, du
    dy2, g2, u2, dg2, du2 = _flat_if_contiguous(dy.reshape(gate.shape), gate, up, dg, du)
    n_rows, n_cols = g2.shape
    launch, n_col_tiles, grid = _grid(n_rows, n_cols, is_interpreted(_swiglu_bwd_kernel))
    _swiglu_bwd_kernel[grid](
        dy2, g2, u2, dg2, du2, dy2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), du2.stride(0),
        n_rows, n_cols, n_col_tiles,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, num_warps=launch.num_warps,
    )
    return dg, du


# A torch.library custom op with a registered backward (see rms_norm.py): one opaque node under torch.compile.
@torch.library.custom_op("mixln::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu_forward(gate, up)


@_swiglu_op.register_fake
def _(gate, up):
    _check_pair(gate, up)
    return gate.new_empty(gate.shape)


@torch.library.custom_op("mixln::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_backward(dy, gate, up)


@_swiglu_backward_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # gate and up, not silu(gate)


def _swiglu_grad(ctx, dy):
    gate, up = ctx.saved_tensors
    return _swiglu_backward_op(dy, gate, up)


_swiglu_op.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with a fused Triton forward and a backward that recomputes SiLU. Same shape and dtype."""
    return _swiglu_op(gate, up)
