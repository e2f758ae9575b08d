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
