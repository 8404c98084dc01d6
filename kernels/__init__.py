"""Fused Triton kernels for LLaMA blocks: RMSNorm, residual-add + RMSNorm and SwiGLU, forward and backward.

Import as `megatron_mixln.kernels` (never as a top-level `kernels`, which is Hugging Face's package). The
`*_reference` functions are the plain-PyTorch definitions the kernels match (the model's torch path). On
CPU the kernels run only under Triton's interpreter: set TRITON_INTERPRET=1 before importing this package.
"""
from megatron_mixln.kernels.rms_norm import (
    add_rms_norm,
    add_rms_norm_reference,
    rms_norm,
    rms_norm_backward,
    rms_norm_forward,
    rms_norm_reference,
)
from megatron_mixln.kernels.swiglu import swiglu, swiglu_backward, swiglu_forward, swiglu_reference

__all__ = [
    "rms_norm", "add_rms_norm", "swiglu",
    "rms_norm_reference", "add_rms_norm_reference", "swiglu_reference",
    "rms_norm_forward", "rms_norm_backward", "swiglu_forward", "swiglu_backward",
]
