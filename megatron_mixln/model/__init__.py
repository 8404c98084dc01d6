"""The LLaMA model with Mix-LN and baseline normalisation placements."""
from megatron_mixln.model.layers import MLP, Attention, DecoderLayer, Stream, hidden_state, split_stream
from megatron_mixln.model.llama import (IGNORE_INDEX, LMHead, MixLNForCausalLM, build_model, causal_lm_loss,
                                        full_initial_value, layer_index_of, stage_modules, token_losses)
from megatron_mixln.model.norms import RMSNorm, norm_placement, num_post_ln_layers

__all__ = ["Attention", "MLP", "DecoderLayer", "LMHead", "MixLNForCausalLM", "RMSNorm", "IGNORE_INDEX", "Stream",
           "build_model", "causal_lm_loss", "full_initial_value", "hidden_state", "layer_index_of", "norm_placement",
           "num_post_ln_layers", "split_stream", "stage_modules", "token_losses"]
