"""The model against independent references: HF transformers (Pre-LN) and a float64 transcription of
docs/method.md#exact-definitions (every placement, Peri-LN and HybridNorm included)."""
import math

import pytest
import torch

from megatron_mixln import ModelConfig, build_model
from megatron_mixln.model import causal_lm_loss, norm_placement, num_post_ln_layers

TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=136, num_layers=4, num_heads=4, max_seq_len=32)


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


# ----------------------------------------------------------------------------------------------
# A float64 reference written from the formulas of docs/method.md, reading weights by their documented names.
# ----------------------------------------------------------------------------------------------
def ref_rmsnorm(x, weight, eps, scale=1.0):
    return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * scale


def ref_rope(x, theta):
    # Pairs (j, j + d/2) rotate by angle pos * theta^(-2j/d) (HF's rotate_half convention).
    seq, dim = x.shape[-2], x.shape[-1]
    half = dim // 2
    pos = torch.arange(seq, dtype=torch.float64)[:, None]
    # Inverse frequencies computed in fp32 as HF defines them (1 / theta^(2j/d), fp32 power); everything after is
    # float64. Rounding a float64 power instead differs by an ulp, which q/k norms (large scores) make visible.
    freq = (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))).double()
    angle = pos * freq[None, :]
    c, s = torch.cos(angle), torch.sin(angle)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def ref_attention(x, w, prefix, cfg, qkv_norm=False):
    batch, seq, hidden = x.shape
    heads, dim = cfg.num_heads, hidden // cfg.num_heads

    def split(t):
        return t.view(batch, seq, heads, dim).transpose(1, 2)

    def project(name):
        # HybridNorm: each projection normalised over its full width (all heads together), before RoPE.
        t = x @ w[prefix + f"{name}_proj.weight"].T
        return ref_rmsnorm(t, w[prefix + f"{name}_norm.weight"], cfg.rms_norm_eps) if qkv_norm else t

    q = ref_rope(split(project("q")), cfg.rope_theta)
    k = ref_rope(split(project("k")), cfg.rope_theta)
    v = split(project("v"))
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim)
    future = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
    probs = torch.softmax(scores.masked_fill(future, -math.inf), dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, seq, hidden)
    return out @ w[prefix + "o_proj.weight"].T


def ref_mlp(x, w, prefix):
    gate = x @ w[prefix + "gate_proj.weight"].T
    return (gate * torch.sigmoid(gate) * (x @ w[prefix + "up_proj.weight"].T)) @ w[prefix + "down_proj.weight"].T


def expected_kind(cfg, i):
    if cfg.norm_placement == "mix":
        post = cfg.post_layers if cfg.post_layers is not None else int(cfg.mix_alpha * cfg.num_layers)
        return "post" if i < post else "pre"
    if cfg.norm_placement == "peri":
        return "sandwich"  # Peri-LN's layers are Sandwich blocks; the embedding norm comes on top
    if cfg.norm_placement == "hybrid_star":
        return "hybrid_pre" if i == 0 else "hybrid"
    return cfg.norm_placement


def ref_forward(w, cfg, ids):
    w = {k: v.double() for k, v in w.items()}
    eps, L = cfg.rms_norm_eps, cfg.num_layers
    x = w["model.embed_tokens.weight"][ids]
    if cfg.norm_placement == "peri":
        x = ref_rmsnorm(x, w["model.embed_layernorm.weight"], eps)  # h0 = N_emb(E(tokens))
    for i in range(L):
        p = f"model.layers.{i}."

        def N(t, name, scale=1.0):
            return ref_rmsnorm(t, w[p + name + ".weight"], eps, scale)

        def attn(t):
            return ref_attention(t, w, p + "self_attn.", cfg)

        def attn_qkv(t):
            return ref_attention(t, w, p + "self_attn.", cfg, qkv_norm=True)

        def mlp(t):
            return ref_mlp(t, w, p + "mlp.")

        kind = expected_kind(cfg, i)
        if kind == "pre":
            h = x + attn(N(x, "input_layernorm"))
            x = h + mlp(N(h, "post_attention_layernorm"))
        elif kind == "lns":
            s = 1.0 / math.sqrt(i + 1)
            h = x + attn(N(x, "input_layernorm", s))
            x = h + mlp(N(h, "post_attention_layernorm", s))
        elif kind == "post":
            h = N(x + attn(x), "post_attention_layernorm")
            x = N(h + mlp(h), "post_feedforward_layernorm")
        elif kind == "deepnorm":
            a = (2 * L) ** 0.25
            h = N(a * x + attn(x), "post_attention_layernorm")
            x = N(a * h + mlp(h), "post_feedforward_layernorm")
        elif kind == "sandwich":
            h = x + N(attn(N(x, "input_layernorm")), "post_attention_layernorm")
            x = h + N(mlp(N(h, "pre_feedforward_layernorm")), "post_feedforward_layernorm")
        elif kind == "hybrid":
            h = x + attn_qkv(x)
            n = N(h, "post_attention_layernorm")
            x = n + mlp(n)
        elif kind == "hybrid_pre":
            h = x + attn_qkv(N(x, "input_layernorm"))
            x = h + mlp(N(h, "post_attention_layernorm"))
        else:
            raise AssertionError(kind)
    x = ref_rmsnorm(x, w["model.norm.weight"], eps)
    return x @ w["lm_head.weight"].T


