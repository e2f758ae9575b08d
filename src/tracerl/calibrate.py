"""Equal-cost calibration: measure what a chain and a continuation cost with the current policy,
then pick Tree-GRPO sizes (or a per-prompt token budget) that match G chains (docs/cost.md §5, §7; docs/tree_grpo.md §6).

    tracerl calibrate [--config FILE] [--steps 3] [section.key=value ...]

Nothing is assumed about the continuation cost: `f` = mean generated tokens of a continuation /
mean generated tokens of a chain from the root, measured on real rollouts of the configured policy.
"""

from __future__ import annotations

import statistics

from tracerl import seeding
from tracerl.allocate.basic import ALLOCATORS, AllocationContext, match_tree_shape
from tracerl.backends.base import SamplingParams
from tracerl.config import Config
from tracerl.models.io import load_policy
from tracerl.rollout import RolloutEngine
from tracerl.setup import build_backend, build_env, resolve_model_path


def calibrate(cfg: Config, steps: int = 3, log=print) -> dict[str, float]:
    r = cfg.rollout
    env = build_env(cfg)
    model_dir = resolve_model_path(cfg, log)
    model, tok = load_policy(model_dir)
    policy = build_backend(cfg, model, tok, model_dir, cfg.run.device)
    params = SamplingParams(r.max_turn_tokens, r.temperature, r.top_p, tuple(env.stop_strings))
    tasks = env.tasks("train")
    chain_tokens, f_values = [], []
    for step in range(steps):
        rng = seeding.rng(cfg.run.seed, step, "calibrate_prompts")
        batch = rng.sample(tasks, min(r.prompts_per_step, len(tasks)))
        eng = RolloutEngine(policy, env, params, seeding.generator(cfg.run.seed, step, "calibrate_chains"),
                            cfg.model.chat_template, r.batch_size)
        ALLOCATORS.get("uniform")(AllocationContext(eng, r.model_copy(update={"token_budget": None}), rng), batch)
        chain_tokens.append(eng.cost.gen_tokens / eng.cost.trajectories)
        eng = RolloutEngine(policy, env, params, seeding.generator(cfg.run.seed, step, "calibrate_trees"),
                            cfg.model.chat_template, r.batch_size)
        tree_cfg = r.model_copy(update={"token_budget": None, "leaves_per_tree": None})
        ALLOCATORS.get("tree_grpo")(AllocationContext(eng, tree_cfg, rng), batch)
        f_values.append(eng.cost.continuation_fraction)
        log(f"calibration step {step + 1}/{steps}: chain {chain_tokens[-1]:.1f} tokens, f {f_values[-1]:.3f}")
    f = statistics.mean(f_values)
    mean_chain = statistics.mean(chain_tokens)
    shape = match_tree_shape(r.group_size, f)
    return {"group_size": r.group_size, "mean_chain_tokens": mean_chain, "continuation_fraction": f,
            "token_budget": round(r.group_size * mean_chain), **shape,
            "calibration_f_spread": (max(f_values) - min(f_values)) if f_values else 0.0}


def overrides_for(result: dict[str, float]) -> list[str]:
    """The command-line overrides of the matched tree shape and of the equal per-prompt token budget."""
    return ["rollout.allocator=tree_grpo", f"rollout.trees_per_prompt={result['trees_per_prompt']}",
            f"rollout.expansions={result['expansions']}", f"rollout.rounds={result['rounds']}",
            f"rollout.token_budget={result['token_budget']}"]
