"""Operating a run: log lines for a log file, TensorBoard and W&B through DeepSpeed's monitor, memory per logged
step, no-eval runs, a finished (or planned-stopped, or killed) run started again, resume refusing what a checkpoint
cannot follow, and full or read-only disks."""
import errno
import importlib.machinery
import json
import math
import os
import sys
import types

import pytest

from megatron_mixln.config import ConfigError, load_config
from megatron_mixln.storage import StorageError, writing
from megatron_mixln.train.loop import train
from megatron_mixln.train.metrics import read_metrics
from megatron_mixln.train.schedule import lr_multiplier
from training_runs import tiny, tmpfs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def steps_of(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_a_log_file_gets_one_plain_line_per_logged_step_with_memory_and_eta(cache, tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config(None, tiny(cache, out, "train.log_every=2", "train.progress_bar=true")))  # stdout: no tty
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 2/6", "step 4/6", "step 6/6"]
    assert all("tok/s" in line and "mem " in line and " | eta " in line for line in lines)
    assert "\r" not in "".join(lines)  # no progress-bar redraws in a log file
    for record in steps_of(out):
        assert 0 < record["memory_mb"] <= record["peak_memory_mb"]


def test_tensorboard_gets_the_metrics_through_deepspeeds_monitor(cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(load_config(None, tiny(cache, out, "train.tensorboard=true")))  # the default; `tiny` turns it off
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    losses = {event.step: event.value for event in events.Scalars("loss")}
    assert losses == pytest.approx({r["step"]: r["loss"] for r in steps_of(out)}, rel=1e-6)
    assert "eval_loss" in events.Tags()["scalars"] and "layer_grad_norms/layer_000" in events.Tags()["scalars"]


def test_wandb_is_a_switch_through_deepspeeds_monitor(cache, tmp_path, monkeypatch):
    calls = {"init": [], "log": []}
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: calls["init"].append(kwargs)
    fake.log = lambda data, step=None, commit=None: calls["log"].append((data, step))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    train(load_config(None, tiny(cache, out, "train.wandb=true", "train.wandb_project=mixln-test")))
    assert calls["init"] == [{"project": "mixln-test", "group": "run", "entity": None}]
    logged = {step: data["loss"] for data, step in calls["log"] if "loss" in data}
    assert logged == {r["step"]: r["loss"] for r in steps_of(out)}


def test_wandb_without_the_package_is_one_sentence(cache, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as when it is not installed
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else
                        importlib.machinery.PathFinder.find_spec(name))
    with pytest.raises(ConfigError, match=r"train.wandb=true is invalid here: the wandb package is not installed"):
        train(load_config(None, tiny(cache, tmp_path / "run", "train.wandb=true")))


def test_no_eval_data_is_said_once_and_never_logged_as_nan(cache, tmp_path, capsys):
    out = tmp_path / "run"
    result = train(load_config(None, tiny(cache, out, "data.eval_fraction=0", "train.eval_every=2")))
    assert result.eval_loss is None
    printed = capsys.readouterr().out
    assert printed.count("no held-out data") == 1
    text = (out / "metrics.jsonl").read_text()
    assert "eval_loss" not in text and "nan" not in text.lower()


def test_a_finished_run_started_again_adds_nothing(cache, tmp_path, capsys):
    out = tmp_path / "run"
    first = train(load_config(None, tiny(cache, out)))
    before = (out / "metrics.jsonl").read_text()
    again = train(load_config(None, tiny(cache, out)))
    assert again.already_finished and again.eval_loss == first.eval_loss
    assert (out / "metrics.jsonl").read_text() == before
    assert "holds a finished run (step 6 of 6): nothing to do" in capsys.readouterr().out


@pytest.fixture
def stopped_run(cache, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, tiny(cache, out, "train.stop_after_step=3")))
    return out


@pytest.mark.parametrize("override,fields", [
    ("model.mix_alpha=0.25", "model.mix_alpha 0.5 -> 0.25"),
    ("model.hidden_size=64", "model.hidden_size 32 -> 64"),
    ("train.seed=8", "train.seed 7 -> 8"),
    ("data.mode=document", "data.mode 'packed' -> 'document'"),
])
def test_resume_refuses_a_changed_model_or_data_order_in_one_sentence(override, fields, cache, stopped_run):
    with pytest.raises(ConfigError, match=f"cannot resume .*step_00000003: {fields} changed, and a checkpoint "
                                          "continues one model on one data order"):
        train(load_config(None, tiny(cache, stopped_run, override)))


def test_resume_refuses_a_changed_schedule_unless_allowed_and_then_follows_it(cache, stopped_run, tmp_path):
    with pytest.raises(ConfigError, match=r"train.lr 0.003 -> 0.001 changed; set train.resume_changes=allow"):
        train(load_config(None, tiny(cache, stopped_run, "train.lr=1e-3")))
    resumed = train(load_config(None, tiny(cache, stopped_run, "train.lr=1e-3", "train.betas=[0.8,0.99]",
                                           "train.resume_changes=allow")))
    assert sorted(resumed.losses) == [4, 5, 6]
    lrs = {r["step"]: r["lr"] for r in steps_of(stopped_run)}
    for step in (4, 5, 6):  # the schedule's factor at that step, times the new peak LR (warmup 0 in `tiny`)
        assert lrs[step] == pytest.approx(1e-3 * lr_multiplier(step - 1, 6, 0.0, 0.1), rel=1e-12)
    # and the run changed: the same resume with the old values gives other losses
    other = tmp_path / "other"
    train(load_config(None, tiny(cache, other, "train.stop_after_step=3")))
    unchanged = train(load_config(None, tiny(cache, other)))
    assert all(not math.isclose(unchanged.losses[s], resumed.losses[s], rel_tol=1e-9) for s in (5, 6))


def test_resume_lists_the_harmless_changes_it_carries(cache, stopped_run, capsys):
    train(load_config(None, tiny(cache, stopped_run, "train.eval_every=2", "train.log_every=2")))
    printed = capsys.readouterr().out
    assert "changed: train.eval_every 0 -> 2; train.log_every 1 -> 2" in printed
    assert json.loads((stopped_run / "config.json").read_text())["train"]["eval_every"] == 2


def test_a_run_stopped_by_stop_after_step_started_again_trains_nothing(cache, stopped_run, capsys):
    before = (stopped_run / "metrics.jsonl").read_text()
    again = train(load_config(None, tiny(cache, stopped_run, "train.stop_after_step=3")))
    assert again.already_finished and again.last_step == 3 and not again.losses
    assert (stopped_run / "metrics.jsonl").read_text() == before
    assert (f"train.out_dir={str(stopped_run)!r} already stopped at step 3 (train.stop_after_step=3): nothing to do; "
            "remove or raise train.stop_after_step to train on.") in capsys.readouterr().out


class Killed(BaseException):
    """A kill at the first save: what the run wrote before it stays behind."""


def test_a_run_killed_before_its_first_checkpoint_started_again_logs_each_step_once(cache, tmp_path, capsys,
                                                                                      monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_mixln.train import checkpoint

    out = tmp_path / "run"
    overrides = tiny(cache, out, "train.steps=3", "train.tensorboard=true")
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_checkpoint", lambda *args, **kwargs: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            train(load_config(None, overrides))
    lost = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in lost if "loss" in r] == [1, 2, 3] and not (out / "checkpoints").exists()

    again = train(load_config(None, overrides))
    assert sorted(again.losses) == [1, 2, 3]
    assert [r["step"] for r in steps_of(out)] == [1, 2, 3]  # each step once, the new run's
    assert [r["loss"] for r in steps_of(out)] == [again.losses[s] for s in (1, 2, 3)]
    assert read_metrics(out / "metrics.discarded.jsonl") == lost  # the first run's records, kept aside
    assert (f"no checkpoint in {out} to resume from, so training starts at step 1; {len(lost)} metric records of "
            "lost steps moved to metrics.discarded.jsonl") in capsys.readouterr().out
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3]


