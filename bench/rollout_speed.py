"""Benchmark: rollout seconds per 1k generated tokens of GRPO chains, Tree-GRPO and TRACE (issue 18 item 5).

Short runs of the scarce-contrast testbed (`configs/scarce.yaml`, its cached SFT warm start) at the same
generated-token budget per step, one torch thread, one run at a time; the methods are interleaved over
`--repeats` so that a change in the machine's load hits all of them alike. Per method: rollout seconds
per 1k generated tokens (steps after the predictor's warm-up, where TRACE allocates), generation calls
(waves) per step, and the ratio to chains.

    .venv/bin/python bench/rollout_speed.py --steps 15 --repeats 2
    .venv/bin/python bench/rollout_speed.py --src /tmp/old/src --tag before   # another checkout's code

Writes bench/results/rollout_speed[_TAG].json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from scarce_comparison import CONFIG, METHODS  # noqa: E402  (the comparison's exact method settings)

SHOWN = ("uniform", "tree_grpo", "trace")


def one_run(method: str, seed: int, args, out: Path) -> dict:
    run_dir = out / f"{method}-r{seed}"
    cmd = [sys.executable, "-m", "tracerl.cli", "train", "--overwrite", "--config", str(CONFIG), f"run.dir={run_dir}",
           f"run.seed={seed}", "sft.seed=0", "run.threads=1", f"trainer.steps={args.steps}", "trainer.eval_every=0",
           "trainer.eval_at_start=false", "trainer.eval_size=1", f"trainer.checkpoint_every={args.steps}",
           "trainer.progress=false", "trainer.tensorboard=false", f"rollout.token_budget={args.budget}",
           *METHODS[method]]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                   env={**os.environ, "PYTHONPATH": args.src, "OMP_NUM_THREADS": "1"})
    wall = time.time() - t0
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")][args.skip:]
    gen = sum(r["gen_tokens"] for r in rows)
    return {"method": method, "seed": seed, "wall_s": wall, "steps": len(rows), "gen_tokens": gen,
            "rollout_s": sum(r["rollout_s"] for r in rows), "update_s": sum(r["update_s"] for r in rows),
            "s_per_1k": 1000 * sum(r["rollout_s"] for r in rows) / gen,
            "waves_per_step": statistics.mean(r["gen_waves"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--skip", type=int, default=4, help="leading steps left out (TRACE's cold start: predictor warm-up 3)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--budget", type=int, default=300, help="generated tokens per prompt per step")
    ap.add_argument("--src", default=str(REPO / "src"), help="tracerl source tree to run (PYTHONPATH)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    res = []
    with tempfile.TemporaryDirectory(prefix="rollout-speed-") as tmp:
        for rep in range(args.repeats):
            for m in SHOWN:
                res.append(one_run(m, rep, args, Path(tmp)))
                print(json.dumps(res[-1]), flush=True)
    table = {}
    for m in SHOWN:
        rs = [r for r in res if r["method"] == m]
        table[m] = {"s_per_1k": sum(r["rollout_s"] for r in rs) * 1000 / sum(r["gen_tokens"] for r in rs),
                    "waves_per_step": statistics.mean(r["waves_per_step"] for r in rs),
                    "update_s_per_step": sum(r["update_s"] for r in rs) / sum(r["steps"] for r in rs)}
    name = "rollout_speed" + (f"_{args.tag}" if args.tag else "") + ".json"
    (REPO / "bench" / "results" / name).write_text(json.dumps({"args": vars(args), "runs": res, "table": table}, indent=1))
    print("| method | rollout s / 1k generated tokens | × chains | generation calls (waves) / step | update s / step |")
    print("|---|---|---|---|---|")
    for m in SHOWN:
        t = table[m]
        print(f"| {m} | {t['s_per_1k']:.3f} | {t['s_per_1k'] / table['uniform']['s_per_1k']:.2f} | "
              f"{t['waves_per_step']:.1f} | {t['update_s_per_step']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
