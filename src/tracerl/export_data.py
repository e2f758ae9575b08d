"""Export a split of any environment to the Search-R1 / verl parquet layout (docs/evaluation.md §3).

One row per task, in split order:

* `data_source`: the task's dataset (real QA) or `tracerl_<env.name>`;
* `prompt`: the chat the policy starts from, `[{"role": "user", "content": env.user_prompt(task)}]`
  (a system message first when the environment has one);
* `ability`: `fact-reasoning` (Search-R1's value; `math` for arith) unless given;
* `reward_model`: `{"style": "rule", "ground_truth": {"target": [answers]}}`;
* `extra_info`: `{"split", "index", ...the task's meta}`;

plus Search-R1's own `id`, `question` and `golden_answers` columns, which its data scripts keep and
tracerl's reader (`envs.qa_data.parse_search_r1`) reads, so the file loads back as the same questions
and answers. Meta values parquet cannot hold as they are (mixed lists, nested objects, a key whose
type differs between rows) are stored as JSON strings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tracerl.errors import DataError, TracerlError
from tracerl.task import SPLITS

_SCALARS = (str, int, float, bool)


def _require_pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise TracerlError("export-data writes parquet, which needs pyarrow; install it with "
                           "`pip install 'tracerl[parquet]'`") from None
    return pyarrow


def _check_out(out: str | Path) -> Path:
    """The output path, refused (one line) before anything is built when it cannot be written."""
    p = Path(out)
    if p.is_dir():
        raise TracerlError(f"--out {p} is a directory; give a file name ending in .parquet")
    if p.suffix != ".parquet":
        raise TracerlError(f"--out {p} must end in .parquet (readers tell the layout by the suffix)")
    parent = p.parent
    if not parent.is_dir():
        raise TracerlError(f"cannot write {p}: {parent} {'is not a directory' if parent.exists() else 'does not exist'}")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise TracerlError(f"cannot write {p}: permission denied")
    return p


def _plain(v: Any) -> Any:
    """A meta value as parquet can store it: scalars and lists of one scalar type as they are, the rest JSON."""
    if v is None or isinstance(v, _SCALARS):
        return v
    if isinstance(v, (list, tuple)) and (not v or (len({type(x) for x in v}) == 1 and isinstance(v[0], _SCALARS))):
        return list(v)
    return json.dumps(v, sort_keys=True, default=str)


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, list):
        return "list:" + _kind(v[0])
    return type(v).__name__


def _consistent(metas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON-encode every key whose values have more than one kind across rows (parquet columns have one type)."""
    kinds: dict[str, set[str]] = {}
    for m in metas:
        for k, v in m.items():
            if v is not None and v != []:  # no value, or an empty list: fits any column type
                kinds.setdefault(k, set()).add(_kind(v))
    mixed = {k for k, s in kinds.items() if len(s) > 1}
    return [{k: (json.dumps(v, sort_keys=True) if k in mixed and v is not None else v) for k, v in m.items()}
            for m in metas]


def search_r1_rows(env, split: str, ability: str | None = None) -> list[dict[str, Any]]:
    """The split's tasks as Search-R1 / verl records (see the module doc)."""
    if split not in SPLITS:
        raise TracerlError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    tasks = env.tasks(split)
    if not tasks:
        raise DataError(f"split {split!r} of environment {env.name!r} is empty; nothing to export")
    ability = ability or ("math" if env.name == "arith" else "fact-reasoning")
    system = env.system_prompt()
    metas = _consistent([{k: _plain(v) for k, v in t.meta.items()} for t in tasks])
    rows = []
    for i, (task, meta) in enumerate(zip(tasks, metas)):
        answers = list(task.answers)
        chat = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": env.user_prompt(task)}]
        rows.append({
            "id": task.id,
            "question": task.question,
            "golden_answers": answers,
            "data_source": str(task.meta.get("dataset") or f"tracerl_{env.name}"),
            "prompt": chat,
            "ability": ability,
            "reward_model": {"style": "rule", "ground_truth": {"target": answers}},
            "extra_info": {**meta, "split": split, "index": i},
        })
    return rows


def write_parquet(rows: list[dict[str, Any]], out: str | Path) -> None:
    """Write the records to `out` (through a temporary file beside it, then renamed)."""
    pa = _require_pyarrow()
    import pyarrow.parquet as pq

    p = Path(out)
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"cannot lay the records out as parquet: {' '.join(str(e).split())[:160]}") from None
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TracerlError(f"cannot write {p}: {e.strerror or ' '.join(str(e).split())}") from None


def export_split(cfg, split: str, out: str | Path, ability: str | None = None) -> int:
    """Write `split` of the config's environment to `out` as Search-R1 / verl parquet; the row count."""
    from tracerl.setup import build_env

    _require_pyarrow()  # the cheap checks first: nothing is built for a command that cannot finish
    if split not in SPLITS:
        raise TracerlError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    p = _check_out(out)
    rows = search_r1_rows(build_env(cfg), split, ability)
    write_parquet(rows, p)
    return len(rows)
