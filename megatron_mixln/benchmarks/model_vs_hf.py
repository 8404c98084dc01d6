"""Benchmark: our Pre-LN model vs transformers.LlamaForCausalLM, same config, batch and optimiser, one process.

The two models train alternately (one step each, repeated), so machine noise hits both alike; the table
reports median tokens per second and their ratio. Run: `mixln-bench hf [--presets tiny,71m] [--rounds 10]`.
"""
from __future__ import annotations

import argparse
import statistics
import time

PRESETS = {
    # The demo's model (configs/tiny.yaml) and the paper's 71M model (configs/llama_71m.yaml) at a CPU batch.
    "tiny": dict(hidden=128, ffn=344, layers=4, heads=4, vocab=4096, seq=128, batch=16),
    "71m": dict(hidden=512, ffn=1368, layers=12, heads=8, vocab=32000, seq=256, batch=2),
}


def measure(shape: dict, rounds: int, warmup: int) -> dict[str, float]:
    """Median tokens/s of one training step (forward, backward, Adam) of each model, alternating."""
    import torch

    from megatron_mixln import ModelConfig, build_model
    from megatron_mixln.model import causal_lm_loss
    from megatron_mixln.model.hf_format import to_hf_llama

    config = ModelConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                         num_layers=shape["layers"], num_heads=shape["heads"], max_seq_len=shape["seq"])
    ours = build_model(config, seed=0)
    models = {"megatron_mixln": ours, "transformers": to_hf_llama(config, ours.state_dict())}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-4) for name, m in models.items()}
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=generator)
    labels = torch.cat([inputs[:, 1:], torch.full((shape["batch"], 1), -100)], dim=1)

    def step(name: str) -> float:
        model, optimizer = models[name], optimizers[name]
        started = time.perf_counter()
        logits = model(inputs) if name == "megatron_mixln" else model(input_ids=inputs).logits
        causal_lm_loss(logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    for _ in range(warmup):
        for name in models:
            step(name)
    times = {name: [] for name in models}
    for round_index in range(rounds):
        order = list(models) if round_index % 2 == 0 else list(reversed(models))  # alternate who goes first
        for name in order:
            times[name].append(step(name))
    tokens = shape["batch"] * shape["seq"]
    return {name: tokens / statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mixln-bench hf", description=__doc__)
    parser.add_argument("--presets", default="tiny,71m", help=f"comma-separated, from {', '.join(PRESETS)} "
                                                              "(default tiny,71m)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per model (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    args = parser.parse_args(argv)
    names = [name for name in args.presets.split(",") if name]
    unknown = [name for name in names if name not in PRESETS]
    if unknown:
        parser.error(f"unknown preset {unknown[0]!r}: choose from {', '.join(PRESETS)}")
    import torch  # after parsing: --help and usage errors need no torch

    print(f"CPU eager training step (forward, backward, Adam), fp32, {torch.get_num_threads()} threads, "
          f"{args.rounds} alternating rounds, median")
    print("| preset | hidden x layers, vocab, batch x seq | megatron_mixln tok/s | transformers tok/s | ratio |")
    print("|---|---|---|---|---|")
    for name in names:
        shape = PRESETS[name]
        speed = measure(shape, args.rounds, args.warmup)
        ratio = speed["megatron_mixln"] / speed["transformers"]
        print(f"| {name} | {shape['hidden']} x {shape['layers']}, {shape['vocab']}, {shape['batch']} x {shape['seq']} "
              f"| {speed['megatron_mixln']:,.0f} | {speed['transformers']:,.0f} | {ratio:.3f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
