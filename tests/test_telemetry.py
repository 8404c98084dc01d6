"""Stability telemetry (train/telemetry.py) against independent computations: a float64 copy of the model with plain
forward hooks and q.k written out for the activations and attention logits, hand arithmetic on an SGD step for the
update ratio, and the same record under TP2 and PP2 as in one process. The dry run's line for its extra memory."""
import math
import os
import weakref

import pytest
import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_mixln.config import load_config
from megatron_mixln.model import IGNORE_INDEX
from megatron_mixln.model.layers import hidden_state
from megatron_mixln.model.llama import MixLNForCausalLM
from training_runs import MODEL, run_gloo_workers

# Mix-LN, 2 Post-LN + 2 Pre-LN layers, 2 heads of 16; plain SGD so that an update is -lr x gradient exactly.
OVERRIDES = [*MODEL, "data.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=1", "train.steps=4",
             "train.optimizer=sgd", "train.lr=0.5", "train.warmup_fraction=0", "parallel.zero_stage=0",
             "train.telemetry_every=1", "train.seed=7", "model.init_std=0.1"]  # attention logits of order 1
# DP2 under ZeRO-3: each rank half of the global batch and half of every weight.
LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"], "dp2-zero3": ["parallel.zero_stage=3"]}


def micro_batches(config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four fixed micro-batches (the global batch at dp = 1), the last targets of each row left out."""
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(config.train.global_batch_size // config.train.micro_batch_size):
        tokens = torch.randint(0, config.model.vocab_size, (config.train.micro_batch_size, config.data.seq_len + 1),
                               generator=generator)
        labels = tokens[:, 1:].clone()
        labels[:, -2:] = IGNORE_INDEX
        batches.append((tokens[:, :-1].contiguous(), labels))
    return batches


def hook_count(module: torch.nn.Module) -> int:
    modules = list(module.modules()) + list(getattr(module, "stages", lambda: [])())
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)


def one_telemetry_step(config) -> dict:
    """Build this rank's engine as training does, take step 1 with per-layer norms and measure it: the record, the
    step's outcome, the LR it applied and the (local) weights before and after."""
    from megatron_mixln.train.engine import build_engine, build_layout, build_training_model, init_distributed
    from megatron_mixln.train.step import make_step_engine
    from megatron_mixln.train.telemetry import measure, telemetry_due

    init_distributed()
    layout = build_layout(config)
    engine, optimizer, _ = build_engine(build_training_model(config, layout), config, layout)
    steps = make_step_engine(engine, config, layout)
    every = micro_batches(config)
    batches = every[layout.dp_rank::layout.dp]  # this data-parallel rank's share of the global batch
    before = {name: p.detach().double().clone() for name, p in engine.module.named_parameters()}
    lr = optimizer.param_groups[0]["lr"]
    targets = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in every)
    assert telemetry_due(config.train, 1)
    outcome = steps.train_step(1, batches, targets, want_layer_norms=True)
    hooks = hook_count(engine.module)
    record = measure(steps, batches, outcome)
    # Nothing stays armed for the next (non-telemetry) step: no hook, no attention or head flag.
    assert hook_count(engine.module) == hooks
    assert not any(getattr(m, "record_max_logit", False) or getattr(m, "record_log_partition", False)
                   for m in engine.module.modules())
    after = {name: p.detach().double().clone() for name, p in engine.module.named_parameters()}
    return {"record": record, "applied": outcome.applied, "grad_norms": outcome.layer_grad_norms,
            "update_norms": outcome.layer_update_norms, "lr": lr, "before": before, "after": after}


