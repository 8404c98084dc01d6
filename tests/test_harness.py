"""mixln-eval --tasks through lm-evaluation-harness: per-request log-likelihoods of the shipped local tasks against
a float64 computation with our model and against lm-eval's own `hf` backend on the --hf export (Pre-LN and Mix-LN),
the context/continuation boundary, the command end to end, task resolution's errors, and a TP2 checkpoint."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from megatron_mixln import ModelConfig, build_model  # noqa: E402
from megatron_mixln.data.errors import DataError  # noqa: E402
from megatron_mixln.data.tokenizers import load_tokenizer, train_bpe  # noqa: E402
from megatron_mixln.harness import TASKS_FOLDER  # noqa: E402
from megatron_mixln.harness.command import evaluate_source, resolve_tasks, simple_evaluate, task_manager  # noqa: E402
from megatron_mixln.harness.lm import MixLNLM, harness_tokenizer, model_scorer, run_tokenizer  # noqa: E402
from megatron_mixln.hf_interop import export_hf  # noqa: E402
from megatron_mixln.train import export  # noqa: E402
from megatron_mixln.train.weights import read_weights  # noqa: E402

MC = str(TASKS_FOLDER / "mixln_tiny_mc.yaml")
PPL = str(TASKS_FOLDER / "mixln_tiny_ppl.yaml")
# max_seq_len 64: the multiple-choice requests fit whole, three perplexity documents need several windows.
TINY = dict(vocab_size=320, hidden_size=48, intermediate_size=136, num_layers=4, num_heads=4, max_seq_len=64)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained BPE (300 tokens) and, per placement, a random model (gains too) as a consolidated export
    (data metadata naming the BPE) and as its --hf export."""
    from test_data import embedded_texts

    root = tmp_path_factory.mktemp("harness")
    train_bpe(embedded_texts(120), 300, save_dir=root / "prepared")
    tokenizer = load_tokenizer(str(root / "prepared" / "tokenizer.json"))
    meta = {"tokenizer": "bpe", "folder": str(root / "prepared"), "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id}
    runs = {}
    for seed, placement in enumerate(("pre", "mix")):
        config = ModelConfig(**TINY, norm_placement=placement, **({"mix_alpha": 0.5} if placement == "mix" else {}))
        model = build_model(config, seed=seed).eval()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # gains of one would hide a norm applied with the wrong weight
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=generator))
        source = export.export_consolidated(model.state_dict(), config, root / placement / "export",
                                            extra={"step": 5, "data": meta})
        export_hf(source, root / placement / "hf")
        runs[placement] = {"export": source, "hf": root / placement / "hf", "model": model}
    return {"tokenizer": tokenizer, "runs": runs}


def lm_of(source, batch_size=8):
    weights = read_weights(source)
    model = export.model_with_weights(weights.model_config, weights.tensors, source)
    return MixLNLM(model_scorer(model, torch.float32), run_tokenizer(weights), weights.model_config.max_seq_len,
                   batch_size, disable_tqdm=True)


def per_request(results) -> dict:
    """(task, doc_id, request index) -> (arguments, (log-likelihood, greedy or None)) from log_samples."""
    out = {}
    for task, samples in results["samples"].items():
        for sample in samples:
            for index, (arguments, response) in enumerate(zip(sample["arguments"], sample["resps"])):
                value = response[0]
                pair = (float(value[0]), bool(value[1])) if isinstance(value, (tuple, list)) else (float(value), None)
                out[task, int(sample["doc_id"]), index] = (tuple(arguments), pair)
    return out


def accuracies(results) -> dict:
    return {task: {k: v for k, v in metrics.items() if k.startswith("acc") and "stderr" not in k}
            for task, metrics in results["results"].items()}


