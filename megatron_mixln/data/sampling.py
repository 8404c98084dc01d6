"""Fixed-length training sequences from token files, and the global-batch order that every DP degree shares."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from megatron_mixln.config import ConfigError
from megatron_mixln.data.errors import DataError
from megatron_mixln.data.token_files import TokenFile

IGNORE_INDEX = -100  # label of positions without a target (pad, the last real token of a document, a prompt)
MODES = ("document", "packed")


class SequenceDataset:
    """Sequence i as (input_ids, labels), both int64[seq_len]; labels are already shifted: labels[t] is the
    target of position t.

    document (the paper): one document per sequence, truncated to seq_len and right-padded with pad_id.
    packed: the split as one stream of documents cut into consecutive windows, no padding.

    Instruction / chat data (the token file has prompt lengths): a position whose target is a prompt token gets
    IGNORE_INDEX, so only response tokens (and their eos) are predicted, each weighted as a pre-training token.
    Document mode is then padding (one example per sequence), packed mode packing (examples back to back, each
    keeping its mask).
    """

    def __init__(self, token_file: TokenFile, seq_len: int, mode: str, pad_id: int):
        if mode not in MODES:
            raise ConfigError(f"data.mode={mode!r} is invalid: expected one of {', '.join(MODES)}.")
        if seq_len < 2:
            raise ConfigError(f"data.seq_len={seq_len!r} is invalid: expected an integer >= 2.")
        self.token_file = token_file
        self.seq_len = seq_len
        self.mode = mode
        self.pad_id = pad_id
        self.prompt_lengths = token_file.prompt_lengths  # None for pre-training text
        if mode == "document":
            # A one-token document has no target at all, nor an example whose prompt fills the sequence.
            everything = np.arange(token_file.num_documents)
            self.document_index = np.flatnonzero(self._document_targets(everything) >= 1)
        else:
            self.document_index = None
            if self.prompt_lengths is not None:
                self._prompts_before = np.concatenate([[0], np.cumsum(self.prompt_lengths, dtype=np.int64)])

    def _document_targets(self, documents: np.ndarray) -> np.ndarray:
        """Targets of each document's sequence in document mode: tokens max(prompt, 1) .. min(length, S) - 1."""
        lengths = self.token_file.document_lengths()[documents]
        first = 1 if self.prompt_lengths is None else np.maximum(self.prompt_lengths[documents], 1)
        return np.minimum(lengths, self.seq_len) - first

    def _prompt_tokens_below(self, positions: np.ndarray) -> np.ndarray:
        """How many prompt tokens of the stream lie before each of `positions` (packed mode)."""
        offsets = self.token_file.offsets
        documents = np.clip(np.searchsorted(offsets, positions, side="right") - 1, 0, len(self.prompt_lengths) - 1)
        return self._prompts_before[documents] + np.minimum(positions - offsets[documents],
                                                            self.prompt_lengths[documents])

    def __len__(self) -> int:
        if self.mode == "document":
            return len(self.document_index)
        # Window i reads tokens [i*S, i*S + S]: the +1 is the last target, so the stream must hold one extra token.
        return max(0, (self.token_file.num_tokens - 1) // self.seq_len)

    def target_counts(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Positions with a target in each sequence of `indices`, from document offsets alone (no token read):
        what the token-weighted loss divides by, known on every rank without communication."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.mode == "packed":
            if self.prompt_lengths is None:
                return np.full(len(indices), self.seq_len, dtype=np.int64)
            # Window i predicts stream tokens i*S + 1 .. i*S + S; those inside a prompt have no target.
            first = indices * self.seq_len + 1
            return self.seq_len - (self._prompt_tokens_below(first + self.seq_len) - self._prompt_tokens_below(first))
        return self._document_targets(self.document_index[indices])

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {len(self)} sequences")
        if self.mode == "packed":
            start = index * self.seq_len
            window = np.asarray(self.token_file.tokens[start:start + self.seq_len + 1], dtype=np.int64)
            labels = window[1:]
            if self.prompt_lengths is not None:
                labels = labels.copy()  # the window stays whole: its tokens are the inputs
                targets = np.arange(start + 1, start + self.seq_len + 1)
                offsets = self.token_file.offsets
                documents = np.searchsorted(offsets, targets, side="right") - 1
                labels[targets - offsets[documents] < self.prompt_lengths[documents]] = IGNORE_INDEX
            return window[:-1], labels
        document = int(self.document_index[index])
        tokens = np.asarray(self.token_file.document(document)[:self.seq_len], dtype=np.int64)
        input_ids = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        input_ids[:len(tokens)] = tokens
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        labels[:len(tokens) - 1] = tokens[1:]
        if self.prompt_lengths is not None:
            labels[:max(int(self.prompt_lengths[document]) - 1, 0)] = IGNORE_INDEX  # position t predicts token t+1
        return input_ids, labels


class GlobalBatchSampler:
    """Which sequences optimiser step `step` sees: a function of (seed, step) only, independent of the DP degree.

    Epoch e visits the sequences in a permutation seeded by (seed, e); global position p = step*global_batch + j
    lies in epoch p // num_samples, so batches cross epoch boundaries without dropping or repeating anything.
    """

    def __init__(self, num_samples: int, global_batch_size: int, seed: int):
        if num_samples < 1:
            raise DataError("the training split has no sequences: use a source with more (or longer) documents.")
        if global_batch_size < 1:
            raise ConfigError(f"train.global_batch_size={global_batch_size!r} is invalid: expected a positive integer.")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self._permutations: dict[int, np.ndarray] = {}

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a batch rarely spans more than two epochs; keep memory bounded
                self._permutations.pop(next(iter(self._permutations)))
            self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return self._permutations[epoch]

    def global_indices(self, step: int) -> np.ndarray:
        positions = step * self.global_batch_size + np.arange(self.global_batch_size, dtype=np.int64)
        epochs, within = np.divmod(positions, self.num_samples)
        indices = np.empty(self.global_batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            indices[chosen] = self.epoch_permutation(int(epoch))[within[chosen]]
        return indices

    def rank_indices(self, step: int, dp_rank: int, dp_size: int) -> np.ndarray:
        """The contiguous slice of step `step`'s global batch that data-parallel rank `dp_rank` processes."""
        if self.global_batch_size % dp_size != 0:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is invalid: expected a multiple of "
                              f"the data-parallel size {dp_size}.")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is out of range for dp_size={dp_size}")
        per_rank = self.global_batch_size // dp_size
        return self.global_indices(step)[dp_rank * per_rank:(dp_rank + 1) * per_rank]


def batch_of_step(step: int, skipped: Sequence[Sequence[int]] = ()) -> int:
    """The global batch (1-based) optimiser step `step` reads when the batches of the `skipped` [first, last]
    windows are passed over: the step-th batch outside every window. Without windows, the step itself."""
    batch = step
    for first, last in sorted(skipped):  # disjoint windows (LossSpikeGuard merges them), in order
        if batch < first:
            break
        batch += last - first + 1
    return batch


def collate(dataset: SequenceDataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) LongTensors of shape [len(indices), seq_len]."""
    pairs = [dataset[int(i)] for i in indices]
    input_ids = np.stack([pair[0] for pair in pairs]) if pairs else np.zeros((0, dataset.seq_len), np.int64)
    labels = np.stack([pair[1] for pair in pairs]) if pairs else np.zeros((0, dataset.seq_len), np.int64)
    return torch.from_numpy(input_ids), torch.from_numpy(labels)


def eval_indices(num_sequences: int, wanted: int) -> np.ndarray:
    """A fixed sample of `wanted` sequence indices spread evenly over the whole split (all when it has fewer):
    the same held-out set for every run, step and seed, drawn from every part of the split, not its head."""
    if wanted >= num_sequences:
        return np.arange(num_sequences, dtype=np.int64)
    return (np.arange(wanted, dtype=np.int64) * num_sequences) // wanted


def eval_batches(dataset: SequenceDataset, num_sequences: int, batch_size: int
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The `eval_indices` sample of `num_sequences` sequences, in batches of batch_size (the last may be smaller)."""
    indices = eval_indices(len(dataset), num_sequences)
    for start in range(0, len(indices), batch_size):
        yield collate(dataset, indices[start:start + batch_size])
