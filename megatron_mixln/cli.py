"""Console entry points: mixln-train, mixln-prepare, mixln-eval, mixln-export, mixln-import, mixln-bench,
mixln-analyze, mixln-preflight.

Every command parses its arguments before importing torch, DeepSpeed, transformers or datasets (seconds each on a
cold cluster file system), so `--help` and usage errors answer at once.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

# mixln-bench NAME: (module whose main(argv) runs it, what it measures). Each module parses its own options
# before importing torch, so `mixln-bench NAME --help` is instant too.
BENCHMARKS = {
    "hf": ("megatron_mixln.benchmarks.model_vs_hf", "our model vs transformers' LLaMA"),
    "kernels": ("megatron_mixln.kernels.bench", "Triton kernels vs PyTorch, torch.compile, Liger, apex"),
    "train": ("megatron_mixln.benchmarks.train_throughput", "training tokens/s, step time, peak memory and MFU"),
    "parallel": ("megatron_mixln.benchmarks.parallel", "DP / TP / PP / TP x PP on this machine"),
    "export-memory": ("megatron_mixln.benchmarks.export_memory", "host memory per rank of the consolidated export"),
    "tokenize": ("megatron_mixln.benchmarks.tokenize", "data preparation throughput per process count"),
    "harness": ("megatron_mixln.benchmarks.harness", "lm-eval multiple-choice scoring: mixln vs lm-eval's hf backend"),
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is meant for the user: printed as one line, no stack trace."""
    from megatron_mixln.config import ConfigError
    from megatron_mixln.data.errors import DataError
    from megatron_mixln.output_folder import OutputFolderError
    from megatron_mixln.parallel.launch import LaunchError
    from megatron_mixln.saved_files import CheckpointError
    from megatron_mixln.storage import StorageError

    return (CheckpointError, ConfigError, DataError, LaunchError, OutputFolderError, StorageError)


def _run(main, argv) -> int:
    """Run a command; user errors become one `error:` line and exit status 2. Each command parses its arguments
    before it imports torch, so --help answers at once."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    joined_before = _in_process_group()
    try:
        status = main(argv) or 0
    except Exception as err:  # not `except _user_errors()`: that would import them on argparse's SystemExit too
        from megatron_mixln.storage import storage_error

        # A full, read-only or forbidden folder that no code path named: still one line and exit 2, not exit 1.
        err = storage_error(err, "a file operation") or err
        if not isinstance(err, _user_errors()):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2  # maybe raised on this rank alone: leaving the group could wait on peers that never come
    if _in_process_group() and not joined_before:
        from megatron_mixln.train.engine import leave_process_group

        leave_process_group()  # only now: every rank returns together; after an error, a peer may be waiting
    return status


def _in_process_group() -> bool:
    dist = sys.modules.get("torch.distributed")  # never imports torch for --help
    return dist is not None and dist.is_available() and dist.is_initialized()


def _asks_for_help(argv) -> bool:
    options = argv[:argv.index("--")] if "--" in argv else argv
    return "-h" in options or "--help" in options


def _select_accelerator() -> None:
    """On a machine without a GPU, say "CPU" to DeepSpeed up front, so it does not warn on every start that it found
    none. Imports torch, so commands call it after parsing their arguments."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def _config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*",
                        help="section.field=value, e.g. model.norm_placement=mix train.steps=100")
    return parser


def _train_parser() -> argparse.ArgumentParser:
    parser = _config_parser("mixln-train", "Pre-train a LLaMA model with the configured normalisation placement.")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model on the meta device, print parameter counts and per-rank memory "
                             "(model states and activations), exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="processes to plan for with --dry-run (default: one node, --gpus-per-node)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node for --dry-run (default 8)")
    return parser


