"""Whole tiny training runs whose rollouts, evaluation and (TRACE) features go through vLLM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import VLLM_RUN, assert_learned

from tracerl.runlog import read_jsonl

REPO = Path(__file__).resolve().parents[1]


def _train(run: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "tracerl.cli", "train", *VLLM_RUN, "engine.name=vllm",
                           "trainer.steps=2", f"run.dir={run}", *overrides], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("method", [
    ("rollout.allocator=uniform",),
    ("rollout.allocator=tree_grpo", "algo.advantage=tree_grpo", "rollout.trees_per_prompt=2", "rollout.expansions=1",
     "algo.sampler_correction=tis"),
], ids=["chains", "tree_grpo+tis"])
def test_tiny_run_through_vllm(tmp_path, method):
    run = tmp_path / "run"
    p = _train(run, *method)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_learned(run)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        # fp32 on both sides: the engine's log-probs of its own samples equal the trainer's recomputation
        assert r["logp_drift"] < 1e-4, r["logp_drift"]
        assert r["sync_s"] > 0 and "engine_cache_hit_rate" in r and r["engine_cache_queries"] > 0
        assert r["gen_tokens"] > 0
    if "algo.sampler_correction=tis" in method:
        assert all(abs(r["is_weight_mean"] - 1.0) < 1e-3 for r in rows)  # no mismatch, weights ~1
    evals = read_jsonl(run / "eval.jsonl")
    assert evals and all(0.0 <= e["em"] <= 1.0 for e in evals)