@pytest.fixture(scope="module")
def single():
    config = load_config(None, OVERRIDES)
    return {"config": config, **one_telemetry_step(config)}


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE written out in float64 ([batch, heads, seq, head_dim]; HF LLaMA's two-halves convention)."""
    dim, seq = x.shape[-1], x.shape[-2]
    frequencies = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * frequencies[None, :]
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    first, second = x[..., :dim // 2], x[..., dim // 2:]
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def float64_reference(config, weights: dict[str, torch.Tensor], batches) -> dict:
    """The telemetry's quantities from a float64 copy of the model: forward hooks on the layers' outputs, q.k from
    the q/k projections' outputs, log Z from the logits."""
    model = MixLNForCausalLM(config.model).double().eval()
    model.load_state_dict(weights)
    heads, head_dim = config.model.num_heads, config.model.head_dim
    streams: dict[str, list[torch.Tensor]] = {}
    projections: dict[tuple[int, str], torch.Tensor] = {}
    logits_max: dict[str, float] = {}

    def keep(key):
        return lambda _m, _args, out: streams.setdefault(key, []).append(hidden_state(out))

    hooks = [model.embedding.register_forward_hook(keep("embed_tokens"))]
    for index, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(keep(f"layer_{index:03d}")))
        for name in ("q_proj", "k_proj"):
            hooks.append(getattr(layer.self_attn, name).register_forward_hook(
                lambda _m, _args, out, key=(index, name): projections.__setitem__(key, out)))
    log_z = []
    with torch.no_grad():
        for inputs, labels in batches:
            logits = model(inputs)
            log_z.append(torch.logsumexp(logits, dim=-1)[labels != IGNORE_INDEX])
            for index in range(config.model.num_layers):
                q, k = (projections[(index, name)].view(*inputs.shape, heads, head_dim).transpose(1, 2)
                        for name in ("q_proj", "k_proj"))
                scores = torch.einsum("bhqd,bhkd->bhqk", rope(q, config.model.rope_theta),
                                      rope(k, config.model.rope_theta)) / math.sqrt(head_dim)
                allowed = torch.ones(inputs.shape[1], inputs.shape[1], dtype=torch.bool).tril()
                key = f"layer_{index:03d}"
                logits_max[key] = max(logits_max.get(key, -math.inf), scores[..., allowed].max().item())
    for hook in hooks:
        hook.remove()
    whole = {key: torch.cat([t.reshape(-1) for t in tensors]) for key, tensors in streams.items()}
    log_z = torch.cat(log_z)
    return {"activation_rms": {key: t.square().mean().sqrt().item() for key, t in whole.items()},
            "activation_max": {key: t.abs().max().item() for key, t in whole.items()},
            "max_attention_logit": logits_max,
            "log_partition_mean": log_z.mean().item(), "log_partition_max": log_z.max().item()}


def assert_close(measured: dict, expected: dict, rel: float) -> None:
    assert measured.keys() == expected.keys()
    for key, value in expected.items():
        assert measured[key] == pytest.approx(value, rel=rel), key


def test_activations_attention_logits_and_log_partition_match_a_float64_model(single):
    record, config = single["record"], single["config"]
    reference = float64_reference(config, single["after"], micro_batches(config))
    assert record["telemetry"] is True
    expected_keys = ["embed_tokens"] + [f"layer_{i:03d}" for i in range(config.model.num_layers)]
    assert list(record["activation_rms"]) == expected_keys
    # The fp32 model against float64: what is left is fp32 rounding through four layers.
    for field in ("activation_rms", "activation_max", "max_attention_logit"):
        assert_close(record[field], reference[field], rel=1e-5)
    # Post-LN layers hand on a normalised stream (RMS ~ 1: unit gains after one SGD step).
    assert all(abs(record["activation_rms"][f"layer_{i:03d}"] - 1) < 0.05 for i in (0, 1))
    if "log_partition_mean" in record:  # from the LM head's statistic (model/llama.py)
        assert record["log_partition_mean"] == pytest.approx(reference["log_partition_mean"], rel=1e-5)
        assert record["log_partition_max"] == pytest.approx(reference["log_partition_max"], rel=1e-5)


def test_update_ratio_is_the_sgd_step_over_the_new_weight_norm_by_hand(single):
    assert single["applied"]
    before, after, lr = single["before"], single["after"], single["lr"]
    change, weight = {}, {}
    for name, value in after.items():
        from megatron_mixln.train.step import layer_norm_key

        key = layer_norm_key(name)
        change[key] = change.get(key, 0.0) + (value - before[name]).square().sum().item()
        weight[key] = weight.get(key, 0.0) + value.square().sum().item()
    ratios = single["record"]["update_ratio"]
    assert ratios.keys() == change.keys() == set(single["grad_norms"])
    for key in ratios:
        # SGD without momentum or decay: the step moved each layer by exactly lr x its gradient norm.
        assert math.sqrt(change[key]) == pytest.approx(lr * single["grad_norms"][key], rel=1e-5), key
        assert ratios[key] == pytest.approx(math.sqrt(change[key] / weight[key]), rel=1e-5), key
    assert 0 < min(ratios.values()) and max(ratios.values()) < 1


def _layout_worker(rank, world, store_path, result_path):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    torch.set_num_threads(1)  # two processes on two cores slow each other ~10x with the default threads
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as init_distributed does on CPU (no g++ build)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False, auto_mpi_discovery=False)  # on the group above
    records = {}
    for name, overrides in LAYOUTS.items():
        records[name] = one_telemetry_step(load_config(None, [*OVERRIDES, *overrides]))["record"]
    torch.save(records, f"{result_path}.{rank}")
    dist.destroy_process_group()


