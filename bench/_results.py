"""Shared by the benchmark scripts: write a result file and, with --json, print it."""

from __future__ import annotations

import json
from pathlib import Path


def save_result(result: dict, out: str | Path, print_json: bool) -> None:
    """Write `result` to `out` (parents created); print it as JSON too when `print_json`."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    if print_json:
        print(json.dumps(result, indent=1))
