"""The model's elementwise hot path, dispatched to a kernel backend: Triton, plain PyTorch or NVIDIA apex.

`model.kernels`: auto (Triton for CUDA tensors, PyTorch otherwise), triton, torch, apex. The choice never
changes parameters or checkpoints, only how RMSNorm, add + RMSNorm and SwiGLU are computed.
"""
from __future__ import annotations

import torch

from megatron_mixln import kernels
from megatron_mixln.config import ConfigError


def check_backend(choice: str) -> None:
    """Fail at model build, not mid-step, when a requested backend cannot run here."""
    if choice == "apex":
        try:
            from apex.normalization.fused_layer_norm import fused_rms_norm_affine  # noqa: F401
        except ImportError:
            raise ConfigError("model.kernels='apex' is invalid here: NVIDIA apex (github.com/NVIDIA/apex, built with "
                              "its CUDA extensions) is not installed; use auto, triton or torch.") from None


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
