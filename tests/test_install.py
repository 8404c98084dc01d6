"""The install: the venv holds the tested set (constraints.txt), and the repository's kernels/ folder never shadows
another package named `kernels` (Hugging Face's, which transformers imports), whatever the launcher."""
import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What transformers 5.x does on import when Hugging Face's `kernels` is installed; the file of `kernels` is printed.
IMPORT_LLAMA = ("from transformers import LlamaForCausalLM\n"
                "import importlib.util\n"
                "spec = importlib.util.find_spec('kernels')\n"
                "print('kernels:', spec and spec.origin)\n")


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _python_in_repo_root(args, stdin=None, env=None) -> str:
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **(env or {})}
    run = subprocess.run([sys.executable, *args], cwd=REPO, input=stdin, capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.mark.parametrize("launcher", ["python -c", "python - (stdin, as a REPL)", "python -m", "torchrun -m"])
def test_a_python_started_in_the_repository_root_imports_transformers_llama(launcher, tmp_path):
    # Each launcher puts the repository root first on sys.path, where kernels/ lies.
    if launcher == "python -c":
        out = _python_in_repo_root(["-c", IMPORT_LLAMA])
    elif launcher.startswith("python -"):
        out = _python_in_repo_root(["-"], stdin=IMPORT_LLAMA)
    else:
        module = tmp_path / "import_llama.py"
        module.write_text(IMPORT_LLAMA)
        # `-m` runs a module found on sys.path: with PYTHONPATH holding it, the repository root still comes first.
        launch = [] if launcher == "python -m" else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                                     "1", "--no-python", sys.executable]
        out = _python_in_repo_root([*launch, "-m", "import_llama"], env={"PYTHONPATH": str(tmp_path)})
    origin = out.split("kernels:", 1)[1].strip()
    if _hf_kernels_installed():
        # The installed Hugging Face package, not the repository's folder.
        assert origin != "None" and not origin.startswith(str(REPO / "kernels")), origin
        import kernels  # noqa: F401  (this process's sys.path starts with the repository root too, under pytest)
        assert not Path(kernels.__file__).resolve().is_relative_to(REPO / "kernels")
    else:
        assert origin == "None", origin  # kernels/ is only a namespace portion, which transformers treats as absent


def test_megatron_mixln_kernels_is_the_repository_folder_from_any_working_directory(tmp_path):
    code = "import importlib; print(importlib.import_module('megatron_mixln.kernels.rms_norm').__file__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert Path(run.stdout.strip()).resolve() == (REPO / "kernels" / "rms_norm.py").resolve()
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow Hugging Face's kernels"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


@pytest.mark.skipif(os.environ.get("MIXLN_UNLOCKED") == "1", reason="make test-latest: the newest releases, unpinned")
def test_the_venv_holds_the_tested_set_of_versions():
    # The venv's own site-packages only: once something imported setuptools (as here, and as the suite's inductor
    # tests do), sys.path also holds its _vendor folder, whose bundled copies (packaging, ...) are not installed.
    import setuptools  # noqa: F401
    site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version.split("+")[0]
                 for d in importlib.metadata.distributions(path=sorted(site))}
    installed.pop("megatron-mixln", None)
    pins = _pins()
    wrong = {name: (installed.get(name), version) for name, version in pins.items() if installed.get(name) != version}
    assert not wrong, f"installed vs constraints.txt: {wrong}; run `make setup` (scripts/bootstrap.sh)"
    if os.environ.get("CI"):  # a fresh venv holds exactly the set: nothing resolved outside it
        assert not set(installed) - set(pins), f"installed but not in constraints.txt: {set(installed) - set(pins)}"