# ----------------------------------------------------------------------------------------- full or read-only disks


def one_sentence(message: str) -> bool:
    return "\n" not in message and "Traceback" not in message and message.endswith(".")


@pytest.mark.parametrize("code,reason,advice", [
    (errno.ENOSPC, "no space left on device", "free space there"),
    (errno.EDQUOT, "disk quota exceeded", "free space there"),
    (errno.EROFS, "read-only file system", "make it writable"),
    (errno.EACCES, "permission denied", "make it writable"),
])
def test_a_full_read_only_or_forbidden_folder_is_one_sentence_naming_the_path(code, reason, advice):
    with pytest.raises(StorageError) as caught:
        with writing("creating train.out_dir", "/runs/x", "choose another train.out_dir"):
            raise OSError(code, os.strerror(code))  # as a write() on an open file: the OS names no file
    assert str(caught.value) == (f"creating train.out_dir failed: /runs/x: {reason}; {advice}, or choose another "
                                 "train.out_dir.")
    with pytest.raises(FileNotFoundError):  # any other OSError is not a storage problem and goes on unchanged
        with writing("creating train.out_dir", "/runs/x"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/runs/x")


def test_a_storage_error_no_code_named_still_ends_in_one_line_and_exit_2(capsys):
    from megatron_mixln.cli import _run

    def deep_inside(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/loss_curve.png")

    assert _run(deep_inside, []) == 2  # not 1, the non-finite stop's code, which the SLURM templates read
    assert capsys.readouterr().err == ("error: a file operation failed: /runs/x/loss_curve.png: no space left on "
                                       "device; free space there, or choose another folder.\n")


@pytest.fixture
def read_only_disk(tmp_path):
    with tmpfs(tmp_path / "read-only", "ro,size=1m") as mount:
        yield mount


def test_a_read_only_cache_dir_or_out_dir_is_named_in_one_sentence(cache, tmp_path, read_only_disk):
    with pytest.raises(StorageError) as caught:
        train(load_config(None, tiny(read_only_disk / "cache", tmp_path / "run")))
    assert str(caught.value) == (f"preparing the data failed: {read_only_disk / 'cache'}: read-only file system; "
                                 "make it writable, or set data.cache_dir to another folder.")
    with pytest.raises(StorageError) as caught:
        train(load_config(None, tiny(cache, read_only_disk / "run")))
    assert str(caught.value) == (f"creating train.out_dir failed: {read_only_disk / 'run'}: read-only file system; "
                                 "make it writable, or choose another train.out_dir.")


def full_disk_from_the_third_append(monkeypatch, path):
    """metrics.jsonl refuses every append from the third on, as a disk that fills up during the run."""
    from megatron_mixln.train import metrics

    appends = {"n": 0}

    def open_(file, mode="r", *args, **kwargs):
        if str(file) == str(path) and mode == "a":
            appends["n"] += 1
            if appends["n"] >= 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(metrics, "open", open_, raising=False)


def test_a_full_disk_under_the_metrics_saves_a_checkpoint_says_where_and_the_run_resumes(cache, tmp_path,
                                                                                          monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        full_disk_from_the_third_append(patch, out / "metrics.jsonl")
        with pytest.raises(StorageError) as caught:  # train.save_every=0: no checkpoint was planned before the end
            train(load_config(None, tiny(cache, out, "train.steps=4")))
    folder = out / "checkpoints" / "step_00000003"
    assert str(caught.value) == (f"appending step 3's record failed: {out / 'metrics.jsonl'}: no space left on "
                                 f"device; the run stopped with a checkpoint of step 3 in {folder}; free space "
                                 "there and run the same command to resume.")
    assert (folder / "trainer_state.json").is_file()
    resumed = train(load_config(None, tiny(cache, out, "train.steps=4")))
    assert sorted(resumed.losses) == [4]  # steps 1-3 were not lost, only step 3's record
    assert [r["step"] for r in steps_of(out)] == [1, 2, 4]


def test_a_full_disk_under_the_metrics_and_the_checkpoint_says_both(cache, tmp_path, monkeypatch):
    from megatron_mixln.train import checkpoint

    out = tmp_path / "run"

    def save_fails(engine, out_dir, step, *args, **kwargs):
        raise checkpoint.CheckpointError(f"saving checkpoint {checkpoint.tag_for_step(step)} failed: no space left.")

    full_disk_from_the_third_append(monkeypatch, out / "metrics.jsonl")
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_fails)
    with pytest.raises(StorageError) as caught:
        train(load_config(None, tiny(cache, out, "train.steps=4")))
    assert one_sentence(str(caught.value))
    assert str(caught.value).startswith(f"appending step 3's record failed: {out / 'metrics.jsonl'}: no space")
    assert ("saving a checkpoint of step 3 failed too (saving checkpoint step_00000003 failed: no space left); "
            "free space there and run the same command to resume.") in str(caught.value)


def test_a_full_cache_dir_is_named_in_one_sentence(tmp_path):
    with tmpfs(tmp_path / "small", "size=64k") as disk:  # room for the tokenizer, not for the tokens
        with pytest.raises(StorageError) as caught:
            train(load_config(None, tiny(disk / "cache", tmp_path / "run")))
    assert str(caught.value) == (f"preparing the data failed: {disk / 'cache'}: no space left on device; free space "
                                 "there, or set data.cache_dir to another folder.")


# ----------------------------------------------------------------------------------------- a model that cannot fit


def test_an_absurd_vocab_size_is_refused_before_the_data_or_the_allocator(tmp_path):
    config = load_config(None, tiny(tmp_path / "cache", tmp_path / "run", "model.vocab_size=100000000000"))
    with pytest.raises(ConfigError) as caught:
        train(config)
    message = str(caught.value)
    assert one_sentence(message) and message.startswith("model.vocab_size=100000000000 is invalid here: the model's")
    assert "in host memory" in message and "--dry-run shows the plan" in message
    assert not (tmp_path / "cache").exists()  # refused before preparing any data


def test_the_memory_check_names_the_field_that_makes_the_model_large_and_follows_the_layout():
    from megatron_mixln.train.memory import check_model_fits, dry_run_summary

    GiB = 2**30
    check_model_fits(load_config(None, tiny("c", "o")), 1, 1, None, 16 * GiB)  # the tiny model fits a laptop
    seven_b = load_config("configs/llama_7b.yaml", ["parallel.zero_stage=1", "train.global_batch_size=64",
                                                    "train.micro_batch_size=1"])
    with pytest.raises(ConfigError, match=r"model\.intermediate_size=11008 is invalid here: .* in GPU memory "):
        check_model_fits(seven_b, 1, 1, 80 * GiB, 1024 * GiB)  # one GPU: 18 bytes per parameter
    check_model_fits(seven_b, 64, 8, 80 * GiB, 1024 * GiB)  # ZeRO-1 over 64 GPUs splits the optimizer states
    wide = load_config(None, tiny("c", "o", "model.hidden_size=65536", "model.num_heads=2"))
    with pytest.raises(ConfigError, match=r"model\.hidden_size=65536 is invalid here: .* for 2 processes"):
        check_model_fits(wide, 2, 2, None, 64 * GiB)
    need = sum(dry_run_summary(wide, 2, 2)["bytes"][key] for key in ("parameters", "gradients", "optimizer_gpu"))
    check_model_fits(wide, 2, 2, None, 2 * need)  # the bound is the dry run's: exactly enough passes