# ------------------------------------------------------------------------------------------------
# The independent reference: float64, whole-vocabulary log-softmax, lm-eval's tokenisation written out again
# ------------------------------------------------------------------------------------------------
def float64_logprob(model, context_ids, continuation_ids, max_length):
    """Summed log-probability of `continuation_ids` after `context_ids`, keeping the last max_length + 1 tokens."""
    tokens = (list(context_ids) + list(continuation_ids))[-(max_length + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).double()
    logprobs = F.log_softmax(logits[0], -1)
    n = len(continuation_ids)
    positions = range(len(tokens) - 1 - n, len(tokens) - 1)
    return sum(logprobs[p, tokens[p + 1]].item() for p in positions)


def joint_split(tokenizer, context, continuation):
    """lm-eval's boundary: the context's trailing spaces belong to the continuation, and the continuation's tokens
    are those of the whole text after the context's."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tokenizer.encode(stripped + continuation)
    context_ids = tokenizer.encode(stripped)
    return context_ids, whole[len(context_ids):]


def rolling_reference(model, tokenizer, text, max_length):
    """A document's log-likelihood: its tokens in chunks of max_length predictions, the first after the eos token,
    each later one read with the max_length tokens before its last token (lm-eval's disjoint rolling windows)."""
    ids = tokenizer.encode(text)
    total, done = 0.0, 0
    while done < len(ids):
        end = min(done + max_length, len(ids))
        context = ([tokenizer.eos_id] + ids)[max(0, end - max_length):done + 1] if done == 0 else \
            ids[max(0, end - max_length - 1):done]
        total += float64_logprob(model, context, ids[done:end], max_length)
        done = end
    return total


def test_loglikelihoods_equal_a_float64_computation_with_our_model(runs):
    source, model = runs["runs"]["mix"]["export"], runs["runs"]["mix"]["model"]
    tokenizer = runs["tokenizer"]
    results = simple_evaluate(lm_of(source), resolve_tasks([MC, PPL]), log_samples=True)
    reference_model = model.double()
    try:
        compared = {"mixln_tiny_mc": 0, "mixln_tiny_ppl": 0}
        for (task, _, _), (arguments, (ours, _)) in per_request(results).items():
            if task == "mixln_tiny_mc":
                expected = float64_logprob(reference_model, *joint_split(tokenizer, *arguments), 64)
            else:
                expected = rolling_reference(reference_model, tokenizer, arguments[0], 64)
            assert abs(ours - expected) <= 1e-5 * abs(expected), (task, arguments, ours, expected)
            compared[task] += 1
    finally:
        model.float()
    assert compared == {"mixln_tiny_mc": 80, "mixln_tiny_ppl": 10}
    # Three documents need several windows (one more than three), so the rolling path was exercised.
    lengths = [len(tokenizer.encode(json.loads(line)["text"]))
               for line in (TASKS_FOLDER / "tiny_ppl.jsonl").read_text().splitlines()]
    assert sum(length > 64 for length in lengths) >= 3 and max(lengths) > 3 * 64


@pytest.mark.parametrize("placement,ours_from", [("pre", "export"), ("mix", "hf")])
def test_lm_eval_hf_backend_on_the_export_gives_the_same_scores(runs, placement, ours_from):
    run = runs["runs"][placement]
    ours = simple_evaluate(lm_of(run[ours_from]), resolve_tasks([MC, PPL]), log_samples=True)
    from lm_eval import evaluator

    theirs = evaluator.simple_evaluate(
        model="hf", model_args=f"pretrained={run['hf']},trust_remote_code=True,dtype=float32", device="cpu",
        batch_size=8, tasks=resolve_tasks([MC, PPL]), log_samples=True, bootstrap_iters=0,
        task_manager=task_manager(False))  # not lm-eval's whole registry: seconds to index
    ours_requests, their_requests = per_request(ours), per_request(theirs)
    assert ours_requests.keys() == their_requests.keys() and len(ours_requests) == 90
    for key, (arguments, (ours_ll, ours_greedy)) in ours_requests.items():
        their_arguments, (their_ll, their_greedy) = their_requests[key]
        assert arguments == their_arguments
        assert abs(ours_ll - their_ll) <= 1e-4 * max(1.0, abs(their_ll)), (key, ours_ll, their_ll)
        assert ours_greedy == their_greedy
    assert accuracies(ours)["mixln_tiny_mc"] == accuracies(theirs)["mixln_tiny_mc"]
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert math.isclose(ours["results"]["mixln_tiny_ppl"][metric], theirs["results"]["mixln_tiny_ppl"][metric],
                            rel_tol=1e-4)


def test_context_continuation_boundary_is_lm_evals_not_the_naive_split(runs):
    source, model = runs["runs"]["mix"]["export"], runs["runs"]["mix"]["model"]
    tokenizer = runs["tokenizer"]
    lm = lm_of(source)
    context, continuation = "Question: What colour is a clear sky at noon?\nAnswer: ", "blue"
    naive = (tokenizer.encode(context), tokenizer.encode(continuation))
    joint = joint_split(tokenizer, context, continuation)
    assert naive[0] + naive[1] != joint[0] + joint[1]  # the byte-level BPE merges the space into " blue"
    assert lm._encode_pair(context, continuation) == joint
    request = Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)
    (ours, _), = lm.loglikelihood([request], disable_tqdm=True)
    with torch.no_grad():
        expected = float64_logprob(model.double(), *joint, 64)
        naive_value = float64_logprob(model, *naive, 64)
        model.float()
    assert abs(ours - expected) <= 1e-5 * abs(expected)
    assert abs(ours - naive_value) > 1e-2  # the naive split would give another score
    # Every shipped multiple-choice request with a context ending in a space takes the same path.
    ended_in_space = [json.loads(line) for line in (TASKS_FOLDER / "tiny_mc_test.jsonl").read_text().splitlines()
                      if json.loads(line)["question"].endswith(" ")]
    assert len(ended_in_space) >= 5


def test_special_tokens_follow_the_exports_transformers_tokenizer(runs):
    """A tokenizer that adds bos (as LLaMA's does) adds it in our requests too, and bos becomes the prefix."""
    tokenizer = runs["tokenizer"]
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(runs["runs"]["mix"]["hf"]) / "tokenizer.json"),
                                                eos_token="<eos>", bos_token="<pad>")
    from tokenizers import processors

    fast.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<pad> $A", special_tokens=[
        ("<pad>", tokenizer.pad_id)])
    harness = harness_tokenizer(tokenizer, fast)
    assert harness.added_before == (tokenizer.pad_id,) and harness.added_after == ()
    assert harness.prefix_token_id == tokenizer.pad_id
    assert harness.encode("Hello there") == fast("Hello there")["input_ids"]
    plain = harness_tokenizer(tokenizer, transformers.AutoTokenizer.from_pretrained(str(runs["runs"]["mix"]["hf"])))
    assert (plain.added_before, plain.added_after, plain.prefix_token_id) == ((), (), tokenizer.eos_id)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(runs):
    model, tokenizer = runs["runs"]["mix"]["model"], runs["tokenizer"]
    lm = lm_of(runs["runs"]["mix"]["export"])
    context = "The capital of France is"
    request = Instance(request_type="generate_until", doc={}, arguments=(context, {"until": ["e"], "max_gen_toks": 8}),
                       idx=0)
    (ours,) = lm.generate_until([request], disable_tqdm=True)
    ids, new = tokenizer.encode(context), []
    with torch.no_grad():
        for _ in range(8):
            token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if token == tokenizer.eos_id:
                break
            new.append(token)
            if "e" in tokenizer.decode(new):
                break
    assert ours == tokenizer.decode(new).split("e")[0]
    assert "e" not in ours


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------
def mixln_eval(argv, capsys):
    from megatron_mixln import cli

    status = cli._run(cli._eval, argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_mixln_eval_writes_lm_evals_results_and_table_and_never_clobbers(runs, tmp_path, capsys):
    source = runs["runs"]["pre"]["export"]
    status, out, err = mixln_eval([str(source), "--tasks", f"{MC},{PPL}", "--limit", "6", "--num-fewshot", "1",
                                   "--batch-size", "4"], capsys)
    assert status == 0, err
    written = source.with_name("export-downstream") / "step_5"
    results = json.loads((written / "results.json").read_text())
    assert results["n-shot"] == {"mixln_tiny_mc": 1, "mixln_tiny_ppl": 1}
    assert results["n-samples"]["mixln_tiny_mc"]["effective"] == 6
    assert "acc,none" in results["results"]["mixln_tiny_mc"] and "samples" not in results
    table = (written / "table.md").read_text()
    assert table in out and "mixln_tiny_mc" in table and "word_perplexity" in table
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert header == ["Tasks", "Version", "Filter", "n-shot", "Metric", "", "Value", "", "Stderr"]  # lm-eval's own
    first = (written / "results.json").read_bytes()
    status, out, err = mixln_eval([str(source), "--tasks", MC, "--limit", "2"], capsys)
    assert status == 0, err
    assert (written / "results.json").read_bytes() == first  # the second evaluation went to a new folder
    assert json.loads((written.with_name("step_5.2") / "results.json").read_text())["n-shot"] == {"mixln_tiny_mc": 0}
    # A folder holding other files is refused, in one line, exit status 2.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    status, out, err = mixln_eval([str(source), "--tasks", MC, "--out", str(tmp_path / "mine")], capsys)
    assert status == 2 and err.count("\n") == 1 and "holds other files (notes.txt)" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_registry_tasks_offline_and_unknown_names_are_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"task 'arc_easy' needs its dataset from the Hugging Face hub, which is out "
                                        r"of reach .*dataset_path: json.*data_files.*docs/evaluation\.md"):
        resolve_tasks(["arc_easy"])
    with pytest.raises(DataError, match=r"'arc_esy', which is neither a task in lm-eval's registry \(close matches: "
                                        r"arc_easy"):
        resolve_tasks(["arc_esy"])
    with pytest.raises(DataError, match=r"task file 'missing/tiny\.yaml' does not exist"):
        resolve_tasks(["missing/tiny.yaml"])


@pytest.mark.slow  # a two-process training run
def test_a_tp2_checkpoint_scores_as_its_export(tmp_path):
    from training_runs import run_processes, tiny

    out = tmp_path / "tp2"
    ranks = run_processes(2, tiny(tmp_path / "cache", out, "parallel.tp=2"), tmp_path)
    assert all("error" not in rank for rank in ranks), ranks
    checkpoint = next(p for p in sorted((out / "checkpoints").iterdir()) if p.is_dir())
    scores = {}
    for name, source in (("checkpoint", checkpoint), ("export", out / "export")):
        results = evaluate_source(source, [MC], limit=8, out=tmp_path / f"scores-{name}", log_samples=True)
        scores[name] = per_request(results.results)
    assert read_weights(checkpoint).step == read_weights(out / "export").step
    assert scores["checkpoint"].keys() == scores["export"].keys() and len(scores["export"]) == 32
    for key, (arguments, (ll, greedy)) in scores["export"].items():
        assert scores["checkpoint"][key][0] == arguments
        assert abs(scores["checkpoint"][key][1][0] - ll) <= 1e-5 * abs(ll)
