"""Benchmark: multiple-choice scoring through lm-evaluation-harness, our `mixln` LM vs lm-eval's own `hf` backend on
the same model's --hf export, side by side in one process.

A random-init model of `--config` (default the paper's 130M), a byte-level BPE trained on the shipped corpus, and a
generated local task of `--requests` / 4 items with 4 continuations each (passages of the shipped corpus). Both
backends get the same loaded tasks, batch size, device and dtype; each is timed on the whole evaluation after an
untimed warm-up, and the per-request log-likelihoods are compared. Run: `mixln-bench harness [--requests 1000]`.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

CHOICES = 4


def write_task(folder: Path, texts: list[str], items: int, seed: int = 0) -> Path:
    """A local multiple-choice task: a passage's first 30-60 words as the context, its next 8 words and the next 8
    words of three other passages as the choices."""
    rng = random.Random(seed)
    passages = [text.split() for text in texts if len(text.split()) >= 80]
    rows = []
    for index in range(items):
        words = passages[index % len(passages)]
        cut = rng.randint(30, 60)
        others = rng.sample([p for p in passages if p is not words], CHOICES - 1)
        choices = [" " + " ".join(words[cut:cut + 8])] + [" " + " ".join(p[cut:cut + 8]) for p in others]
        order = list(range(CHOICES))
        rng.shuffle(order)
        rows.append({"context": " ".join(words[:cut]), "choices": [choices[i] for i in order],
                     "answer": order.index(0)})
    (folder / "bench_mc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    yaml = folder / "bench_mc.yaml"
    yaml.write_text("task: mixln_bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                    "    test: bench_mc.jsonl\noutput_type: multiple_choice\ntest_split: test\ndoc_to_text: context\n"
                    "doc_to_choice: choices\ndoc_to_target: answer\ntarget_delimiter: \"\"\nmetric_list:\n"
                    "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                    "metadata:\n  version: 1.0\n", encoding="utf-8")
    return yaml


def prepare(folder: Path, config_path: str, overrides: list[str], items: int, bpe_vocab: int):
    """The export, the --hf export and the task YAML in `folder`."""
    import gzip

    from megatron_mixln import build_model
    from megatron_mixln.config import load_config
    from megatron_mixln.data.sources import EMBEDDED_CORPUS
    from megatron_mixln.data.tokenizers import train_bpe
    from megatron_mixln.hf_interop import export_hf
    from megatron_mixln.train.export import export_consolidated

    config = load_config(config_path, overrides)
    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as stream:
        texts = [json.loads(line)["text"] for line in stream]
    tokenizer = train_bpe(texts, min(bpe_vocab, config.model.vocab_size), save_dir=folder / "prepared")
    meta = {"tokenizer": "bpe", "folder": str(folder / "prepared"), "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id}
    model = build_model(config.model, seed=0)
    export = export_consolidated(model.state_dict(), config.model, folder / "export", extra={"step": 0, "data": meta})
    del model
    export_hf(export, folder / "hf")
    return config, export, folder / "hf", write_task(folder, texts, items)


def per_request(results) -> list[float]:
    return [float(response[0][0]) for sample in results["samples"]["mixln_bench_mc"] for response in sample["resps"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mixln-bench harness", description=__doc__)
    parser.add_argument("--config", default="configs/llama_130m.yaml", help="model config (default the 130M's)")
    parser.add_argument("overrides", nargs="*", help="model.*=... overrides, e.g. model.num_layers=4")
    parser.add_argument("--requests", type=int, default=1000, help="multiple-choice requests, 4 per item "
                                                                   "(default 1000)")
    parser.add_argument("--batch-size", type=int, default=16, help="requests per forward, both backends (default 16)")
    parser.add_argument("--device", default=None, help="default: cuda when there is a GPU, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--rounds", type=int, default=1, help="timed evaluations per backend, alternating who "
                                                               "goes first; the fastest counts (default 1)")
    parser.add_argument("--bpe-vocab", type=int, default=8192, help="tokenizer size (default 8192)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds={args.rounds} is invalid: expected an integer >= 1")
    if args.requests < CHOICES or args.requests % CHOICES:
        parser.error(f"--requests={args.requests} is invalid: expected a positive multiple of {CHOICES}")
    import torch  # after parsing: --help and usage errors need no torch
    from lm_eval.models.huggingface import HFLM

    from megatron_mixln.harness.command import _torch_dtype, resolve_tasks, simple_evaluate
    from megatron_mixln.harness.lm import MixLNLM, model_scorer, run_tokenizer
    from megatron_mixln.train.export import model_with_weights
    from megatron_mixln.train.weights import read_weights

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _torch_dtype(args.dtype, device)
    with tempfile.TemporaryDirectory(prefix="mixln-bench-harness-") as tmp:
        config, export, hf_folder, task = prepare(Path(tmp), args.config, args.overrides, args.requests // CHOICES,
                                                  args.bpe_vocab)
        weights = read_weights(export)
        model = model_with_weights(weights.model_config, weights.tensors, export, device)
        backends = {
            "megatron_mixln (mixln)": MixLNLM(model_scorer(model, dtype), run_tokenizer(weights),
                                              config.model.max_seq_len, args.batch_size, disable_tqdm=True),
            "lm-eval hf": HFLM(pretrained=str(hf_folder), trust_remote_code=True, dtype=dtype, device=device,
                               batch_size=args.batch_size, max_length=config.model.max_seq_len),
        }
        for lm in backends.values():
            simple_evaluate(lm, resolve_tasks([str(task)]), limit=2)  # warm-up: kernels, allocator, caches
        seconds, scores, accuracy = {name: [] for name in backends}, {}, {}
        for round_index in range(args.rounds):
            # Alternating who goes first, so a change in the machine's load hits both alike.
            for name in (list(backends) if round_index % 2 == 0 else list(reversed(backends))):
                tasks = resolve_tasks([str(task)])
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                started = time.perf_counter()
                results = simple_evaluate(backends[name], tasks, log_samples=True)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds[name].append(time.perf_counter() - started)
                scores[name] = per_request(results)
                accuracy[name] = results["results"]["mixln_bench_mc"]["acc,none"]
        seconds = {name: min(times) for name, times in seconds.items()}
    ours, theirs = scores.values()
    worst = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(ours, theirs))
    m = config.model
    print(f"{args.requests} multiple-choice requests ({args.requests // CHOICES} items x {CHOICES}), "
          f"{m.hidden_size} x {m.num_layers} {m.norm_placement} model, vocab {m.vocab_size}, {device}, {dtype}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} CPU threads; whole lm-eval evaluation timed, "
          f"fastest of {args.rounds}")
    print("| backend | seconds | requests/s | accuracy |")
    print("|---|---|---|---|")
    for name in backends:
        print(f"| {name} | {seconds[name]:.2f} | {args.requests / seconds[name]:,.1f} | {accuracy[name]:.3f} |")
    ratio = seconds["lm-eval hf"] / seconds["megatron_mixln (mixln)"]
    print(f"speed ratio (ours / hf, requests per second): {ratio:.2f}x; largest per-request log-likelihood "
          f"difference {worst:.1e} (relative)")
    return 0
