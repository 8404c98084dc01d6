"""Console entry points: mixln-train, mixln-prepare, mixln-eval, mixln-export, mixln-bench."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is meant for the user: printed as one line, no stack trace."""
    from megatron_mixln.config import ConfigError
    from megatron_mixln.data import DataError
    from megatron_mixln.parallel.launch import LaunchError
    from megatron_mixln.train.checkpoint import CheckpointError

    return (ConfigError, DataError, CheckpointError, LaunchError)


def _run(main, argv) -> int:
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        # Say "CPU" up front, so DeepSpeed does not warn on every start that it found no GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        return main(argv) or 0
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. model.norm_placement=mix train.steps=100")
    return parser


def _train(argv) -> int:
    from megatron_mixln.config import load_config
    from megatron_mixln.train.loop import NonFiniteError, train

    parser = _config_parser("mixln-train", "Pre-train a LLaMA model with the configured normalisation placement.")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model on the meta device, print parameter counts and per-rank memory, exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="processes to plan for with --dry-run (default: one node, --gpus-per-node)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node for --dry-run (default 8)")
    args = parser.parse_intermixed_args(argv)
    config = load_config(args.config, args.overrides)
    try:
        if args.dry_run:
            from megatron_mixln.train.memory import dry_run_report

            print(dry_run_report(config, args.world_size or args.gpus_per_node, args.gpus_per_node))
            return 0
        result = train(config)
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    rank0 = not os.environ.get("RANK") or os.environ.get("RANK") == "0"
    if result.stop_signal is not None:
        from megatron_mixln.train.signals import EXIT_RESUMABLE

        if rank0:
            print(f"stopped by {result.stop_signal} after step {result.last_step} with a checkpoint in "
                  f"{result.out_dir / 'checkpoints'}; run the same command again to resume (train.resume=auto); "
                  f"exit code {EXIT_RESUMABLE}")
        return EXIT_RESUMABLE
    if not rank0 or result.already_finished:
        return 0
    if result.stopped_early:
        print(f"stopped after step {result.last_step} (train.stop_after_step); resume with train.resume=auto")
    elif result.eval_loss is None:
        print(f"done: step {result.last_step} (no held-out data, no evaluation); metrics in "
              f"{result.out_dir / 'metrics.jsonl'}, weights in {result.export_dir}")
    else:
        print(f"done: step {result.last_step}, eval loss {result.eval_loss:.4f}, "
              f"eval perplexity {math.exp(min(result.eval_loss, 700)):.2f}; "
              f"metrics in {result.out_dir / 'metrics.jsonl'}, curve in {result.out_dir / 'loss_curve.png'}, "
              f"weights in {result.export_dir}")
    return 0


def _prepare(argv) -> int:
    from megatron_mixln.config import load_config
    from megatron_mixln.data import prepare_dataset, train_limits

    parser = _config_parser("mixln-prepare", "Tokenise what a config's run reads once into memory-mapped token "
                                             "files, in the folder mixln-train with the same config then finds.")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    folder = prepare_dataset(config.data, limits=train_limits(config), num_proc=config.data.num_proc or None)
    meta = json.loads((Path(folder) / "meta.json").read_text())
    print(f"prepared {folder}: " + ", ".join(f"{k}={v}" for k, v in meta.items() if not isinstance(v, (dict, list))))
    return 0


