"""What an allocator needs from the engine that grows its trees and from the success predictor.

Allocators (basic.py, budgeted.py) touch the outside world only through these two interfaces, so the
same code runs on real rollouts (`tracerl.rollout.RolloutEngine`, `tracerl.allocate.predictor.
SuccessPredictor`) and in the rollout-free simulator (`tracerl.sim.engine.SimEngine`, `SimPredictor`).

This module imports neither torch nor a model: `RolloutCost` and `NodeRef` live here for that reason
(`tracerl.rollout` and `tracerl.allocate.predictor` re-export them), with `trees_like`, which both
engines' `more_trees` use.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from tracerl.envs.base import Task
from tracerl.tree import RolloutTree


@dataclass
class RolloutCost:
    """Measured sampling cost of a step (docs/cost.md §1); every method is charged the same way."""

    gen_tokens: int = 0  # tokens sampled by the policy, discarded work included
    prefill_tokens: int = 0  # prompt/prefix tokens actually run through the model
    prefill_saved: int = 0  # prefix tokens not recomputed thanks to a shared KV cache
    tool_calls: int = 0  # environment tool executions (continuations do not repeat their prefix's calls)
    trajectories: int = 0  # leaves generated (chains, seed chains and continuations)
    continuations: int = 0  # trajectories resumed from a saved prefix (tree expansions)
    continuation_gen_tokens: int = 0  # the part of gen_tokens sampled by continuations

    def add(self, other: "RolloutCost") -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)

    @property
    def continuation_fraction(self) -> float:
        """f: mean generated tokens of a continuation / of a chain from the root (0 without continuations)."""
        chains = self.trajectories - self.continuations
        chain_tokens = self.gen_tokens - self.continuation_gen_tokens
        if not self.continuations or not chains or not chain_tokens:
            return 0.0
        return (self.continuation_gen_tokens / self.continuations) / (chain_tokens / chains)


@dataclass
class NodeRef:
    """A node to score: its tree and id; `successes` / `leaves` are set for training samples."""

    tree: RolloutTree
    node: int
    successes: int = 0
    leaves: int = 0


def continuation_flags(continuation: bool | Sequence[bool], n: int) -> list[bool]:
    """One flag per job from `grow`'s `continuation` argument (one flag for all, or one per job)."""
    if isinstance(continuation, bool):
        return [continuation] * n
    flags = [bool(c) for c in continuation]
    if len(flags) != n:
        raise ValueError(f"{len(flags)} continuation flags for {n} jobs")
    return flags


def trees_like(like: RolloutTree, n: int, first_index: int) -> list[RolloutTree]:
    """n empty trees of `like`'s prompt and group (indices first_index, ...): its root's ids, a copy of
    its root's state, and its root's hidden state if it has one (what `TreeEngine.more_trees` returns)."""
    out = []
    for j in range(first_index, first_index + n):
        t = RolloutTree(like.task, like.group, j, like.root.obs_ids, copy.deepcopy(like.root.state))
        if 0 in like.hidden:
            t.hidden[0] = like.hidden[0]
        out.append(t)
    return out


@runtime_checkable
class TreeEngine(Protocol):
    """Grows rollout trees and charges what it generates to `cost`."""

    cost: RolloutCost

    def plant(self, tasks: list[Task], trees_per_prompt: int | list[int] = 1,
              first_group: int = 0) -> list[RolloutTree]:
        """Empty trees (roots only): `trees_per_prompt` per task, task k in group `first_group + k`."""
        ...

    def more_trees(self, like: RolloutTree, n: int, first_index: int) -> list[RolloutTree]:
        """n more empty trees of `like`'s prompt and group (indices first_index, ...)."""
        ...

    def root_hidden(self, trees: list[RolloutTree]) -> None:
        """Fill `tree.hidden[0]` (the predictor's features of each root), charging what that costs."""
        ...

    def grow(self, jobs: list[tuple[RolloutTree, int]], continuation: bool | Sequence[bool] = False) -> list[int]:
        """One trajectory per (tree, node) job, run to its end below the node; returns the new leaf ids.
        `continuation` (one flag for all jobs, or one per job) marks the jobs charged as continuations
        (`RolloutCost.continuations` / `continuation_gen_tokens`)."""
        ...


@runtime_checkable
class ValuePredictor(Protocol):
    """Ṽ(prefix) ≈ P(success | prefix) of the nodes allocators ask about."""

    @property
    def warm(self) -> bool:
        """False while allocators should treat every value as 0.5 (cold start)."""
        ...

    def predict(self, refs: Sequence[NodeRef]) -> list[float]:
        """Predicted success probability of each node (their features are in `ref.tree.hidden`)."""
        ...
