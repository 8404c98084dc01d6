"""Damaged run folders, as a cluster leaves them: a checkpoint file cut short, rotten or with a flipped bit, a state
or export file that is not UTF-8 JSON, a full disk during a save, a class smuggled into a checkpoint, a checkpoint
of another model shape, a torn metrics line. Each ends in one sentence naming the folder, the file and the cause;
train.resume=auto falls back past a damaged checkpoint and continues exactly as an undamaged run would."""
import errno
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from megatron_mixln import cli
from megatron_mixln.config import ConfigError, load_config
from megatron_mixln.train import checkpoint as ckpt
from megatron_mixln.train import checkpoint_files
from megatron_mixln.train import export
from megatron_mixln.train.loop import train
from megatron_mixln.train.metrics import DISCARDED_FILE, METRICS_FILE, discard_metrics_after, read_metrics
from training_runs import MaliciousPickle, module_state, run_processes, tiny, tmpfs, train_one_after_another


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory):
    """Losses of uninterrupted 6-step runs, by ZeRO stage: what every resumed run below must reproduce."""
    runs = {}

    def losses(zero: int) -> dict[int, float]:
        if zero not in runs:
            out = tmp_path_factory.mktemp(f"straight{zero}")
            runs[zero] = train(load_config(None, tiny(cache, out, f"parallel.zero_stage={zero}"))).losses
        return runs[zero]
    return losses


ZERO1 = ("parallel.zero_stage=1", "train.save_every=1", "train.keep_checkpoints=4")
OPTIMISER_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL_FILE = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def saved_run(cache, tmp_path_factory):
    """A ZeRO-1 run stopped after step 4 (train.stop_after_step): checkpoints of steps 1-4 and its export. Tests
    damage a copy (`copy_of`)."""
    out = tmp_path_factory.mktemp("saved") / "run"
    train(load_config(None, tiny(cache, out, *ZERO1, "train.stop_after_step=4")))
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def one_sentence(message: str) -> bool:
    return "\n" not in message and "Traceback" not in message and message.endswith(".")


def build_engine(cache, out, *overrides):
    """A fresh engine as train() builds it (weights as initialised, nothing loaded)."""
    from megatron_mixln.train.engine import build_engine as build, build_layout, build_training_model, init_distributed

    config = load_config(None, tiny(cache, out, *overrides))
    init_distributed()
    layout = build_layout(config)
    return build(build_training_model(config, layout), config, layout)[0]


def step_folder(out, step: int) -> Path:
    return Path(out) / ckpt.CHECKPOINTS / ckpt.tag_for_step(step)


def truncate(path: Path, fraction: float = 0.6) -> None:
    os.truncate(path, int(path.stat().st_size * fraction))


def flip_a_bit_in_a_tensor(path: Path) -> None:
    """One bit of the largest tensor's bytes flipped (a bad disk, a bad copy): the file stays a valid torch file."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as handle:
        handle.seek(record.header_offset + 26)  # the local header: 30 bytes, then the name and the extra field
        name_length, extra_length = int.from_bytes(handle.read(2), "little"), int.from_bytes(handle.read(2), "little")
        handle.seek(record.header_offset + 30 + name_length + extra_length + record.file_size // 2)
        byte = handle.read(1)[0]
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte ^ 0x10]))


def not_utf8(path: Path) -> None:
    path.write_bytes(b"\xff\xfe" + path.read_bytes())  # a UTF-16 byte order mark: an editor's re-save


def rot_a_tensor_record(path: Path) -> None:
    """A bad sector in the middle of a file: the local header of its largest tensor record is zeroed. Its zip
    directory and pickle are intact, so only reading the tensors (the real load) finds it."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as handle:
        handle.seek(record.header_offset)
        handle.write(b"\0\0\0\0")


# ----------------------------------------------------------------------------------------- damaged checkpoints


def test_truncated_shard_in_latest_falls_back_to_the_newest_intact_checkpoint_and_continues_exactly(
        cache, tmp_path, saved_run, straight, capsys):
    out = copy_of(saved_run, tmp_path)
    truncate(step_folder(out, 4) / OPTIMISER_FILE)  # the node died while the file system was still flushing it
    capsys.readouterr()
    resumed = train(load_config(None, tiny(cache, out, *ZERO1)))
    printed = capsys.readouterr().out
    assert ("checkpoint step_00000004 is damaged (zero_pp_rank_0_mp_rank_00_optim_states.pt is truncated); "
            "resuming from step_00000003 instead") in printed
    assert sorted(resumed.losses) == [4, 5, 6]
    assert all(resumed.losses[s] == straight(1)[s] for s in (4, 5, 6))
    # The damaged folder is kept for inspection under a name no resume or pruning takes for a checkpoint.
    assert (out / ckpt.CHECKPOINTS / "step_00000004.damaged").is_dir()
    assert ckpt.latest_checkpoint(out).name == "step_00000006"


