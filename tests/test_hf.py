"""Hugging Face interop both ways, every placement, against `transformers` itself: our export loaded with
`AutoModelForCausalLM` (trust_remote_code, from a temporary folder, no hub) and `AutoTokenizer`, and seeded random
`LlamaForCausalLM`s imported into our model, as weights and as a run's initial weights in any layout."""
import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")

from megatron_mixln import ModelConfig, build_model  # noqa: E402
from megatron_mixln.config import NORM_PLACEMENTS, ConfigError, load_config  # noqa: E402
from megatron_mixln import hf_interop  # noqa: E402
from megatron_mixln.model import hf_format  # noqa: E402
from megatron_mixln.parallel.tensor_parallel import TensorParallel  # noqa: E402
from megatron_mixln.saved_files import CheckpointError  # noqa: E402
from megatron_mixln.train import export, init_from, module_export  # noqa: E402

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=136, num_layers=4, num_heads=4, max_seq_len=32)
ONE_PROCESS = SimpleNamespace(pp=1, dp_rank=0, stage=0, tensor_parallel=TensorParallel())
# Every placement the model knows (Peri-LN and the HybridNorms once model/ has them), and Mix-LN both ways of
# counting its Post-LN layers.
PLACEMENTS = [(p, {"mix_alpha": 0.5} if p == "mix" else {}) for p in NORM_PLACEMENTS] + [("mix", {"post_layers": 1})]
PLACEMENT_IDS = [f"{p}-{next(iter(extra), '')}".rstrip("-") for p, extra in PLACEMENTS]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def randomise_norm_gains(module, seed):
    # Gains start at one, which would hide a norm applied with the wrong weight (or read under the wrong name).
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=generator))


def ours(placement="pre", seed=3, **extra):
    config = ModelConfig(**{**TINY, "norm_placement": placement, **extra})
    model = build_model(config, seed=seed).eval()
    randomise_norm_gains(model, seed)
    return config, model


def load_hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True,
                                                             dtype=torch.float32).eval()


