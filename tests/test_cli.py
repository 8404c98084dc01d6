"""The console scripts as a user runs them: one-line errors, train -> export -> eval round trip."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


def run(tool, *args, cwd=ROOT):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(BIN / tool), *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=600)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_bad_override_exits_2_with_one_error_line_and_no_traceback():
    proc = run("mixln-train", "configs/tiny.yaml", "model.norm_placement=middle")
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [
        "error: model.norm_placement='middle' is invalid: expected one of pre, post, mix, deepnorm, sandwich, lns, "
        "peri, hybrid, hybrid_star."]
    assert "Traceback" not in proc.stderr


def test_missing_data_file_is_named(tmp_path):
    proc = run("mixln-train", "configs/tiny.yaml", f"data.source={tmp_path / 'nope.jsonl'}",
               f"train.out_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 2
    [line] = error_lines(proc.stderr)
    assert "nope.jsonl" in line and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_train_export_eval_round_trip(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = ["model.vocab_size=320", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
              "model.num_heads=2", "data.max_train_documents=100", "data.max_eval_documents=10",
              "data.bpe_vocab_size=300", "data.seq_len=32", "model.max_seq_len=32", f"data.cache_dir={cache}"]
    proc = run("mixln-train", "configs/tiny.yaml", *common, "train.steps=3", "train.global_batch_size=2",
               "train.micro_batch_size=2", "train.eval_sequences=4", f"train.out_dir={out}", "train.eval_every=0",
               "train.save_every=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "eval perplexity" in proc.stdout
    final_eval = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]

    exported = tmp_path / "exported"
    proc = run("mixln-export", out, exported)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (exported / "model.safetensors.index.json").is_file()

    proc = run("mixln-eval", exported)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["eval_loss"] == pytest.approx(final_eval["eval_loss"], rel=1e-5)

    proc = run("mixln-export", out, tmp_path / "hf", "--hf")  # Mix-LN: the folder carries its own modeling file
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trust_remote_code=True, with its tokenizer)" in proc.stdout  # tests/test_hf.py loads such folders
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mixln_llama"
    assert (tmp_path / "hf" / "modeling_mixln.py").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()

    proc = run("mixln-export", tmp_path / "nothing-here", tmp_path / "x")
    assert proc.returncode == 2 and "nothing-here" in error_lines(proc.stderr)[0]
