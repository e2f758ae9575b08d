"""What a run leaves on disk while it trains, and what it shows on the terminal.

A run directory holds ``metrics.jsonl`` (one row per training step), ``eval.jsonl`` (one row per
evaluation) and ``tb/`` (TensorBoard events); the layout is `tracerl.rundir`'s. Every row goes through
one interface, `MetricsLogger`, to each logger trainer.loggers names (registry `LOGGERS`: console, jsonl,
tensorboard here; wandb and mlflow in `tracerl.trackers`)::

    with RunLogger(run_dir, resume_step=ckpt_step, loggers=["console", "wandb"], context=ctx) as log:
        for step in range(ckpt_step + 1, total_steps + 1):
            log.log_step(step, train_step())

The JSONL files are the source of truth (the HTML report and any notebook read them); the other
loggers are views of the same numbers (docs/trackers.md).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tracerl.errors import TracerlError, error_reason
from tracerl.registry import Registry
from tracerl.rundir import EVAL_FILE, METRICS_FILE, TB_DIR, atomic_write_text


class CorruptLogError(ValueError):
    """A JSONL log has an unreadable line that is not the last one (so not a crash artefact)."""


# ---------------------------------------------------------------------------------------------
# JSON rows


def _plain(value: Any) -> Any:
    """Turn numpy/torch scalars into Python numbers and non-finite floats into None (JSON null)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    number = as_float(value)
    if number is not None:
        return _plain(number)
    return str(value)


def dump_row(row: Mapping[str, Any]) -> str:
    """One JSONL line (with its newline); strict JSON, so NaN/inf become null."""
    return json.dumps(_plain(row), allow_nan=False, ensure_ascii=False) + "\n"


def as_float(value: Any) -> float | None:
    """A float for numbers, numpy scalars and one-element tensors; None for anything else."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    item = getattr(value, "item", None)
    if not callable(item):
        return None
    try:
        out = item()
    except (TypeError, ValueError, RuntimeError):  # arrays/tensors with more than one element
        return None
    return float(out) if isinstance(out, (bool, int, float)) else None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file. A broken last line (a crash mid-write) is skipped with a warning;
    a broken line anywhere else raises CorruptLogError naming the file and line number."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                msg = f"{path}:{number}: skipping partial last line ({err.msg})"
                warnings.warn(msg, stacklevel=2)
                break
            raise CorruptLogError(
                f"{path}:{number}: not valid JSON ({err.msg}); repair or delete this line"
            ) from None
        if not isinstance(row, dict):
            kind = type(row).__name__
            raise CorruptLogError(f"{path}:{number}: expected a JSON object, got {kind}")
        rows.append(row)
    return rows


def _truncate_after(path: Path, last_step: int) -> None:
    """Keep only rows with step <= last_step (rows without a step are kept), atomically."""
    if not path.exists():
        return
    kept = [dump_row(row) for row in read_jsonl(path) if _step_of(row) <= last_step]
    atomic_write_text(path, "".join(kept))


def _drop_partial_tail(path: Path) -> None:
    """Cut an unterminated last line (a crash mid-write) so the next row starts on its own line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        warnings.warn(f"{path}: dropping a partial last line left by a crash", stacklevel=3)
        os.truncate(path, keep)


def _step_of(row: Mapping[str, Any]) -> float:
    step = as_float(row.get("step"))
    return -math.inf if step is None else step


# ---------------------------------------------------------------------------------------------
# The loggers (trainer.loggers): one interface, looked up by name in LOGGERS


@dataclass(frozen=True)
class LoggerContext:
    """What a logger may need to start: the run directory and name, the config, where the run starts."""

    run_dir: Path
    run_name: str = "run"
    project: str = "tracerl"  # wandb project / mlflow experiment
    config: Mapping[str, Any] = field(default_factory=dict)  # the run's config (dump_config's tree)
    resume_step: int | None = None  # a resume from the checkpoint of this step (None: a new run)
    total_steps: int = 0  # the console's progress bar
    progress: bool = True  # trainer.progress


