"""The package's layers import only downwards: model/ (the model and its Hugging Face format) knows nothing of
train/ (runs, checkpoints, exports), and train/ nothing of the commands above it (megatron_mixln/hf_interop.py).
Read from the source with `ast`, every import counted (also those inside functions), so a shortcut that would
close a cycle again fails here rather than as an ImportError in one import order."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "megatron_mixln"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every megatron_mixln module `path` imports: `from megatron_mixln.train import export` counts as both
    megatron_mixln.train and megatron_mixln.train.export."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package, one level up per extra dot
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in names if name == "megatron_mixln" or name.startswith("megatron_mixln.")}


def modules_under(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def reaches(names: set[str], target: str) -> list[str]:
    return sorted(name for name in names if name == target or name.startswith(target + "."))


def test_the_import_reader_sees_imports_inside_functions_and_relative_ones(tmp_path):
    folder = tmp_path / "megatron_mixln" / "model"
    folder.mkdir(parents=True)
    source = folder / "probe.py"
    source.write_text("import os\nfrom . import llama\n\n\n"
                      "def f():\n    from megatron_mixln.train import export\n")
    assert imported(source, tmp_path / "megatron_mixln") == {
        "megatron_mixln.model", "megatron_mixln.model.llama", "megatron_mixln.train", "megatron_mixln.train.export"}


@pytest.mark.parametrize("path", modules_under("model"), ids=lambda p: module_name(p))
def test_model_imports_nothing_above_it(path):
    names = imported(path)
    for above in ("megatron_mixln.train", "megatron_mixln.hf_interop", "megatron_mixln.cli",
                  "megatron_mixln.research", "megatron_mixln.analysis"):
        assert not reaches(names, above), f"{module_name(path)} imports {reaches(names, above)}"


@pytest.mark.parametrize("path", modules_under("train"), ids=lambda p: module_name(p))
def test_train_does_not_import_the_interop_commands(path):
    names = imported(path)
    for above in ("megatron_mixln.hf_interop", "megatron_mixln.cli", "megatron_mixln.research"):
        assert not reaches(names, above), f"{module_name(path)} imports {reaches(names, above)}"


def test_the_research_modules_import_downwards_only():
    """runs.py is what study.py and report.py share; report.py is what study.py calls."""
    assert not reaches(imported(PACKAGE / "research" / "runs.py"), "megatron_mixln.research.study")
    assert not reaches(imported(PACKAGE / "research" / "runs.py"), "megatron_mixln.research.report")
    assert not reaches(imported(PACKAGE / "research" / "report.py"), "megatron_mixln.research.study")
    assert "megatron_mixln.research.report" in imported(PACKAGE / "research" / "study.py")  # the reader sees it


def test_the_checkpoint_files_layer_sits_below_the_checkpoint_orchestration():
    """checkpoint_files.py (checksums, safe loading) knows nothing of saving, finding or loading folders."""
    assert "megatron_mixln.train.checkpoint_files" in imported(PACKAGE / "train" / "checkpoint.py")
    assert "megatron_mixln.train.checkpoint" not in imported(PACKAGE / "train" / "checkpoint_files.py")


def test_the_export_format_sits_below_moving_a_live_module_to_and_from_it():
    """export.py (the format on disk) knows neither checkpoints nor a live module of some layout."""
    assert "megatron_mixln.train.export" in imported(PACKAGE / "train" / "module_export.py")
    for above in ("megatron_mixln.train.module_export", "megatron_mixln.train.checkpoint"):
        assert not reaches(imported(PACKAGE / "train" / "export.py"), above)
