"""The paper's three measurements (docs/method.md#analyses): angular distance between the hidden states entering
layers, the loss with one layer replaced by the identity, and the per-layer gradient norms a run logged.

The model is only ever observed through hooks on its stages (`MixLNForCausalLM.stages()`: embedding, decoder
layers, LM head), each of which runs through `nn.Module.__call__`; nothing here re-implements its forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from megatron_mixln.data.errors import DataError
from megatron_mixln.model import IGNORE_INDEX, hidden_state
from megatron_mixln.model.layers import stream_from_args
from megatron_mixln.train.step import loss_sum

LAYER_PREFIX = "layer_"
DEFAULT_PROFILE_STEPS = 5  # gradient-norm profiles drawn when no steps are asked for: start, quarters, end


def _stages(model: torch.nn.Module) -> tuple[list[torch.nn.Module], torch.nn.Module]:
    """(decoder layers, LM head stage) of a MixLNForCausalLM."""
    stages = model.stages()
    return list(stages[1:-1]), stages[-1]


def _device_of(model: torch.nn.Module, device) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def token_mask(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, mask of the positions holding a real token) of a batch: an (input_ids, labels) pair, or bare
    input_ids (every position real).

    With labels, a position is real when it has a target or follows one: a document's last token has no target
    (labels are shifted) but is text, while padding neither has a target nor follows one. In packed mode every
    position has a target.
    """
    if isinstance(batch, torch.Tensor):
        return batch, torch.ones_like(batch, dtype=torch.bool)
    input_ids, labels = batch
    has_target = labels != IGNORE_INDEX
    real = has_target.clone()
    real[:, 1:] |= has_target[:, :-1]
    return input_ids, real


def angular_distances(model: torch.nn.Module, batches: Iterable, device=None,
                      on_batch: Callable[[], None] | None = None) -> np.ndarray:
    """The angular distance map D of shape [L, L]: D[l, n - 1] = d(l, n), the mean over the real tokens of
    `batches` of arccos(cos(x_l, x_{l+n})) / pi, where x_l is the hidden state entering decoder layer l and x_L
    the one entering the final norm. Entries with l + n > L are NaN. D[:, 0] is the n = 1 profile.

    `batches`: (input_ids, labels) pairs (padding is left out, see `token_mask`) or bare input_ids.
    Only the current batch's L + 1 states are held, as unit vectors of its real tokens; the sums over pairs
    grow batch by batch. Cosines in float64: arccos(1 - e) ~ sqrt(2e), so float32 rounding of a cosine near 1
    would shift a small distance by ~1e-3.
    """
    return _angular(model, batches, device, on_batch)[0]


@torch.no_grad()
def _angular(model, batches, device, on_batch) -> tuple[np.ndarray, int]:
    """(distance map, real tokens it averages over)."""
    layers, head = _stages(model)
    num_layers = len(layers)
    device = _device_of(model, device)
    sums = torch.zeros(num_layers, num_layers, dtype=torch.float64, device=device)
    current: dict = {}  # per batch: "mask", and "states": unit vectors [L + 1, real tokens, hidden]

    def capture(index: int):
        def hook(module, args):
            state = hidden_state(stream_from_args(args))[current["mask"]].double()
            state = torch.nn.functional.normalize(state, dim=-1)
            if current.get("states") is None:
                current["states"] = state.new_empty((num_layers + 1, *state.shape))
            states = current["states"]
            states[index] = state
            if index > 0:  # against every earlier state: d(l, index - l) for l < index
                cosines = torch.einsum("lth,th->lt", states[:index], state).clamp(-1.0, 1.0)
                distances = torch.arccos(cosines).sum(dim=1) / math.pi
                spans = index - torch.arange(index, device=device)
                sums[torch.arange(index, device=device), spans - 1] += distances
        return hook

    handles = [stage.register_forward_pre_hook(capture(index)) for index, stage in enumerate([*layers, head])]
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for batch in batches:
            input_ids, mask = token_mask(batch)
            current.clear()
            current["mask"] = mask.to(device)
            count = int(mask.sum())
            if count:
                model(input_ids.to(device))
                tokens += count
            if on_batch is not None:
                on_batch()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        current.clear()
    if tokens == 0:
        raise DataError("the held-out batches hold no real token (every position is padding): nothing to average over.")
    distances = (sums / tokens).cpu().numpy()
    spans = np.arange(1, num_layers + 1)
    distances[np.arange(num_layers)[:, None] + spans[None, :] > num_layers] = np.nan
    return distances, tokens


@dataclass
class LossResult:
    loss: float  # token-weighted mean cross-entropy (nats per target token)
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))


