"""End-to-end training on CPU: metrics, exact resume, atomic checkpoints, non-finite losses, export, accumulation."""
import json
import math

import pytest
import torch

from megatron_mixln.config import load_config
from megatron_mixln.train import checkpoint as ckpt
from megatron_mixln.train import loop
from megatron_mixln.train.loop import NonFiniteLossError, train
from megatron_mixln.train.metrics import read_metrics
from megatron_mixln.train.schedule import lr_multiplier


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


def tiny_config(out_dir, data_cache, *overrides):
    base = [
        "model.vocab_size=320", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=4",
        "model.num_heads=2", "model.max_seq_len=32", "model.norm_placement=mix", "model.mix_alpha=0.5",
        "data.source=embedded", "data.max_train_documents=150", "data.max_eval_documents=20",
        "data.tokenizer=bpe", "data.bpe_vocab_size=300", "data.seq_len=32", "data.mode=packed",
        f"data.cache_dir={data_cache}",
        "train.steps=6", "train.global_batch_size=4", "train.micro_batch_size=2", "train.lr=3e-3",
        "train.eval_sequences=8", "train.log_every=1", "train.layer_grad_norm_every=2", "train.progress_bar=false",
        "train.tensorboard=false", f"train.out_dir={out_dir}",
    ]
    return load_config(None, base + list(overrides))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    total = 100
    values = [lr_multiplier(s, total, 0.1, 0.1) for s in range(total)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)  # linear over 10% of steps
    assert all(a < b for a, b in zip(values[:10], values[1:10]))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # cosine never rises again
    assert values[10] == pytest.approx(1.0)
    assert lr_multiplier(total, total, 0.1, 0.1) == pytest.approx(0.1)
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))


def test_training_writes_metrics_eval_curve_and_export(tmp_path, data_cache):
    out = tmp_path / "run"
    result = train(tiny_config(out, data_cache, "train.eval_every=3"))
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    for r in steps:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_second"} <= set(r)
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["tokens_per_second"] > 0
    layer_records = [r for r in steps if "layer_grad_norms" in r]
    assert [r["step"] for r in layer_records] == [2, 4, 6]
    norms = layer_records[0]["layer_grad_norms"]
    assert {f"layer_{i:03d}" for i in range(4)} <= set(norms)
    # The per-layer norms partition the parameters, so they recombine into the global norm.
    assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(layer_records[0]["grad_norm"], rel=1e-6)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["eval_ppl"] == pytest.approx(math.exp(evals[-1]["eval_loss"]), rel=1e-9)
    assert result.eval_loss == pytest.approx(evals[-1]["eval_loss"])
    assert (out / "loss_curve.png").stat().st_size > 1000
    # The export holds the trained weights under PAPER.md names and reproduces the eval loss.
    model = ckpt.load_exported_model(result.export_dir)
    exported = json.loads((result.export_dir / "config.json").read_text())
    assert exported["layer_placements"] == ["post", "post", "pre", "pre"]
    assert "model.layers.0.post_feedforward_layernorm.weight" in model.state_dict()
    assert "model.layers.3.input_layernorm.weight" in model.state_dict()
    final_state = ckpt.module_state_from_checkpoint(ckpt.latest_checkpoint(out))
    assert all(torch.equal(final_state[k], v) for k, v in model.state_dict().items())


def test_resume_after_stop_gives_the_same_losses_as_a_straight_run(tmp_path, data_cache):
    straight = train(tiny_config(tmp_path / "straight", data_cache))
    first = train(tiny_config(tmp_path / "resumed", data_cache, "train.stop_after_step=3"))
    assert first.stopped_early and first.last_step == 3
    assert ckpt.latest_checkpoint(tmp_path / "resumed").name == ckpt.tag_for_step(3)
    second = train(tiny_config(tmp_path / "resumed", data_cache, "train.resume=auto"))
    assert sorted(second.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert second.losses[step] == straight.losses[step]  # exact on CPU fp32
    assert second.eval_loss == straight.eval_loss
    records = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))


def test_killed_during_save_the_previous_checkpoint_still_loads(tmp_path, data_cache, monkeypatch):
    out = tmp_path / "run"
    original = ckpt.save_checkpoint

    def dying_save(engine, out_dir, step, state, keep):
        if step == 4:  # die after DeepSpeed wrote some files but before the rename
            engine.save_checkpoint(str(out_dir / ckpt.CHECKPOINTS), tag=ckpt.tag_for_step(step) + ckpt.PARTIAL,
                                   save_latest=False)
            raise KeyboardInterrupt("killed during save")
        return original(engine, out_dir, step, state, keep)

    monkeypatch.setattr(ckpt, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(out, data_cache, "train.save_every=2"))
    assert (out / ckpt.CHECKPOINTS / (ckpt.tag_for_step(4) + ckpt.PARTIAL)).is_dir()
    assert ckpt.latest_checkpoint(out).name == ckpt.tag_for_step(2)
    monkeypatch.setattr(ckpt, "save_checkpoint", original)
    resumed = train(tiny_config(out, data_cache, "train.save_every=2"))
    assert sorted(resumed.losses) == [3, 4, 5, 6]
    assert not list((out / ckpt.CHECKPOINTS).glob("*" + ckpt.PARTIAL))
    straight = train(tiny_config(tmp_path / "straight", data_cache))
    assert resumed.losses[6] == straight.losses[6]


