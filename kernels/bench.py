"""Benchmark of the fused kernels against PyTorch eager, torch.compile, Liger-Kernel and apex (when installed).

    python -m megatron_mixln.kernels.bench [--out results.json]      (also: mixln-bench kernels)

On CUDA: for each op, size and pass (forward, backward, forward+backward) the median time, the bandwidth
(each input read once, each output written once), its fraction of the device's copy bandwidth measured in the
same run, and the speed-up over every other implementation; a markdown table on stdout, JSON with --out.
Without a GPU: one line saying so, then a small correctness smoke pass under Triton's interpreter.
`--compile-report` compiles every kernel variant for an H100 (sm_90, no GPU needed) and prints its
registers and spills.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import subprocess
import sys
import time

EPS = 1e-6
DEFAULT_TOKENS = [4096, 8192, 16384, 32768]
DEFAULT_HIDDEN = [512, 768, 2048, 4096, 8192]
DEFAULT_INTERMEDIATE = [1368, 2048, 5461, 11008]
OPS = ["rms_norm", "add_rms_norm", "swiglu"]
PASSES = ["fwd", "bwd", "fwd+bwd"]
TARGET_TOKENS, TARGET_HIDDEN = 16384, 2048  # the shapes the bandwidth targets judge (_targets)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="mixln-bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    p.add_argument("--tokens", nargs="+", type=int, default=DEFAULT_TOKENS)
    p.add_argument("--hidden", nargs="+", type=int, default=DEFAULT_HIDDEN, help="RMSNorm hidden sizes")
    p.add_argument("--intermediate", nargs="+", type=int, default=DEFAULT_INTERMEDIATE, help="SwiGLU widths")
    p.add_argument("--passes", nargs="+", default=PASSES, choices=PASSES)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--providers", nargs="+", default=None,
                   help="subset of: triton eager compile liger apex unfused (default: all available)")
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=40.0)
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="stop measuring after this many seconds and report what was measured")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--compile-report", action="store_true",
                   help="compile every kernel variant for sm_90 (no GPU needed) and print registers and spills")
    p.add_argument("--smoke-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    import torch

    if args.compile_report:
        return _in_mode(args, interpret=False, run=lambda: _print_compile_report(args))
    if torch.cuda.is_available() and not args.smoke_child:
        from megatron_mixln.kernels._common import interpreter_requested

        if interpreter_requested():
            print("TRITON_INTERPRET is set: unset it to benchmark the kernels on the GPU.")
            return 2
        return _gpu_benchmark(args)
    if not args.smoke_child:
        print("No CUDA GPU: no timings; running a small correctness smoke pass under Triton's interpreter instead.")
    return _in_mode(args, interpret=True, run=lambda: _cpu_smoke(args))


def _in_mode(args, interpret: bool, run) -> int:
    """Run `run()` with the kernels defined in (or out of) interpreter mode, re-executing in a child process
    when they were already defined the other way (TRITON_INTERPRET is read when a kernel is defined)."""
    module = sys.modules.get("megatron_mixln.kernels.rms_norm")
    if module is None:
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        module = __import__("megatron_mixln.kernels.rms_norm", fromlist=["_"])
    from megatron_mixln.kernels._common import is_interpreted

    if is_interpreted(module._rms_norm_fwd_kernel) == interpret:
        return run()
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0")
    child = [sys.executable, "-m", "megatron_mixln.kernels.bench"] + (["--smoke-child"] if interpret else [])
    child += _forwarded(args)
    return subprocess.call(child, env=env)


def _forwarded(args) -> list[str]:
    out = ["--compile-report"] if args.compile_report else []
    return out + (["--out", args.out] if args.out else [])


# ----------------------------------------------------------------------------------------------------------
# Inputs and implementations


def _make_inputs(op, tokens, width, dtype, device, gen=None):
    import torch

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float32, device=device, generator=gen).to(dtype)

    if op == "swiglu":
        tensors = [randn(tokens, width), randn(tokens, width)]
        grads = [randn(tokens, width)]
    else:
        tensors = [randn(tokens, width)] + ([randn(tokens, width)] if op == "add_rms_norm" else [])
        tensors.append((1.0 + 0.1 * torch.randn(width, device=device, generator=gen)).to(dtype))
        grads = [randn(tokens, width)] + ([randn(tokens, width)] if op == "add_rms_norm" else [])
    for t in tensors:
        t.requires_grad_(True)
    return tensors, grads


def _implementations(op, available):
    """{provider: callable(*tensors) -> output or tuple of outputs} for `op`."""
    from megatron_mixln import kernels as K

    impls = {}
    if op == "rms_norm":
        impls["triton"] = lambda x, w: K.rms_norm(x, w, EPS)
        impls["eager"] = lambda x, w: K.rms_norm_reference(x, w, EPS)
        if "compile" in available:
            compiled = available["compile"](K.rms_norm_reference)
            impls["compile"] = lambda x, w: compiled(x, w, EPS)
        if "liger" in available and available["liger"].get("rms_norm"):
            fn = available["liger"]["rms_norm"]
            impls["liger"] = lambda x, w: fn.apply(x, w, EPS, 0.0, "llama")
        if "apex" in available:
            apex_rms = available["apex"]
            impls["apex"] = lambda x, w: apex_rms(x, w, (x.shape[-1],), EPS)
    elif op == "add_rms_norm":
        impls["triton"] = lambda x, r, w: K.add_rms_norm(x, r, w, EPS)
        impls["unfused"] = lambda x, r, w: _unfused(K, x, r, w)
        impls["eager"] = lambda x, r, w: K.add_rms_norm_reference(x, r, w, EPS)
        if "compile" in available:
            compiled = available["compile"](K.add_rms_norm_reference)
            impls["compile"] = lambda x, r, w: compiled(x, r, w, EPS)
        if "liger" in available and available["liger"].get("add_rms_norm"):
            fn = available["liger"]["add_rms_norm"]
            impls["liger"] = lambda x, r, w: fn.apply(x, r, w, EPS, 0.0, "llama", False)
        if "apex" in available:
            apex_rms = available["apex"]
            impls["apex"] = lambda x, r, w: _unfused_with(apex_rms, x, r, w)
    else:
        impls["triton"] = K.swiglu
        impls["eager"] = K.swiglu_reference
        if "compile" in available:
            impls["compile"] = available["compile"](K.swiglu_reference)
        if "liger" in available and available["liger"].get("swiglu"):
            fn = available["liger"]["swiglu"]
            impls["liger"] = lambda g, u: fn.apply(g, u)
    return impls


def _unfused(K, x, r, w):
    summed = x + r
    return K.rms_norm(summed, w, EPS), summed


def _unfused_with(apex_rms, x, r, w):
    summed = x + r
    return apex_rms(summed, w, (x.shape[-1],), EPS), summed


def _available_providers(requested):
    """Optional implementations that import here: torch.compile, Liger-Kernel, NVIDIA apex."""
    import torch

    available, notes = {}, []
    want = set(requested) if requested else None
    if want is None or "compile" in want:
        import torch._dynamo

        # Token counts vary per hidden size: mark that dimension dynamic and keep the hidden size static,
        # so each (op, hidden) compiles once rather than once per shape or into a slower fully dynamic kernel.
        torch._dynamo.config.automatic_dynamic_shapes = False
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 512)
        available["compile"] = torch.compile
    if want is None or "liger" in want:
        liger = {}
        for key, module, name in [("rms_norm", "liger_kernel.ops.rms_norm", "LigerRMSNormFunction"),
                                  ("add_rms_norm", "liger_kernel.ops.fused_add_rms_norm",
                                   "LigerFusedAddRMSNormFunction"),
                                  ("swiglu", "liger_kernel.ops.swiglu", "LigerSiLUMulFunction")]:
            try:
                liger[key] = getattr(__import__(module, fromlist=[name]), name)
            except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
                notes.append(f"Liger {key}: not available ({type(exc).__name__}: {exc})")
        if liger:
            available["liger"] = liger
    if want is None or "apex" in want:
        try:
            from apex.normalization.fused_layer_norm import fused_rms_norm_affine

            available["apex"] = fused_rms_norm_affine
        except Exception as exc:  # noqa: BLE001
            notes.append(f"apex: not available ({type(exc).__name__}: {exc})")
    return available, notes


def _bytes_moved(op, mode, tokens, width, elem):
    """Bytes each pass must move: every input read once and every output written once."""
    act, vec = tokens * width * elem, width * elem
    fwd = {"rms_norm": 2 * act + vec,        # x, w -> y
           "add_rms_norm": 4 * act + vec,    # x, r, w -> y, summed
           "swiglu": 3 * act}[op]            # gate, up -> y
    bwd = {"rms_norm": 3 * act + 2 * vec,    # dy, x, w -> dx, dw
           "add_rms_norm": 4 * act + 2 * vec,  # dy, d_summed, summed, w -> d(x)=d(residual), dw
           "swiglu": 5 * act}[op]            # dy, gate, up -> d_gate, d_up
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


# ----------------------------------------------------------------------------------------------------------
# GPU benchmark


def shape_plan(ops, tokens, hidden, intermediate):
    """(op, tokens, width) in measurement order, so that a run cut by --budget-s holds every op's targets first:
    the ops take turns, one shape each; each op's shapes that its targets judge (`_targets`: tokens >= 16K, a
    norm's width >= 2048) come first, the smallest first (the cheapest to measure), then the others, largest first."""
    def judged(op, t, w):
        return t >= TARGET_TOKENS and (op == "swiglu" or w >= TARGET_HIDDEN)

    per_op = []
    for op in ops:
        shapes = [(t, w) for w in (intermediate if op == "swiglu" else hidden) for t in tokens]
        first = sorted((s for s in shapes if judged(op, *s)), key=lambda s: s[0] * s[1])
        rest = sorted((s for s in shapes if not judged(op, *s)), key=lambda s: -s[0] * s[1])
        per_op.append([(op, t, w) for t, w in first + rest])
    return [entry for turn in itertools.zip_longest(*per_op) for entry in turn if entry is not None]


