"""Read-only access to one split of a prepared folder: a flat memory-mapped token file and document offsets."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_mixln.data.errors import DataError
from megatron_mixln.data.prepare import read_meta


class TokenFile:
    """Documents of one split; `tokens` is the whole split as one stream (documents end with eos)."""

    def __init__(self, folder: str | Path, split: str):
        self.folder = Path(folder)
        self.split = split
        self.meta = read_meta(self.folder)
        tokens_path = self.folder / f"{split}.tokens"
        offsets_path = self.folder / f"{split}.offsets.npy"
        if not tokens_path.is_file() or not offsets_path.is_file():
            raise DataError(f"prepared folder {str(self.folder)!r} has no {split} split: expected {tokens_path.name} "
                            f"and {offsets_path.name}.")
        self.offsets = np.load(offsets_path, mmap_mode="r")
        dtype = np.dtype(self.meta["dtype"])
        if tokens_path.stat().st_size != int(self.offsets[-1]) * dtype.itemsize:
            raise DataError(f"{str(tokens_path)!r} holds {tokens_path.stat().st_size // dtype.itemsize} tokens but its "
                            f"offsets say {int(self.offsets[-1])}: delete the folder and prepare again.")
        # numpy cannot memory-map an empty file (an eval split of eval_fraction=0).
        self.tokens = np.memmap(tokens_path, dtype=dtype, mode="r") if self.offsets[-1] > 0 else np.zeros(0, dtype)
        # Instruction / chat data: the number of leading prompt tokens of each document (no target there).
        prompts_path = self.folder / f"{split}.prompt_lengths.npy"
        self.prompt_lengths = np.load(prompts_path) if prompts_path.is_file() else None
        if self.prompt_lengths is not None and len(self.prompt_lengths) != self.num_documents:
            raise DataError(f"{str(prompts_path)!r} holds {len(self.prompt_lengths)} prompt lengths for "
                            f"{self.num_documents} documents: delete the folder and prepare again.")

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def document_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document(self, index: int) -> np.ndarray:
        """Token ids of document `index`, eos included (a read-only view)."""
        if not 0 <= index < self.num_documents:
            raise IndexError(f"document {index} out of range for {self.num_documents} documents")
        return self.tokens[self.offsets[index]:self.offsets[index + 1]]