def _train(argv) -> int:
    args = _train_parser().parse_intermixed_args(argv)
    from megatron_mixln.config import load_config

    config = load_config(args.config, args.overrides)
    _select_accelerator()
    if args.dry_run:
        from megatron_mixln.train.memory import dry_run_report

        print(dry_run_report(config, args.world_size or args.gpus_per_node, args.gpus_per_node))
        return 0
    from megatron_mixln.model.ops import check_backend
    from megatron_mixln.train.loop import NonFiniteError, train

    # Here, before the data is prepared (hours for C4), not only at model build after it.
    check_backend(config.model.kernels)
    try:
        result = train(config)
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    rank0 = not os.environ.get("RANK") or os.environ.get("RANK") == "0"
    if result.stop_signal is not None:
        import signal

        from megatron_mixln.train.signals import EXIT_RESUMABLE

        # The checkpoint is saved and this process is on its way out with 75. On several nodes, srun
        # --kill-on-bad-exit sends SIGTERM to the others as soon as the first one exits: it must not turn their 75
        # into 143 while they leave the process group (a hung exit still gets SLURM's SIGKILL after KillWait).
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
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


def _prepare_parser() -> argparse.ArgumentParser:
    return _config_parser("mixln-prepare", "Tokenise what a config's run reads once into memory-mapped token "
                                           "files, in the folder mixln-train with the same config then finds.")


def _prepare(argv) -> int:
    args = _prepare_parser().parse_args(argv)
    from megatron_mixln.config import load_config
    from megatron_mixln.data import prepare_dataset, train_limits

    config = load_config(args.config, args.overrides)
    folder = prepare_dataset(config.data, limits=train_limits(config), num_proc=config.data.num_proc or None)
    meta = json.loads((Path(folder) / "meta.json").read_text())
    print(f"prepared {folder}: " + ", ".join(f"{k}={v}" for k, v in meta.items() if not isinstance(v, (dict, list))))
    return 0


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixln-export", description=(
        "Write a consolidated export (safetensors shards under HF LLaMA names, see docs/method.md#parameter-names, "
        "+ config.json) from a checkpoint of any layout (tp x pp x dp) and ZeRO stage. Weights only: the export "
        "a run writes itself (train.stop_after_step) also carries the optimiser state."))
    parser.add_argument("checkpoint", help="a run folder (its latest checkpoint, else its export), a checkpoint "
                                           "folder or an export folder")
    parser.add_argument("out", help="folder to write: a new or empty one, or an earlier export of the same kind")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT even when it holds other files (never when it is, holds or is inside the "
                             "input)")
    parser.add_argument("--hf", action="store_true",
                        help="write a Hugging Face folder with the run's tokenizer instead: LlamaForCausalLM for "
                             "Pre-LN, any other placement with its modeling file (trust_remote_code=True)")
    parser.add_argument("--tokenizer", metavar="SPEC",
                        help="with --hf: the tokenizer to carry, as data.tokenizer takes it (default: the run's)")
    return parser


def _export(argv) -> int:
    args = _export_parser().parse_args(argv)  # before the imports: --help needs no torch
    _select_accelerator()
    if args.hf:
        import warnings

        from megatron_mixln.hf_interop import export_hf

        with warnings.catch_warnings():  # the missing tokenizer is said below, in one line
            warnings.simplefilter("ignore")
            done = export_hf(args.checkpoint, args.out, tokenizer=args.tokenizer, force=args.force)
        if done.tokenizer_problem is not None:
            print(f"warning: {args.out} has no tokenizer: {done.tokenizer_problem}; pass --tokenizer SPEC (as "
                  "data.tokenizer takes it) to add one.", file=sys.stderr)
        print(f"exported step {done.step} to {args.out} (Hugging Face: {done.format}"
              + (", with its tokenizer)" if done.tokenizer_problem is None else ")"))
        return 0
    from megatron_mixln.output_folder import check_output_folder
    from megatron_mixln.train.export import EXPORT_OUTPUT, export_consolidated
    from megatron_mixln.train.weights import read_weights

    check_output_folder(args.out, EXPORT_OUTPUT, [args.checkpoint], args.force)  # before the (slow) read
    weights = read_weights(args.checkpoint)  # a checkpoint's are merged over TP, PP and ZeRO partitions
    extra = {"step": weights.step, "data": weights.data_meta, "run_config": weights.run_config}  # as a run's export
    out = export_consolidated(weights.tensors, weights.model_config, args.out, extra=extra, force=args.force)
    print(f"exported step {weights.step} to {out}")
    return 0