def hf_llama(folder, seed=0, tied=False, **overrides):
    """A seeded random LlamaForCausalLM saved to `folder` (random gains too)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{
        "vocab_size": 97, "hidden_size": 48, "intermediate_size": 136, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64, "rope_theta": 5000.0,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": tied, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    randomise_norm_gains(model, seed)
    model.save_pretrained(str(folder))
    return model


# ------------------------------------------------------------------------------------------------
# Ours -> transformers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("placement,extra", PLACEMENTS, ids=PLACEMENT_IDS)
def test_export_loads_in_transformers_with_our_logits(placement, extra, tmp_path):
    config, model = ours(placement, **extra)
    out = hf_format.save_hf_pretrained(config, model.state_dict(), tmp_path / "hf",
                                       data_meta={"eos_id": 1, "pad_id": 0})
    saved = json.loads((out / "config.json").read_text())
    if placement == "pre":  # a plain LLaMA: no code in the folder, nothing to trust
        assert saved["model_type"] == "llama" and "auto_map" not in saved
        assert not list(out.glob("*.py"))
    else:
        assert saved["model_type"] == "mixln_llama" and saved["auto_map"] == hf_format.AUTO_MAP
        assert sorted(p.name for p in out.glob("*.py")) == sorted(hf_format.MODELING_FILES)
        assert saved["layer_placements"] == [layer.placement for layer in model.model.layers]
    assert (saved["eos_token_id"], saved["pad_token_id"], saved["bos_token_id"]) == (1, 0, None)
    loaded = load_hf(out)
    assert type(loaded).__name__ == ("LlamaForCausalLM" if placement == "pre" else "MixLNLlamaForCausalLM")
    ids = torch.randint(0, config.vocab_size, (3, 23))
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, model(ids)) < 1e-5


@pytest.mark.parametrize("placement", ["pre", "mix"])
def test_hf_loss_convention_is_the_transformers_loss(placement, tmp_path):
    config, model = ours(placement, seed=4, mix_alpha=0.5)
    reference = load_hf(hf_format.save_hf_pretrained(config, model.state_dict(), tmp_path / "hf"))
    ids = torch.randint(0, config.vocab_size, (3, 13))
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    labels[2, 9:] = -100  # padding
    with torch.no_grad():
        mean = model(ids, labels, hf_loss=True)
        assert mean.item() == pytest.approx(reference(ids, labels=labels).loss.item(), rel=1e-5)
        # Ours: the same targets, shifted by the caller, summed.
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        assert model(ids, shifted).item() == pytest.approx(mean.item() * int((shifted != -100).sum()), rel=1e-5)


@pytest.mark.parametrize("placement,extra", PLACEMENTS, ids=PLACEMENT_IDS)
def test_exported_model_decodes_with_its_kv_cache_and_padding(placement, extra, tmp_path):
    config, model = ours(placement, seed=5, **extra)
    loaded = load_hf(hf_format.save_hf_pretrained(config, model.state_dict(), tmp_path / "hf"))
    ids = torch.randint(2, config.vocab_size, (2, 15))
    with torch.no_grad():
        full = model(ids)
        # Prefill 6 tokens, then one token at a time through the cache: the whole sequence's logits.
        out = loaded(ids[:, :6], use_cache=True)
        pieces = [out.logits]
        for t in range(6, ids.shape[1]):
            # transformers 5 names the KV cache `cache` (in and out), earlier versions `past_key_values`.
            key = "cache" if hasattr(out, "cache") else "past_key_values"
            out = loaded(ids[:, t:t + 1], use_cache=True, **{key: getattr(out, key)})
            pieces.append(out.logits)
        assert rel_err(torch.cat(pieces, dim=1), full) < 1e-5
        # Left padding with its attention mask: the padded row's real positions are the unpadded sequence's.
        padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids[1:, :11]], dim=1)
        mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 11, dtype=torch.long)], dim=1)
        batch = loaded(torch.cat([ids[:1, :15], padded]), attention_mask=torch.cat([torch.ones(1, 15).long(), mask]))
        assert rel_err(batch.logits[1, 4:], model(ids[1:, :11])[0]) < 1e-5
        assert rel_err(batch.logits[0], full[0]) < 1e-5
        # Greedy generation (cached) continues as our model would.
        generated = loaded.generate(ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=6,
                                    do_sample=False, pad_token_id=0)
        expected = ids[:, :5]
        for _ in range(6):
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(generated, expected)


def test_modeling_files_import_only_torch_and_transformers():
    for name in hf_format.MODELING_FILES:
        tree = ast.parse((hf_format.HF_MODELING / name).read_text())
        roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        roots |= {node.module.split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.level == 0}
        relative = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
        assert roots <= {"math", "torch", "transformers"}, (name, roots)
        assert relative <= {"configuration_mixln"}, (name, relative)


# ------------------------------------------------------------------------------------------------
# transformers -> ours
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_transformers_llama_imports_with_its_logits(tmp_path, tied):
    reference = hf_llama(tmp_path / "llama", seed=1, tied=tied)
    out, config, kind = hf_interop.import_hf(tmp_path / "llama", tmp_path / "export")
    assert kind == "llama"
    assert (config.norm_placement, config.rope_theta, config.rms_norm_eps, config.num_layers) == ("pre", 5000.0,
                                                                                                 1e-5, 3)
    model = export.load_exported_model(out)
    _, tensors = export.read_export(out)
    if tied:  # the LM head is the embedding, now a tensor of its own
        assert torch.equal(tensors["lm_head.weight"], reference.model.embed_tokens.weight)
    ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        assert rel_err(model(ids), reference(ids).logits) < 1e-5


@pytest.mark.parametrize("placement,extra", PLACEMENTS, ids=PLACEMENT_IDS)
def test_round_trip_ours_to_transformers_to_ours(placement, extra, tmp_path):
    config, model = ours(placement, seed=7, scaled_init=True, init_std=0.03, **extra)
    folder = hf_format.save_hf_pretrained(config, model.state_dict(), tmp_path / "hf")
    out, imported, kind = hf_interop.import_hf(folder, tmp_path / "export")
    assert kind == ("llama" if placement == "pre" else "mixln_llama")
    if placement != "pre":  # the modeling file's config carries every field back (LLaMA's has no scaled_init)
        assert imported == config
    back = export.load_exported_model(out)
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    ids = torch.randint(0, config.vocab_size, (2, 17))
    with torch.no_grad():
        assert rel_err(back(ids), load_hf(folder)(ids).logits) < 1e-5


def test_init_from_a_transformers_folder_or_an_export_loads_every_tensor(tmp_path):
    reference = hf_llama(tmp_path / "llama", seed=2, tied=True)
    hf_interop.import_hf(tmp_path / "llama", tmp_path / "export")
    config = load_config(None, ["model.vocab_size=97", "model.hidden_size=48", "model.intermediate_size=136",
                                "model.num_layers=3", "model.num_heads=4", "model.rope_theta=5000",
                                "model.rms_norm_eps=1e-5", "data.seq_len=16", "model.max_seq_len=16"])
    ids = torch.randint(0, 97, (2, 11))
    for source in ("llama", "export"):
        config.model.init_from = str(tmp_path / source)
        model = build_model(config.model, seed=0)
        init_from.load_init_from(model, config, ONE_PROCESS)
        with torch.no_grad():
            assert rel_err(model(ids), reference(ids).logits) < 1e-5, source


# ------------------------------------------------------------------------------------------------
# Bad inputs: one sentence each
# ------------------------------------------------------------------------------------------------
def one_sentence(err) -> str:
    message = str(err.value)
    assert "\n" not in message and message.endswith(".") and message.count(". ") == 0, message
    return message


def test_init_from_a_different_model_names_the_fields(tmp_path):
    hf_llama(tmp_path / "llama", seed=3)
    config = load_config(None, ["model.vocab_size=97", "model.hidden_size=64", "model.intermediate_size=136",
                                "model.num_layers=3", "model.num_heads=4", "model.rms_norm_eps=1e-5",
                                "data.seq_len=16", "model.max_seq_len=16", f"model.init_from={tmp_path / 'llama'}"])
    with pytest.raises(ConfigError) as err:
        init_from.load_init_from(build_model(config.model), config, ONE_PROCESS)
    message = one_sentence(err)
    assert "hidden_size=48" in message and "model.hidden_size=64" in message
    assert "rope_theta=5000.0" in message and "model.rope_theta=10000.0" in message
    assert "vocab_size" not in message  # only what differs

    config.model.hidden_size, config.model.rope_theta, config.model.norm_placement = 48, 5000.0, "mix"
    with pytest.raises(ConfigError) as err:
        init_from.load_init_from(build_model(config.model), config, ONE_PROCESS)
    assert "norm_placement='pre'" in one_sentence(err)


def test_a_folder_that_is_not_a_llama_is_refused_naming_its_model_type(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError) as err:
        hf_interop.import_hf(tmp_path / "gpt2", tmp_path / "out")
    assert "model_type='gpt2'" in one_sentence(err)
    hf_llama(tmp_path / "gqa", num_key_value_heads=2)
    with pytest.raises(ConfigError) as err:
        hf_interop.import_hf(tmp_path / "gqa", tmp_path / "out")
    assert "num_key_value_heads=2" in one_sentence(err)
    assert not (tmp_path / "out").exists()


def test_missing_folders_and_weights_are_one_sentence(tmp_path):
    with pytest.raises(CheckpointError) as err:
        hf_interop.import_hf(tmp_path / "nothing", tmp_path / "out")
    assert "nothing" in one_sentence(err)
    with pytest.raises(CheckpointError) as err:
        hf_interop.export_hf(tmp_path / "no-run", tmp_path / "out")
    assert "no-run" in one_sentence(err)
    hf_llama(tmp_path / "llama")
    (tmp_path / "llama" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        hf_interop.import_hf(tmp_path / "llama", tmp_path / "out")
    assert "holds no weights" in one_sentence(err)
    # An untied LLaMA without its LM head is incomplete (only a tied one shares the embedding).
    hf_llama(tmp_path / "headless")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "headless" / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(tmp_path / "headless" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        hf_interop.import_hf(tmp_path / "headless", tmp_path / "out")
    assert "missing ['lm_head.weight']" in one_sentence(err)
    # Weights that are not the config's model: a tensor with another shape.
    hf_llama(tmp_path / "wrong")
    tensors = load_file(str(tmp_path / "wrong" / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(10, 48)
    save_file(tensors, str(tmp_path / "wrong" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        hf_interop.import_hf(tmp_path / "wrong", tmp_path / "out")
    assert "up_proj.weight has shape (10, 48)" in one_sentence(err)


def test_a_pytorch_model_bin_folder_imports_and_is_never_unpickled(tmp_path):
    from safetensors.torch import load_file
    from training_runs import MaliciousPickle

    reference = hf_llama(tmp_path / "llama", seed=6)
    weights = tmp_path / "llama" / "model.safetensors"
    torch.save(load_file(str(weights)), tmp_path / "llama" / "pytorch_model.bin")  # an older transformers' format
    weights.unlink()
    model = export.load_exported_model(hf_interop.import_hf(tmp_path / "llama", tmp_path / "export")[0])
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert rel_err(model(ids), reference(ids).logits) < 1e-5
    torch.save({"model.embed_tokens.weight": MaliciousPickle()}, tmp_path / "llama" / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        hf_interop.import_hf(tmp_path / "llama", tmp_path / "other")
    assert "weights_only=True" in str(err.value) and not MaliciousPickle.ran


def run(tool, *args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(BIN / tool), *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)


def test_mixln_import_command(tmp_path):
    reference = hf_llama(tmp_path / "llama", seed=4)
    proc = run("mixln-import", tmp_path / "llama", tmp_path / "export")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"model.init_from={tmp_path / 'export'}" in proc.stdout
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert rel_err(export.load_exported_model(tmp_path / "export")(ids), reference(ids).logits) < 1e-5
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    proc = run("mixln-import", tmp_path / "gpt2", tmp_path / "x")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "model_type='gpt2'" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------
# The tokenizer an export carries
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def texts():
    from test_data import embedded_texts

    return embedded_texts(120)


@pytest.fixture(scope="module")
def tokenizer_sources(tmp_path_factory, texts):
    """data metadata of runs with each kind of tokenizer spec: a trained BPE (in its prepared folder), a
    tokenizer.json, SentencePiece unigram and BPE models, and a transformers tokenizer folder."""
    import sentencepiece

    from megatron_mixln.data.tokenizers import train_bpe

    root = tmp_path_factory.mktemp("tokenizers")
    train_bpe(texts, 300, save_dir=root / "prepared")
    for kind in ("unigram", "bpe"):
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(root / kind),
                                                 vocab_size=400, pad_id=-1, model_type=kind, minloglevel=2)
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(root / "prepared" / "tokenizer.json"), eos_token="<eos>",
                                         pad_token="<pad>").save_pretrained(root / "hf-folder")
    return {"bpe": {"tokenizer": "bpe", "folder": str(root / "prepared")},
            "tokenizer.json": {"tokenizer": str(root / "prepared" / "tokenizer.json")},
            "sentencepiece-unigram": {"tokenizer": str(root / "unigram.model")},
            "sentencepiece-bpe": {"tokenizer": str(root / "bpe.model")},
            "hf-folder": {"tokenizer": str(root / "hf-folder")}}


@pytest.mark.parametrize("kind", ["bpe", "tokenizer.json", "sentencepiece-unigram", "sentencepiece-bpe", "hf-folder"])
def test_export_carries_a_tokenizer_that_encodes_as_ours(kind, tokenizer_sources, texts, tmp_path):
    from megatron_mixln.data.tokenizers import load_tokenizer

    meta = tokenizer_sources[kind]
    spec = str(Path(meta["folder"]) / "tokenizer.json") if meta["tokenizer"] == "bpe" else meta["tokenizer"]
    reference = load_tokenizer(spec)
    meta = {**meta, "eos_id": reference.eos_id, "pad_id": reference.pad_id}
    config, model = ours("mix", vocab_size=448, mix_alpha=0.5)
    source = export.export_consolidated(model.state_dict(), config, tmp_path / "export",
                                        extra={"step": 5, "data": meta})
    done = hf_interop.export_hf(source, tmp_path / "hf")
    assert done.tokenizer_problem is None and done.step == 5
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in [*texts[:20], "Hello, world!", "  spaces\tand\nnewlines  ", "Ünïcödé 東京 ½"]:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(text)
        if kind != "hf-folder":  # a transformers tokenizer keeps its own special-token rules; ours add none
            assert tokenizer(text)["input_ids"] == reference.encode(text)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (reference.eos_id, reference.pad_id)
    assert tokenizer.padding_side == "left"  # saved with the tokenizer, not only set on the object exported
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == reference.eos_id


def test_export_without_a_findable_tokenizer_warns_and_still_writes_the_model(tmp_path, tokenizer_sources):
    from megatron_mixln.data.tokenizers import load_tokenizer

    config, model = ours("post", vocab_size=320)
    gone = {"tokenizer": "bpe", "folder": str(tmp_path / "deleted-cache"), "eos_id": 1, "pad_id": 0}
    source = export.export_consolidated(model.state_dict(), config, tmp_path / "export", extra={"data": gone})
    with pytest.warns(UserWarning, match=r"has no tokenizer: the run's trained BPE .*deleted-cache.* is gone"):
        done = hf_interop.export_hf(source, tmp_path / "hf")
    assert "deleted-cache" in done.tokenizer_problem
    assert not (tmp_path / "hf" / "tokenizer_config.json").exists()
    ids = torch.randint(0, config.vocab_size, (1, 7))
    with torch.no_grad():
        assert rel_err(load_hf(tmp_path / "hf")(ids).logits, model(ids)) < 1e-5
    # Named explicitly (mixln-export --tokenizer), the tokenizer is carried.
    spec = tokenizer_sources["tokenizer.json"]["tokenizer"]
    assert hf_interop.export_hf(source, tmp_path / "hf", tokenizer=spec).tokenizer_problem is None
    text = "Named explicitly."
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf")).encode(text) == \
        load_tokenizer(spec).encode(text)


@pytest.mark.parametrize("placement", ["mix", "pre"])
def test_batched_greedy_generation_gives_each_prompt_its_own_output(placement, tokenizer_sources, texts, tmp_path,
                                                                    monkeypatch):
    # As a user loads an export: AutoTokenizer and AutoModelForCausalLM, trust_remote_code where the README says.
    config, model = ours(placement, vocab_size=320, mix_alpha=0.5)
    meta = {**tokenizer_sources["tokenizer.json"], "eos_id": 1, "pad_id": 0}
    source = export.export_consolidated(model.state_dict(), config, tmp_path / "export", extra={"data": meta})
    hf_interop.export_hf(source, tmp_path / "hf")
    remote_code = {"trust_remote_code": True} if placement != "pre" else {}
    prompts_asked = []
    monkeypatch.setattr("builtins.input", lambda *args: prompts_asked.append(args) or "n")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), **remote_code)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32,
                                                               **remote_code).eval()
    assert not prompts_asked  # no "run the custom code? [y/N]" question
    assert (tokenizer.padding_side, tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token) == \
        ("left", "<pad>", "<eos>", None)
    # The tokenizer itself is transformers' own class: trust_remote_code=False (no code run) loads the same one.
    assert "auto_map" not in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    no_code = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=False)
    assert not prompts_asked and no_code.padding_side == "left"
    assert no_code(texts[2])["input_ids"] == tokenizer(texts[2])["input_ids"]
    prompts = [texts[0][:80], "The", texts[1][:30]]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert len({int(n) for n in batch["attention_mask"].sum(1)}) == 3  # three lengths: two rows are padded

    def continuation(ids, prompt_length):
        new = ids[prompt_length:].tolist()
        return new[:new.index(1) + 1] if 1 in new else new  # up to eos: a batch pads a finished row after it

    with torch.no_grad():
        together = loaded.generate(**batch, max_new_tokens=8, do_sample=False)
        for row, prompt in enumerate(prompts):
            alone = tokenizer(prompt, return_tensors="pt")
            expected = loaded.generate(**alone, max_new_tokens=8, do_sample=False)[0]
            assert continuation(together[row], batch["input_ids"].shape[1]) == \
                continuation(expected, alone["input_ids"].shape[1]), prompt


# ------------------------------------------------------------------------------------------------
# Through training: a run's checkpoint and export out; a run started from transformers weights
# ------------------------------------------------------------------------------------------------
RUN = ["model.vocab_size=320", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=4",
       "model.num_heads=2", "model.max_seq_len=32", "data.source=embedded", "data.max_train_documents=150",
       "data.max_eval_documents=20", "data.tokenizer=bpe", "data.bpe_vocab_size=300", "data.seq_len=32",
       "data.mode=packed", "train.global_batch_size=4", "train.micro_batch_size=2", "train.lr=3e-3",
       "train.eval_sequences=0", "train.progress_bar=false", "train.tensorboard=false", "train.seed=11"]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="module")
def mix_run(tmp_path_factory, data_cache):
    from megatron_mixln.train.loop import train

    out = tmp_path_factory.mktemp("mix-run") / "run"
    train(load_config(None, [*RUN, "model.norm_placement=mix", "model.mix_alpha=0.5", "train.steps=2",
                             f"data.cache_dir={data_cache}", f"train.out_dir={out}"]))
    return out


@pytest.mark.parametrize("source", ["run folder", "export folder"])
def test_export_hf_of_a_trained_run(mix_run, source, tmp_path):
    from megatron_mixln.data.prepare import prepared_tokenizer

    folder = mix_run if source == "run folder" else mix_run / "export"  # the checkpoint, or the run's export
    done = hf_interop.export_hf(folder, tmp_path / "hf")
    assert done.step == 2 and done.tokenizer_problem is None
    reference = export.load_exported_model(mix_run / "export")
    ids = torch.randint(0, 320, (2, 21))
    with torch.no_grad():
        assert rel_err(load_hf(tmp_path / "hf")(ids).logits, reference(ids)) < 1e-5
    data_folder = json.loads((mix_run / "export" / "config.json").read_text())["data"]["folder"]
    text = "The history of anarchism, in 1923."
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tokenizer(text)["input_ids"] == prepared_tokenizer(data_folder).encode(text)


def mixln_eval(capsys, folder):
    """mixln-eval in this process: (exit status, its JSON result or None, its stderr)."""
    from megatron_mixln import cli

    status = cli._run(cli._eval, [str(folder), "train.eval_sequences=4"])
    captured = capsys.readouterr()
    return status, (json.loads(captured.out.splitlines()[-1]) if status == 0 else None), captured.err


def test_mixln_eval_reads_an_hf_export_a_run_folder_and_names_a_missing_folder(mix_run, tmp_path, capsys):
    import shutil

    status, plain, _ = mixln_eval(capsys, mix_run / "export")
    assert status == 0 and plain["tokens"] > 0
    hf_interop.export_hf(mix_run / "export", tmp_path / "hf")
    status, from_hf, _ = mixln_eval(capsys, tmp_path / "hf")
    assert status == 0 and from_hf["tokens"] == plain["tokens"]
    assert from_hf["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-6)
    # A run folder is read through its export, not its checkpoint: here the export's head is scaled, so the two
    # give different losses.
    run = shutil.copytree(mix_run, tmp_path / "run")
    saved = json.loads((run / "export" / "config.json").read_text())
    config, tensors = export.read_export(run / "export")
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 2
    shutil.rmtree(run / "export")
    export.export_consolidated(tensors, config, run / "export", extra={key: saved[key] for key in
                                                                          ("step", "data", "run_config")})
    status, changed, _ = mixln_eval(capsys, run / "export")
    assert status == 0 and abs(changed["eval_loss"] - plain["eval_loss"]) > 1e-3
    assert mixln_eval(capsys, run)[1] == changed
    status, _, err = mixln_eval(capsys, tmp_path / "missing")
    assert status == 2 and err.startswith("error:") and "missing does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize("layout", ["", "parallel.zero_stage=3"], ids=["plain", "zero-3"])
def test_first_step_loss_of_a_run_from_transformers_weights_is_the_transformers_loss(tmp_path, data_cache, layout):
    from megatron_mixln.data import GlobalBatchSampler, collate, open_datasets
    from megatron_mixln.train.loop import train
    from megatron_mixln.train.metrics import read_metrics

    reference = hf_llama(tmp_path / "llama", seed=9, tied=True, vocab_size=320, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=32, rope_theta=10000.0, rms_norm_eps=1e-6,
                         initializer_range=0.2)
    overrides = [*RUN, "model.norm_placement=pre", "train.steps=1", f"data.cache_dir={data_cache}",
                 f"train.out_dir={tmp_path / 'run'}", f"model.init_from={tmp_path / 'llama'}", *([layout] if layout
                                                                                                  else [])]
    config = load_config(None, overrides)
    train(config)
    [first] = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("step") == 1 and "loss" in r]
    _, train_data, _ = open_datasets(config)
    input_ids, labels = collate(train_data, GlobalBatchSampler(len(train_data), 4, 11).global_indices(0))
    with torch.no_grad():
        logits = reference(input_ids).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 320).double(), labels.reshape(-1),
                                                 ignore_index=-100).item()
    assert abs(expected - math.log(320)) > 0.1  # far from any untrained model's loss: the weights were loaded
    assert first["loss"] == pytest.approx(expected, rel=1e-5)

    # A resumed run continues its own weights: model.init_from is not read again (here: it is gone).
    import shutil

    shutil.rmtree(tmp_path / "llama")
    result = train(load_config(None, [*overrides, "train.steps=2", "train.resume_changes=allow"]))
    assert result.last_step == 2


# ------------------------------------------------------------------------------------------------
# model.init_from under TP, PP and ZeRO-3 (two processes, gloo, no ports)
# ------------------------------------------------------------------------------------------------
PARALLEL = ["model.vocab_size=320", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=4",
            "model.num_heads=2", "model.max_seq_len=32", "data.seq_len=32", "train.precision=fp32",
            "train.global_batch_size=4", "train.micro_batch_size=1", "model.norm_placement=pre"]
LAYOUTS = {"pp2": ["parallel.pp=2"], "tp2": ["parallel.tp=2"], "dp2 zero-3": ["parallel.zero_stage=3"]}


def _init_from_worker(rank, world, store_path, overrides, out):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed

    from megatron_mixln.train.engine import build_layout, build_training_model

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False, auto_mpi_discovery=False)
    config = load_config(None, overrides)
    layout = build_layout(config)
    module = build_training_model(config, layout)
    module_export.export_from_module(module, config.model, layout, Path(out))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_init_from_in_a_parallel_layout_loads_the_transformers_weights(tmp_path, layout):
    reference = hf_llama(tmp_path / "llama", seed=12, tied=True, vocab_size=320, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=32, rope_theta=10000.0, rms_norm_eps=1e-6,
                         initializer_range=0.2)
    overrides = [*PARALLEL, *LAYOUTS[layout], f"model.init_from={tmp_path / 'llama'}",
                 f"train.out_dir={tmp_path / 'run'}"]
    mp.start_processes(_init_from_worker, args=(2, str(tmp_path / "store"), overrides, str(tmp_path / "export")),
                       nprocs=2, start_method="spawn", join=True)
    _, tensors = export.read_export(tmp_path / "export")
    expected = dict(reference.state_dict())
    expected["lm_head.weight"] = expected["model.embed_tokens.weight"]  # tied: the head is the embedding
    assert tensors.keys() == {k for k in expected if not k.endswith("inv_freq")}
    for name, value in tensors.items():
        assert torch.equal(value, expected[name]), name
