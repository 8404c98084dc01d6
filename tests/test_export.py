"""The consolidated export: per-unit safetensors shards + transformers' index, written one unit at a time.

References are independent of the writer: the model's own state dict, safetensors' reader, transformers'
sharded-checkpoint loader, and weak references that see which gathered tensors are still alive.
"""
import json
import re
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open

from megatron_mixln import ModelConfig
from megatron_mixln.model import build_model
from megatron_mixln.parallel.tensor_parallel import TensorParallel
from megatron_mixln.train import checkpoint as ckpt
from megatron_mixln.train import export, module_export

ROOT = Path(__file__).parent.parent
LAYERS = 3
CONFIG = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_layers=LAYERS, num_heads=2,
                     max_seq_len=16, norm_placement="mix", mix_alpha=0.34)
ONE_PROCESS = SimpleNamespace(pp=1, dp_rank=0, stage=0, tensor_parallel=TensorParallel())


def unit_of(name: str) -> str:
    """Independent of the writer's own mapping: 'embed', 'layer <i>' or 'head'."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    if match:
        return f"layer {match.group(1)}"
    return "embed" if name.startswith("model.embed_tokens.") else "head"


def shard_contents(folder: Path) -> dict[str, list[str]]:
    """file -> tensor names, read from the shards themselves."""
    contents = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            contents[path.name] = list(handle.keys())
    return contents


@pytest.fixture
def model():
    return build_model(CONFIG, seed=3)


def test_export_writes_one_shard_per_unit_and_a_transformers_index(model, tmp_path):
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

    reference = model.state_dict()
    out = export.export_consolidated(reference, CONFIG, tmp_path / "export")
    assert not (tmp_path / "export.partial").exists()
    contents = shard_contents(out)
    assert sorted(contents) == [f"model-{k:05d}-of-{LAYERS + 2:05d}.safetensors" for k in range(1, LAYERS + 3)]
    # Shard k holds exactly unit k-1: embedding, layer 0, ..., layer L-1, final norm + LM head.
    units = ["embed"] + [f"layer {i}" for i in range(LAYERS)] + ["head"]
    for (file, names), unit in zip(sorted(contents.items()), units):
        assert names and {unit_of(name) for name in names} == {unit}, (file, names)

    assert export.EXPORT_INDEX == SAFE_WEIGHTS_INDEX_NAME
    index = json.loads((out / SAFE_WEIGHTS_INDEX_NAME).read_text())
    in_files = [(name, file) for file, names in contents.items() for name in names]
    assert len(in_files) == len(dict(in_files)) == len(reference)  # every tensor in exactly one file ...
    assert index["weight_map"] == dict(in_files)  # ... and that is the file the index names
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in reference.values())

    # transformers' own sharded-checkpoint loader reads it (strict: same names as the model).
    from transformers.trainer_utils import load_sharded_checkpoint

    fresh = build_model(CONFIG, seed=4)
    load_sharded_checkpoint(fresh, str(out), strict=True)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, reference[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exported_model_reads_back_exactly(model, tmp_path, dtype):
    model = model.to(dtype)
    out = export.export_consolidated(model.state_dict(), CONFIG, tmp_path / "export", extra={"step": 7})
    loaded = export.load_exported_model(out)
    assert json.loads((out / export.EXPORT_CONFIG).read_text())["step"] == 7
    reference = model.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    for name, value in loaded.state_dict().items():
        assert value.dtype == dtype and torch.equal(value, reference[name]), name


def write_old_layout(model, folder: Path, stages: int) -> None:
    """An export as written before per-unit shards: one model.safetensors, or one file per pipeline stage."""
    export.export_consolidated(model.state_dict(), CONFIG, folder)  # for config.json
    for path in folder.glob("model*"):
        path.unlink()
    names = list(model.state_dict())
    if stages == 1:
        safetensors.torch.save_file(model.state_dict(), str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    cut = names.index("model.layers.2.self_attn.q_proj.weight")  # stage 0: embedding + layers 0-1
    for stage, part in enumerate((names[:cut], names[cut:])):
        safetensors.torch.save_file({n: model.state_dict()[n] for n in part},
                                    str(folder / f"model-{stage + 1:05d}-of-00002.safetensors"))


@pytest.mark.parametrize("stages", [1, 2])
def test_older_export_layouts_still_load(model, tmp_path, stages):
    folder = tmp_path / "old"
    write_old_layout(model, folder, stages)
    assert not (folder / export.EXPORT_INDEX).exists()
    reference = model.state_dict()
    _, tensors = export.read_export(folder)
    assert tensors.keys() == reference.keys() and all(torch.equal(tensors[n], reference[n]) for n in reference)
    loaded = export.load_exported_model(folder)
    assert all(torch.equal(v, reference[n]) for n, v in loaded.state_dict().items())
    other = build_model(CONFIG, seed=9)
    module_export.load_export_into(other, folder, CONFIG, ONE_PROCESS)
    assert all(torch.equal(v, reference[n]) for n, v in other.state_dict().items())


def test_load_export_into_reads_the_per_unit_layout(model, tmp_path):
    out = export.export_consolidated(model.state_dict(), CONFIG, tmp_path / "export")
    other = build_model(CONFIG, seed=9)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)
    module_export.load_export_into(other, out, CONFIG, ONE_PROCESS)
    assert all(torch.equal(v, model.state_dict()[n]) for n, v in other.state_dict().items())


def test_index_naming_a_missing_shard_is_one_clear_error(model, tmp_path):
    out = export.export_consolidated(model.state_dict(), CONFIG, tmp_path / "export")
    (out / f"model-00002-of-{LAYERS + 2:05d}.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"lists model-00002-of-00005\.safetensors, which is not in"):
        export.read_export(out)
    (out / export.EXPORT_INDEX).write_text('{"weight_map": {"x": "../elsewhere.safetensors"}}')
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors\.index\.json is not a safetensors shard index"):
        export.read_export(out)


def alive_at_each_write(monkeypatch, export_call):
    """Run `export_call` with the memory of every tensor full_named_parameters yields tracked; return, for each
    safetensors write, (names written, names whose memory is still alive, last name yielded).

    Each yielded tensor is a view of a numpy array, which its storage keeps alive: a weak reference to the
    array dies exactly when the memory is freed, whatever views or detached aliases were made of it."""
    yielded: dict[str, weakref.ref] = {}
    order: list[str] = []
    real_gather, real_save = module_export.full_named_parameters, safetensors.torch.save_file

    def tracked(*args, **kwargs):
        for name, value in real_gather(*args, **kwargs):
            array = value.numpy().copy()
            yielded[name] = weakref.ref(array)
            order.append(name)
            value = torch.from_numpy(array)
            del array
            yield name, value
            del value

    writes = []

    def recording_save(tensors, filename, metadata=None):
        alive = {name for name, ref in yielded.items() if ref() is not None}
        writes.append((set(tensors), alive, order[-1]))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(module_export, "full_named_parameters", tracked)
    monkeypatch.setattr(safetensors.torch, "save_file", recording_save)
    export_call()
    still_alive = {name for name, ref in yielded.items() if ref() is not None}
    return writes, still_alive


def test_writer_holds_one_unit_at_a_time(model, tmp_path, monkeypatch):
    writes, still_alive = alive_at_each_write(
        monkeypatch, lambda: module_export.export_from_module(model, CONFIG, ONE_PROCESS, tmp_path / "export"))
    units = {}
    for name, _ in model.named_parameters():
        units.setdefault(unit_of(name), set()).add(name)
    assert [written for written, _, _ in writes] == list(units.values())  # one write per unit, in order
    for written, alive, incoming in writes:
        # Alive while a unit is written: that unit, and the first tensor of the next (it triggered the write).
        assert alive <= written | {incoming}, sorted(alive - written)
        assert len(alive) <= max(len(names) for names in units.values()) + 1
    assert not still_alive  # nothing kept once the export returns

    # The probe can fail: the former export (the whole stage in one dict) shows every tensor alive.
    def whole_stage():
        tensors = dict(module_export.full_named_parameters(model, CONFIG, ONE_PROCESS))
        safetensors.torch.save_file(tensors, str(tmp_path / "whole.safetensors"))

    monkeypatch.undo()
    [(written, alive, _)] = alive_at_each_write(monkeypatch, whole_stage)[0]
    assert len(alive) == len(written) == len(list(model.parameters()))


# ------------------------------------------------------------------------------------------------
# Two processes (gloo, FileStore: no ports), through the training code's model build.
# ------------------------------------------------------------------------------------------------
TINY = ["model.vocab_size=320", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=4",
        "model.num_heads=2", "model.max_seq_len=32", "data.seq_len=32", "model.mix_alpha=0.5", "train.precision=fp32",
        "train.global_batch_size=4", "train.micro_batch_size=1"]
LAYOUTS = {"one process": (1, []), "pp2": (2, ["parallel.pp=2"]), "tp2": (2, ["parallel.tp=2"]),
           "dp2 zero-3": (2, ["parallel.zero_stage=3"])}


def _export_worker(rank, world, store_path, runs):
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # DeepSpeed reads these
    import deepspeed

    from megatron_mixln.config import load_config
    from megatron_mixln.train.engine import build_layout
    from megatron_mixln.train.loop import build_training_model

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as init_distributed: no JIT-compiled op
    deepspeed.init_distributed(dist_backend="gloo", verbose=False, auto_mpi_discovery=False)
    for overrides, out in runs:  # one layout after another in the same processes, as train() builds them
        config = load_config(ROOT / "configs" / "tiny.yaml", [*TINY, *overrides])
        layout = build_layout(config)
        module = build_training_model(config, layout)
        module_export.export_from_module(module, config.model, layout, Path(out) / "export")
        # Load it back into a differently initialised model of the same layout, and export that again.
        other = build_training_model(load_config(ROOT / "configs" / "tiny.yaml",
                                                 [*TINY, *overrides, "train.seed=99"]), layout)
        module_export.load_export_into(other, Path(out) / "export", config.model, layout)
        module_export.export_from_module(other, config.model, layout, Path(out) / "reloaded")
    dist.destroy_process_group()


def run_exports(tmp_path: Path, *layouts: str) -> dict[str, Path]:
    """Each of `layouts` (of one world size) exported in one launch, which costs more than an export: the folder
    of each."""
    [world] = {LAYOUTS[layout][0] for layout in layouts}
    outs = {layout: tmp_path / layout.replace(" ", "-") for layout in layouts}
    mp.start_processes(_export_worker, args=(world, str(tmp_path / "store"),
                                             [(LAYOUTS[layout][1], str(outs[layout])) for layout in layouts]),
                       nprocs=world, start_method="spawn", join=True)
    return outs


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run_exports(tmp_path_factory.mktemp("single"), "one process")["one process"]


TWO_PROCESS_LAYOUTS = ["pp2", "tp2", "dp2 zero-3"]


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    return run_exports(tmp_path_factory.mktemp("two-process"), *TWO_PROCESS_LAYOUTS)


@pytest.mark.slow
@pytest.mark.parametrize("layout", TWO_PROCESS_LAYOUTS)
def test_two_process_export_equals_the_single_process_one(one_process, two_process, layout):
    out = two_process[layout]
    _, reference = export.read_export(one_process / "export")
    assert len(reference) == 4 * 9 + 3
    for folder in ("export", "reloaded"):
        assert shard_contents(out / folder) == shard_contents(one_process / "export")  # same files, same names
        _, tensors = export.read_export(out / folder)
        assert tensors.keys() == reference.keys()
        for name, value in reference.items():
            assert torch.equal(tensors[name], value), (folder, name)
