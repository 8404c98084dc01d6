#!/usr/bin/env bash
# One prepared GPU check, under 8 minutes on one H100/H200 (the device tool's machines, which cannot fetch anything).
# Before starting the device, HERE:  bash scripts/gpu_wheels.sh   (fills the git-ignored .whl/ with deepspeed,
# pydantic, datasets & co, which the GPU image lacks), then the device command:
#   bash scripts/gpu_check.sh      with carry: [".whl"]
# Every part's rows land in its JSON as they are measured, in priority order, so a run cut anywhere keeps the
# highest-priority figures; the split of the 450 s and each part's estimate are in docs/performance.md.
#   1. install the carried wheels into /tmp/site;
#   2. kernels/gpu_check.sh: the kernel benchmark first (35 s; each kernel's bandwidth as % of the measured copy
#      bandwidth, Liger and apex beside it; the targets' shapes first), then the kernel tests on the GPU;
#   3. (only with GPU_CHECK_TRAIN_COMPARE=1) the 130M Mix-LN config trained for 200 bf16 steps on the embedded text
#      through the real entry point (megatron_mixln.cli:train_main, i.e. mixln-train), once with model.kernels=triton
#      and once with model.kernels=torch, same seed; scripts/compare_runs.py checks the losses are finite and the
#      curves match, and tabulates tokens/s and peak memory;
#   4. mixln-bench train on the 1B config, one process, the targets' pairs first (plan_cases): Pre-LN and Mix-LN
#      (triton, eager, fused loss: the Mix-LN / Pre-LN step-time ratio, 1B Mix-LN MFU), then on the same Mix-LN
#      build torch kernels (triton vs torch eager), the unfused LM head (the fused loss's memory saving), triton
#      and torch compiled (compile + triton vs compile alone), then the secondary cases while time is left;
#   5. one optimiser step of the 7B Mix-LN config on this one GPU: ZeRO-3, the optimiser offloaded to the CPU,
#      activation checkpointing, bf16. The bench first weighs the host-memory plan (train/memory.py,
#      offload_host_plan) against the host's available memory and reports "not run" with both figures when it
#      does not fit (Adam: 135 GiB, on a 128 GiB machine); GPU and host peak memory and the plan in the summary row.
# CPU smoke test:  GPU_CHECK_SMOKE=1 PYTHON=.venv/bin/python bash scripts/gpu_check.sh
#                  (configs/tiny.yaml, a few fp32 steps, triton under TRITON_INTERPRET=1 vs torch; the kernel part
#                  is skipped without a GPU, the wheel install when deepspeed & co already import).
# Writes into ${OUT:-gpu_results} (flat): summary.md, summary.json, log.txt (everything printed), kernels_tests.log,
# kernels_bench.json, train_bench.json, seven_b_step.json (and loss_curves.png with part 3).
# Every part runs even if an earlier one failed; the exit status is non-zero if any part failed (a part cut at its
# time limit, or not run for lack of host memory, is not a failure: its status says so).
# Knobs (environment): GPU_CHECK_BUDGET_S (whole script, default 450), GPU_CHECK_KERNEL_S (kernel part, default
# 90), GPU_CHECK_KERNEL_BENCH_S (its benchmark, default 35), GPU_CHECK_BENCH_S (training benchmark, at most 250;
# 120 in the smoke test), GPU_CHECK_7B_S (kept back for the 7B step, default 60; 0 skips it),
# GPU_CHECK_TRAIN_COMPARE (1: run part 3 too; budget it with GPU_CHECK_BUDGET_S), KERNEL_BENCH_ARGS (extra
# benchmark arguments, default "--providers eager unfused liger apex": everything but torch.compile, whose
# per-width compiles would not fit the budget; set it empty for the full benchmark), GPU_CHECK_STEPS /
# GPU_CHECK_GLOBAL_BATCH / GPU_CHECK_MICRO_BATCH (200 / 256 / 64), GPU_CHECK_SMOKE_TRITON (smoke: 1 = triton under
# the interpreter vs torch, 0 = torch twice), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT="$(pwd)"
START=$(date +%s)
OUTDIR="${OUT:-gpu_results}"
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)"
LOG="$OUTDIR/log.txt"
exec 3>&1 4>&2
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

