"""Shared by the benchmark scripts: write a result file and, with --json, print it; format mean ± std."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path


def save_result(result: dict, out: str | Path, print_json: bool) -> None:
    """Write `result` to `out` (parents created); print it as JSON too when `print_json`."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    if print_json:
        print(json.dumps(result, indent=1))


def fmt(xs: list[float | None], d: int = 3) -> str:
    """mean ± sample std of the values that are not None / NaN ("–" if none; the value alone if one)."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return "–"
    return f"{statistics.mean(xs):.{d}f} ± {statistics.stdev(xs):.{d}f}" if len(xs) > 1 else f"{xs[0]:.{d}f}"
