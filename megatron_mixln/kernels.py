"""Fused Triton kernels for LLaMA blocks: RMSNorm, residual-add + RMSNorm and SwiGLU, forward and backward.

The code lives in the repository's top-level `kernels/` folder; this module makes that folder the package
`megatron_mixln.kernels` (it sets `__path__`). `kernels/` has no `__init__.py` on purpose: `python -m pytest`,
`python -c`, a REPL or `python -m lm_eval` started in the repository root put the root first on `sys.path`, and a
regular package named `kernels` there would shadow Hugging Face's `kernels`, which transformers imports. A folder
without `__init__.py` is only a namespace portion, which never wins over an installed package (and transformers
treats a bare one as absent). In an installed wheel the modules sit in `megatron_mixln/kernels/` beside this file.

The `*_reference` functions are the plain-PyTorch definitions the kernels match (the model's torch path). On CPU
the kernels run only under Triton's interpreter: set TRITON_INTERPRET=1 before importing this package.
"""
from megatron_mixln import KERNELS_FOLDER

__path__ = [KERNELS_FOLDER]  # what makes this module a package: its submodules are the folder's files

from megatron_mixln.kernels.rms_norm import (  # noqa: E402  (after __path__, which makes these importable)
    add_rms_norm,
    add_rms_norm_reference,
    rms_norm,
    rms_norm_backward,
    rms_norm_forward,
    rms_norm_reference,
)
from megatron_mixln.kernels.swiglu import swiglu, swiglu_backward, swiglu_forward, swiglu_reference  # noqa: E402

__all__ = [
    "rms_norm", "add_rms_norm", "swiglu",
    "rms_norm_reference", "add_rms_norm_reference", "swiglu_reference",
    "rms_norm_forward", "rms_norm_backward", "swiglu_forward", "swiglu_backward",
]
