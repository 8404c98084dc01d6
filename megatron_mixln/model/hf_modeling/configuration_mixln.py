"""Configuration of a megatron_mixln LLaMA exported for Hugging Face transformers (loaded with trust_remote_code).

Self-contained (imports only transformers). The fields follow `transformers.LlamaConfig` where LLaMA has them;
`norm_placement`, `mix_alpha` and `post_layers` choose the normalisation of each layer as megatron_mixln's
docs/method.md defines it, and `layer_placements` records the resolved kind of every layer.
"""
from transformers import PretrainedConfig

NORM_PLACEMENTS = ("pre", "post", "mix", "deepnorm", "sandwich", "lns", "peri", "hybrid", "hybrid_star")


class MixLNLlamaConfig(PretrainedConfig):
    model_type = "mixln_llama"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size=32000, hidden_size=512, intermediate_size=1368, num_hidden_layers=12,
                 num_attention_heads=8, norm_placement="pre", mix_alpha=0.25, post_layers=None,
                 layer_placements=None, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
                 initializer_range=0.02, hidden_act="silu", use_cache=True, tie_word_embeddings=False, **kwargs):
        if norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"norm_placement={norm_placement!r} is not one of {', '.join(NORM_PLACEMENTS)}.")
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size={hidden_size} is not a multiple of "
                             f"num_attention_heads={num_attention_heads}.")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act={hidden_act!r} is not supported: the MLP is SwiGLU (silu).")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # No grouped-query attention; generation utilities read these to size the KV cache.
        self.num_key_value_heads = num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.norm_placement = norm_placement
        self.mix_alpha = mix_alpha
        self.post_layers = post_layers
        self.layer_placements = layer_placements
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.hidden_act = hidden_act
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


__all__ = ["MixLNLlamaConfig", "NORM_PLACEMENTS"]