PY="${PYTHON:-python3}"
SMOKE="${GPU_CHECK_SMOKE:-0}"
TOTAL_S="${GPU_CHECK_BUDGET_S:-450}"   # worst case ~475 s with the kill grace periods: under 8 minutes
DEADLINE=$((START + TOTAL_S))
# The split of the 450 s (docs/performance.md, "The GPU check": each part's estimate and its basis).
KERNEL_S="${GPU_CHECK_KERNEL_S:-90}"   # part 2: kernel benchmark (first, KERNEL_BENCH_S) then the kernel tests
KERNEL_BENCH_S="${GPU_CHECK_KERNEL_BENCH_S:-35}"
RESERVE_S=20                           # kept back at the end for the comparison and the summary
BENCH_S="${GPU_CHECK_BENCH_S:-$([ "$SMOKE" = 1 ] && echo 120 || echo 250)}"  # at most, for part 4 (training bench)
SEVEN_B_S="${GPU_CHECK_7B_S:-60}"      # kept back for part 5, the 7B step, which also gets what part 4 leaves
TRAIN_COMPARE="${GPU_CHECK_TRAIN_COMPARE:-$SMOKE}"   # the smoke test runs every part
[ "$TRAIN_COMPARE" = 1 ] || RESERVE_S=10  # the summary alone
SITE="${GPU_CHECK_SITE:-/tmp/site}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1   # nothing can be fetched there anyway

# Scratch space: tmpfs when it has room (each run writes a ~2 GB checkpoint at its end).
SCRATCH="${TMPDIR:-/tmp}"
if [ -d /dev/shm ] && [ "$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')" -gt $((8 * 1024 * 1024)) ] 2>/dev/null; then
  SCRATCH=/dev/shm
fi
WORK="$(mktemp -d "$SCRATCH/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

PARTS=()
declare -A STATUS=() SECS=() DETAIL=()
record() {  # record PART STATUS SECONDS DETAIL
  PARTS+=("$1"); STATUS[$1]="$2"; SECS[$1]="$3"; DETAIL[$1]="${4:-}"
  echo "gpu_check: [$1] $2 (${3} s)${4:+: $4}"
}
now() { date +%s; }
left() { echo $((DEADLINE - $(now))); }

echo "== gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), mode $([ "$SMOKE" = 1 ] && echo smoke || echo full), budget ${TOTAL_S} s =="
{ nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"; } | tee "$WORK/nvidia_smi.txt"
date -u | tee "$WORK/date.txt"
uname -srm

# ---- 1. wheels ---------------------------------------------------------------------------------------------------
T0=$(now)
NEEDED="import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in ('deepspeed', 'pydantic', 'hjson')) else 1)"
if "$PY" -c "$NEEDED" 2>/dev/null; then
  record wheels skipped $(( $(now) - T0 )) "deepspeed, pydantic and hjson already import"
elif ! compgen -G ".whl/*.whl" >/dev/null; then
  record wheels FAILED $(( $(now) - T0 )) "no .whl/*.whl: run scripts/gpu_wheels.sh here first and carry .whl"
elif "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  if "$PY" -c "import deepspeed, pydantic, hjson" >/dev/null 2>"$WORK/import.err"; then
    # datasets serves C4 / hf: sources only (not the embedded text trained on here): a failure is noted, not fatal.
    DS_NOTE="datasets imports"
    "$PY" -c "import datasets" >/dev/null 2>"$WORK/datasets.err" \
      || DS_NOTE="datasets does NOT import: $(tail -n 1 "$WORK/datasets.err")"
    record wheels ok $(( $(now) - T0 )) "$(find .whl -type f -name '*.whl' | wc -l) wheels into $SITE; $DS_NOTE"
  else
    cat "$WORK/import.err"
    record wheels FAILED $(( $(now) - T0 )) "installed, but: $(tail -n 1 "$WORK/import.err")"
  fi
else
  record wheels FAILED $(( $(now) - T0 )) "pip install --target $SITE failed"
fi

# The working tree's package, not installed: megatron_mixln from the repo root (megatron_mixln/kernels.py finds
# kernels/ beside it and serves it as megatron_mixln.kernels).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# Versions, for the record (and the summary).
"$PY" - "$WORK/env.json" <<'EOF'
import importlib, importlib.metadata as md, json, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable}
for name in ("torch", "triton", "deepspeed", "pydantic", "datasets", "transformers", "tokenizers", "numpy",
             "typing_extensions", "fsspec", "huggingface_hub", "pyarrow"):
    try:
        info[name] = md.version(name.replace("_", "-"))
    except md.PackageNotFoundError:
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
try:
    import torch
    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
