"""Moving a run between layouts: `mixln-export` of a DeepSpeed checkpoint of any layout and ZeRO stage, and
`train.resume=<export>` carrying the optimiser state (Adam's moments, its step count, the LR schedule's position)
into another layout.

The references are independent of the code under test: the consolidated export a run writes itself at the same
step (its live module, gathered by the run), and the losses of a straight run that never moved. A control shows
the comparison can fail: without the optimiser state the next losses miss by ~1e-3 relative (tolerance 1e-5).
"""
import json
import re
import shutil
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from megatron_mixln import ModelConfig, cli
from megatron_mixln.config import load_config
from megatron_mixln.model import build_model
from megatron_mixln.parallel.tensor_parallel import TensorParallel
from megatron_mixln.train import checkpoint as ckpt
from megatron_mixln.train import checkpoint_files
from megatron_mixln.train import export, module_export
from megatron_mixln.train.loop import train
from training_runs import MaliciousPickle, result_summary, run_processes, tiny, train_one_after_another


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def run(world: int, overrides: list[str], tmp_path: Path) -> dict:
    """A training run's summary: in this process (one rank) or in `world` spawned processes (rank 0's)."""
    if world == 1:
        return result_summary(train(load_config(None, overrides)))
    ranks = run_processes(world, overrides, tmp_path)
    for rank in ranks:
        assert "error" not in rank, rank.get("traceback")
    return ranks[0]


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ------------------------------------------------------------------------------------------------
# mixln-export of an intermediate checkpoint == the export the run writes at that step
# ------------------------------------------------------------------------------------------------
SLOW = pytest.mark.slow
EXPORT_LAYOUTS = [  # (processes, overrides), id: where DeepSpeed puts the weights differs in each
    pytest.param(1, [], id="zero0"),  # mp_rank_00_model_states.pt
    pytest.param(1, ["parallel.zero_stage=1"], id="zero1"),
    pytest.param(1, ["parallel.zero_stage=2"], id="zero2"),
    pytest.param(1, ["parallel.zero_stage=3"], id="zero3"),  # only in the optimiser files: zero_to_fp32
    pytest.param(1, ["parallel.zero_stage=1", "train.precision=bf16"], id="bf16-zero1"),  # the BF16 optimiser's files
    pytest.param(1, ["parallel.zero_stage=3", "train.precision=bf16"], id="bf16-zero3"),  # fp32 masters cast to bf16
    pytest.param(2, ["parallel.zero_stage=3"], id="dp2-zero3", marks=SLOW),  # partitioned over two DP ranks
    pytest.param(2, ["parallel.tp=2"], id="tp2", marks=SLOW),  # mp_rank_00/01: TP shards to merge
    pytest.param(2, ["parallel.tp=2", "parallel.zero_stage=3"], id="tp2-zero3", marks=SLOW),  # zero_to_fp32 per TP rank
    pytest.param(2, ["parallel.pp=2"], id="pp2", marks=SLOW),  # layer_XX-model_00 files
    pytest.param(2, ["parallel.pp=2", "parallel.zero_stage=1", "train.precision=bf16"], id="pp2-bf16-zero1",
                 marks=SLOW),
    pytest.param(4, ["parallel.tp=2", "parallel.pp=2"], id="tp2xpp2", marks=SLOW),  # layer_XX-model_00/01
]


