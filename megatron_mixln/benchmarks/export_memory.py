"""Benchmark: host memory of the consolidated export, per rank, per-unit writer vs the former whole-stage dict.

Each mode is a fresh `torchrun` job (peak RSS only grows within a process). Every rank builds its part of
the model exactly as training does (`build_training_model`: a pipeline stage, a TP shard, or ZeRO-3
partitions), then runs the export and reports its peak resident set during the export, the increase over
its resident set just before, and the full (unsharded) size of its stage and of the stage's largest unit.

- per-unit: `export_from_module`, today's export (one safetensors shard per embedding / layer / head).
- whole-stage: the export as it was before, kept here only as the baseline: every rank collects
  `dict(full_named_parameters(...))` for its whole stage, the writer saves it as one file.

Run: `mixln-bench export-memory [--config configs/llama_1b.yaml] [--nproc 2] [parallel.pp=2 ...]`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("whole-stage", "per-unit")
MB = 2**20


def _status_mb(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux clear_refs 5), so that ru_maxrss afterwards
    is the export's own peak rather than the model build's. False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _whole_stage_export(module, model_config, layout, out: Path) -> None:
    """The former export_from_module, kept as the baseline: the whole stage as one dict, one file."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from megatron_mixln.train.module_export import full_named_parameters

    tensors = dict(full_named_parameters(module, model_config, layout))
    if layout.dp_rank == 0 and layout.tensor_parallel.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / f"model-{layout.stage + 1:05d}-of-{layout.pp:05d}.safetensors"),
                  metadata={"format": "pt"})
    dist.barrier()


def _unit_sizes(module, model_config, layout) -> dict[int, int]:
    """Full (unsharded) bytes of each unit of this rank's stage, from the tensors the export gathers."""
    from megatron_mixln.train.export import export_unit
    from megatron_mixln.train.module_export import full_named_parameters

    sizes: dict[int, int] = {}
    for name, value in full_named_parameters(module, model_config, layout):
        unit = export_unit(name, model_config.num_layers)
        sizes[unit] = sizes.get(unit, 0) + value.numel() * value.element_size()
        del value
    return sizes


def _worker(mode: str, config_path: str, overrides: list[str], results: Path) -> int:
    import gc
    import resource

    import torch
    import torch.distributed as dist

    from megatron_mixln.config import load_config
    from megatron_mixln.train.module_export import export_from_module
    from megatron_mixln.train.engine import build_layout, init_distributed, leave_process_group
    from megatron_mixln.train.loop import build_training_model

    config = load_config(config_path, overrides)
    init_distributed()
    layout = build_layout(config)
    module = build_training_model(config, layout)
    gc.collect()
    out = results / f"export-{mode}"
    dist.barrier()
    rss_before = _status_mb("VmRSS")
    reset = _reset_peak_rss()
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "per-unit":
            export_from_module(module, config.model, layout, out)
        else:
            _whole_stage_export(module, config.model, layout, out)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    sizes = _unit_sizes(module, config.model, layout)
    record = {"rank": dist.get_rank(), "stage": layout.stage, "tp_rank": layout.tensor_parallel.rank,
              "dp_rank": layout.dp_rank, "writes": layout.dp_rank == 0 and layout.tensor_parallel.rank == 0,
              "rss_before_mb": rss_before, "peak_mb": peak, "peak_reset": reset, "seconds": seconds,
              "stage_mb": sum(sizes.values()) / MB, "largest_unit_mb": max(sizes.values()) / MB,
              "units": len(sizes), "layout": f"tp {layout.tp} x pp {layout.pp} x dp {layout.dp}, "
                                            f"ZeRO-{config.parallel.zero_stage}"}
    (results / f"{mode}-rank{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(out, ignore_errors=True)
    leave_process_group()
    return 0


def _launch(mode: str, nproc: int, config: str, overrides: list[str], results: Path) -> str | None:
    """Run one mode as a torchrun job; None on success, else the last line of its error output."""
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
               "-m", "megatron_mixln.benchmarks.export_memory", "--worker", mode, "--results", str(results),
               "--config", config, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode == 0:
        return None
    lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines()]
    killed = [line for line in lines if "Signal 9" in line or "SIGKILL" in line]  # the kernel's OOM killer
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception): ", line)]
    return (killed or errors or [f"exit status {proc.returncode}"])[-1]


def _machine() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    total = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:"))
    return f"CPU ({os.cpu_count()} cores, {total / 2**20:.0f} GiB RAM, {platform.machine()})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mixln-bench export-memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/llama_1b.yaml", help="model to export (default "
                                                                          "configs/llama_1b.yaml)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes (default 2)")
    parser.add_argument("--only", choices=MODES, default=None, help="run one mode (default: both, side by side)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.pp=2 or parallel.zero_stage=3")
    args = parser.parse_args(argv)
    # fp32 unless overridden: without a DeepSpeed engine a pipeline stage stays fp32, so every layout compares
    # at one precision (a bf16 run exports half the bytes; the ratios are the same).
    overrides = ["train.precision=fp32", *args.overrides]
    if args.worker:
        return _worker(args.worker, args.config, overrides, args.results)

    scratch = Path(tempfile.mkdtemp(prefix="mixln-bench-export-memory-"))
    modes = [args.only] if args.only else list(MODES)
    print(f"{args.config} {' '.join(overrides)}: {args.nproc} processes on {_machine()}")
    rows, reset_ok, layout = [], True, None
    try:
        for mode in modes:
            error = _launch(mode, args.nproc, args.config, overrides, scratch)
            if error is not None:
                rows.append(f"| {mode} | failed: {error} |" + " |" * 8)
                continue
            for rank in range(args.nproc):
                r = json.loads((scratch / f"{mode}-rank{rank}.json").read_text())
                reset_ok &= r["peak_reset"]
                rows.append(f"| {mode} | {rank} | {r['stage']} | {'yes' if r['writes'] else 'no'} "
                            f"| {r['stage_mb']:,.0f} ({r['units']} units) | {r['largest_unit_mb']:,.0f} "
                            f"| {r['rss_before_mb']:,.0f} | {r['peak_mb']:,.0f} "
                            f"| {r['peak_mb'] - r['rss_before_mb']:,.0f} | {r['seconds']:.1f} |")
            layout = r["layout"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if layout:
        print(f"layout: {layout}; sizes are full (unsharded) tensors")
    print("| export | rank | stage | writes | stage size (MB) | largest unit (MB) | RSS before export (MB) "
          "| peak RSS during export (MB) | increase (MB) | export time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if not reset_ok:
        print("note: /proc/self/clear_refs was not writable, so the peak may be the model build's, not the export's")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
