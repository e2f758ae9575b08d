"""Benchmark helper: is the policy a useful privileged teacher? Greedy EM on validation questions with
the distillation teacher's private note ahead of the prompt (answer only, or answer and solution) and
without it. Self-distillation (distill.mode) assumes the noted policy is better than the plain one.

    .venv/bin/python bench/teacher_probe.py MODEL_DIR [--config configs/arith.yaml] [--n 100] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tracerl.backends.hf import HFPolicy
from tracerl.config import load_config
from tracerl.distill.teacher import NotedEnv, privileged_note
from tracerl.evaluate import evaluate
from tracerl.models.io import load_policy
from tracerl.setup import build_env


class _Noted(NotedEnv):
    """The note for each task at one level (no assessment label: the note of a teacher at its most plain)."""

    def __init__(self, env, level: str):
        super().__init__(env, "")
        self.level = level

    def user_prompt(self, task) -> str:
        return f"{privileged_note(self.env, task, self.level)}\n{self.env.user_prompt(task)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--config", default=None)
    ap.add_argument("--n", type=int, default=100, help="validation questions (the first n)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    env = build_env(cfg)
    tasks = env.tasks("validation")[: args.n]
    model, tok = load_policy(Path(args.model_dir))
    policy = HFPolicy(model, tok, "cpu", cfg.model.max_context)
    rows = {}
    for name, e in (("plain", env), ("note: answer", _Noted(env, "answer")), ("note: solution", _Noted(env, "solution"))):
        m, _ = evaluate(policy, e, tasks, cfg.rollout.max_turn_tokens, cfg.model.chat_template, cfg.rollout.batch_size)
        rows[name] = {k: m[k] for k in ("em", "format_error_rate", "mean_turns")}
        print(f"| {name} | {len(tasks)} | {m['em']:.3f} | {m['format_error_rate']:.3f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model_dir, "n": len(tasks), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
