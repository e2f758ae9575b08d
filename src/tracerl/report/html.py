"""A run's report as one self-contained HTML file: header, learning curves, tables, config.

    python -c "from tracerl.report import write_report; print(write_report('runs/quickstart'))"

Charts are inline SVG drawn here, with no JavaScript, stylesheet or font fetched from elsewhere:
the report has to open on an offline machine and survive being copied around as one file.
Curves are drawn twice — against step and against cumulative generated tokens — because methods
are compared at equal cost (docs/cost.md §7), not at equal step count.
"""

from __future__ import annotations

import datetime
import html
import math
import os
from dataclasses import dataclass
from pathlib import Path

from tracerl.report.credit import CREDIT_STYLE, credit_section
from tracerl.report.rundir import RunData, config_summary, read_run, series, with_cumulative_tokens
from tracerl.report.trees import DEFAULT_PROMPTS, TREE_STYLE, tree_section
from tracerl.rundir import REPORT_FILE, atomic_write_text
from tracerl.runlog import as_float, format_number

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
TOKENS = "cum_gen_tokens"

# (title, y label, [(metrics key, legend label), ...]); EM also gets one line per eval split.
STEP_CHARTS = [
    ("Mean reward", "reward", [("reward_mean", "train reward")]),
    ("Exact match", "EM", [("em", "train EM")]),
    (
        "Effective ratio and zero-advantage token fraction",
        "fraction",
        [("effective_ratio", "effective ratio"), ("zero_adv_frac", "zero-adv fraction")],
    ),
    ("Cumulative generated tokens (cost)", "tokens", [(TOKENS, "generated tokens")]),
    ("Seconds per step", "seconds", [("rollout_s", "rollout"), ("update_s", "update"), ("credit_s", "token credit")]),
    ("Policy loss", "loss", [("loss", "loss")]),
]
COST_CHARTS = STEP_CHARTS[:2]
EVAL_OVERLAY = {"Exact match": "em"}  # chart title -> eval.jsonl key drawn on it, per split

esc = html.escape


@dataclass
class Line:
    label: str
    points: list[tuple[float, float]]
    band: list[tuple[float, float, float]] | None = None  # (x, low, high): a shaded range around the line
    color: str | None = None  # default: the palette colour of the line's position


@dataclass
class Chart:
    title: str
    x_label: str
    y_label: str
    lines: list[Line]


# ---------------------------------------------------------------------------------------------
# SVG


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    if not lo < hi:  # a single value: open a small window around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [round(i * step, 12) + 0.0 for i in range(first, last + 1)]


