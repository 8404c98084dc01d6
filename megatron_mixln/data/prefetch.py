"""The training loop's data: each optimiser step's micro-batches, built a few steps ahead on a background thread
and pinned for an asynchronous copy to the GPU, so the step itself never waits on the data."""
from __future__ import annotations

import queue
import threading
from functools import partial
from typing import Callable, Iterator, NamedTuple, Sequence

import torch

from megatron_mixln.data.sampling import GlobalBatchSampler, SequenceDataset, batch_of_step, collate

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, labels), int64 [micro_batch, seq_len]


class StepBatch(NamedTuple):
    step: int  # the optimiser step (1-based, as the loop counts) these batches belong to
    micro_batches: list[Batch]  # this rank's, in order
    global_targets: int  # target tokens in the whole global batch (every DP rank): what the loss divides by
    batch: int = 0  # the global batch (1-based) the step reads: the step itself unless a rollback skipped batches


def build_step_batch(dataset: SequenceDataset, sampler: GlobalBatchSampler, step: int, *, dp_rank: int, dp: int,
                     micro_batch_size: int, accumulation: int, skipped: Sequence[Sequence[int]] = ()) -> StepBatch:
    """Step `step`'s micro-batches for data-parallel rank `dp_rank`, and the global batch's target count; the
    `skipped` [first, last] global batches (the guard's rollbacks) are passed over."""
    batch = batch_of_step(step, skipped)
    mine = sampler.rank_indices(batch - 1, dp_rank, dp)
    micro_batches = [collate(dataset, mine[i * micro_batch_size:(i + 1) * micro_batch_size])
                     for i in range(accumulation)]
    return StepBatch(step, micro_batches, int(dataset.target_counts(sampler.global_indices(batch - 1)).sum()), batch)


class _Failure(NamedTuple):
    error: BaseException


class BatchPrefetcher:
    """Iterates `build(step)` for each step of `steps`, built up to `depth` steps ahead on one thread.

    Use it as a context manager: leaving the block (the last step, a break, an exception) stops the thread and
    joins it. An exception raised by `build` is raised again by the iteration, at that step, as itself.
    `pin`: page-lock every tensor (default: when CUDA is available), so the copy to the GPU can be asynchronous.
    """

    def __init__(self, build: Callable[[int], StepBatch], steps: range, depth: int = 2, pin: bool | None = None,
                 pin_memory: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.pin_memory):
        if depth < 1:
            raise ValueError(f"depth={depth} is invalid: expected at least 1 step ahead.")
        self.build = build
        self.steps = steps
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.pin_memory = pin_memory
        # The CUDA device is per thread: without this, pinning from the thread would make a context on GPU 0.
        self._device = torch.cuda.current_device() if self.pin and torch.cuda.is_available() else None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="batch-prefetch", daemon=True)

    @classmethod
    def for_training(cls, dataset: SequenceDataset, sampler: GlobalBatchSampler, first_step: int, last_step: int, *,
                     dp_rank: int, dp: int, micro_batch_size: int, accumulation: int,
                     skipped: Sequence[Sequence[int]] = (), **options) -> BatchPrefetcher:
        """Steps first_step .. last_step of a run, as `build_step_batch` builds them (options: depth, pin, ...)."""
        build = partial(build_step_batch, dataset, sampler, dp_rank=dp_rank, dp=dp, micro_batch_size=micro_batch_size,
                        accumulation=accumulation, skipped=[tuple(window) for window in skipped])
        return cls(build, range(first_step, last_step + 1), **options)

    def __enter__(self) -> BatchPrefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        # Free the queue so a put under way returns; the thread then sees the stop before building again.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __iter__(self) -> Iterator[StepBatch]:
        if self._thread.ident is None:
            raise RuntimeError("BatchPrefetcher is iterated inside its `with` block, which starts its thread.")
        for _ in self.steps:
            item = self._queue.get()
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def _produce(self) -> None:
        try:
            if self._device is not None:
                torch.cuda.set_device(self._device)
            for step in self.steps:
                if self._stop.is_set():
                    return
                batch = self.build(step)
                if self.pin:
                    batch = batch._replace(micro_batches=[tuple(self.pin_memory(t) for t in micro)
                                                          for micro in batch.micro_batches])
                self._queue.put(batch)
        except BaseException as err:  # handed to the loop, which raises it at the step it belongs to
            self._queue.put(_Failure(err))
