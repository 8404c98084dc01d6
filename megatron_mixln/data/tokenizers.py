"""One small tokenizer interface over HF `transformers`, SentencePiece, HF `tokenizers` files and a trained BPE."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from megatron_mixln.data.errors import DataError, first_line

EOS_TOKENS = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
PAD_TOKENS = ("<pad>", "[PAD]", "<|pad|>")
BPE_SPECIAL_TOKENS = ("<pad>", "<eos>")  # ids 0 and 1 of a trained BPE
BPE_TRAINING_CHARACTERS = 200_000_000  # a BPE learns its merges from at most this much text (C4 is endless)


@dataclass(frozen=True)
class Tokenizer:
    """Text <-> token ids without special tokens; a document is `encode(text) + [eos_id]`."""

    name: str
    vocab_size: int  # number of ids, special and added tokens included
    eos_id: int
    pad_id: int  # eos_id when the tokenizer has no pad token
    encode_batch: Callable[[list[str]], list[list[int]]]
    decode: Callable[[list[int]], str]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def __len__(self) -> int:
        return self.vocab_size


def load_tokenizer(spec: str, train_texts: Iterable[str] | None = None, vocab_size: int = 8192,
                   save_dir: str | Path | None = None) -> Tokenizer:
    """A tokenizer from a spec: "bpe" (trained on train_texts, saved to save_dir/tokenizer.json), a SentencePiece
    .model file, a tokenizer.json file, or a Hugging Face tokenizer name or folder ("t5-base")."""
    if spec == "bpe":
        if train_texts is None:
            raise DataError("data.tokenizer='bpe' needs training text: pass train_texts to load_tokenizer.")
        return train_bpe(train_texts, vocab_size, save_dir)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".json":
        import tokenizers

        try:
            return _from_tokenizers(tokenizers.Tokenizer.from_file(str(path)), str(path))
        except Exception as err:
            raise DataError(f"data.tokenizer={spec!r} is not a Hugging Face tokenizer.json: "
                            f"{first_line(err)}.") from err
    if path.is_file():  # any other file is taken as a SentencePiece model (LLaMA's tokenizer.model, *.model.v1)
        return _sentencepiece_tokenizer(path)
    if spec.endswith((".model", ".json")):
        raise DataError(f"data.tokenizer={spec!r} does not exist: expected a SentencePiece .model file, a "
                        f"tokenizer.json, a Hugging Face tokenizer name or folder, or bpe.")
    return _transformers_tokenizer(spec)


def train_bpe(texts: Iterable[str], vocab_size: int, save_dir: str | Path | None = None) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style: lossless, no unknown tokens) with <pad>=0 and <eos>=1."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_first_characters(texts, BPE_TRAINING_CHARACTERS), trainer)
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(Path(save_dir) / "tokenizer.json"))
    return _from_tokenizers(tokenizer, f"bpe{vocab_size}")


def _first_characters(texts: Iterable[str], limit: int) -> Iterable[str]:
    seen = 0
    for text in texts:
        yield text
        seen += len(text)
        if seen >= limit:
            return


def _from_tokenizers(tokenizer, name: str) -> Tokenizer:
    """Wrap an HF `tokenizers.Tokenizer` (a trained BPE or a tokenizer.json)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    eos_id = next((vocab[token] for token in EOS_TOKENS if token in vocab), None)
    if eos_id is None:
        raise DataError(f"tokenizer {name!r} has no end-of-sequence token: expected one of {', '.join(EOS_TOKENS)}.")
    pad_id = next((vocab[token] for token in PAD_TOKENS if token in vocab), eos_id)

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]

    return Tokenizer(name=name, vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), eos_id=eos_id,
                     pad_id=pad_id, encode_batch=encode_batch,
                     decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False))


def _sentencepiece_tokenizer(path: Path) -> Tokenizer:
    import sentencepiece

    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception as err:
        raise DataError(f"data.tokenizer={str(path)!r} is not a SentencePiece model: {first_line(err)}.") from err
    if processor.eos_id() < 0:
        raise DataError(f"SentencePiece model {str(path)!r} has no end-of-sequence token: train it with eos_id >= 0.")
    pad_id = processor.pad_id() if processor.pad_id() >= 0 else processor.eos_id()

    def encode_batch(texts: list[str]) -> list[list[int]]:
        # SentencePiece spreads a batch over every core; it follows HF tokenizers' switch instead, so the processes
        # of a prepare's pool (which set it to false) each use one core rather than all of them at once.
        parallel = os.environ.get("TOKENIZERS_PARALLELISM", "").lower() not in ("false", "0", "off", "no")
        return processor.encode(texts, out_type=int, num_threads=None if parallel else 1)

    return Tokenizer(name=str(path), vocab_size=processor.get_piece_size(), eos_id=processor.eos_id(), pad_id=pad_id,
                     encode_batch=encode_batch, decode=lambda ids: processor.decode([int(i) for i in ids]))


def _transformers_tokenizer(spec: str) -> Tokenizer:
    """A Hugging Face tokenizer by hub name or local folder; the paper uses "t5-base"."""
    from transformers import AutoTokenizer

    from megatron_mixln.data.sources import hub_unreachable

    offline = None if Path(spec).expanduser().is_dir() else hub_unreachable()
    try:
        # Out of reach, only the local cache is looked at (no retries): a tokenizer downloaded before still loads.
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=offline is not None)
    except Exception as err:  # offline hub, unknown name, broken folder
        if offline is not None:
            raise DataError(f"data.tokenizer={spec!r} could not be loaded: the Hugging Face hub is out of reach "
                            f"({offline}) and {spec!r} is not in its local cache; pass a local folder, a .model or "
                            f"tokenizer.json file, or bpe.") from err
        raise DataError(f"data.tokenizer={spec!r} could not be loaded with transformers.AutoTokenizer "
                        f"({first_line(err)}); "
                        f"without the Hugging Face hub pass a local folder, a .model or tokenizer.json file, "
                        f"or bpe.") from err
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {spec!r} has no end-of-sequence token: choose a tokenizer that defines eos_token.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode_batch(texts: list[str]) -> list[list[int]]:
        # verbose=False: documents longer than model_max_length are expected; they are truncated per sequence later.
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    return Tokenizer(name=spec, vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id, pad_id=pad_id,
                     encode_batch=encode_batch,
                     decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False))