def _export(argv) -> int:
    from megatron_mixln.config import config_from_dict
    from megatron_mixln.train import checkpoint as ckpt
    from megatron_mixln.train import export

    parser = argparse.ArgumentParser(prog="mixln-export", description=(
        "Write a consolidated export (safetensors shards under HF LLaMA names, see docs/method.md#parameter-names, "
        "+ config.json) from a checkpoint."))
    parser.add_argument("checkpoint", help="a run folder (its latest checkpoint) or a checkpoint folder")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--hf", action="store_true",
                        help="write a Hugging Face LlamaForCausalLM folder instead (Pre-LN models only)")
    args = parser.parse_args(argv)
    folder = Path(args.checkpoint)
    if (folder / ckpt.CHECKPOINTS).is_dir():
        folder = ckpt.latest_checkpoint(folder) or folder
    state_path = folder / ckpt.STATE_FILE
    if not state_path.is_file():
        raise ckpt.CheckpointError(f"{folder} is neither a run folder with checkpoints nor a checkpoint folder "
                                   f"(no {ckpt.STATE_FILE}).")
    state = json.loads(state_path.read_text())
    run_config = config_from_dict(state["config"])
    if args.hf:
        from megatron_mixln.model.hf import save_hf_pretrained

        save_hf_pretrained(run_config.model, ckpt.module_state_from_checkpoint(folder), args.out)
        print(f"exported step {state['step']} to {args.out} (Hugging Face LlamaForCausalLM format)")
        return 0
    out = export.export_consolidated(ckpt.module_state_from_checkpoint(folder), run_config.model, args.out,
                                   extra={"step": state["step"], "run_config": state["config"]})
    print(f"exported step {state['step']} to {out}")
    return 0


def _eval(argv) -> int:
    import torch

    from megatron_mixln.config import config_from_dict, parse_overrides
    from megatron_mixln.data import eval_batches, open_datasets
    from megatron_mixln.data.sampling import eval_indices
    from megatron_mixln.train import checkpoint as ckpt
    from megatron_mixln.train import export
    from megatron_mixln.train.step import loss_sum

    parser = argparse.ArgumentParser(prog="mixln-eval", description="Held-out loss and perplexity of an exported model.")
    parser.add_argument("export", help="an export folder (safetensors shards + index + config.json)")
    parser.add_argument("overrides", nargs="*", help="data.* / train.eval_sequences=... overrides of the run's config")
    args = parser.parse_args(argv)
    config_path = Path(args.export) / export.EXPORT_CONFIG
    run_config = json.loads(config_path.read_text()).get("run_config") if config_path.is_file() else None
    if run_config is None:
        raise ckpt.CheckpointError(f"{args.export} holds no run_config: export it with mixln-train or mixln-export.")
    for section, values in parse_overrides(args.overrides).items():
        run_config.setdefault(section, {}).update(values)
    config = config_from_dict(run_config)
    model = export.load_exported_model(args.export)
    _, _, eval_data = open_datasets(config)
    indices = eval_indices(len(eval_data), config.train.eval_sequences)
    count = int(eval_data.target_counts(indices).sum())
    if count == 0:
        raise ckpt.CheckpointError(f"{args.export}: its run's held-out split has no sequences to evaluate; "
                                   "pass a data source with held-out text, e.g. data.eval_fraction=0.05.")
    total = loss_sum(model, eval_batches(eval_data, len(indices), config.train.micro_batch_size),
                     torch.device("cpu")).item()
    loss = total / count
    print(json.dumps({"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700)), "sequences": len(indices),
                      "tokens": count}))
    return 0


def _bench(argv) -> int:
    parser = argparse.ArgumentParser(prog="mixln-bench", description="Benchmarks (scripts that print a table).")
    parser.add_argument("what", choices=["hf", "kernels", "parallel", "export-memory", "tokenize"],
                        help="hf: our model vs transformers' LLaMA; kernels: Triton kernels; "
                             "parallel: DP / TP / PP / TP x PP on this machine; "
                             "export-memory: host memory per rank of the consolidated export; "
                             "tokenize: data preparation throughput per process count")
    args, rest = parser.parse_known_args(argv)
    if args.what == "hf":
        from megatron_mixln.benchmarks.model_vs_hf import main
    elif args.what == "export-memory":
        from megatron_mixln.benchmarks.export_memory import main
    elif args.what == "parallel":
        from megatron_mixln.benchmarks.parallel import main
    elif args.what == "tokenize":
        from megatron_mixln.benchmarks.tokenize import main
    else:
        from megatron_mixln.kernels.bench import main
    return main(rest)


def train_main() -> None:
    sys.exit(_run(_train, sys.argv[1:]))


def prepare_main() -> None:
    sys.exit(_run(_prepare, sys.argv[1:]))


def export_main() -> None:
    sys.exit(_run(_export, sys.argv[1:]))


def eval_main() -> None:
    sys.exit(_run(_eval, sys.argv[1:]))


def bench_main() -> None:
    sys.exit(_run(_bench, sys.argv[1:]))
