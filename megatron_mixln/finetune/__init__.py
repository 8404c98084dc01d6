"""Supervised fine-tuning: `mixln-finetune` trains an export or a transformers LLaMA on instruction or chat data
(data.format), with the prompt's tokens masked out of the loss (megatron_mixln/data/instructions.py)."""