def _import_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixln-import", description=(
        "Turn a Hugging Face LLaMA folder (LlamaForCausalLM, or a mixln-export --hf folder) into a consolidated "
        "export, to train from with model.init_from=OUT (or train.resume=OUT) in any parallel layout."))
    parser.add_argument("hf_folder", help="a transformers model folder: config.json and safetensors (or "
                                          "pytorch_model.bin) weights")
    parser.add_argument("out", help="export folder to write: a new or empty one, or an earlier export")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT even when it holds other files (never when it is, holds or is inside "
                             "HF_FOLDER)")
    return parser


def _import(argv) -> int:
    args = _import_parser().parse_args(argv)  # before the imports: --help needs no torch
    _select_accelerator()
    from megatron_mixln.hf_interop import import_hf

    out, model_config, kind = import_hf(args.hf_folder, args.out, force=args.force)
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    has_tokenizer = any((Path(args.hf_folder) / name).is_file() for name in tokenizer_files)
    print(f"imported {args.hf_folder} ({kind}, {model_config.num_layers} layers, norm_placement="
          f"{model_config.norm_placement}) to {out}; train from it with model.init_from={out}"
          + (f" and data.tokenizer={args.hf_folder}" if has_tokenizer else ""))
    return 0


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixln-eval", description="Held-out loss and perplexity of a model; with --tasks, lm-evaluation-harness "
                                       "tasks instead (docs/evaluation.md).")
    parser.add_argument("export", help="an export folder, a mixln-export --hf folder, a run folder (its export, else "
                                       "its latest checkpoint) or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", help="data.* / train.eval_sequences=... overrides of the run's config "
                                                     "(held-out loss only)")
    tasks = parser.add_argument_group("lm-evaluation-harness tasks")
    tasks.add_argument("--tasks", help="comma-separated lm-eval task, group or tag names (e.g. arc_easy,hellaswag) "
                                       "and/or task YAML files or folders")
    tasks.add_argument("--limit", type=float, default=None,
                       help="at most this many documents per task (a fraction of each task below 1)")
    tasks.add_argument("--num-fewshot", type=int, default=None, help="examples in each prompt (default: the task's)")
    tasks.add_argument("--batch-size", type=int, default=16, help="requests per forward (default 16)")
    tasks.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto: bfloat16 on a GPU, float32 on the CPU")
    tasks.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: cuda when there is a GPU)")
    tasks.add_argument("--out", default=None, help="folder for results.json and table.md (default: "
                                                    "RUN/downstream/step_N, a new one for each evaluation)")
    tasks.add_argument("--log-samples", action="store_true", help="keep every request and response in results.json")
    tasks.add_argument("--force", action="store_true", help="replace --out even when it holds other files")
    return parser


