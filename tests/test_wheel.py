"""A real install (issue 20 item 7): build the wheel, install it with torch==2.13.0 into a fresh virtual
environment outside the repository, and run `tracerl train` there from an empty directory.

The training run is the embedded default config cut to one step on the small world of the other trainer
tests (their SFT warm start comes from `$TRACERL_CACHE`, or is trained in seconds). What it proves: the
wheel carries everything the default needs (no file of the checkout is on the path), its requirements
resolve to the CPU torch already chosen, the console script works, and the shipped configs are found by
name. The venv is made without pip and filled by this interpreter's pip (`--python`), without
byte-compiling: the same packages, a few seconds less.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_RUN
from tracerl import __version__

# what `python -m build` reads from a clean checkout (src/tracerl/configs links to configs/)
SOURCES = ("pyproject.toml", "README.md", "src", "configs")


# no PYTHONPATH (a checkout's src/ on it would make pip see tracerl as installed already) nor an active venv
CLEAN = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _run(cmd: list, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, env=env or CLEAN, **kw)
    assert p.returncode == 0, f"{cmd[:4]} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv_and_trains(tmp_path):
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    tree = tmp_path / "checkout"
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, tree / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
        else:
            tree.mkdir(exist_ok=True)
            shutil.copy2(src, tree / name)
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp_path / "dist", tree])
    wheels = list((tmp_path / "dist").glob("tracerl-*.whl"))
    assert [w.name for w in wheels] == [f"tracerl-{__version__}-py3-none-any.whl"]
    times["build_s"] = time.perf_counter() - t0

    venv = tmp_path / "venv"
    py = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-compile"]
    t0 = time.perf_counter()
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    _run([*pip, "torch==2.13.0"])
    times["torch_install_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _run([*pip, wheels[0]])
    assert (venv / "bin" / "tracerl").is_file()
    times["wheel_install_s"] = time.perf_counter() - t0

    work = tmp_path / "elsewhere"  # no file of the repository here or on the path
    work.mkdir()
    env = {**CLEAN}
    env.update(PATH=f"{venv / 'bin'}:/usr/bin:/bin", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TRACERL_CACHE=os.environ["TRACERL_CACHE"])
    tracerl = venv / "bin" / "tracerl"
    assert _run([tracerl, "--version"], cwd=work, env=env).stdout.strip() == f"tracerl {__version__}"
    where = _run([py, "-c", "import torch, tracerl; from tracerl.cli import shipped_config as s; "
                  "print(tracerl.__file__, torch.__version__, s('smollm2'), s('configs/gpu/trace_qwen3_8b.yaml'))"],
                 cwd=work, env=env).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in (where[0], where[2], where[3])), where
    assert where[1] == "2.13.0+cpu"

    t0 = time.perf_counter()
    cut = [*TINY_RUN, "trainer.steps=1", "trainer.eval_size=4", "trainer.checkpoint_every=0", "trainer.eval_every=0",
           "trainer.eval_at_start=false", "trainer.progress=false", "run.threads=1"]
    p = _run([tracerl, "train", *cut], cwd=work, env=env)
    times["train_s"] = time.perf_counter() - t0
    run = work / "runs" / "quickstart"  # the embedded default's run name under ./runs
    assert "run directory: runs/quickstart" in p.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert (run / "report.html").is_file() and (run / "checkpoints" / "step_000001" / "manifest.json").is_file()
    assert json.loads((run / "final_eval.json").read_text())["n"] == 4
    print("wheel test times: " + json.dumps({k: round(v, 1) for k, v in times.items()}))
