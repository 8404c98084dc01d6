"""Supervised fine-tuning (data.format instruction / chat, mixln-finetune): the prompt's tokens carry no target and
response tokens weigh as in pre-training (against float64 by hand), padding and packing keep each mask, target
counts come from offsets alone, bad files get one sentence with their dropped counts, a fine-tune of a tiny
pre-trained export resumes exactly, matches one process in TP2 / PP2 / DP2, and its export loads."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_mixln.config import ConfigError, load_config
from megatron_mixln.data import DataError, open_datasets, prepare_dataset
from megatron_mixln.data.instructions import ALPACA_PROMPT_NO_INPUT, prompt_token_count, render_example
from megatron_mixln.data.sampling import IGNORE_INDEX, GlobalBatchSampler, SequenceDataset, collate
from megatron_mixln.data.token_files import TokenFile
from megatron_mixln.train.loop import train
from training_runs import ROOT, result_summary, train_one_after_another, tiny

SAMPLE = ROOT / "megatron_mixln" / "data" / "assets" / "alpaca_sample.jsonl"
TEMPLATE = "Q: {instruction}\n{input}\nA:\n"  # short, so that the tiny model's 64 tokens hold most examples
PRETRAIN_EXTRA = ["model.max_seq_len=64"]  # the fine-tune reads 64-token sequences; model fields must match


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny Mix-LN run pre-trained 6 steps on the embedded text: (its export, its BPE tokenizer.json)."""
    root = tmp_path_factory.mktemp("pretrained")
    config = load_config(None, tiny(root / "cache", root / "run", *PRETRAIN_EXTRA))
    train(config)
    (tokenizer,) = (root / "cache").glob("*/tokenizer.json")
    return root / "run" / "export", tokenizer


def finetune_overrides(pretrained, cache, out, *extra) -> list[str]:
    export, tokenizer = pretrained
    return [*tiny(cache, out, *PRETRAIN_EXTRA), f"data.source={SAMPLE}", "data.format=instruction",
            f"data.prompt_template={TEMPLATE}", f"data.tokenizer={tokenizer}", "data.seq_len=64",
            "data.max_train_documents=-1", "data.eval_fraction=0.1", f"model.init_from={export}", *extra]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def prepared(pretrained, tmp_path, *extra):
    config = load_config(None, finetune_overrides(pretrained, tmp_path / "cache", tmp_path / "out", *extra))
    meta, train_data, eval_data = open_datasets(config, progress=False)
    return config, meta, train_data


# ---------------------------------------------------------------- the mask


def test_alpaca_prompt_is_the_standard_one_with_and_without_input():
    config = load_config(None, ["data.format=instruction"]).data
    prompt, response = render_example({"instruction": "Name a colour.", "input": "", "output": "Red."}, config)
    assert prompt == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                      "the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n") == \
        ALPACA_PROMPT_NO_INPUT.format(instruction="Name a colour.")
    assert response == "Red."
    prompt, _ = render_example({"instruction": "Add.", "input": "1 and 2", "output": "3"}, config)
    assert prompt.endswith("### Instruction:\nAdd.\n\n### Input:\n1 and 2\n\n### Response:\n")
    chat = load_config(None, ["data.format=chat"]).data
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye"}]
    prompt, response = render_example({"messages": messages}, chat)
    assert prompt == ("### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello\n\n### User:\nBye\n\n"
                      "### Assistant:\n") and response == "Goodbye"


def test_prompt_count_is_the_common_prefix_when_the_tokenizer_merges_across_the_boundary():
    assert prompt_token_count([5, 6, 7], [5, 6, 7, 8, 9]) == (3, False)
    # "A: " + "18" -> " 18" as one token: the merged token holds response text and stays a target.
    assert prompt_token_count([5, 6, 7], [5, 6, 11, 9]) == (2, True)