def _eval(argv) -> int:
    parser = _eval_parser()
    args = parser.parse_args(argv)
    if args.tasks is None:
        task_only = [f"--{name.replace('_', '-')}" for name in ("limit", "num_fewshot", "out") if getattr(args, name)]
        if task_only:
            parser.error(f"{', '.join(task_only)} only apply with --tasks")
    elif args.overrides:
        parser.error(f"overrides ({' '.join(args.overrides)}) apply to the held-out loss, not to --tasks")
    _select_accelerator()
    if args.tasks is not None:
        from megatron_mixln.harness.command import evaluate_source

        done = evaluate_source(args.export, args.tasks.split(","), args.limit, args.num_fewshot, args.batch_size,
                               args.dtype, args.device, args.out, args.log_samples, args.force)
        print(done.table)
        print(f"results: {done.out / 'results.json'}")
        return 0
    import copy

    import torch

    from megatron_mixln.config import config_from_dict, parse_overrides
    from megatron_mixln.data import eval_batches, open_datasets
    from megatron_mixln.data.sampling import eval_indices
    from megatron_mixln.saved_files import CheckpointError
    from megatron_mixln.train.export import model_with_weights
    from megatron_mixln.train.step import loss_sum
    from megatron_mixln.train.weights import is_export, read_weights

    source = Path(args.export)
    if is_export(source / "export"):  # a run folder: the export it ended with, as mixln-analyze reads it
        source = source / "export"
    weights = read_weights(source)
    if weights.run_config is None:
        raise CheckpointError(f"{source} holds no run_config (the data and sequence length to evaluate on): "
                                   "export it with mixln-train, mixln-export or mixln-export --hf.")
    run_config = copy.deepcopy(weights.run_config)  # the overrides change a copy
    for section, values in parse_overrides(args.overrides).items():
        run_config.setdefault(section, {}).update(values)
    config = config_from_dict(run_config)
    model = model_with_weights(weights.model_config, weights.tensors, source)
    _, _, eval_data = open_datasets(config)
    indices = eval_indices(len(eval_data), config.train.eval_sequences)
    count = int(eval_data.target_counts(indices).sum())
    if count == 0:
        raise CheckpointError(f"{source}: its run's held-out split has no sequences to evaluate; "
                                   "pass a data source with held-out text, e.g. data.eval_fraction=0.05.")
    total = loss_sum(model, eval_batches(eval_data, len(indices), config.train.micro_batch_size),
                     torch.device("cpu")).item()
    loss = total / count
    print(json.dumps({"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700)), "sequences": len(indices),
                      "tokens": count}))
    return 0


def _steps_list(text: str) -> list[int]:
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        steps = []
    if not steps or any(step < 0 for step in steps):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of steps, e.g. 100,1000,5000")
    return steps


def _analyze_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixln-analyze", description=(
        "The paper's analyses of one or more runs (docs/method.md#analyses): angular distance between layers, "
        "the held-out loss with each layer removed, gradient norm by depth and the loss curves (with the loss-spike "
        "guard's events marked), the stability telemetry (train.telemetry_every) by layer and step "
        "(docs/stability.md), as PNG figures, analysis.json and report.md; several runs are overlaid in each figure."))
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a run folder (its export, else its latest checkpoint), an export folder (mixln-export, "
                             "with or without --hf) or a checkpoint folder")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for the figures, analysis.json, report.md: a new or empty one, or an earlier "
                             "analysis (replaced whole)")
    parser.add_argument("--force", action="store_true",
                        help="replace DIR even when it holds other files (never when it is, holds or is inside a RUN)")
    parser.add_argument("--data", metavar="SOURCE",
                        help="held-out text instead of each run's own eval split: a data.source (a local file or "
                             "folder is used whole; c4 / hf:NAME give their validation split), encoded with the "
                             "run's tokenizer")
    parser.add_argument("--sequences", type=int, metavar="N",
                        help="held-out sequences to evaluate on (default: the run's train.eval_sequences)")
    parser.add_argument("--steps", type=_steps_list, metavar="S1,S2,...",
                        help="steps of the gradient-norm-by-depth profiles (default: a few spread over training)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--batch-size", type=int, metavar="B",
                        help="sequences per forward pass (default: the run's train.micro_batch_size)")
    parser.add_argument("--labels", type=lambda text: text.split(","), metavar="L1,L2,...",
                        help="the runs' names in the figures, one per run in order (a label holds no comma; "
                             "default: placement, alpha and seed, e.g. 'Mix-LN (α=0.25), seed 1')")
    return parser


def _analyze(argv) -> int:
    args = _analyze_parser().parse_args(argv)  # before the imports: --help and usage errors need no torch
    for name in ("sequences", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            from megatron_mixln.config import ConfigError

            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: expected a positive "
                              "integer.")
    _select_accelerator()
    from megatron_mixln.analysis import report

    numbers = report(args.runs, args.out, data=args.data, sequences=args.sequences, steps=args.steps,
                     device=args.device, batch_size=args.batch_size, labels=args.labels, force=args.force)
    for note in numbers["notes"]:
        print(f"note: {note}")
    print(f"wrote {Path(args.out) / 'report.md'}, {Path(args.out) / 'analysis.json'} and "
          f"{len(numbers['figures'])} figures")
    return 0


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {'integer' if kind is int else 'number'}")
        return value
    return parse


