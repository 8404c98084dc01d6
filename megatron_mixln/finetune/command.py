"""mixln-finetune: mixln-train with a fine-tuning config, checked first: weights to start from (model.init_from)
and instruction or chat data (data.format). Training, checkpoints, resume and export are mixln-train's own."""
from __future__ import annotations

import argparse
import sys

FINETUNE_FORMATS = ("instruction", "chat")


def _parser() -> argparse.ArgumentParser:
    from megatron_mixln.cli import _train_parser

    parser = _train_parser()  # the same arguments: they are handed on to mixln-train unchanged
    parser.prog = "mixln-finetune"
    parser.description = (
        "Supervised fine-tuning: train model.init_from (an export, a mixln-export --hf folder or a transformers "
        "LLaMA folder) on instruction (Alpaca / Commonsense170K) or chat records, the loss on the response tokens "
        "only; checkpoints, resume and export as mixln-train (docs/data.md#instruction-and-chat-data, "
        "docs/recipes.md#supervised-fine-tuning-commonsense170k).")
    return parser


def check_finetune_config(config) -> None:
    """One ConfigError sentence when `config` is not a fine-tuning run."""
    from megatron_mixln.config import ConfigError

    if not config.model.init_from:
        raise ConfigError("model.init_from=None is invalid for mixln-finetune: expected the weights to fine-tune (an "
                          "export folder such as runs/NAME/export, a mixln-export --hf folder or a transformers LLaMA "
                          "folder); to train from scratch use mixln-train.")
    if config.data.format not in FINETUNE_FORMATS:
        raise ConfigError(f"data.format={config.data.format!r} is invalid for mixln-finetune: expected one of "
                          f"{', '.join(FINETUNE_FORMATS)} (the prompt is then masked out of the loss); plain text "
                          "trains with mixln-train.")
    if config.data.tokenizer == "bpe":
        raise ConfigError("data.tokenizer='bpe' is invalid for mixln-finetune: it would train a new tokenizer whose "
                          "ids mean nothing to model.init_from; set it to the tokenizer the weights were trained with "
                          "(the tokenizer.json of a mixln-export --hf folder or of the pre-training run's prepared "
                          "folder, or a tokenizer name or folder).")


def _finetune(argv: list[str]) -> int:
    from megatron_mixln.cli import _train
    from megatron_mixln.config import load_config

    args = _parser().parse_intermixed_args(argv)
    check_finetune_config(load_config(args.config, args.overrides))
    return _train(argv)


def main() -> None:
    from megatron_mixln.cli import _run

    sys.exit(_run(_finetune, sys.argv[1:]))
