"""scripts/gpu_check.sh under a cut time budget: the run stops early, and what it kept are the highest-priority ratios
(the order itself is tested without running anything in tests/test_bench_train.py, plan_cases)."""
import json
import os
import subprocess
import sys
from pathlib import Path


def test_kernel_benchmark_measures_every_ops_judged_shapes_first():
    from megatron_mixln.kernels.bench import (DEFAULT_HIDDEN, DEFAULT_INTERMEDIATE, DEFAULT_TOKENS, OPS, TARGET_HIDDEN,
                                              TARGET_TOKENS, shape_plan)

    plan = shape_plan(OPS, DEFAULT_TOKENS, DEFAULT_HIDDEN, DEFAULT_INTERMEDIATE)
    every = {(op, t, w) for op in OPS for w in (DEFAULT_INTERMEDIATE if op == "swiglu" else DEFAULT_HIDDEN)
             for t in DEFAULT_TOKENS}
    assert len(plan) == len(every) and set(plan) == every
    assert [op for op, _, _ in plan[:3]] == OPS  # the ops take turns: a budget of 3 shapes covers each op once

    def judged(op, tokens, width):
        return tokens >= TARGET_TOKENS and (op == "swiglu" or width >= TARGET_HIDDEN)

    for op in OPS:
        mine = [entry for entry in plan if entry[0] == op]
        flags = [judged(*entry) for entry in mine]
        assert flags == sorted(flags, reverse=True)  # every judged shape before any other of the op
        assert judged(*mine[0])


def test_a_cut_budget_keeps_the_mix_pre_and_triton_torch_pairs(tmp_path):
    """The smoke run (tiny model, Triton under the interpreter beside torch) with a 50 s budget for the whole
    script: far too little for its 16 bench cases, enough for the first three, which hold both eager ratios."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_SMOKE="1", GPU_CHECK_TRAIN_COMPARE="0", GPU_CHECK_7B_S="0",
               GPU_CHECK_BUDGET_S="50", PYTHON=sys.executable, OUT=str(out), OMP_NUM_THREADS="1",
               TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    bench = json.loads((out / "train_bench.json").read_text())
    cases = [(r["placement"], r["kernels"], r["execution"], r["loss"]) for r in bench["rows"]]
    assert cases[:3] == [("pre", "triton", "eager", "fused"), ("mix", "triton", "eager", "fused"),
                         ("mix", "torch", "eager", "fused")]
    parts = {p["part"]: p for p in json.loads((out / "summary.json").read_text())["parts"]}
    # The budget did cut the run: the bench stopped itself (a note lists what it left) or was killed at its limit.
    assert len(cases) < 16
    assert (parts["train_bench"]["status"], bool(bench["notes"])) in (("ok", True), ("cut", False))
    summary = (out / "summary.md").read_text()
    by_case = {case: r for case, r in zip(cases, bench["rows"])}
    mix, pre = by_case["mix", "triton", "eager", "fused"], by_case["pre", "triton", "eager", "fused"]
    torch_row = by_case["mix", "torch", "eager", "fused"]
    assert (f"- Mix-LN / Pre-LN step time, tiny triton eager fused: {mix['step_seconds'] / pre['step_seconds']:.3f}"
            in summary)
    assert (f"- triton vs torch speed-up, tiny mix eager fused: "
            f"{torch_row['step_seconds'] / mix['step_seconds']:.3f}x" in summary)
    assert int(parts["train_bench"]["seconds"]) < 50
