"""Benchmark: the success-predictor table on the scarce-contrast testbed (issue 18 item 2, BENCHMARKS §15).

Trains two short runs of `configs/scarce.yaml` (uniform GRPO, 8 prompts x 8 chains per step) that log
every step's trees and keep every step's checkpoint (so each logged step's generating policy is exact),
one per seed, then runs `tracerl predictor-eval` with the first run as training data and the second as
the held-out run, and prints the Markdown table and the verdict.

    .venv/bin/python bench/predictor_eval.py [--steps 20] [--train-seed 0] [--eval-seed 1] [--mc 8]
        [--runs-dir runs] [--out bench/results/predictor_eval.json] [--reuse] [key=value ...]

--reuse skips training when both run directories already hold the requested steps. Extra key=value
overrides go to both training runs (e.g. rollout.allocator=trace).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "scarce.yaml"


def train(seed: int, steps: int, run_dir: Path, overrides: list[str], reuse: bool) -> float:
    """Train one logged run; returns its wall seconds (0 when reused)."""
    if reuse and (run_dir / "trees" / f"step_{steps:06d}.jsonl").is_file():
        return 0.0
    extra = ["run.threads=1", f"run.seed={seed}", f"run.dir={run_dir}", f"trainer.steps={steps}",
             "trainer.tree_log_every=1", "trainer.checkpoint_every=1", f"trainer.keep_checkpoints={steps + 1}",
             "trainer.eval_at_start=false", "trainer.eval_every=0", "trainer.eval_size=40", "trainer.progress=false",
             "trainer.tensorboard=false", *overrides]
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "tracerl.cli", "train", "--overwrite", "--config", str(CONFIG), *extra],
                   check=True, cwd=REPO)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--eval-seed", type=int, default=1)
    ap.add_argument("--mc", type=int, default=8)
    ap.add_argument("--runs-dir", default=str(REPO / "runs"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "predictor_eval.json"))
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    runs = Path(args.runs_dir)
    train_dir, eval_dir = runs / f"predeval-seed{args.train_seed}", runs / f"predeval-seed{args.eval_seed}"
    walls = {str(d): round(train(s, args.steps, d, args.overrides, args.reuse), 1)
             for s, d in ((args.train_seed, train_dir), (args.eval_seed, eval_dir))}
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "tracerl.cli", "predictor-eval", str(eval_dir), "--train", str(train_dir),
                    "--mc", str(args.mc), "--out", args.out, "--markdown", "run.threads=1"], check=True, cwd=REPO)
    result = json.loads(Path(args.out).read_text())
    result["bench"] = {"train_wall_s": walls, "eval_wall_s": round(time.time() - t0, 1), "steps": args.steps,
                       "overrides": args.overrides}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"training runs (wall s): {walls}; predictor-eval wall {result['bench']['eval_wall_s']} s; "
          f"parts (s): {result['timings_s']}")


if __name__ == "__main__":
    main()
