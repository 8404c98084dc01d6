"""No command destroys what it did not make: the one output-folder rule (megatron_mixln/output_folder.py) case by
case, then each command on a tiny trained run, every file of its input and of the refused folder hashed before and
after."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from megatron_mixln import cli
from megatron_mixln.research import compare, study
from megatron_mixln.analysis.report import ANALYSIS_OUTPUT
from megatron_mixln.config import load_config
from megatron_mixln.model.hf_format import HF_OUTPUT
from megatron_mixln.output_folder import (FORCE, OutputFolderError, OutputKind, atomic_folder, check_output_file,
                                          check_output_folder, temporary_folder)
from megatron_mixln.train.export import EXPORT_OUTPUT
from megatron_mixln.train.loop import train
from training_runs import tiny

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
KIND = OutputKind("thing", (("a.json", "b.md"), ("c",)))


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in folder.rglob("*") if f.is_file()}


def refusal(call) -> str:
    with pytest.raises(OutputFolderError) as err:
        call()
    return str(err.value)


# ------------------------------------------------------------------------------------------------
# The rule
# ------------------------------------------------------------------------------------------------
def test_a_new_an_empty_folder_and_an_earlier_output_of_either_kind_may_be_written(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "earlier").mkdir()
    for name in ("a.json", "b.md", "notes.txt"):  # its own files mark it, whatever else it holds
        (tmp_path / "earlier" / name).write_text("x")
    (tmp_path / "other-kind" / "c").mkdir(parents=True)
    for name in ("new/deeper", "empty", "earlier", "other-kind"):
        assert check_output_folder(tmp_path / name, KIND) == tmp_path / name


def test_a_folder_holding_other_files_is_refused_by_name_unless_forced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "a.json").write_text("only half of an earlier output")
    message = refusal(lambda: check_output_folder(out, KIND))
    assert str(out) in message and "a.json" in message and FORCE in message and message.count(".") <= 2
    assert "--yes" in refusal(lambda: check_output_folder(out, KIND, option="--yes"))
    assert check_output_folder(out, KIND, force=True) == out


@pytest.mark.parametrize("where", ["same", "holds", "inside", "same through a link", "inside through a link"])
def test_the_input_itself_a_folder_holding_it_or_one_inside_it_is_refused_even_when_forced(tmp_path, where):
    run = tmp_path / "runs" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "runs")
    out, read = {"same": (run, run), "holds": (tmp_path / "runs", run / "checkpoints"),
                 "inside": (run / "export", run), "same through a link": (tmp_path / "link" / "run", run),
                 "inside through a link": (tmp_path / "link" / "run" / "x", run)}[where]
    message = refusal(lambda: check_output_folder(out, KIND, [read], force=True))
    assert str(out) in message and "input" in message and f"{FORCE} does not override" in message


def test_a_file_a_path_below_a_file_or_a_link_is_refused_even_when_forced_and_left_alone(tmp_path):
    file = tmp_path / "file"
    file.write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "somewhere")
    assert "is a file" in refusal(lambda: check_output_folder(file, KIND, force=True))
    assert f"{file} is a file" in refusal(lambda: check_output_folder(file / "sub", KIND, force=True))
    assert "symbolic link" in refusal(lambda: check_output_folder(tmp_path / "link", KIND, force=True))
    with pytest.raises(OutputFolderError):
        with atomic_folder(file, KIND, force=True):
            pass
    assert file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file", "link"]


def test_an_atomic_folder_replaces_an_earlier_output_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "c").write_text("old")
    (out / "stale").write_text("old")
    with atomic_folder(out, KIND) as tmp:
        assert tmp != out and not any(tmp.iterdir()) and (out / "stale").exists()  # the old one stays meanwhile
        (tmp / "c").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [(p.name, p.read_text()) for p in out.iterdir()] == [("c", "new")]


def test_a_failed_write_or_a_refused_move_leaves_no_temporary_folder_and_the_old_output_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "c").write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_folder(out, KIND) as tmp:
            (tmp / "c").write_text("half")
            raise RuntimeError("disk on fire")
    with pytest.raises(OutputFolderError):
        with atomic_folder(out, KIND) as tmp:
            (tmp / "c").write_text("new")
            (out / "c").unlink()
            (out / "other").write_text("appeared while writing")  # no longer an earlier output: refused at the move
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "other").exists()


def test_a_file_in_the_way_of_the_temporary_folder_is_refused_not_deleted(tmp_path):
    (tmp_path / "out.partial").write_text("mine")
    assert "out.partial" in refusal(lambda: temporary_folder(tmp_path / "out"))
    assert (tmp_path / "out.partial").read_text() == "mine"


def test_an_output_file_may_not_be_a_folder_or_lie_inside_an_input(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert "is a folder" in refusal(lambda: check_output_file(run))
    assert "input" in refusal(lambda: check_output_file(run / "metrics.jsonl", [run]))
    assert check_output_file(tmp_path / "table.json", [run]) == tmp_path / "table.json"


def test_each_command_recognises_its_own_earlier_output_and_not_the_others(trained):
    run, hf = trained
    assert EXPORT_OUTPUT.is_earlier_output(run / "export")  # the export a run ends with: replaced by the next one
    assert HF_OUTPUT.is_earlier_output(hf) and not HF_OUTPUT.is_earlier_output(run / "export")
    for kind in (EXPORT_OUTPUT, HF_OUTPUT, ANALYSIS_OUTPUT, study.STUDY_OUTPUT):
        assert not kind.is_earlier_output(run)  # a run folder is nobody's output to replace


def test_a_downloaded_transformers_model_is_not_taken_for_an_earlier_hf_export(trained, tmp_path):
    # The same two files as an --hf export, but no run record in config.json: writing there needs --force.
    download = tmp_path / "llama"
    shutil.copytree(trained[1], download)
    config = json.loads((download / "config.json").read_text())
    config.pop("mixln_run")
    (download / "config.json").write_text(json.dumps(config))
    assert not HF_OUTPUT.is_earlier_output(download)
    assert "--force" in refusal(lambda: check_output_folder(download, HF_OUTPUT))
    assert check_output_folder(download, HF_OUTPUT, force=True) == download


# ------------------------------------------------------------------------------------------------
# The commands
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step tiny run (checkpoints, metrics.jsonl, its export) and its Hugging Face export."""
    from megatron_mixln.hf_interop import export_hf

    root = tmp_path_factory.mktemp("trained")
    train(load_config(None, tiny(root / "cache", root / "run", "train.steps=2", "train.save_every=2",
                                 "train.eval_sequences=2")))
    export_hf(root / "run", root / "hf")
    return root / "run", root / "hf"


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run, so that a failed refusal harms no other test."""
    return Path(shutil.copytree(trained[0], tmp_path / "run"))


def command(main, *args, capsys) -> tuple[int, list[str]]:
    """A console command run in this process: its exit status and its `error:` lines."""
    status = main([str(a) for a in args])
    return status, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


EXPORT, IMPORT, ANALYZE = (partial(cli._run, main) for main in (cli._export, cli._import, cli._analyze))


def test_export_of_a_run_onto_itself_exits_2_in_one_line_and_loses_no_byte(run):
    before = hashes(run)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([str(BIN / "mixln-export"), str(run), str(run)], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        f"error: {run} is the input {run}: writing there could destroy what the command reads, so pass a path "
        f"outside it ({FORCE} does not override this)."]
    assert hashes(run) == before


@pytest.mark.parametrize("hf", [[], ["--hf"]], ids=["export", "export --hf"])
@pytest.mark.parametrize("case", ["run itself", "inside the run", "other files", "a file", "--force on the run"])
def test_export_refuses_and_touches_nothing(run, tmp_path, capsys, hf, case):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not an export")
    (tmp_path / "file").write_text("not a folder")
    out, extra = {"run itself": (run, []), "inside the run": (run / "export" / "x", []), "other files": (other, []),
                  "a file": (tmp_path / "file", []), "--force on the run": (run, ["--force"])}[case]
    before = hashes(tmp_path)
    status, errors = command(EXPORT, run, out, *hf, *extra, capsys=capsys)
    assert status == 2 and len(errors) == 1 and str(out) in errors[0], errors
    assert (f"add {FORCE}" in errors[0]) == (case == "other files")  # the only refusal --force overrides
    assert hashes(tmp_path) == before and not list(tmp_path.glob("*.partial"))


def test_export_replaces_its_own_earlier_export_and_only_with_force_other_files(run, tmp_path, capsys):
    out = tmp_path / "out"
    assert command(EXPORT, run, out, capsys=capsys) == (0, [])
    first = hashes(out)
    (out / "stale.txt").write_text("left in an earlier export")
    assert command(EXPORT, run, out, capsys=capsys) == (0, [])
    assert hashes(out) == first  # replaced whole: the same files again, nothing else
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("x")
    assert command(EXPORT, run, tmp_path / "hf", "--hf", capsys=capsys)[0] == 2
    assert command(EXPORT, run, tmp_path / "hf", "--hf", "--force", capsys=capsys) == (0, [])
    assert HF_OUTPUT.is_earlier_output(tmp_path / "hf") and not (tmp_path / "hf" / "notes.txt").exists()
    assert command(EXPORT, run, tmp_path / "hf", "--hf", capsys=capsys) == (0, [])  # its own: no --force
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out", "run"]


def test_import_onto_its_own_input_or_into_it_is_refused_even_when_forced(trained, tmp_path, capsys):
    hf = Path(shutil.copytree(trained[1], tmp_path / "hf"))
    before = hashes(tmp_path)
    for out in (hf, hf / "export"):
        status, errors = command(IMPORT, hf, out, "--force", capsys=capsys)
        assert status == 2 and len(errors) == 1 and f"{FORCE} does not override" in errors[0], errors
    assert hashes(tmp_path) == before
    assert command(IMPORT, hf, tmp_path / "export", capsys=capsys) == (0, [])
    assert command(IMPORT, hf, tmp_path / "export", capsys=capsys) == (0, [])  # its own earlier export
    assert EXPORT_OUTPUT.is_earlier_output(tmp_path / "export") and hashes(hf) == hashes(trained[1])


def test_analyze_study_and_compare_refuse_to_write_over_a_run(run, tmp_path, capsys):
    before = hashes(run)
    assert command(ANALYZE, run, "--out", run, "--force", capsys=capsys)[0] == 2
    assert command(ANALYZE, run, "--out", run / "analysis", capsys=capsys)[0] == 2
    assert command(study.main, run, capsys=capsys)[0] == 2  # holds other files: before any run is trained
    assert command(compare.main, run, "--json", run / "metrics.jsonl", capsys=capsys)[0] == 2
    assert hashes(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_run_whose_export_folder_holds_other_files_is_refused_before_it_trains(trained, tmp_path):
    out = tmp_path / "run"
    (out / "export").mkdir(parents=True)
    (out / "export" / "notes.txt").write_text("mine")
    cache = trained[0].parent / "cache"
    message = refusal(lambda: train(load_config(None, tiny(cache, out, "train.steps=2"))))
    assert str(out / "export") in message and "notes.txt" in message
    assert sorted(p.name for p in (out / "export").iterdir()) == ["notes.txt"] and not (out / "metrics.jsonl").exists()
