"""A megatron_mixln LLaMA for Hugging Face transformers: every normalisation placement, with megatron_mixln's
parameter names, so an exported folder's safetensors load as they are (`trust_remote_code=True`).

Self-contained (imports only torch and transformers): a re-implementation of megatron_mixln's decoder from its
docs/method.md, not an import of it. Layer i (0-based, global) of L, x its input, N* RMSNorms:

    pre          h = x + Attn(N1(x));        y = h + MLP(N2(h))       N1, N2 = input_, post_attention_layernorm
    lns          as pre, both norm outputs scaled by 1/sqrt(i+1)
    post         h = N1(x + Attn(x));        y = N2(h + MLP(h))       N1, N2 = post_attention_, post_feedforward_
    deepnorm     h = N1(a*x + Attn(x));      y = N2(a*h + MLP(h))     as post, a = (2L)^(1/4)
    sandwich     h = x + N2(Attn(N1(x)));    y = h + N4(MLP(N3(h)))   N1..N4 = input_, post_attention_,
                                                                      pre_feedforward_, post_feedforward_layernorm
    peri         sandwich layers, and model.embed_layernorm on the embedding output
    hybrid       h = x + Attn'(x); n = N(h); y = n + MLP(n)           N = post_attention_layernorm; Attn'
                                                                      normalises q, k, v over the full width
                                                                      (self_attn.{q,k,v}_norm), before RoPE
    hybrid_star  layer 0 ("hybrid_pre"): h = x + Attn'(N1(x)); y = h + MLP(N2(h)) (input_, post_attention_);
                 the other layers as hybrid
    mix          post for i < P, pre otherwise; P = post_layers, or floor(mix_alpha * L + 1e-9) capped at L

The final norm `model.norm` follows the last layer in every placement. Attention is causal multi-head SDPA without
grouped-query attention or biases, RoPE in HF's rotate_half convention with fp32 frequencies, the MLP SwiGLU, and
the LM head untied. RMSNorm follows HF LlamaRMSNorm's order of operations.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_mixln import MixLNLlamaConfig

# Block kind -> its norms, in order of use. "hybrid_pre" is hybrid_star's layer 0.
NORM_NAMES = {
    "pre": ("input_layernorm", "post_attention_layernorm"),
    "lns": ("input_layernorm", "post_attention_layernorm"),
    "post": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "deepnorm": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
    "hybrid": ("post_attention_layernorm",),
    "hybrid_pre": ("input_layernorm", "post_attention_layernorm"),
}
QKV_NORM_KINDS = ("hybrid", "hybrid_pre")


def layer_kinds(config) -> list:
    """The block kind of every layer, a function of its global index (megatron_mixln's `norm_placement`)."""
    layers, placement = config.num_hidden_layers, config.norm_placement
    if placement == "mix":
        if config.post_layers is not None:
            post = config.post_layers
        else:  # the epsilon keeps e.g. 0.3 * 10 = 2.9999999999999996 from flooring to 2
            post = min(layers, math.floor(config.mix_alpha * layers + 1e-9))
        return ["post" if i < post else "pre" for i in range(layers)]
    if placement == "hybrid_star":
        return ["hybrid_pre" if i == 0 else "hybrid" for i in range(layers)]
    if placement == "peri":
        return ["sandwich"] * layers
    return [placement] * layers


class MixLNRMSNorm(nn.Module):
    """HF LlamaRMSNorm (statistics in fp32, rounded to the input dtype before the gain) times a fixed
    `output_scale`, which is LayerNorm Scaling's 1/sqrt(i+1) and 1 everywhere else."""

    def __init__(self, hidden_size, eps=1e-6, output_scale=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.output_scale = output_scale

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        y = self.weight * normed.to(x.dtype)
        return y * self.output_scale if self.output_scale != 1.0 else y


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_cos_sin(position_ids, head_dim, theta, dtype):
    """cos, sin of shape [batch or 1, 1, seq, head_dim]: fp32 inverse frequencies and angles, as megatron_mixln."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    angles = position_ids[..., None].to(angle_dtype) * inv_freq.to(angle_dtype)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


class MixLNAttention(nn.Module):
    def __init__(self, config, layer_idx, qkv_norm=False):
        super().__init__()
        hidden = config.hidden_size
        self.layer_idx = layer_idx
        self.head_dim = hidden // config.num_attention_heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.qkv_norm = qkv_norm
        if qkv_norm:  # HybridNorm: each projection normalised over its full width, before RoPE
            self.q_norm = MixLNRMSNorm(hidden, config.rms_norm_eps)
            self.k_norm = MixLNRMSNorm(hidden, config.rms_norm_eps)
            self.v_norm = MixLNRMSNorm(hidden, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        batch, seq, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qkv_norm:
            q, k, v = self.q_norm(q), self.k_norm(k), self.v_norm(v)
        q, k, v = (t.view(batch, seq, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # No mask: either the whole causal sequence (is_causal) or one new token that sees every cached one.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MixLNMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MixLNDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx, kind):
        super().__init__()
        self.kind = kind
        self.self_attn = MixLNAttention(config, layer_idx, qkv_norm=kind in QKV_NORM_KINDS)
        self.mlp = MixLNMLP(config)
        scale = 1.0 / math.sqrt(layer_idx + 1) if kind == "lns" else 1.0
        for name in NORM_NAMES[kind]:
            self.add_module(name, MixLNRMSNorm(config.hidden_size, config.rms_norm_eps, scale))
        self.residual_scale = (2.0 * config.num_hidden_layers) ** 0.25 if kind == "deepnorm" else 1.0

    def forward(self, x, cos, sin, mask=None, cache=None):
        def attn(t):
            return self.self_attn(t, cos, sin, mask, cache)

        kind = self.kind
        if kind in ("pre", "lns", "hybrid_pre"):
            h = x + attn(self.input_layernorm(x))
            return h + self.mlp(self.post_attention_layernorm(h))
        if kind in ("post", "deepnorm"):
            a = self.residual_scale
            h = self.post_attention_layernorm(attn(x) + (x if a == 1.0 else a * x))
            return self.post_feedforward_layernorm(self.mlp(h) + (h if a == 1.0 else a * h))
        if kind == "sandwich":
            h = x + self.post_attention_layernorm(attn(self.input_layernorm(x)))
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        if kind == "hybrid":
            n = self.post_attention_layernorm(x + attn(x))
            return n + self.mlp(n)
        raise ValueError(f"unknown layer kind {kind!r}")


def _output(cls, **fields):
    """A model output; transformers 5 names the KV cache `cache`, earlier versions `past_key_values`."""
    cache = fields.pop("cache")
    fields["cache" if "cache" in cls.__dataclass_fields__ else "past_key_values"] = cache
    return cls(**fields)


class MixLNLlamaPreTrainedModel(PreTrainedModel):
    config_class = MixLNLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["MixLNDecoderLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = False
    # Weight initialisation (for weights a checkpoint lacks) is transformers' default: normal(0, initializer_range)
    # for linear and embedding weights, ones for every *RMSNorm gain.


class MixLNLlamaModel(MixLNLlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        if config.norm_placement == "peri":
            self.embed_layernorm = MixLNRMSNorm(hidden, eps)
        kinds = layer_kinds(config)
        if config.layer_placements is not None and list(config.layer_placements) != kinds:
            # The rule above and the kinds the exporter recorded disagree: an edited config, or a newer exporter.
            raise ValueError(f"layer_placements={config.layer_placements} in config.json, but norm_placement="
                             f"{config.norm_placement!r} gives {kinds}.")
        self.layers = nn.ModuleList([MixLNDecoderLayer(config, i, kind) for i, kind in enumerate(kinds)])
        self.norm = MixLNRMSNorm(hidden, eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @staticmethod
    def _mask(attention_mask, batch, seq, past, device):
        """A boolean SDPA mask [batch, 1, seq, past + seq] (True: attend), or None where plain causal attention
        (or, for one new token, attending to everything) is already right."""
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask  # prepared by the caller
        padded = attention_mask is not None and not bool(attention_mask.all())
        if not padded and (past == 0 or seq == 1):
            return None
        keys = torch.arange(past + seq, device=device)
        allowed = (keys[None, :] <= (past + torch.arange(seq, device=device))[:, None])[None, None]
        if padded:
            allowed = allowed & attention_mask[:, None, None, :past + seq].bool()
        # A query that sees nothing (a left-padding position) would give NaN; it attends everywhere instead,
        # and its output is never used.
        return (allowed | ~allowed.any(-1, keepdim=True)).expand(batch, 1, seq, past + seq)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, return_dict=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            from transformers.cache_utils import DynamicCache

            cache = DynamicCache()
        batch, seq = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=inputs_embeds.device)[None]
        cos, sin = rotary_cos_sin(position_ids, self.config.hidden_size // self.config.num_attention_heads,
                                  self.config.rope_theta, inputs_embeds.dtype)
        mask = self._mask(attention_mask, batch, seq, past, inputs_embeds.device)
        x = inputs_embeds
        if self.config.norm_placement == "peri":
            x = self.embed_layernorm(x)
        hidden_states = []
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(x)
            x = layer(x, cos, sin, mask, cache if use_cache else None)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        return _output(BaseModelOutputWithPast, last_hidden_state=x, cache=cache if use_cache else None,
                       hidden_states=tuple(hidden_states) if output_hidden_states else None)


class MixLNLlamaForCausalLM(MixLNLlamaPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = MixLNLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, return_dict=None,
                logits_to_keep=0, **kwargs):
        """Logits [batch, seq, vocab]; with `labels` (unshifted, -100 ignored) also the mean next-token loss."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_hidden_states=output_hidden_states)
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        cache = getattr(outputs, "cache", None) if "cache" in type(outputs).__dataclass_fields__ \
            else outputs.past_key_values
        return _output(CausalLMOutputWithPast, loss=loss, logits=logits, cache=cache,
                       hidden_states=outputs.hidden_states)


__all__ = ["MixLNLlamaForCausalLM", "MixLNLlamaModel", "MixLNLlamaPreTrainedModel"]
