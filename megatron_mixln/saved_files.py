"""What every reader of saved weights shares (a checkpoint, an export, a Hugging Face folder; model/, train/ and
the commands above them): the error a file that cannot be used raises, and reading a JSON file this package wrote.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint or export that cannot be used; the message names the path and what is wrong."""


class DamagedFile(CheckpointError):
    """A JSON file of ours (a checkpoint's state, an export's config or index) that is not UTF-8 text or not JSON.
    `why` says what is wrong in a few words ("is not UTF-8 text (byte 0xff at offset 3)")."""

    def __init__(self, path: Path, why: str, remedy: str):
        super().__init__(f"{path} is damaged: it {why}; {remedy}.")
        self.path, self.why = path, why


def read_json(path: str | Path, remedy: str = "restore it from a copy") -> Any:
    """The value of a JSON file this package wrote; one that is not UTF-8 or not JSON raises DamagedFile, a
    sentence naming the file and ending in `remedy`. OSError (a missing file) is the caller's."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        why = f"is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})"
    except json.JSONDecodeError as err:
        why = f"is not valid JSON ({err.msg} at line {err.lineno})"
    raise DamagedFile(path, why, remedy)