except Exception as exc:  # noqa: BLE001
    info["torch_error"] = repr(exc)
try:
    import megatron_mixln.kernels as k
    info["megatron_mixln.kernels"] = k.__file__
except Exception as exc:  # noqa: BLE001
    info["megatron_mixln.kernels"] = f"import failed: {exc!r}"
print(" ".join(f"{k}={v}" for k, v in info.items()))
json.dump(info, open(sys.argv[1], "w"), indent=1)
EOF
DEVICE_NAME=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1])).get('device'))" "$WORK/env.json" 2>/dev/null)
HAVE_CUDA=$("$PY" -c "import json, sys; print(1 if json.load(open(sys.argv[1])).get('cuda_available') else 0)" "$WORK/env.json" 2>/dev/null || echo 0)

# ---- 2. kernels: kernels/gpu_check.sh, called as it is -------------------------------------------------------
T0=$(now)
if [ "$HAVE_CUDA" != 1 ]; then
  if [ "$SMOKE" = 1 ]; then record kernels skipped 0 "no CUDA device (smoke test)"
  else record kernels FAILED 0 "no CUDA device visible to $PY"; fi
else
  KLIMIT=$KERNEL_S
  [ $(( $(left) - BENCH_S - SEVEN_B_S - RESERVE_S )) -lt "$KLIMIT" ] && KLIMIT=$(( $(left) - BENCH_S - SEVEN_B_S - RESERVE_S ))
  [ "$KLIMIT" -lt 60 ] && KLIMIT=60
  mkdir -p "$WORK/kernels"
  # The benchmark first (its shapes in target order, stopping after KERNEL_BENCH_S), then the tests.
  PYTHON="$PY" KERNEL_BENCH_BUDGET_S="$KERNEL_BENCH_S" \
    KERNEL_BENCH_ARGS="${KERNEL_BENCH_ARGS-"--providers eager unfused liger apex"}" \
    timeout -k 10 "$KLIMIT" bash kernels/gpu_check.sh "$WORK/kernels"
  RC=$?
  [ -f "$WORK/kernels/tests.log" ] && cp "$WORK/kernels/tests.log" "$OUTDIR/kernels_tests.log"
  [ -f "$WORK/kernels/bench.json" ] && cp "$WORK/kernels/bench.json" "$OUTDIR/kernels_bench.json"
  [ -f "$WORK/kernels/bench.md" ] && cp "$WORK/kernels/bench.md" "$WORK/kernels_bench.md"
  DET="$(tail -n 1 "$WORK/kernels/tests.log" 2>/dev/null)"
  if [ "$RC" -eq 0 ]; then record kernels ok $(( $(now) - T0 )) "tests: $DET; benchmark done"
  elif [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ]; then  # the benchmark ran first; the tests' progress is in the log
    record kernels cut $(( $(now) - T0 )) "killed at its ${KLIMIT} s limit; tests: $DET"
  else record kernels FAILED $(( $(now) - T0 )) "kernels/gpu_check.sh exit $RC; tests: $DET"; fi
