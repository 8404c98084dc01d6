"""Benchmark: our Pre-LN model vs transformers.LlamaForCausalLM, same config, batch and optimiser, one process.

The two models train alternately (one step each, repeated), so machine noise hits both alike; the table
reports median tokens per second and their ratio. Run: `mixln-bench hf [--hidden 512 --layers 8 ...]`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def hf_llama(config, state_dict):
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
        rms_norm_eps=config.rms_norm_eps, max_position_embeddings=config.max_seq_len, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, rope_theta=config.rope_theta)
    hf_config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(hf_config)
    model.load_state_dict(state_dict, strict=True)
    return model


def main(argv=None) -> int:
    from megatron_mixln import ModelConfig, build_model
    from megatron_mixln.model import causal_lm_loss

    parser = argparse.ArgumentParser(prog="mixln-bench hf", description=__doc__)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1368)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    config = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_layers=args.layers, num_heads=args.heads, max_seq_len=args.seq)
    ours = build_model(config, seed=0)
    theirs = hf_llama(config, ours.state_dict())
    models = {"megatron_mixln": ours, "transformers": theirs}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-4) for name, m in models.items()}
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    labels = torch.cat([inputs[:, 1:], torch.full((args.batch, 1), -100)], dim=1)

    def step(name: str) -> float:
        model, optimizer = models[name], optimizers[name]
        started = time.perf_counter()
        logits = model(inputs) if name == "megatron_mixln" else model(input_ids=inputs).logits
        loss = causal_lm_loss(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    for _ in range(args.warmup):
        for name in models:
            step(name)
    times = {name: [] for name in models}
    for round_index in range(args.rounds):
        order = list(models) if round_index % 2 == 0 else list(reversed(models))  # alternate who goes first
        for name in order:
            times[name].append(step(name))
    tokens = args.batch * args.seq
    speed = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(f"CPU eager training step (fwd+bwd+Adam), {torch.get_num_threads()} threads, "
          f"hidden {args.hidden}, ffn {args.ffn}, layers {args.layers}, heads {args.heads}, vocab {args.vocab}, "
          f"batch {args.batch} x seq {args.seq}, {args.rounds} alternating rounds")
    print("| model | median tokens/s | ratio vs transformers |")
    print("|---|---|---|")
    for name, value in speed.items():
        print(f"| {name} | {value:,.0f} | {value / speed['transformers']:.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