def test_hand_built_masks_in_padding_and_packing(tmp_path):
    """Two documents written by hand, [10 11 | 12 13 eos] and [20 21 22 | eos] (prompt | response), in 4-token
    sequences: every label and every target count, spelled out."""
    folder = tmp_path / "prepared"
    folder.mkdir()
    tokens = np.array([10, 11, 12, 13, 1, 20, 21, 22, 1], dtype=np.uint16)
    (folder / "meta.json").write_text(json.dumps({"dtype": "uint16"}))
    tokens.tofile(folder / "train.tokens")
    np.save(folder / "train.offsets.npy", np.array([0, 5, 9], dtype=np.int64))
    np.save(folder / "train.prompt_lengths.npy", np.array([2, 3], dtype=np.int64))
    x = IGNORE_INDEX
    padded = SequenceDataset(TokenFile(folder, "train"), 4, "document", pad_id=0)
    assert [padded[i][0].tolist() for i in range(2)] == [[10, 11, 12, 13], [20, 21, 22, 1]]
    assert [padded[i][1].tolist() for i in range(2)] == [[x, 12, 13, x], [x, x, 1, x]]  # 13 -> eos is cut off
    assert padded.target_counts([0, 1]).tolist() == [2, 1]
    packed = SequenceDataset(TokenFile(folder, "train"), 4, "packed", pad_id=0)
    assert [packed[i][0].tolist() for i in range(2)] == [[10, 11, 12, 13], [1, 20, 21, 22]]
    assert [packed[i][1].tolist() for i in range(2)] == [[x, 12, 13, 1], [x, x, x, 1]]
    assert packed.target_counts([0, 1]).tolist() == [3, 1]


def test_masks_cover_exactly_the_prompt_in_padding_and_packing(pretrained, tmp_path):
    config, meta, documents = prepared(pretrained, tmp_path, "data.mode=document")
    folder = Path(meta["folder"])
    token_file = TokenFile(folder, "train")
    prompts = token_file.prompt_lengths
    assert prompts is not None and len(prompts) == token_file.num_documents == meta["splits"]["train"]["documents"]
    from megatron_mixln.data import prepared_tokenizer

    tokenizer = prepared_tokenizer(folder)
    records = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    texts = {render_example(r, config.data)[0] + render_example(r, config.data)[1] for r in records}
    # Padding: one example per sequence, pad after it, targets exactly its response tokens and eos.
    for index in range(len(documents)):
        document = token_file.document(int(documents.document_index[index]))
        prompt = int(prompts[documents.document_index[index]])
        inputs, labels = documents[index]
        n = min(len(document), config.data.seq_len)
        assert np.array_equal(inputs[:n], document[:n]) and (inputs[n:] == meta["pad_id"]).all()
        expected = np.full(config.data.seq_len, IGNORE_INDEX)
        expected[prompt - 1:n - 1] = document[prompt:n]
        assert np.array_equal(labels, expected)
        assert tokenizer.decode(document[:-1].tolist()) in texts  # prompt + response, eos after it
        assert document[-1] == meta["eos_id"]
        assert tokenizer.decode(document[:prompt].tolist()).endswith("\nA:\n")  # the mask ends at the template's end
    assert np.array_equal(documents.target_counts(np.arange(len(documents))),
                          [(documents[i][1] != IGNORE_INDEX).sum() for i in range(len(documents))])
    # Packing: examples back to back; a target is kept exactly where it is not a prompt token.
    packed = SequenceDataset(token_file, config.data.seq_len, "packed", meta["pad_id"])
    in_prompt = np.zeros(token_file.num_tokens, dtype=bool)
    for start, prompt in zip(token_file.offsets[:-1], prompts):
        in_prompt[start:start + prompt] = True
    seq = config.data.seq_len
    for index in range(len(packed)):
        inputs, labels = packed[index]
        stream = np.asarray(token_file.tokens[index * seq:index * seq + seq + 1], dtype=np.int64)
        assert np.array_equal(inputs, stream[:-1])
        assert np.array_equal(labels, np.where(in_prompt[index * seq + 1:index * seq + seq + 1], IGNORE_INDEX,
                                               stream[1:]))
    assert len(packed) >= 3
    assert np.array_equal(packed.target_counts(np.arange(len(packed))),
                          [(packed[i][1] != IGNORE_INDEX).sum() for i in range(len(packed))])


