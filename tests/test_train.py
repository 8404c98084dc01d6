"""End-to-end training on CPU: metrics, exact resume, atomic checkpoints, non-finite losses, export, accumulation."""
import json
import math

import pytest
import torch

from megatron_mixln.config import load_config
from megatron_mixln.train import checkpoint as ckpt
from megatron_mixln.train import export
from megatron_mixln.train import loop
from megatron_mixln.train.loop import train
from megatron_mixln.train.metrics import read_metrics
from megatron_mixln.train.schedule import lr_multiplier
from megatron_mixln.train.weights import checkpoint_weights
from training_runs import module_state


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
    assert all(r["eval_sequences"] == 8 and r["eval_tokens"] == 8 * 32 for r in evals)  # packed: every position
    assert evals[-1]["eval_ppl"] == pytest.approx(math.exp(evals[-1]["eval_loss"]), rel=1e-9)
    assert result.eval_loss == pytest.approx(evals[-1]["eval_loss"])
    assert (out / "loss_curve.png").stat().st_size > 1000
    # The export holds the trained weights under the consolidated names (docs/method.md#parameter-names).
    model = export.load_exported_model(result.export_dir)
    exported = json.loads((result.export_dir / "config.json").read_text())
    assert exported["layer_placements"] == ["post", "post", "pre", "pre"]
    assert "model.layers.0.post_feedforward_layernorm.weight" in model.state_dict()
    assert "model.layers.3.input_layernorm.weight" in model.state_dict()
    final_state = module_state(ckpt.latest_checkpoint(out))
    assert all(torch.equal(final_state[k], v) for k, v in model.state_dict().items())


def test_killed_during_save_the_previous_checkpoint_still_loads(tmp_path, data_cache, monkeypatch):
    out = tmp_path / "run"
    original = ckpt.save_checkpoint

    def dying_save(engine, out_dir, step, state, keep, **options):
        if step == 4:  # die after DeepSpeed wrote some files but before the rename
            engine.save_checkpoint(str(out_dir / ckpt.CHECKPOINTS), tag=ckpt.tag_for_step(step) + ckpt.PARTIAL,
                                   save_latest=False)
            raise KeyboardInterrupt("killed during save")
        return original(engine, out_dir, step, state, keep, **options)

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


def test_gradient_accumulation_matches_one_big_micro_batch(tmp_path, data_cache):
    accumulated = train(tiny_config(tmp_path / "a", data_cache, "train.steps=3", "train.micro_batch_size=1"))
    whole = train(tiny_config(tmp_path / "b", data_cache, "train.steps=3", "train.micro_batch_size=4"))
    for step in (1, 2, 3):
        assert accumulated.losses[step] == pytest.approx(whole.losses[step], rel=1e-5)
    a = export.load_exported_model(accumulated.export_dir).state_dict()
    b = export.load_exported_model(whole.export_dir).state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory):
    """A C4-schema file of documents of very different lengths (6 to 80 characters): sequences with padding."""
    import gzip
    import random

    from megatron_mixln.data import EMBEDDED_CORPUS

    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as stream:
        texts = [json.loads(line)["text"] for _, line in zip(range(200), stream)]
    rng = random.Random(5)
    path = tmp_path_factory.mktemp("short") / "short.jsonl"
    path.write_text("".join(json.dumps({"text": text[:rng.randint(6, 80)]}) + "\n" for text in texts))
    return path


def document_config(out, data_cache, source, *overrides):
    return tiny_config(out, data_cache, f"data.source={source}", "data.mode=document", "data.max_train_documents=-1",
                       "train.steps=3", "train.warmup_fraction=0", *overrides)


def test_document_mode_gradient_accumulation_matches_one_big_micro_batch(tmp_path, data_cache, short_documents):
    """Token-weighted loss: the same global batch gives the same update whatever micro_batch_size splits it."""
    runs = {(micro, reduction): train(document_config(tmp_path / f"{micro}-{reduction}", data_cache, short_documents,
                                                      f"train.micro_batch_size={micro}",
                                                      f"train.loss_reduction={reduction}", "train.optimizer=sgd",
                                                      "train.lr=0.5"))
            for micro in (1, 4) for reduction in ("tokens", "micro_batch_mean")}
    split, whole = runs[(1, "tokens")], runs[(4, "tokens")]
    for step in (1, 2, 3):
        assert split.losses[step] == pytest.approx(whole.losses[step], rel=1e-5)
        assert split.grad_norms[step] == pytest.approx(whole.grad_norms[step], rel=1e-5)
    # The official code's mean of micro-batch means weighs short documents more: it does depend on the split.
    means = runs[(1, "micro_batch_mean")], runs[(4, "micro_batch_mean")]
    for step in (1, 2, 3):  # one micro-batch per step: its mean is the token-weighted mean
        assert means[1].losses[step] == pytest.approx(whole.losses[step], rel=1e-6)
    assert max(abs(means[0].grad_norms[step] / means[1].grad_norms[step] - 1) for step in (1, 2, 3)) > 1e-3


def test_tokens_per_second_counts_target_tokens_and_reports_padding(tmp_path, data_cache, short_documents):
    from megatron_mixln.data import GlobalBatchSampler, collate, open_datasets

    config = document_config(tmp_path / "run", data_cache, short_documents)
    train(config)
    _, train_data, _ = open_datasets(config, progress=False)
    sampler = GlobalBatchSampler(len(train_data), 4, config.train.seed)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    for record in records:
        _, labels = collate(train_data, sampler.global_indices(record["step"] - 1))
        targets = int((labels != -100).sum())
        assert record["target_tokens"] == targets
        assert record["padding_fraction"] == pytest.approx(1 - targets / labels.numel())
        assert record["tokens_per_second"] == pytest.approx(targets / record["step_seconds"])
    assert any(r["padding_fraction"] > 0.1 for r in records)


