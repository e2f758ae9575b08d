"""What a run directory holds, and the one way tracerl writes a file or a directory atomically.

    RUN_DIR/
      config.yaml               the resolved config the run started with      CONFIG_FILE
      metrics.jsonl             one row per training step (runlog)            METRICS_FILE
      eval.jsonl                one row per evaluation (runlog)               EVAL_FILE
      final_eval.json           the last validation result of `tracerl train` FINAL_EVAL_FILE
      eval_cli.jsonl            one row per `tracerl eval` of the run         EVAL_CLI_FILE
      eval_breakdown.jsonl      `tracerl eval` on QA data, per dataset / type BREAKDOWN_FILE
      report.html               the HTML report (report/)                     REPORT_FILE
      tb/                       TensorBoard events                            TB_DIR
      checkpoints/step_XXXXXX/  model/ + optimizer + trainer state            CHECKPOINT_DIR (checkpoint.py)
      trees/step_XXXXXX.jsonl   rollout trees logged at that step             TREES_DIR, trees_file
      credit/step_XXXXXX.jsonl  token-credit samples logged at that step      CREDIT_DIR, credit_file
      config_history.jsonl      what each resume changed in the config         CONFIG_HISTORY_FILE (resume_rules.py)
      .tracerl-run              written at creation: what --overwrite may clear  RUN_MARKER
      .tracerl.lock (+ .json)   held by the one process training here (owner)  LOCK_FILE, RunLock

The writers (train, checkpoint, runlog, tree, credit) and the readers (`tracerl.report.rundir`) share
these names from here: this module imports nothing of tracerl, so the training path never imports the
report to learn where its files go.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

CONFIG_FILE = "config.yaml"
CONFIG_HISTORY_FILE = "config_history.jsonl"  # one line per resume that changed the config (tracerl.resume_rules)
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
FINAL_EVAL_FILE = "final_eval.json"
EVAL_CLI_FILE = "eval_cli.jsonl"
BREAKDOWN_FILE = "eval_breakdown.jsonl"
REPORT_FILE = "report.html"
TB_DIR = "tb"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_MODEL_DIR = "model"  # inside a checkpoint: the policy as a Hugging Face directory
TREES_DIR = "trees"
CREDIT_DIR = "credit"
RUN_MARKER = ".tracerl-run"
LOCK_FILE = ".tracerl.lock"
LOCK_OWNER_FILE = ".tracerl.lock.json"
LOCK_FILES = (LOCK_FILE, LOCK_OWNER_FILE)


def step_name(step: int) -> str:
    """`step_000012`: the name of what was written at a step (a checkpoint, a trees or credit file)."""
    return f"step_{step:06d}"


def step_of(path: str | os.PathLike) -> int | None:
    """The step in a `step_XXXXXX[.jsonl]` name; None for any other name."""
    stem = Path(path).name.split(".", 1)[0]
    digits = stem.removeprefix("step_")
    return int(digits) if digits != stem and digits.isdigit() else None


def trees_file(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / TREES_DIR / f"{step_name(step)}.jsonl"


def credit_file(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CREDIT_DIR / f"{step_name(step)}.jsonl"


# ------------------------------------------------------------------------------ atomic writes


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so that a reader sees the old file or the new one, never a part.

    The bytes go to a hidden temporary beside `path` (unique to this call, so concurrent writers never
    share one), are fsync'ed, and the temporary is renamed over `path`. The file keeps the mode of the
    one it replaces; a new one gets the mode `open()` gives (the umask's). Parent directories are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """`atomic_write_bytes` of `text` encoded."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Fill a directory that appears as `path` only once complete:

        with atomic_dir(ckpt_root / "step_000010") as tmp:
            model.save_pretrained(tmp / "model")

    The body writes into a hidden sibling `.NAME.tmp`; when it returns, every file in it is fsync'ed
    and the sibling replaces `path` (an existing `path` is moved aside first and then removed: the one
    moment `path` is absent, a reader sees "not there yet", never half a directory). When the body
    raises, the sibling is removed and `path` is left as it was.

    One writer per `path` at a time (a run's trainer; cache writers hold `models.io.file_lock`): the
    temporary's name is fixed so that what a crashed write left behind is cleared by the next one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = path.parent / f".{path.name}.tmp", path.parent / f".{path.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():  # os.replace cannot overwrite a non-empty directory
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ ownership


class RunDirError(RuntimeError):
    """The run directory is in use by another process, or is not a tracerl run (one line)."""


class RunLock:
    """The one process that trains in a run directory holds `LOCK_FILE` (an OS file lock through
    `filelock`: the kernel releases it when the process dies, so a dead owner never blocks the next run)
    and records who it is in `LOCK_OWNER_FILE` (pid, host, start time) for the message others get."""

    def __init__(self, run_dir: str | os.PathLike):
        import filelock  # here: only training takes the lock

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = filelock.FileLock(str(self.run_dir / LOCK_FILE), timeout=0)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise RunDirError(f"run directory {self.run_dir} is in use by {self._owner()}; wait for it to end or "
                              "choose another run.name") from None
        import json
        import socket
        import time

        atomic_write_text(self.run_dir / LOCK_OWNER_FILE, json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))

    def _owner(self) -> str:
        import json

        try:
            o = json.loads((self.run_dir / LOCK_OWNER_FILE).read_text())
            return f"process {o['pid']} on {o['host']} (since {o['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        if self._lock.is_locked:
            (self.run_dir / LOCK_OWNER_FILE).unlink(missing_ok=True)
            self._lock.release()


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a tracerl run: it has the marker, or (runs made before the marker) a config and
    a metrics file or a checkpoint directory."""
    p = Path(path)
    return (p / RUN_MARKER).is_file() or ((p / CONFIG_FILE).is_file()
                                          and ((p / METRICS_FILE).is_file() or (p / CHECKPOINT_DIR).is_dir()))


def never_started(path: str | os.PathLike) -> bool:
    """Whether `path` is a run whose start failed before it logged anything (only its marker and config):
    a rerun of the fixed command takes it over rather than being refused."""
    names = {e.name for e in run_dir_entries(path)}
    return RUN_MARKER in names and names <= {RUN_MARKER, CONFIG_FILE}


def run_dir_entries(path: str | os.PathLike) -> list[Path]:
    """What a directory holds besides the lock files."""
    p = Path(path)
    return [e for e in p.iterdir() if e.name not in LOCK_FILES] if p.is_dir() else []


def clear_run_dir(path: str | os.PathLike) -> None:
    """Empty a tracerl run directory for --overwrite (the lock files stay: the caller holds the lock);
    anything that is not a tracerl run is refused and left as it is."""
    entries = run_dir_entries(path)
    if entries and not is_run_dir(path):
        names = ", ".join(sorted(e.name for e in entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise RunDirError(f"--overwrite refused: {path} is not a tracerl run directory (it holds {names} and no "
                          f"{RUN_MARKER}); remove it yourself or choose another run.name / run.dir")
    for e in entries:
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink()
