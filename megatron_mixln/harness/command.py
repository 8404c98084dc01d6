"""mixln-eval SOURCE --tasks ...: lm-eval tasks (registry names, or local YAML files and folders) scored on any run,
checkpoint or export; lm-eval's results JSON and table written beside the run (docs/evaluation.md)."""
from __future__ import annotations

import contextlib
import difflib
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from megatron_mixln.data.errors import DataError, first_line
from megatron_mixln.output_folder import PARTIAL, OutputKind, atomic_folder, check_output_folder

DOWNSTREAM = "downstream"  # RUN/downstream/step_<N>/: where results go by default
RESULTS, TABLE = "results.json", "table.md"
DOWNSTREAM_OUTPUT = OutputKind("downstream evaluation", ((RESULTS, TABLE),))
DTYPES = ("auto", "float32", "bfloat16", "float16")
DOCS = "docs/evaluation.md"


# ------------------------------------------------------------------------------------------------
# Tasks: lm-eval registry names, YAML files and folders of YAML files
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def task_manager(with_registry: bool):
    """lm-eval's TaskManager; indexing its registry takes seconds, so it is built only when a name needs it."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=with_registry)


def _yaml_files(folder: Path) -> list[Path]:
    """The task YAMLs of a folder (files defining a `task:`; templates that others include are skipped)."""
    from lm_eval.tasks._index import TaskIndex

    return [path for path in sorted(folder.rglob("*.yaml")) if TaskIndex.entry_from_path(path) is not None]


def _outermost(loaded: dict) -> list:
    """What TaskManager.load returned, as the groups no other group contains (else its tasks): what to evaluate."""
    children = {child for names in loaded["group_map"].values() for child in names}
    groups = [group for name, group in loaded["groups"].items() if name not in children]
    return groups or list(loaded["tasks"].values())


def _load_local(task_manager_, path: Path) -> list:
    """The tasks (or groups) of one YAML file, its relative data_files read from the file's folder."""
    path = path.expanduser().resolve()
    with contextlib.chdir(path.parent):
        try:
            loaded = task_manager_.load([str(path)])
        except Exception as err:  # noqa: BLE001 - lm-eval and datasets raise many types for a broken task
            raise DataError(f"the task file {path} could not be loaded: {first_line(err)}.") from err
    return _outermost(loaded)


def _load_registered(task_manager_, name: str) -> list:
    from megatron_mixln.data.sources import hub_unreachable

    offline = hub_unreachable(datasets_too=True)  # out of reach, datasets is switched offline: fails at once
    try:
        loaded = task_manager_.load([name])
    except Exception as err:  # noqa: BLE001 - datasets raises many types for a dataset it cannot fetch
        if offline is not None:
            raise DataError(f"task {name!r} needs its dataset from the Hugging Face hub, which is out of reach "
                            f"({offline}): copy the data to local files and pass a task YAML with dataset_path: json "
                            f"and dataset_kwargs.data_files naming them (see {DOCS}).") from err
        raise DataError(f"task {name!r} could not be loaded: {first_line(err)}.") from err
    return _outermost(loaded)


def resolve_tasks(specs: list[str]) -> list:
    """lm-eval Task and Group objects for `specs`: YAML files, folders of them, or names in lm-eval's registry
    (tasks, groups, tags). An unknown name is one sentence with its close matches."""
    specs = [spec.strip() for spec in specs if spec.strip()]
    if not specs:
        raise DataError("--tasks is empty: pass task names from lm-eval's registry or task YAML files, "
                        "comma-separated.")
    names = [spec for spec in specs if not Path(spec).expanduser().exists()]
    manager = task_manager(bool(names))
    for name in names:
        if name not in manager.all_tasks:
            if name.endswith((".yaml", ".yml")) or "/" in name:
                raise DataError(f"task file {name!r} does not exist: pass an existing YAML file or folder.")
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"close matches: {', '.join(close)}" if close else "no registered task has a similar name"
            raise DataError(f"--tasks names {name!r}, which is neither a task in lm-eval's registry ({hint}) nor an "
                            "existing YAML file or folder.")
    tasks = []
    for spec in specs:
        path = Path(spec).expanduser()
        if not path.exists():
            tasks += _load_registered(manager, spec)
        elif path.is_dir():
            files = _yaml_files(path)
            if not files:
                raise DataError(f"the task folder {path} holds no YAML file defining a task: expected files with "
                                "a `task:` key.")
            for file in files:
                tasks += _load_local(manager, file)
        else:
            tasks += _load_local(manager, path)
    return tasks


# ------------------------------------------------------------------------------------------------
# The source and where its results go
# ------------------------------------------------------------------------------------------------
def _run_folder(folder: Path) -> Path | None:
    """The run folder `folder` is or lies in (a run's export, a checkpoint of it), if any."""
    for candidate in (folder, *list(folder.resolve().parents)[:2]):
        if (candidate / "checkpoints").is_dir() or (candidate / "metrics.jsonl").is_file():
            return candidate
    return None