def test_tp2_pp2_and_zero3_dp2_measure_the_single_process_numbers_on_every_rank(single, tmp_path):
    expected = single["record"]
    for rank, records in enumerate(run_gloo_workers(_layout_worker, 2, tmp_path)):
        for layout, record in records.items():
            assert record.keys() == expected.keys(), (layout, rank)
            for field, value in expected.items():
                if isinstance(value, dict):
                    assert_close(record[field], value, rel=1e-5)
                elif isinstance(value, float):
                    assert record[field] == pytest.approx(value, rel=1e-5), (layout, rank, field)


class LiveStorageBytes(TorchDispatchMode):
    """Peak bytes of the storages made inside the block that are alive at the same time. A storage lives while any
    tensor made inside the block views it (a view or an in-place result counts as one more reference, not more
    bytes): tests/test_update_norms.py's meter, which drops a storage with the first tensor on it, would lose a
    matmul's output when its reshaped view outlives it."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.references = 0, 0, {}

    def _released(self, pointer: int, size: int) -> None:
        self.references[pointer] -= 1
        if self.references[pointer] == 0:
            del self.references[pointer]
            self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.untyped_storage().nbytes() == 0:
                continue
            pointer, size = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
            outside = pointer not in self.references and any(
                isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == pointer
                for t in pytree.tree_leaves((args, kwargs)))
            if outside:  # a view of a tensor made before the block
                continue
            if pointer not in self.references:
                self.live += size
                self.peak = max(self.peak, self.live)
            self.references[pointer] = self.references.get(pointer, 0) + 1
            weakref.finalize(tensor, self._released, pointer, size)
        return out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dry_run_counts_the_telemetry_logits_as_measured(precision):
    from megatron_mixln.model.layers import max_causal_logit
    from megatron_mixln.train.memory import telemetry_attention_bytes

    config = load_config(None, [*OVERRIDES, "train.micro_batch_size=2", f"train.precision={precision}",
                                       "parallel.zero_stage=1"])
    model, micro, seq = config.model, config.train.micro_batch_size, config.data.seq_len
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    q, k = (torch.randn(micro, model.num_heads, seq, model.head_dim).to(dtype) for _ in range(2))
    with LiveStorageBytes() as meter:
        max_causal_logit(q, k)
    planned = telemetry_attention_bytes(config)
    # By hand: 2 x 2 heads x 32 x 32 fp32 logits, and the 32 x 32 mask (fp32) or q and k in fp32 (bf16).
    assert planned["bytes"] == 4 * 2 * 2 * 32 * 32 + (32 * 32 if precision == "fp32" else 2 * 4 * 2 * 32 * 32)
    assert planned["bytes"] <= meter.peak <= planned["bytes"] + 64  # + the scalar result


def test_dry_run_plans_telemetry_steps_only_when_they_are_on():
    from megatron_mixln.train.memory import GIB, dry_run_report, dry_run_summary

    from training_runs import ROOT

    LONG = ["data.seq_len=4096", "model.max_seq_len=4096"]  # the paper's 7B context
    def plan(*overrides):
        config = load_config(ROOT / "configs/llama_7b.yaml", [*LONG, "parallel.tp=2", "train.layer_grad_norm_every=0",
                                                              *overrides])
        summary = dry_run_summary(config, 16, 8)
        return summary, {e["name"]: e for e in summary["working_memory"]["lines"]}, dry_run_report(config, 16, 8)

    off, off_lines, _ = plan()
    on, on_lines, report = plan("train.telemetry_every=50")
    assert "telemetry attention logits" not in off_lines and off["bytes"]["update_norm_host"] == 0
    line = on_lines["telemetry attention logits"]
    config = load_config(ROOT / "configs/llama_7b.yaml", LONG)
    heads, seq, micro = config.model.num_heads // 2, config.data.seq_len, config.train.micro_batch_size
    fp32_qk = 2 * 4 * micro * seq * config.model.hidden_size // 2 if config.train.precision == "bf16" else 0
    assert line["bytes"] == 4 * micro * heads * seq * seq + max(seq * seq, fp32_qk) and line["counted"]
    assert on["bytes"]["working_memory"] - off["bytes"]["working_memory"] == line["bytes"] + \
        on_lines["update-norm change"]["bytes"]  # telemetry steps read the update norms: their line comes too
    assert on["bytes"]["update_norm_host"] == on["bytes"]["parameters"]
    assert "telemetry attention logits" in report and "every 50 steps (telemetry)" in report
    # 4 x 16 heads x 4096^2 x 4 B, and bf16 q and k in fp32 (4 x 4096 x 2048 x 4 B each): worth planning for
    assert line["bytes"] == 4 * GIB + GIB // 4


def test_analyze_plots_telemetry_by_depth_and_marks_guard_events_on_the_loss(tmp_path):
    import json
    from types import SimpleNamespace

    from matplotlib.patches import Rectangle

    from megatron_mixln.analysis import figures, guard_events, loss_curves, telemetry_by_depth

    layers = [f"layer_{i:03d}" for i in range(4)]
    records = [{"step": s, "loss": 7.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 61)]
    records[40]["loss"] = 9.1  # step 41
    for step in (10, 20, 30, 40):
        records.append({"step": step, "telemetry": True,
                        "activation_rms": {"embed_tokens": 0.02, **{k: (i + 1) * step / 10 for i, k in enumerate(layers)}},
                        "activation_max": {k: 3.0 * (i + 1) for i, k in enumerate(layers)},
                        "max_attention_logit": {k: step / 10 + i for i, k in enumerate(layers)},
                        "update_ratio": {"lm_head": 0.1, **{k: 1e-3 * (i + 1) for i, k in enumerate(layers)}},
                        "log_partition_mean": 5.0 + step / 100, "log_partition_max": 6.0})
    records += [{"step": 41, "event": "outlier", "action": "skip", "reason": "loss", "loss": 9.1, "grad_norm": 3.2,
                 "loss_threshold": 7.5, "grad_norm_threshold": 2.0},
                {"step": 30, "event": "rollback", "trigger_step": 44, "to_step": 30, "skipped_batches": [31, 44],
                 "rollbacks": 1},
                {"step": 60, "event": "collapse", "reason": "zero gradient norm"}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))

    t = telemetry_by_depth(metrics)
    assert t.steps == [10, 20, 30, 40] and t.layers == layers
    assert t.by_layer["activation_rms"][2].tolist() == [3.0, 6.0, 9.0, 12.0]  # layer 2 at each step
    assert t.other["update_ratio"]["lm_head"].tolist() == [0.1] * 4
    assert t.log_partition["mean"].tolist() == [5.1, 5.2, 5.3, 5.4]
    events = guard_events(metrics)
    assert [e["event"] for e in events] == ["outlier", "rollback", "collapse"]

    config = load_config(None, OVERRIDES)  # Mix-LN: layers 0 and 1 Post-LN
    a = SimpleNamespace(label="run", colour=figures.run_colour(0), telemetry=t, events=events,
                        curves=loss_curves(metrics), run=SimpleNamespace(config=config))
    fig, _ = figures.plot_loss_curves([a])
    ax = fig.axes[0]
    crosses = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in crosses] == [(41, 9.1)]
    spans = [(p.get_x(), p.get_x() + p.get_width()) for p in ax.patches if isinstance(p, Rectangle)]
    assert spans == [(30, 44)]  # to_step .. trigger_step
    assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"] == [60]
    assert {"guard: outlier step", "guard: collapse"} <= {t.get_text() for t in ax.get_legend().get_texts()}

    fig, _ = figures.plot_telemetry_maps([a])
    meshes = [c for axis in fig.axes[:2] for c in axis.collections]  # the panels; colour bars come after
    assert len(meshes) == 2  # activation RMS and max attention logit, layer x step
    assert meshes[1].get_array().reshape(4, 4).tolist() == t.by_layer["max_attention_logit"].tolist()

    fig, _ = figures.plot_telemetry_curves([a])
    rms = {line.get_linestyle(): line.get_ydata().tolist() for line in fig.axes[0].get_lines()}
    assert rms["-"] == pytest.approx([1.5, 3.0, 4.5, 6.0])  # mean of the Post-LN layers 0 and 1
    assert rms["--"] == pytest.approx([3.5, 7.0, 10.5, 14.0])  # mean of layers 2 and 3


def test_bench_plans_the_guard_and_telemetry_pair_after_the_targets_and_prints_its_ratios():
    from megatron_mixln.benchmarks.train_throughput import plan_cases, targets

    plain = plan_cases(["1b"], ["pre", "mix"], ["triton", "torch"], ["eager"], ["fused"])
    cases = plan_cases(["1b"], ["pre", "mix"], ["triton", "torch"], ["eager"], ["fused"], ["off", "on"])
    pairs = 3  # Mix-LN / Pre-LN, triton / torch: tests/test_bench_train.py
    assert cases[:pairs] == plain[:pairs] and cases[pairs] == ("1b", "mix", "triton", "eager", "fused", "on")
    assert cases[pairs + 1:] == plain[pairs:]  # the secondary cases unchanged, after it

    def row(seconds, **extra):
        return dict(model="1b", placement="mix", kernels="triton", execution="eager", loss="fused",
                    step_seconds=seconds, mfu_datasheet=None, **extra)

    lines = targets([row(0.200), row(0.201, stability="on", guard_action="skip", telemetry_every=50,
                                      telemetry_step_seconds=0.5)])
    assert ("- guard.action=skip + telemetry / off step time between telemetry steps, 1b mix triton eager fused: "
            "1.005 (within 1%)") in lines
    # The telemetry step costs 0.5 - 0.201 s more; over 50 steps: (0.201 + 0.299 / 50) / 0.200 = 1.035.
    assert ("- telemetry step, 1b mix triton eager fused: 500.0 ms (2.49x a step); amortised over "
            "train.telemetry_every=50 steps, on / off step time 1.035") in lines


def test_bench_runs_the_pair_and_times_a_telemetry_step(tmp_path, request):
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    small = ["model.num_layers=2", "model.hidden_size=32", "model.intermediate_size=64", "model.num_heads=2",
             "model.vocab_size=256", "data.seq_len=16", "model.max_seq_len=16", "train.micro_batch_size=2"]
    proc = subprocess.run([sys.executable, "-m", "megatron_mixln.benchmarks.train_throughput", "--placements", "mix",
                           "--stability", "off", "on", "--telemetry-every", "2", "--steps", "3", "--warmup", "1",
                           "--json", str(out), *small], capture_output=True, text=True, cwd=request.config.rootpath,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    off, on = json.loads(out.read_text())["rows"]
    assert (off["stability"], on["stability"], on["guard_action"], on["telemetry_every"]) == ("off", "on", "skip", 2)
    # Steps numbered so that the last timed one is a telemetry step: it is timed apart from the others.
    assert on["telemetry_step_seconds"] > 0
    assert "| tiny | mix + guard, telemetry | torch | eager | fused |" in proc.stdout
    assert "telemetry / off step time between telemetry steps, tiny mix torch eager fused:" in proc.stdout
