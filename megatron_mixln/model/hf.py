"""Interop with Hugging Face transformers: a Pre-LN model *is* an HF LLaMA (same names, same maths)."""
from __future__ import annotations

from megatron_mixln.config import ConfigError, ModelConfig


def hf_llama_config(config: ModelConfig):
    """The `transformers.LlamaConfig` of the same architecture (untied head, no biases, SDPA attention)."""
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_seq_len, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, rope_theta=config.rope_theta)
    hf_config._attn_implementation = "sdpa"
    return hf_config


def to_hf_llama(config: ModelConfig, state_dict):
    """A `transformers.LlamaForCausalLM` holding these weights; only Pre-LN has an HF equivalent."""
    import transformers

    if config.norm_placement != "pre":
        raise ConfigError(f"model.norm_placement={config.norm_placement!r} has no transformers LLaMA equivalent: "
                          "only pre can be exported in Hugging Face format (use the consolidated export).")
    model = transformers.LlamaForCausalLM(hf_llama_config(config))
    model.load_state_dict(state_dict, strict=True)
    return model


def save_hf_pretrained(config: ModelConfig, state_dict, out) -> None:
    """Write a Pre-LN model as a Hugging Face folder that `LlamaForCausalLM.from_pretrained` loads."""
    to_hf_llama(config, state_dict).save_pretrained(str(out), safe_serialization=True)
