"""Packed trees (each shared node once, tree attention mask) score and train like per-leaf rows: the
`trees` layout of `build_batch` gives every leaf the log-probs of its own row and the same gradient."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import with_random_advantages as _with_adv
from tracerl.algos.losses import ppo_clip
from tracerl.allocate import ALLOCATORS, AllocationContext
from tracerl.backends.hf import SamplingParams
from tracerl.config import RolloutConfig
from tracerl.objective import LossSpec, forward_scores
from tracerl.packing import build_batch
from tracerl.rollout import RolloutEngine


def _trees(policy, env):
    eng = RolloutEngine(policy, env, SamplingParams(max_new_tokens=12), torch.Generator().manual_seed(5))
    cfg = RolloutConfig(allocator="tree_grpo", trees_per_prompt=2, expansions=2, rounds=2)
    trees = ALLOCATORS.get("tree_grpo")(AllocationContext(eng, cfg, random.Random(1)), env.tasks("train")[:2])
    for t in trees:
        t.update_stats()
    return trees


def _own_row_logprobs(model, leaf):
    """Log-probs of a leaf's sampled tokens from a plain forward over its own sequence alone."""
    ids = torch.tensor([leaf.token_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logp[[p - 1 for p, m in enumerate(leaf.loss_mask) if m]]


def _loss(model, batch, pad_id, spec):
    """Token-mean PPO loss at ratio 1 over the leaf-major matrix of one micro-batch holding every pack."""
    mb = batch.micro(list(range(len(batch.packs))), pad_id)
    assert mb.leaves == list(range(len(batch.leaves)))  # one micro-batch: matrix rows are the batch's leaves
    logp = mb.to_leaves(forward_scores(model, mb, spec).logp)
    mask = mb.rows(batch.mask)
    pg, _ = ppo_clip(logp, logp.detach(), mb.rows(batch.coef), mask)
    return (pg * mask).sum() / mask.sum(), logp, mask, mb


@pytest.mark.parametrize("head_at_positions", [True, False])
def test_packed_tree_gives_per_leaf_logprobs_and_the_same_gradient(tiny_policy, small_env, head_at_positions):
    model = tiny_policy.model
    trees = _trees(tiny_policy, small_env)
    assert any(n.parent is not None and n.leaves > 1 for t in trees for n in t.nodes.values())  # shared turns
    with_adv = _with_adv(trees)
    spec = LossSpec(head_at_positions=head_at_positions)
    out = {}
    for layout in ("rows", "trees"):
        batch = build_batch(with_adv, layout)
        model.zero_grad()
        loss, logp, mask, mb = _loss(model, batch, tiny_policy.pad_id, spec)
        loss.backward()
        out[layout] = (batch, loss.detach(), logp.detach(), mask, mb, [p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    rows, trees_ = out["rows"], out["trees"]
    assert len(rows[0].packs) == len(rows[0].leaves) and len(trees_[0].packs) == len(trees)
    assert rows[4].attention_mask is None and trees_[4].attention_mask is not None

    torch.testing.assert_close(trees_[1], rows[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(rows[5], trees_[5]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    assert any(float(g.abs().max()) > 0 for g in rows[5])
    # both layouts list the same leaves in the same order, with the same matrices
    assert [(lf.tree, lf.node) for lf in rows[0].leaves] == [(lf.tree, lf.node) for lf in trees_[0].leaves]
    for name in ("adv", "mask", "sample_logp", "coef"):
        assert torch.equal(getattr(rows[0], name), getattr(trees_[0], name)), name
    torch.testing.assert_close(trees_[2], rows[2], atol=1e-5, rtol=0)  # every leaf's log-probs, both layouts
    # every leaf's sampled-token log-probs are those of a forward over its own sequence alone
    leaves = rows[0].leaves
    for i, lf in enumerate(leaves):
        n = sum(lf.loss_mask)
        own = _own_row_logprobs(model, lf).detach()
        assert int(rows[3][i].sum()) == n and not rows[3][i, n:].any()
        torch.testing.assert_close(rows[2][i, :n], own, atol=1e-5, rtol=0)
        torch.testing.assert_close(trees_[2][i, :n], own, atol=1e-5, rtol=0)
        assert not trees_[2][i, n:].any()  # padding reads 0
        assert rows[0].sample_logp[i, :n].tolist() == [lp for lp, m in zip(lf.logprobs, lf.loss_mask) if m]
        assert torch.equal(rows[0].coef[i], rows[0].adv[i] * rows[0].mask[i])
    # and the packing runs fewer tokens through the model than one row per leaf
    run = {name: sum(len(p) for p in out[name][0].packs) for name in out}
    assert run["rows"] == rows[0].leaf_tokens_run == sum(len(lf.token_ids) for lf in leaves)
    assert run["trees"] < run["rows"]
    assert int(rows[0].mask.sum()) == sum(sum(lf.loss_mask) for lf in leaves)


def test_packed_positions_and_mask_follow_the_paths(tiny_policy, small_env):
    tree = _trees(tiny_policy, small_env)[0]
    leaves = tree.leaf_ids()
    assert len(leaves) > 1
    batch = build_batch([(tree, {leaf: 1.0 for leaf in leaves})], "trees")
    assert len(batch.packs) == 1
    p = batch.packs[0]
    assert len(p.input_ids) == sum(len(n.gen_ids) + len(n.obs_ids) for n in tree.nodes.values())
    assert p.allowed.diagonal().all() and not p.allowed.triu(1).any()
    assert torch.equal(batch.coef, batch.mask)  # all advantages 1: coef = 1 on every sampled token
    assert p.leaves == list(range(len(leaves)))
    # a scored token appears in the matrix rows of exactly the leaves below its node
    count = torch.zeros(len(p.tgt), dtype=torch.long)
    for c in p.leaf_cols:
        count[c] += 1
    node_of_scored = [n.id for n in tree.nodes.values() for _ in n.gen_ids]  # packs keep node-id order
    assert count.tolist() == [tree.nodes[n].leaves for n in node_of_scored]
    assert (count >= 1).all() and count.max() > 1
    for k, leaf in enumerate(leaves):
        ids, mask, _ = tree.prefix(leaf)
        seq, cols = p.leaf_seq[k], p.leaf_cols[k]
        assert p.input_ids[seq].tolist() == ids  # the leaf's own sequence, in order
        assert p.position_ids[seq].tolist() == list(range(len(ids)))  # positions restart along each path
        # each token of the path sees exactly the path's tokens up to itself
        assert torch.equal(p.allowed[seq][:, seq], torch.ones(len(ids), len(ids), dtype=torch.bool).tril())
        assert p.allowed[seq].sum(1).tolist() == list(range(1, len(ids) + 1))
        # its sampled tokens are scored by the logits of the token before each on its own path
        sampled = torch.tensor([q for q, m in enumerate(mask) if m])
        assert torch.equal(batch.sampled_pos[k], sampled)
        assert p.tgt[cols].tolist() == [ids[q] for q in sampled.tolist()]
        assert torch.equal(p.src[cols], seq[sampled - 1])
    # a micro-batch of one leaf-per-row layout has no mask at all; the tree layout gives a 4D bool one
    mb = batch.micro([0], pad_id=0)
    assert mb.attention_mask.shape == (1, 1, len(p), len(p)) and mb.attention_mask.dtype == torch.bool
    assert build_batch([(tree, {leaves[0]: 1.0})], "trees").packs[0].allowed is None  # one leaf: causal


def test_trainer_packed_update_equals_the_per_leaf_update(tmp_path):
    """One optimizer step from the same trees: per-leaf rows and packed trees give the same weights."""
    import copy

    from conftest import TINY_RUN
    from tracerl.config import load_config
    from tracerl.train import Trainer

    cfg = load_config(None, [*TINY_RUN, f"run.dir={tmp_path / 'r'}", "rollout.allocator=tree_grpo",
                             "algo.advantage=tree_grpo", "rollout.rounds=2", "trainer.warmup_steps=0",
                             "trainer.micro_batch_size=3"])
    tr = Trainer(cfg, log=lambda *_: None)
    tr.setup()
    assert tr.layout() == "rows"
    trees, _ = tr.rollout(0)
    with_adv = _with_adv(trees, seed=1)
    start = copy.deepcopy(tr.model.state_dict())
    # plain SGD: the step is lr × the (clipped) gradient, so comparing steps compares gradients; Adam's
    # first step, lr·g/|g|, would blow float noise in near-zero gradient entries up to lr
    tr.cfg.trainer.lr = 1.0  # steps far above the parameters' float spacing
    tr.optimizer = torch.optim.SGD(tr.model.parameters(), lr=1.0)
    per_leaf = tr.update(build_batch(with_adv, "rows"), 0)
    step_leaf = {k: v - start[k] for k, v in tr.model.state_dict().items()}
    tr.model.load_state_dict(start)
    tr.optimizer = torch.optim.SGD(tr.model.parameters(), lr=1.0)
    packed = tr.update(build_batch(with_adv, "trees"), 0)
    scale = max(float(v.abs().max()) for v in step_leaf.values())
    assert scale > 0
    for k, v in tr.model.state_dict().items():
        torch.testing.assert_close(v - start[k], step_leaf[k], atol=1e-4 * scale, rtol=1e-3)
    assert packed["loss"] == pytest.approx(per_leaf["loss"], abs=1e-5)
    assert packed["train_tokens"] < packed["train_tokens_per_leaf"] == per_leaf["train_tokens_per_leaf"]
    assert per_leaf["train_tokens"] >= per_leaf["train_tokens_per_leaf"]  # rows run every leaf's tokens (+ padding)