def test_a_token_merged_across_the_boundary_stays_a_target(pretrained, tmp_path):
    """A template ending in "A: " lets the byte-level BPE merge the space with the response's first characters: the
    mask then stops before that token (the common prefix), and the document is still the whole text's own
    tokenisation; without a merge it covers exactly the prompt's tokens."""
    _, meta, _ = prepared(pretrained, tmp_path, "data.prompt_template=Q: {instruction} {input}\nA: ")
    from megatron_mixln.data import prepared_tokenizer

    tokenizer = prepared_tokenizer(meta["folder"])
    merged = 0
    for split in ("train", "eval"):
        token_file = TokenFile(meta["folder"], split)
        for index in range(token_file.num_documents):
            document, prompt = token_file.document(index).tolist(), int(token_file.prompt_lengths[index])
            text = tokenizer.decode(document[:-1])
            assert tokenizer.encode(text) == document[:-1]  # the canonical tokenisation of the whole text
            prompt_ids = tokenizer.encode(text[:text.rindex("\nA: ") + 4])
            if document[:len(prompt_ids)] == prompt_ids:
                assert prompt == len(prompt_ids)
            else:
                merged += 1
                assert document[:prompt] == prompt_ids[:prompt] and document[prompt] != prompt_ids[prompt]
                assert tokenizer.decode(document[prompt:prompt + 1]).startswith(" ")  # holds the response's start
    assert merged == sum(counts["merged_boundaries"] for counts in meta["examples"]) > 0


