"""Greedy evaluation: EM, F1, mean turns and format-error rate on a split, and for QA data the same
broken down by dataset, question type and hop count, with the recall of gold paragraphs; and the
SQuAD-style EM / F1 of the same answers, comparable with published numbers (docs/evaluation.md)."""

from __future__ import annotations

from statistics import mean

from tracerl.backends.base import GenerationBackend, SamplingParams
from tracerl.envs.answers import exact_match, f1_score
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
        **gold_recall(trajs),
        **reward_errors(trajs),
    }


def reward_errors(trajs: list[Trajectory]) -> dict[str, float]:
    """With env.reward (`tracerl.envs.custom`): {"reward_errors": episodes whose reward function failed,
    "reward_errors/<reason>": those of each reason}; {} for the environments' own rewards."""
    if not any("reward_error" in t.info for t in trajs):
        return {}
    reasons = [t.info.get("reward_error") for t in trajs]
    out = {"reward_errors": float(sum(r is not None for r in reasons))}
    for r in sorted({r for r in reasons if r is not None}):
        out[f"reward_errors/{r}"] = float(reasons.count(r))
    return out


def gold_recall(trajs: list[Trajectory]) -> dict[str, float]:
    """{"gold_recall": mean share of gold paragraphs retrieved in the episode} over the trajectories
    whose task marks gold paragraphs ({} when none does). An episode that never searched counts 0."""
    with_gold = [t for t in trajs if t.task.meta.get("gold_ids")]
    if not with_gold:
        return {}
    return {"gold_recall": mean(float(t.info.get("gold_recall", 0.0)) for t in with_gold)}


def final_answer(traj: Trajectory) -> str | None:
    """The text of the episode's answer (the last `answer` entry of the environment's history), or
    None when the episode ended without one (turn cap, full context, format error)."""
    history = traj.state.get("history") if isinstance(traj.state, dict) else None
    for entry in reversed(history or []):
        if isinstance(entry, dict) and entry.get("action") == "answer":
            return str(entry.get("answer", ""))
    return None


def squad_episode(traj: Trajectory) -> tuple[float, float]:
    """(EM, F1) of one episode's final answer against its task's gold answers under SQuAD / Search-R1
    matching, whatever eval.em the reward used; (0, 0) when the episode ended without an answer."""
    answer = final_answer(traj)
    if answer is None:
        return 0.0, 0.0
    return float(exact_match(answer, traj.task.answers, "squad")), float(f1_score(answer, traj.task.answers, "squad"))


def squad_scores(trajs: list[Trajectory]) -> dict[str, float]:
    """{"em_squad", "f1_squad"}: the means of `squad_episode` over the trajectories (0 for none)."""
    if not trajs:
        return {"em_squad": 0.0, "f1_squad": 0.0}
    scores = [squad_episode(t) for t in trajs]
    return {"em_squad": mean(em for em, _ in scores), "f1_squad": mean(f1 for _, f1 in scores)}


BREAKDOWN_METRICS = ("n", "em", "f1", "em_squad", "f1_squad", "mean_turns", "format_error_rate", "gold_recall")


def breakdown(trajs: list[Trajectory]) -> list[dict[str, object]]:
    """Rows of metrics per dataset, then per (dataset, question type) and (dataset, hop count), for
    tasks whose meta names a dataset ([] otherwise); a last row covers all trajectories. EM / F1 are
    the reward's matching (eval.em), em_squad / f1_squad SQuAD's, of the same answers."""
    by_dataset: dict[str, list[Trajectory]] = {}
    for t in trajs:
        if t.task.meta.get("dataset") is not None:
            by_dataset.setdefault(str(t.task.meta["dataset"]), []).append(t)
    if not by_dataset:
        return []

    def row(dataset: str, qtype: str, hops: str, group: list[Trajectory]) -> dict[str, object]:
        res = {**summarize(group), **squad_scores(group), "n": len(group)}
        return {"dataset": dataset, "type": qtype, "hops": hops, **{k: res.get(k) for k in BREAKDOWN_METRICS}}

    rows = []
    for dataset, group in sorted(by_dataset.items()):
        rows.append(row(dataset, "all", "all", group))
        for key in ("type", "hops"):
            values = sorted({t.task.meta.get(key) for t in group} - {None}, key=str)
            if len(values) > 1:  # one value: the dataset row says it all
                for v in values:
                    sub = [t for t in group if t.task.meta.get(key) == v]
                    rows.append(row(dataset, str(v) if key == "type" else "all", str(v) if key == "hops" else "all", sub))
    rows.append(row("all", "all", "all", trajs))
    return rows


def evaluate(policy: GenerationBackend, env: Environment, tasks: list[Task], max_turn_tokens: int,
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