fi

# ---- 3. training: triton vs torch, same config and seed ------------------------------------------------------
if [ "$SMOKE" = 1 ]; then
  STEPS="${GPU_CHECK_STEPS:-6}" GBATCH="${GPU_CHECK_GLOBAL_BATCH:-16}" MBATCH="${GPU_CHECK_MICRO_BATCH:-8}"
  CONFIG=configs/tiny.yaml
  TRAIN_ARGS=(data.source=embedded data.tokenizer=bpe data.bpe_vocab_size=4096 data.mode=document data.seq_len=128
              train.eval_sequences=16 train.layer_grad_norm_every=0)
  # fp32 on a CPU: the kernels round once in fp32 like the torch path, so the curves agree to ~1e-5.
  COMPARE_ARGS=(--skip-steps 1 --tail 3 --max-abs-diff 1e-3 --tail-mean-diff 1e-3)
  if [ "${GPU_CHECK_SMOKE_TRITON:-1}" = 1 ]; then RUNS=(triton torch); else RUNS=(torch torch_again); fi
  [ "$HAVE_CUDA" = 1 ] || export TRITON_INTERPRET=1   # kernels on CPU tensors need Triton's interpreter
else
  # 4 micro-batches of 64 x 256 tokens per step: 13M token positions in 200 steps
  STEPS="${GPU_CHECK_STEPS:-200}" GBATCH="${GPU_CHECK_GLOBAL_BATCH:-256}" MBATCH="${GPU_CHECK_MICRO_BATCH:-64}"
  CONFIG=configs/llama_130m.yaml
  # The paper's t5-base tokenizer needs the Hugging Face hub: a 32000-token byte-level BPE trained on the embedded
  # text instead (model.vocab_size stays 32000). warmup_fraction and the rest as in the config (0.1 of 200 steps).
  TRAIN_ARGS=(data.source=embedded data.tokenizer=bpe data.bpe_vocab_size=32000 data.mode=document data.seq_len=256
              train.eval_sequences=256 train.precision=bf16)
  # bf16 tolerances: see scripts/compare_runs.py's docstring.
  COMPARE_ARGS=(--skip-steps 10 --tail 50 --max-abs-diff 0.05 --tail-mean-diff 0.02)
  RUNS=(triton torch)
fi
TRAIN_ARGS+=("train.steps=$STEPS" "train.global_batch_size=$GBATCH" "train.micro_batch_size=$MBATCH" train.eval_every=0
             train.save_every=0 train.progress_bar=false train.tensorboard=false train.resume=none
             "data.cache_dir=$WORK/data_cache")
COMPARE_RUNS=()
if [ "$TRAIN_COMPARE" != 1 ]; then
  RUNS=()
  record train_compare skipped 0 "part 3 runs with GPU_CHECK_TRAIN_COMPARE=1"
else
  echo "== training: $CONFIG ${TRAIN_ARGS[*]} =="