@pytest.mark.parametrize("world,overrides", EXPORT_LAYOUTS)
def test_mixln_export_of_a_checkpoint_equals_the_runs_own_export(world, overrides, cache, launched, tmp_path):
    if world == 1:
        out = tmp_path / "run"
        first = run(world, tiny(cache, out, *overrides, "train.stop_after_step=3"), tmp_path)
    else:
        first, out = launched("export", world, overrides)
    assert first["stopped_early"]  # a checkpoint of step 3 and the run's own export of step 3
    assert ckpt.latest_checkpoint(out).name == ckpt.tag_for_step(3)

    exported = tmp_path / "exported"
    assert cli._run(cli._export, [str(out), str(exported)]) == 0  # what `mixln-export <run> <out>` runs
    _, mine = export.read_export(exported)
    _, reference = export.read_export(out / "export")
    assert mine.keys() == reference.keys() and len(reference) == 4 * 9 + 3
    bf16 = "train.precision=bf16" in overrides
    for name, value in reference.items():
        assert value.dtype == (torch.bfloat16 if bf16 else torch.float32), name  # the module's dtype
        assert mine[name].dtype == value.dtype and torch.equal(mine[name], value), name
    config = json.loads((exported / export.EXPORT_CONFIG).read_text())
    assert config["step"] == 3 and config["run_config"]["parallel"] == json.loads(
        (out / "export" / export.EXPORT_CONFIG).read_text())["run_config"]["parallel"]
    # ... and weights only: the optimiser state comes with the export a run writes itself.
    assert not (exported / export.EXPORT_OPTIMIZER).exists() and (out / "export" / export.EXPORT_OPTIMIZER).is_file()



