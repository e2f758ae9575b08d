"""Does the SFT warm start answer its own training questions from memory?

Greedy EM and sampled (T = 1) success of the cached default SFT model on train questions its
demonstrations used, on train questions they did not use, and on validation questions.

    .venv/bin/python bench/sft_memorisation.py [--n 200] [--samples 4] [overrides ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import save_result  # noqa: E402

from tracerl.backends.hf import HFPolicy  # noqa: E402
from tracerl.config import load_config  # noqa: E402
from tracerl.evaluate import evaluate  # noqa: E402
from tracerl.rollout import SamplingParams, run_chains  # noqa: E402
from tracerl.distill.teacher import TeacherNoteDemos  # noqa: E402
from tracerl.setup import build_env, warm_start  # noqa: E402
from tracerl.sft import _demos  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="questions per group")
    ap.add_argument("--samples", type=int, default=4, help="T = 1 samples per question")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/sft_memorisation.json")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides (e.g. sft.rl_share=0.5)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, args.overrides)
    env = build_env(cfg)
    seen = {t.id for t, *_ in _demos(env, cfg, TeacherNoteDemos())}
    train = env.tasks("train")
    groups = {"train_seen_by_sft": [t for t in train if t.id in seen][: args.n],
              "train_unseen": [t for t in train if t.id not in seen][: args.n],
              "validation": env.tasks("validation")[: args.n]}
    d = warm_start(cfg)
    policy = HFPolicy(AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d),
                      max_context=cfg.model.max_context)
    params = SamplingParams(cfg.rollout.max_turn_tokens, 1.0, 1.0, tuple(env.stop_strings))
    rows = {}
    for name, tasks in groups.items():
        if not tasks:
            continue
        res, _ = evaluate(policy, env, tasks, cfg.rollout.max_turn_tokens)
        trajs, _ = run_chains(policy, env, tasks, args.samples, params, torch.Generator().manual_seed(0), "auto", 64)
        rows[name] = {"n": len(tasks), "greedy_em": res["em"], "sampled_success": sum(t.reward for t in trajs) / len(trajs)}
        print(f"{name:18s} n={len(tasks):4d} greedy EM {res['em']:.3f} sampled {rows[name]['sampled_success']:.3f}")
    save_result({"benchmark": "sft_memorisation", "sft_dir": str(d), "questions_seen_by_sft": len(seen),
                 "train_questions": len(train), "overrides": args.overrides, "samples": args.samples,
                 "rows": rows, "command": " ".join([Path(sys.executable).name, *sys.argv])}, args.out, args.json)


if __name__ == "__main__":
    main()
