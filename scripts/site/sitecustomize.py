"""Makes `megatron_mixln.kernels` importable from a source checkout that is not installed (a GPU machine that
cannot pip install): setup.py maps the top-level kernels/ folder to that name, and this meta-path finder does
the same. Active only where this folder is on PYTHONPATH (kernels/gpu_check.sh, scripts/gpu_check.sh)."""
import importlib.abc
import importlib.util
import os
import sys

_KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "kernels")


class _KernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "megatron_mixln.kernels":
            return importlib.util.spec_from_file_location(name, os.path.join(_KERNELS, "__init__.py"),
                                                          submodule_search_locations=[_KERNELS])
        return None


sys.meta_path.append(_KernelsFinder())
