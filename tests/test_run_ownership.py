"""Who may write a run directory: --overwrite clears only tracerl runs, one training process holds the
run directory's lock (a dead owner never blocks), read-only commands work while a run trains."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY_RUN
from tracerl import rundir
from tracerl.config import ConfigError, load_config
from tracerl.errors import TracerlError
from tracerl.train import Trainer


def _trainer(run_dir, *extra, overwrite=False, resume=None):
    cfg = load_config(None, [*TINY_RUN, f"run.dir={run_dir}", "trainer.tensorboard=false", *extra])
    return Trainer(cfg, resume=resume, overwrite=overwrite, log=lambda *a: None)


def test_overwrite_refuses_a_directory_that_is_not_a_run_and_keeps_its_files(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("precious")
    (d / "data").mkdir()
    with pytest.raises(TracerlError, match="not a tracerl run directory.*data, notes.txt"):
        _trainer(d, overwrite=True).setup()
    assert (d / "notes.txt").read_text() == "precious" and (d / "data").is_dir()
    assert not (d / rundir.CONFIG_FILE).exists() and not (d / rundir.RUN_MARKER).exists()
    _trainer(d, overwrite=True).release()  # the failed attempt let go of the lock


def test_overwrite_clears_a_run_and_a_run_made_before_the_marker(tmp_path):
    run = tmp_path / "run"
    tr = _trainer(run)
    tr.setup()
    assert (run / rundir.RUN_MARKER).is_file() and (run / rundir.CONFIG_FILE).is_file()
    tr.release()
    (run / "metrics.jsonl").write_text("{}\n")
    again = _trainer(run, overwrite=True)
    again.setup()
    assert (run / "metrics.jsonl").read_text() == "" and (run / rundir.RUN_MARKER).is_file()  # a new, empty log
    again.release()

    old = tmp_path / "old"  # an earlier version's run: a config and metrics, no marker
    old.mkdir()
    (old / rundir.CONFIG_FILE).write_text("run: {}\n")
    (old / rundir.METRICS_FILE).write_text("")
    assert rundir.is_run_dir(old)
    rundir.clear_run_dir(old)
    assert list(old.iterdir()) == []


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_a_run_name_must_be_one_directory_name(name):
    with pytest.raises(ConfigError, match="run.name must be one non-empty directory name"):
        load_config(None, [f"run.name={name}"])


def test_one_process_trains_in_a_run_directory(tmp_path):
    run = tmp_path / "run"
    first = _trainer(run)
    first.setup()
    with pytest.raises(TracerlError, match=f"is in use by process {os.getpid()} on "):
        _trainer(run, overwrite=True).setup()
    with pytest.raises(TracerlError, match="is in use by process"):
        _trainer(run, resume=run).setup()
    assert (run / rundir.CONFIG_FILE).is_file()  # the refused --overwrite removed nothing
    first.release()
    second = _trainer(run, overwrite=True)
    second.setup()
    second.release()


def test_a_dead_owner_never_blocks_the_next_run(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from tracerl import rundir; "
                               f"lock = rundir.RunLock({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(rundir.RunDirError, match=f"in use by process {holder.pid} on "):
        rundir.RunLock(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    lock = rundir.RunLock(tmp_path)  # the kernel released the dead process's lock
    assert f'"pid": {os.getpid()}' in (tmp_path / rundir.LOCK_OWNER_FILE).read_text()
    lock.release()


def test_read_only_commands_work_while_a_run_trains(tmp_path):
    from tracerl.cli import main

    run = tmp_path / "run"
    tr = _trainer(run, "trainer.steps=1", "trainer.eval_at_start=false", "trainer.eval_every=0")
    tr.setup()
    tr.train()  # releases the lock at the end; take it again as a run in progress would hold it
    lock = rundir.RunLock(run)
    t0 = time.time()
    assert main(["report", str(run)]) == 0 and (run / rundir.REPORT_FILE).is_file()
    assert time.time() - t0 < 60
    lock.release()


def test_a_failed_start_does_not_block_the_rerun(tmp_path, monkeypatch):
    run = tmp_path / "run"

    def broken_model(self):
        raise TracerlError("the model could not be read")

    monkeypatch.setattr(Trainer, "_setup_model", broken_model)  # fails after the run directory is taken
    with pytest.raises(TracerlError, match="could not be read"):
        _trainer(run).setup()
    assert rundir.never_started(run)  # it got as far as its marker and config
    monkeypatch.undo()
    tr = _trainer(run)  # the fixed command, without --overwrite
    tr.setup()
    tr.release()
    (run / rundir.METRICS_FILE).write_text("{}\n")  # a run that has logged is never taken over
    with pytest.raises(TracerlError, match="is not empty"):
        _trainer(run).setup()