fi
for i in "${!RUNS[@]}"; do
  name="${RUNS[$i]}"
  kernels="${name%_again}"
  T0=$(now)
  if [ "$HAVE_CUDA" != 1 ] && [ "$SMOKE" != 1 ]; then
    record "train_$name" FAILED 0 "no CUDA device (the 130M run needs a GPU; GPU_CHECK_SMOKE=1 for a CPU smoke test)"
    continue
  fi
  remaining=$(( ${#RUNS[@]} - i ))
  limit=$(( ($(left) - RESERVE_S - BENCH_S - SEVEN_B_S) / remaining )); [ "$limit" -lt 30 ] && limit=30
  RUN_DIR="$WORK/run_$name"
  COMPARE_RUNS+=("$name=$RUN_DIR")
  echo "== train $name: model.kernels=$kernels, limit ${limit} s =="
  timeout -k 15 "$limit" "$PY" -c 'from megatron_mixln.cli import train_main; train_main()' \
    "$CONFIG" "${TRAIN_ARGS[@]}" "train.out_dir=$RUN_DIR" "model.kernels=$kernels"
  RC=$?
  # Keep the metrics only: the checkpoint and the export (GBs for 130M) are not needed here.
  rm -rf "$RUN_DIR/checkpoints" "$RUN_DIR/export"
  STEPS_DONE=$(grep -c '"tokens_per_second"' "$RUN_DIR/metrics.jsonl" 2>/dev/null); STEPS_DONE=${STEPS_DONE:-0}
  if [ "$RC" -eq 0 ]; then record "train_$name" ok $(( $(now) - T0 )) "$STEPS_DONE/$STEPS steps"
  elif [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ]; then
    record "train_$name" FAILED $(( $(now) - T0 )) "killed at its ${limit} s limit after $STEPS_DONE/$STEPS steps"
  else record "train_$name" FAILED $(( $(now) - T0 )) "mixln-train exit $RC after $STEPS_DONE/$STEPS steps"; fi
done

T0=$(now)
if [ "$TRAIN_COMPARE" != 1 ]; then
  :
elif [ "${#COMPARE_RUNS[@]}" -eq 2 ]; then
  "$PY" scripts/compare_runs.py "${COMPARE_RUNS[@]}" --steps "$STEPS" "${COMPARE_ARGS[@]}" \
    --label "$CONFIG, ${STEPS} steps, global batch $GBATCH, micro-batch $MBATCH, $DEVICE_NAME" \
    --md "$WORK/train_compare.md" --json "$WORK/train_compare.json" --plot "$OUTDIR/loss_curves.png"
  RC=$?
  if [ "$RC" -eq 0 ]; then record compare ok $(( $(now) - T0 )) "finite losses, matching curves"
  else record compare FAILED $(( $(now) - T0 )) "see the checks in summary.md"; fi
else
  record compare FAILED 0 "no two runs to compare"
fi

# ---- 4. training benchmark: mixln-bench train ------------------------------------------------------------------
# bench NAME LIMIT JSON ARGS...: one mixln-bench train run, time-capped (its own --budget-s starts no case that would
# end in the last third of the limit or 15 s; the timeout is the backstop), rows into the log and JSON as they land.
bench() {
  local name="$1" limit="$2" json="$3"; shift 3
  local T0; T0=$(now)
  [ "$limit" -lt 20 ] && limit=20
  local margin=$(( limit / 3 )); [ "$margin" -gt 15 ] && margin=15
  echo "== mixln-bench train $*, limit ${limit} s =="
  timeout -k 10 "$limit" "$PY" -m megatron_mixln.benchmarks.train_throughput "$@" --budget-s $(( limit - margin )) \
    --json "$OUTDIR/$json" | tee "$WORK/$name.md"
  local rc=${PIPESTATUS[0]}
  local rows not_run
  rows=$(grep -c '^| [0-9a-z]' "$WORK/$name.md" 2>/dev/null); rows=$(( ${rows:-1} - 1 )); [ "$rows" -lt 0 ] && rows=0
  not_run=$(grep -o '| not run: [^|]*' "$WORK/$name.md" | head -n 1 | sed 's/^| //; s/ *$//')
  if [ "$rc" -eq 0 ] && [ -n "$not_run" ]; then record "$name" "not run" $(( $(now) - T0 )) "$not_run"
  elif [ "$rc" -eq 0 ]; then record "$name" ok $(( $(now) - T0 )) "$rows cases$(bench_detail "$OUTDIR/$json")"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then  # a time cut, not a failure: the rows so far are kept
    record "$name" cut $(( $(now) - T0 )) "killed at its ${limit} s limit after $rows cases (rows in log.txt and $json)"
  else record "$name" FAILED $(( $(now) - T0 )) "exit $rc after $rows cases (rows so far in log.txt and $json)"; fi
}
bench_detail() {  # "; peak memory .., host peak .., host plan .." of a one-case JSON (the 7B step), else nothing
  "$PY" - "$1" 2>/dev/null <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
r = rows[0] if len(rows) == 1 else {}
if "peak_memory_gb" in r:
    text = f"; peak memory {r['peak_memory_gb']:.1f} GiB, host peak {r['host_peak_memory_gb']:.1f} GiB"
    if "host_plan_gib" in r:
        text += f", host plan {r['host_plan_gib']:.1f} GiB of {r['host_total_gib']:.1f}"
    print(text + f", step {r['step_seconds']:.1f} s", end="")
EOF
}
if [ "$SMOKE" = 1 ]; then
  # Triton under the interpreter beside torch: the same pairs as on the GPU, on the tiny model.
  SPEED_ARGS=(--models tiny --placements pre mix --kernels triton torch --executions eager compile
              --losses fused unfused --steps 1 --warmup 1 train.micro_batch_size=2 data.seq_len=32)
  SEVEN_B_ARGS=(parallel.zero_stage=3 --models tiny)   # the same path (ZeRO-3 + CPU offload) on the tiny model
else
  # One process, the targets' pairs first (plan_cases in megatron_mixln/benchmarks/train_throughput.py): Pre-LN,
  # then on one Mix-LN build triton (the Mix-LN / Pre-LN ratio and MFU), torch (triton vs torch eager), the unfused
  # LM head (the fused loss's memory), compiled triton and torch (compile + triton vs compile alone); then the rest.
  SPEED_ARGS=(--models 1b --placements pre mix --kernels triton torch --executions eager compile
              --losses fused unfused --steps 5 --warmup 2)
  SEVEN_B_ARGS=(--models 7b --kernels triton)
fi
if [ "$HAVE_CUDA" != 1 ] && [ "$SMOKE" != 1 ]; then
  record train_bench FAILED 0 "no CUDA device"
  record seven_b_step FAILED 0 "no CUDA device"
elif [ "$SEVEN_B_S" -le 0 ]; then
  budget=$(( $(left) - RESERVE_S )); [ "$budget" -gt "$BENCH_S" ] && budget=$BENCH_S
  bench train_bench "$budget" train_bench.json "${SPEED_ARGS[@]}"
  record seven_b_step skipped 0 "GPU_CHECK_7B_S=$SEVEN_B_S"
else
  budget=$(( $(left) - RESERVE_S - SEVEN_B_S )); [ "$budget" -gt "$BENCH_S" ] && budget=$BENCH_S
  bench train_bench "$budget" train_bench.json "${SPEED_ARGS[@]}"
  # ---- 5. 7B Mix-LN: one optimiser step on this GPU, ZeRO-3 + the optimiser offloaded to the CPU -------------------
  # The bench weighs the host-memory plan (train/memory.py, offload_host_plan: DeepSpeed 0.19.8 holds ~21.6 B/param
  # for Adam, 135 GiB for 6.7B parameters) against the host's available memory before building anything, and
  # lists the case as not run, with both figures, when it does not fit. It gets whatever time is left.
  bench seven_b_step $(( $(left) - RESERVE_S )) seven_b_step.json "${SEVEN_B_ARGS[@]}" --placements mix \
    --executions eager --losses fused --steps 1 --warmup 0 parallel.offload_optimizer=true
fi

# ---- summary -------------------------------------------------------------------------------------------------
FAILED=0
for p in "${PARTS[@]}"; do [ "${STATUS[$p]}" = FAILED ] && FAILED=1; done
PARTS_TSV="$WORK/parts.tsv"
: > "$PARTS_TSV"
for p in "${PARTS[@]}"; do printf '%s\t%s\t%s\t%s\n' "$p" "${STATUS[$p]}" "${SECS[$p]}" "${DETAIL[$p]}" >> "$PARTS_TSV"; done
"$PY" - "$WORK" "$OUTDIR" "$SMOKE" "$FAILED" "$(( $(now) - START ))" <<'EOF'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
smoke, failed, seconds = sys.argv[3] == "1", sys.argv[4] == "1", int(sys.argv[5])
def text(name):
    path = work / name
    return path.read_text().strip() if path.is_file() else ""
env = json.loads(text("env.json") or "{}")
parts = [dict(zip(("part", "status", "seconds", "detail"), line.split("\t", 3)))
         for line in text("parts.tsv").splitlines() if line]
train = json.loads(text("train_compare.json")) if text("train_compare.json") else None
md = [f"# gpu_check {'smoke test' if smoke else 'results'}: {'FAILED' if failed else 'PASSED'}", "",
      f"- device: {text('nvidia_smi.txt') or env.get('device')}", f"- date: {text('date.txt')}",
      "- versions: " + ", ".join(f"{k} {env.get(k)}" for k in ("python", "torch", "torch_cuda", "triton", "deepspeed",
                                                              "pydantic", "datasets", "transformers", "tokenizers")),
      f"- total: {seconds} s", "", "| part | status | seconds | detail |", "|---|---|---|---|"]
md += [f"| {p['part']} | {p['status']} | {p['seconds']} | {p.get('detail', '').replace('|', '/')} |" for p in parts]
md += ["", "## Training: model.kernels=triton vs torch", "", text("train_compare.md") or "(no comparison)"]
def bench_table(name):
    keep = ("device:", "|")
    return "\n".join(line for line in text(name).splitlines() if line.startswith(keep)) or "(not run)"
def bench_targets(name):
    """The targets and the memory saved, from the JSON's rows (there even when the bench was cut short)."""
    path = out / name
    if not path.is_file():
        return "(no rows)"
    from megatron_mixln.benchmarks.train_throughput import memory_saved, targets
    saved = json.loads(path.read_text())
    rows = [row for row in saved["rows"] if not row.get("not_run")]
    lines = ["targets (ratios measured in this run):", *targets(rows)]
    lines += ["", "memory saved by the fused cross-entropy:", *memory_saved(rows)] if not smoke else []
    lines += ["", "notes:", *(f"- {note}" for note in saved.get("notes", []))] if saved.get("notes") else []
    return "\n".join(lines)
md += ["", "## Training benchmark (mixln-bench train; JSON in train_bench.json)", "", bench_table("train_bench.md"),
       "", bench_targets("train_bench.json")]
md += ["", "## 7B Mix-LN, one step, ZeRO-3 + CPU optimiser offload (JSON in seven_b_step.json)", "",
       bench_table("seven_b_step.md")]

bench = text("kernels_bench.md")
if "| target |" not in bench and (out / "kernels_bench.json").is_file():  # cut short: the targets from the JSON
    saved = json.loads((out / "kernels_bench.json").read_text())
    bench = "\n".join([bench, "", "| target | measured | met |", "|---|---|---|"]
                      + [f"| {t['target']} | {t['measured']} | {t['met']} |" for t in saved.get("targets", [])])
short = list(md)
if bench:
    md += ["", "## Kernel benchmark (kernels/gpu_check.sh; JSON in kernels_bench.json)", "", bench]
    # On stdout (the device tool returns only its last 12,000 characters): the targets and notes, not every row.
    lines = bench.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| target")), len(lines))
    short += ["", "## Kernel benchmark targets (every row in summary.md)", ""] + lines[:1] + [""] + lines[start:]
(out / "summary.md").write_text("\n".join(md) + "\n")
print("\n".join(short))
summary = {"ok": not failed, "mode": "smoke" if smoke else "full", "seconds": seconds,
           "nvidia_smi": text("nvidia_smi.txt"), "date": text("date.txt"), "env": env, "parts": parts, "train": train}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
EOF
echo
echo "gpu_check: $([ "$FAILED" = 0 ] && echo PASSED || echo FAILED) in $(( $(now) - START )) s;" \
  "results in $OUTDIR: $(find "$OUTDIR" -type f -printf '%P ')"
exec 1>&3 2>&4 3>&- 4>&-
wait "$TEE_PID" 2>/dev/null
exit "$FAILED"
