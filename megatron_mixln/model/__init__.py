"""The LLaMA model with Mix-LN and baseline normalisation placements."""
from megatron_mixln.model.layers import MLP, Attention, DecoderLayer
from megatron_mixln.model.llama import (IGNORE_INDEX, MixLNForCausalLM, build_model, causal_lm_loss,
                                        full_initial_value, layer_index_of)
from megatron_mixln.model.norms import RMSNorm, norm_placement, num_post_ln_layers

__all__ = ["Attention", "MLP", "DecoderLayer", "MixLNForCausalLM", "RMSNorm", "IGNORE_INDEX", "build_model",
           "causal_lm_loss", "full_initial_value", "layer_index_of", "norm_placement", "num_post_ln_layers"]
