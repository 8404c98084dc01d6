"""Run metrics: `metrics.jsonl` (one JSON object per line), mirrored to DeepSpeed's monitor (TensorBoard,
Weights & Biases), the console line a log file gets, and the loss-curve PNG."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
DISCARDED_FILE = "metrics.discarded.jsonl"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the information as text
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def monitor_events(record: dict[str, Any]) -> list[tuple[str, float, int]]:
    """DeepSpeed monitor events (name, value, step) of a record: its numbers, dict entries as `name/key`."""
    step = record.get("step", 0)
    events = []
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            events.append((key, float(value), step))
        elif isinstance(value, dict):
            events += [(f"{key}/{sub}", float(v), step) for sub, v in value.items() if isinstance(v, (int, float))]
    return events


class MetricsWriter:
    """Appends metric records to `<out_dir>/metrics.jsonl` (rank 0 only) and hands their scalars to DeepSpeed's
    monitor (`engine.monitor`: TensorBoard and W&B as the DeepSpeed config enables them; it writes on rank 0)."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, monitor=None):
        self.enabled = enabled
        self.path = Path(out_dir) / METRICS_FILE
        self.monitor = monitor if monitor is not None and monitor.enabled else None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(_jsonable(record)) + "\n")
        if self.monitor is not None:
            self.monitor.write_events(monitor_events(record))

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def console_line(record: dict[str, Any], total_steps: int, eta_seconds: float | None) -> str:
    """The plain line a log file gets per train.log_every steps, e.g.
    `step 120/20000 | loss 3.4521 | lr 9.50e-04 | grad 0.812 | 52,310 tok/s | mem 1.21 GB (peak 1.53 GB) | eta 3h12m`."""
    parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
    if record.get("grad_norm") is not None:
        parts.append(f"grad {record['grad_norm']:.3g}")
    parts.append(f"{record['tokens_per_second']:,.0f} tok/s")
    if "memory_mb" in record:
        parts.append(f"mem {record['memory_mb'] / 1024:.2f} GB (peak {record['peak_memory_mb'] / 1024:.2f} GB)")
    if record.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    if eta_seconds is not None:
        parts.append(f"eta {_duration(eta_seconds)}")
    return " | ".join(parts)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def discard_metrics_after(out_dir: str | Path, step: int) -> int:
    """On resume, move records of steps after `step` (work lost with the process) to metrics.discarded.jsonl."""
    path = Path(out_dir) / METRICS_FILE
    records = read_metrics(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    dropped = [r for r in records if r.get("step", 0) > step]
    if dropped:
        with open(Path(out_dir) / DISCARDED_FILE, "a") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in dropped)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)
    return len(dropped)


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    """Training loss (and eval loss when present) against step; returns the PNG path or None without data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["eval_loss"]) for r in records if isinstance(r.get("eval_loss"), (int, float))]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(*zip(*train), lw=1.0, label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", ms=4, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
