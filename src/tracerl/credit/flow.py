"""Attention-induced information flow from the question to the answer (docs/flowtracer.md §3–§4).

One sequence of N tokens is a DAG: an edge s -> t (s < t) carries the attention that t pays to s.
Conditioning a walk from the question on reaching the answer (a Doob h-transform) gives a flow
that is conserved at every intermediate token; the flow through token t, φ(t), is its throughput:

    W       = head/layer-averaged attention, diagonal and sink column 0 zeroed, rows renormalised
    C[s,t]  = W[t,s] for s < t; no edges into source / prompt tokens, none out of answer tokens
    h(a)    = 1 on Ans,   h(s) = Σ_t C[s,t] h(t)              (answer reachability, backward)
    α(s)    = μ(s) on Q,  α(t) = Σ_s α(s) C[s,t]              (question reach, forward)
    Z       = Σ_{s∈Q} μ(s) h(s),   φ(t) = α(t) h(t) / Z,   f(s→t) = α(s) C[s,t] h(t) / Z

Both recursions are unit-triangular linear systems, solved in O(N²) with `solve_triangular`.
Every function here is pure tensor-in, tensor-out; no model, no tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def edge_weights(attn: Tensor, drop_sink: bool = True, topk_parents: int | None = None) -> Tensor:
    """W (N, N): `attn` (N, N) row-stochastic, causal) with its diagonal (and, with `drop_sink`, the
    column of position 0, the attention sink) zeroed, each row's `topk_parents` largest entries kept
    if given, rows renormalised to 1; a row left empty stays 0."""
    if attn.dim() != 2 or attn.shape[0] != attn.shape[1]:
        raise ValueError(f"attention must be a square (N, N) matrix, got shape {tuple(attn.shape)}")
    w = attn.tril(-1)
    if drop_sink:
        w[:, 0] = 0
    if topk_parents is not None and topk_parents < w.shape[1]:
        top = w.topk(topk_parents, dim=1).indices
        w = torch.zeros_like(w).scatter_(1, top, w.gather(1, top))
    return w.div_(w.sum(1, keepdim=True).clamp_(min=torch.finfo(w.dtype).tiny))  # an empty row stays 0


def _masked(w: Tensor, no_inflow: Tensor, sink: Tensor) -> Tensor:
    """In place: W with the rows of tokens that receive no edges and the columns of sink tokens
    (which send none) zeroed, so that C = Wᵀ."""
    w[no_inflow] = 0
    w[:, sink] = 0
    return w


@dataclass
class Flow:
    h: Tensor  # (N,) answer reachability
    alpha: Tensor  # (N,) question reach
    phi: Tensor  # (N,) throughput α·h/Z (all zeros when Z = 0)
    z: float  # Σ_{s∈Q} μ(s) h(s): total question-to-answer flow before normalisation
    w: Tensor  # (N, N) masked edge weights, C = Wᵀ: the capacities the flow ran on

    @property
    def c(self) -> Tensor:
        return self.w.transpose(0, 1)

    def edge_flow(self) -> Tensor:
        """f (N, N): f[s, t] = α(s) C[s,t] h(t) / Z."""
        if self.z <= 0:
            return torch.zeros_like(self.c)
        return self.alpha[:, None] * self.c * self.h[None, :] / self.z


def throughput(attn: Tensor, source: Tensor, sink: Tensor, no_inflow: Tensor | None = None,
               drop_sink: bool = True, topk_parents: int | None = None) -> Flow:
    """Question-to-answer flow through every token of one sequence.

    attn (N, N): causal attention probabilities (head/layer mean); source (N,) bool: Q, with μ
    uniform on it; sink (N,) bool: Ans; no_inflow (N,) bool: tokens that receive no edges (the whole
    prompt; sources always). Computed in the dtype of `attn` (fp32 in training, fp64 in tests).

    Both systems share one lower-triangular matrix L = I − W (W masked, C = Wᵀ):
    (I − C) h = 1_Ans is hᵀ L = 1_Ansᵀ, and (I − C)ᵀ α = μ is L α = μ."""
    n = attn.shape[0]
    for name, m in (("source", source), ("sink", sink)):
        if m.shape != (n,) or m.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor of shape ({n},), got {m.dtype} {tuple(m.shape)}")
    blocked = source.clone() if no_inflow is None else (no_inflow | source)
    w = _masked(edge_weights(attn, drop_sink, topk_parents), blocked, sink)
    lower = -w
    lower.diagonal().add_(1)
    mu = source.to(attn.dtype) / max(int(source.sum()), 1)
    h = torch.linalg.solve_triangular(lower, sink.to(attn.dtype)[None, :], upper=False, left=False)[0]
    alpha = torch.linalg.solve_triangular(lower, mu[:, None], upper=False)[:, 0]
    z = float((mu * h).sum())
    phi = alpha * h / z if z > 0 else torch.zeros_like(h)
    return Flow(h, alpha, phi, z, w)
