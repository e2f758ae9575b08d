"""Group-relative advantage estimators (docs/estimators.md §1–§6).

Every estimator has the same signature so the trainer can look it up by name:

    fn(rewards (N,), group_ids (N,), *, eps=1e-6, singleton="zero", tree_ids=None, ancestors=None,
       w_intra=1.0, w_inter=1.0) -> advantages (N,)

One value per trajectory (leaf); `broadcast_to_tokens` spreads it over the leaf's loss-mask tokens.
`group_ids` are the prompts; tree estimators also use `tree_ids` (N,) (the leaf's tree) or
`ancestors` (one list of sub-group ids per leaf: the prompt and every tree node above the leaf).
Ids are arbitrary integers (not necessarily contiguous or sorted); estimators ignore what they
do not use.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from tracerl.registry import Registry

AdvantageFn = Callable[..., Tensor]
# needs_trees: the estimator reads tree structure (tree_ids / ancestors), so chains give it nothing to use
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator", traits={"needs_trees": False})

SINGLETON_MODES = ("zero", "raw")


def _group_stats(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-trajectory (mean, unbiased std, size, all_equal) of its group; each (N,)."""
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both have shape (N,); got {tuple(rewards.shape)} "
            f"and {tuple(group_ids.shape)}"
        )
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n_groups = counts.numel()
    r = rewards.to(torch.float64)
    size = counts.to(torch.float64)[inverse]
    mean = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, inverse, r)[inverse] / size
    sq_dev = (r - mean) ** 2
    var = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, inverse, sq_dev)[inverse]
    std = torch.sqrt(var / (size - 1).clamp(min=1))
    # Equality is tested on the raw rewards: mean arithmetic can leave a residue like 1e-17
    # that the std division would blow up into a spurious advantage.
    gmax = torch.full((n_groups,), -torch.inf, dtype=r.dtype).scatter_reduce(0, inverse, r, "amax")
    gmin = torch.full((n_groups,), torch.inf, dtype=r.dtype).scatter_reduce(0, inverse, r, "amin")
    all_equal = (gmax == gmin)[inverse]
    return mean, std, size, all_equal


def _finish(adv: Tensor, rewards: Tensor, size: Tensor, all_equal: Tensor, singleton: str) -> Tensor:
    if singleton not in SINGLETON_MODES:
        raise ValueError(f"unknown singleton mode {singleton!r}; valid: {', '.join(SINGLETON_MODES)}")
    adv = torch.where(all_equal, torch.zeros_like(adv), adv)
    if singleton == "raw":
        adv = torch.where(size == 1, rewards.to(adv.dtype), adv)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    return adv.to(out_dtype)


@ADVANTAGES.register("grpo")
def grpo(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6, singleton: str = "zero", **_: object) -> Tensor:
    """GRPO advantage `(r − mean_g) / (std_g + eps)`, std unbiased (DeepSeekMath, arXiv 2402.03300).

    rewards (N,), group_ids (N,) -> (N,). A group whose rewards are all equal gets exactly 0;
    a singleton group gets 0, or its raw reward with `singleton="raw"` (Tree-GRPO's convention).
    """
    mean, std, size, all_equal = _group_stats(rewards, group_ids)
    adv = (rewards.to(mean.dtype) - mean) / (std + eps)
    return _finish(adv, rewards, size, all_equal, singleton)


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6, singleton: str = "zero", **_: object) -> Tensor:
    """Dr.GRPO advantage `r − mean_g`, no std division (arXiv 2503.20783).

    rewards (N,), group_ids (N,) -> (N,). `eps` is accepted for a uniform signature and unused.
    All-equal and singleton groups are handled as in `grpo`.
    """
    mean, _, size, all_equal = _group_stats(rewards, group_ids)
    adv = rewards.to(mean.dtype) - mean
    return _finish(adv, rewards, size, all_equal, singleton)


