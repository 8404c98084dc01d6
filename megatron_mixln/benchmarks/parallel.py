"""Benchmark: the same model and global batch under DP, TP, PP and TP x PP on this machine.

Each layout is a real `torchrun ... mixln-train` run; the table shows the median tokens per second over the
steps after a warm-up and the peak memory of each rank (CUDA allocations on a GPU node, process RSS on a
CPU). Run: `mixln-bench parallel [--nproc 8] [--config configs/llama_130m.yaml] [key=value ...]`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def layouts(nproc: int) -> dict[str, list[str]]:
    """Layouts that fit `nproc` processes, as mixln-train overrides."""
    found = {f"dp{nproc}": ["parallel.zero_stage=0"], f"dp{nproc} zero-1": ["parallel.zero_stage=1"],
             f"dp{nproc} zero-3": ["parallel.zero_stage=3"]}
    if nproc % 2 == 0:
        found[f"tp2 x dp{nproc // 2}"] = ["parallel.tp=2"]
        found[f"pp2 x dp{nproc // 2}"] = ["parallel.pp=2"]
    if nproc % 4 == 0:
        found[f"tp2 x pp2 x dp{nproc // 4}"] = ["parallel.tp=2", "parallel.pp=2"]
    return found


def run_layout(nproc: int, config: str, overrides: list[str], out: Path, warmup: int) -> dict:
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(bin_dir / "mixln-train"),
               config, *overrides, f"train.out_dir={out}", "train.progress_bar=false", "train.save_every=0",
               "train.eval_every=0", "train.eval_sequences=0", "train.tensorboard=false"]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        return {"error": errors[0] if errors else proc.stderr.strip().splitlines()[-1]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_second"] for r in records if "tokens_per_second" in r][warmup:]
    memory = next(r for r in records if "peak_memory_mb_per_rank" in r)
    return {"tokens_per_second": statistics.median(speeds), "peak_mb": memory["peak_memory_mb_per_rank"],
            "memory": memory["memory"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mixln-bench parallel", description=__doc__)
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes per layout (default: the GPUs on this node, else 2)")
    parser.add_argument("--config", default="configs/tiny.yaml", help="model and data (default configs/tiny.yaml)")
    parser.add_argument("--steps", type=int, default=12, help="training steps per layout (default 12)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median (default 2)")
    parser.add_argument("overrides", nargs="*", help="extra mixln-train overrides, e.g. model.num_layers=8")
    args = parser.parse_args(argv)
    import torch  # after parsing: --help and usage errors need no torch

    from megatron_mixln.config import load_config

    if args.nproc is None:
        args.nproc = torch.cuda.device_count() or 2

    # One micro-batch size for every layout, so each has the same global batch: two micro-batches per rank
    # at full data parallelism (and so enough micro-batches to fill a 2-stage pipeline).
    global_batch = load_config(args.config, args.overrides).train.global_batch_size
    micro = global_batch // (2 * args.nproc) if global_batch % (2 * args.nproc) == 0 else 1
    base = [f"train.steps={args.steps}", f"train.micro_batch_size={micro}", *args.overrides]
    scratch = Path(tempfile.mkdtemp(prefix="mixln-bench-parallel-"))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"{args.config} {' '.join(args.overrides)}: global batch {global_batch}, micro-batch {micro}, "
          f"{args.steps} steps, median after {args.warmup}, "
          f"{args.nproc} processes on {device}")
    print("| layout | tokens/s | peak memory per rank (MB) |")
    print("|---|---|---|")
    try:
        for name, overrides in layouts(args.nproc).items():
            result = run_layout(args.nproc, args.config, base + overrides, scratch / name.replace(" ", ""),
                                args.warmup)
            if "error" in result:
                print(f"| {name} | failed: {result['error']} | |", flush=True)
            else:
                peaks = ", ".join(f"{mb:,.0f}" for mb in result["peak_mb"])
                print(f"| {name} | {result['tokens_per_second']:,.0f} | {peaks} ({result['memory']}) |", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
