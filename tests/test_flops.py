"""Model FLOPs per token (megatron_mixln/train/flops.py) against torch's own FlopCounterMode on a training step."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from megatron_mixln.config import ModelConfig
from megatron_mixln.model import build_model, token_losses
from megatron_mixln.train.flops import forward_flops_per_token, training_flops_per_token


def math_attention(q, k, v, is_causal=True, **_):
    # The attention as two batched products FlopCounterMode can see (torch's CPU SDPA kernel is not counted).
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    seq = q.shape[-2]
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("placement", ["pre", "mix", "peri", "hybrid_star"])
def test_training_flops_per_token_match_flop_counter_mode(placement, monkeypatch):
    config = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=56, num_layers=3, num_heads=4,
                         max_seq_len=64, norm_placement=placement, kernels="torch")
    model = build_model(config, seed=0)
    batch, seq = 3, 20
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(F, "scaled_dot_product_attention", math_attention)
    with FlopCounterMode(display=False) as forward_only:
        with torch.no_grad():
            model(ids[:, :-1])
    with FlopCounterMode(display=False) as training:
        token_losses(model(ids[:, :-1]), ids[:, 1:]).mean().backward()
    tokens = batch * seq
    assert forward_only.get_total_flops() == forward_flops_per_token(config, seq) * tokens
    assert training.get_total_flops() == training_flops_per_token(config, seq) * tokens
