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
    ("optim.lr=3", r"optim is not a known config section: valid sections are model, data, train, parallel\."),
    ("steps=3", r"override 'steps=3' is invalid: expected section\.field=value"),
    ("train.steps", r"override 'train\.steps' is invalid"),
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


def test_model_config_is_the_public_dataclass_with_the_paper_defaults():
    import dataclasses

    names = [f.name for f in dataclasses.fields(ModelConfig)]
    assert names == ["vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "norm_placement",
                     "mix_alpha", "post_layers", "rms_norm_eps", "rope_theta", "max_seq_len", "init_std",
                     "scaled_init", "scaled_embed_init", "kernels", "fused_cross_entropy", "init_from"]
    config = ModelConfig()
    assert (config.vocab_size, config.rms_norm_eps, config.rope_theta, config.max_seq_len) == (32000, 1e-6, 10000.0,
                                                                                             256)
