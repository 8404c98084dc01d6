"""Benchmark: training throughput of the real training step (DeepSpeed engine + step engine, one process).

For each model x placement x kernels backend x execution (eager, or each decoder layer torch.compile'd) x LM head
(the plain projection + cross-entropy, or the chunked fused one) it trains a few steps on random tokens and
prints tokens/s, step time, peak memory (device and host) and MFU: tokens/s x model FLOPs per token
(megatron_mixln/train/flops.py, docs/performance.md) over the device's peak, which is measured here (a large
dense matmul in the training precision) and, for known GPUs, also taken from the datasheet. All cases run in one process, one after the other, so their ratios compare
like with like; the JSON is rewritten after every case, so a run cut short keeps what it measured. After the
table come the memory the fused cross-entropy saved and the issue's targets as measured ratios (Mix-LN against
Pre-LN step time, triton against torch, compile + triton against compile alone, MFU).
Run: `mixln-bench train [--models 130m 1b] [--json out.json] [key=value ...]`.

On a CPU it runs the small demo model in fp32 with the PyTorch kernels by default (the Triton kernels run there
only under their interpreter, which measures nothing) and says so: a CPU figure is not a GPU figure.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import resource
import statistics
import sys
import time
from pathlib import Path

MODELS = {"tiny": "configs/tiny.yaml", "71m": "configs/llama_71m.yaml", "130m": "configs/llama_130m.yaml",
          "250m": "configs/llama_250m.yaml", "1b": "configs/llama_1b.yaml", "7b": "configs/llama_7b.yaml"}
# Dense bf16 tensor-core peak without sparsity, from the vendors' datasheets (SXM parts).
DATASHEET_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                        "L40S": 362e12, "A10G": 70e12}


def datasheet_peak(device_name: str) -> float | None:
    return next((flops for part, flops in DATASHEET_BF16_FLOPS.items() if part in device_name), None)


def measured_peak(dtype, device, size: int, repeats: int) -> float:
    """FLOP/s of a square matmul of `size` in `dtype`: the best of `repeats` timed runs after a warm-up."""
    import torch

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for attempt in range(repeats + 2):
        _sync(device)
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync(device)
        if attempt >= 2:
            best = min(best, (time.perf_counter() - start) / 10)
    return 2 * size ** 3 / best


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def config_path(model: str) -> str:
    path = MODELS.get(model, model)
    if not Path(path).is_file():
        raise SystemExit(f"error: model {model!r} is neither one of {', '.join(MODELS)} nor a config file "
                         "(run from the repository root, where configs/ is).")
    return path


def case_config(model: str, placement: str, kernels: str, overrides: list[str], on_gpu: bool,
                execution: str = "eager", loss: str = "unfused"):
    from megatron_mixln.config import load_config

    path = config_path(model)
    defaults = [] if on_gpu else ["train.precision=fp32", "parallel.zero_stage=0"]
    config = load_config(path, [*defaults, f"model.norm_placement={placement}", f"model.kernels={kernels}",
                                f"train.compile={execution == 'compile'}",
                                f"model.fused_cross_entropy={loss == 'fused'}",
                                "train.eval_sequences=0", "train.tensorboard=false", "train.progress_bar=false",
                                *overrides])
    # One micro-batch per step: the step time is the time of one forward, backward and update.
    config.train.global_batch_size = config.train.micro_batch_size
    return config


def run_case(config, steps: int, warmup: int, device) -> dict:
    """Train `warmup + steps` steps on random tokens; the median step time of the last `steps`."""
    import torch

    from megatron_mixln.train.engine import build_engine, build_layout, build_training_model
    from megatron_mixln.train.flops import training_flops_per_token
    from megatron_mixln.train.step import make_step_engine

    layout = build_layout(config)
    model = build_training_model(config, layout)
    engine, _, _ = build_engine(model, config, layout)
    steps_engine = make_step_engine(engine, config, layout)
    batch, seq = config.train.micro_batch_size, config.data.seq_len
    generator = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        ids = torch.randint(0, config.model.vocab_size, (batch, seq + 1), generator=generator)
        _sync(device)
        start = time.perf_counter()
        steps_engine.train_step(step, [(ids[:, :-1], ids[:, 1:])], batch * seq)
        _sync(device)
        times.append(time.perf_counter() - start)
    step_time = statistics.median(times[warmup:])
    host_peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB; monotonic
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else host_peak_gb
    del steps_engine, engine, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tokens_per_second = batch * seq / step_time
    flops_per_token = training_flops_per_token(config.model, seq)
    return {"tokens_per_second": tokens_per_second, "step_seconds": step_time, "peak_memory_gb": peak_gb,
            "host_peak_memory_gb": host_peak_gb, "first_step_seconds": times[0],
            "model_flops_per_token": flops_per_token, "achieved_flops": tokens_per_second * flops_per_token,
            "batch": batch, "seq_len": seq, "precision": config.train.precision}


AXES = ("model", "placement", "kernels", "execution", "loss")


def counterpart(rows: list[dict], row: dict, **change) -> dict | None:
    """The measured case that differs from `row` only by `change`, e.g. placement="pre"."""
    return next((r for r in rows if all(r[axis] == change.get(axis, row[axis]) for axis in AXES)), None)


def memory_saved(rows: list[dict]) -> list[str]:
    """Lines: device peak memory of the unfused head minus the fused one, per case measured both ways."""
    lines = []
    for r in rows:
        fused = counterpart(rows, r, loss="fused") if r["loss"] == "unfused" else None
        if fused:
            lines.append(f"- {r['model']} {r['placement']} {r['kernels']} {r['execution']}: fused cross-entropy peak "
                         f"{fused['peak_memory_gb']:.2f} GB vs {r['peak_memory_gb']:.2f} GB unfused, "
                         f"{r['peak_memory_gb'] - fused['peak_memory_gb']:.2f} GB saved")
    return lines


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets as ratios of step times measured in this run (lower step time = faster): Mix-LN
    against Pre-LN, triton against torch kernels (eager: "faster than torch eager"; compile: "compile + triton
    faster than compile alone"), and the 1B Mix-LN MFU."""
    lines = []
    for r in rows:
        pre = counterpart(rows, r, placement="pre") if r["placement"] == "mix" else None
        if pre:
            ratio = r["step_seconds"] / pre["step_seconds"]
            lines.append(f"- Mix-LN / Pre-LN step time, {r['model']} {r['kernels']} {r['execution']} {r['loss']}: "
                         f"{ratio:.3f} ({'within' if abs(ratio - 1) <= 0.01 else 'NOT within'} 1%)")
        torch_kernels = counterpart(rows, r, kernels="torch") if r["kernels"] == "triton" else None
        if torch_kernels:
            speedup = torch_kernels["step_seconds"] / r["step_seconds"]
            lines.append(f"- triton vs torch speed-up, {r['model']} {r['placement']} {r['execution']} {r['loss']}: "
                         f"{speedup:.3f}x ({'faster' if speedup > 1 else 'NOT faster'})")
        if r["model"] == "1b" and r["placement"] == "mix" and r.get("mfu_datasheet"):
            lines.append(f"- 1B Mix-LN MFU (datasheet peak), {r['kernels']} {r['execution']} {r['loss']}: "
                         f"{r['mfu_datasheet']:.1%} ({'meets' if r['mfu_datasheet'] >= 0.5 else 'below'} 50%)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mixln-bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help=f"{', '.join(MODELS)} or config files (default: 71m 130m 250m 1b "
                        "on a GPU, tiny on a CPU)")
    parser.add_argument("--placements", nargs="+", default=["pre", "mix"])
    parser.add_argument("--kernels", nargs="+",
                        help="kernels backends (default: torch triton on a GPU, torch on a CPU)")
    parser.add_argument("--executions", nargs="+", choices=["eager", "compile"],
                        help="eager and/or per-layer torch.compile (default: eager compile on a GPU, eager on a CPU)")
    parser.add_argument("--losses", nargs="+", choices=["unfused", "fused"], default=["fused"],
                        help="LM head + loss: unfused and/or the chunked fused cross-entropy (default: fused)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3; compile happens there)")
    parser.add_argument("--json", type=Path, help="also write every figure here (rewritten after every case)")
    parser.add_argument("overrides", nargs="*",
                        help="section.field=value for every case, e.g. train.micro_batch_size=8")
    args = parser.parse_intermixed_args(argv)
    import torch  # after parsing: --help and usage errors need no torch

    from megatron_mixln.train.engine import init_distributed

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    models = args.models or (["71m", "130m", "250m", "1b"] if on_gpu else ["tiny"])
    kernels = args.kernels or (["torch", "triton"] if on_gpu else ["torch"])
    executions = args.executions or (["eager", "compile"] if on_gpu else ["eager"])
    for model in models:  # every name checked before anything is measured
        config_path(model)
    init_distributed()
    name = torch.cuda.get_device_name() if on_gpu else "CPU"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    peak = measured_peak(dtype, device, 8192 if on_gpu else 1024, 5)
    sheet = datasheet_peak(name) if on_gpu else None
    print(f"device: {name}; measured dense {'bf16' if on_gpu else 'fp32'} matmul peak {peak / 1e12:.1f} TFLOP/s"
          + (f" (datasheet {sheet / 1e12:.0f})" if sheet else "")
          + ("" if on_gpu else "; a CPU run of a small configuration, not a GPU figure; peak GB is the process's "
             "RSS high-water mark so far"))
    rows = []

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps({"device": name, "measured_peak_flops": peak, "datasheet_peak_flops": sheet,
                                             "rows": rows}, indent=1) + "\n")

    print("| model | placement | kernels | execution | LM head | batch x seq | tokens/s | step ms | peak GB | host GB |"
          " MFU (measured peak) |" + (" MFU (datasheet) |" if sheet else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if sheet else ""))
    for model, placement, backend, execution, loss in itertools.product(models, args.placements, kernels, executions,
                                                                         args.losses):
        config = case_config(model, placement, backend, args.overrides, on_gpu, execution, loss)
        row = {"model": model, "placement": placement, "kernels": backend, "execution": execution, "loss": loss,
               **run_case(config, args.steps, args.warmup, device)}
        row["mfu"] = row["achieved_flops"] / peak
        row["mfu_datasheet"] = row["achieved_flops"] / sheet if sheet else None
        rows.append(row)
        save()
        print(f"| {model} | {placement} | {backend} | {execution} | {loss} | {row['batch']} x {row['seq_len']} | "
              f"{row['tokens_per_second']:,.0f} | {row['step_seconds'] * 1e3:.1f} | {row['peak_memory_gb']:.2f} | "
              f"{row['host_peak_memory_gb']:.1f} | {row['mfu']:.1%} |"
              + (f" {row['mfu_datasheet']:.1%} |" if sheet else ""), flush=True)
    for title, lines in (("memory saved by the fused cross-entropy", memory_saved(rows) if on_gpu else []),
                         ("targets (ratios measured in this run)", targets(rows))):
        if lines:
            print(f"\n{title}:\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
