"""The model's elementwise hot path, dispatched to a kernel backend: Triton, plain PyTorch or NVIDIA apex.

`model.kernels`: auto (Triton for CUDA tensors, PyTorch otherwise), triton, torch, apex. The choice never
changes parameters or checkpoints, only how RMSNorm, add + RMSNorm and SwiGLU are computed.
"""
from __future__ import annotations

import importlib

import torch

from megatron_mixln import kernels
from megatron_mixln.config import ConfigError
from megatron_mixln.kernels._common import interpreter_requested, is_interpreted


def check_backend(choice: str) -> None:
    """Fail at model build, not mid-step, when a requested backend cannot run here."""
    if choice == "triton" and not torch.cuda.is_available() and not kernels_interpreted():
        # Without this, the first forward fails inside the kernel launch with a long traceback. The kernels'
        # own check (kernels/_common.py, check_device) gives the same advice for a CPU tensor.
        when = ("was set after megatron_mixln.kernels was imported (set it before the process starts)"
                if interpreter_requested() else "is not set")
        raise ConfigError(f"model.kernels='triton' is invalid here: no CUDA device and TRITON_INTERPRET {when}; "
                          f"use auto or torch on CPU.")
    if choice == "apex":
        try:
            from apex.normalization.fused_layer_norm import fused_rms_norm_affine  # noqa: F401
        except ImportError:
            raise ConfigError("model.kernels='apex' is invalid here: NVIDIA apex (github.com/NVIDIA/apex, built with "
                              "its CUDA extensions) is not installed; use auto, triton or torch.") from None


def kernels_interpreted() -> bool:
    """Whether the Triton kernels were defined under TRITON_INTERPRET=1, so that they run on CPU tensors (the
    variable is read once, when the kernels are defined, not when they run)."""
    return is_interpreted(importlib.import_module("megatron_mixln.kernels.rms_norm")._rms_norm_fwd_kernel)


def _backend(choice: str, x: torch.Tensor) -> str:
    if choice == "auto":
        return "triton" if x.is_cuda else "torch"
    return choice


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, scale: float, choice: str) -> torch.Tensor:
    backend = _backend(choice, x)
    if backend == "triton":
        return kernels.rms_norm(x, weight, eps, scale)
    if backend == "apex":
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine

        out = fused_rms_norm_affine(x, weight, weight.shape, eps)
        return out * scale if scale != 1.0 else out
    return kernels.rms_norm_reference(x, weight, eps, scale)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, scale: float,
                 choice: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): one pass over memory with Triton."""
    if _backend(choice, x) == "triton":
        return kernels.add_rms_norm(x, residual, weight, eps, scale)
    summed = x + residual
    return rms_norm(summed, weight, eps, scale, choice), summed


def swiglu(gate: torch.Tensor, up: torch.Tensor, choice: str) -> torch.Tensor:
    if _backend(choice, gate) == "triton":
        return kernels.swiglu(gate, up)
    return kernels.swiglu_reference(gate, up)
