"""Hugging Face interop, both ways (docs/method.md#hugging-face-interop): the commands that turn a run into a
transformers folder and a transformers folder into an export. Above train/ (runs, checkpoints, exports) and
model/hf_format.py (the format itself), which never import it.

Out (`export_hf`, `mixln-export --hf`): the model of a run folder, checkpoint or export written as a transformers
folder (model/hf_format.py: a Pre-LN model as a LlamaForCausalLM, any other placement with the modeling files of
model/hf_modeling/), carrying the run's tokenizer (`hf_tokenizer`).

In (`import_hf`, `mixln-import`): a transformers LLaMA folder (or one of our own HF exports) becomes a consolidated
export, one unit in memory at a time. (`model.init_from` starts a run from one directly: train/init_from.py.)
"""
from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from megatron_mixln.config import ModelConfig
from megatron_mixln.data.errors import DataError
from megatron_mixln.data.sources import hub_unreachable
from megatron_mixln.data.tokenizers import load_tokenizer
from megatron_mixln.model.hf_format import HF_OUTPUT, MODEL_TYPE, HFTensors, save_hf_pretrained, source_names
from megatron_mixln.output_folder import atomic_folder, check_output_folder
from megatron_mixln.saved_files import CheckpointError
from megatron_mixln.train import export
from megatron_mixln.train.weights import read_source_config, read_weights

# Text both tokenizers must encode to the same ids before an export carries transformers' one.
TOKENIZER_PROBE = "Mix-LN puts Post-LN in the first layers, Pre-LN in the rest: 25% of 24 = 6.\n  Ünïcödé, 東京."


def _tokenizer_spec(data_meta: dict | None, spec: str | None) -> str:
    """The tokenizer to carry: `spec` when given, else the run's (a trained BPE is its prepared folder's
    tokenizer.json). Raises ValueError with the reason when there is none."""
    if spec:
        return spec
    if not data_meta or not data_meta.get("tokenizer"):
        raise ValueError("the source records no data metadata with a tokenizer spec")
    if data_meta["tokenizer"] != "bpe":
        return data_meta["tokenizer"]
    path = Path(data_meta.get("folder") or ".") / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"the run's trained BPE {str(path)!r} is gone (its prepared data folder was removed, "
                         "or the run's paths were relative to another directory)")
    return str(path)


