"""One allocation plan over torchrun's ranks, without a coordinator.

Every rank runs the step's allocator on *all* the step's prompts, with the same allocator random
stream, so every rank makes the same decisions — as long as it sees the same trees and the same
predictions. `ShardedEngine` makes that so: a tree belongs to the rank `group % size` (a prompt's
trees stay on one rank: its prefix sharing, its group statistics and its packing stay local); each
`grow` runs only the rank's own jobs on its own policy copy, then every rank receives the grown trees
of the others (all-gather), so the next decision — DAPO's refill, PCL's selection, TRACE's Stage 1 over
the pool and Stage 2 over prefixes — is taken on identical data everywhere. `ShardedPredictor` has each
rank score the nodes of its own trees and shares the scores, so predictions agree even if the ranks'
predictor copies drifted numerically. Cost counters stay per rank (the trainer sums them).
"""

from __future__ import annotations

from typing import Any, Sequence

from tracerl.allocate.budget import CarriesCosts, CostModel
from tracerl.allocate.engine import NodeRef, RolloutCost, TreeEngine, ValuePredictor, continuation_flags
from tracerl.distributed import World
from tracerl.envs.base import Task
from tracerl.tree import RolloutTree


def owner(group: int, size: int) -> int:
    """The rank that generates and trains the trees of prompt group `group`."""
    return group % size


def _key(tree: RolloutTree) -> tuple[int, int]:
    return tree.group, tree.index


class ShardedEngine:
    """A `TreeEngine` over all ranks: the wrapped engine grows this rank's trees, the rest arrive."""

    def __init__(self, inner: TreeEngine, world: World):
        self.inner, self.world = inner, world

    @property
    def cost(self) -> RolloutCost:
        return self.inner.cost

    def mine(self, tree: RolloutTree) -> bool:
        return owner(tree.group, self.world.size) == self.world.rank

    def plant(self, tasks: list[Task], trees_per_prompt: int | list[int] = 1,
              first_group: int = 0) -> list[RolloutTree]:
        return self.inner.plant(tasks, trees_per_prompt, first_group)  # roots only: the same on every rank

    def more_trees(self, like: RolloutTree, n: int, first_index: int) -> list[RolloutTree]:
        return self.inner.more_trees(like, n, first_index)

    def root_hidden(self, trees: list[RolloutTree]) -> None:
        self.inner.root_hidden([t for t in trees if self.mine(t)])
        shared = {_key(t): t.hidden[0] for t in trees if self.mine(t) and 0 in t.hidden}
        for part in self.world.gather(shared):
            for t in trees:
                if not self.mine(t) and _key(t) in part:
                    t.hidden[0] = part[_key(t)]

    def grow(self, jobs: list[tuple[RolloutTree, int]], continuation: bool | Sequence[bool] = False) -> list[int]:
        local = [i for i, (t, _) in enumerate(jobs) if self.mine(t)]
        flags = continuation_flags(continuation, len(jobs))
        leaves = self.inner.grow([jobs[i] for i in local], [flags[i] for i in local]) if local else []
        grown = {_key(t): t for t, _ in (jobs[i] for i in local)}
        payload = ({k: (t.nodes, t._next_id, t.hidden) for k, t in grown.items()}, dict(zip(local, leaves)))
        out = [0] * len(jobs)
        trees = {_key(t): t for t, _ in jobs}
        for rank, (states, new_leaves) in enumerate(self.world.gather(payload)):
            for i, leaf in new_leaves.items():
                out[i] = leaf
            if rank == self.world.rank:
                continue
            for k, (nodes, next_id, hidden) in states.items():
                tree = trees[k]
                tree.nodes, tree._next_id = nodes, next_id
                tree.hidden.update(hidden)
        return out


class ShardedPredictor:
    """A `ValuePredictor` whose scores of a node come from the rank that owns the node's tree."""

    def __init__(self, inner: ValuePredictor, world: World):
        self.inner, self.world = inner, world

    @property
    def warm(self) -> bool:
        return self.inner.warm

    @property
    def costs(self) -> CostModel | None:
        """The wrapped predictor's running cost estimates (the same decisions on every rank: they are
        measured on the shared trees)."""
        return self.inner.costs if isinstance(self.inner, CarriesCosts) else None

    def predict(self, refs: Sequence[NodeRef]) -> list[float]:
        mine = [i for i, r in enumerate(refs) if owner(r.tree.group, self.world.size) == self.world.rank]
        scores = self.inner.predict([refs[i] for i in mine]) if mine else []
        out: list[float] = [0.0] * len(refs)
        for part in self.world.gather(dict(zip(mine, scores))):
            for i, p in part.items():
                out[i] = p
        return out


def fingerprint(trees: Sequence[RolloutTree]) -> list[Any]:
    """What every rank's plan must agree on: each tree's prompt, index and node structure."""
    return [(t.group, t.index, t.task.id, [(n.id, n.parent, n.done) for n in t.nodes.values()]) for t in trees]
