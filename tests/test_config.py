"""Config loading, overrides, validation messages, and the placement of every shipped config."""
from pathlib import Path

import pytest

from megatron_mixln import ConfigError, ModelConfig, load_config
from megatron_mixln.model import norm_placement, num_post_ln_layers

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))

# name -> (hidden, ffn, heads, layers, Post-LN layers, peak LR) from the table in docs/recipes.md#model-sizes
PAPER_SIZES = {
    "llama_71m": (512, 1368, 8, 12, 3, 1e-3),
    "llama_130m": (768, 2048, 12, 12, 3, 1e-3),
    "llama_250m": (768, 2560, 16, 24, 6, 1e-3),
    "llama_1b": (2048, 5461, 32, 24, 6, 5e-4),
    "llama_7b": (4096, 11008, 32, 32, 2, 5e-4),
}


def test_every_paper_size_has_a_config():
    assert set(PAPER_SIZES) <= {p.stem for p in CONFIGS}
    assert any(p.stem.startswith("tiny") for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_loads_and_places_post_ln_in_the_first_layers(path):
    config = load_config(path)
    m = config.model
    post = num_post_ln_layers(m)
    kinds = [norm_placement(i, m.num_layers, m) for i in range(m.num_layers)]
    assert m.norm_placement == "mix"
    assert kinds == ["post"] * post + ["pre"] * (m.num_layers - post)
    if path.stem in PAPER_SIZES:
        hidden, ffn, heads, layers, expected_post, lr = PAPER_SIZES[path.stem]
        assert (m.hidden_size, m.intermediate_size, m.num_heads, m.num_layers) == (hidden, ffn, heads, layers)
        assert post == expected_post
        assert config.train.lr == lr
        assert (m.vocab_size, config.data.seq_len, config.train.global_batch_size) == (32000, 256, 512)
        assert (config.train.warmup_fraction, config.train.min_lr_ratio, config.train.betas) == (0.1, 0.1, (0.9, 0.999))
        assert config.train.weight_decay == 0.0 and config.train.precision == "bf16"
        assert (config.data.source, config.data.tokenizer, config.data.mode) == ("c4", "t5-base", "document")
    if path.stem == "llama_7b":  # the paper's 7B recipe on ZeRO-3
        p = config.parallel
        assert (p.zero_stage, p.pp, p.activation_checkpointing, config.train.precision) == (3, 1, True, "bf16")


def test_overrides_take_every_type():
    config = load_config(CONFIGS[0], ["model.norm_placement=post", "model.mix_alpha=0.5", "train.steps=7",
                                      "train.betas=[0.8, 0.95]", "train.tensorboard=false", "model.post_layers=null",
                                      "train.lr=2e-4", "train.seed=3"])
    assert config.model.norm_placement == "post" and config.model.mix_alpha == 0.5
    assert config.train.steps == 7 and config.train.betas == (0.8, 0.95) and config.train.tensorboard is False
    assert config.model.post_layers is None and config.train.lr == 2e-4 and config.train.seed == 3


@pytest.mark.parametrize("override,message", [
    ("model.norm_placement=middle",
     r"model\.norm_placement='middle' is invalid: expected one of pre, post, mix, deepnorm, sandwich, lns, peri, "
     r"hybrid, hybrid_star\."),
    ("model.mix_alpha=1.5", r"model\.mix_alpha=1\.5 is invalid: expected a number in \[0, 1\]\."),
    ("model.mix_alpha=-0.1", r"model\.mix_alpha=-0\.1 is invalid"),
    ("model.num_heads=7", r"model\.num_heads=7 is invalid: expected a divisor of hidden_size=128\."),
    ("model.post_layers=9", r"model\.post_layers=9 is invalid: expected an integer in \[0, num_layers=4\]"),
    ("model.hidden_size=abc", r"model\.hidden_size='abc' is invalid: expected an integer\."),
    ("model.hidden_size=1.5", r"model\.hidden_size='1\.5' is invalid: expected an integer\."),
    ("train.lr=fast", r"train\.lr='fast' is invalid: expected a finite number\."),
    ("train.tensorboard=maybe", r"train\.tensorboard='maybe' is invalid: expected true or false\."),
    ("train.precision=fp16", r"train\.precision='fp16' is invalid: expected one of fp32, bf16\."),
    ("train.steps=0", r"train\.steps=0 is invalid: expected a positive integer\."),
    ("data.mode=stream", r"data\.mode='stream' is invalid: expected one of document, packed\."),
    ("data.seq_len=4096", r"data\.seq_len=4096 is invalid: expected at most model\.max_seq_len=128\."),
    ("parallel.zero_stage=4", r"parallel\.zero_stage=4 is invalid: expected one of 0, 1, 2, 3\."),
    ("model.n_layers=3", r"model\.n_layers is not a known field: valid fields of model are vocab_size, "),
    ("optim.lr=3", r"optim is not a known config section: valid sections are model, data, train, parallel, guard\."),
    ("steps=3", r"override 'steps=3' is invalid: expected section\.field=value"),
    ("train.steps", r"override 'train\.steps' is invalid"),
    ("train.seed=-1", r"train\.seed=-1 is invalid: expected an integer in \[0, 2\*\*63\)\."),
    (f"train.seed={2**63}", r"train\.seed=9223372036854775808 is invalid"),
])
def test_invalid_values_give_one_sentence_naming_field_value_and_allowed(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(Path(__file__).parent.parent / "configs" / "tiny.yaml", [override])
    assert "\n" not in str(info.value)


def test_bad_config_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml.*is not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(listy)
    section = tmp_path / "section.yaml"
    section.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="model must be a mapping of fields"):
        load_config(section)


def test_every_accepted_seed_seeds_the_data_order_and_the_weights():
    import torch

    from megatron_mixln.data import GlobalBatchSampler
    from megatron_mixln.model.llama import parameter_seed

    for seed in (0, 2**32, 2**63 - 1):  # the ends of train.seed's range, and past numpy's legacy 2**32 limit
        load_config(None, [f"train.seed={seed}"])
        assert sorted(GlobalBatchSampler(10, 10, seed).global_indices(0)) == list(range(10))
        torch.Generator().manual_seed(parameter_seed(seed, "model.embed_tokens.weight"))
    # distinct seeds give distinct initialisation seeds over the whole range
    assert parameter_seed(2**63 - 1, "w") != parameter_seed(0, "w")


def test_a_repeated_section_or_field_is_an_error_naming_file_key_and_lines(tmp_path):
    repeated = tmp_path / "repeated.yaml"
    repeated.write_text("train:\n  steps: 5\n  out_dir: runs/a\nmodel:\n  num_layers: 2\ntrain:\n  lr: 0.01\n")
    with pytest.raises(ConfigError) as info:
        load_config(repeated)
    assert str(info.value) == (f"config file {str(repeated)!r} repeats the key 'train' at line 6 (first at line 1), "
                               "and the second would silently replace the first: merge them into one.")
    nested = tmp_path / "nested.yaml"
    nested.write_text("model:\n  num_layers: 2\n  hidden_size: 64\n  num_layers: 4\n")
    with pytest.raises(ConfigError, match=r"nested\.yaml' repeats the key 'num_layers' at line 4 \(first at line 2\)"):
        load_config(nested)
    flow = tmp_path / "flow.yaml"
    flow.write_text("train: {steps: 1, steps: 2}\n")
    with pytest.raises(ConfigError, match="repeats the key 'steps' at line 1"):
        load_config(flow)
    merged = tmp_path / "merged.yaml"  # a YAML merge may be overridden: not a repeat
    merged.write_text("train:\n  <<: {steps: 3, lr: 0.01}\n  steps: 4\n")
    assert (load_config(merged).train.steps, load_config(merged).train.lr) == (4, 0.01)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("train:\n  out_dir: runs/café\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(latin1)
    assert str(info.value) == (f"config file {str(latin1)!r} is not UTF-8 text (byte 0xe9 at offset 26): "
                               "save it as UTF-8.")


def test_model_config_is_the_public_dataclass_with_the_paper_defaults():
    import dataclasses

    names = [f.name for f in dataclasses.fields(ModelConfig)]
    assert names == ["vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "norm_placement",
                     "mix_alpha", "post_layers", "rms_norm_eps", "rope_theta", "max_seq_len", "init_std",
                     "scaled_init", "scaled_embed_init", "kernels", "fused_cross_entropy", "init_from"]
    config = ModelConfig()
    assert (config.vocab_size, config.rms_norm_eps, config.rope_theta, config.max_seq_len) == (32000, 1e-6, 10000.0,
                                                                                             256)
