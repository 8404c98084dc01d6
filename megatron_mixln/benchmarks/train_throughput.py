"""Benchmark: training throughput of the real training step (DeepSpeed engine + step engine, one process).

For each model x placement x kernels backend x execution (eager, or each decoder layer torch.compile'd) x LM head
(the plain projection + cross-entropy, or the chunked fused one) it trains a few steps on random tokens and
prints tokens/s, step time, peak memory (device and host) and MFU: tokens/s x model FLOPs per token
(megatron_mixln/train/flops.py, docs/performance.md) over the device's peak, which is measured here (a large
dense matmul in the training precision) and, for known GPUs, also taken from the datasheet. All cases run in one
process, one after the other, so their ratios compare like with like, in the order of `plan_cases`: the pairs of
the targets first, one model build serving every kernels backend, execution and LM head of a
placement; each row is printed and the JSON rewritten as it lands, so a run cut short (by `--budget-s`
or a kill) keeps the highest-priority ratios measured so far. With parallel.offload_optimizer a case whose
host-memory plan (train/memory.py, offload_host_plan) exceeds the host's available memory is listed, not run. After the
table come the memory the fused cross-entropy saved and the issue's targets as measured ratios (Mix-LN against
Pre-LN step time, triton against torch, compile + triton against compile alone, MFU). `--stability off on` adds, after
those pairs, the main placement's reference case with the loss-spike guard and the stability telemetry on
(guard.action=skip, train.telemetry_every=N): its step time between telemetry steps against the same case off, the
telemetry step's own cost, and both amortised over N steps.
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


def plan_cases(models: list[str], placements: list[str], kernels: list[str], executions: list[str],
               losses: list[str], stability: list[str] = ("off",)) -> list[tuple]:
    """Every (model, placement, kernels, execution, loss) case once, in the order that fills the issue's targets
    first, so that a run cut anywhere holds the highest-priority ratios measured so far.

    Per model, the targets' pairs come first, each pair's second case right after its first where it can
    (the first kernels backend, execution and loss are the reference ones, the last placement the main one):
    every placement in the given order (Mix-LN / Pre-LN with `--placements pre mix`, and the main placement's MFU),
    then on the main placement the other kernels backends (triton vs torch), the other LM heads (the fused loss's
    memory) and every backend compiled (compile + triton vs compile alone). Then the secondary cases, the main
    placement's first. Consecutive cases of one model and placement share one build (`Build`, `apply_variant`,
    `apply_execution`), so the pairs above cost one build per placement. With "on" in `stability`, each model's
    main reference case with the guard and telemetry on, (model, main, k0, e0, l0, "on"), follows the targets' pairs
    (its "off" counterpart is the 5-tuple case among them).
    """
    k0, e0, l0 = kernels[0], executions[0], losses[0]
    main = placements[-1]
    first, rest = [], []
    for model in models:
        first += [(model, p, k0, e0, l0) for p in placements]
        first += [(model, main, k, e0, l0) for k in kernels[1:]]
        first += [(model, main, k0, e0, loss) for loss in losses[1:]]
        first += [(model, main, k, e, l0) for e in executions[1:] for k in kernels]
    for model in models:
        for p in placements[::-1]:  # the main placement first: its build is the one still there
            rest += [(model, p, k, e, loss) for e in executions for k in kernels for loss in losses]
    first += [(model, main, k0, e0, l0, "on") for model in models if "on" in stability]
    plan = []
    for case in first + rest:
        if case not in plan:
            plan.append(case)
    return plan


def apply_variant(model, kernels: str, loss: str) -> None:
    """Switch a built model to another kernels backend and LM head: the attributes each module reads in its forward
    (norms and MLPs: `kernels`, model/norms.py and model/layers.py; the LM head: `fused`, model/llama.py)."""
    from megatron_mixln.model import ops
    from megatron_mixln.model.llama import VocabParallelLMHead

    ops.check_backend(kernels)
    for module in model.modules():
        if isinstance(getattr(module, "kernels", None), str):
            module.kernels = kernels
        if isinstance(module, VocabParallelLMHead):
            module.fused = loss == "fused"


def apply_execution(model, execution: str) -> None:
    """Compile each decoder layer in place (train.compile), or give it back its eager forward."""
    from megatron_mixln.model.llama import DecoderLayer, compile_decoder_layers

    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    compiled = all("forward" in layer.__dict__ for layer in layers)
    if execution == "compile" and not compiled:
        compile_decoder_layers(model)
    elif execution == "eager":
        for layer in layers:
            layer.__dict__.pop("forward", None)  # the instance's compiled forward hides the class's


class Build:
    """One model and DeepSpeed engine, kept while consecutive cases can share it."""

    def __init__(self, config, device):
        import torch

        from megatron_mixln.train.engine import build_engine, build_layout, build_training_model
        from megatron_mixln.train.step import make_step_engine

        start = time.perf_counter()
        self.layout = build_layout(config)
        self.model = build_training_model(config, self.layout)
        self.engine, _, _ = build_engine(self.model, config, self.layout)
        self.steps_engine = make_step_engine(self.engine, config, self.layout)
        _sync(device)
        self.seconds = time.perf_counter() - start
        self.generator = torch.Generator().manual_seed(0)

    def close(self, device) -> None:
        import torch

        apply_execution(self.model, "eager")  # a compiled forward refers back to its layer: break the cycle
        del self.steps_engine, self.engine, self.model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_case(build: Build, config, steps: int, warmup: int, device, stability: str = "off") -> dict:
    """Train `warmup + steps` steps on random tokens on `build`; the median step time of the last `steps`.

    The peak device memory is that of the timed steps (reset after the warm-up), so every case of a shared build
    is measured alike: the first one's warm-up also creates the optimizer states, which the others find there.
    The weights carry on from the previous case's steps; a step's time and memory do not depend on their values.

    `stability="on"`: each step does what the training loop adds with the guard and the telemetry on: the guard
    judges it (guard.action, train/guard.py), and on a telemetry step (train.telemetry_every) the per-layer norms are
    read and train/telemetry.py measures. The steps are numbered so that the last timed one is a telemetry step:
    the median is the time between telemetry steps, and `telemetry_step_seconds` that step's own time.
    """
    import torch

    from megatron_mixln.train.flops import training_flops_per_token
    from megatron_mixln.train.telemetry import measure, telemetry_due

    batch, seq = config.train.micro_batch_size, config.data.seq_len
    on = stability == "on"
    guard = _install_guard(build, config) if on else None
    every = config.train.telemetry_every if on else 0
    first = (every - (warmup + steps - 1) % every) % every if every else 0  # the last step a telemetry step
    times, telemetry_times = [], []
    try:
        for index in range(warmup + steps):
            step = first + index
            due = on and telemetry_due(config.train, step)
            if index == warmup and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ids = torch.randint(0, config.model.vocab_size, (batch, seq + 1), generator=build.generator)
            micro_batches = [(ids[:, :-1], ids[:, 1:])]
            _sync(device)
            start = time.perf_counter()
            outcome = build.steps_engine.train_step(step, micro_batches, batch * seq, want_layer_norms=due)
            if guard is not None:
                guard.after_step(step, outcome.applied)
            if due:
                measure(build.steps_engine, micro_batches, outcome)
            _sync(device)
            (telemetry_times if due and index >= warmup else times).append(time.perf_counter() - start)
    finally:
        if guard is not None:
            build.steps_engine.guard = None
    step_time = statistics.median(times[warmup:])
    host_peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB; monotonic
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else host_peak_gb
    tokens_per_second = batch * seq / step_time
    flops_per_token = training_flops_per_token(config.model, seq)
    return {"tokens_per_second": tokens_per_second, "step_seconds": step_time, "peak_memory_gb": peak_gb,
            "host_peak_memory_gb": host_peak_gb, "first_step_seconds": times[0],
            "model_flops_per_token": flops_per_token, "achieved_flops": tokens_per_second * flops_per_token,
            "batch": batch, "seq_len": seq, "precision": config.train.precision, "stability": stability,
            **({"telemetry_every": every, "guard_action": config.guard.action,
                "telemetry_step_seconds": statistics.mean(telemetry_times) if telemetry_times else None} if on else {})}


def _install_guard(build: Build, config):
    """The loss-spike guard as the training loop installs it (train/loop.py: the step engine judges each step with
    it), or None when guard.action is off."""
    if config.guard.action == "off":
        return None
    from megatron_mixln.train.guard import LossSpikeGuard

    guard = build.steps_engine.guard = LossSpikeGuard(config.guard, [])  # no collapse levels: random tokens
    return guard


def host_memory_refusal(config, on_gpu: bool) -> tuple[dict, str | None]:
    """With parallel.offload_optimizer: the host-memory plan (train/memory.py, offload_host_plan) against what this
    host has available now; returns (figures for the row, the reason not to run, or None)."""
    import psutil

    from megatron_mixln.train.memory import offload_host_plan

    if not config.parallel.offload_optimizer:
        return {}, None
    plan = offload_host_plan(config, gpu_host=on_gpu)
    available = psutil.virtual_memory().available
    figures = {"host_plan_gib": plan["bytes"] / 2**30, "host_plan_peak_gib": plan["peak"] / 2**30,
               "host_available_gib": available / 2**30, "host_total_gib": psutil.virtual_memory().total / 2**30}
    if plan["peak"] <= 0.95 * available:
        return figures, None
    return figures, (f"not run: DeepSpeed's offloaded optimizer needs {plan['bytes'] / 2**30:.1f} GiB of host memory "
                     f"({plan['bytes_per_param']:.1f} B/param; {plan['peak'] / 2**30:.1f} GiB at its peak while "
                     f"pinning), this host has {available / 2**30:.1f} GiB available of "
                     f"{figures['host_total_gib']:.1f} GiB")


AXES = ("model", "placement", "kernels", "execution", "loss")


def counterpart(rows: list[dict], row: dict, **change) -> dict | None:
    """The measured case that differs from `row` only by `change`, e.g. placement="pre" (or stability="off": a row
    without that key is a case with the guard and telemetry off)."""
    def stability(r):
        return r.get("stability", "off")

    return next((r for r in rows if all(r[axis] == change.get(axis, row[axis]) for axis in AXES)
                 and stability(r) == change.get("stability", stability(row))), None)


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
        off = counterpart(rows, r, stability="off") if r.get("stability") == "on" else None
        if off:
            every, between = r["telemetry_every"], r["step_seconds"] / off["step_seconds"]
            case = f"{r['model']} {r['placement']} {r['kernels']} {r['execution']} {r['loss']}"
            lines.append(f"- guard.action={r['guard_action']} + telemetry / off step time between telemetry steps, "
                         f"{case}: {between:.3f} ({'within' if abs(between - 1) <= 0.01 else 'NOT within'} 1%)")
            if r.get("telemetry_step_seconds"):
                extra = r["telemetry_step_seconds"] - r["step_seconds"]
                amortised = (r["step_seconds"] + extra / every) / off["step_seconds"]
                lines.append(f"- telemetry step, {case}: {r['telemetry_step_seconds'] * 1e3:.1f} ms "
                             f"({r['telemetry_step_seconds'] / r['step_seconds']:.2f}x a step); amortised over "
                             f"train.telemetry_every={every} steps, on / off step time {amortised:.3f}")
        if r["model"] == "1b" and r["placement"] == "mix" and r.get("mfu_datasheet"):
            lines.append(f"- 1B Mix-LN MFU (datasheet peak), {r['kernels']} {r['execution']} {r['loss']}: "
                         f"{r['mfu_datasheet']:.1%} ({'meets' if r['mfu_datasheet'] >= 0.5 else 'below'} 50%)")
    return lines


def row_line(row: dict, sheet: float | None) -> str:
    """One row of the table (or the reason a case did not run)."""
    placement = row["placement"] + (" + guard, telemetry" if row.get("stability") == "on" else "")
    head = f"| {row['model']} | {placement} | {row['kernels']} | {row['execution']} | {row['loss']} |"
    if row.get("not_run"):
        return f"{head} {row['not_run']} |"
    return (f"{head} {row['batch']} x {row['seq_len']} | {row['tokens_per_second']:,.0f} | "
            f"{row['step_seconds'] * 1e3:.1f} | {row['peak_memory_gb']:.2f} | {row['host_peak_memory_gb']:.1f} | "
            f"{row['mfu']:.1%} |" + (f" {row['mfu_datasheet']:.1%} |" if sheet else "")
            + (f" {row['build']} |" if "build" in row else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mixln-bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help=f"{', '.join(MODELS)} or config files (default: 71m 130m 250m 1b "
                        "on a GPU, tiny on a CPU)")
    parser.add_argument("--placements", nargs="+", default=["pre", "mix"],
                        help="norm placements; the last is the main one, where the other pairs are measured "
                             "(default: pre mix)")
    parser.add_argument("--kernels", nargs="+",
                        help="kernels backends (default: torch triton on a GPU, torch on a CPU)")
    parser.add_argument("--executions", nargs="+", choices=["eager", "compile"],
                        help="eager and/or per-layer torch.compile (default: eager compile on a GPU, eager on a CPU)")
    parser.add_argument("--losses", nargs="+", choices=["unfused", "fused"], default=["fused"],
                        help="LM head + loss: unfused and/or the chunked fused cross-entropy (default: fused)")
    parser.add_argument("--stability", nargs="+", choices=["off", "on"], default=["off"],
                        help="'off on': also the main reference case with the loss-spike guard and the telemetry on, "
                             "beside the same case off (default: off only)")
    parser.add_argument("--telemetry-every", type=int, default=50, metavar="N",
                        help="train.telemetry_every of the 'on' case (default 50); its guard.action is skip")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3; compile happens there)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no build whose estimated cost (the last build's seconds and cases) would end "
                             "past this many seconds from the start; the cases left are listed")
    parser.add_argument("--json", type=Path, help="also write every figure here (rewritten after every case)")
    parser.add_argument("overrides", nargs="*",
                        help="section.field=value for every case, e.g. train.micro_batch_size=8")
    args = parser.parse_intermixed_args(argv)
    started = time.perf_counter()
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
    cases = plan_cases(models, args.placements, kernels, executions, args.losses, args.stability)
    rows, notes = [], []

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps({"device": name, "measured_peak_flops": peak, "datasheet_peak_flops": sheet,
                                             "rows": rows, "notes": notes}, indent=1) + "\n")

    print("| model | placement | kernels | execution | LM head | batch x seq | tokens/s | step ms | peak GB | host GB |"
          " MFU (measured peak) |" + (" MFU (datasheet) |" if sheet else "") + " build |")
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if sheet else "") + "---|")
    build = None  # the model kept for the next case of the same model and placement
    build_s, case_s = None, {}  # the last build's seconds; the last case's seconds per execution
    for index, case in enumerate(cases):
        model, placement, backend, execution, loss = case[:5]
        stability = case[5] if len(case) > 5 else "off"
        overrides = args.overrides + (["guard.action=skip", f"train.telemetry_every={args.telemetry_every}"]
                                      if stability == "on" else [])
        config = case_config(model, placement, backend, overrides, on_gpu, execution, loss)
        # ZeRO-3 compiles only before deepspeed.initialize (gather_whole_layers_under_zero3): no switching there.
        shared = build is not None and build.key == (model, placement) and (
            config.parallel.zero_stage < 3 or build.execution == execution)
        estimate = (0.0 if shared else build_s or 0.0) + case_s.get(execution, max(case_s.values(), default=0.0))
        if args.budget_s is not None and rows and time.perf_counter() - started + estimate > args.budget_s:
            notes.append(f"time budget of {args.budget_s:.0f} s: {len(cases) - index} cases not measured: "
                         + ", ".join(" ".join(left) for left in cases[index:]))
            break
        figures, refusal = host_memory_refusal(config, on_gpu)
        if refusal:
            rows.append({**dict(zip(AXES, case)), "stability": stability, **figures, "not_run": refusal})
            print(row_line(rows[-1], sheet), flush=True)
            save()
            continue
        case_start = time.perf_counter()
        if not shared:
            if build is not None:
                build.close(device)
            build = None
            build = Build(config, device)
            build.key, build_s = (model, placement), build.seconds
        apply_execution(build.model, execution)
        build.execution = execution
        apply_variant(build.model, backend, loss)
        row = {**dict(zip(AXES, case)), **run_case(build, config, args.steps, args.warmup, device, stability), **figures,
               "build": "reused" if shared else f"built in {build.seconds:.0f} s",
               "build_seconds": 0.0 if shared else build.seconds}
        row["mfu"] = row["achieved_flops"] / peak
        row["mfu_datasheet"] = row["achieved_flops"] / sheet if sheet else None
        rows.append(row)
        save()
        print(row_line(row, sheet), flush=True)
        case_s[execution] = time.perf_counter() - case_start - (0.0 if shared else build.seconds)
    if build is not None:
        build.close(device)
    save()
    measured = [row for row in rows if not row.get("not_run")]
    for title, lines in (("memory saved by the fused cross-entropy", memory_saved(measured) if on_gpu else []),
                         ("targets (ratios measured in this run)", targets(measured)), ("notes", notes)):
        if lines:
            print(f"\n{title}:\n" + "\n".join(lines if title != "notes" else [f"- {n}" for n in lines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
