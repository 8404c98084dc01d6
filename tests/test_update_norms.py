"""Per-layer update norms (train.layer_grad_norm_every): the figures the full fp32 device copy of the weights gave,
from a host copy in the weights' own dtype and one tensor's change at a time on the device."""
import math
import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_mixln.config import load_config
from megatron_mixln.train import step as step_module
from megatron_mixln.train.loop import train
from megatron_mixln.train.memory import dry_run_summary
from megatron_mixln.train.metrics import read_metrics
from training_runs import tiny

LAYOUTS = {"fp32-zero0": ["parallel.zero_stage=0"],
           "bf16-zero3": ["train.precision=bf16", "parallel.zero_stage=3"]}


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensors made inside the block that are alive at the same time (a result that shares an
    input's storage, as an in-place op's, is not new)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.tracked = 0, 0, set()

    def _freed(self, pointer: int, size: int) -> None:
        self.tracked.discard(pointer)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            pointer, size = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
            if pointer in inputs or pointer in self.tracked or size == 0:
                continue
            self.tracked.add(pointer)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._freed, pointer, size)
        return out


def full_copy_local_weights(self):
    """The implementation before the host copy: an fp32 copy of every weight share on the device."""
    return [getattr(p, "ds_tensor", p).detach().to(self.device, dtype=torch.float32, copy=True)
            for p in self.module.parameters()]


def full_copy_update_norms(self, before):
    """The implementation before the host copy: every weight's change at once, counted like the gradients."""
    change = {id(p): getattr(p, "ds_tensor", p).detach().float() - old
              for p, old in zip(self.module.parameters(), before)}
    zero3 = any(hasattr(p, "ds_tensor") for p in self.module.parameters())
    squares = self._squared_norms(self._counted_gradients(lambda p: change[id(p)]))
    if zero3:
        self.all_reduce(squares, group=self.layout.dp_group)
    return {key: math.sqrt(value) for key, value in zip(self.layer_keys, squares.double().cpu().tolist())}


def metered_run(monkeypatch, config, reference: bool) -> dict:
    """Train `config` with the current update norms (or the full-copy reference); returns the step records, the
    host copies' (device, dtype, bytes, shares a weight's storage), the largest counted weight share (elements,
    bytes per element) and the peak bytes made and alive at once while the norms were computed."""
    seen = {"copies": [], "peaks": [], "largest": (0, 0)}
    copy = full_copy_local_weights if reference else step_module.StepEngine._local_weights
    read = full_copy_update_norms if reference else step_module.StepEngine._read_update_norms

    def local_weights(self):
        before = copy(self)
        weights = [weight for _, weight in self._counted_local_weights()]
        storages = {weight.untyped_storage().data_ptr() for weight in weights}
        seen["copies"] = [(t.device.type, t.dtype, t.nbytes, t.untyped_storage().data_ptr() in storages)
                          for t in before]
        seen["largest"] = max((w.numel(), w.element_size()) for w in weights)
        return before

    def update_norms(self, before):
        with LiveTensorBytes() as meter:
            norms = read(self, before)
        seen["peaks"].append(meter.peak)
        return norms

    monkeypatch.setattr(step_module.StepEngine, "_local_weights", local_weights)
    monkeypatch.setattr(step_module.StepEngine, "_read_update_norms", update_norms)
    train(config)
    monkeypatch.undo()
    seen["records"] = [r for r in read_metrics(config.train.out_dir + "/metrics.jsonl") if "loss" in r]
    return seen


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module", params=list(LAYOUTS))
def runs(request, cache, tmp_path_factory):
    """The same 3 steps with the full-copy reference and with the current code, per layout, and their config."""
    out = tmp_path_factory.mktemp("runs")
    results = {"layout": request.param}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in ("reference", "current"):
            config = load_config(None, tiny(cache, out / name, "train.steps=3", "train.eval_sequences=0",
                                            *LAYOUTS[request.param]))
            results[name] = metered_run(monkeypatch, config, reference=name == "reference")
    results["config"] = config
    return results


def test_update_and_gradient_norms_are_the_full_copy_figures(runs):
    reference, current = runs["reference"]["records"], runs["current"]["records"]
    assert [r["step"] for r in current] == [r["step"] for r in reference] == [1, 2, 3]
    for ref, now in zip(reference, current):
        assert now["layer_update_norms"].keys() == ref["layer_update_norms"].keys()
        assert min(now["layer_update_norms"].values()) > 0  # every layer moved: a change was measured
        assert now["layer_update_norms"] == ref["layer_update_norms"]  # the same fp32 changes and sums: exact
        assert now["layer_grad_norms"] == ref["layer_grad_norms"]  # computed, and trained, the same way
        assert (now["loss"], now["grad_norm"]) == (ref["loss"], ref["grad_norm"])


def test_update_norms_keep_a_host_copy_in_the_weights_dtype_as_the_dry_run_plans(runs):
    copies = runs["current"]["copies"]
    dtype = torch.bfloat16 if runs["layout"].startswith("bf16") else torch.float32
    assert copies and all(device == "cpu" and kind == dtype and not shared for device, kind, _, shared in copies)
    # One process, tp = pp = 1: every parameter counts here, so the copy is the rank's weights, as planned.
    planned = dry_run_summary(runs["config"], world_size=1)["bytes"]["update_norm_host"]
    assert sum(size for _, _, size, _ in copies) == planned


def test_update_norms_hold_at_most_one_weight_change_at_a_time(runs):
    numel, _ = runs["current"]["largest"]
    peaks, reference_peaks = runs["current"]["peaks"], runs["reference"]["peaks"]
    assert len(peaks) == len(reference_peaks) == 3
    # One fp32 change of the largest weight share, plus the per-layer sums and scalars (under a KiB here).
    assert max(peaks) <= 4 * numel + 1024, (peaks, numel)
    # The meter sees the reference's change of every weight at once, which is more than that.
    total = sum(size for _, _, size, _ in runs["reference"]["copies"])  # fp32 copies: 4 B per element
    assert min(reference_peaks) >= total > 4 * numel + 1024
