"""The simulated engine and predictor: the shipped allocators run on the simulated world unchanged.

`SimEngine` implements the engine interface allocators use (`tracerl.allocate.engine.TreeEngine`, as
`tracerl.rollout.RolloutEngine` does) over `world.World`: it plants real `RolloutTree`s, grows each job
to the end of its trajectory, and charges `cost` (a `RolloutCost`) as the real engine does:

* gen_tokens: the tokens of every turn it generates (a turn of k tokens is a node with k gen ids);
  a continuation pays only the turns below its prefix; discarded work stays charged;
* trajectories: one per job; continuations / continuation_gen_tokens: the jobs of `grow(...,
  continuation=True)` and their tokens, so `cost.continuation_fraction` is the measured f;
* tool_calls: every turn but a trajectory's last (a turn that does not answer calls a tool);
* prefill_tokens / prefill_saved stay 0: the world has no prompt or observation tokens.

Node state is {"v": V}, the node's true success probability (what a continuation resumes from); a
leaf's reward is its Bernoulli(V) draw. Like the real engine with `capture_hidden`, every node a
generation can start from gets its predictor features in `tree.hidden` (`SimFeatures`: V and the
node's noise draw ε; the root's come from the prompt, so every allocator sees the same root noise);
`root_hidden` fills the roots' for free.

`SimPredictor` is the success predictor allocators call (`warm`, `predict`), with the simulator's
noise model: Ṽ = sigmoid(logit V + σ·ε) with ε ~ N(0, 1) drawn once per node (a node always gets the
same prediction), σ = `predictor_noise`; `oracle` gives Ṽ = V. It is warm from the first batch (it
stands for a trained predictor) and never learns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from tracerl.allocate.engine import NodeRef, RolloutCost, continuation_flags, trees_like
from tracerl.envs.base import Task
from tracerl.errors import TracerlError
from tracerl.sim.world import World
from tracerl.tree import RolloutTree, TreeError, TurnRecord


@dataclass(frozen=True)
class SimFeatures:
    """What the simulated predictor sees of a node: its true value and its noise draw."""

    value: float
    z: float


def root_features(task: Task) -> SimFeatures:
    return SimFeatures(task.meta["v0"], task.meta["z"])


class SimEngine:
    """Grows `RolloutTree`s in the simulated world (see the module doc); `trees` lists every tree it
    planted, whether or not the allocator returned it."""

    def __init__(self, world: World):
        self.world = world
        self.cost = RolloutCost()
        self.trees: list[RolloutTree] = []

    def plant(self, tasks: list[Task], trees_per_prompt: int | list[int] = 1, first_group: int = 0) -> list[RolloutTree]:
        counts = trees_per_prompt if isinstance(trees_per_prompt, list) else [trees_per_prompt] * len(tasks)
        trees = [RolloutTree(task, first_group + g, j, [], {"v": task.meta["v0"]})
                 for g, (task, m) in enumerate(zip(tasks, counts)) for j in range(m)]
        self.trees += trees
        return trees

    def more_trees(self, like: RolloutTree, n: int, first_index: int) -> list[RolloutTree]:
        out = trees_like(like, n, first_index)
        self.trees += out
        return out

    def root_hidden(self, trees: list[RolloutTree]) -> None:
        for t in trees:
            t.hidden.setdefault(0, root_features(t.task))

    def grow(self, jobs: list[tuple[RolloutTree, int]], continuation: bool | Sequence[bool] = False) -> list[int]:
        flags = continuation_flags(continuation, len(jobs))
        # the real engine's order: branches of one node next to each other
        order = sorted(range(len(jobs)), key=lambda i: (jobs[i][0].group, jobs[i][0].index, jobs[i][1]))
        cost = RolloutCost(trajectories=len(jobs))
        leaves = [0] * len(jobs)
        for i in order:
            tree, node = jobs[i]
            anchor = tree.nodes[node]
            if anchor.done:
                raise TreeError(f"node {node} is a leaf; continuations start from the root or a non-leaf node")
            if node == 0:
                tree.hidden.setdefault(0, root_features(tree.task))
            turns = self.world.trajectory(anchor.state["v"], anchor.depth)
            records = [TurnRecord([0] * t.tokens, [0.0] * t.tokens, [], {"tool_call": not t.done}, {"v": t.value})
                       for t in turns]
            leaves[i] = tree.attach(node, records, True, float(turns[-1].reward))
            for n, t in zip(tree.path(leaves[i])[anchor.depth + 1:-1], turns):  # the new non-leaf nodes
                tree.hidden[n.id] = SimFeatures(t.value, t.z)
            tokens = sum(t.tokens for t in turns)
            cost.gen_tokens += tokens
            cost.tool_calls += len(turns) - 1
            if flags[i]:
                cost.continuations += 1
                cost.continuation_gen_tokens += tokens
        self.cost.add(cost)
        return leaves


def _logit(v: float) -> float:
    v = min(max(v, 1e-6), 1 - 1e-6)
    return math.log(v / (1 - v))


class SimPredictor:
    """The simulator's success predictor (see the module doc for its noise model)."""

    def __init__(self, noise: float, oracle: bool = False, warm: bool = True):
        self.noise, self.oracle, self._warm = noise, oracle, warm

    @property
    def warm(self) -> bool:
        return self._warm

    def value(self, f: SimFeatures) -> float:
        return f.value if self.oracle else 1 / (1 + math.exp(-(_logit(f.value) + self.noise * f.z)))

    def predict(self, refs: Sequence[NodeRef]) -> list[float]:
        out = []
        for r in refs:
            f = r.tree.hidden.get(r.node)
            if f is None:
                raise TracerlError(f"node {r.node} of {r.tree.task.id} has no features: no generation started there")
            out.append(self.value(f))
        return out