def _nan_at_step(monkeypatch, bad_step):
    real_loss = loop.causal_lm_loss
    calls = {"n": 0}

    def loss_with_nan(logits, labels, *args):
        calls["n"] += 1
        value = real_loss(logits, labels, *args)
        # two micro-batches per step: calls 2k-1 and 2k belong to step k
        return value * float("nan") if (calls["n"] + 1) // 2 == bad_step and logits.requires_grad else value

    monkeypatch.setattr(loop, "causal_lm_loss", loss_with_nan)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, data_cache, monkeypatch):
    out = tmp_path / "run"
    _nan_at_step(monkeypatch, 3)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        train(tiny_config(out, data_cache, "train.save_every=2"))
    assert ckpt.latest_checkpoint(out).name == ckpt.tag_for_step(2)


def test_non_finite_loss_can_skip_the_step_without_touching_weights(tmp_path, data_cache, monkeypatch):
    out = tmp_path / "run"
    _nan_at_step(monkeypatch, 3)
    captured = {}
    real_step = ckpt.save_checkpoint

    def save_and_capture(engine, out_dir, step, state, keep):
        captured[step] = {k: v.clone() for k, v in engine.module.state_dict().items()}
        return real_step(engine, out_dir, step, state, keep)

    monkeypatch.setattr(ckpt, "save_checkpoint", save_and_capture)
    result = train(tiny_config(out, data_cache, "train.on_nonfinite=skip", "train.save_every=1", "train.steps=4"))
    assert sorted(result.losses) == [1, 2, 4]
    assert all(torch.equal(captured[2][k], captured[3][k]) for k in captured[2])  # step 3 changed nothing
    assert not all(torch.equal(captured[3][k], captured[4][k]) for k in captured[3])
    skipped = [r for r in read_metrics(out / "metrics.jsonl") if r.get("skipped")]
    assert [r["step"] for r in skipped] == [3]


def test_gradient_accumulation_matches_one_big_micro_batch(tmp_path, data_cache):
    accumulated = train(tiny_config(tmp_path / "a", data_cache, "train.steps=3", "train.micro_batch_size=1"))
    whole = train(tiny_config(tmp_path / "b", data_cache, "train.steps=3", "train.micro_batch_size=4"))
    for step in (1, 2, 3):
        assert accumulated.losses[step] == pytest.approx(whole.losses[step], rel=1e-5)
    a = ckpt.load_exported_model(accumulated.export_dir).state_dict()
    b = ckpt.load_exported_model(whole.export_dir).state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_bf16_training_keeps_fp32_master_weights_and_learns(tmp_path, data_cache):
    result = train(tiny_config(tmp_path / "bf16", data_cache, "train.precision=bf16", "train.steps=8"))
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    _, tensors = ckpt.read_export(result.export_dir)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_refuses_to_overwrite_an_existing_run_with_resume_none(tmp_path, data_cache):
    out = tmp_path / "run"
    train(tiny_config(out, data_cache, "train.steps=1"))
    from megatron_mixln.config import ConfigError

    with pytest.raises(ConfigError, match="train.resume=none"):
        train(tiny_config(out, data_cache, "train.steps=1", "train.resume=none"))


def test_vocab_smaller_than_the_data_is_rejected(tmp_path, data_cache):
    from megatron_mixln.config import ConfigError

    with pytest.raises(ConfigError, match="model.vocab_size=100"):
        train(tiny_config(tmp_path / "run", data_cache, "model.vocab_size=100"))


def test_checkpoint_loading_refuses_arbitrary_pickles(tmp_path, data_cache):
    out = tmp_path / "run"
    train(tiny_config(out, data_cache, "train.steps=2"))
    folder = ckpt.latest_checkpoint(out)
    state = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)
    state["payload"] = _Evil()
    torch.save(state, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        train(tiny_config(out, data_cache, "train.steps=3"))
    assert not _Evil.ran


class _Evil:
    ran = False

    def __reduce__(self):
        return (_Evil._run, ())

    @staticmethod
    def _run():
        _Evil.ran = True
        return _Evil


def test_activation_checkpointing_recomputes_without_changing_the_losses(tmp_path, data_cache):
    plain = train(tiny_config(tmp_path / "plain", data_cache, "train.steps=3"))
    recomputed = train(tiny_config(tmp_path / "ckpt", data_cache, "train.steps=3",
                                   "parallel.activation_checkpointing=true"))
    assert recomputed.losses == plain.losses


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_and_optimizer_offload_in_one_process_match_plain_training(tmp_path, data_cache, stage):
    plain = train(tiny_config(tmp_path / "plain", data_cache, "train.steps=3"))
    offloaded = train(tiny_config(tmp_path / "offload", data_cache, "train.steps=3",
                                  f"parallel.zero_stage={stage}", "parallel.offload_optimizer=true"))
    for step in (1, 2, 3):
        assert offloaded.losses[step] == pytest.approx(plain.losses[step], rel=1e-5)
