"""Benchmark: a policy evaluated greedily on the real multi-hop QA evaluation files (the test split).

Default: the initial policy of `configs/real_qa_smollm2.yaml` (SmolLM2-135M-Instruct after its SFT warm
start, before any RL; `sft.pretrained=false` for the model as shipped) on the first questions of each
`*_migres*` file. The run is CPU-heavy, so it first measures seconds per question on a probe (the
first few questions of each file) and then, unless `--per-file` is given, takes as many questions per
file as fit in `--budget-s` seconds of wall time. The probe questions are among the evaluated ones
(greedy decoding: their results are kept, not recomputed). Reported: EM / F1 per dataset, question type
and hop count, under the reward's matching (eval.em) and under SQuAD / Search-R1's (em_squad / f1_squad),
mean turns, format-error rate, gold-paragraph recall, each episode's answer and scores, and a few raw
episodes.

    .venv/bin/python bench/real_qa_eval.py                         # probe, then ~15 min, 1 thread
    .venv/bin/python bench/real_qa_eval.py --per-file 5 --json     # a quick look
    .venv/bin/python bench/real_qa_eval.py --model runs/real_qa_smollm2 --out bench/results/real_qa_eval_rl.json

With `--temperature T --group-size G` it samples G episodes per question instead (as a GRPO step would)
and also reports the share of questions whose group has mixed rewards, i.e. a learning signal. Use it
with `--split train`: the evaluation files are never used to tune training.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from tracerl.backends.hf import HFPolicy, SamplingParams
from tracerl.cli import _resolve_checkpoint
from tracerl.config import load_config
from tracerl.evaluate import breakdown, evaluate, final_answer, squad_episode, squad_scores, summarize
from tracerl.models.io import load_policy
from tracerl.rollout import run_chains
from tracerl.setup import build_env, resolve_model_path

from _results import save_result  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "real_qa_smollm2.yaml"))
    p.add_argument("--model", default=None, help="run/checkpoint/model dir (default: the config's model before RL)")
    p.add_argument("--data-root", default=None, help="override env.options.data_root")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--probe", type=int, default=10, help="questions of the timing probe, spread over the files")
    p.add_argument("--budget-s", type=float, default=900.0, help="wall-time budget of the whole evaluation")
    p.add_argument("--per-file", type=int, default=0, help="questions per file (0: as many as fit the budget)")
    p.add_argument("--max-per-file", type=int, default=200)
    p.add_argument("--split", default="test", help="test (the evaluation files) or train")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--group-size", type=int, default=1, help="episodes per question when sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "real_qa_eval.json"))
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    overrides = list(args.overrides) + ([f"env.options.data_root={args.data_root}"] if args.data_root else [])
    cfg = load_config(args.config, overrides)
    env = build_env(cfg)
    tests = env.tasks(args.split)
    files = list(dict.fromkeys(t.meta["file"] for t in tests))
    by_file = {f: [t for t in tests if t.meta["file"] == f] for f in files}
    model_dir = _resolve_checkpoint(Path(args.model))[0] if args.model else resolve_model_path(cfg)
    model, tok = load_policy(model_dir)
    policy = HFPolicy(model, tok, cfg.run.device, cfg.model.max_context)

    generator = torch.Generator().manual_seed(args.seed)

    def run(tasks):
        if args.temperature == 0:
            return evaluate(policy, env, tasks, cfg.rollout.max_turn_tokens, cfg.model.chat_template,
                            cfg.rollout.batch_size)
        params = SamplingParams(cfg.rollout.max_turn_tokens, args.temperature, cfg.rollout.top_p)
        trajs, _ = run_chains(policy, env, tasks, args.group_size, params, generator, cfg.model.chat_template,
                              cfg.rollout.batch_size)
        return None, trajs

    t_start = time.time()
    k = math.ceil(args.probe / len(files))
    probe_tasks = [t for f in files for t in by_file[f][:k]]
    t0 = time.time()
    _, probe_trajs = run(probe_tasks)
    s_per_q = (time.time() - t0) / len(probe_tasks)  # per question (its whole group when sampling)
    if args.per_file:
        n = args.per_file
    else:
        left = args.budget_s - (time.time() - t_start)
        n = k + max(0, int(left / s_per_q / len(files)))
    n = min(max(n, k), args.max_per_file)
    rest = [t for f in files for t in by_file[f][k:n]]
    trajs = list(probe_trajs)
    if rest:
        _, more = run(rest)
        trajs += more
    wall = time.time() - t_start
    order = {id(t): i for i, t in enumerate(t for f in files for t in by_file[f][:n])}
    trajs.sort(key=lambda tr: order.get(id(tr.task), 0))
    groups: dict[int, list[float]] = {}
    for tr in trajs:
        groups.setdefault(id(tr.task), []).append(tr.reward)

    rows = breakdown(trajs)
    # ids, not question text: the data is passed by path and never copied into the repository
    examples = [{"task_id": tr.task.id, "reward": tr.reward,
                 "turns": [tu["text"][:300] for tu in tr.turns]} for tr in trajs[:: max(1, len(trajs) // 4)][:4]]
    result = {
        "benchmark": "real_qa_eval",
        "model": str(model_dir),
        "config": args.config,
        "overrides": overrides,
        "files": {f: {"evaluated": len(by_file[f][:n]), "available": len(by_file[f])} for f in files},
        "questions_per_file": n,
        "probe_questions": len(probe_tasks),
        "seconds_per_question_probe": round(s_per_q, 2),
        "wall_seconds": round(wall, 1),
        "threads": args.threads,
        "max_turns": cfg.env.max_turns,
        "max_turn_tokens": cfg.rollout.max_turn_tokens,
        "split": args.split,
        "temperature": args.temperature,
        "group_size": args.group_size,
        "summary": {**summarize(trajs), **squad_scores(trajs), "n": len(trajs), "questions": len(groups),
                    "questions_with_a_correct_episode": sum(max(g) > 0 for g in groups.values()),
                    "questions_with_mixed_rewards": sum(len(set(g)) > 1 for g in groups.values())},
        "breakdown": rows,
        "examples": examples,
        # per episode, ids, the model's final answer (None: none given) and scores under both matchings:
        # lets two evaluations, or the two matchings, be compared question by question (no question text)
        "episodes": [{"task_id": tr.task.id, "file": tr.task.meta["file"], "answer": final_answer(tr),
                      "em": float(tr.info.get("em", tr.reward)), "f1": float(tr.info.get("f1", 0.0)),
                      **dict(zip(("em_squad", "f1_squad"), squad_episode(tr))), "turns": tr.num_turns,
                      "format_errors": tr.format_errors} for tr in trajs],
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    save_result(result, args.out, args.json)
    print(f"{len(groups)} questions ({n} per file), {len(trajs)} episodes in {wall:.0f} s "
          f"({s_per_q:.1f} s/question in the probe)")
    for r in rows:
        recall = "-" if r["gold_recall"] is None else f"{r['gold_recall']:.3f}"
        print(f"{r['dataset']:16s} {r['type']:18s} {r['hops']:>4s} n={r['n']:4d} EM {r['em']:.3f} F1 {r['f1']:.3f} "
              f"EM(squad) {r['em_squad']:.3f} F1(squad) {r['f1_squad']:.3f} turns {r['mean_turns']:.2f} "
              f"fmt-err {r['format_error_rate']:.3f} recall {recall}")


if __name__ == "__main__":
    main()
