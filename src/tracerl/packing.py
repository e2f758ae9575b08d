"""One token batch for every training layout: trees in, packed sequences and a leaf-major view out.

A *pack* is one sequence that holds the nodes of one tree above some of its leaves, each node once,
parents before children. Two layouts build packs:

    rows   one pack per leaf: its whole path, plain causal attention (no shared work)
    trees  one pack per tree: every node once, a tree attention mask lets each token see exactly
           its own path, position ids restart along each path. For chains (G leaves hanging from the
           root) this is the prompt computed once for the G chains of a prompt.

A sampled token of a node is scored by the logits of the token before it on its path (`src`), so
every scored token gets exactly the log-prob it would get in its leaf's own row.

The loss never sees packs: `MicroBatch.to_leaves` gathers the per-scored-token values of a forward into
a leaf-major matrix (leaves, n_max) — row ℓ holds leaf ℓ's sampled tokens in order — and every policy
loss, aggregation, KL and distillation term is computed there, as if each leaf were its own row. A token
shared by k leaves appears in k rows of the matrix (same log-prob, each leaf's own advantage), so the
loss and its gradient equal the per-leaf layout's for every aggregation and any policy loss, at any
ratio (docs/tree_grpo.md §4). Only the forward is deduplicated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch
from torch import Tensor

from tracerl.padding import right_pad
from tracerl.tree import Leaf, RolloutTree

Layout = Literal["rows", "trees"]
LAYOUTS: tuple[str, ...] = ("rows", "trees")


@dataclass
class Pack:
    """One packed sequence. `allowed is None` means a single path: plain causal attention."""

    input_ids: Tensor  # (S,) long
    position_ids: Tensor  # (S,) long, the token's position in its own path
    allowed: Tensor | None  # (S, S) bool: query i may attend to key j (None: causal)
    src: Tensor  # (P,) positions whose logits score the P sampled tokens
    tgt: Tensor  # (P,) the sampled token ids
    leaves: list[int]  # indices of its leaves in the batch
    leaf_cols: list[Tensor]  # per leaf: (n_ℓ,) indices into the P scored tokens of its sampled tokens, in order
    leaf_seq: list[Tensor]  # per leaf: (N_ℓ,) indices into input_ids of its whole sequence, in order

    def __len__(self) -> int:
        return int(self.input_ids.numel())


def _pack(tree: RolloutTree, leaf_ids: list[int], first_leaf: int) -> Pack:
    """The nodes of `tree` above `leaf_ids`, each once (children have larger ids than their parents)."""
    paths = {leaf: tree.path(leaf) for leaf in leaf_ids}
    order = sorted({n.id for p in paths.values() for n in p})
    ids: list[int] = []
    pos: list[int] = []
    span: dict[int, tuple[int, int]] = {}  # node -> its [start, end) in the pack
    scored: dict[int, tuple[int, int]] = {}  # node -> its [start, end) among the scored tokens
    end_depth: dict[int, int] = {}  # path length after the node
    src: list[int] = []
    tgt: list[int] = []
    for nid in order:
        n = tree.nodes[nid]
        depth = end_depth[n.parent] if n.parent is not None else 0
        start = len(ids)
        if n.gen_ids and n.parent is None:
            raise ValueError("the root of a tree holds no sampled tokens")
        prev = span[n.parent][1] - 1 if n.parent is not None else -1  # the parent's last token
        for k, t in enumerate(n.gen_ids):
            src.append(prev if k == 0 else start + k - 1)
            tgt.append(t)
        scored[nid] = (len(tgt) - len(n.gen_ids), len(tgt))
        ids += n.gen_ids + n.obs_ids
        pos += range(depth, depth + len(n.gen_ids) + len(n.obs_ids))
        span[nid] = (start, len(ids))
        end_depth[nid] = depth + len(n.gen_ids) + len(n.obs_ids)
    allowed = None
    if len(leaf_ids) > 1:
        index = {nid: i for i, nid in enumerate(order)}
        anc = torch.zeros(len(order), len(order), dtype=torch.bool)  # anc[a, b]: b is on a's path
        for nid in order:
            anc[index[nid], [index[a.id] for a in tree.path(nid)]] = True
        node_of = torch.tensor([index[nid] for nid in order for _ in range(*span[nid])])
        allowed = anc[node_of[:, None], node_of[None, :]] & torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    cols = [torch.tensor([i for n in paths[leaf] for i in range(*scored[n.id])], dtype=torch.long) for leaf in leaf_ids]
    seq = [torch.tensor([i for n in paths[leaf] for i in range(*span[n.id])], dtype=torch.long) for leaf in leaf_ids]
    return Pack(torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long), allowed,
                torch.tensor(src, dtype=torch.long), torch.tensor(tgt, dtype=torch.long),
                list(range(first_leaf, first_leaf + len(leaf_ids))), cols, seq)


@dataclass
class TokenBatch:
    """An update's tokens: packs for the forward, and the leaf-major matrix (N leaves, n_max) the loss
    reads — `mask` (1 on a leaf's sampled tokens), `sample_logp` (their sampling-time log-probs),
    `coef` (advantage × token weight). `max_response` is the longest response (tokens after the prompt,
    observations included) of the batch: Dr.GRPO's L_max."""

    packs: list[Pack]
    leaves: list[Leaf]
    adv: Tensor  # (N,)
    mask: Tensor  # (N, n_max) float
    sample_logp: Tensor  # (N, n_max)
    coef: Tensor  # (N, n_max)
    sampled_pos: list[Tensor]  # per leaf: positions of its sampled tokens in its own sequence
    max_response: int
    leaf_tokens_run: int  # tokens a rows layout runs (Σ over leaves of their full lengths)
    weights: Tensor | None = None  # (N, n_max) token weights (credit), 1 without

    def set_weights(self, leaf: int, w: Tensor) -> None:
        """Token weights of one leaf over its whole sequence (N_ℓ,); its sampled tokens' weights are kept."""
        pos = self.sampled_pos[leaf]
        w = w[pos]
        if self.weights is None:
            self.weights = torch.ones_like(self.coef)
        self.weights[leaf, : pos.numel()] = w.to(self.weights)
        self.coef[leaf] = self.adv[leaf] * self.weights[leaf] * self.mask[leaf]

    def mini_batches(self, n: int) -> list[list[int]]:
        """`n` contiguous chunks of the packs (the optimizer steps of one epoch)."""
        return [c.tolist() for c in torch.arange(len(self.packs)).chunk(n)]

    def micro_batches(self, packs: list[int], max_leaves: int) -> list[list[int]]:
        """Packs of a mini-batch, longest first, in groups holding at most `max_leaves` leaves (at least
        one pack each), so each micro-batch pads to packs of similar length."""
        by_len = sorted(packs, key=lambda k: -len(self.packs[k]))
        out: list[list[int]] = [[]]
        leaves = 0
        for k in by_len:
            n = len(self.packs[k].leaves)
            if out[-1] and leaves + n > max_leaves:
                out.append([])
                leaves = 0
            out[-1].append(k)
            leaves += n
        return out

    def leaves_of(self, packs: list[int]) -> list[int]:
        return [i for k in packs for i in self.packs[k].leaves]

    def micro(self, packs: list[int], pad_id: int) -> "MicroBatch":
        return MicroBatch.build(self, packs, pad_id)


def build_batch(trees: Iterable[tuple[RolloutTree, dict[int, float]]], layout: Layout = "rows") -> TokenBatch:
    """The batch of `trees`, each with the advantages of its kept leaves ({leaf node id: A})."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    packs: list[Pack] = []
    leaves: list[Leaf] = []
    adv: list[float] = []
    for tree, leaf_adv in trees:
        ids = sorted(leaf_adv)
        groups = [ids] if layout == "trees" else [[leaf] for leaf in ids]
        for g in groups:
            if g:
                packs.append(_pack(tree, g, len(leaves)))
                leaves += [Leaf(tree, leaf) for leaf in g]
                adv += [float(leaf_adv[leaf]) for leaf in g]
    sampled = [torch.tensor([p for p, m in enumerate(lf.loss_mask) if m], dtype=torch.long) for lf in leaves]
    n_max = max((s.numel() for s in sampled), default=0)
    mask = torch.zeros(len(leaves), n_max)
    logp = torch.zeros(len(leaves), n_max)
    for i, (lf, s) in enumerate(zip(leaves, sampled)):
        mask[i, : s.numel()] = 1.0
        logp[i, : s.numel()] = torch.tensor([lf.logprobs[p] for p in s.tolist()], dtype=torch.float32)
    a = torch.tensor(adv, dtype=torch.float32)
    return TokenBatch(packs, leaves, a, mask, logp, a[:, None] * mask, sampled,
                      max((len(lf.token_ids) - lf.prompt_len for lf in leaves), default=0),
                      sum(len(lf.token_ids) for lf in leaves))


@dataclass
class MicroBatch:
    """The packs of one forward, right-padded into rows, and the map from its scored tokens to its
    leaves' matrix rows."""

    batch: TokenBatch
    packs: list[int]
    input_ids: Tensor  # (R, S)
    position_ids: Tensor  # (R, S)
    attention_mask: Tensor | None  # (R, 1, S, S) bool, None when every pack is a single path
    src: Tensor  # (T,) flat indices into R·S: the positions scoring the T tokens
    tgt: Tensor  # (T,)
    leaves: list[int]  # batch leaf indices, in matrix-row order
    cols: Tensor  # (n, n_max) indices into the T scored tokens; T (one past the end) on padding
    tap_rows: list[tuple[int, int, Tensor]] = field(default_factory=list)  # (row, leaf, its token indices)

    @classmethod
    def build(cls, batch: TokenBatch, packs: list[int], pad_id: int) -> "MicroBatch":
        ps = [batch.packs[k] for k in packs]
        S = max(len(p) for p in ps)
        ids = right_pad([p.input_ids for p in ps], pad_id)
        # padding continues each row's positions: a position that restarts reads as a second sequence
        # packed into the row (transformers then builds a block mask instead of the fused causal kernel)
        pos = torch.arange(S, dtype=torch.long).repeat(len(ps), 1)
        mask = None
        if any(p.allowed is not None for p in ps):
            mask = torch.eye(S, dtype=torch.bool).repeat(len(ps), 1, 1)  # padding queries see themselves
        src, tgt, leaves, cols, taps = [], [], [], [], []
        offset = 0
        n_max = batch.mask.shape[1]
        for r, p in enumerate(ps):
            n = len(p)
            pos[r, :n] = p.position_ids
            if mask is not None:
                mask[r, :n, :n] = p.allowed if p.allowed is not None else torch.ones(n, n, dtype=torch.bool).tril()
            src.append(p.src + r * S)
            tgt.append(p.tgt)
            for leaf, c, seq in zip(p.leaves, p.leaf_cols, p.leaf_seq):
                row = torch.full((n_max,), -1, dtype=torch.long)
                row[: c.numel()] = c + offset
                cols.append(row)
                leaves.append(leaf)
                taps.append((r, leaf, seq))
            offset += p.tgt.numel()
        col = torch.stack(cols)
        col[col < 0] = offset  # padding reads the dummy value appended after the T scored tokens
        return cls(batch, packs, ids, pos, mask[:, None] if mask is not None else None, torch.cat(src),
                   torch.cat(tgt), leaves, col, taps)

    @property
    def tokens(self) -> int:
        """Tokens the forward runs (padding included)."""
        return int(self.input_ids.numel())

    def to_leaves(self, values: Tensor) -> Tensor:
        """Per-scored-token values (T, ...) -> the leaf-major matrix (n, n_max, ...), 0 on padding."""
        pad = values.new_zeros((1, *values.shape[1:]))
        return torch.cat([values, pad])[self.cols.to(values.device)]

    def rows(self, x: Tensor) -> Tensor:
        """This micro-batch's rows of a batch-level leaf matrix (N, n_max, ...)."""
        return x[self.leaves]


def split_by_pack(batch: TokenBatch, packs: list[int], values: Tensor) -> dict[int, Tensor]:
    """Per-scored-token values of a micro-batch (T,) -> {pack index: its (P,) values}."""
    sizes = [batch.packs[k].tgt.numel() for k in packs]
    return dict(zip(packs, values.split(sizes)))


def join_packs(per_pack: dict[int, Tensor], packs: list[int]) -> Tensor:
    """Inverse of `split_by_pack` for a (possibly different) grouping of packs."""
    return torch.cat([per_pack[k] for k in packs])
