"""mixln-compare: one table of several runs (e.g. the placements of slurm/compare.sbatch), sorted by perplexity.

    mixln-compare runs/llama_130m_post runs/llama_130m_deepnorm runs/llama_130m_pre runs/llama_130m_mix
    mixln-compare runs/tiny_* --json runs/compare.json

Each run folder is read as mixln-train leaves it: `config.json` (the full config) and `metrics.jsonl` (training
records with `loss`, `skipped` on a skipped update, eval records with `eval_loss` / `eval_ppl`). A folder that is
missing, still running or stopped early gets a row that says so; nothing here needs the run to have finished.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from megatron_mixln.output_folder import OutputFolderError, check_output_file

FINISHED, NO_METRICS = "finished", "no metrics"


def _number(value: Any) -> float | None:
    """A metrics value as a float: mixln-train writes non-finite floats as the strings 'nan' / 'inf'."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _records(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a killed process
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _placement(model: dict) -> str:
    """`mix (2 Post-LN of 8)` for Mix-LN, the placement's name otherwise, `?` without a config."""
    name = model.get("norm_placement")
    if name is None:
        return "?"
    if name != "mix":
        return str(name)
    try:
        from megatron_mixln.config import ModelConfig
        from megatron_mixln.model.norms import num_post_ln_layers  # imports torch: only when a mix run is listed

        model_config = ModelConfig(**model)
        return f"mix ({num_post_ln_layers(model_config)} Post-LN of {model_config.num_layers})"
    except (TypeError, ValueError):  # a config.json from another version still gets its row
        return "mix"


def read_run(folder: str | Path) -> dict[str, Any]:
    """What one run folder says: placement, steps done / planned, final losses, perplexity, status."""
    folder = Path(folder)
    config: dict = {}
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except json.JSONDecodeError:
            config = {}
    planned = (config.get("train") or {}).get("steps")
    row: dict[str, Any] = {"run": str(folder), "placement": _placement(config.get("model") or {}),
                           "steps_done": 0, "steps_planned": planned, "train_loss": None, "eval_loss": None,
                           "eval_ppl": None, "eval_step": None, "skipped_steps": 0, "status": NO_METRICS}
    metrics = folder / "metrics.jsonl"
    records = _records(metrics) if metrics.is_file() else []
    training = [r for r in records if "loss" in r and isinstance(r.get("step"), int)]
    evals = [r for r in records if "eval_loss" in r and isinstance(r.get("step"), int)]
    if not training:
        if not folder.is_dir():
            row["status"] = "no such folder"
        return row
    last = max(training, key=lambda r: r["step"])
    applied = [r for r in training if not r.get("skipped") and _finite(_number(r["loss"]))]
    row["steps_done"] = last["step"]
    row["skipped_steps"] = sum(1 for r in training if r.get("skipped"))
    if applied:
        row["train_loss"] = _number(max(applied, key=lambda r: r["step"])["loss"])
    if evals:
        final_eval = max(evals, key=lambda r: r["step"])
        row["eval_step"] = final_eval["step"]
        row["eval_loss"] = _number(final_eval["eval_loss"])
        row["eval_ppl"] = _number(final_eval.get("eval_ppl"))
        if row["eval_ppl"] is None and _finite(row["eval_loss"]):
            row["eval_ppl"] = math.exp(min(row["eval_loss"], 700))
    if last.get("skipped") or not _finite(_number(last["loss"])) or (evals and not _finite(row["eval_loss"])):
        row["status"] = f"diverged (non-finite) at step {last['step']}"
    elif planned is not None and last["step"] >= planned:
        row["status"] = FINISHED
    else:
        row["status"] = f"stopped at step {last['step']}"
    return row


def _sort_key(row: dict) -> tuple:
    """Finite perplexities first, lowest first; then every other row in the order given."""
    ppl = row["eval_ppl"]
    return (0, ppl) if _finite(ppl) else (1, 0.0)


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| run | placement | steps done / planned | final train loss | final eval loss | eval perplexity | "
             "status |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        planned = "?" if row["steps_planned"] is None else row["steps_planned"]
        eval_loss = _cell(row["eval_loss"])
        if row["eval_step"] is not None and row["eval_step"] != row["steps_planned"]:
            eval_loss += f" (step {row['eval_step']})"
        lines.append(f"| {row['run']} | {row['placement']} | {row['steps_done']} / {planned} | "
                     f"{_cell(row['train_loss'])} | {eval_loss} | {_cell(row['eval_ppl'], 2)} | {row['status']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mixln-compare", description=(
        "One markdown table of training runs (final train loss, eval loss and perplexity, status), sorted by "
        "eval perplexity; e.g. the placements that slurm/compare.sbatch trained."))
    parser.add_argument("runs", nargs="+", help="run folders (train.out_dir of each run)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH (a file outside the runs)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.json:
        try:
            check_output_file(args.json, args.runs)  # a run's own files (metrics.jsonl, config.json) are never written
        except OutputFolderError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    rows = sorted((read_run(folder) for folder in args.runs), key=_sort_key)
    print(markdown_table(rows))
    if args.json:  # JSON has no NaN / inf: written as strings, as in metrics.jsonl
        safe = [{k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
                for row in rows]
        Path(args.json).write_text(json.dumps(safe, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