def test_mixln_export_rewrites_an_export_and_says_what_a_folder_lacks(cache, tmp_path, capsys):
    out = tmp_path / "run"
    run(1, tiny(cache, out, "train.steps=2"), tmp_path)
    again = tmp_path / "again"
    assert cli._run(cli._export, [str(out / "export"), str(again)]) == 0  # an export folder, read as it is
    _, mine = export.read_export(again)
    _, reference = export.read_export(out / "export")
    assert mine.keys() == reference.keys() and all(torch.equal(mine[n], v) for n, v in reference.items())
    saved = json.loads((out / "export" / export.EXPORT_CONFIG).read_text())
    assert json.loads((again / export.EXPORT_CONFIG).read_text())["run_config"] == saved["run_config"]

    shutil.rmtree(out / ckpt.CHECKPOINTS)  # a run folder whose checkpoints were cleaned: its export is read
    assert cli._run(cli._export, [str(out), str(tmp_path / "from_run")]) == 0
    assert torch.equal(export.read_export(tmp_path / "from_run")[1]["lm_head.weight"], reference["lm_head.weight"])

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli._run(cli._export, [str(empty), str(tmp_path / "x")]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert str(empty) in line and ckpt.STATE_FILE in line and not (tmp_path / "x").exists()


def test_mixln_export_refuses_pickles_and_names_a_missing_file(cache, tmp_path, capsys):
    out = tmp_path / "run"
    run(1, tiny(cache, out, "parallel.zero_stage=3", "train.stop_after_step=2"), tmp_path)
    folder = ckpt.latest_checkpoint(out)
    optim = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with torch.serialization.safe_globals(checkpoint_files.deepspeed_checkpoint_globals()):
        state = torch.load(optim, weights_only=True)
    state["payload"] = MaliciousPickle()
    torch.save(state, optim)
    # zero_to_fp32 asks torch.load for weights_only=False; the export checks every file weights_only first.
    assert cli._run(cli._export, [str(out), str(tmp_path / "x")]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert not MaliciousPickle.ran and f"checkpoint {folder} was refused: {optim.name} holds" in line
    assert "weights_only=False" not in line and not (tmp_path / "x").exists()

    out = tmp_path / "zero0"
    run(1, tiny(cache, out, "train.stop_after_step=2"), tmp_path)
    (ckpt.latest_checkpoint(out) / "mp_rank_00_model_states.pt").unlink()
    assert cli._run(cli._export, [str(out), str(tmp_path / "y")]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "mp_rank_00_model_states.pt is missing" in line and not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------------------------
# train.resume=<export>: the next losses of a moved run are the straight run's
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory):
    """One process, fp32, ZeRO-0: six steps straight, and the same run stopped after step 3 (its export)."""
    tmp = tmp_path_factory.mktemp("straight")
    whole = run(1, tiny(cache, tmp / "straight"), tmp)
    run(1, tiny(cache, tmp / "stopped", "train.stop_after_step=3"), tmp)
    return whole, tmp / "stopped" / "export"


def assert_continues(moved: dict, whole: dict, exact: bool) -> None:
    assert sorted(moved["losses"], key=int) == ["4", "5", "6"]
    for step in ("4", "5", "6"):
        if exact:
            assert moved["losses"][step] == whole["losses"][step], step
        else:
            assert rel(moved["losses"][step], whole["losses"][step]) < 1e-5, step


MOVES = [  # (processes, overrides of the moved run, exact), id: from one process, fp32, ZeRO-0
    # The same arithmetic in one process at another ZeRO stage (flat fp32 partitions, the same Adam): exact.
    pytest.param(1, ["parallel.zero_stage=3"], True, id="to-one-process-zero3"),
    pytest.param(1, ["parallel.zero_stage=1"], True, id="to-one-process-zero1"),
    pytest.param(2, ["parallel.zero_stage=1"], False, id="to-dp2-zero1", marks=SLOW),
    pytest.param(2, ["parallel.tp=2"], False, id="to-tp2", marks=SLOW),
    pytest.param(2, ["parallel.pp=2"], False, id="to-pp2", marks=SLOW),
]


@pytest.mark.parametrize("world,overrides,exact", MOVES)
def test_a_run_moved_with_its_optimiser_state_continues_as_the_straight_run(world, overrides, exact, straight, cache,
                                                                             launched, tmp_path, capsys):
    whole, moving = straight
    assert json.loads((moving / export.EXPORT_OPTIMIZER).read_text())["states"] == ["exp_avg", "exp_avg_sq"]
    if world == 1:
        moved = run(world, tiny(cache, tmp_path / "moved", *overrides, f"train.resume={moving}"), tmp_path)
    else:
        moved = launched("move", world, overrides)[0]
    assert_continues(moved, whole, exact)
    if world == 1:
        assert "(weights and optimiser state: exp_avg, exp_avg_sq at optimiser step 3)" in capsys.readouterr().out


BACK = [  # (processes, overrides of the parallel run, overrides of the run moved back), id
    pytest.param(2, ["parallel.pp=2"], ["parallel.zero_stage=2"], id="pp2-to-one-process-zero2"),
    pytest.param(2, ["parallel.zero_stage=3"], [], id="dp2-zero3-to-one-process-zero0"),
    pytest.param(2, ["parallel.tp=2", "parallel.zero_stage=1"], ["parallel.pp=2"], id="tp2-zero1-to-pp2"),
]


@pytest.fixture(scope="module")
def launched(cache, straight, tmp_path_factory):
    """launched(kind, world, overrides) -> (rank 0's summary, out_dir) of a multi-process run of this file: an
    "export" run of EXPORT_LAYOUTS (stopped after step 3), a "move" of MOVES (resumed from the straight run's
    export) or the "parallel" run of BACK (stopped after step 3). All the runs of one world size are trained in
    one launch, on first use: a launch costs more than these runs."""
    folder = tmp_path_factory.mktemp("launched")
    _, moving = straight
    planned = {}  # (kind, world, overrides) -> overrides of the run
    for kind, params, extra in (("export", EXPORT_LAYOUTS, ["train.stop_after_step=3"]),
                                ("move", MOVES, [f"train.resume={moving}"]),
                                ("parallel", BACK, ["train.stop_after_step=3"])):
        for param in params:
            world, overrides = param.values[:2]
            if world > 1:
                planned[(kind, world, tuple(overrides))] = tiny(cache, folder / f"{kind}-{param.id}", *overrides,
                                                                *extra)
    done = {}

    def result(kind: str, world: int, overrides: list[str]) -> tuple[dict, Path]:
        key = (kind, world, tuple(overrides))
        if key not in done:
            keys = [each for each in planned if each[1] == world]
            done.update(zip(keys, train_one_after_another(world, [planned[each] for each in keys], folder)))
        for rank in done[key]:
            assert "error" not in rank, rank.get("traceback", rank["error"])
        out = next(o for o in planned[key] if o.startswith("train.out_dir=")).split("=", 1)[1]
        return done[key][0], Path(out)

    return result


@SLOW
@pytest.mark.parametrize("world,overrides,back", BACK)
def test_a_run_moves_back_from_a_parallel_layout(world, overrides, back, straight, cache, launched, tmp_path):
    whole, _ = straight
    moving = launched("parallel", world, overrides)[1] / "export"
    back_world = 2 if "parallel.pp=2" in back else 1
    moved = run(back_world, tiny(cache, tmp_path / "back", *back, f"train.resume={moving}"), tmp_path)
    assert_continues(moved, whole, exact=False)


def test_without_the_optimiser_state_the_next_losses_differ(straight, cache, tmp_path, capsys):
    """The control: the same move as to-one-process-zero1 with the weights only. Step 4's loss needs only the
    weights; steps 5 and 6 follow an update from fresh moments and miss the straight run by far more than 1e-5."""
    whole, moving = straight
    weights_only = tmp_path / "weights-only"
    shutil.copytree(moving, weights_only)
    (weights_only / export.EXPORT_OPTIMIZER).unlink()
    moved = run(1, tiny(cache, tmp_path / "moved", "parallel.zero_stage=1", f"train.resume={weights_only}"), tmp_path)
    assert "(weights only: optimiser moments start fresh)" in capsys.readouterr().out
    assert moved["losses"]["4"] == whole["losses"]["4"]
    for step in ("5", "6"):
        assert rel(moved["losses"][step], whole["losses"][step]) > 1e-4, step


def test_bf16_moves_with_its_fp32_master_weights_exactly(cache, tmp_path):
    """bf16 keeps fp32 master weights; the export carries them with the moments, so a bf16 run stopped and
    continued from its export (here ZeRO-1, the BF16 optimiser) is the straight run bit for bit."""
    bf16 = ["parallel.zero_stage=1", "train.precision=bf16"]
    whole = run(1, tiny(cache, tmp_path / "straight", *bf16), tmp_path)
    run(1, tiny(cache, tmp_path / "stopped", *bf16, "train.stop_after_step=3"), tmp_path)
    moving = tmp_path / "stopped" / "export"
    meta = json.loads((moving / export.EXPORT_OPTIMIZER).read_text())
    assert meta["states"] == ["exp_avg", "exp_avg_sq", export.MASTER_WEIGHTS] and meta["step"] == 3
    _, weights = export.read_export(moving)
    masters = {}
    for file in set(meta["weight_map"][export.MASTER_WEIGHTS].values()):  # read with safetensors' own reader
        masters.update(load_file(str(moving / file)))
    assert masters.keys() == weights.keys()
    for name, value in weights.items():  # the bf16 weights are the rounding of the fp32 masters
        assert masters[name].dtype == torch.float32 and torch.equal(masters[name].to(torch.bfloat16), value), name
    moved = run(1, tiny(cache, tmp_path / "moved", *bf16, f"train.resume={moving}"), tmp_path)
    assert_continues(moved, whole, exact=True)
    assert moved["eval_loss"] == whole["eval_loss"]


# ------------------------------------------------------------------------------------------------
# One process, no DeepSpeed: the torch optimiser's own state (what fp32 ZeRO-0 hands through)
# ------------------------------------------------------------------------------------------------
SMALL = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_layers=3, num_heads=2, max_seq_len=16,
                    norm_placement="mix", mix_alpha=0.34)
ONE_PROCESS = SimpleNamespace(pp=1, dp_rank=0, stage=0, tensor_parallel=TensorParallel())


def stepped_adam(seed: int):
    """A small model and a torch Adam that has taken two steps (random gradients), with its LR schedule."""
    model = build_model(SMALL, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(2):
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def unit_of(name: str) -> str:
    """Independent of the writer's own mapping: 'embed', 'layer <i>' or 'head'."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    if match:
        return f"layer {match.group(1)}"
    return "embed" if name.startswith("model.embed_tokens.") else "head"


def test_the_torch_optimisers_state_goes_through_the_export_exactly(tmp_path):
    model, optimizer, scheduler = stepped_adam(seed=1)
    out = module_export.export_from_module(model, SMALL, ONE_PROCESS, tmp_path / "export", extra={"step": 2},
                                           optimizer=optimizer, scheduler=scheduler)
    meta = json.loads((out / export.EXPORT_OPTIMIZER).read_text())
    assert (meta["optimizer"], meta["step"], meta["lr_schedule_step"], meta["states"]) == (
        "Adam", 2, 2, ["exp_avg", "exp_avg_sq"])  # fp32 weights: no separate master copy

    other = build_model(SMALL, seed=5)
    fresh = torch.optim.Adam(other.parameters(), lr=1e-2)
    assert not fresh.state  # torch creates it at the first step; the load must create it
    loaded = module_export.load_export_into(other, out, SMALL, ONE_PROCESS, optimizer=fresh)
    assert (loaded.step, loaded.schedule_step, loaded.states, loaded.optimizer_step) == (
        2, 2, ("exp_avg", "exp_avg_sq"), 2)
    originals = dict(model.named_parameters())
    for name, param in other.named_parameters():
        assert torch.equal(param, originals[name]), name
        mine, theirs = fresh.state[param], optimizer.state[originals[name]]
        assert mine.keys() == theirs.keys() == {"step", "exp_avg", "exp_avg_sq"}, name
        assert all(torch.equal(mine[key], theirs[key]) and mine[key].dtype == theirs[key].dtype for key in mine), name

    # ... so the next update is the same (at the same LR: the loop puts the schedule at loaded.schedule_step).
    fresh.param_groups[0]["lr"] = optimizer.param_groups[0]["lr"]
    for a, b in zip(model.parameters(), other.parameters()):
        a.grad = b.grad = torch.full_like(a, 0.5)
    optimizer.step(), fresh.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))

    # An export without the optimiser (mixln-export, older runs) loads the weights only, and says so.
    bare = module_export.export_from_module(model, SMALL, ONE_PROCESS, tmp_path / "bare", extra={"step": 3})
    assert not (bare / export.EXPORT_OPTIMIZER).exists()
    loaded = module_export.load_export_into(build_model(SMALL, seed=6), bare, SMALL, ONE_PROCESS,
                                            optimizer=torch.optim.Adam(other.parameters()))
    assert (loaded.step, loaded.schedule_step, loaded.states) == (3, 3, ()) and "weights only" in loaded.note


def test_the_optimiser_state_is_written_one_unit_at_a_time(tmp_path, monkeypatch):
    """Like the weights (test_export.py), each state is held for one unit at most: alive while a shard is
    written are that unit's tensors and those of the parameter that triggered the write."""
    model, optimizer, scheduler = stepped_adam(seed=2)
    yielded: dict[str, weakref.ref] = {}
    real_states, real_save = module_export.full_optimizer_states, safetensors.torch.save_file

    def tracked(*args, **kwargs):
        for name, states in real_states(*args, **kwargs):
            arrays = {key: value.numpy().copy() for key, value in states.items()}
            for key, array in arrays.items():
                yielded[f"{key}:{name}"] = weakref.ref(array)  # dies exactly when the memory is freed
            states = {key: torch.from_numpy(array) for key, array in arrays.items()}
            del arrays
            yield name, states
            del states

    writes = []

    def recording_save(tensors, filename, metadata=None):
        alive = {name for name, ref in yielded.items() if ref() is not None}
        writes.append((Path(filename).name, alive))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(module_export, "full_optimizer_states", tracked)
    monkeypatch.setattr(safetensors.torch, "save_file", recording_save)
    module_export.export_from_module(model, SMALL, ONE_PROCESS, tmp_path / "export", optimizer=optimizer,
                                     scheduler=scheduler)
    units = ["embed"] + [f"layer {i}" for i in range(SMALL.num_layers)] + ["head"]
    per_unit = {unit: sum(unit_of(name) == unit for name, _ in model.named_parameters()) for unit in units}
    state_writes = [(file, alive) for file, alive in writes if not file.startswith("model-")]
    assert len(state_writes) == 2 * len(units)  # exp_avg and exp_avg_sq, one shard per unit each
    for file, alive in state_writes:
        unit = units[int(file.split("-")[1]) - 1]
        next_unit = units[min(units.index(unit) + 1, len(units) - 1)]
        assert {unit_of(name.split(":", 1)[1]) for name in alive} <= {unit, next_unit}, (file, sorted(alive))
        assert len(alive) <= 2 * (per_unit[unit] + 1), (file, sorted(alive))
    assert not [name for name, ref in yielded.items() if ref() is not None]  # nothing kept once it returns