def _float64_response_loss(model, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over response targets of -log p(target), everything in float64."""
    with torch.no_grad():
        logits = model.double()(inputs).double()
    keep = labels != IGNORE_INDEX
    log_probs = torch.log_softmax(logits[keep], dim=-1)
    return float(-log_probs.gather(1, labels[keep][:, None]).sum() / keep.sum())


@pytest.mark.parametrize("mode", ["document", "packed"])
def test_first_step_loss_is_the_float64_response_only_loss(pretrained, tmp_path, mode):
    """The trainer's step-1 loss equals a float64 mean over response tokens of the initial model (the export), and
    differs from the same mean over every token: prompt tokens contribute nothing, responses weigh as in
    pre-training."""
    from megatron_mixln.train.export import model_with_weights, read_export

    overrides = finetune_overrides(pretrained, tmp_path / "cache", tmp_path / "out", f"data.mode={mode}",
                                   "train.steps=1", "train.global_batch_size=4", "train.micro_batch_size=2")
    config = load_config(None, overrides)
    result = result_summary(train(config))
    _, train_data, _ = open_datasets(config, progress=False)
    indices = GlobalBatchSampler(len(train_data), 4, config.train.seed).global_indices(0)
    inputs, labels = collate(train_data, indices)
    model_config, tensors = read_export(pretrained[0])
    model = model_with_weights(model_config, tensors, pretrained[0])
    expected = _float64_response_loss(model, inputs, labels)
    assert result["losses"]["1"] == pytest.approx(expected, rel=2e-6, abs=0)
    # The same mean over every next token (prompts included) is another number: the mask is what made it equal.
    unmasked = labels.clone()
    next_is_text = inputs[:, 1:] != train_data.pad_id
    unmasked[:, :-1] = torch.where((labels[:, :-1] == IGNORE_INDEX) & next_is_text, inputs[:, 1:], labels[:, :-1])
    assert (unmasked != IGNORE_INDEX).sum() > 2 * (labels != IGNORE_INDEX).sum()
    assert abs(_float64_response_loss(model, inputs, unmasked) - expected) > 1e-3


def test_prompt_positions_get_no_gradient(pretrained, tmp_path):
    """The model's own summed loss equals the float64 sum over response targets, and its gradient with respect to
    the logits of every prompt (and padding) position is exactly zero."""
    from megatron_mixln.train.export import model_with_weights, read_export

    _, _, train_data = prepared(pretrained, tmp_path, "data.mode=document")
    inputs, labels = collate(train_data, [0, 1, 2])
    model_config, tensors = read_export(pretrained[0])
    model = model_with_weights(model_config, tensors, pretrained[0]).double()
    logits = model(inputs).double().detach().requires_grad_(True)
    keep = labels != IGNORE_INDEX
    loss = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
    loss.backward()
    prompt_positions = ~keep & (inputs != train_data.pad_id)
    assert prompt_positions.sum() > keep.sum()  # most of each sequence is prompt
    assert (logits.grad[~keep] == 0).all() and (logits.grad[keep].abs().sum(-1) > 0).all()
    with torch.no_grad():
        assert model(inputs, labels).item() == pytest.approx(loss.item(), rel=1e-10)


def test_chat_records_train_on_the_last_assistant_message_only(pretrained, tmp_path):
    records = [{"messages": [{"role": "user", "content": f"{x}+{x}"},
                             {"role": "assistant", "content": f"{2 * x}"},
                             {"role": "user", "content": "x2"},
                             {"role": "assistant", "content": f"{4 * x}"}]} for x in range(12)]
    source = write_jsonl(tmp_path / "chat.jsonl", records)
    _, meta, documents = prepared(pretrained, tmp_path, f"data.source={source}", "data.format=chat",
                                  "data.eval_fraction=0", "data.mode=document")
    from megatron_mixln.data import prepared_tokenizer

    tokenizer = prepared_tokenizer(meta["folder"])
    answers = []
    for index in range(len(documents)):
        inputs, labels = documents[index]
        text = tokenizer.decode(inputs[inputs != meta["pad_id"]].tolist())
        assert text.count("### Assistant:\n") == 2 and text.endswith("<eos>")
        answers.append(tokenizer.decode(labels[labels != IGNORE_INDEX].tolist()))
    assert sorted(answers) == sorted(f"{4 * x}<eos>" for x in range(12))


def test_hub_names_read_the_same_examples_as_the_local_file(pretrained, tmp_path):
    """hf:NAME goes through datasets.load_dataset(NAME) like a hub dataset; here NAME is a local folder holding the
    sample as its train split, and the prepared tokens and prompt lengths equal those of the file itself."""
    import shutil

    folder = tmp_path / "hub_copy"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "train.jsonl")
    splits = {}
    for name, source in (("file", SAMPLE), ("hub", f"hf:{folder}")):
        config = load_config(None, finetune_overrides(pretrained, tmp_path / "cache", tmp_path / "out",
                                                      f"data.source={source}", "data.eval_fraction=0"))
        splits[name] = TokenFile(prepare_dataset(config.data, progress=False), "train")
    assert splits["file"].num_documents == splits["hub"].num_documents > 30
    assert np.array_equal(splits["file"].tokens, splits["hub"].tokens)
    assert np.array_equal(splits["file"].prompt_lengths, splits["hub"].prompt_lengths)


# ---------------------------------------------------------------- bad files


def test_dropped_records_get_one_sentence_per_file_with_counts(pretrained, tmp_path, capsys):
    good = {"instruction": "Add the two numbers.", "input": "1 and 2", "output": "1 + 2 = 3"}
    records = [good] * 6 + [{"instruction": "Say hi.", "input": ""}, {"instruction": "Say hi.", "output": "  "},
                            {"instruction": "Say hi.", "output": ""}, {"instruction": "x " * 60, "output": "ok"}]
    source = write_jsonl(tmp_path / "mixed.jsonl", records)
    config = load_config(None, finetune_overrides(pretrained, tmp_path / "cache", tmp_path / "out",
                                                  f"data.source={source}", "data.eval_fraction=0"))
    folder = prepare_dataset(config.data, progress=False)
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note: dropped")]
    assert notes == [f"note: dropped 4 of 10 records of {str(source)!r}: 1 has no `output` field, 2 have an empty "
                     "`output`, 1 prompt fills data.seq_len=64 tokens, leaving no response token."]
    assert TokenFile(folder, "train").num_documents == 6


def test_bad_files_are_refused_in_one_sentence(pretrained, tmp_path):
    def refusal(records, *extra):
        source = write_jsonl(tmp_path / f"bad{len(list(tmp_path.iterdir()))}.jsonl", records)
        config = load_config(None, finetune_overrides(pretrained, tmp_path / "cache", tmp_path / "out",
                                                      f"data.source={source}", "data.eval_fraction=0", *extra))
        with pytest.raises(DataError) as caught:
            prepare_dataset(config.data, progress=False)
        message = str(caught.value)
        assert "\n" not in message and message.endswith(".")
        return message, source

    message, source = refusal([{"text": "a document"}, {"text": "another", "url": "u"}])
    assert message == (f"{str(source)!r} does not hold data.format=instruction records: none of its 2 records has "
                       "`instruction` and `output` (its fields are `text`, `url`); set data.instruction_field / "
                       "data.input_field / data.output_field to its field names, or data.format=text for plain "
                       "documents.")
    message, source = refusal([{"instruction": "Say hi.", "output": ""}, {"instruction": "y " * 80, "output": "ok"}])
    assert message == (f"data.source={str(source)!r} has no usable training example: dropped 2 of 2 records of "
                       f"{str(source)!r}: 1 has an empty `output`, 1 prompt fills data.seq_len=64 tokens, leaving no "
                       "response token.")
    message, _ = refusal([{"messages": [{"role": "user", "content": "Hi"}]},
                          {"messages": [{"role": "robot", "content": "Hi"}]}, {"messages": [{"role": "assistant"}]}],
                         "data.format=chat")
    assert "dropped 3 of 3 records" in message and "2 have a `messages` that is not a list of {role, content} " \
        "messages with roles system, user, assistant" in message and "1 has no assistant message" in message


def test_finetune_command_refuses_a_config_that_is_not_a_fine_tune(tmp_path, capsys):
    from megatron_mixln.cli import _run
    from megatron_mixln.finetune.command import _finetune

    assert _run(_finetune, [str(ROOT / "configs" / "tiny.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error: model.init_from=None is invalid for mixln-finetune")
    assert _run(_finetune, [str(ROOT / "configs" / "finetune" / "tiny_alpaca.yaml"), "data.format=text"]) == 2
    assert "data.format='text' is invalid for mixln-finetune" in capsys.readouterr().err
    assert _run(_finetune, [str(ROOT / "configs" / "finetune" / "tiny_alpaca.yaml"), "data.tokenizer=bpe"]) == 2
    assert "data.tokenizer='bpe' is invalid for mixln-finetune" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="data.format='json' is invalid"):
        load_config(None, ["data.format=json"])
    with pytest.raises(ConfigError, match="data.prompt_template="):
        load_config(None, ["data.prompt_template=Q: {question}"])


# ---------------------------------------------------------------- training


def test_finetune_resumes_exactly_and_its_export_loads(pretrained, tmp_path):
    from megatron_mixln.cli import _run
    from megatron_mixln.finetune.command import _finetune
    from megatron_mixln.train.export import model_with_weights, read_export

    overrides = finetune_overrides(pretrained, tmp_path / "cache", tmp_path / "straight", "data.mode=packed")
    config_path = ROOT / "configs" / "finetune" / "tiny_alpaca.yaml"
    assert _run(_finetune, [str(config_path), *overrides]) == 0  # the command itself, on the shipped config
    straight = {int(k): v for k, v in _losses(tmp_path / "straight").items()}
    resumed_out = tmp_path / "resumed"
    first = result_summary(train(load_config(config_path, [*overrides, f"train.out_dir={resumed_out}",
                                                           "train.stop_after_step=3"])))
    assert first["stopped_early"]
    second = result_summary(train(load_config(config_path, [*overrides, f"train.out_dir={resumed_out}"])))
    assert sorted(map(int, second["losses"])) == [4, 5, 6]
    for step in (4, 5, 6):
        assert second["losses"][str(step)] == straight[step]
    model_config, tensors = read_export(tmp_path / "straight" / "export")
    _, initial = read_export(pretrained[0])
    assert max((tensors[k] - initial[k]).abs().max().item() for k in tensors) > 0  # it trained
    model = model_with_weights(model_config, tensors, tmp_path / "straight" / "export")
    config = load_config(config_path, overrides)
    _, _, eval_data = open_datasets(config, progress=False)
    inputs, labels = collate(eval_data, range(min(2, len(eval_data))))
    assert torch.isfinite(model(inputs, labels))
    # mixln-eval --tasks on the fine-tuned run, as on any run: lm-eval's scores, written beside it.
    from megatron_mixln.harness.command import evaluate_source

    tasks = [str(ROOT / "megatron_mixln" / "harness" / "tasks" / name) for name in ("mixln_tiny_mc.yaml",
                                                                                    "mixln_tiny_ppl.yaml")]
    tuned = evaluate_source(tmp_path / "straight", tasks, limit=6)
    before = evaluate_source(pretrained[0], tasks, limit=6, out=tmp_path / "before")
    assert tuned.out.parent == tmp_path / "straight" / "downstream" and (tuned.out / "results.json").is_file()
    assert 0 <= tuned.results["results"]["mixln_tiny_mc"]["acc,none"] <= 1
    perplexity = [r.results["results"]["mixln_tiny_ppl"]["word_perplexity,none"] for r in (tuned, before)]
    assert all(math.isfinite(p) for p in perplexity) and perplexity[0] != perplexity[1]  # the scored weights moved


def _losses(out: Path) -> dict:
    from training_runs import losses_of

    return losses_of(out)


@pytest.mark.slow
def test_finetune_in_tp2_pp2_dp2_matches_one_process(pretrained, tmp_path):
    base = finetune_overrides(pretrained, tmp_path / "cache", tmp_path / "one", "data.mode=document",
                              "train.global_batch_size=4", "train.micro_batch_size=2")
    reference = result_summary(train(load_config(None, base)))
    layouts = [["parallel.tp=2"], ["parallel.pp=2"], ["parallel.zero_stage=1"]]
    runs = [[*base, f"train.out_dir={tmp_path / '_'.join(layout)}", *layout] for layout in layouts]
    for layout, ranks in zip(layouts, train_one_after_another(2, runs, tmp_path)):
        assert "error" not in ranks[0], ranks[0].get("traceback")
        for step, loss in reference["losses"].items():
            assert ranks[0]["losses"][step] == pytest.approx(loss, rel=1e-5), (layout, step)


@pytest.mark.slow
def test_two_tokenising_processes_write_the_same_examples_and_counts(tmp_path):
    """The process pool (one file per shard) writes the same tokens, prompt lengths and drop counts as one process."""
    source = tmp_path / "source"
    source.mkdir()
    lines = SAMPLE.read_text().splitlines(keepends=True)
    (source / "a.jsonl").write_text("".join(lines[:24]))
    (source / "b.jsonl").write_text("".join(lines[24:]) + json.dumps({"instruction": "x", "output": ""}) + "\n")
    written = []
    for processes in (1, 2):
        config = load_config(None, [f"data.source={source}", "data.format=instruction", "data.tokenizer=bpe",
                                    "data.bpe_vocab_size=500", f"data.cache_dir={tmp_path / str(processes)}",
                                    "data.eval_fraction=0.1", "data.max_train_documents=-1"])
        folder = prepare_dataset(config.data, progress=False, num_proc=processes)
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["processes"] == processes
        written.append([(np.asarray(TokenFile(folder, split).tokens).tolist(),
                         TokenFile(folder, split).prompt_lengths.tolist()) for split in ("train", "eval")]
                       + [meta["examples"]])
    assert written[0] == written[1]
    assert [counts["dropped"] for counts in written[0][-1]] == [0, 1]
