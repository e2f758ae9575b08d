"""Greedy evaluation: EM, F1, mean turns and format-error rate on a split."""

from __future__ import annotations

from statistics import mean

from tracerl.backends.hf import HFPolicy, SamplingParams
from tracerl.envs.base import Environment, Task
from tracerl.errors import DataError
from tracerl.rollout import Trajectory, run_chains


def summarize(trajs: list[Trajectory]) -> dict[str, float]:
    """Episode-level metrics shared by training steps and evaluations."""
    turns = sum(t.num_turns for t in trajs)
    return {
        "reward_mean": mean(t.reward for t in trajs),
        "em": mean(float(t.info.get("em", t.reward)) for t in trajs),
        "f1": mean(float(t.info.get("f1", 0.0)) for t in trajs),
        "mean_turns": turns / len(trajs),
        "format_error_rate": sum(t.format_errors for t in trajs) / max(turns, 1),
        "tool_calls_per_episode": sum(t.tool_calls for t in trajs) / len(trajs),
        "truncated_rate": mean(float(bool(t.info.get("truncated"))) for t in trajs),
    }


def evaluate(policy: HFPolicy, env: Environment, tasks: list[Task], max_turn_tokens: int,
             chat_template: str = "auto", batch_size: int = 64) -> tuple[dict[str, float], list[Trajectory]]:
    """Greedy (temperature 0) rollouts, one per task."""
    if not tasks:
        raise DataError(f"evaluation split of environment {env.name!r} is empty")
    params = SamplingParams(max_new_tokens=max_turn_tokens, temperature=0.0)
    trajs, cost = run_chains(policy, env, tasks, 1, params, None, chat_template, batch_size)
    out = summarize(trajs)
    out["n"] = len(trajs)
    out["gen_tokens"] = cost.gen_tokens
    return out, trajs