class MetricsLogger(Protocol):
    """Where step and evaluation metrics go (trainer.loggers); `RunLogger` hands every row to each."""

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None: ...

    def log_eval(self, step: int, split: str, metrics: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


LOGGERS: Registry = Registry("logger", traits={"package": None})  # name -> factory(LoggerContext) -> MetricsLogger


def scalars(prefix: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """{"prefix/key": value} of the finite numbers of a row (what the trackers record; strings, lists and
    non-finite values, null in metrics.jsonl, are left out)."""
    out = {}
    for key, value in metrics.items():
        number = as_float(value)
        if number is not None and math.isfinite(number) and key not in ("step", "split"):
            out[f"{prefix}/{key}"] = number
    return out


@LOGGERS.register("jsonl")
class JsonlLogger:
    """metrics.jsonl and eval.jsonl, the run's source of truth (always on).

    Each row is written with one ``write`` call, flushed and fsync'ed, so a crash loses at most the
    row being written (which ``read_jsonl`` then skips). With ``resume_step=S`` rows after step S
    are dropped first, so a resumed run's files equal those of an uninterrupted run; without it,
    rows are appended to whatever the files already hold."""

    def __init__(self, ctx: LoggerContext):
        self.metrics_path = ctx.run_dir / METRICS_FILE
        self.eval_path = ctx.run_dir / EVAL_FILE
        if ctx.resume_step is not None:
            _truncate_after(self.metrics_path, ctx.resume_step)
            _truncate_after(self.eval_path, ctx.resume_step)
        for path in (self.metrics_path, self.eval_path):
            _drop_partial_tail(path)
        self._files = {path: open(path, "a", encoding="utf-8") for path in (self.metrics_path, self.eval_path)}

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._append(self.metrics_path, {"step": int(step), **{k: v for k, v in metrics.items() if k != "step"}})

    def log_eval(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        rest = {k: v for k, v in metrics.items() if k not in ("step", "split")}
        self._append(self.eval_path, {"step": int(step), "split": split, **rest})

    def _append(self, path: Path, row: Mapping[str, Any]) -> None:
        f = self._files[path]
        try:
            f.write(dump_row(row))
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:  # e.g. a full disk: one line naming the file (a resume drops a partial row)
            raise TracerlError(f"could not append to {path}: {error_reason(e)}; the run stops "
                               "here and resumes from its last checkpoint once this is fixed") from None

    def close(self) -> None:
        for f in self._files.values():
            if not f.closed:
                f.close()


@LOGGERS.register("tensorboard")
class TensorBoardLogger:
    """TensorBoard events under RUN_DIR/tb: train/<key> per step, eval/<split>/<key> per evaluation."""

    def __init__(self, ctx: LoggerContext):
        from torch.utils.tensorboard import SummaryWriter  # heavy import; only when asked

        # purge_step hides events a crashed run wrote after its last checkpoint.
        purge = None if ctx.resume_step is None else ctx.resume_step + 1
        self._tb = SummaryWriter(log_dir=str(ctx.run_dir / TB_DIR), purge_step=purge)

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._write(step, scalars("train", metrics))

    def log_eval(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        self._write(step, scalars(f"eval/{split}", metrics))

    def _write(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._tb.add_scalar(key, value, global_step=int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


@LOGGERS.register("console")
class ConsoleLogger:
    """The progress bar (a terminal) or a plain line every few steps (`Progress`), started at the first row."""

    def __init__(self, ctx: LoggerContext):
        start = ctx.resume_step or 0
        self.bar = Progress(total=ctx.total_steps, start=start, disable=not ctx.progress)
        self._open = False

    def _started(self) -> Progress:
        if not self._open:
            self.bar.__enter__()
            self._open = True
        return self.bar

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._started().update(step, metrics)

    def log_eval(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        if split == "validation" and "em" in metrics:  # shown with the steps that follow
            self._started().note({"val_em": metrics["em"]}, step)

    def close(self) -> None:
        if self._open:
            self.bar.__exit__(None, None, None)
            self._open = False


class RunLogger:
    """Hands step and evaluation rows to every logger of trainer.loggers: metrics.jsonl and eval.jsonl
    always (`JsonlLogger`), TensorBoard unless `tensorboard=False`, and the others `loggers` names
    (console; wandb and mlflow once `tracerl.trackers` is imported, which registers them)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,
        loggers: Sequence[str] = (),
        context: LoggerContext | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ctx = context or LoggerContext(self.run_dir)
        ctx = LoggerContext(self.run_dir, ctx.run_name, ctx.project, ctx.config, resume_step, ctx.total_steps,
                            ctx.progress)
        names = ["jsonl", *(["tensorboard"] if tensorboard else []),
                 *(n for n in loggers if n not in ("jsonl", "tensorboard"))]
        self.loggers: list[MetricsLogger] = []
        try:
            for name in names:
                self.loggers.append(LOGGERS.get(name)(ctx))
        except BaseException:
            self.close()
            raise
        self.jsonl: JsonlLogger = self.loggers[0]
        self.metrics_path, self.eval_path = self.jsonl.metrics_path, self.jsonl.eval_path

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_step(step, metrics)

    def log_eval(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_eval(step, split, metrics)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Terminal progress


def format_number(value: Any) -> str:
    """Short human form: 0.423, 12, 3.4k, 1.2M, nan."""
    number = as_float(value)
    if number is None:
        return "-" if value is None else str(value)
    if not math.isfinite(number):
        return str(number)
    size = abs(number)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if size >= scale:
            return f"{number / scale:.3g}{suffix}"
    if number.is_integer():
        return str(int(number))
    return f"{number:.3g}"


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


DEFAULT_FIELDS = {"reward_mean": "reward", "em": "em", "val_em": "val em", "effective_ratio": "eff"}


class Progress:
    """A progress bar over training steps with a live line of chosen metrics.

    On a terminal this is a ``rich`` bar (elapsed, ETA, ``reward 0.42 | em 0.4 | eff 0.55``). When
    output is not a terminal (CI, ``> log.txt``) it prints one plain line every ``every`` steps
    instead — by default about 20 lines per run — plus the last step. ``disable=True`` prints
    nothing.

    ``fields`` maps metric keys to their short labels (a list of keys uses the keys as labels).
    A field keeps its last value until a later update brings a new one, so a validation score
    passed once stays on screen until the next evaluation.
    """

    def __init__(
        self,
        total: int,
        *,
        start: int = 0,
        fields: Mapping[str, str] | Sequence[str] = DEFAULT_FIELDS,
        description: str = "train",
        every: int | None = None,
        disable: bool = False,
        console: Any = None,
    ):
        from rich.console import Console

        self.total = int(total)
        self.start = int(start)
        self.fields = dict(fields) if isinstance(fields, Mapping) else {k: k for k in fields}
        self._latest: dict[str, Any] = {}
        self.description = description
        self.disable = disable
        self.console = console if console is not None else Console(file=sys.stdout)
        self.interactive = self.console.is_terminal and not self.console.is_dumb_terminal
        self.every = every or max(1, math.ceil(max(self.total - self.start, 1) / 20))
        self._bar = None
        self._task = None
        self._started_at = time.monotonic()
        self._last_printed = None

    def stats(self, metrics: Mapping[str, Any]) -> str:
        shown = [(label, metrics[key]) for key, label in self.fields.items() if key in metrics]
        return " | ".join(f"{label} {format_number(value)}" for label, value in shown)

    def __enter__(self) -> Progress:
        self._started_at = time.monotonic()
        if self.disable or not self.interactive:
            return self
        from rich import progress as rp

        self._bar = rp.Progress(
            rp.TextColumn("[bold]{task.description}"),
            rp.BarColumn(),
            rp.MofNCompleteColumn(),
            rp.TimeElapsedColumn(),
            rp.TextColumn("eta"),
            rp.TimeRemainingColumn(),
            rp.TextColumn("{task.fields[stats]}"),
            console=self.console,
        )
        self._bar.start()
        self._task = self._bar.add_task(
            self.description, total=self.total, completed=self.start, stats=""
        )
        return self

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        if self.disable:
            return
        self._latest.update({k: v for k, v in (metrics or {}).items() if k in self.fields})
        stats = self.stats(self._latest)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=stats)
            return
        if (step - self.start) % self.every == 0 or step >= self.total:
            self._print_line(step, stats)

    def _print_line(self, step: int, stats: str) -> None:
        if self._last_printed == (step, stats):
            return
        self._last_printed = (step, stats)
        elapsed = time.monotonic() - self._started_at
        done = max(step - self.start, 1)
        eta = elapsed / done * max(self.total - step, 0)
        pct = 100.0 * step / self.total if self.total else 100.0
        parts = [f"{self.description} {step}/{self.total} ({pct:.0f}%)"]
        parts += [f"elapsed {_clock(elapsed)}", f"eta {_clock(eta)}"] + ([stats] if stats else [])
        self.console.out(" | ".join(parts), highlight=False)

    def note(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Values shown from now on (e.g. a validation score) without printing a line; a live bar
        shows them at once (at `step`, when given)."""
        self._latest.update({k: v for k, v in metrics.items() if k in self.fields})
        if self._bar is not None and not self.disable:
            self._bar.update(self._task, stats=self.stats(self._latest),
                             **({"completed": step} if step is not None else {}))

    def print(self, text: str) -> None:
        """A message that should not disturb the bar (e.g. an evaluation result)."""
        if not self.disable:
            self.console.out(text, highlight=False)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