def held_out_loss(model: torch.nn.Module, batches: list, device=None,
                  on_batch: Callable[[], None] | None = None) -> LossResult:
    """Token-weighted mean cross-entropy of `model` over (input_ids, labels) `batches`, as a run's evaluation."""
    device = _device_of(model, device)
    tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in batches)
    if tokens == 0:
        raise DataError("the held-out batches hold no position with a target: there is no loss to measure.")

    def counted():
        for batch in batches:
            yield batch
            if on_batch is not None:
                on_batch()

    return LossResult(float(loss_sum(model, counted(), device)) / tokens, tokens)


def layer_removal(model: torch.nn.Module, batches: list, device=None, layers: Iterable[int] | None = None,
                  on_batch: Callable[[], None] | None = None,
                  on_layer: Callable[[dict], None] | None = None) -> list[dict]:
    """Held-out loss with each decoder layer in turn replaced by the identity (a forward hook returning the
    layer's input stream), against the full model's.

    One dict per removed layer (all of them unless `layers` names some): `layer`, `placement`, `loss`,
    `perplexity`, `loss_increase` and `perplexity_increase` (the drop in performance: removed minus full),
    `full_loss`, `full_perplexity` and `tokens`. `batches` is a list of (input_ids, labels), read once per layer
    and once for the full model. `on_layer(entry)` is called as each entry is done.
    """
    decoder_layers, _ = _stages(model)
    full = held_out_loss(model, batches, device, on_batch)
    entries = []
    for index in (range(len(decoder_layers)) if layers is None else layers):
        layer = decoder_layers[index]
        # The layer hands on what it was given: one tensor, or the (residual, pending) pair.
        handle = layer.register_forward_hook(lambda module, args, output: stream_from_args(args))
        try:
            removed = held_out_loss(model, batches, device, on_batch)
        finally:
            handle.remove()
        entry = {"layer": index, "placement": getattr(layer, "placement", None), "loss": removed.loss,
                 "perplexity": removed.perplexity, "loss_increase": removed.loss - full.loss,
                 "perplexity_increase": removed.perplexity - full.perplexity, "full_loss": full.loss,
                 "full_perplexity": full.perplexity, "tokens": full.tokens}
        entries.append(entry)
        if on_layer is not None:
            on_layer(entry)
    return entries


# ------------------------------------------------------------------------------------------------ metrics.jsonl
def _number(value) -> float:
    """A metrics value as a float: metrics.jsonl writes non-finite floats as the strings 'nan' / 'inf'."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class GradientNorms:
    """Per-layer gradient norms a run logged (train.layer_grad_norm_every).

    `steps`: every step with a `layer_grad_norms` record, ascending; `layers`: the decoder-layer keys in depth
    order (layer_000, ...); `norms[i, j]`: layer i at steps[j]; `other`: embed_tokens, norm and lm_head per step;
    `chosen`: the steps whose depth profile is drawn.
    """

    steps: list[int]
    layers: list[str]
    norms: np.ndarray
    other: dict[str, np.ndarray] = field(default_factory=dict)
    chosen: list[int] = field(default_factory=list)

    def at(self, step: int) -> np.ndarray:
        """The per-layer norms at `step` (a step in `steps`)."""
        return self.norms[:, self.steps.index(step)]


def spread_steps(steps: list[int], count: int = DEFAULT_PROFILE_STEPS) -> list[int]:
    """Up to `count` of `steps` spread evenly over them, first and last included."""
    if not steps:
        return []
    picks = np.unique(np.round(np.linspace(0, len(steps) - 1, min(count, len(steps)))).astype(int))
    return [steps[i] for i in picks]


def gradient_norms_by_depth(metrics_path: str | Path, steps: Iterable[int] | None = None) -> GradientNorms:
    """The `layer_grad_norms` records of a metrics.jsonl as a layer x step table, with the profile steps `steps`
    (default: a few spread over training). A step asked for that has no record is one DataError sentence; a run
    that logged none gives an empty table."""
    from megatron_mixln.train.metrics import read_metrics

    by_step: dict[int, dict] = {}
    for record in read_metrics(metrics_path):
        if isinstance(record.get("layer_grad_norms"), dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = record["layer_grad_norms"]  # a step logged twice: the later record
    logged = sorted(by_step)
    keys = sorted({key for norms in by_step.values() for key in norms})
    layers = sorted((key for key in keys if key.startswith(LAYER_PREFIX)), key=lambda key: int(key[len(LAYER_PREFIX):]))
    others = [key for key in keys if not key.startswith(LAYER_PREFIX)]
    norms = np.array([[_number(by_step[step].get(key)) for step in logged] for key in layers]).reshape(len(layers),
                                                                                                      len(logged))
    other = {key: np.array([_number(by_step[step].get(key)) for step in logged]) for key in others}
    if steps is None:
        chosen = spread_steps(logged)
    else:
        chosen = list(steps)
        missing = [step for step in chosen if step not in by_step]
        if missing:
            available = (f"it has them for {len(logged)} steps, {logged[0]} to {logged[-1]}" if logged
                         else "it has none (train.layer_grad_norm_every=0)")
            raise DataError(f"{metrics_path} has no per-layer gradient norms at step {missing[0]}: {available}; "
                            "choose --steps among those.")
    return GradientNorms(steps=logged, layers=layers, norms=norms, other=other, chosen=chosen)


def loss_curves(metrics_path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{"train": [(step, loss)], "eval": [(step, eval_loss)]} of a metrics.jsonl; non-finite losses as NaN."""
    from megatron_mixln.train.metrics import read_metrics

    records = read_metrics(metrics_path)
    curves: dict[str, list[tuple[int, float]]] = {"train": [], "eval": []}
    for record in records:
        if not isinstance(record.get("step"), int):
            continue
        if "loss" in record:
            curves["train"].append((record["step"], _number(record["loss"])))
        if "eval_loss" in record:
            curves["eval"].append((record["step"], _number(record["eval_loss"])))
    return curves


