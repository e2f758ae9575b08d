"""Benchmark helper: per-question paired comparison of two policies on one split (greedy EM).

For each pair (before, after) of model directories, every question of the split is answered greedily by
both; the table counts questions that flipped wrong → right and right → wrong, and the exact two-sided
sign test (McNemar) on the flips pooled over all pairs — a paired test, far less noisy than comparing
two EM figures of ±0.035 each on 200 questions.

    .venv/bin/python bench/paired_eval.py --pairs BEFORE_DIR:AFTER_DIR [...] [--split validation]
    .venv/bin/python bench/paired_eval.py --pairs BEFORE.json:AFTER.json    # two bench/real_qa_eval.py results

A pair of `bench/real_qa_eval.py` result files is compared on the questions both evaluated (greedy, so
nothing is recomputed).

Used for the quickstart (BENCHMARKS.md §1): BEFORE = a seed's SFT cache directory, AFTER = its run's
final checkpoint `runs/quickstart-seedS/checkpoints/step_000200/model`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from tracerl.backends.hf import HFPolicy
from tracerl.config import load_config
from tracerl.evaluate import evaluate
from tracerl.models.io import load_policy
from tracerl.setup import build_env


def answers(model_dir: str, env, tasks, cfg) -> list[float]:
    model, tok = load_policy(Path(model_dir))
    policy = HFPolicy(model, tok, "cpu", cfg.model.max_context)
    _, trajs = evaluate(policy, env, tasks, cfg.rollout.max_turn_tokens, cfg.model.chat_template, cfg.rollout.batch_size)
    by_id = {t.task.id: float(t.info.get("em", t.reward)) for t in trajs}
    return [by_id[t.id] for t in tasks]


def recorded(path: str) -> dict[str, float]:
    """{task id: EM} from the per-episode records of a bench/real_qa_eval.py result (greedy: one per question)."""
    episodes = json.loads(Path(path).read_text()).get("episodes")
    if not episodes:
        raise SystemExit(f"{path}: no 'episodes' records (rerun bench/real_qa_eval.py to write them)")
    return {e["task_id"]: e["em"] for e in episodes}


def sign_test(up: int, down: int) -> float:
    """Exact two-sided binomial test of up vs down flips at p = 1/2."""
    n, k = up + down, min(up, down)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", nargs="+", required=True, help="BEFORE_DIR:AFTER_DIR model directories")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("overrides", nargs="*", help="config overrides (the environment must be the runs' one)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    env = cfg = tasks = None
    rows, total_up, total_down = [], 0, 0
    for pair in args.pairs:
        before_dir, after_dir = pair.split(":")
        if before_dir.endswith(".json") != after_dir.endswith(".json"):
            raise SystemExit(f"{pair}: pair two model directories or two bench/real_qa_eval.py result files")
        if before_dir.endswith(".json"):
            b, a = recorded(before_dir), recorded(after_dir)
            common = [k for k in b if k in a]
            before, after = [b[k] for k in common], [a[k] for k in common]
        else:
            if env is None:
                cfg = load_config(None, args.overrides)
                env = build_env(cfg)
                tasks = env.tasks(args.split)
            before, after = answers(before_dir, env, tasks, cfg), answers(after_dir, env, tasks, cfg)
        up = sum(1 for b, a in zip(before, after) if a > b)
        down = sum(1 for b, a in zip(before, after) if a < b)
        total_up, total_down = total_up + up, total_down + down
        n = len(before)
        rows.append({"before": before_dir, "after": after_dir, "n": n, "em_before": sum(before) / max(n, 1),
                     "em_after": sum(after) / max(n, 1), "wrong_to_right": up, "right_to_wrong": down,
                     "sign_test_p": sign_test(up, down)})
    print("| pair | n | EM before | EM after | wrong → right | right → wrong | sign test p |")
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        print(f"| {i} | {r['n']} | {r['em_before']:.3f} | {r['em_after']:.3f} | {r['wrong_to_right']} | "
              f"{r['right_to_wrong']} | {r['sign_test_p']:.3f} |")
    print(f"| pooled | {sum(r['n'] for r in rows)} | | | {total_up} | {total_down} | {sign_test(total_up, total_down):.4f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"split": args.split, "pairs": rows, "pooled_up": total_up,
                                              "pooled_down": total_down,
                                              "pooled_p": sign_test(total_up, total_down)}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