def randomise_norm_gains(model, generator):
    # Gains start at one, which would hide a norm applied with the wrong weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=generator))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("placement,extra", [
    ("pre", {}), ("post", {}), ("mix", {"mix_alpha": 0.5}), ("mix", {"post_layers": 1}),
    ("deepnorm", {}), ("sandwich", {}), ("lns", {}), ("peri", {}), ("hybrid", {}), ("hybrid_star", {}),
])
def test_layers_equal_float64_reference_of_paper_formulas(placement, extra):
    cfg = tiny(norm_placement=placement, **extra)
    model = build_model(cfg, seed=int(torch.randint(0, 10_000, ())))
    randomise_norm_gains(model, torch.Generator().manual_seed(1))
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    expected = ref_forward(model.state_dict(), cfg, ids)
    got64 = model.double()(ids)
    assert rel_err(got64, expected) < 1e-12  # fp64 throughout: only rounding differs
    got32 = model.float()(ids).double()
    assert rel_err(got32, expected) < 1e-5


def test_pre_ln_logits_equal_transformers_llama():
    transformers = pytest.importorskip("transformers")
    cfg = tiny(num_layers=3)
    model = build_model(cfg, seed=3)
    randomise_norm_gains(model, torch.Generator().manual_seed(2))
    from megatron_mixln.model.hf_format import to_hf_llama

    hf = to_hf_llama(cfg, model.state_dict()).eval()
    assert isinstance(hf, transformers.LlamaForCausalLM)
    ids = torch.randint(0, cfg.vocab_size, (3, 23))
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) < 1e-5


def test_pre_ln_hf_export_loads_with_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    from megatron_mixln.model.hf_format import save_hf_pretrained

    cfg = tiny(num_layers=2)
    model = build_model(cfg, seed=4)
    save_hf_pretrained(cfg, model.state_dict(), tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) < 1e-5


@pytest.mark.parametrize("placement", ["pre", "post", "mix", "deepnorm", "sandwich", "lns", "peri", "hybrid",
                                       "hybrid_star"])