def test_a_load_that_fails_half_way_is_overwritten_whole_by_the_older_checkpoint(cache, tmp_path, saved_run,
                                                                                 monkeypatch):
    """ZeRO-1: DeepSpeed loads weights and LR schedule from the model-states file, then fails on the rotten
    optimiser shard (a read error after the files were checked); the fallback must leave nothing of that
    half-load behind."""
    out = copy_of(saved_run, tmp_path)
    rot_a_tensor_record(step_folder(out, 4) / OPTIMISER_FILE)
    monkeypatch.setattr(ckpt, "verify_share", lambda folder, rank, world: None)  # what the checks would find
    overrides = ("parallel.zero_stage=1",)

    half = build_engine(cache, tmp_path / "a", *overrides)
    with pytest.raises(ckpt.CheckpointDamaged, match="corrupt") as caught:
        ckpt.load_checkpoint(half, step_folder(out, 4))
    assert one_sentence(str(caught.value)) and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in str(caught.value)
    step4 = module_state(step_folder(out, 4))
    assert all(torch.equal(v, step4[k]) for k, v in half.module.state_dict().items())  # it did half-load
    assert half.lr_scheduler.last_epoch == 4

    fallen_back = build_engine(cache, tmp_path / "b", *overrides)
    folder, state = ckpt.load_latest_intact(fallen_back, out)
    assert folder.name == "step_00000003" and state["step"] == 3
    direct = build_engine(cache, tmp_path / "c", *overrides)
    ckpt.load_checkpoint(direct, step_folder(out, 3))
    assert_same_training_state(fallen_back, direct)
    ckpt.load_checkpoint(half, step_folder(out, 3))  # the same, step by step, on the engine seen half-loaded
    assert_same_training_state(half, direct)


def assert_same_training_state(engine, reference) -> None:
    def flat(value, prefix=""):
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}/").items()}
        if isinstance(value, (list, tuple)):
            return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}{i}/").items()}
        if hasattr(value, "__dict__") and not isinstance(value, torch.Tensor):  # DeepSpeed's loss scaler
            return flat(vars(value), prefix)
        return {prefix: value}

    for name in ("module", "optimizer", "lr_scheduler"):
        mine, theirs = flat(getattr(engine, name).state_dict()), flat(getattr(reference, name).state_dict())
        assert mine.keys() == theirs.keys(), name
        for key, value in mine.items():
            same = torch.equal(value, theirs[key]) if isinstance(value, torch.Tensor) else value == theirs[key]
            assert same, f"{name}: {key}"
    assert engine.global_steps == reference.global_steps


def test_latest_naming_a_missing_folder_and_no_intact_checkpoint_at_all(cache, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, tiny(cache, out, "train.save_every=2", "train.steps=4")))
    engine = build_engine(cache, tmp_path / "x")
    os.rename(step_folder(out, 4), tmp_path / "moved")  # someone moved the newest folder away
    folder, state = ckpt.load_latest_intact(engine, out)
    assert folder.name == "step_00000002" and state["step"] == 2
    assert (out / ckpt.CHECKPOINTS / ckpt.LATEST).read_text() == "step_00000002"  # `latest` names what was used

    truncate(step_folder(out, 2) / "mp_rank_00_model_states.pt")
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.load_latest_intact(engine, out)
    message = str(caught.value)
    assert one_sentence(message) and f"no intact checkpoint in {out / ckpt.CHECKPOINTS}" in message
    assert "step_00000002 is damaged (mp_rank_00_model_states.pt is truncated)" in message
    assert step_folder(out, 2).is_dir()  # nothing is renamed when there is nothing to resume from


def test_a_fresh_run_folder_has_nothing_to_resume(cache, tmp_path):
    assert ckpt.load_latest_intact(build_engine(cache, tmp_path / "x"), tmp_path / "empty") is None