def default_output(source: Path, step: int | None) -> Path:
    """RUN/downstream/step_<N> (beside an export or checkpoint not inside a run: <source>-downstream/step_<N>),
    with .2, .3... added rather than replacing an earlier evaluation's results."""
    run = _run_folder(source)
    folder = run / DOWNSTREAM if run is not None else source.with_name(f"{source.name}-{DOWNSTREAM}")
    base = folder / (f"step_{step}" if step is not None else "no_step")
    out, number = base, 1
    while out.exists() or out.with_name(out.name + PARTIAL).exists():
        number += 1
        out = base.with_name(f"{base.name}.{number}")
    return out


@dataclass
class DownstreamResult:
    results: dict  # lm-eval's simple_evaluate dictionary
    table: str  # lm-eval's make_table (and its groups table)
    out: Path


def _torch_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def evaluate_source(source: str | Path, tasks: list[str], limit: float | None = None, num_fewshot: int | None = None,
                    batch_size: int = 16, dtype: str = "auto", device: str | None = None, out: str | Path | None = None,
                    log_samples: bool = False, force: bool = False) -> DownstreamResult:
    """Score a run folder, checkpoint (any layout), export or --hf export on lm-eval `tasks`; write lm-eval's
    results JSON and table to `out` (default: beside the run, see default_output)."""
    import torch

    from megatron_mixln.harness.lm import MixLNLM, model_scorer, run_tokenizer
    from megatron_mixln.train.export import model_with_weights
    from megatron_mixln.train.weights import is_export, read_weights

    if dtype not in DTYPES:
        raise DataError(f"--dtype={dtype!r} is invalid: expected one of {', '.join(DTYPES)}.")
    if batch_size < 1:
        raise DataError(f"--batch-size={batch_size!r} is invalid: expected an integer >= 1.")
    source = Path(source)
    if is_export(source / "export"):  # a run folder: the export it ended with, as mixln-eval's loss reads it
        source = source / "export"
    if out is not None:
        check_output_folder(out, DOWNSTREAM_OUTPUT, [source], force)  # refused before anything is read
    task_objects = resolve_tasks(tasks)  # before the weights: a wrong task name answers at once
    weights = read_weights(source)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = run_tokenizer(weights)
    model = model_with_weights(weights.model_config, weights.tensors, source, device)
    lm = MixLNLM(model_scorer(model, _torch_dtype(dtype, device)), tokenizer, weights.model_config.max_seq_len,
                 batch_size, name=str(source))
    if limit is not None and limit >= 1:
        limit = int(limit)  # lm-eval reads a float as a fraction of each task
    # lm-eval's command-line default of bootstrap resamples, for the standard errors without a closed form.
    results = simple_evaluate(lm, task_objects, limit=limit, num_fewshot=num_fewshot, log_samples=log_samples,
                              bootstrap_iters=100_000)
    table = results_table(results)
    out = Path(out) if out is not None else default_output(source, weights.step)
    results["mixln"] = {"source": str(source), "step": weights.step, "dtype": str(_torch_dtype(dtype, device)),
                        "device": device, "batch_size": batch_size}
    write_results(results, table, out, [source], force)
    return DownstreamResult(results, table, out)


def simple_evaluate(lm, tasks: list, limit: float | None = None, num_fewshot: int | None = None,
                    log_samples: bool = False, bootstrap_iters: int = 1000) -> dict:
    """lm-eval's own simple_evaluate on already loaded tasks (one place sets its options for every caller)."""
    import os
    from unittest import mock

    from lm_eval import evaluator

    # Our LM is lm-eval's rank 0 in every process (in training every rank runs the same evaluation, the scorer doing
    # the collectives), but lm-eval 0.4.13 also returns None wherever LOCAL_RANK is not 0 (its TP convention).
    with mock.patch.dict(os.environ, {"LOCAL_RANK": "0"}):
        results = evaluator.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                            log_samples=log_samples, task_manager=task_manager(False),
                                            bootstrap_iters=bootstrap_iters)
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    return results


def _table_writers_take_headers() -> None:
    """lm-eval 0.4.13's make_table names its columns through `writer.headers`, which pytablewriter 0.38 (the newest
    this project's package index installs: later releases need python-dateutil) calls `header_list`: without this
    alias the table's columns are labelled A, B, C... A no-op where pytablewriter has `headers`."""
    from pytablewriter.writer._table_writer import AbstractTableWriter

    if not hasattr(AbstractTableWriter, "headers"):
        AbstractTableWriter.headers = AbstractTableWriter.header_list


def results_table(results: dict) -> str:
    """lm-eval's tables, as its own command line prints them."""
    from lm_eval.utils import make_table

    _table_writers_take_headers()
    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def write_results(results: dict, table: str, out: Path, inputs: list, force: bool = False) -> Path:
    from lm_eval.utils import handle_non_serializable

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out, DOWNSTREAM_OUTPUT, force) as tmp:
        check_output_folder(out, DOWNSTREAM_OUTPUT, inputs, force)
        (tmp / RESULTS).write_text(json.dumps(results, indent=2, default=handle_non_serializable,
                                              ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / TABLE).write_text(table, encoding="utf-8")
    return out
