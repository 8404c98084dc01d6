"""Run metrics: `metrics.jsonl` (one JSON object per line), mirrored to DeepSpeed's monitor (TensorBoard,
Weights & Biases), the console line a log file gets, and the loss-curve PNG."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from megatron_mixln.storage import STORAGE_ERRNOS

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

    def __init__(self, out_dir: str | Path, enabled: bool = True, monitor=None, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(out_dir) / METRICS_FILE
        self.monitor = monitor if monitor is not None and monitor.enabled else None
        # (step, OSError) of a record that a full, read-only or forbidden file system refused: the loop then saves
        # a checkpoint and stops, and nothing more is written.
        self.failure: tuple[int, OSError] | None = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _hide_tensorboard_steps_after(self.monitor, start_step)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled or self.failure is not None:
            return
        try:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(_jsonable(record)) + "\n")
        except OSError as err:
            if err.errno not in STORAGE_ERRNOS:
                raise
            self.failure = (record.get("step", 0), err)
            return
        if self.monitor is not None:
            self.monitor.write_events(monitor_events(record))

    def restart_at(self, step: int) -> None:
        """The run goes on from `step` again (a guard rollback): TensorBoard hides the later events, as a resume."""
        if self.enabled:
            _hide_tensorboard_steps_after(self.monitor, step)

    def close(self) -> None:
        pass


def _hide_tensorboard_steps_after(monitor, step: int) -> None:
    """A run that starts at `step` makes TensorBoard hide the earlier runs' events of later steps (work lost with a
    killed process), as metrics.jsonl sets them aside: the restart marker torch's SummaryWriter(purge_step=step + 1)
    writes, which DeepSpeed's monitor does not pass."""
    writer = getattr(getattr(monitor, "tb_monitor", None), "summary_writer", None)
    if writer is None:
        return
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    writer.file_writer.add_event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))


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
    if record.get("outlier"):
        parts.append("SKIPPED (outlier)")
    elif record.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    if eta_seconds is not None:
        parts.append(f"eta {_duration(eta_seconds)}")
    return " | ".join(parts)


def _parse_metrics(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """(records, torn last line or None). A crash or a full disk can stop an append mid-line, and only the last
    line can be cut that way: it is set aside, never fatal. A bad line before it is real damage (the file was
    edited, or two writers interleaved): one CheckpointError sentence naming the line."""
    from megatron_mixln.saved_files import CheckpointError

    # surrogateescape: a line cut inside a multi-byte character (or a tail of NUL bytes a crash can leave on
    # some file systems) must not make the whole file unreadable.
    lines = [(number, line) for number, line in enumerate(
        path.read_text(encoding="utf-8", errors="surrogateescape").split("\n"), start=1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            if index == len(lines) - 1:
                return records, line
            raise CheckpointError(f"{path} line {number} is not a metrics record ({getattr(err, 'msg', err)}), "
                                  "and only a torn last line (left by a crash or a full disk) is set aside, so the "
                                  "file is damaged: restore it or move it aside (the checkpoints do not depend "
                                  "on it).") from err
        records.append(record)
    return records, None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, without a torn last line; CheckpointError for a bad line before it."""
    path = Path(path)
    if not path.is_file():
        return []
    return _parse_metrics(path)[0]


def discard_metrics_after(out_dir: str | Path, step: int) -> int:
    """On resume, move records of steps after `step` (work lost with the process) and a torn last line (as
    {"torn_line": text}) to metrics.discarded.jsonl; returns how many lines moved. A last record without its
    newline is completed, since the next append would otherwise be glued to it."""
    from megatron_mixln.saved_files import CheckpointError

    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    records, torn = _parse_metrics(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    dropped = [r for r in records if r.get("step", 0) > step]
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        unterminated = handle.tell() > 0 and (handle.seek(-1, 2), handle.read(1))[1] != b"\n"
    if not (dropped or torn is not None or unterminated):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(Path(out_dir) / DISCARDED_FILE, "a") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in dropped)
            if torn is not None:
                handle.write(json.dumps({"torn_line": torn}) + "\n")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not set aside the metric records of lost steps in {path} ({err.strerror}); "
                              f"free space in {out_dir} and resume again.") from err
    return len(dropped) + (torn is not None)


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