@ADVANTAGES.register("tree_grpo", needs_trees=True)
def tree_grpo(rewards: Tensor, group_ids: Tensor, *, tree_ids: Tensor | None = None, eps: float = 1e-6,
              singleton: str = "zero", w_intra: float = 1.0, w_inter: float = 1.0, **_: object) -> Tensor:
    """Tree-GRPO (arXiv 2509.21240): `w_intra·z(r | tree) + w_inter·z(r | prompt)`.

    rewards, group_ids (prompts), tree_ids (N,) -> (N,). Each z-score is GRPO's (unbiased std, eps,
    all-equal group -> 0, singleton group per `singleton`), so a tree with one leaf adds nothing
    intra-tree unless `singleton="raw"`.
    """
    if tree_ids is None:
        raise ValueError("tree_grpo needs tree_ids (one tree id per leaf); use a tree allocator")
    intra = grpo(rewards, tree_ids, eps=eps, singleton=singleton)
    inter = grpo(rewards, group_ids, eps=eps, singleton=singleton)
    return (w_intra * intra.double() + w_inter * inter.double()).to(intra.dtype)


@ADVANTAGES.register("treepo", needs_trees=True)
def treepo(rewards: Tensor, group_ids: Tensor, *, ancestors: list[list[int]] | None = None, eps: float = 1e-6,
           **_: object) -> Tensor:
    """TreePO-style (arXiv 2508.17445): the mean over a leaf's ancestor sub-groups of its GRPO z-score
    within that sub-group (the leaves below the ancestor).

    rewards (N,), ancestors: N lists of sub-group ids -> (N,). Sub-groups with fewer than two
    leaves are skipped; all-equal sub-groups give 0 (and still count in the mean); a leaf with no
    sub-group of two or more gets 0.
    """
    if ancestors is None or len(ancestors) != rewards.numel():
        raise ValueError("treepo needs ancestors: one list of ancestor sub-group ids per leaf")
    leaf = torch.tensor([i for i, a in enumerate(ancestors) for _ in a], dtype=torch.long)
    sub = torch.tensor([g for a in ancestors for g in a], dtype=torch.long)
    if leaf.numel() == 0:
        return torch.zeros_like(rewards, dtype=torch.get_default_dtype())
    r = rewards.to(torch.float64)[leaf]
    mean, std, size, all_equal = _group_stats(r, sub)
    z = torch.where(all_equal, torch.zeros_like(r), (r - mean) / (std + eps))
    counted = (size >= 2).to(torch.float64)
    total = torch.zeros(rewards.numel(), dtype=torch.float64).index_add_(0, leaf, z * counted)
    n = torch.zeros(rewards.numel(), dtype=torch.float64).index_add_(0, leaf, counted)
    out = torch.where(n > 0, total / n.clamp(min=1), torch.zeros_like(total))
    return out.to(rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype())


def tree_advantages(trees: Sequence[Any], name: str, **options: Any) -> list[dict[int, float]]:
    """One advantage per leaf of each rollout tree ({leaf node id: A} per tree) from the registered
    estimator `name`. Trees are plain data (tree.py): `group` is the tree's prompt, its leaves and
    paths give the leaf's tree and ancestor sub-groups (the prompt, then each node above the leaf)."""
    leaves = [(k, leaf) for k, t in enumerate(trees) for leaf in t.leaf_ids()]
    if not leaves:
        return [{} for _ in trees]
    rewards = torch.tensor([float(trees[k].nodes[leaf].reward or 0.0) for k, leaf in leaves], dtype=torch.float32)
    groups = torch.tensor([trees[k].group for k, _ in leaves], dtype=torch.long)
    tree_ids = torch.tensor([k for k, _ in leaves], dtype=torch.long)
    base = int(groups.max()) + 1  # node sub-groups are numbered after the prompt groups
    node_group: dict[tuple[int, int], int] = {}
    ancestors = [[trees[k].group] + [node_group.setdefault((k, n.id), base + len(node_group))
                                     for n in trees[k].path(leaf)[:-1]] for k, leaf in leaves]
    adv = ADVANTAGES.get(name)(rewards, groups, tree_ids=tree_ids, ancestors=ancestors, **options)
    out: list[dict[int, float]] = [{} for _ in trees]
    for (k, leaf), a in zip(leaves, adv.tolist()):
        out[k][leaf] = a
    return out


def broadcast_to_tokens(advantages: Tensor, loss_mask: Tensor) -> Tensor:
    """Spread per-trajectory advantages over loss-mask tokens: (N,), (N, T) -> (N, T), 0 off-mask."""
    if advantages.dim() != 1 or loss_mask.dim() != 2 or loss_mask.shape[0] != advantages.shape[0]:
        raise ValueError(
            f"expected advantages (N,) and loss_mask (N, T); got {tuple(advantages.shape)} "
            f"and {tuple(loss_mask.shape)}"
        )
    return advantages[:, None] * loss_mask.to(advantages.dtype)