# ----------------------------------------------------------------------------------------- checksums, damaged JSON


def test_a_flipped_bit_torch_cannot_see_and_a_state_file_that_is_not_utf8_are_passed_over_by_resume_auto(
        cache, tmp_path, saved_run, straight, capsys):
    """Step 4's trainer_state.json is not UTF-8, a bit of step 3's optimiser shard and one of step 2's model
    weights are flipped: resume=auto passes over all three and continues from step 1 exactly."""
    out = copy_of(saved_run, tmp_path)
    not_utf8(step_folder(out, 4) / ckpt.STATE_FILE)
    for step, name in ((3, OPTIMISER_FILE), (2, MODEL_FILE)):
        flip_a_bit_in_a_tensor(step_folder(out, step) / name)
        checkpoint_files.load_checkpoint_file(step_folder(out, step) / name)  # torch itself loads it without a word
    capsys.readouterr()
    resumed = train(load_config(None, tiny(cache, out, *ZERO1)))
    printed = capsys.readouterr().out
    assert ("checkpoint step_00000004 is damaged (trainer_state.json is not UTF-8 text (byte 0xff at offset 0)); "
            f"step_00000003 is damaged ({OPTIMISER_FILE} does not match the CRC-32 saved in checksums.json); "
            f"step_00000002 is damaged ({MODEL_FILE} does not match the CRC-32 saved in checksums.json); "
            "resuming from step_00000001 instead") in printed
    assert sorted(resumed.losses) == [2, 3, 4, 5, 6]
    assert all(resumed.losses[s] == straight(1)[s] for s in (2, 3, 4, 5, 6))