def test_state_dict_uses_paper_parameter_names(placement):
    cfg = tiny(norm_placement=placement, mix_alpha=0.5)
    names = set(build_model(cfg).state_dict())
    for i in range(cfg.num_layers):
        kind = expected_kind(cfg, i)
        norms = {"pre": ["input_layernorm", "post_attention_layernorm"],
                 "lns": ["input_layernorm", "post_attention_layernorm"],
                 "post": ["post_attention_layernorm", "post_feedforward_layernorm"],
                 "deepnorm": ["post_attention_layernorm", "post_feedforward_layernorm"],
                 "sandwich": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                              "post_feedforward_layernorm"],
                 "hybrid": ["post_attention_layernorm"] + [f"self_attn.{p}_norm" for p in "qkv"],
                 "hybrid_pre": ["input_layernorm", "post_attention_layernorm"] + [f"self_attn.{p}_norm" for p in "qkv"],
                 }[kind]
        layer = {n[len(f"model.layers.{i}."):] for n in names if n.startswith(f"model.layers.{i}.")}
        assert layer == {f"self_attn.{p}_proj.weight" for p in "qkvo"} | {
            f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")} | {f"{n}.weight" for n in norms}
    outside = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    if placement == "peri":
        outside.add("model.embed_layernorm.weight")  # only Peri-LN normalises the embedding output
    assert {n for n in names if not n.startswith("model.layers.")} == outside
    assert not any("rotary" in n or "bias" in n for n in names)


@pytest.mark.parametrize("layers,alpha,post", [(12, 0.25, 3), (24, 0.25, 6), (32, 0.0625, 2), (24, 1 / 6, 4),
                                               (10, 0.3, 3), (12, 0.0, 0), (12, 1.0, 12)])
def test_mix_ln_post_layers_are_the_first_floor_alpha_L(layers, alpha, post):
    cfg = tiny(num_layers=layers, norm_placement="mix", mix_alpha=alpha)
    assert num_post_ln_layers(cfg) == post
    kinds = [norm_placement(i, layers, cfg) for i in range(layers)]
    assert kinds == ["post"] * post + ["pre"] * (layers - post)


def test_explicit_post_layers_overrides_alpha():
    cfg = tiny(num_layers=8, norm_placement="mix", mix_alpha=0.5, post_layers=1)
    assert [norm_placement(i, 8, cfg) for i in range(8)] == ["post"] + ["pre"] * 7


def test_initialisation_depends_only_on_seed_and_parameter_name():
    a = build_model(tiny(num_layers=4), seed=5).state_dict()
    b = build_model(tiny(num_layers=4), seed=5).state_dict()
    c = build_model(tiny(num_layers=2), seed=5).state_dict()  # fewer layers: shared names keep their values
    d = build_model(tiny(num_layers=4), seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], c[k]) for k in c)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], d["model.layers.0.self_attn.q_proj.weight"])


def test_initialisation_standard_deviations_follow_the_switches():
    L = 4
    big = dict(hidden_size=256, intermediate_size=512, num_heads=4, vocab_size=2000, num_layers=L)
    plain = build_model(tiny(**big)).state_dict()
    assert plain["model.layers.1.mlp.down_proj.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert plain["model.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    scaled = build_model(tiny(**big, scaled_init=True, scaled_embed_init=True)).state_dict()
    assert scaled["model.layers.1.mlp.down_proj.weight"].std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.05)
    assert scaled["model.layers.1.self_attn.o_proj.weight"].std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.05)
    assert scaled["model.layers.1.self_attn.q_proj.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert scaled["model.embed_tokens.weight"].std().item() == pytest.approx(math.sqrt(2 / 5), rel=0.05)
    deep = build_model(tiny(**big, norm_placement="deepnorm")).state_dict()
    beta = (8 * L) ** -0.25  # DeepNet: (8L)^(-1/4), not the official code's (8L)^(+1/4)
    xavier_square = math.sqrt(2 / (256 + 256))
    xavier_ffn = math.sqrt(2 / (256 + 512))
    assert deep["model.layers.0.self_attn.q_proj.weight"].std().item() == pytest.approx(xavier_square, rel=0.05)
    assert deep["model.layers.0.self_attn.v_proj.weight"].std().item() == pytest.approx(beta * xavier_square, rel=0.05)
    assert deep["model.layers.0.self_attn.o_proj.weight"].std().item() == pytest.approx(beta * xavier_square, rel=0.05)
    assert deep["model.layers.0.mlp.up_proj.weight"].std().item() == pytest.approx(beta * xavier_ffn, rel=0.05)
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in deep.items() if k.endswith("norm.weight"))


def test_causal_lm_loss_ignores_masked_positions():
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 5, 11, generator=generator)
    labels = torch.randint(0, 11, (2, 5), generator=generator)
    labels[0, 3:] = -100
    kept = labels != -100
    expected = torch.nn.functional.cross_entropy(logits[kept], labels[kept])
    assert causal_lm_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    # Changing a masked position's logits must not change the loss.
    logits2 = logits.clone()
    logits2[0, 4] += 100.0
    assert causal_lm_loss(logits2, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_model_is_causal():
    model = build_model(tiny(norm_placement="mix", mix_alpha=0.5))
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 97
    with torch.no_grad():
        assert torch.allclose(model(ids)[0, :8], model(changed)[0, :8], atol=1e-6)
        assert not torch.allclose(model(ids)[0, 8:], model(changed)[0, 8:], atol=1e-6)