def svg_chart(chart: Chart, width: int = 480, height: int = 290) -> str:
    left, right, top, bottom = 64, 16, 46, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    bands = [b for line in chart.lines for b in line.band or []]
    xs = [x for line in chart.lines for x, _ in line.points] + [x for x, _, _ in bands]
    ys = [y for line in chart.lines for _, y in line.points] + [y for _, lo, hi in bands for y in (lo, hi)]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    (x0, x1), (y0, y1) = (x_ticks[0], x_ticks[-1]), (y_ticks[0], y_ticks[-1])

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y - y0) / (y1 - y0) * plot_h

    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}" role="img" aria-label="{esc(chart.title)}">',
        f'<text class="title" x="{left}" y="18">{esc(chart.title)}</text>',
    ]
    legend_x = left
    for i, line in enumerate(chart.lines):
        color = line.color or PALETTE[i % len(PALETTE)]
        out.append(f'<rect x="{legend_x}" y="28" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{legend_x + 14}" y="37">{esc(line.label)}</text>')
        legend_x += 30 + 6.5 * len(line.label)
    right_x, bottom_y = left + plot_w, top + plot_h
    for t in y_ticks:
        y = py(t)
        out.append(f'<line class="gridline" x1="{left}" y1="{y:.1f}" x2="{right_x}" y2="{y:.1f}"/>')
        out.append(f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f"{esc(format_number(t))}</text>")
    for t in x_ticks:
        x = px(t)
        out.append(f'<line class="gridline" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom_y}"/>')
        out.append(f'<text class="tick" x="{x:.1f}" y="{bottom_y + 16}" text-anchor="middle">'
                   f"{esc(format_number(t))}</text>")
    out.append(f'<rect class="frame" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}"/>')
    out.append(f'<text class="label" x="{left + plot_w / 2:.1f}" y="{height - 8}" '
               f'text-anchor="middle">{esc(chart.x_label)}</text>')
    out.append(f'<text class="label" x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">{esc(chart.y_label)}</text>')
    for i, line in enumerate(chart.lines):
        color = line.color or PALETTE[i % len(PALETTE)]
        if line.band and len(line.band) > 1:
            edge = [(px(x), py(hi)) for x, _, hi in line.band] + [(px(x), py(lo)) for x, lo, _ in line.band[::-1]]
            text = " ".join(f"{x:.1f},{y:.1f}" for x, y in edge)
            out.append(f'<polygon class="band" fill="{color}" fill-opacity="0.16" stroke="none" points="{text}"/>')
        coords = [(px(x), py(y)) for x, y in line.points]
        if len(coords) <= 25:  # mark sparse lines (evaluations; a 1-point line is invisible)
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>'
                    for x, y in coords]
        text = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{text}"/>')
    out.append("</svg>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# What to draw


def _eval_lines(run: RunData, key: str, step_to_x: dict[float, float] | None) -> list[Line]:
    """One line per evaluation split; with step_to_x, eval steps are mapped onto another x axis."""
    lines = []
    for split in dict.fromkeys(str(row.get("split", "eval")) for row in run.evals):
        rows = [r for r in run.evals if str(r.get("split", "eval")) == split]
        points = series(rows, key)
        if step_to_x is not None:
            points = [(step_to_x[s], y) for s, y in points if s in step_to_x]
        lines.append(Line(f"{split} {key.upper()}", points))
    return lines


def build_charts(run: RunData, x: str = "step") -> tuple[list[Chart], list[str]]:
    """Charts with at least one point, and the titles of those with nothing logged yet."""
    metrics = with_cumulative_tokens(run.metrics)
    step_to_x = None
    if x != "step":
        step_to_x = {0.0: 0.0, **dict(series(metrics, x, x="step"))}  # step 0: before training
    specs = STEP_CHARTS if x == "step" else COST_CHARTS
    x_label = "step" if x == "step" else "cumulative generated tokens"
    charts, empty = [], []
    for title, y_label, keys in specs:
        lines = [Line(label, series(metrics, key, x=x)) for key, label in keys]
        if title in EVAL_OVERLAY:
            lines += _eval_lines(run, EVAL_OVERLAY[title], step_to_x)
        lines = [line for line in lines if line.points]
        if x != "step":
            title = f"{title} vs generated tokens"
        if lines:
            charts.append(Chart(title, x_label, y_label, lines))
        else:
            empty.append(title)
    return charts, empty


# ---------------------------------------------------------------------------------------------
# Page


def _cell(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"  # steps and token counts in full
    number = as_float(value)
    if number is not None and not isinstance(value, bool):
        return esc(format_number(number))
    return esc("-" if value is None else str(value))


def html_table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _columns(rows: list[dict], first: tuple[str, ...]) -> list[str]:
    keys = dict.fromkeys(k for k in first if any(k in r for r in rows))
    for row in rows:
        keys.update(dict.fromkeys(row))
    return list(keys)


def _chart_section(title: str, charts: list[Chart], empty: list[str]) -> str:
    body = "".join(f'<div class="cell">{svg_chart(c)}</div>' for c in charts)
    note = f'<p class="note">Not logged: {esc(", ".join(empty))}.</p>' if empty else ""
    if not charts:
        body, note = '<p class="note">Nothing to plot yet.</p>', ""
    return f'<h2>{esc(title)}</h2><div class="charts">{body}</div>{note}'


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1020px; color: #222; }
h1 { margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #ddd; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.chart text { font: 11px system-ui, sans-serif; fill: #333; }
.chart .title { font-size: 13px; font-weight: 600; }
.chart .gridline { stroke: #e6e6e6; } .chart .frame { fill: none; stroke: #555; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
pre { background: #f7f7f7; padding: 12px; overflow-x: auto; font-size: 12px; }
.note, .meta { color: #666; font-size: 13px; }
"""


BREAKDOWN_COLUMNS = ("dataset", "type", "hops", "n", "em", "f1", "em_squad", "f1_squad", "mean_turns", "format_error_rate", "gold_recall")


def breakdown_section(breakdowns: list[dict]) -> str:
    """The latest `tracerl eval` breakdown of each (model, split): EM / F1 per dataset, question type
    and hop count ("" when there is none)."""
    latest = {(str(b.get("model")), str(b.get("split"))): b for b in breakdowns if isinstance(b.get("rows"), list)}
    if not latest:
        return ""
    parts = ["<h2>Evaluation by dataset and question type</h2>"]
    for (model, split), b in latest.items():
        parts.append(f'<p class="meta">split {esc(split)} · model {esc(model)}</p>')
        rows = [r for r in b["rows"] if isinstance(r, dict)]
        parts.append(html_table(list(BREAKDOWN_COLUMNS), [[r.get(c) for c in BREAKDOWN_COLUMNS] for r in rows]))
    return "".join(parts)


def render_report(run: RunData, tree_step: int | None = None, tree_prompts: int = DEFAULT_PROMPTS) -> str:
    """The page; the tree view shows `tree_prompts` prompts of step `tree_step` (default: the
    latest step with logged trees)."""
    summary = config_summary(run.config)
    last = run.metrics[-1] if run.metrics else {}
    steps = f"{len(run.metrics)} steps logged, last step {_cell(last.get('step'))}"
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        f"<h1>{esc(run.name)}</h1>",
        f'<p class="meta">{esc(str(run.run_dir))} · {steps} · {len(run.evals)} evaluations'
        f" · generated {esc(generated)}</p>",
        html_table(list(summary) or ["config"], [list(summary.values()) or ["no config.yaml"]]),
        _chart_section("Learning curves", *build_charts(run)),
        _chart_section("At equal cost (x: generated tokens)", *build_charts(run, TOKENS)),
        "<h2>Final metrics</h2>",
        html_table(["metric", "value"], [[k, v] for k, v in last.items()]) if last else "",
        "<h2>Evaluations</h2>",
    ]
    if run.evals:
        columns = _columns(run.evals, ("step", "split"))
        parts.append(html_table(columns, [[r.get(c) for c in columns] for r in run.evals]))
    else:
        parts.append('<p class="note">No evaluation yet.</p>')
    parts.append(breakdown_section(run.breakdowns))
    parts.append(tree_section(run.trees, tree_step, tree_prompts))
    parts.append(credit_section(run.credit))
    parts += ["<h2>Config</h2>", f"<pre>{esc(run.config_text or '(no config.yaml)')}</pre>"]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(run.name)} · tracerl report</title><style>{STYLE}{TREE_STYLE}{CREDIT_STYLE}</style></head>"
        "<body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def write_report(run_dir: str | os.PathLike, tree_step: int | None = None,
                 tree_prompts: int = DEFAULT_PROMPTS) -> Path:
    """Write ``run_dir/report.html`` (atomically, so a browser never sees half a file)."""
    run = read_run(run_dir)
    return write_page(render_report(run, tree_step, tree_prompts), run.run_dir / REPORT_FILE)


def write_page(page: str, path: str | os.PathLike) -> Path:
    """Write one HTML page atomically (a temporary file beside it, then a rename)."""
    return atomic_write_text(path, page)
