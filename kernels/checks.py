"""The kernels' accuracy contract against float64, shared by tests/test_kernels.py and mixln-preflight (which runs
`kernel_cases` on the device it checks): fp32 within FP32_TOLERANCE of the largest reference value; bf16 / fp16
within two rounding units of each element plus the tensor's rms (the rounding of the inputs and of the output
are each one unit); NaN and inf exactly where the reference has them."""
from __future__ import annotations

import math

import torch

FP32_TOLERANCE = 1e-5
ROUNDING_UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
EPS = 1e-6  # the RMSNorm epsilon the checks use


def error_ratio(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest error of `out` against the float64 `ref` as a fraction of tests/test_kernels.py's tolerance
    (fp32: max|diff| <= FP32_TOLERANCE max|ref|; bf16: |diff| <= 2u (|ref| + rms(ref)), u = 2^-8), over the
    elements where `ref` is finite; inf when a NaN or an inf is not where the reference has it."""
    out, ref = out.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    if any(not torch.equal(where(out), where(ref)) for where in (torch.isnan, torch.isposinf, torch.isneginf)):
        return math.inf
    finite = torch.isfinite(ref)
    out, ref = out[finite], ref[finite]
    if ref.numel() == 0:
        return 0.0
    err = (out - ref).abs()
    if dtype == torch.float32:
        return (err.max() / ref.abs().max().clamp_min(1e-30)).item() / FP32_TOLERANCE
    return (err / (2 * ROUNDING_UNIT[dtype] * (ref.abs() + ref.pow(2).mean().sqrt()))).max().item()


def _leaf64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64).requires_grad_(True)


def kernel_cases(K, device: torch.device, dtype: torch.dtype, non_finite: bool, seed: int = 1234):
    """Each kernel forward and backward against its float64 reference (the references and inputs of
    tests/test_kernels.py): yields (op, [(name, kernel tensor, reference tensor), ...])."""
    gen = torch.Generator().manual_seed(seed)
    rows, width = (4, 40) if non_finite else (8, 1368)

    def normal(scale: float = 1.0, *infs) -> torch.Tensor:
        t = (scale * torch.randn(rows, width, generator=gen, dtype=torch.float64)).to(dtype)
        for row, col, value in infs if non_finite else ():
            t[row, col] = value
        return t.to(device).requires_grad_(True)

    def weight() -> torch.Tensor:
        return (1 + 0.5 * torch.randn(width, generator=gen, dtype=torch.float64)).to(dtype).to(device) \
            .requires_grad_(True)

    x, w, dy = normal(1.0, (1, 5, math.inf), (2, 7, -math.inf)), weight(), normal().detach()
    y = K.rms_norm(x, w, EPS)
    y.backward(dy)
    x64, w64 = _leaf64(x), _leaf64(w)
    y64 = K.rms_norm_reference(x64, w64, EPS)
    y64.backward(dy.to("cpu", torch.float64))
    yield "rms_norm", [("y", y, y64), ("dx", x.grad, x64.grad), ("dw", w.grad, w64.grad)]

    x, r, w = normal(1.0, (1, 5, math.inf)), normal(1.0, (2, 7, -math.inf)), weight()
    g_normed, g_summed = normal().detach(), normal().detach()
    normed, summed = K.add_rms_norm(x, r, w, EPS)
    torch.autograd.backward([normed, summed], [g_normed, g_summed])
    summed_ref = (x + r).detach()  # the kernel, like the torch path, normalises the sum rounded to the dtype
    s64, w64 = _leaf64(summed_ref), _leaf64(w)
    y64 = K.rms_norm_reference(s64, w64, EPS)
    y64.backward(g_normed.to("cpu", torch.float64))
    d_sum = s64.grad + g_summed.to("cpu", torch.float64)
    yield "add_rms_norm", [("summed", summed, summed_ref), ("normed", normed, y64), ("dx", x.grad, d_sum),
                           ("dresidual", r.grad, d_sum), ("dw", w.grad, w64.grad)]

    gate, up, dy = normal(3.0, (0, 3, math.inf), (1, 4, -math.inf)), normal(1.0, (2, 5, -math.inf)), normal().detach()
    y = K.swiglu(gate, up)
    y.backward(dy)
    g64, u64 = _leaf64(gate), _leaf64(up)
    y64 = K.swiglu_reference(g64, u64)
    y64.backward(dy.to("cpu", torch.float64))
    yield "swiglu", [("y", y, y64), ("dgate", gate.grad, g64.grad), ("dup", up.grad, u64.grad)]