def downstream_curves(metrics_path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{"task/metric": [(step, value)]} of the downstream records of a metrics.jsonl (train.downstream_tasks),
    by step; a step scored twice (a replay after a guard rollback) keeps its later record."""
    from megatron_mixln.train.metrics import read_metrics

    by_step: dict[int, dict] = {}
    for record in read_metrics(metrics_path):
        if isinstance(record.get("downstream"), dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = record["downstream"]
    curves: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(by_step):
        for name, value in by_step[step].items():
            curves.setdefault(name, []).append((step, _number(value)))
    return curves


# Telemetry fields of a metrics.jsonl record (train/telemetry.py), per layer key.
TELEMETRY_FIELDS = ("activation_rms", "activation_max", "max_attention_logit", "update_ratio")
# Guard events (the loss-spike guard, docs/stability.md) drawn on the loss curves.
GUARD_EVENTS = ("outlier", "rollback", "collapse")


@dataclass
class Telemetry:
    """The stability telemetry a run logged (train.telemetry_every).

    `steps`: every step with a telemetry record, ascending; `layers`: the decoder-layer keys in depth order;
    `by_layer[field][i, j]`: layer i at steps[j] (NaN where that record lacks it); `other[field][key]`: the same for
    embed_tokens, norm and lm_head per step; `log_partition`: {"mean": [...], "max": [...]} per step.
    """

    steps: list[int]
    layers: list[str]
    by_layer: dict[str, np.ndarray] = field(default_factory=dict)
    other: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    log_partition: dict[str, np.ndarray] = field(default_factory=dict)


def telemetry_by_depth(metrics_path: str | Path) -> Telemetry:
    """The telemetry records of a metrics.jsonl as layer x step tables (empty when the run logged none)."""
    from megatron_mixln.train.metrics import read_metrics

    by_step: dict[int, dict] = {}
    for record in read_metrics(metrics_path):
        if record.get("telemetry") is True and isinstance(record.get("step"), int):
            by_step[record["step"]] = record  # a step logged twice (a replay after a rollback): the later record
    steps = sorted(by_step)
    keys = {key for record in by_step.values() for name in TELEMETRY_FIELDS
            for key in (record.get(name) if isinstance(record.get(name), dict) else {})}
    layers = sorted((key for key in keys if key.startswith(LAYER_PREFIX)), key=lambda key: int(key[len(LAYER_PREFIX):]))
    others = sorted(keys - set(layers))

    def table(name: str, names: list[str]) -> np.ndarray:
        return np.array([[_number((by_step[step].get(name) or {}).get(key)) for step in steps] for key in names]
                        ).reshape(len(names), len(steps))

    return Telemetry(steps=steps, layers=layers, by_layer={name: table(name, layers) for name in TELEMETRY_FIELDS},
                     other={name: dict(zip(others, table(name, others))) for name in TELEMETRY_FIELDS},
                     log_partition={kind: np.array([_number(by_step[step].get(f"log_partition_{kind}"))
                                                    for step in steps]) for kind in ("mean", "max")})


def guard_events(metrics_path: str | Path) -> list[dict]:
    """The loss-spike guard's event records of a metrics.jsonl (outlier, rollback, collapse), in file order."""
    from megatron_mixln.train.metrics import read_metrics

    return [record for record in read_metrics(metrics_path)
            if record.get("event") in GUARD_EVENTS and isinstance(record.get("step"), int)]
