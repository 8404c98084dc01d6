"""The training hot path: step values reach the host once per logged step (loop.read_to_host), and each step's
micro-batches are built ahead on a thread (BatchPrefetcher) exactly as the loop built them inline, a thread that
re-raises the data's errors at their step and never outlives the loop."""
import contextlib
import math
import threading

import pytest
import torch

from megatron_mixln.config import load_config
from megatron_mixln.data import DataError, GlobalBatchSampler, SequenceDataset, TokenFile, collate
from megatron_mixln.data import prefetch
from megatron_mixln.data.prefetch import BatchPrefetcher, StepBatch
from megatron_mixln.train import loop
from megatron_mixln.train import step as step_module
from megatron_mixln.train.metrics import read_metrics
from test_data import write_token_folder
from training_runs import tiny

GLOBAL_BATCH, SEED, LAST_STEP = 8, 5, 7
LAYOUT = {"dp_rank": 1, "dp": 2, "micro_batch_size": 2, "accumulation": 2}  # rank 1 of 2: 2 micro-batches of 2
# The fields of a step's metrics.jsonl record before the hot-path change (loop._step_record), layer norms included.
STEP_RECORD_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_second", "target_tokens", "padding_fraction",
                    "step_seconds", "memory_mb", "peak_memory_mb", "layer_grad_norms", "layer_update_norms"}


def prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "batch-prefetch" and thread.is_alive()]


@pytest.fixture
def dataset(tmp_path) -> SequenceDataset:
    """23 documents of 2..8 tokens in document mode: target counts differ per sequence, 7 steps span 3 epochs."""
    documents = [[10 + i] * (2 + i % 7) for i in range(23)]
    return SequenceDataset(TokenFile(write_token_folder(tmp_path / "p", documents), "train"), 6, "document", 0)


def batches_built_inline(dataset: SequenceDataset, step: int):
    """What the loop built for step `step` before the prefetcher (its code, on a fresh sampler)."""
    sampler = GlobalBatchSampler(len(dataset), GLOBAL_BATCH, SEED)
    mine = sampler.rank_indices(step - 1, LAYOUT["dp_rank"], LAYOUT["dp"])
    micro = LAYOUT["micro_batch_size"]
    micro_batches = [collate(dataset, mine[i * micro:(i + 1) * micro]) for i in range(LAYOUT["accumulation"])]
    return micro_batches, int(dataset.target_counts(sampler.global_indices(step - 1)).sum())


def training_prefetcher(dataset, start_step: int, **options) -> BatchPrefetcher:
    sampler = GlobalBatchSampler(len(dataset), GLOBAL_BATCH, SEED)
    return BatchPrefetcher.for_training(dataset, sampler, start_step + 1, LAST_STEP, **LAYOUT, **options)


# ---------------------------------------------------------------- the prefetcher


@pytest.mark.parametrize("start_step", [0, 4], ids=["from-scratch", "resumed-at-4"])
def test_prefetcher_yields_exactly_the_batches_built_inline(dataset, start_step):
    with training_prefetcher(dataset, start_step, pin=False) as batches:
        got = list(batches)
    assert [batch.step for batch in got] == list(range(start_step + 1, LAST_STEP + 1))
    for batch in got:
        micro_batches, targets = batches_built_inline(dataset, batch.step)
        assert batch.global_targets == targets
        assert len(batch.micro_batches) == len(micro_batches)
        for (inputs, labels), (want_inputs, want_labels) in zip(batch.micro_batches, micro_batches):
            assert torch.equal(inputs, want_inputs) and torch.equal(labels, want_labels)
    assert len({batch.global_targets for batch in got}) > 1  # the target counts really vary per step
    assert not prefetch_threads()


def test_prefetcher_never_builds_past_its_last_step():
    built = []
    with BatchPrefetcher(lambda step: built.append(step) or StepBatch(step, [], 0), range(3, 8), pin=False) as batches:
        assert [batch.step for batch in batches] == [3, 4, 5, 6, 7]
    assert built == [3, 4, 5, 6, 7]


def test_a_build_error_is_raised_at_its_step_with_its_type_and_message():
    def build(step: int) -> StepBatch:
        if step == 3:
            raise DataError("sequence 17 of the train split is damaged")
        return StepBatch(step, [], 0)

    seen = []
    with pytest.raises(DataError, match="^sequence 17 of the train split is damaged$"):
        with BatchPrefetcher(build, range(1, 10), pin=False) as batches:
            for batch in batches:
                seen.append(batch.step)
    assert seen == [1, 2] and not prefetch_threads()


@pytest.mark.parametrize("leave_by", ["break", "exception"])
def test_leaving_early_stops_and_joins_the_thread(leave_by):
    built = []
    with pytest.raises(RuntimeError) if leave_by == "exception" else contextlib.nullcontext():
        with BatchPrefetcher(lambda step: built.append(step) or StepBatch(step, [], 0), range(1, 10**6),
                             pin=False) as batches:
            for batch in batches:
                if leave_by == "exception":
                    raise RuntimeError("the step failed")
                break
    assert not prefetch_threads()
    assert len(built) <= 1 + 2 + 1  # the step taken, a full queue (depth 2), one put that was under way


