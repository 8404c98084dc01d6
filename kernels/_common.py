"""Helpers shared by the Triton kernels: exact fp32 -> low-precision rounding, 2-D row views, launch shapes.

The launch shapes differ on purpose between a GPU and Triton's CPU interpreter: the interpreter runs each
program serially in numpy, so it wants few, large tiles (many rows per program); a GPU wants tiles that
fit its registers and enough programs to fill every SM.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Largest row a norm kernel holds in one block; LLaMA hidden sizes are far below it.
MAX_FUSED_COLS = 65536
# Elements per tile: the interpreter amortises its per-program cost over big tiles; a GPU keeps ~16 per thread.
_INTERPRETER_TILE = 1 << 16
_GPU_NORM_TILE = 2048
_GPU_ELEMENTWISE_BLOCK = 1024


# Test-only switch (MIXLN_TEST_GPU_NAN=1, read when this module is imported; tests set the attribute instead):
# under the interpreter, every NaN reaching a bf16 rounding becomes 0x7FFFFFFF, the NaN a GPU's fp32
# arithmetic makes (inf * 0, inf - inf), where numpy makes 0xFFC00000. Never set it on a GPU.
GPU_NAN_IN_INTERPRETER = tl.constexpr(os.environ.get("MIXLN_TEST_GPU_NAN", "") == "1")


@triton.jit
def bf16_bits(x):
    """fp32 -> the nearest bfloat16 value (ties to even), as the upper 16 of 32 bits (the lower 16 are zero).

    The GPU's cast already rounds to nearest even, but Triton's CPU interpreter truncates fp32 -> bf16;
    doing the rounding in integer bits gives the same answer on both (it costs a few integer ops and one
    select per element in a memory-bound kernel). Finite values that round past bf16's largest become inf,
    inf stays inf, and a NaN stays a NaN of the same sign, quieted: the rounding add alone would carry a
    NaN's low bits into its exponent and sign (the GPU's arithmetic NaN 0x7FFFFFFF would become -0.0).
    """
    bits = x.to(tl.uint32, bitcast=True)
    if GPU_NAN_IN_INTERPRETER:
        bits = tl.where(x != x, 0x7FFFFFFF, bits)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, bits | 0x00400000, rounded) & 0xFFFF0000


@triton.jit
def round_to_bf16(x):
    """fp32 -> the nearest bfloat16 value (ties to even, NaN and inf kept), still held in fp32."""
    return bf16_bits(x).to(tl.float32, bitcast=True)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 `x` rounded to `DTYPE` (nearest, ties to even) and returned as fp32: models a cast and cast back."""
    if DTYPE == tl.bfloat16:
        return round_to_bf16(x)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def cast_for_store(x, DTYPE: tl.constexpr):
    """fp32 `x` cast to `DTYPE` for a store, rounding to nearest even on the GPU and in the interpreter alike."""
    if DTYPE == tl.bfloat16:  # by bits: exact, and a NaN keeps its sign whatever the GPU's cast does with it
        return (bf16_bits(x) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


def is_interpreted(kernel) -> bool:
    """True when `kernel` was defined under TRITON_INTERPRET=1 (it then runs on CPU tensors only)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_device(tensor: torch.Tensor, kernel, op: str) -> None:
    """Raise one clear sentence when the tensor cannot reach the kernel (a CPU tensor without the interpreter)."""
    if is_interpreted(kernel):
        if tensor.device.type != "cpu":
            raise RuntimeError(f"{op}: the Triton kernels were defined under TRITON_INTERPRET=1 and run on CPU "
                               f"tensors only, got a tensor on {tensor.device}; unset TRITON_INTERPRET to use the GPU.")
    elif tensor.device.type != "cuda":
        raise RuntimeError(f"{op}: the Triton kernels need CUDA tensors, got a tensor on {tensor.device}; use the "
                           "torch reference on CPU, or set TRITON_INTERPRET=1 before importing megatron_mixln.kernels.")


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as a 2-D (rows, last dim) tensor whose last dim is unit-stride; a view when the strides allow.

    Row-strided views (a slice of a wider tensor, such as the gate half of a fused gate/up projection) stay
    views; the kernels take the row stride. Anything else (a transposed or expanded tensor) is copied once.
    """
    n = t.shape[-1]
    if t.dim() == 0:
        raise ValueError("expected a tensor with at least one dimension, got a scalar")
    if t.stride(-1) != 1 and n > 1:
        t = t.contiguous()
    try:
        rows = t.view(-1, n)
    except RuntimeError:
        rows = t.reshape(-1, n)
    if rows.shape[0] > 1 and rows.stride(0) < n:  # e.g. a stride-0 (expanded) row dimension
        rows = rows.contiguous()
    return rows


def check_out(out: torch.Tensor | None, shape, dtype: torch.dtype, device, name: str) -> None:
    """Validate a caller-provided output buffer: it must be contiguous and of the expected shape and dtype."""
    if out is None:
        return
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})")


