"""Fault drills with real processes, short (bench/drills.py has the full ones, issue 19): a tiny run that
checkpoints and prunes at every step is SIGKILLed three times (inside a checkpoint write, inside a prune,
at a random moment) and ends as the uninterrupted run; the same run on a really full tmpfs stops with one
line and resumes once there is space again."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import drills  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 6


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    work = tmp_path_factory.mktemp("drills")
    drills.pin_source(work)  # the runs compared are runs of one code, even while src/ is being edited
    return work, drills.baseline(work, drills.tiny_overrides(STEPS))


def test_three_kills_one_inside_a_checkpoint_write_end_as_the_uninterrupted_run(uninterrupted):
    work, base = uninterrupted
    res = drills.run_with_kills(work, "killed", drills.tiny_overrides(STEPS), ["write", "prune", "random"], base,
                                seed=0, random_write=False)
    assert res["kills"] == 3, res["attempts"]
    write = res["attempts"][0]["kill"]
    # killed as the checkpoint's temporary directory appeared: it is left behind, and the next save clears it
    assert write["phase"] == "write" and write["debris_after"] == [".step_000002.tmp"], write
    assert all(a["resumed"] for a in res["attempts"][1:]), res["attempts"]
    assert res["compare"]["identical"], res["compare"]
    assert res["compare"]["checkpoints left"] == [f"step_{STEPS:06d}"]
    assert res["pass"], res["reasons"]


def test_a_really_full_disk_stops_with_one_line_and_resumes_once_there_is_space(uninterrupted):
    work, base = uninterrupted
    res = drills.drill_diskfull(work, STEPS, base, variants=("ckpt",))
    if res.get("skip") or res["runs"][0].get("skip"):
        pytest.skip(res.get("skip") or res["runs"][0]["skip"])
    run = res["runs"][0]
    assert run["rc"] == 2 and not run["traceback"], run
    assert run["error_lines"] == [f"error: could not write checkpoint {work}/disk_ckpt/run/checkpoints/step_000004: "
                                  "no space left on device; the previous checkpoint step_000003 is intact"], run
    assert run["last"] == "step_000003" and run["last_verifies"] and run["debris"] == [], run
    assert run["resume_rc"] == 0 and run["compare"]["identical"], run
