"""Test-wide settings: CPU only, Triton's interpreter, DeepSpeed without JIT-compiled ops."""
import os

# Must be set before any @triton.jit decorator runs, i.e. before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slower end-to-end test (still run in CI)")
