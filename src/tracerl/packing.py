"""Packing a rollout tree into one sequence, so each shared node is run (and trained) once.

Per-leaf training runs a prefix shared by n leaves n times. Packed, a tree's nodes are laid out
once each (parents before children) and a tree attention mask lets every token see exactly its
own path: earlier tokens of its node and all tokens of its ancestors. Position ids restart along
each path, so every token gets the logits it would get in its leaf's own sequence.

A sampled token of node `y` is scored from the logits of the token before it on its path and
carries `coef = Σ_{leaves ℓ below y} A_ℓ`. At ratio 1 the policy-gradient term is linear in the
advantage, so `Σ_y coef_y ∇log π(y)` equals the per-leaf sum `Σ_ℓ A_ℓ Σ_{y on ℓ} ∇log π(y)`:
the same gradient (METHODS.md §3.2, `adv.dedup_prefix`). `count` (leaves through the token) weighs
the KL and entropy terms and the token-mean denominator the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tracerl.tree import RolloutTree


@dataclass
class PackedTree:
    input_ids: Tensor  # (S,) every node's tokens once, parents before children
    position_ids: Tensor  # (S,) position of the token in its own path
    allowed: Tensor  # (S, S) bool: query i may attend to key j
    src: Tensor  # (P,) positions whose logits score the P sampled tokens
    tgt: Tensor  # (P,) the sampled token ids
    sample_logp: Tensor  # (P,) their sampling-time log-probs
    coef: Tensor  # (P,) sum of the advantages of the leaves below the token's node
    count: Tensor  # (P,) number of (kept) leaves whose sequence contains the token
    leaf_tokens: int  # Σ over leaves of their sampled tokens: the per-leaf token-mean denominator
    leaf_sequence_tokens: int  # Σ over leaves of their full lengths: tokens a per-leaf forward runs
    scored: dict[int, tuple[int, int]]  # node id -> its [start, end) among the P scored tokens
    n_leaves: int  # leaves packed (the rows a per-leaf layout would need)
    spans: dict[int, tuple[int, int]] = field(default_factory=dict)  # node id -> its [start, end) in input_ids

    def leaf_sequence(self, tree: RolloutTree, leaf: int) -> Tensor:
        """Indices into `input_ids` of a leaf's whole token sequence (prompt, turns, observations), in
        order: gathering them gives the leaf's own row, `traj.token_ids`."""
        return torch.tensor([i for n in tree.path(leaf) for i in range(*self.spans[n.id])], dtype=torch.long)

    def leaf_index(self, tree: RolloutTree, leaf: int) -> Tensor:
        """Indices into the P scored tokens of a leaf's sampled tokens, in sequence order."""
        return torch.tensor([i for n in tree.path(leaf) for i in range(*self.scored.get(n.id, (0, 0)))],
                            dtype=torch.long)


def pack_tree(tree: RolloutTree, leaf_adv: dict[int, float]) -> PackedTree:
    """Pack the nodes of `tree` that lie above the leaves in `leaf_adv` (leaf id -> advantage)."""
    keep: set[int] = set()
    for leaf in leaf_adv:
        keep.update(n.id for n in tree.path(leaf))
    order = sorted(keep)  # children have larger ids than their parents
    index = {nid: i for i, nid in enumerate(order)}
    coef = {nid: 0.0 for nid in order}
    count = {nid: 0 for nid in order}
    for leaf, a in leaf_adv.items():
        for n in tree.path(leaf):
            coef[n.id] += float(a)
            count[n.id] += 1

    ids: list[int] = []
    pos: list[int] = []
    node_of: list[int] = []
    first_pos: dict[int, int] = {}  # where a node's tokens start in the packed sequence
    end_depth: dict[int, int] = {}  # path length after the node
    src, tgt, logp, cf, cnt = [], [], [], [], []
    scored: dict[int, tuple[int, int]] = {}
    spans: dict[int, tuple[int, int]] = {}
    for nid in order:
        n = tree.nodes[nid]
        start = end_depth[n.parent] if n.parent is not None else 0
        first_pos[nid] = len(ids)
        prev = first_pos[n.parent] + len(tree.nodes[n.parent].gen_ids) + len(tree.nodes[n.parent].obs_ids) - 1 \
            if n.parent is not None else None
        for k, t in enumerate(n.gen_ids):
            src.append(prev if k == 0 else len(ids) - 1)
            tgt.append(t)
            logp.append(n.logprobs[k])
            cf.append(coef[nid])
            cnt.append(count[nid])
            ids.append(t)
            pos.append(start + k)
            node_of.append(index[nid])
        scored[nid] = (len(tgt) - len(n.gen_ids), len(tgt))
        for k, t in enumerate(n.obs_ids):
            ids.append(t)
            pos.append(start + len(n.gen_ids) + k)
            node_of.append(index[nid])
        end_depth[nid] = start + len(n.gen_ids) + len(n.obs_ids)
        spans[nid] = (first_pos[nid], len(ids))
    if any(s is None for s in src):
        raise ValueError("the root of a tree holds no sampled tokens")

    # ancestor-or-self relation between kept nodes, then per token pair
    anc = torch.zeros(len(order), len(order), dtype=torch.bool)
    for nid in order:
        for a in tree.path(nid):
            anc[index[nid], index[a.id]] = True
    node_t = torch.tensor(node_of)
    S = len(ids)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    allowed = anc[node_t[:, None], node_t[None, :]] & causal
    leaf_tokens = sum(sum(len(n.gen_ids) for n in tree.path(leaf)) for leaf in leaf_adv)
    leaf_seq = sum(sum(len(n.gen_ids) + len(n.obs_ids) for n in tree.path(leaf)) for leaf in leaf_adv)
    return PackedTree(torch.tensor(ids), torch.tensor(pos), allowed, torch.tensor(src, dtype=torch.long),
                      torch.tensor(tgt, dtype=torch.long), torch.tensor(logp, dtype=torch.float32),
                      torch.tensor(cf, dtype=torch.float32), torch.tensor(cnt, dtype=torch.float32), leaf_tokens,
                      leaf_seq, scored, len(leaf_adv), spans)


def batch_packed(packs: list[PackedTree], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad packed trees: input ids (B, S), position ids (B, S), 4D bool mask (B, 1, S, S).

    Padding queries attend to themselves only (no row of the mask is empty)."""
    S = max(len(p.input_ids) for p in packs)
    ids = torch.full((len(packs), S), pad_id, dtype=torch.long)
    pos = torch.zeros((len(packs), S), dtype=torch.long)
    mask = torch.eye(S, dtype=torch.bool).repeat(len(packs), 1, 1)
    for i, p in enumerate(packs):
        n = len(p.input_ids)
        ids[i, :n], pos[i, :n] = p.input_ids, p.position_ids
        mask[i, :n, :n] = p.allowed
    return ids, pos, mask[:, None]
