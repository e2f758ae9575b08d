"""Tasks from the user's own dataset files, read with Hugging Face `datasets` (config section `data`).

Each split's files (JSONL, parquet, CSV, or a local dataset directory: `save_to_disk` output or a folder
of data files) are read with `datasets.load_dataset` / `load_from_disk`, all local: nothing is
downloaded. A column mapping turns each row into a `Task`:

    data.prompt_key   the question / prompt: a string, or a chat list ([{role, content}, ...], verl's
                      layout: the last user message is the question)
    data.answer_key   the gold answer: a string or number, a list (the first is the gold answer, the rest
                      aliases) or {"target": [...]} (Search-R1's ground truth)
    data.extra_keys   the columns kept as the task's `extra_info` (None: every other column)
    data.id_key       a column of row ids (None: file name and row number)
    data.source_key   a column naming each row's source (verl's `data_source`; missing: the file name)

A key may be dotted to reach into a struct column, e.g. `reward_model.ground_truth` (verl's layout).
The task keeps the answer as the dataset holds it (`meta["ground_truth"]`), the row's other columns
(`meta["columns"]`) and the extra fields (`meta["extra_info"]`): what a custom reward function receives
(`tracerl.envs.custom`). Every problem is one DataError naming the file (and the row).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tracerl.errors import DataError
from tracerl.task import Task

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _cache_dir() -> str:
    """datasets' Arrow cache under tracerl's cache (`$TRACERL_CACHE`, else ~/.cache/tracerl), not the HF hub's."""
    root = os.environ.get("TRACERL_CACHE") or str(Path.home() / ".cache" / "tracerl")
    return str(Path(root).expanduser() / "datasets")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of one data file or local dataset directory, as dicts."""
    import datasets

    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file {p} does not exist")
    datasets.disable_progress_bars()
    try:
        if p.is_dir():
            if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
                ds = datasets.load_from_disk(str(p))
                if isinstance(ds, datasets.DatasetDict):
                    if len(ds) != 1:
                        raise DataError(f"dataset directory {p} holds splits {', '.join(ds)}; name one of their "
                                        f"folders ({p}/<split>) per data.*_files entry")
                    ds = next(iter(ds.values()))
            else:
                ds = datasets.load_dataset(str(p), split="train", cache_dir=_cache_dir())
        else:
            builder = FORMATS.get(p.suffix.lower())
            if builder is None:
                raise DataError(f"data file {p}: unknown format {p.suffix or '(no suffix)'}; use "
                                f"{', '.join(FORMATS)} or a dataset directory")
            ds = datasets.load_dataset(builder, data_files=str(p), split="train", cache_dir=_cache_dir())
    except DataError:
        raise
    except Exception as e:  # datasets' own errors (bad JSON, unreadable parquet, ...): one line
        first = " ".join(str(e).split())[:200] or type(e).__name__
        raise DataError(f"data file {p} cannot be read by datasets: {first}") from None
    return ds.to_list()


def _lookup(row: dict[str, Any], key: str) -> tuple[bool, Any]:
    """(found, value) of a column, or a dotted path into struct columns."""
    if key in row:
        return True, row[key]
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _prompt_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        users = [m for m in value if m.get("role") == "user"] or value
        return str(users[-1]["content"])
    return None


def _answers(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, dict) and "target" in value:
        value = value["target"]
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return (str(value),)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, int, float)) for v in value):
        return tuple(str(v) for v in value)
    return None


def load_tasks(files: list[str], split: str, *, prompt_key: str, answer_key: str, extra_keys: list[str] | None,
               id_key: str | None, source_key: str, max_rows: int | None = None) -> list[Task]:
    """The tasks of one split: every row of every file, mapped by the column keys."""
    tasks: list[Task] = []
    for file in files:
        rows = read_rows(file)[:max_rows]
        name = Path(file).name
        for i, row in enumerate(rows):
            where = f"data file {file} row {i + 1}"
            found, prompt = _lookup(row, prompt_key)
            if not found:
                raise DataError(f"{where}: no column {prompt_key!r} (data.prompt_key); columns: {', '.join(row)}")
            question = _prompt_text(prompt)
            if question is None:
                raise DataError(f"{where}: column {prompt_key!r} must be text or a chat list, got {type(prompt).__name__}")
            found, gold = _lookup(row, answer_key)
            if not found:
                raise DataError(f"{where}: no column {answer_key!r} (data.answer_key); columns: {', '.join(row)}")
            answers = _answers(gold)
            if answers is None:
                raise DataError(f"{where}: column {answer_key!r} must be text, a number or a list of them, got {gold!r}"[:200])
            top = {prompt_key.split(".")[0], answer_key.split(".")[0]}
            keep = extra_keys if extra_keys is not None else [k for k in row if k not in top]
            extra = {}
            for k in keep:
                ok, v = _lookup(row, k)
                if not ok:
                    raise DataError(f"{where}: no column {k!r} (data.extra_keys); columns: {', '.join(row)}")
                extra[k] = v
            task_id = f"{name}-{i}"
            if id_key is not None:
                ok, v = _lookup(row, id_key)
                if not ok:
                    raise DataError(f"{where}: no column {id_key!r} (data.id_key); columns: {', '.join(row)}")
                task_id = str(v)
            source = _lookup(row, source_key)[1] if _lookup(row, source_key)[0] else name
            meta = {"split": split, "file": str(file), "row": i, "data_source": str(source), "ground_truth": gold,
                    "extra_info": extra, "columns": {k: v for k, v in row.items() if k != prompt_key}}
            tasks.append(Task(task_id, question, answers, meta))
    return tasks