def _time_pass(fn, tensors, grads, mode, warmup, rep):
    import torch
    from triton.testing import do_bench

    def outputs_of(result):
        return list(result) if isinstance(result, (tuple, list)) else [result]

    if mode == "fwd":
        return do_bench(lambda: fn(*tensors), warmup=warmup, rep=rep, return_mode="median")
    if mode == "bwd":
        outs = outputs_of(fn(*tensors))
        return do_bench(lambda: torch.autograd.backward(outs, grads[:len(outs)], retain_graph=True),
                        warmup=warmup, rep=rep, grad_to_none=tensors, return_mode="median")
    return do_bench(lambda: torch.autograd.backward(outputs_of(fn(*tensors)), grads),
                    warmup=warmup, rep=rep, grad_to_none=tensors, return_mode="median")


def _copy_bandwidth(device, warmup, rep):
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    import torch
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=warmup, rep=rep, return_mode="median")
    del src, dst
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def _gpu_benchmark(args, device="cuda") -> int:
    import torch
    import triton

    device = torch.device(device)
    dtype = getattr(torch, args.dtype)
    elem = torch.tensor([], dtype=dtype).element_size()
    props = torch.cuda.get_device_properties(device)
    available, notes = _available_providers(args.providers)
    copy_gbps = _copy_bandwidth(device, args.warmup_ms, args.rep_ms)
    print(f"device: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"triton {triton.__version__}, {args.dtype}; copy bandwidth {copy_gbps:.0f} GB/s (read + write)",
          flush=True)
    for note in notes:
        print(f"note: {note}", flush=True)

    start, rows, skipped = time.time(), [], 0
    gen = torch.Generator(device=device).manual_seed(0)
    impls_of = {}
    for op in args.ops:
        impls_of[op] = _implementations(op, available)
        if args.providers:
            impls_of[op] = {k: v for k, v in impls_of[op].items() if k in args.providers or k == "triton"}
    def save(targets=None):  # rewritten after every shape: a run killed at its time limit keeps what it measured
        if not args.out:
            return
        result = {
            "device": props.name, "sms": props.multi_processor_count,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype,
            "copy_gbps": copy_gbps, "rows": rows, "targets": targets or _targets(rows, "liger" in available),
            "notes": notes,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for op, tokens, width in shape_plan(args.ops, args.tokens, args.hidden, args.intermediate):
        impls = impls_of[op]
        if time.time() - start > args.budget_s:
            skipped += 1
            continue
        tensors, grads = _make_inputs(op, tokens, width, dtype, device, gen)
        if "compile" in impls:
            for t in tensors:
                if t.dim() == 2:
                    torch._dynamo.mark_dynamic(t, 0)
        for mode in args.passes:
            ms = {}
            for name, fn in impls.items():
                try:
                    ms[name] = _time_pass(fn, tensors, [g.clone() for g in grads], mode,
                                          args.warmup_ms, args.rep_ms)
                except Exception as exc:  # noqa: BLE001 - report and go on with the others
                    ms[name] = None
                    notes.append(f"{name} {op} {tokens}x{width} {mode}: {type(exc).__name__}: {exc}"[:300])
            nbytes = _bytes_moved(op, mode, tokens, width, elem)
            ours = ms.get("triton")
            gbps = nbytes / (ours * 1e-3) / 1e9 if ours else None
            rows.append({
                "op": op, "tokens": tokens, "width": width, "pass": mode, "bytes": nbytes, "ms": ms,
                "gbps": gbps, "copy_fraction": gbps / copy_gbps if gbps else None,
                "speedup": {k: (v / ours if (v and ours) else None) for k, v in ms.items() if k != "triton"},
            })
            print(_progress_line(rows[-1]), file=sys.stderr, flush=True)
        del tensors, grads
        torch.cuda.empty_cache()
        save()
    if skipped:
        notes.append(f"time budget of {args.budget_s:.0f} s reached: {skipped} shapes not measured")

    targets = _targets(rows, "liger" in available)
    _print_table(rows, copy_gbps)
    print()
    print("| target | measured | met |\n|---|---|---|")
    for t in targets:
        print(f"| {t['target']} | {t['measured']} | {t['met']} |")
    for note in notes:
        print(f"note: {note}")
    if args.out:
        save(targets)
        print(f"wrote {args.out}")
    return 0


def _progress_line(row):
    ours = row["ms"].get("triton")
    return (f"{row['op']:>12} {row['tokens']:>6}x{row['width']:<6} {row['pass']:<8} "
            + (f"{ours * 1e3:8.1f} us  {row['gbps']:7.0f} GB/s" if ours else "failed"))


def _fmt_speedup(x):
    return f"{x:.2f}x" if x else "-"


def _print_table(rows, copy_gbps):
    providers = [p for p in ("eager", "compile", "liger", "apex", "unfused")
                 if any(p in r["ms"] for r in rows)]
    print(f"\nSpeed-up columns: that implementation's time / ours (> 1: ours is faster). Copy bandwidth "
          f"{copy_gbps:.0f} GB/s.\n")
    print("| op | tokens | width | pass | ours (us) | GB/s | % of copy | "
          + " | ".join(f"vs {p}" for p in providers) + " |")
    print("|---" * (7 + len(providers)) + "|")
    for r in rows:
        ours = r["ms"].get("triton")
        cells = [r["op"], str(r["tokens"]), str(r["width"]), r["pass"],
                 f"{ours * 1e3:.1f}" if ours else "failed",
                 f"{r['gbps']:.0f}" if r["gbps"] else "-",
                 f"{100 * r['copy_fraction']:.0f}%" if r["copy_fraction"] else "-"]
        cells += [_fmt_speedup(r["speedup"].get(p)) for p in providers]
        print("| " + " | ".join(cells) + " |")


def _targets(rows, have_liger):
    """The issue's targets, evaluated on the measured rows."""

    def pick(op, mode, min_width=0, min_tokens=0):
        return [r for r in rows if r["op"] == op and r["pass"] == mode and r["width"] >= min_width
                and r["tokens"] >= min_tokens and r["copy_fraction"]]

    def fraction_target(name, sel, need):
        if not sel:
            return {"target": name, "measured": "not measured", "met": "-"}
        worst = min(sel, key=lambda r: r["copy_fraction"])
        return {"target": name, "measured": f"min {100 * worst['copy_fraction']:.0f}% "
                f"({worst['tokens']}x{worst['width']})", "met": "yes" if worst["copy_fraction"] >= need else "NO"}

    def speedup_target(name, sel, key, need):
        sel = [r for r in sel if r["speedup"].get(key)]
        if not sel:
            return {"target": name, "measured": "not measured", "met": "-"}
        worst = min(sel, key=lambda r: r["speedup"][key])
        return {"target": name, "measured": f"min {worst['speedup'][key]:.2f}x ({worst['op']} {worst['tokens']}x"
                f"{worst['width']} {worst['pass']})", "met": "yes" if worst["speedup"][key] >= need else "NO"}

    out = [
        fraction_target("RMSNorm fwd >= 90% of copy bandwidth (hidden >= 2048, tokens >= 16K)",
                        pick("rms_norm", "fwd", TARGET_HIDDEN, TARGET_TOKENS), 0.90),
        fraction_target("RMSNorm bwd (dx and dw) >= 80% of copy bandwidth (hidden >= 2048, tokens >= 16K)",
                        pick("rms_norm", "bwd", TARGET_HIDDEN, TARGET_TOKENS), 0.80),
        speedup_target("add + RMSNorm fwd+bwd >= 1.5x separate torch add + our RMSNorm "
                       "(byte-count bound: 1.38x)", [r for r in rows if r["op"] == "add_rms_norm"
                                                     and r["pass"] == "fwd+bwd"], "unfused", 1.5),
        speedup_target("add + RMSNorm fwd+bwd >= 1.5x separate torch add + torch RMSNorm",
                       [r for r in rows if r["op"] == "add_rms_norm" and r["pass"] == "fwd+bwd"], "eager", 1.5),
        fraction_target("SwiGLU fwd+bwd >= 85% of copy bandwidth (tokens >= 16K)",
                        pick("swiglu", "fwd+bwd", 0, TARGET_TOKENS), 0.85),
    ]
    if have_liger:
        out.append(speedup_target("at least Liger's speed on every shape and pass", rows, "liger", 1.0))
    else:
        out.append({"target": "at least Liger's speed on every shape and pass", "measured": "Liger not installed",
                    "met": "-"})
    return out


# ----------------------------------------------------------------------------------------------------------
# CPU: interpreter smoke pass


def _cpu_smoke(args) -> int:
    import torch

    from megatron_mixln import kernels as K

    cases = [("rms_norm", 64, 768), ("rms_norm", 8, 5461), ("add_rms_norm", 64, 2048), ("swiglu", 64, 1368)]
    limit = {torch.float32: 1e-5, torch.bfloat16: 2 * 2.0 ** -8}
    results, failed = [], False
    print("\n| op | tokens x width | dtype | max rel. error, outputs | max rel. error, grads | interpreter ms |")
    print("|---|---|---|---|---|---|")
    for op, tokens, width in cases:
        for dtype in (torch.float32, torch.bfloat16):
            tensors, grads = _make_inputs(op, tokens, width, dtype, "cpu")
            fn = {"rms_norm": lambda x, w: K.rms_norm(x, w, EPS),
                  "add_rms_norm": lambda x, r, w: K.add_rms_norm(x, r, w, EPS),
                  "swiglu": K.swiglu}[op]
            ref = {"rms_norm": lambda x, w: K.rms_norm_reference(x, w, EPS),
                   "add_rms_norm": lambda x, r, w: K.add_rms_norm_reference(x, r, w, EPS),
                   "swiglu": K.swiglu_reference}[op]
            t0 = time.perf_counter()
            outs = fn(*tensors)
            outs = list(outs) if isinstance(outs, tuple) else [outs]
            torch.autograd.backward(outs, grads)
            ms = (time.perf_counter() - t0) * 1e3
            ref_in = [t.detach().double().requires_grad_(True) for t in tensors]
            if op == "add_rms_norm":  # the kernel normalises the sum rounded to the stream dtype
                summed = (tensors[0] + tensors[1]).detach().double().requires_grad_(True)
                ref_outs = [K.rms_norm_reference(summed, ref_in[2], EPS), summed]
            else:
                ref_outs = ref(*ref_in)
                ref_outs = list(ref_outs) if isinstance(ref_outs, tuple) else [ref_outs]
            torch.autograd.backward(ref_outs, [g.double() for g in grads])
            ref_grads = ([summed.grad, summed.grad, ref_in[2].grad] if op == "add_rms_norm"
                         else [t.grad for t in ref_in])
            out_err = max(_rel_err(o, r) for o, r in zip(outs, ref_outs))
            grad_err = max(_rel_err(t.grad, r) for t, r in zip(tensors, ref_grads))
            ok = out_err <= limit[dtype] and grad_err <= limit[dtype]
            failed |= not ok
            results.append({"op": op, "tokens": tokens, "width": width, "dtype": str(dtype).replace("torch.", ""),
                            "output_rel_err": out_err, "grad_rel_err": grad_err, "interpreter_ms": ms, "ok": ok})
            print(f"| {op} | {tokens} x {width} | {results[-1]['dtype']} | {out_err:.2e} | {grad_err:.2e} | "
                  f"{ms:.0f} |" + ("" if ok else " FAIL"))
    print(f"\nsmoke pass: {'FAILED' if failed else 'all kernels match the float64 reference'} "
          f"(limits: fp32 1e-5, bf16 2^-7 of the largest magnitude)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"device": "cpu (Triton interpreter)", "smoke": results}, f, indent=1)
        print(f"wrote {args.out}")
    return 1 if failed else 0


def _rel_err(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------------------
# Compile report: every kernel variant built for sm_90 without a GPU


def compile_report(arch: int = 90, dtype: str = "bf16"):
    """Compile each kernel at the benchmark's sizes for CUDA `arch`; return rows with registers and spills.

    Needs the kernels defined outside the interpreter (TRITON_INTERPRET unset) but no GPU: Triton's bundled
    ptxas assembles for the target and cuobjdump reads the resource usage.
    """
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from megatron_mixln.kernels import _common as C

    rms = sys.modules["megatron_mixln.kernels.rms_norm"]
    swi = sys.modules["megatron_mixln.kernels.swiglu"]
    target = GPUTarget("cuda", arch, 32)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def build(kernel, pointers, consts, num_warps):
        sig = {}
        for name in kernel.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in pointers:
                sig[name] = "*" + pointers[name]
            elif name in ("eps", "scale"):
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        compiled = triton.compile(ASTSource(kernel, sig, constexprs=consts), target=target,
                                  options={"num_warps": num_warps})
        usage = {}
        try:
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                      text=True, timeout=60).stdout
            for field in ("REG", "LOCAL", "SHARED"):
                for token in text.replace(",", " ").split():
                    if token.startswith(field + ":"):
                        usage[field] = int(token.split(":")[1])
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
        return usage

    rows = []
    act = {n: dtype for n in ("X", "R", "Y", "S", "W", "DY", "DS", "DX", "G", "U", "DG", "DU")}
    fp32 = {"RSTD": "fp32", "DW_PARTIAL": "fp32"}
    for n in DEFAULT_HIDDEN + [1368, 5461, 11008]:
        launch = C.norm_launch(32768, n, interpreted=False)
        blocks = {"BLOCK_M": launch.block_m, "BLOCK_N": launch.block_n}
        for residual in (False, True):
            usage = build(rms._rms_norm_fwd_kernel, {**act, **fp32}, {"HAS_RESIDUAL": residual, **blocks},
                          launch.num_warps)
            rows.append(("add_rms_norm fwd" if residual else "rms_norm fwd", n, launch, usage))
        usage = build(rms._rms_norm_bwd_kernel, {**act, **fp32},
                      {"HAS_DS": True, "COMPUTE_DX": True, "COMPUTE_DW": True, **blocks}, launch.num_warps)
        rows.append(("rms_norm bwd (dx, dw, d_summed)", n, launch, usage))
    launch = C.elementwise_launch(1, 1 << 24, interpreted=False)
    blocks = {"BLOCK_M": launch.block_m, "BLOCK_N": launch.block_n}
    rows.append(("swiglu fwd", "any", launch, build(swi._swiglu_fwd_kernel, act, blocks, launch.num_warps)))
    rows.append(("swiglu bwd", "any", launch, build(swi._swiglu_bwd_kernel, act, blocks, launch.num_warps)))
    return rows


def _print_compile_report(args) -> int:
    rows = compile_report()
    print(f"\nKernels compiled for sm_90 ({len(rows)} variants, bf16). Registers per thread; LOCAL > 0 means spills.\n")
    print("| kernel | width | BLOCK_M x BLOCK_N | warps | registers | local (spill) bytes |\n|---|---|---|---|---|---|")
    for name, width, launch, usage in rows:
        print(f"| {name} | {width} | {launch.block_m} x {launch.block_n} | {launch.num_warps} | "
              f"{usage.get('REG', '?')} | {usage.get('LOCAL', '?')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
