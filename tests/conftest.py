"""Test-wide settings: CPU only, Triton's interpreter, DeepSpeed without JIT-compiled ops."""
import os

# Must be set before any @triton.jit decorator runs, i.e. before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One intra-op thread here and in every process a test starts (they inherit it): the tests' models are tiny, and
# two threads on CI's two cores wait on each other (and on a second process or the prefetch thread) for longer
# than the work takes. A value set by whoever runs the tests wins.
os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or "1"

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ["OMP_NUM_THREADS"].isdigit():  # in case torch was imported before this file ran
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def seeded_random_generators():
    """Every test starts from the same global RNG state, so any draw it makes is replayable."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slower end-to-end test (still run in CI)")
