"""Several runs on one self-contained HTML page, seeds of a method pooled.

    tracerl compare runs/uniform-s0 runs/uniform-s1 runs/tree-s0 runs/tree-s1 --out compare.html

A run's *method* is named by its config: by default `rollout.allocator` + `algo.advantage`
(another key, or several separated by commas, with `label_key`). Runs of one method that differ
in `run.seed` are its seeds. Curves are drawn against cumulative generated tokens, because
methods are compared at equal cost: validation EM (eval.jsonl rows of split "validation") and
the effective ratio (metrics.jsonl, a trailing mean over a few steps). Each method gets its mean
over seeds as a line and the seeds' min-max range as a band; where seeds ran for different
budgets, only the token range all of them reached is drawn (if they share none, every point that
some seed reaches). A table gives the final numbers per method.
"""

from __future__ import annotations

import bisect
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from tracerl.errors import TracerlError
from tracerl.report.html import PALETTE, STYLE, TOKENS, Chart, Line, esc, html_table, svg_chart, write_page
from tracerl.report.rundir import RunData, lookup, read_run, series, with_cumulative_tokens
from tracerl.rundir import CONFIG_FILE, EVAL_FILE, METRICS_FILE
from tracerl.runlog import format_number

DEFAULT_LABEL_KEYS = ("rollout.allocator", "algo.advantage")
VALIDATION_SPLITS = ("validation", "val")
SMOOTH_STEPS = 5  # effective ratio: trailing mean over this many steps
Points = list[tuple[float, float]]

# table columns averaged per step: (metrics key, column header)
STEP_MEANS = [
    ("leaves", "leaves / step"),
    ("effective_ratio", "effective ratio"),
    ("mixed_anchors", "mixed anchors / step"),
    ("rollout_s", "rollout s / step"),
]


@dataclass
class Method:
    label: str
    runs: list[RunData]

    @property
    def seeds(self) -> list[object]:
        return [lookup(r.config, "run.seed") for r in self.runs]


# ---------------------------------------------------------------------------------------------
# Per run


def label_keys(label_key: str | None) -> tuple[str, ...]:
    if label_key is None:
        return DEFAULT_LABEL_KEYS
    keys = tuple(k.strip() for k in label_key.split(",") if k.strip())
    if not keys:
        raise TracerlError(f"--label-key {label_key!r} names no config key")
    return keys


def method_label(run: RunData, keys: tuple[str, ...]) -> str:
    values = []
    for key in keys:
        value = lookup(run.config, key)
        values.append(f"no {key}" if value is None else str(value))
    return " + ".join(values)


def validation_rows(run: RunData) -> list[dict]:
    return [r for r in run.evals if str(r.get("split")) in VALIDATION_SPLITS]


def token_axis(run: RunData) -> dict[float, float]:
    """step -> cumulative generated tokens at the end of that step (step 0: before training)."""
    return {0.0: 0.0, **dict(series(with_cumulative_tokens(run.metrics), TOKENS, x="step"))}


def em_curve(run: RunData) -> Points:
    tokens = token_axis(run)
    return [(tokens[s], y) for s, y in series(validation_rows(run), "em") if s in tokens]


def trailing_mean(points: Points, window: int) -> Points:
    ys = [y for _, y in points]
    return [(x, statistics.fmean(ys[max(0, i + 1 - window): i + 1])) for i, (x, _) in enumerate(points)]


def step_metric_curve(key: str, window: int = SMOOTH_STEPS):
    """run -> trailing mean of a per-step metric (metrics.jsonl `key`) against cumulative generated tokens."""
    return lambda run: trailing_mean(series(with_cumulative_tokens(run.metrics), key, x=TOKENS), window)


effective_ratio_curve = step_metric_curve("effective_ratio")
predictor_ece_curve = step_metric_curve("predictor_ece")  # allocators with a success predictor only


def final_em(run: RunData) -> float | None:
    points = series(validation_rows(run), "em")
    return points[-1][1] if points else None


def run_mean(run: RunData, key: str) -> float | None:
    values = [y for _, y in series(run.metrics, key)]
    return statistics.fmean(values) if values else None


def total_tokens(run: RunData) -> float | None:
    points = series(with_cumulative_tokens(run.metrics), TOKENS)
    return points[-1][1] if points else None


# ---------------------------------------------------------------------------------------------
# Over seeds


def interpolate(points: Points, x: float) -> float:
    """Linear interpolation of a curve sorted by x, for x inside its range."""
    xs = [p[0] for p in points]
    i = bisect.bisect_left(xs, x)
    if i < len(xs) and xs[i] == x:
        return points[i][1]
    (xa, ya), (xb, yb) = points[i - 1], points[i]
    return ya + (yb - ya) * (x - xa) / (xb - xa)


def _sorted_curve(points: Points) -> Points:
    return sorted(dict(points).items())  # one y per x (the last logged), in x order


def seed_summary(curves: list[Points]) -> tuple[Points, list[tuple[float, float, float]]]:
    """(mean line, (x, min, max) band) of several seeds' curves, on the union of their x values."""
    curves = [_sorted_curve(c) for c in curves if c]
    if not curves:
        return [], []
    lo, hi = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
    grid = sorted({x for c in curves for x, _ in c})
    if lo <= hi:  # the budget every seed reached
        grid = [x for x in grid if lo <= x <= hi]
    mean, band = [], []
    for x in grid:
        values = [interpolate(c, x) for c in curves if c[0][0] <= x <= c[-1][0]]
        mean.append((x, statistics.fmean(values)))
        band.append((x, min(values), max(values)))
    return mean, band


def mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    mean = format_number(statistics.fmean(values))
    return f"{mean} ± {format_number(statistics.stdev(values))}" if len(values) > 1 else mean


def mean_of(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else None


# ---------------------------------------------------------------------------------------------
# The page


def read_runs(run_dirs: list[str | os.PathLike]) -> list[RunData]:
    runs = []
    for run_dir in run_dirs:
        path = Path(run_dir)
        if not path.is_dir():
            raise TracerlError(f"run directory {path} does not exist")
        if not (path / METRICS_FILE).is_file() and not (path / CONFIG_FILE).is_file():
            raise TracerlError(f"{path} is not a run directory (no config.yaml or {METRICS_FILE})")
        runs.append(read_run(path))
    return runs


def group_methods(runs: list[RunData], keys: tuple[str, ...]) -> list[Method]:
    """Methods in the order their first run was given."""
    methods: dict[str, Method] = {}
    for run in runs:
        label = method_label(run, keys)
        methods.setdefault(label, Method(label, [])).runs.append(run)
    return list(methods.values())


def build_comparison_charts(methods: list[Method]) -> list[Chart]:
    specs = [
        ("Validation EM vs generated tokens", "validation EM", em_curve),
        (f"Effective ratio ({SMOOTH_STEPS}-step mean) vs generated tokens", "effective ratio",
         effective_ratio_curve),
        (f"Success-predictor ECE ({SMOOTH_STEPS}-step mean) vs generated tokens", "ECE", predictor_ece_curve),
    ]
    charts = []
    for title, y_label, curve in specs:
        lines = []
        for i, method in enumerate(methods):
            mean, band = seed_summary([curve(run) for run in method.runs])
            if mean:
                n = len(method.runs)
                label = f"{method.label} ({n} seed{'s' if n != 1 else ''})"
                lines.append(Line(label, mean, band if n > 1 else None, PALETTE[i % len(PALETTE)]))
        if lines:
            charts.append(Chart(title, "cumulative generated tokens", y_label, lines))
    return charts


def method_rows(methods: list[Method]) -> tuple[list[str], list[list[object]]]:
    header = ["method", "seeds", "n", "final validation EM (mean ± std)", "generated tokens / run"]
    header += [title for _, title in STEP_MEANS]
    rows = []
    for m in methods:
        seeds = ", ".join("?" if s is None else str(s) for s in m.seeds)
        row: list[object] = [m.label, seeds, len(m.runs), mean_std([final_em(r) for r in m.runs]),
                             mean_of([total_tokens(r) for r in m.runs])]
        row += [mean_of([run_mean(r, key) for r in m.runs]) for key, _ in STEP_MEANS]
        rows.append(row)
    return header, rows


def _duplicate_seeds(methods: list[Method]) -> list[str]:
    notes = []
    for m in methods:
        seen = [s for s in m.seeds if s is not None]
        repeated = sorted({str(s) for s in seen if seen.count(s) > 1})
        if repeated:
            notes.append(f"{m.label}: several runs with seed {', '.join(repeated)}")
    return notes


def render_comparison(runs: list[RunData], label_key: str | None = None) -> str:
    keys = label_keys(label_key)
    methods = group_methods(runs, keys)
    charts = build_comparison_charts(methods)
    header, rows = method_rows(methods)
    run_rows = [[str(r.run_dir), r.name, m.label, lookup(r.config, "run.seed"), len(r.metrics), final_em(r),
                 total_tokens(r)] for m in methods for r in m.runs]
    chart_html = "".join(f'<div class="cell">{svg_chart(c)}</div>' for c in charts)
    if not charts:
        chart_html = f'<p class="note">Nothing to plot: no {METRICS_FILE} or {EVAL_FILE} rows with tokens.</p>'
    notes = _duplicate_seeds(methods)
    parts = [
        "<h1>Run comparison</h1>",
        f'<p class="meta">{len(runs)} runs, {len(methods)} methods, grouped by {esc(" + ".join(keys))}.'
        " Lines: mean over seeds; bands: min-max over seeds. Validation EM is the last"
        ' "validation" evaluation of each run; std is over seeds (n-1).</p>',
        f'<div class="charts">{chart_html}</div>',
        "<h2>Methods</h2>",
        html_table(header, rows),
        "".join(f'<p class="note">Note: {esc(n)}.</p>' for n in notes),
        "<h2>Runs</h2>",
        html_table(["run directory", "name", "method", "seed", "steps", "final validation EM",
                    "generated tokens"], run_rows),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>tracerl comparison · {len(methods)} methods</title><style>{STYLE}</style></head>"
        "<body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def write_comparison(run_dirs: list[str | os.PathLike], out: str | os.PathLike,
                     label_key: str | None = None) -> Path:
    """Write the comparison page of `run_dirs` to `out`; `label_key` is the config key (or keys,
    comma-separated) that names a method (default: rollout.allocator,algo.advantage)."""
    if not run_dirs:
        raise TracerlError("compare needs at least one run directory")
    page = render_comparison(read_runs(run_dirs), label_key)
    out = Path(out)
    if out.is_dir():
        raise TracerlError(f"--out {out} is a directory; give a file name such as {out / 'compare.html'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_page(page, out)