@dataclass(frozen=True)
class NormLaunch:
    """How a row-wise kernel is launched: a tile of BLOCK_M rows by BLOCK_N (>= hidden) columns."""

    block_m: int
    block_n: int
    num_warps: int


def norm_launch(n_rows: int, n_cols: int, interpreted: bool) -> NormLaunch:
    """Tile shape for a kernel that reduces over a whole row of `n_cols` elements."""
    block_n = triton.next_power_of_2(n_cols)
    if block_n > MAX_FUSED_COLS:
        raise ValueError(f"hidden size {n_cols} is larger than the fused norm kernels support ({MAX_FUSED_COLS})")
    tile = _INTERPRETER_TILE if interpreted else _GPU_NORM_TILE
    block_m = max(1, min(tile // block_n, triton.next_power_of_2(max(n_rows, 1))))
    # Liger-Kernel's warp counts by block size (ops/utils.py calculate_settings).
    if block_n >= 32768:
        num_warps = 32
    elif block_n >= 8192:
        num_warps = 16
    elif block_n >= 2048:
        num_warps = 8
    else:
        num_warps = 4
    return NormLaunch(block_m, block_n, num_warps)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_programs(n_rows: int, launch: NormLaunch, device: torch.device, interpreted: bool) -> tuple[int, int]:
    """(programs, rows per program) for a persistent kernel that loops over row tiles.

    On a GPU: enough programs to fill each SM with ~32 warps, each looping over its rows, so the fp32 weight
    gradient is reduced in registers and written once per program (Liger-style partial sums). In the
    interpreter: a handful of programs, each taking many rows.
    """
    tiles = triton.cdiv(max(n_rows, 1), launch.block_m)
    if interpreted:
        cap = 4
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = _sm_count(index) * max(1, 32 // launch.num_warps)
    programs = max(1, min(tiles, cap))
    rows_per_program = triton.cdiv(tiles, programs) * launch.block_m
    programs = triton.cdiv(max(n_rows, 1), rows_per_program)
    return programs, rows_per_program


def elementwise_launch(n_rows: int, n_cols: int, interpreted: bool) -> NormLaunch:
    """Tile shape for an element-wise kernel over a (rows, cols) view; a tile need not span a whole row."""
    if interpreted:
        block_n = min(triton.next_power_of_2(n_cols), _INTERPRETER_TILE)
        block_m = max(1, min(_INTERPRETER_TILE // block_n, triton.next_power_of_2(max(n_rows, 1))))
        return NormLaunch(block_m, block_n, 4)
    block_n = min(triton.next_power_of_2(n_cols), _GPU_ELEMENTWISE_BLOCK)
    block_m = max(1, min(_GPU_ELEMENTWISE_BLOCK // block_n, triton.next_power_of_2(max(n_rows, 1))))
    return NormLaunch(block_m, block_n, 4)


def interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET is set to a true value in the environment."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")
