import io
import json
import math

import pytest
from rich.console import Console

from tracerl.runlog import (
    CorruptLogError,
    Progress,
    RunLogger,
    format_number,
    read_jsonl,
)


def _metrics(step):
    return {"reward_mean": step / 10, "em": step / 20, "gen_tokens": 100 * step, "note": "x"}


def test_round_trip_rows_written_equal_rows_read(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 6):
            log.log_step(step, _metrics(step))
        log.log_eval(5, "val", {"em": 0.4, "n": 100})
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows == [{"step": s, **_metrics(s)} for s in range(1, 6)]
    assert read_jsonl(tmp_path / "eval.jsonl") == [{"step": 5, "split": "val", "em": 0.4, "n": 100}]


def test_non_finite_values_become_null_and_numpy_torch_scalars_are_plain(tmp_path):
    import numpy as np
    import torch

    with RunLogger(tmp_path, tensorboard=False) as log:
        scalars = {"a": np.float32(0.5), "b": torch.tensor(2)}
        log.log_step(1, {"loss": math.nan, "kl": math.inf, **scalars})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"step": 1, "loss": None, "kl": None, "a": 0.5, "b": 2}


def test_resume_truncates_to_checkpoint_step_and_matches_uninterrupted_run(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    with RunLogger(straight, tensorboard=False) as log:
        for step in range(1, 9):
            log.log_step(step, _metrics(step))
            if step % 4 == 0:
                log.log_eval(step, "val", {"em": step / 8})
    with RunLogger(crashed, tensorboard=False) as log:  # checkpoint at 4, crash during step 7
        for step in range(1, 7):
            log.log_step(step, _metrics(step))
            if step % 4 == 0:
                log.log_eval(step, "val", {"em": step / 8})
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "rew')
    with pytest.warns(UserWarning, match="partial last line"):
        log = RunLogger(crashed, tensorboard=False, resume_step=4)
    with log:
        assert [r["step"] for r in read_jsonl(crashed / "metrics.jsonl")] == [1, 2, 3, 4]
        for step in range(5, 9):
            log.log_step(step, _metrics(step))
            if step % 4 == 0:
                log.log_eval(step, "val", {"em": step / 8})
    for name in ("metrics.jsonl", "eval.jsonl"):
        assert (crashed / name).read_bytes() == (straight / name).read_bytes()


def test_appending_after_a_crash_starts_a_fresh_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "em"')
    with pytest.warns(UserWarning, match="partial last line"):
        log = RunLogger(tmp_path, tensorboard=False)
    with log:
        log.log_step(2, {"em": 0.5})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1}, {"step": 2, "em": 0.5}]


def test_tensorboard_scalars_are_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path) as log:
        for step in range(1, 4):
            log.log_step(step, _metrics(step))
        log.log_eval(3, "val", {"em": 0.25, "f1": 0.5})
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/note" not in tags  # strings are not scalars
    rewards = acc.Scalars("train/reward_mean")
    assert [e.step for e in rewards] == [1, 2, 3]
    assert [e.value for e in rewards] == pytest.approx([0.1, 0.2, 0.3])
    assert acc.Scalars("eval/val/em")[0].value == pytest.approx(0.25)


def test_read_jsonl_skips_partial_last_line_with_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "em"')
    with pytest.warns(UserWarning, match="partial last line"):
        assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_read_jsonl_names_file_and_line_of_corrupt_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2,,}\n{"step": 3}\n')
    with pytest.raises(CorruptLogError, match=r"metrics\.jsonl:2"):
        read_jsonl(path)


def test_format_number():
    assert format_number(0.4237) == "0.424"
    assert format_number(12) == "12"
    assert format_number(1_234_567) == "1.23M"
    assert format_number(math.nan) == "nan"
    assert format_number(None) == "-"


def test_progress_without_terminal_prints_a_bounded_number_of_lines():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=60)
    with Progress(1000, console=console) as bar:
        for step in range(1, 1001):
            bar.update(step, {"reward_mean": 0.42, "em": 0.4, "effective_ratio": 0.55})
    lines = out.getvalue().splitlines()
    assert 10 <= len(lines) <= 21
    assert lines[-1].startswith("train 1000/1000 (100%)")
    assert lines[-1].endswith("reward 0.42 | em 0.4 | eff 0.55")  # one line, never wrapped


def test_progress_keeps_the_last_value_of_each_field():
    out = io.StringIO()
    with Progress(4, every=1, console=Console(file=out, force_terminal=False)) as bar:
        bar.update(1, {"em": 0.1})
        bar.update(2, {"em": 0.2})
        bar.update(2, {"em": 0.2, "val_em": 0.3})  # same step, new information: printed again
        bar.update(3, {"em": 0.4})
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[-1].endswith("em 0.4 | val em 0.3")


def test_progress_resumed_and_disabled():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False)
    with Progress(100, start=90, every=5, console=console) as bar:
        for step in range(91, 101):
            bar.update(step)
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["95/100", "100/100"]
    out = io.StringIO()
    with Progress(10, disable=True, console=Console(file=out)) as bar:
        bar.update(10, {"em": 1.0})
        bar.print("hidden")
    assert out.getvalue() == ""


def test_progress_on_a_terminal_uses_a_live_bar():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with Progress(3, console=console) as bar:
        for step in range(1, 4):
            bar.update(step, {"reward_mean": 0.5})
    assert "3/3" in out.getvalue() and "reward 0.5" in out.getvalue()


def test_a_full_disk_on_a_row_is_one_line_naming_the_file(tmp_path):
    from tracerl.errors import TracerlError

    log = RunLogger(tmp_path, tensorboard=False)
    path = tmp_path / "metrics.jsonl"
    log.jsonl._files[path].close()
    log.jsonl._files[path] = open("/dev/full", "a")  # every write ends in ENOSPC, as on a really full disk
    with pytest.raises(TracerlError) as e:
        log.log_step(1, _metrics(1))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "no space left on device" in msg and "resumes" in msg
    log.jsonl._files[path] = open(path, "a")
    log.close()