def test_eval_sample_is_spread_over_the_whole_split():
    from megatron_mixln.data.sampling import eval_indices

    picked = eval_indices(1000, 8)
    assert picked.tolist() == [0, 125, 250, 375, 500, 625, 750, 875]
    assert eval_indices(5, 8).tolist() == [0, 1, 2, 3, 4]
    halves = eval_indices(640, 64)
    assert (halves < 320).sum() == (halves >= 320).sum() == 32  # a two-file split is sampled from both files


def test_bf16_training_keeps_fp32_master_weights_and_accumulates_in_fp32(tmp_path, data_cache, monkeypatch):
    from deepspeed.utils import safe_get_full_fp32_param

    engines = []
    real = loop.make_step_engine
    monkeypatch.setattr(loop, "make_step_engine", lambda engine, *a: engines.append(engine) or real(engine, *a))
    result = train(tiny_config(tmp_path / "bf16", data_cache, "train.precision=bf16", "parallel.zero_stage=1",
                               "train.steps=8"))
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    engine = engines[0]
    assert engine.get_data_types() == (torch.bfloat16, torch.float32)  # bf16 model, fp32 gradient accumulation
    assert engine.communication_data_type == torch.float32  # and fp32 reduction over DP ranks
    refined = 0
    for param in engine.module.parameters():
        master = safe_get_full_fp32_param(param)
        assert param.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert torch.equal(master.to(torch.bfloat16), param.detach())  # the model is the master rounded
        refined += int((master != master.to(torch.bfloat16).float()).sum())
    assert refined > 0  # the master carries precision bf16 cannot: updates below bf16's resolution are kept
    _, tensors = export.read_export(result.export_dir)
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


def test_activation_checkpointing_recomputes_each_layer_without_changing_the_losses(tmp_path, data_cache,
                                                                                  monkeypatch):
    from megatron_mixln.model import DecoderLayer

    calls = {}
    real_call = DecoderLayer.__call__

    def counting_call(self, *args, **kwargs):  # layers run through __call__: hooks see them, so can we
        calls[self.layer_index] = calls.get(self.layer_index, 0) + 1
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(DecoderLayer, "__call__", counting_call)
    plain = train(tiny_config(tmp_path / "plain", data_cache, "train.steps=3", "train.eval_sequences=0"))
    plain_calls, calls = calls, {}
    recomputed = train(tiny_config(tmp_path / "ckpt", data_cache, "train.steps=3", "train.eval_sequences=0",
                                   "parallel.activation_checkpointing=true"))
    assert recomputed.losses == plain.losses
    micro_batches = 3 * 2
    assert plain_calls == {i: micro_batches for i in range(4)}
    assert calls == {i: 2 * micro_batches for i in range(4)}  # each layer ran again in the backward pass


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_and_optimizer_offload_in_one_process_match_plain_training(tmp_path, data_cache, stage):
    plain = train(tiny_config(tmp_path / "plain", data_cache, "train.steps=3"))
    offloaded = train(tiny_config(tmp_path / "offload", data_cache, "train.steps=3",
                                  f"parallel.zero_stage={stage}", "parallel.offload_optimizer=true"))
    for step in (1, 2, 3):
        assert offloaded.losses[step] == pytest.approx(plain.losses[step], rel=1e-5)


@pytest.mark.parametrize("stage", [0, 3])
def test_layer_update_norms_are_how_far_each_layer_moved_between_checkpoints(tmp_path, data_cache, stage):
    from megatron_mixln.config import config_from_dict
    from megatron_mixln.train.step import layer_norm_key

    def run_config(out):
        return config_from_dict(json.loads((out / "config.json").read_text()))

    out = tmp_path / "run"
    train(tiny_config(out, data_cache, "train.steps=3", "train.save_every=1", "train.keep_checkpoints=3",
                      "train.layer_grad_norm_every=1", f"parallel.zero_stage={stage}"))
    records = {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "layer_update_norms" in r}
    states = {step: checkpoint_weights(out / ckpt.CHECKPOINTS / ckpt.tag_for_step(step), run_config(out))
              for step in (2, 3)}
    squares = {}
    for name, after in states[3].items():
        key = layer_norm_key(name)
        squares[key] = squares.get(key, 0.0) + float((after.double() - states[2][name].double()).square().sum())
    recorded = records[3]["layer_update_norms"]
    assert recorded.keys() == squares.keys()
    for key, value in squares.items():
        assert recorded[key] == pytest.approx(math.sqrt(value), rel=1e-5), key


@pytest.mark.parametrize("stage", [0, 3])
def test_the_dry_runs_checkpoint_size_is_what_a_save_writes(tmp_path, data_cache, stage):
    """mixln-preflight checks train.out_dir's space against this figure (train/memory.py)."""
    from megatron_mixln.train.memory import dry_run_summary

    config = tiny_config(tmp_path / "run", data_cache, "train.steps=1", "train.save_every=1",
                         f"parallel.zero_stage={stage}")
    train(config)
    folder = tmp_path / "run" / ckpt.CHECKPOINTS / ckpt.tag_for_step(1)
    written = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    planned = dry_run_summary(config, 1)["bytes"]["checkpoint"]
    # The plan counts the tensors; the files add torch's zip records, the trainer state and the checksums.
    assert planned <= written <= 1.05 * planned + 64 * 1024, (planned, written)
