"""FlowTracer's flow on the attention DAG (docs/flowtracer.md §4): invariants on random attention
matrices, agreement with explicit recursions and with brute-force path enumeration."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tracerl.credit.flow import edge_weights, throughput

TOL = 1e-9


def random_attention(n: int, gen: torch.Generator, sparsity: float = 0.0) -> torch.Tensor:
    """A causal row-stochastic (N, N) float64 matrix; `sparsity` zeroes that share of the edges."""
    scores = torch.randn(n, n, generator=gen, dtype=torch.float64) * 2
    keep = torch.rand(n, n, generator=gen, dtype=torch.float64) >= sparsity
    keep |= torch.eye(n, dtype=torch.bool)  # every row attends at least to itself
    scores = scores.masked_fill(~keep | torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)


def regions(n: int, p: int, q: tuple[int, int], ans: tuple[int, int]):
    source = torch.zeros(n, dtype=torch.bool)
    source[q[0]:q[1]] = True
    sink = torch.zeros(n, dtype=torch.bool)
    sink[ans[0]:ans[1]] = True
    prompt = torch.zeros(n, dtype=torch.bool)
    prompt[:p] = True
    return source, sink, prompt


def test_edge_weights_drop_diagonal_and_sink_and_renormalise():
    a = random_attention(6, torch.Generator().manual_seed(0))
    w = edge_weights(a)
    assert torch.all(w.diagonal() == 0) and torch.all(w[:, 0] == 0) and torch.all(w.triu() == 0)
    # row 0 (only itself) and row 1 (itself and the sink) are left empty; the others sum to 1
    assert torch.all(w[:2] == 0)
    torch.testing.assert_close(w[2:].sum(1), torch.ones(4, dtype=torch.float64))
    # proportions among the kept parents are those of the attention
    torch.testing.assert_close(w[4, 2] / w[4, 1], a[4, 2] / a[4, 1])
    keep_sink = edge_weights(a, drop_sink=False)
    assert keep_sink[1, 0] == 1.0
    top1 = edge_weights(a, topk_parents=1)
    assert torch.all((top1[2:] > 0).sum(1) == 1) and torch.all(top1[2:].max(1).values == 1.0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(6, 40), seed=st.integers(0, 10_000), sparsity=st.sampled_from([0.0, 0.5, 0.8]),
       data=st.data())
def test_flow_invariants_on_random_attention(n, seed, sparsity, data):
    p = data.draw(st.integers(2, n - 3))
    q0 = data.draw(st.integers(0, p - 1))
    q1 = data.draw(st.integers(q0 + 1, p))
    a0 = data.draw(st.integers(p + 1, n - 1))
    a1 = data.draw(st.integers(a0 + 1, n))
    source, sink, prompt = regions(n, p, (q0, q1), (a0, a1))
    attn = random_attention(n, torch.Generator().manual_seed(seed), sparsity)
    fl = throughput(attn, source, sink, prompt)
    phi, f = fl.phi, fl.edge_flow()
    assert torch.all(phi >= -TOL) and torch.all(phi <= 1 + TOL)
    # nodes that cannot reach the answer carry nothing: h = 0 -> φ = 0 (and so every token after Ans)
    assert torch.all(phi[fl.h <= 0] == 0)
    assert torch.all(phi[a1:] == 0)
    if fl.z <= 0:
        assert torch.all(phi == 0)
        return
    assert abs(float(phi[sink].sum()) - 1) < 1e-9  # all flow arrives at the answer
    assert abs(float(f[source].sum()) - 1) < 1e-9  # all flow leaves the question
    middle = ~prompt & ~sink
    torch.testing.assert_close(f.sum(0)[middle], phi[middle], atol=1e-10, rtol=0)  # inflow = φ
    torch.testing.assert_close(f.sum(1)[middle], phi[middle], atol=1e-10, rtol=0)  # outflow = φ
    torch.testing.assert_close(f.sum(0)[sink], phi[sink], atol=1e-10, rtol=0)  # answer tokens absorb
    assert torch.all(f[sink] == 0) and torch.all(f[:, prompt] == 0)  # no edges out of Ans, none into the prompt


def loop_recursions(attn, source, sink, prompt):
    """h and α by the explicit loops of docs/flowtracer.md §4 (no matrix algebra)."""
    n = attn.shape[0]
    w = edge_weights(attn)
    blocked = prompt | source
    c = [[float(w[t, s]) if s < t and not blocked[t] and not sink[s] else 0.0 for t in range(n)] for s in range(n)]
    h = [0.0] * n
    for s in reversed(range(n)):
        h[s] = 1.0 if sink[s] else sum(c[s][t] * h[t] for t in range(s + 1, n))
    mu = [1.0 / int(source.sum()) if source[s] else 0.0 for s in range(n)]
    alpha = [0.0] * n
    for t in range(n):
        alpha[t] = mu[t] if blocked[t] else sum(alpha[s] * c[s][t] for s in range(t))
    return torch.tensor(h, dtype=torch.float64), torch.tensor(alpha, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(5))
def test_triangular_solves_equal_the_explicit_loops(seed):
    n, p = 30, 8
    source, sink, prompt = regions(n, p, (2, 6), (25, 28))
    attn = random_attention(n, torch.Generator().manual_seed(seed), 0.3)
    fl = throughput(attn, source, sink, prompt)
    h, alpha = loop_recursions(attn, source, sink, prompt)
    torch.testing.assert_close(fl.h, h, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(fl.alpha, alpha, atol=1e-12, rtol=1e-9)


def brute_force_phi(attn, source, sink, prompt):
    """φ by enumerating every question-to-answer path: weight μ(q)·Π C, normalised by the total."""
    n = attn.shape[0]
    w = edge_weights(attn)
    mu = 1.0 / int(source.sum())
    through = [0.0] * n
    total = 0.0
    inner = [t for t in range(n) if not prompt[t] and not source[t] and not sink[t]]
    for q in (i for i in range(n) if source[i]):
        for a in (i for i in range(n) if sink[i]):
            for k in range(len(inner) + 1):
                for mids in itertools.combinations(inner, k):  # increasing positions = a DAG path
                    path = (q, *mids, a)
                    if any(path[i] >= path[i + 1] for i in range(len(path) - 1)):
                        continue
                    weight = mu
                    for s, t in zip(path, path[1:]):
                        weight *= float(w[t, s])
                    total += weight
                    for v in path:
                        through[v] += weight
    return torch.tensor(through, dtype=torch.float64) / total, total


@pytest.mark.parametrize("seed", range(6))
def test_throughput_equals_brute_force_path_enumeration(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    n, p = 9, 3
    source, sink, prompt = regions(n, p, (1, 3), (7, 9))
    attn = random_attention(n, gen, sparsity=0.3 if seed % 2 else 0.0)
    fl = throughput(attn, source, sink, prompt)
    phi, total = brute_force_phi(attn, source, sink, prompt)
    assert abs(fl.z - total) < 1e-12
    # a path that enters Ans ends there (no edges out of the answer), so an answer token's φ is the
    # flow arriving at it, which is what enumeration counts for paths ending at it
    torch.testing.assert_close(fl.phi, phi, atol=1e-12, rtol=1e-9)


def test_unreachable_answer_gives_zero_flow():
    n = 8
    source, sink, prompt = regions(n, 3, (1, 3), (6, 8))
    attn = torch.zeros(n, n, dtype=torch.float64)
    attn[:, 0] = 1.0  # every token attends only to the sink: after dropping it nothing is left
    attn[0, 0] = 1.0
    fl = throughput(attn, source, sink, prompt)
    assert fl.z == 0 and torch.all(fl.phi == 0)
    # answer tokens whose only parents are the sink and a prompt token outside the question: the
    # other tokens carry question flow, but none of it can enter the answer
    attn = random_attention(n, torch.Generator().manual_seed(1))
    attn[6:] = 0.0
    attn[6:, 0], attn[6:, 1] = 0.5, 0.5  # token 1 is in the prompt, not in Q = {2}
    source, sink, prompt = regions(n, 3, (2, 3), (6, 8))
    fl = throughput(attn, source, sink, prompt)
    assert fl.alpha[3:6].sum() > 0
    assert fl.z == 0 and torch.all(fl.phi == 0)


def test_bad_region_shapes_fail_clearly():
    attn = random_attention(5, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="source must be a bool tensor"):
        throughput(attn, torch.zeros(4, dtype=torch.bool), torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="square"):
        edge_weights(torch.zeros(3, 4))