def hf_tokenizer(data_meta: dict | None = None, spec: str | None = None, vocab_size: int | None = None):
    """transformers' tokenizer for the run's tokenizer (or `spec`): a tokenizer.json (a trained BPE) through
    PreTrainedTokenizerFast, a SentencePiece .model converted by transformers, an HF name or folder loaded.

    Its eos and pad tokens are set to the run's (our pad falls back to eos); it must encode TOKENIZER_PROBE to our
    `Tokenizer.encode` ids and fit the model's vocabulary, else it is refused. Returns (tokenizer, None), or
    (None, the reason as a clause) when none can be built.
    """
    try:
        spec = _tokenizer_spec(data_meta, spec)
        ours = load_tokenizer(spec)
        hf = _build_hf_tokenizer(spec)
    except (ValueError, DataError, OSError) as err:
        return None, str(err).rstrip(".")
    # Ours falls back to eos when there is no pad token; transformers needs it named for padding to work.
    if hf.eos_token_id != ours.eos_id:
        hf.eos_token = hf.convert_ids_to_tokens(ours.eos_id)
    if hf.pad_token_id != ours.pad_id:
        hf.pad_token = hf.convert_ids_to_tokens(ours.pad_id)
    got = hf(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if got != ours.encode(TOKENIZER_PROBE):
        return None, f"transformers' tokenizer built from {spec!r} encodes text differently from the run's"
    if vocab_size is not None and len(hf) > vocab_size:
        return None, f"the tokenizer {spec!r} has {len(hf)} tokens, more than the model's vocab_size={vocab_size}"
    return hf, None


def _build_hf_tokenizer(spec: str):
    """transformers' tokenizer of `spec`, padding on the left: a decoder-only model continues the prompt, so batched
    generation needs the padding before it. An argument, not an attribute set later: save_pretrained writes the
    constructor's arguments, so only then does the saved tokenizer reload with it."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    left = {"padding_side": "left"}
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".json":
        return PreTrainedTokenizerFast(tokenizer_file=str(path), **left)
    if path.is_file():
        # A SentencePiece model: transformers converts it (unigram or BPE) when it finds it as tokenizer.model.
        # LlamaTokenizer would not do: it assumes LLaMA's BPE with byte fallback, and unigram models encode wrong.
        with tempfile.TemporaryDirectory(prefix="mixln-spm-") as folder:
            shutil.copyfile(path, Path(folder) / "tokenizer.model")
            try:
                return PreTrainedTokenizerFast.from_pretrained(folder, **left)
            except Exception as err:  # noqa: BLE001 - transformers raises several types for an unconvertible model
                raise ValueError(f"transformers cannot convert the SentencePiece model {spec!r} ({err})") from None
    offline = None if path.is_dir() else hub_unreachable()
    try:
        return AutoTokenizer.from_pretrained(spec, local_files_only=offline is not None, **left)
    except Exception as err:  # noqa: BLE001 - offline hub, unknown name, broken folder
        raise ValueError(f"AutoTokenizer cannot load {spec!r}" + (f" ({offline})" if offline else "")) from err


@dataclass
class HFExport:
    out: Path
    step: int | None
    format: str  # what loads it
    tokenizer_problem: str | None  # why the folder has no tokenizer; None when it has one


def export_hf(source: str | Path, out: str | Path, tokenizer: str | None = None, force: bool = False) -> HFExport:
    """Write the model of a run folder, checkpoint or consolidated export as a transformers folder, with its
    tokenizer (the run's, found through its data metadata, or `tokenizer`: a spec as data.tokenizer takes).

    A tokenizer that cannot be found or built is a warning, not an error: the weights are what a run cost, and
    the tokenizer can be added later (`tokenizer.save_pretrained(out)`), while a failed export would leave
    nothing, e.g. once the run's prepared-data cache has been cleaned.
    """
    inputs = [source] + ([tokenizer] if tokenizer is not None and Path(tokenizer).exists() else [])
    check_output_folder(out, HF_OUTPUT, inputs, force)  # before the weights are read: a refusal comes at once
    weights = read_weights(source)
    hf_tok, problem = hf_tokenizer(weights.data_meta, tokenizer, weights.model_config.vocab_size)
    save_hf_pretrained(weights.model_config, weights.tensors, out, hf_tok, weights.data_meta, weights.step,
                       weights.run_config, force)
    if problem is not None:
        warnings.warn(f"{out} has no tokenizer: {problem}; add one with --tokenizer SPEC (mixln-export) or "
                      "tokenizer.save_pretrained.", stacklevel=2)
    pre = weights.model_config.norm_placement == "pre"
    return HFExport(Path(out), weights.step, "LlamaForCausalLM" if pre else
                    f"{MODEL_TYPE}, AutoModelForCausalLM with trust_remote_code=True", problem)


def import_hf(folder: str | Path, out: str | Path, force: bool = False) -> tuple[Path, ModelConfig, str]:
    """Write a transformers LLaMA folder (or one of our HF exports) as a consolidated export: per-unit shards
    under our names, one unit in memory at a time (an `out` that is not an earlier export is replaced only with
    `force`). Returns (out, its ModelConfig, the source's kind)."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} does not exist: pass a Hugging Face model folder (config.json + weights).")
    check_output_folder(out, export.EXPORT_OUTPUT, [folder], force)
    model_config, kind = read_source_config(folder)
    if kind == "export":
        raise CheckpointError(f"{folder} is already a consolidated export: use it as it is (model.init_from or "
                                "train.resume).")
    tensors = HFTensors(folder)
    names = source_names(tensors, model_config, folder, kind)
    extra = {"step": 0, "imported_from": {"folder": str(folder.resolve()), "kind": kind}}
    with atomic_folder(out, export.EXPORT_OUTPUT, force) as tmp:
        writer = export.UnitWriter(tmp, model_config.num_layers)
        for name in sorted(names, key=lambda name: export.export_unit(name, model_config.num_layers)):
            writer.add(name, tensors.piece(names[name])[:])  # the writer writes and frees a unit when the next begins
        writer.close()
        export.finish_export(tmp, model_config, extra, writer.index)
    return out, model_config, kind
