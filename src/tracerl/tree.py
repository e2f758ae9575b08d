"""Rollout trees: a prompt root, turn nodes and finished leaves, as plain data.

A node holds one thought-action turn as the exact token ids the policy sampled (with their
log-probabilities), the observation token ids the environment appended after it (never trained
on), its depth, and the JSON environment state after the turn, which is all a continuation needs
to resume from it. The root holds the prompt ids in its observation slot. A path from the root to
a leaf is one trajectory: concatenating `gen_ids + obs_ids` along it gives its token ids, with
loss mask 1 exactly on the `gen_ids` parts.

Each node knows how many leaves lie below it and how many of them succeeded (`update_stats`).
Trees serialise to one JSON object per line (`write_jsonl` / `read_jsonl`).

This module knows nothing about models or environments: the rollout engine (rollout.py) fills
trees, allocators (allocate/) decide where they grow.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tracerl.rundir import atomic_write_text
from tracerl.task import Task


@dataclass
class TreeNode:
    id: int
    parent: int | None
    depth: int  # turns from the root (root: 0)
    gen_ids: list[int]  # tokens sampled for this turn (root: none)
    logprobs: list[float]  # their sampling-time log-probs
    obs_ids: list[int]  # tokens appended after the turn, loss mask 0 (root: the prompt)
    turn: dict[str, Any]  # text, action, format_error, tool_call, observation (root: {})
    state: dict[str, Any]  # environment state after this node: what a continuation resumes from
    done: bool = False  # True for a leaf (a finished trajectory)
    reward: float | None = None  # leaves only
    info: dict[str, Any] = field(default_factory=dict)  # leaves: em, f1, truncated ...
    children: list[int] = field(default_factory=list)
    leaves: int = 0  # leaves below this node (a leaf counts itself)
    successes: int = 0  # of which reward > 0
    advantage: float | None = None  # leaves: the advantage they were trained with (set by the trainer)

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.leaves if self.leaves else None

    @property
    def mixed(self) -> bool:
        """An anchor whose leaves contain both outcomes (a source of contrast)."""
        return 0 < self.successes < self.leaves


@dataclass
class TurnRecord:
    """One turn to attach below a node (what the rollout engine hands to a tree)."""

    gen_ids: list[int]
    logprobs: list[float]
    obs_ids: list[int]
    turn: dict[str, Any]
    state: dict[str, Any]


class TreeError(ValueError):
    pass


class RolloutTree:
    """A tree of trajectories for one prompt. `group` is the prompt's index in the step,
    `index` the tree's index among the prompt's trees (Tree-GRPO samples M trees per prompt)."""

    def __init__(self, task: Task, group: int, index: int, prompt_ids: list[int], state: dict[str, Any]):
        self.task, self.group, self.index = task, group, index
        self.nodes: dict[int, TreeNode] = {0: TreeNode(0, None, 0, [], [], list(prompt_ids), {}, state)}
        self._next_id = 1
        # node id -> the policy's last-layer hidden state at the node's last token (success-predictor
        # features, filled by the rollout engine when asked); in memory only, never serialised
        self.hidden: dict[int, Any] = {}

    # ------------------------------------------------------------------ structure
    @property
    def root(self) -> TreeNode:
        return self.nodes[0]

    @property
    def prompt_len(self) -> int:
        return len(self.root.obs_ids)

    def path(self, node_id: int) -> list[TreeNode]:
        """Nodes from the root to `node_id`, both included."""
        out = []
        node: TreeNode | None = self.nodes[node_id]
        while node is not None:
            out.append(node)
            node = self.nodes[node.parent] if node.parent is not None else None
        return out[::-1]

    def anchors(self) -> list[int]:
        """Nodes a continuation may start from: the root and every non-leaf turn node."""
        return [n.id for n in self.nodes.values() if not n.done]

    def leaf_ids(self) -> list[int]:
        return [n.id for n in self.nodes.values() if n.done]

    def gen_tokens(self) -> int:
        """Tokens the policy sampled for this tree so far (every node attached; what it cost)."""
        return sum(len(n.gen_ids) for n in self.nodes.values())

    def descendants_leaves(self, node_id: int) -> list[int]:
        out, stack = [], [node_id]
        while stack:
            n = self.nodes[stack.pop()]
            if n.done:
                out.append(n.id)
            stack.extend(n.children)
        return sorted(out)

    # ------------------------------------------------------------------ token views
    def prefix(self, node_id: int) -> tuple[list[int], list[int], list[float]]:
        """(token ids, loss mask, log-probs) of the path root..node, observations included."""
        ids: list[int] = []
        mask: list[int] = []
        logp: list[float] = []
        for n in self.path(node_id):
            ids += n.gen_ids + n.obs_ids
            mask += [1] * len(n.gen_ids) + [0] * len(n.obs_ids)
            logp += list(n.logprobs) + [0.0] * len(n.obs_ids)
        return ids, mask, logp

    def turns(self, node_id: int) -> list[dict[str, Any]]:
        """The turn records (text, action, ... and token span) along the path root..node."""
        out, pos = [], 0
        for n in self.path(node_id):
            if n.parent is not None:
                end = pos + len(n.gen_ids)
                out.append({**n.turn, "span": [pos, end, end + len(n.obs_ids)]})
            pos += len(n.gen_ids) + len(n.obs_ids)
        return out

    # ------------------------------------------------------------------ growth
    def attach(self, anchor_id: int, turns: list[TurnRecord], done: bool, reward: float = 0.0,
               info: dict[str, Any] | None = None) -> int:
        """Hang a continuation's new turns below `anchor_id`; returns the id of its last node.

        A finished continuation makes its last node a leaf with `reward`. With no new turns and
        `done` (the prompt alone filled the context) the anchor itself becomes a leaf; that only
        happens to a root that has no children yet."""
        anchor = self.nodes[anchor_id]
        if anchor.done:
            raise TreeError(f"node {anchor_id} is a leaf; continuations start from the root or a non-leaf node")
        parent = anchor
        for rec in turns:
            node = TreeNode(self._next_id, parent.id, parent.depth + 1, list(rec.gen_ids), list(rec.logprobs),
                            list(rec.obs_ids), dict(rec.turn), rec.state)
            self._next_id += 1
            self.nodes[node.id] = node
            parent.children.append(node.id)
            parent = node
        if done:
            if parent is anchor and anchor.children:
                raise TreeError(f"an empty finished continuation cannot turn node {anchor_id} into a leaf")
            parent.done, parent.reward, parent.info = True, float(reward), dict(info or {})
        return parent.id

    def keep_leaves(self, keep: Iterable[int]) -> None:
        """Prune every node that is not on a path from the root to a kept leaf."""
        keep = set(keep)
        bad = [i for i in keep if i not in self.nodes or not self.nodes[i].done]
        if bad:
            raise TreeError(f"cannot keep nodes {bad}: not leaves of this tree")
        alive = {0}
        for leaf in keep:
            alive.update(n.id for n in self.path(leaf))
        self.nodes = {i: n for i, n in self.nodes.items() if i in alive}
        self.hidden = {i: h for i, h in self.hidden.items() if i in alive}
        for n in self.nodes.values():
            n.children = [c for c in n.children if c in alive]

    def keep_random_leaves(self, k: int, rng: random.Random) -> None:
        leaves = self.leaf_ids()
        if len(leaves) > k:
            self.keep_leaves(rng.sample(leaves, k))

    def update_stats(self) -> None:
        """Recompute `leaves` / `successes` of every node from its subtree (children have larger ids)."""
        for i in sorted(self.nodes, reverse=True):
            n = self.nodes[i]
            n.leaves = int(n.done) + sum(self.nodes[c].leaves for c in n.children)
            n.successes = int(n.done and (n.reward or 0.0) > 0) + sum(self.nodes[c].successes for c in n.children)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task.to_dict(), "group": self.group, "index": self.index,
                "nodes": [asdict(n) for n in self.nodes.values()]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RolloutTree":
        nodes = [TreeNode(**n) for n in d["nodes"]]
        tree = cls(Task.from_dict(d["task"]), d["group"], d["index"], [], {})
        tree.nodes = {n.id: n for n in nodes}
        tree._next_id = max(tree.nodes) + 1
        return tree

    def copy(self) -> "RolloutTree":
        return copy.deepcopy(self)


def write_jsonl(trees: Iterable[RolloutTree], path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """One tree per line; `extra` fields (e.g. the step) are added to every line. Written atomically."""
    atomic_write_text(path, "".join(json.dumps({**(extra or {}), **t.to_dict()}) + "\n" for t in trees))


def read_jsonl(path: str | Path) -> list[RolloutTree]:
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(RolloutTree.from_dict(json.loads(line)))
    return out


def mixed_anchors(trees: Iterable[RolloutTree]) -> int:
    """Anchors (root or non-leaf node) with at least two leaves below, both outcomes among them."""
    return sum(1 for t in trees for n in t.nodes.values() if not n.done and n.leaves >= 2 and n.mixed)


class Leaf:
    """A finished leaf of a tree as the trainer sees it: the exact token ids of its path (prompt, sampled
    turns, observations), their loss mask and sampling log-probs, its reward and turns. A view: nothing
    is copied out of the tree until a field is read."""

    __slots__ = ("tree", "node", "_prefix")

    def __init__(self, tree: RolloutTree, node: int):
        if not tree.nodes[node].done:
            raise TreeError(f"node {node} is not a leaf")
        self.tree, self.node = tree, node
        self._prefix: tuple[list[int], list[int], list[float]] | None = None

    def _path_tokens(self) -> tuple[list[int], list[int], list[float]]:
        if self._prefix is None:
            self._prefix = self.tree.prefix(self.node)
        return self._prefix

    @property
    def token_ids(self) -> list[int]:
        return self._path_tokens()[0]

    @property
    def loss_mask(self) -> list[int]:
        return self._path_tokens()[1]

    @property
    def logprobs(self) -> list[float]:
        return self._path_tokens()[2]

    @property
    def prompt_len(self) -> int:
        return self.tree.prompt_len

    @property
    def task(self):
        return self.tree.task

    @property
    def reward(self) -> float:
        return float(self.tree.nodes[self.node].reward or 0.0)

    @property
    def info(self) -> dict[str, Any]:
        return self.tree.nodes[self.node].info

    @property
    def turns(self) -> list[dict[str, Any]]:
        return self.tree.turns(self.node)

    @property
    def num_turns(self) -> int:
        return self.tree.nodes[self.node].depth

    @property
    def format_errors(self) -> int:
        return sum(1 for n in self.tree.path(self.node) if n.turn.get("format_error"))

    @property
    def tool_calls(self) -> int:
        return sum(1 for n in self.tree.path(self.node) if n.turn.get("tool_call"))


def tree_leaves(trees: Iterable[RolloutTree]) -> list[Leaf]:
    """Every leaf of every tree, trees in order, leaves by node id."""
    return [Leaf(t, i) for t in trees for i in t.leaf_ids()]