@pytest.mark.parametrize("damage", ["state-not-utf8", "model-bit", "optimiser-bit"])
def test_a_damaged_checkpoint_named_explicitly_is_refused_by_mixln_train_and_mixln_export(
        cache, tmp_path, saved_run, damage, capsys):
    out = copy_of(saved_run, tmp_path)
    folder = step_folder(out, 4)
    name = {"state-not-utf8": ckpt.STATE_FILE, "model-bit": MODEL_FILE, "optimiser-bit": OPTIMISER_FILE}[damage]
    not_utf8(folder / name) if damage == "state-not-utf8" else flip_a_bit_in_a_tensor(folder / name)

    with pytest.raises(ckpt.CheckpointDamaged) as caught:
        train(load_config(None, tiny(cache, tmp_path / "new", *ZERO1, f"train.resume={folder}")))
    message = str(caught.value)
    assert one_sentence(message) and f"checkpoint {folder} is damaged: {name} " in message
    for source in (folder, out):  # the checkpoint itself, and the run folder whose `latest` names it
        capsys.readouterr()
        assert cli._run(cli._export, [str(source), str(tmp_path / "exported")]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and f"error: checkpoint {folder} is damaged: {name} " in error
        assert not (tmp_path / "exported").exists()


def test_a_checkpoint_saved_before_checksums_json_loads_and_its_zip_crcs_still_catch_a_flipped_bit(
        cache, tmp_path, saved_run):
    out = copy_of(saved_run, tmp_path)
    for manifest in out.glob(f"{ckpt.CHECKPOINTS}/*/{ckpt.MANIFEST}"):
        manifest.unlink()
    flip_a_bit_in_a_tensor(step_folder(out, 4) / OPTIMISER_FILE)
    with pytest.raises(ckpt.CheckpointDamaged) as caught:
        ckpt.verify_checkpoint(step_folder(out, 4))
    assert one_sentence(str(caught.value)) and f"{OPTIMISER_FILE} is corrupt (Bad CRC-32 for file" in str(caught.value)

    engine = build_engine(cache, tmp_path / "x", "parallel.zero_stage=1")
    folder, state = ckpt.load_latest_intact(engine, out)
    assert folder.name == "step_00000003" and state["step"] == 3
    assert all(torch.equal(v, module_state(folder)[k]) for k, v in engine.module.state_dict().items())


def test_json_files_that_are_not_utf8_or_not_json_are_named_as_damaged(tmp_path, saved_run):
    out = copy_of(saved_run, tmp_path)
    exported = out / "export"
    readers = {export.EXPORT_CONFIG: export.export_files, export.EXPORT_INDEX: export.export_files,
               export.EXPORT_OPTIMIZER: export.read_optimizer_state}
    for name, reader in readers.items():
        original = (exported / name).read_bytes()
        for damaged, why in ((b"\xff" + original, "is not UTF-8 text (byte 0xff at offset 0)"),
                             (original[:-5], "is not valid JSON")):
            (exported / name).write_bytes(damaged)
            with pytest.raises(ckpt.DamagedFile) as caught:
                reader(exported)
            assert one_sentence(str(caught.value)) and f"{exported / name} is damaged: it {why}" in str(caught.value)
        (exported / name).write_bytes(original)
    not_utf8(out / ckpt.CHECKPOINTS / ckpt.LATEST)  # names no folder: every step folder is a candidate
    assert [p.name for p in ckpt.checkpoint_candidates(out)] == [f"step_0000000{s}" for s in (4, 3, 2, 1)]


def test_a_truncated_optimiser_shard_of_an_export_is_named_when_resumed_from(cache, tmp_path, saved_run):
    out = copy_of(saved_run, tmp_path)
    shard = next((out / "export").glob("exp_avg_sq-*.safetensors"))
    truncate(shard)
    with pytest.raises(ckpt.CheckpointError) as caught:
        train(load_config(None, tiny(cache, tmp_path / "moved", *ZERO1, f"train.resume={out / 'export'}")))
    assert one_sentence(str(caught.value)) and f"{shard} is damaged: it is not a readable safetensors file" in str(
        caught.value)


def test_mixln_export_refuses_a_smuggled_class_without_passing_on_torchs_advice(tmp_path, saved_run, capsys):
    out = copy_of(saved_run, tmp_path)
    path = step_folder(out, 4) / MODEL_FILE
    state = checkpoint_files.load_checkpoint_file(path)
    state["payload"] = MaliciousPickle()
    torch.save(state, path)
    assert cli._run(cli._export, [str(out), str(tmp_path / "exported")]) == 2
    error = capsys.readouterr().err
    assert not MaliciousPickle.ran and error.count("\n") == 1, error
    assert f"checkpoint {step_folder(out, 4)} was refused: {MODEL_FILE} holds " in error
    assert "training_runs.MaliciousPickle (Unsupported global)" in error
    assert "weights_only" not in error


@pytest.mark.parametrize("older_too", [False, True], ids=["latest", "every-folder"])
def test_a_class_smuggled_into_a_checkpoint_is_refused_and_never_run(cache, tmp_path, older_too):
    out = tmp_path / "run"
    train(load_config(None, tiny(cache, out, "train.save_every=2", "train.stop_after_step=4")))
    for step in (4, 2) if older_too else (4,):
        path = step_folder(out, step) / "mp_rank_00_model_states.pt"
        state = torch.load(path, weights_only=True)
        state["payload"] = MaliciousPickle()
        torch.save(state, path)
    with pytest.raises(ckpt.CheckpointError) as caught:
        train(load_config(None, tiny(cache, out)))
    message = str(caught.value)
    assert not MaliciousPickle.ran
    assert one_sentence(message) and str(step_folder(out, 4)) in message and "mp_rank_00_model_states.pt" in message
    assert "training_runs.MaliciousPickle" in message and "allow-list" in message
    assert "weights_only=False" not in message and "weights_only" not in message
    assert not isinstance(caught.value, ckpt.CheckpointDamaged)  # altered files stop the run: no fallback
    assert step_folder(out, 4).is_dir()


@pytest.mark.parametrize("zero", [0, 3])
def test_a_checkpoint_of_another_model_shape_is_refused_in_one_sentence(cache, tmp_path, zero):
    out = tmp_path / "run"
    train(load_config(None, tiny(cache, out, "train.steps=2", f"parallel.zero_stage={zero}")))
    wider = build_engine(cache, tmp_path / "wide", "model.hidden_size=48", "model.intermediate_size=96",
                         f"parallel.zero_stage={zero}")
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.load_checkpoint(wider, step_folder(out, 2))
    message = str(caught.value)
    assert one_sentence(message) and str(step_folder(out, 2)) in message
    assert "model.embed_tokens.weight is [320, 32] there and [320, 48] in this model" in message


def test_pointing_a_wider_model_at_an_old_checkpoint_ends_in_one_line(cache, tmp_path):
    old = tmp_path / "old"
    train(load_config(None, tiny(cache, old, "train.steps=2")))
    with pytest.raises((ConfigError, ckpt.CheckpointError)) as caught:
        train(load_config(None, tiny(cache, tmp_path / "new", "model.hidden_size=48", "model.intermediate_size=96",
                                     f"train.resume={step_folder(old, 2)}")))
    assert one_sentence(str(caught.value)) and str(step_folder(old, 2)) in str(caught.value)
    assert "hidden_size" in str(caught.value)


def test_a_refused_state_dict_reads_as_one_sentence():
    """What a pipeline stage's layer file of another shape raises inside DeepSpeed (torch's ~40-line message)."""
    with pytest.raises(RuntimeError) as caught:
        torch.nn.Linear(4, 3).load_state_dict({"weight": torch.zeros(5, 4), "bias": torch.zeros(5), "extra": 1})
    problem = ckpt._state_dict_mismatch(Path("/run/checkpoints/step_00000002"), caught.value)
    assert problem.kind == "foreign" and one_sentence(problem.message)
    assert "weight is [5, 4] there and [3, 4] in this model (and 2 more differences)" in problem.message
    assert ckpt._state_dict_mismatch(Path("/x"), RuntimeError("CUDA error: out of memory")) is None


# ----------------------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A real 6 MiB file system (tmpfs) to fill up; skipped where mounting is not allowed."""
    with tmpfs(tmp_path / "disk", "size=6m") as mount:
        yield mount


def fill(disk: Path, leave: int) -> Path:
    """Take all but `leave` bytes of `disk`, as another job writing to the same file system would."""
    filler = disk / "other-job.bin"

    def free() -> int:
        stats = os.statvfs(disk)
        return stats.f_bavail * stats.f_frsize

    with open(filler, "wb", buffering=0) as handle:
        try:
            while free() > leave:
                handle.write(b"\0" * min(2**20, max(4096, free() - leave)))
        except OSError as err:  # leave=0: until the file system says it is full
            assert err.errno == errno.ENOSPC
    return filler


def test_a_full_disk_during_a_save_removes_the_partial_folder_and_keeps_the_previous_checkpoint(
        cache, tmp_path, small_disk, straight):
    out = small_disk / "run"
    train(load_config(None, tiny(cache, out, "train.save_every=2", "train.stop_after_step=2")))
    filler = fill(small_disk, leave=256 * 1024)  # room for metrics and config, not for a ~0.8 MB checkpoint
    with pytest.raises(ckpt.CheckpointError) as caught:
        train(load_config(None, tiny(cache, out, "train.save_every=2")))
    message = str(caught.value)
    assert one_sentence(message), message
    assert str(out / ckpt.CHECKPOINTS) in message and "step_00000004" in message
    assert "mp_rank_00_model_states.pt" in message and "no space left on device" in message
    assert "still names step_00000002" in message
    assert not list((out / ckpt.CHECKPOINTS).glob("*" + ckpt.PARTIAL))  # its space is given back at once
    assert ckpt.latest_checkpoint(out).name == "step_00000002"

    filler.unlink()  # the other job is done: the run continues from step 2 as if nothing happened
    resumed = train(load_config(None, tiny(cache, out, "train.save_every=2")))
    assert sorted(resumed.losses) == [3, 4, 5, 6]
    assert all(resumed.losses[s] == straight(0)[s] for s in (3, 4, 5, 6))


# ----------------------------------------------------------------------------------------- metrics.jsonl


def test_a_torn_last_metrics_line_is_set_aside_on_resume(cache, tmp_path, straight):
    out = tmp_path / "run"
    train(load_config(None, tiny(cache, out, "train.save_every=2", "train.stop_after_step=4")))
    metrics = out / METRICS_FILE
    text = metrics.read_text()
    torn = json.dumps({"step": 5, "loss": 5.1, "lr": 0.001})[:17]  # the append a crash cut short
    metrics.write_text(text + torn)
    assert [r["step"] for r in read_metrics(metrics)] == [r["step"] for r in map(json.loads, text.splitlines())]

    resumed = train(load_config(None, tiny(cache, out, "train.save_every=2")))
    assert resumed.losses[5] == straight(0)[5]
    records = read_metrics(metrics)  # and the file reads whole again: no torn line glued to a new record
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    discarded = [json.loads(line) for line in (out / DISCARDED_FILE).read_text().splitlines()]
    assert {"torn_line": torn} in discarded


def test_metrics_files_torn_or_damaged(tmp_path):
    records = [{"step": s, "loss": 6.0 - s / 10} for s in (1, 2, 3)]
    metrics = tmp_path / METRICS_FILE
    lines = [json.dumps(r) for r in records]

    metrics.write_text("\n".join(lines) + '\n{"step": 4, "lo')
    assert read_metrics(metrics) == records
    assert discard_metrics_after(tmp_path, 2) == 2  # step 3's record and the torn line
    assert read_metrics(metrics) == records[:2] and metrics.read_text().endswith("\n")
    discarded = (tmp_path / DISCARDED_FILE).read_text().splitlines()
    assert discarded == [lines[2], json.dumps({"torn_line": '{"step": 4, "lo'})]

    metrics.write_text("\n".join(lines))  # a complete last record without its newline is completed
    assert discard_metrics_after(tmp_path, 3) == 0 and metrics.read_text() == "\n".join(lines) + "\n"

    metrics.write_text(lines[0] + '\n{"step": 2, "lo\n' + lines[2] + "\n")  # damage before the end is not a tear
    with pytest.raises(ckpt.CheckpointError) as caught:
        read_metrics(metrics)
    assert one_sentence(str(caught.value)) and f"{metrics} line 2 is not a metrics record" in str(caught.value)


# ----------------------------------------------------------------------------------------- several ranks


@pytest.mark.slow
def test_one_ranks_truncated_shard_sends_every_rank_to_the_same_older_checkpoint(cache, tmp_path):
    """dp=2, ZeRO-1: only rank 1's optimiser shard of `latest` is cut short. Rank 0's files are whole, so only an
    agreement between the ranks (on the device NCCL would serve) keeps rank 0 from loading step 4 alone."""
    def runs(*overrides_and_outs):  # in one launch: a launch costs more than these runs
        results = train_one_after_another(2, [tiny(cache, out, "parallel.zero_stage=1", *overrides)
                                              for overrides, out in overrides_and_outs], tmp_path, emulate_nccl=True)
        for ranks in results:
            for rank in ranks:
                assert "error" not in rank, rank.get("traceback", rank["error"])
        return [ranks[0] for ranks in results]

    straight_run, _ = runs(([], tmp_path / "straight"), (["train.save_every=2", "train.stop_after_step=4"],
                                                          tmp_path / "run"))
    truncate(step_folder(tmp_path / "run", 4) / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    [resumed] = runs((["train.save_every=2"], tmp_path / "run"))
    assert sorted(resumed["losses"], key=int) == ["3", "4", "5", "6"]
    assert all(resumed["losses"][s] == straight_run["losses"][s] for s in ("3", "4", "5", "6"))
    assert (tmp_path / "run" / ckpt.CHECKPOINTS / "step_00000004.damaged").is_dir()


@pytest.mark.slow
def test_a_full_disk_under_two_ranks_ends_both_in_the_same_sentence(cache, tmp_path, small_disk):
    out = small_disk / "run"
    overrides = ["parallel.zero_stage=1", "train.save_every=2"]
    ranks = run_processes(2, tiny(cache, out, *overrides, "train.stop_after_step=2"), tmp_path, emulate_nccl=True)
    assert all("error" not in rank for rank in ranks), ranks[0].get("traceback")
    fill(small_disk, leave=256 * 1024)
    ranks = run_processes(2, tiny(cache, out, *overrides), tmp_path, emulate_nccl=True)
    errors = {rank["error"] for rank in ranks}
    assert len(errors) == 1, errors  # no rank hangs in a collective and none says something else
    error = errors.pop()
    assert error.startswith("CheckpointError: saving checkpoint step_00000004") and "no space left" in error
    assert not list((out / ckpt.CHECKPOINTS).glob("*" + ckpt.PARTIAL))
    assert ckpt.latest_checkpoint(out).name == "step_00000002"


def test_setting_metrics_aside_on_a_full_disk_ends_in_one_sentence_and_changes_nothing(small_disk):
    metrics = small_disk / METRICS_FILE
    original = "".join(json.dumps({"step": s, "loss": 6.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo'
    metrics.write_text(original)
    fill(small_disk, leave=0)
    with pytest.raises(ckpt.CheckpointError) as caught:
        discard_metrics_after(small_disk, 2)
    assert one_sentence(str(caught.value)) and str(metrics) in str(caught.value)
    assert "No space left on device" in str(caught.value)
    assert metrics.read_text() == original and not list(small_disk.glob("*.tmp"))