def test_pinning_applies_the_pin_function_to_every_tensor(dataset):
    pinned = []

    def fake_pin(tensor: torch.Tensor) -> torch.Tensor:
        copy = tensor.clone()
        pinned.append(copy)
        return copy

    with training_prefetcher(dataset, 0, pin=True, pin_memory=fake_pin) as batches:
        got = list(batches)
    tensors = [tensor for batch in got for micro in batch.micro_batches for tensor in micro]
    assert len(tensors) == LAST_STEP * LAYOUT["accumulation"] * 2 == len(pinned)
    assert all(any(tensor is copy for copy in pinned) for tensor in tensors)
    assert BatchPrefetcher(lambda step: StepBatch(step, [], 0), range(1, 2)).pin == torch.cuda.is_available()


# ---------------------------------------------------------------- reading step values to the host


def test_read_to_host_gives_what_float_gives_for_mixed_dtypes():
    values = [torch.tensor(0.1), torch.tensor(0.1, dtype=torch.float64), torch.tensor([2.5]), torch.tensor(math.nan)]
    read = loop.read_to_host(values)
    assert read[:3] == [float(torch.tensor(0.1)), 0.1, 2.5] and math.isnan(read[3])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def reads(monkeypatch) -> list[tuple[int, int]]:
    """(step the loop was at, number of values) per call of loop.read_to_host during a run."""
    calls, at_step = [], [0]
    real_read, real_train_step = loop.read_to_host, step_module.StepEngine.train_step

    def train_step(self, step, *args, **kwargs):
        at_step[0] = step
        return real_train_step(self, step, *args, **kwargs)

    monkeypatch.setattr(step_module.StepEngine, "train_step", train_step)
    monkeypatch.setattr(loop, "read_to_host", lambda scalars: calls.append((at_step[0], len(scalars)))
                        or real_read(scalars))
    return calls


@pytest.mark.parametrize("precision,zero,norms_on_device", [("fp32", 0, False), ("bf16", 1, True)])
def test_a_run_reads_step_values_once_per_logged_step(precision, zero, norms_on_device, cache, tmp_path, reads):
    out = tmp_path / "run"
    result = loop.train(load_config(None, tiny(cache, out, f"train.steps={LAST_STEP}", "train.log_every=3",
                                               f"train.precision={precision}", f"parallel.zero_stage={zero}")))
    per_step = 2 if norms_on_device else 1  # the loss, and the gradient norm where DeepSpeed keeps it on the device
    assert reads == [(3, 3 * per_step), (6, 3 * per_step), (7, 1 * per_step)]
    assert sorted(result.losses) == sorted(result.grad_norms) == list(range(1, LAST_STEP + 1))
    values = [*result.losses.values(), *result.grad_norms.values()]
    assert all(isinstance(value, float) and math.isfinite(value) for value in values)
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [3, 6, 7]
    assert all(set(r) == STEP_RECORD_KEYS for r in records)
    assert all(r["loss"] == result.losses[r["step"]] and r["grad_norm"] == result.grad_norms[r["step"]]
               for r in records)
    assert not prefetch_threads()


def test_a_skipped_step_and_an_early_stop_read_at_once(cache, tmp_path, reads, monkeypatch):
    monkeypatch.setenv("MIXLN_TEST_FAULT", "loss@2")
    out = tmp_path / "run"
    result = loop.train(load_config(None, tiny(cache, out, f"train.steps={LAST_STEP}", "train.log_every=3",
                                               "train.on_nonfinite=skip", "train.stop_after_step=5")))
    assert reads == [(2, 2), (3, 1), (5, 2)]  # the skip at 2, the logged 3, and 4..5 when leaving at 5
    assert result.stopped_early and result.skipped_steps == [2] and sorted(result.losses) == [1, 3, 4, 5]
    skipped = next(r for r in read_metrics(out / "metrics.jsonl") if r.get("step") == 2 and "loss" in r)
    assert skipped["skipped"] is True and skipped["loss"] == "nan"  # the real value (JSON writes NaN as text)
    assert not prefetch_threads()


def test_a_data_error_in_a_run_is_raised_at_its_step_and_leaves_no_thread(cache, tmp_path, monkeypatch):
    real_build = prefetch.build_step_batch

    def build(dataset, sampler, step, **options):
        if step == 3:
            raise DataError("the train split ends early")
        return real_build(dataset, sampler, step, **options)

    monkeypatch.setattr(prefetch, "build_step_batch", build)
    steps_run = []
    real_train_step = step_module.StepEngine.train_step
    monkeypatch.setattr(step_module.StepEngine, "train_step",
                        lambda self, step, *a, **k: steps_run.append(step) or real_train_step(self, step, *a, **k))
    with pytest.raises(DataError, match="^the train split ends early$"):
        loop.train(load_config(None, tiny(cache, tmp_path / "run")))
    assert steps_run == [1, 2] and not prefetch_threads()


class HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts device -> host reads of a tensor's value (`.item()`, `float()`, `bool()` all dispatch
    aten._local_scalar_dense; on a GPU each one waits for the device). `.tolist()` / `.cpu()` are not counted."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("zero", [0, 1])
def test_host_syncs_per_step_do_not_grow_with_the_micro_batch_count(zero, cache, tmp_path, monkeypatch):
    """The GPU rule that CPU timing cannot show: a step with 4 micro-batches reads no more values to the host
    than a step with 1 (the loss of each micro-batch stays on the device)."""
    syncs: dict[int, list[int]] = {}
    real_train_step = step_module.StepEngine.train_step

    def counted_train_step(self, step, micro_batches, *args, **kwargs):
        with HostSyncs() as mode:
            outcome = real_train_step(self, step, micro_batches, *args, **kwargs)
        syncs.setdefault(len(micro_batches), []).append(mode.count)
        return outcome

    monkeypatch.setattr(step_module.StepEngine, "train_step", counted_train_step)
    for micro in (4, 1):  # global batch 4: 4 micro-batches of 1, or 1 of 4
        loop.train(load_config(None, tiny(cache, tmp_path / f"micro{micro}", "train.steps=3",
                                          "train.layer_grad_norm_every=0", f"train.micro_batch_size={micro}",
                                          f"parallel.zero_stage={zero}")))
    assert len(syncs[4]) == len(syncs[1]) == 3
    assert syncs[4] == syncs[1], syncs  # per step: DeepSpeed's own non-finite check, never one per micro-batch


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_the_fused_optimizer_makes_the_default_implementations_update(name):
    """On a GPU build_optimizer asks for PyTorch's fused Adam/AdamW (one kernel per group); here on CPU (where
    torch has it too) it must update as the default per-tensor implementation does, over changing gradients."""
    from megatron_mixln.train.optim import build_optimizer

    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    fused_params = [torch.nn.Parameter(t.clone()) for t in start]
    plain_params = [torch.nn.Parameter(t.clone()) for t in start]
    fused = build_optimizer(fused_params, name, 1e-2, (0.9, 0.95), 1e-8, 0.1, fused=True)
    assert build_optimizer([torch.nn.Parameter(t.clone()) for t in start], name, 1e-2, (0.9, 0.95), 1e-8,
                           0.1).defaults["fused"] is (True if torch.cuda.is_available() else None)
    plain_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    plain = plain_class(plain_params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(5):
        grads = [torch.randn(shape, generator=generator) for shape in shapes]
        for params, optimizer in ((fused_params, fused), (plain_params, plain)):
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()
    for a, b in zip(fused_params, plain_params):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_the_per_tensor_optimizer_updates_a_flat_partition_bit_for_bit_as_per_parameter_tensors():
    """What exact moves between ZeRO stages rely on: build_optimizer's default on a CPU-only host (the per-tensor
    implementation) updates ZeRO's flat fp32 partition exactly as the same tensors one by one."""
    from megatron_mixln.train.optim import build_optimizer

    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (33,), (129, 3)]  # sizes off the CPU vector width: tails in both
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    tensors = [torch.nn.Parameter(t.clone()) for t in start]
    flat = torch.nn.Parameter(torch.cat([t.flatten() for t in start]))
    by_tensor = build_optimizer(tensors, "adamw", 1e-2, (0.9, 0.95), 1e-8, 0.1)
    by_partition = build_optimizer([flat], "adamw", 1e-2, (0.9, 0.95), 1e-8, 0.1)
    assert by_tensor.defaults["fused"] is None and not torch.cuda.is_available()
    for _ in range(5):
        grads = [torch.randn(shape, generator=generator) for shape in shapes]
        for param, grad in zip(tensors, grads):
            param.grad = grad.clone()
        flat.grad = torch.cat([grad.flatten() for grad in grads])
        by_tensor.step()
        by_partition.step()
    assert torch.equal(torch.cat([t.detach().flatten() for t in tensors]), flat.detach())


def test_a_fused_optimizer_runs_the_fused_cpu_kernel_on_partitions_moved_to_the_host(monkeypatch):
    """CPU optimiser offload on a GPU host: build_optimizer asked for fused there, and DeepSpeed 0.19.8 puts its
    fp32 partitions in host memory as the group's params (zero/stage_1_and_2.py, `param_group['params'] =
    [single_partition_of_fp32_groups[i]]`; stage3.py `_optimizer_step` alike): the step is torch's fused CPU kernel."""
    from megatron_mixln.train.optim import build_optimizer

    calls = []
    fused_adamw = torch._fused_adamw_

    def counting(params, *args, **kwargs):
        calls.append({p.device.type for p in params})
        return fused_adamw(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", counting)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(4, 3))], "adamw", 1e-2, (0.9, 0.95), 1e-8, 0.1,
                                fused=True)
    partition = torch.nn.Parameter(torch.randn(12))  # what DeepSpeed hands over: one flat fp32 host tensor
    optimizer.param_groups[0]["params"] = [partition]
    partition.grad = torch.randn(12)
    before = partition.detach().clone()
    optimizer.step()
    assert calls == [{"cpu"}] and not torch.equal(partition.detach(), before)