def _preflight_parser() -> argparse.ArgumentParser:
    parser = _config_parser("mixln-preflight", (
        "Check a machine or an allocation before a run, under the same launcher and config as mixln-train: each "
        "rank's device, all-reduce bus bandwidth, the Triton kernels, train.out_dir (shared, free space, write "
        "speed), data.cache_dir (shared), and a few steps of the tiny config in this layout against one process. "
        "Prints a table (ok / WARN / FAIL per line); exit 1 when a line says FAIL (docs/preflight.md)."))
    parser.add_argument("--tiny", default=str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"),
                        metavar="YAML",
                        help="the small config the layout check trains (default: the repository's configs/tiny.yaml)")
    parser.add_argument("--steps", type=_positive(int), default=3, help="training steps of that check (default 3)")
    parser.add_argument("--message-mib", type=_positive(float), metavar="MIB",
                        help="all-reduce message size (default 256 MiB on GPUs, 16 on CPU)")
    parser.add_argument("--write-mib", type=_positive(float), metavar="MIB",
                        help="what each host writes to time train.out_dir (default 1024 MiB on GPUs, 64 on CPU)")
    parser.add_argument("--min-busbw", type=float, default=0.0, metavar="GBPS",
                        help="WARN when an all-reduce's bus bandwidth is below this, in GB/s (default 0: report only)")
    return parser


def _preflight(argv) -> int:
    args = _preflight_parser().parse_intermixed_args(argv)
    from megatron_mixln.config import load_config

    config = load_config(args.config, args.overrides)
    _select_accelerator()
    from megatron_mixln.preflight import run

    return run(config, args.tiny, args.steps, args.message_mib, args.write_mib, args.min_busbw)


def _bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixln-bench", description="Benchmarks (scripts that print a table); "
                                     "`mixln-bench NAME --help` lists a benchmark's own options.")
    parser.add_argument("what", choices=list(BENCHMARKS), metavar="NAME",
                        help="; ".join(f"{name}: {about}" for name, (_, about) in BENCHMARKS.items()))
    options = parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options")
    options.required = False  # else a bare `mixln-bench` says "required: NAME, options", but options may be empty
    return parser


def _bench(argv) -> int:
    args = _bench_parser().parse_args(argv)
    module_name = BENCHMARKS[args.what][0]
    if args.what == "kernels":
        # Importing megatron_mixln.kernels defines every Triton kernel (torch and triton, seconds): parse with
        # bench.py's own parser, loaded from its file alone, first, so --help and usage errors skip that.
        _standalone_module(module_name).parse_args(args.options)
    if not _asks_for_help(args.options):
        _select_accelerator()
    return importlib.import_module(module_name).main(args.options)


def _standalone_module(name: str):
    """Module `name` of megatron_mixln.kernels executed from its file without importing the package (which defines
    every Triton kernel); its own imports must be light."""
    from megatron_mixln import KERNELS_FOLDER

    leaf = name.removeprefix("megatron_mixln.kernels.")
    spec = importlib.util.spec_from_file_location(f"_mixln_standalone_{leaf}", Path(KERNELS_FOLDER) / f"{leaf}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_main() -> None:
    sys.exit(_run(_train, sys.argv[1:]))


def prepare_main() -> None:
    sys.exit(_run(_prepare, sys.argv[1:]))


def export_main() -> None:
    sys.exit(_run(_export, sys.argv[1:]))


def import_main() -> None:
    sys.exit(_run(_import, sys.argv[1:]))


def eval_main() -> None:
    sys.exit(_run(_eval, sys.argv[1:]))


def bench_main() -> None:
    sys.exit(_run(_bench, sys.argv[1:]))


def analyze_main() -> None:
    sys.exit(_run(_analyze, sys.argv[1:]))


def preflight_main() -> None:
    sys.exit(_run(_preflight, sys.argv[1:]))
