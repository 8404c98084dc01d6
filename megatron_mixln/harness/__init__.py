"""Downstream evaluation through lm-evaluation-harness: our model as an lm-eval LM (`lm.py`), task resolution and
mixln-eval --tasks (`command.py`), and two tiny local tasks for tests and docs (`tasks/`)."""
from pathlib import Path

TASKS_FOLDER = Path(__file__).with_name("tasks")
