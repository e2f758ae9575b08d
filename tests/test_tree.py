"""Rollout trees as data: invariants under random growth and pruning, serialisation, errors."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracerl.envs.base import Task
from tracerl.tree import RolloutTree, TreeError, TurnRecord, mixed_anchors, read_jsonl, write_jsonl

TASK = Task("t0", "Who founded X?", ("Ann", "A."), {"hops": 1})


def _record(rng: random.Random, depth: int) -> TurnRecord:
    n_gen, n_obs = rng.randint(1, 5), rng.randint(0, 4)
    gen = [rng.randrange(100, 200) for _ in range(n_gen)]
    return TurnRecord(gen, [-rng.random() for _ in gen], [rng.randrange(200, 300) for _ in range(n_obs)],
                      {"text": f"turn {depth}", "action": "search"}, {"turn": depth})


def grow_random(seed: int, n_continuations: int, max_turns: int = 4) -> RolloutTree:
    """A tree grown like Tree-GRPO: a seed chain, then continuations from random anchors."""
    rng = random.Random(seed)
    tree = RolloutTree(TASK, 0, 0, [1, 2, 3], {"turn": 0})
    for _ in range(1 + n_continuations):
        anchors = tree.anchors()
        if not anchors:
            break
        anchor = rng.choice(anchors)
        depth = tree.nodes[anchor].depth
        turns = [_record(rng, d) for d in range(depth + 1, rng.randint(depth + 1, max_turns) + 1)]
        tree.attach(anchor, turns, done=True, reward=float(rng.random() < 0.5), info={"em": 0.0})
    tree.update_stats()
    return tree


def check_invariants(tree: RolloutTree) -> None:
    leaves = tree.leaf_ids()
    assert tree.root.leaves == len(leaves)
    for n in tree.nodes.values():
        assert n.leaves == int(n.done) + sum(tree.nodes[c].leaves for c in n.children)
        assert 0 <= n.successes <= n.leaves
        assert n.leaves == len(tree.descendants_leaves(n.id))
        assert n.successes == sum(1 for l in tree.descendants_leaves(n.id) if tree.nodes[l].reward > 0)
        if n.parent is not None:
            assert n.id in tree.nodes[n.parent].children and n.depth == tree.nodes[n.parent].depth + 1
        if not n.done:
            assert n.children, "a non-leaf node always has a leaf below it"
    for leaf in leaves:
        ids, mask, logp = tree.prefix(leaf)
        path = tree.path(leaf)
        assert len(ids) == len(mask) == len(logp)
        assert ids[: tree.prompt_len] == [1, 2, 3] and sum(mask[: tree.prompt_len]) == 0
        assert sum(mask) == sum(len(n.gen_ids) for n in path)  # loss mask exactly on sampled tokens
        assert all(lp == 0.0 for lp, m in zip(logp, mask) if m == 0)
        for turn, node in zip(tree.turns(leaf), path[1:]):  # spans cut the prefix back into its nodes
            a, b, c = turn["span"]
            assert ids[a:b] == node.gen_ids and ids[b:c] == node.obs_ids and all(mask[a:b]) and not any(mask[b:c])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 12), k=st.integers(1, 6))
def test_random_trees_keep_their_invariants_through_pruning_and_serialisation(tmp_path_factory, seed, n, k):
    tree = grow_random(seed, n)
    check_invariants(tree)
    before = {leaf: tree.prefix(leaf) for leaf in tree.leaf_ids()}
    tree.keep_random_leaves(k, random.Random(seed))
    tree.update_stats()
    check_invariants(tree)
    assert len(tree.leaf_ids()) == min(k, len(before))
    for leaf in tree.leaf_ids():  # pruning never changes a kept leaf's tokens
        assert tree.prefix(leaf) == before[leaf]
    on_paths = {n.id for leaf in tree.leaf_ids() for n in tree.path(leaf)}
    assert on_paths == set(tree.nodes)  # nothing left that is not on a kept path
    path = tmp_path_factory.mktemp("trees") / "t.jsonl"
    write_jsonl([tree], path, {"step": 3})
    (back,) = read_jsonl(path)
    assert back.to_dict() == tree.to_dict()


def test_hand_built_tree_statistics_and_mixed_anchors():
    tree = RolloutTree(TASK, 0, 0, [1], {})
    rec = lambda i: TurnRecord([10 + i], [-0.5], [20 + i], {"text": str(i)}, {"turn": i})  # noqa: E731
    a = tree.attach(0, [rec(1), rec(2)], done=True, reward=1.0)  # root -> n1 -> n2 (leaf, success)
    n1 = tree.nodes[a].parent
    tree.attach(n1, [rec(3)], done=True, reward=0.0)  # sibling of n2: failure
    tree.attach(0, [rec(4)], done=True, reward=0.0)  # a second chain from the root
    tree.update_stats()
    assert (tree.root.leaves, tree.root.successes) == (3, 1)
    assert (tree.nodes[n1].leaves, tree.nodes[n1].successes) == (2, 1)
    assert tree.anchors() == [0, n1]
    assert mixed_anchors([tree]) == 2
    assert tree.prefix(a)[0] == [1, 10 + 1, 20 + 1, 10 + 2, 20 + 2]


def test_attach_to_a_leaf_and_keep_a_non_leaf_are_errors():
    tree = RolloutTree(TASK, 0, 0, [1], {})
    leaf = tree.attach(0, [TurnRecord([5], [-1.0], [], {}, {})], done=True, reward=1.0)
    with pytest.raises(TreeError, match="is a leaf"):
        tree.attach(leaf, [], done=True)
    with pytest.raises(TreeError, match="not leaves"):
        tree.keep_leaves([0])


def test_a_prompt_that_fills_the_context_makes_the_root_a_leaf():
    tree = RolloutTree(TASK, 0, 0, [1, 2], {})
    assert tree.attach(0, [], done=True, reward=0.0, info={"context_full": True}) == 0
    assert tree.anchors() == [] and tree.leaf_ids() == [0]
