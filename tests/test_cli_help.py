"""The console scripts as a cluster user first meets them: `--help` at once with each command's own options, and
start-up mistakes (a Triton run on a CPU node, an unreachable Hugging Face hub) as one `error:` line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
# Each takes seconds to import on a cold file system; none is needed to print a command's options.
HEAVY = {"torch", "deepspeed", "transformers", "datasets", "triton"}

COMMANDS = {  # command line (before --help): options its help must list
    "mixln-train": ["config", "overrides", "--dry-run", "--world-size", "--gpus-per-node"],
    "mixln-prepare": ["config", "overrides"],
    "mixln-finetune": ["config", "overrides", "--dry-run", "--world-size", "--gpus-per-node"],
    "mixln-eval": ["export", "overrides", "--tasks", "--limit", "--num-fewshot", "--batch-size", "--dtype", "--out"],
    "mixln-export": ["checkpoint", "out", "--force", "--hf", "--tokenizer"],
    "mixln-import": ["hf_folder", "out", "--force"],
    "mixln-bench": ["NAME", "hf:", "kernels:", "train:", "parallel:", "export-memory:", "tokenize:", "harness:"],
    "mixln-bench harness": ["--config", "--requests", "--batch-size", "--device", "--dtype", "--rounds"],
    "mixln-bench hf": ["--presets", "--rounds", "--warmup"],
    "mixln-bench kernels": ["--ops", "--tokens", "--dtype", "--providers", "--compile-report"],
    "mixln-bench train": ["--models", "--placements", "--kernels", "--executions", "--losses", "--steps", "--json"],
    "mixln-bench parallel": ["--nproc", "--config", "--steps", "--warmup"],
    "mixln-bench tokenize": ["--num-proc", "--tokenizer", "--source", "--shards", "--repeat"],
    "mixln-bench export-memory": ["--config", "--nproc", "--only"],
    "mixln-compare": ["runs", "--json"],
    "mixln-analyze": ["runs", "--out", "--force", "--data", "--sequences", "--steps", "--device"],
    "mixln-study": ["out", "--force", "--placements", "--inits", "--seeds", "--jobs", "--sweep-lrs", "overrides"],
    "mixln-preflight": ["config", "overrides", "--tiny", "--steps", "--message-mib", "--write-mib", "--min-busbw"],
}


def imported_modules(importtime_stderr: str) -> set[str]:
    """Top-level packages named in `python -X importtime` output ("import time: self | cumulative | name")."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_the_commands_own_options_without_importing_torch(command):
    script, *sub = command.split()
    proc = subprocess.run([sys.executable, "-X", "importtime", str(BIN / script), *sub, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {command} ")
    for option in COMMANDS[command]:
        assert option in proc.stdout, option
    modules = imported_modules(proc.stderr)
    assert "megatron_mixln" in modules  # the check sees the package's own imports
    assert not modules & HEAVY, sorted(modules & HEAVY)


def test_bench_help_of_a_benchmark_is_its_own_not_the_dispatchers():
    proc = subprocess.run([str(BIN / "mixln-bench"), "hf", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "NAME" not in proc.stdout and "--presets" in proc.stdout


def test_bench_usage_errors_are_the_benchmarks_own_and_need_no_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", str(BIN / "mixln-bench"), "kernels", "--bogus"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "mixln-bench kernels: error: unrecognized arguments: --bogus" in proc.stderr
    assert not imported_modules(proc.stderr) & HEAVY


def test_triton_kernels_on_a_cpu_node_fail_in_one_line_before_any_data_work(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    proc = subprocess.run([str(BIN / "mixln-train"), "configs/tiny.yaml", "model.kernels=triton",
                           f"train.out_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: model.kernels='triton' is invalid here: no CUDA device and TRITON_INTERPRET is not set; "
        "use auto or torch on CPU."]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # refused before tokenising


# HF_HUB_OFFLINE set, or the network out of reach (HF_ENDPOINT on a closed local port refuses at once; unset, the
# hub would be retried 5 times per file over 23 s, each try logged).
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
UNREACHABLE = {"HF_ENDPOINT": "http://127.0.0.1:9"}


@pytest.mark.parametrize("override, expected", [
    ("data.tokenizer=t5-base", "error: data.tokenizer='t5-base' could not be loaded: the Hugging Face hub is out of "
                               "reach ({reason}) and 't5-base' is not in its local cache; pass a local folder, a "
                               ".model or tokenizer.json file, or bpe."),
    ("data.source=c4", "error: data.source='c4' streams allenai/c4 from the Hugging Face hub, which is out of reach "
                       "({reason}): point data.source at a local copy (hf:PATH[:CONFIG], e.g. hf:/data/c4:en, or a "
                       ".jsonl/.txt file or folder) or use embedded."),
])
@pytest.mark.parametrize("network, reason", [
    (OFFLINE, "HF_HUB_OFFLINE is set"),
    (UNREACHABLE, "http://127.0.0.1:9 is unreachable: [Errno 111] Connection refused"),
], ids=["offline-mode", "unreachable"])
def test_hub_out_of_reach_is_one_error_line_without_retry_noise(tmp_path, override, expected, network, reason):
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}  # conftest sets offline
    env.update(network, HF_HOME=str(tmp_path / "hf"), PYTHONWARNINGS="ignore")  # an empty cache
    proc = subprocess.run([str(BIN / "mixln-prepare"), "configs/tiny.yaml", override,
                           f"data.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [expected.format(reason=reason)]


def test_a_cached_hub_tokenizer_still_loads_when_the_hub_is_out_of_reach(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from megatron_mixln.data.tokenizers import train_bpe

    # A hub cache as huggingface_hub lays it out: refs/main names the snapshot holding the files.
    trained = train_bpe(["the cat sat on the mat"] * 20 + ["hello world"] * 20, 300, save_dir=tmp_path / "bpe")
    repo = tmp_path / "hf" / "hub" / "models--mixln-test--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "bpe" / "tokenizer.json"), eos_token="<eos>",
                            pad_token="<pad>").save_pretrained(snapshot)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(UNREACHABLE, HF_HOME=str(tmp_path / "hf"), PYTHONWARNINGS="ignore")
    code = ("from megatron_mixln.data.tokenizers import load_tokenizer\n"
            "t = load_tokenizer('mixln-test/tiny')\nprint(t.vocab_size, t.eos_id, t.encode('the cat'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    vocab_size, eos_id, ids = proc.stdout.split(maxsplit=2)
    assert (int(vocab_size), int(eos_id)) == (trained.vocab_size, trained.eos_id)
    assert ids.strip() == str(trained.encode("the cat"))
    assert "Retrying" not in proc.stderr
