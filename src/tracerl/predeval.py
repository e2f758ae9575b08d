"""How well can a success predictor rank prefixes? Offline evaluation on logged trees (docs/trace.md §12).

`tracerl predictor-eval EVAL_RUN --train TRAIN_RUN` fits each candidate predictor of P(R = 1 | prefix) on
the rollout trees logged by one run (`trainer.tree_log_every=1`) and scores it on the prefixes of the
trees logged by another run (or by later steps of the same run): every prompt root (the leaves of all its
trees pooled, as in the predictor's own calibration) and every non-leaf node with leaves below. A prefix
with n leaves below it contributes n (prediction, outcome) pairs; AUROC, Brier and ECE are over those
pairs, overall and per depth, with prompt-clustered bootstrap intervals for AUROC.

Candidates (`PREDICTORS`):
- `constant`: the training pairs' success rate;
- `prompt_rate`: the prompt's success rate in the training trees, shrunk toward the base rate by one
  pseudo-pair; the base rate for prompts the training run never drew;
- `features`: logistic regression on `task_features` (allocate/predictor.py): question features (hops,
  template) and turn features (depth, generated tokens, whether the gold document, the other documents of
  the hop chain or an answer string has appeared in an observation, format errors and searches so far);
- `minilm`: logistic regression on the frozen all-MiniLM-L6-v2 embedding of the history text;
- `hidden`: the project's `SuccessPredictor` on the policy hidden state + scalars only
  (`predictor.task_features=false`, the default before BENCHMARKS §15) with the training run's other
  `predictor.*` keys, trained online step by step on the training run as the trainer trains it;
- `hidden_offline`: the same features with a logistic head fitted on all training prefixes at once;
- `hidden_task`: `hidden` with `predictor.task_features=true` (the `features` inputs added), online: the
  shipped default, the row the verdict judges;
- `value_model`: a separate copy of the run's initial policy with a scalar head, fully fine-tuned on the
  history tokens with squared error to the prefixes' success rates (PCL's value model);
- `mc_ceiling`: not a predictor but the bound on any: the success rate of `mc` fresh continuations from
  each held-out prefix by the policy that generated it, a sample independent of the logged outcome.

Hidden states and continuations come from the policy that generated each logged step: trees logged at
step K were sampled by the checkpoint of step K − 1 (the run's initial model for K = 1), so exact
results need `trainer.checkpoint_every=1` and enough `trainer.keep_checkpoints`; otherwise the nearest
earlier checkpoint is used and the result says so (`generators_exact`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tracerl import seeding
from tracerl.allocate.engine import NodeRef
from tracerl.allocate.predictor import (SuccessPredictor, TextEncoder, auroc, brier, ece, history_text,
                                         task_features)
from tracerl.checkpoint import checkpoint_dirs, read_state
from tracerl.config import Config
from tracerl.errors import TracerlError
from tracerl.resume_rules import read_with_copy
from tracerl.rundir import CHECKPOINT_DIR, CHECKPOINT_MODEL_DIR, CONFIG_FILE, TREES_DIR, step_of
from tracerl.tree import RolloutTree, read_jsonl

PREDICTORS = ("constant", "prompt_rate", "features", "minilm", "hidden", "hidden_offline", "hidden_task", "value_model")
SIMPLE = ("constant", "prompt_rate", "features", "minilm")  # the baselines the default must beat
DEFAULT = "hidden_task"  # the shipped predictor (predictor.task_features=true): the row the verdict judges
PAIRED_REFERENCE = "hidden"  # paired AUROC differences are taken against the hidden state alone
CEILING = "mc_ceiling"
LABELS = {"constant": "(a) constant (train base rate)", "prompt_rate": "(b) per-prompt success in training trees",
          "features": "(c) logistic: question + turn features", "minilm": "(d) MiniLM embedding + logistic",
          "hidden": "(e) policy hidden state + head, online (the default before BENCHMARKS §15)",
          "hidden_offline": "(e') policy hidden state, logistic on all training prefixes",
          "hidden_task": "(e'') (e) + task features, online (default: predictor.task_features=true)",
          "value_model": "(f) value model fine-tuned on history (PCL)", CEILING: "Monte-Carlo ceiling"}
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


class PredictorEvalError(TracerlError):
    """The runs cannot be evaluated as asked (no logged trees, overlapping steps, unknown predictor)."""


# ---------------------------------------------------------------------------------- held-out prefixes


@dataclass
class Sample:
    """One scored prefix: a prompt root (leaves of all its trees pooled) or a non-leaf node."""

    tree: RolloutTree
    node: int
    step: int
    successes: int
    leaves: int

    @property
    def depth(self) -> int:
        return self.tree.nodes[self.node].depth

    @property
    def cluster(self) -> tuple[int, int]:
        """The bootstrap unit: one prompt at one step."""
        return self.step, self.tree.group

    @property
    def ref(self) -> NodeRef:
        return NodeRef(self.tree, self.node, self.successes, self.leaves)


def logged_steps(run_dir: Path) -> list[int]:
    steps = sorted(s for s in (step_of(p) for p in (run_dir / TREES_DIR).glob("step_*.jsonl")) if s is not None)
    if not steps:
        raise PredictorEvalError(f"{run_dir} has no logged trees ({TREES_DIR}/step_*.jsonl); train it with "
                                 "trainer.tree_log_every=1")
    return steps


def parse_steps(spec: str | None, available: list[int], what: str) -> list[int]:
    """'A-B' (either end may be left open), 'A,B,C' or None (all logged steps) -> the logged steps asked for."""
    if spec is None:
        return list(available)
    chosen: set[int] = set()
    try:
        for part in spec.split(","):
            lo, sep, hi = part.strip().partition("-")
            if sep:
                a, b = int(lo) if lo else min(available), int(hi) if hi else max(available)
                chosen.update(s for s in available if a <= s <= b)
            else:
                chosen.add(int(lo))
    except ValueError:
        raise PredictorEvalError(f"{what} {spec!r} is not a step list like 1-10 or 3,5,7") from None
    missing = sorted(chosen - set(available))
    if missing:
        raise PredictorEvalError(f"{what}: step {missing[0]} has no logged trees (logged: {available[0]}..{available[-1]})")
    if not chosen:
        raise PredictorEvalError(f"{what} {spec!r} selects none of the logged steps {available[0]}..{available[-1]}")
    return sorted(chosen)


def load_trees(run_dir: Path, step: int) -> list[RolloutTree]:
    trees = read_jsonl(run_dir / TREES_DIR / f"step_{step:06d}.jsonl")
    for t in trees:
        t.update_stats()
    return trees


def samples_of(trees: Sequence[RolloutTree], step: int) -> list[Sample]:
    """Every prompt root (pooled over the prompt's trees, on its first tree) and every non-leaf node with
    leaves below, in tree order."""
    roots: dict[int, Sample] = {}
    out: list[Sample] = []
    for t in trees:
        if t.root.leaves:
            root = roots.get(t.group)
            if root is None:
                root = roots[t.group] = Sample(t, 0, step, 0, 0)
                out.append(root)
            root.successes += t.root.successes
            root.leaves += t.root.leaves
        out += [Sample(t, n.id, step, n.successes, n.leaves) for n in t.nodes.values()
                if n.id and not n.done and n.leaves]
    return out


# ---------------------------------------------------------------------------------- generating policies


def initial_model(run_dir: Path, cfg: Config) -> Path:
    """The run's initial policy: the path its checkpoints recorded, else the config's (SFT cache)."""
    for ckpt in checkpoint_dirs(run_dir / CHECKPOINT_DIR):
        path = read_state(ckpt).get("model_path")
        if path and Path(path).is_dir():
            return Path(path)
    from tracerl.setup import resolve_model_path

    return resolve_model_path(cfg, log=lambda *_: None)


def generator_of(run_dir: Path, step: int, initial: Callable[[], Path]) -> tuple[Path, bool]:
    """(model dir, exact) of the policy that sampled the trees logged at `step`: checkpoint step − 1 (the
    initial model for step 1); when it was not kept, the nearest earlier one (exact False)."""
    ckpts = {step_of(p): p for p in checkpoint_dirs(run_dir / CHECKPOINT_DIR)}
    want = step - 1
    if want in ckpts:
        return ckpts[want] / CHECKPOINT_MODEL_DIR, True
    earlier = [s for s in ckpts if s is not None and s < want]
    if earlier:
        return ckpts[max(earlier)] / CHECKPOINT_MODEL_DIR, False
    return initial(), want == 0


def _policy(model_dir: Path, cfg: Config):
    from tracerl.backends.hf import HFPolicy
    from tracerl.models.io import load_policy

    model, tok = load_policy(model_dir)
    return HFPolicy(model.eval(), tok, cfg.run.device, cfg.model.max_context)


def fill_hidden(policy, trees: Sequence[RolloutTree], batch_size: int) -> None:
    """tree.hidden[node] for every tree's root and every non-leaf node with leaves below: the policy's
    last-layer state at the prefix's last token, from a prefill-only pass (what the rollout engine
    captures while it generates during training)."""
    todo = [(t, n.id) for t in trees for n in t.nodes.values()
            if n.id not in t.hidden and not n.done and (n.leaves or not n.id)]
    if todo:
        states, _ = policy.prefix_hidden([t.prefix(i)[0] for t, i in todo], batch_size)
        for (t, i), h in zip(todo, states):
            t.hidden[i] = h


def mc_rates(policy, env, cfg: Config, samples: Sequence[Sample], n: int, generator: torch.Generator) -> list[float]:
    """Success rate of n fresh continuations from each sample's prefix (the root: n fresh chains)."""
    from tracerl.backends.hf import SamplingParams
    from tracerl.rollout import restore, run_turns

    r = cfg.rollout
    params = SamplingParams(r.max_turn_tokens, r.temperature, r.top_p, tuple(env.stop_strings))
    trajs = [restore(s.tree, s.node) for s in samples for _ in range(n)]
    run_turns(policy, env, trajs, params, generator, r.batch_size)
    wins = [1.0 if t.reward > 0 else 0.0 for t in trajs]
    return [sum(wins[i * n:(i + 1) * n]) / n for i in range(len(samples))]


# ---------------------------------------------------------------------------------- features


# ---------------------------------------------------------------------------------- logistic regression


def fit_logistic(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, l2: float, iters: int = 100) -> torch.Tensor:
    """Weighted logistic regression with soft targets: minimises Σ w·BCE / Σ w + l2/2·|β|² (bias free) with
    L-BFGS in float64. Returns [β, bias]."""
    x, y, w = x.double(), y.double(), w.double()
    theta = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ theta[:-1] + theta[-1]
        loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum() / w.sum()
        loss = loss + 0.5 * l2 * (theta[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


def _logistic_p(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x.double() @ theta[:-1] + theta[-1])


class Logistic:
    """Standardised features, L2 strength chosen by k-fold cross-validation over prompt groups (weighted
    log-loss), then refitted on all training samples."""

    def __init__(self, folds: int = 4, grid: Sequence[float] = L2_GRID, seed: int = 0):
        self.folds, self.grid, self.seed = folds, grid, seed

    def fit(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, groups: Sequence[Any]) -> "Logistic":
        x = x.double()
        mean = (x * w[:, None]).sum(0) / w.sum()
        std = torch.sqrt(((x - mean) ** 2 * w[:, None]).sum(0) / w.sum() + 1e-8)
        self.mean, self.std = mean, std
        z = (x - mean) / std
        ids = sorted(set(groups))
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(self.seed)).tolist()
        fold_of = {ids[j]: k % self.folds for k, j in enumerate(order)}
        fold = torch.tensor([fold_of[g] for g in groups])
        self.cv_loss: dict[float, float] = {}
        for l2 in self.grid:
            total = 0.0
            for k in range(min(self.folds, len(ids))):
                tr, te = fold != k, fold == k
                p = _logistic_p(fit_logistic(z[tr], y[tr], w[tr], l2), z[te]).clamp(1e-6, 1 - 1e-6)
                total += float((-(y[te] * p.log() + (1 - y[te]) * (1 - p).log()) * w[te]).sum())
            self.cv_loss[l2] = total / float(w.sum())
        self.l2 = min(self.grid, key=lambda v: (self.cv_loss[v], -v))
        self.theta = fit_logistic(z, y, w, self.l2)
        return self

    def predict(self, x: torch.Tensor) -> list[float]:
        return _logistic_p(self.theta, (x.double() - self.mean) / self.std).tolist()


# ---------------------------------------------------------------------------------- value model (PCL)


class ValueModel(torch.nn.Module):
    """A causal LM's body with a scalar head on the last token's final hidden state."""

    def __init__(self, lm):
        super().__init__()
        self.body = lm.base_model
        self.head = torch.nn.Linear(lm.config.hidden_size, 1)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.body(input_ids=ids, attention_mask=mask).last_hidden_state
        last = mask.sum(1) - 1
        return self.head(h[torch.arange(len(ids)), last]).squeeze(-1)


def _batches(seqs: list[list[int]], pad: int, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(seqs[i]) for i in idx)
    ids = torch.full((len(idx), width), pad, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
        mask[row, :len(seqs[i])] = 1
    return ids, mask


def value_model_predict(init: Path, train: Sequence[Sample], test: Sequence[Sample], *, epochs: int, lr: float,
                        batch_size: int, max_tokens: int, seed: int) -> list[float]:
    """Fine-tune a copy of `init` (every weight) plus a scalar head with weighted squared error between
    sigmoid(output) and each training prefix's success rate, on its history tokens (left-truncated to
    max_tokens); predict the test prefixes. Batches are length-bucketed and shuffled."""
    from tracerl.models.io import load_policy

    lm, tok = load_policy(init)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeding.seed_of(seed, 0, "predictor_eval"))
        model = ValueModel(lm)
    seqs = [s.tree.prefix(s.node)[0][-max_tokens:] for s in train]
    y = torch.tensor([s.successes / s.leaves for s in train])
    w = torch.tensor([float(s.leaves) for s in train])
    w = w / w.mean()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = seeding.generator(seed, 1, "predictor_eval")
    by_len = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    chunks = [by_len[i:i + batch_size] for i in range(0, len(by_len), batch_size)]
    model.train()
    for _ in range(epochs):
        for c in torch.randperm(len(chunks), generator=g).tolist():
            ids, mask = _batches(seqs, pad, chunks[c])
            p = torch.sigmoid(model(ids, mask))
            loss = ((p - y[chunks[c]]) ** 2 * w[chunks[c]]).sum() / w[chunks[c]].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    model.eval()
    test_seqs = [s.tree.prefix(s.node)[0][-max_tokens:] for s in test]
    out = [0.0] * len(test_seqs)
    by_len = sorted(range(len(test_seqs)), key=lambda i: len(test_seqs[i]))
    with torch.no_grad():
        for i in range(0, len(by_len), batch_size):
            idx = by_len[i:i + batch_size]
            for j, v in zip(idx, torch.sigmoid(model(*_batches(test_seqs, pad, idx))).tolist()):
                out[j] = v
    return out


# ---------------------------------------------------------------------------------- scoring


def auroc_replicates(p: np.ndarray, s: np.ndarray, f: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Pair AUROC (ties half) of each row of `weights` (B, n): row b counts node i's successes s_i and
    failures f_i weights[b, i] times. NaN where a row has no success or no failure."""
    order = np.argsort(p, kind="stable")
    ps = p[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    pos = np.add.reduceat((weights * s)[:, order], starts, axis=1)
    neg = np.add.reduceat((weights * f)[:, order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(1)
    den = pos.sum(1) * neg.sum(1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def cluster_weights(clusters: Sequence[Any], n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) bootstrap weights: prompts resampled with replacement, each sample weighted by how
    often its prompt was drawn."""
    ids = {c: k for k, c in enumerate(dict.fromkeys(clusters))}
    idx = np.array([ids[c] for c in clusters])
    rng = np.random.default_rng(seeding.seed_of(seed, 2, "predictor_eval"))
    counts = rng.multinomial(len(ids), [1 / len(ids)] * len(ids), size=n_boot)
    return counts[:, idx].astype(np.float64)


def subsets(depths: Sequence[int]) -> dict[str, np.ndarray]:
    """'all', 'depth>=1' and one per depth present: boolean masks over the samples."""
    d = np.asarray(depths)
    out = {"all": np.ones(len(d), dtype=bool), "depth>=1": d >= 1}
    out.update({f"depth={k}": d == k for k in sorted(set(d.tolist()))})
    return out


def score(preds: dict[str, list[float]], samples: Sequence[Sample], n_boot: int, seed: int,
          reference: str = PAIRED_REFERENCE) -> dict[str, dict[str, dict[str, Any]]]:
    """{subset: {predictor: {auroc, auroc_ci, brier, ece, pairs, prefixes, auroc_minus_ref_ci}}}, AUROC
    intervals from one prompt-clustered bootstrap shared by all predictors (so differences are paired)."""
    s = np.array([x.successes for x in samples], dtype=np.float64)
    f = np.array([x.leaves - x.successes for x in samples], dtype=np.float64)
    weights = cluster_weights([x.cluster for x in samples], n_boot, seed)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, mask in subsets([x.depth for x in samples]).items():
        if not mask.any():
            continue
        reps: dict[str, np.ndarray] = {}
        rows: dict[str, dict[str, Any]] = {}
        for key, p in preds.items():
            pm = np.asarray(p, dtype=np.float64)[mask]
            ps, sm, fm = pm.tolist(), s[mask].tolist(), f[mask].tolist()
            reps[key] = auroc_replicates(pm, s[mask], f[mask], weights[:, mask])
            ci = np.nanpercentile(reps[key], [2.5, 97.5]).tolist() if np.isfinite(reps[key]).any() else None
            rows[key] = {"auroc": auroc(ps, sm, fm), "auroc_ci": ci, "brier": brier(ps, sm, fm), "ece": ece(ps, sm, fm),
                         "pairs": int(sum(sm) + sum(fm)), "prefixes": int(mask.sum()), "success_rate": sum(sm) / max(sum(sm) + sum(fm), 1)}
        if reference in reps:
            for key in rows:
                diff = reps[reference] - reps[key]
                rows[key]["ref_minus_this_ci"] = (np.nanpercentile(diff, [2.5, 97.5]).tolist()
                                                  if key != reference and np.isfinite(diff).any() else None)
        out[name] = rows
    return out


def verdict(table: dict[str, dict[str, dict[str, Any]]], reference: str = DEFAULT, subset: str = "depth>=1",
            margin: float = 0.05) -> dict[str, Any]:
    """Issue 18's target on `subset`: the reference's AUROC within `margin` of the Monte-Carlo ceiling, and
    above every simple baseline's bootstrap interval."""
    rows = table.get(subset, {})
    ref = rows.get(reference, {}).get("auroc")
    ceiling = rows.get(CEILING, {}).get("auroc")
    out: dict[str, Any] = {"subset": subset, "reference": reference, "auroc": ref, "ceiling": ceiling}
    out["within_margin_of_ceiling"] = None if ref is None or ceiling is None else ref >= ceiling - margin
    beats = {}
    for key in SIMPLE:
        ci = rows.get(key, {}).get("auroc_ci")
        beats[key] = None if ref is None or ci is None else ref > ci[1]
    out["above_simple_baselines"] = beats
    ranked = [(r["auroc"], k) for k, r in rows.items() if k != CEILING and r.get("auroc") is not None]
    out["best"] = max(ranked)[1] if ranked else None
    return out


# ---------------------------------------------------------------------------------- the harness


@dataclass
class EvalOptions:
    train_steps: str | None = None  # steps of the training run ("A-B", "A,B"; None: all logged)
    eval_steps: str | None = None  # steps of the evaluated run
    mc: int = 8  # continuations per held-out prefix for the ceiling (0: no ceiling)
    bootstrap: int = 1000
    predictors: tuple[str, ...] = PREDICTORS
    value_epochs: int = 1  # PCL updates its value model once on each batch
    value_lr: float = 3e-4
    value_max_tokens: int = 512
    seed: int = 0


def _config(run_dir: Path, overrides: Sequence[str], log: Callable[[str], None] | None) -> Config:
    if not (run_dir / CONFIG_FILE).is_file():
        raise PredictorEvalError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    return read_with_copy(run_dir / CONFIG_FILE, None, log).config(overrides)  # keys it predates: a warning


def evaluate_predictors(eval_run: str | Path, train_run: str | Path | None = None, opts: EvalOptions | None = None,
                        overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit every predictor of `opts.predictors` on the training run's logged trees, score it (and the
    Monte-Carlo ceiling) on the evaluated run's prefixes. `overrides` (dotted keys) apply to both runs'
    configs, e.g. predictor.head=logistic or run.threads=1. Returns the JSON-able result."""
    from tracerl.setup import apply_threads, build_env

    opts = opts or EvalOptions()
    unknown = [p for p in opts.predictors if p not in PREDICTORS]
    if unknown:
        raise PredictorEvalError(f"unknown predictor {unknown[0]!r}; valid: {', '.join(PREDICTORS)}")
    eval_dir = Path(eval_run)
    train_dir = Path(train_run) if train_run is not None else eval_dir
    same = train_dir.resolve() == eval_dir.resolve()
    cfg, train_cfg = _config(eval_dir, overrides, log), _config(train_dir, overrides, None if same else log)
    apply_threads(cfg)
    train_steps = parse_steps(opts.train_steps, logged_steps(train_dir), "--train-steps")
    eval_steps = parse_steps(opts.eval_steps, logged_steps(eval_dir), "--eval-steps")
    if same and set(train_steps) & set(eval_steps):
        raise PredictorEvalError(f"training and evaluated steps of {eval_dir} overlap "
                                 f"(step {min(set(train_steps) & set(eval_steps))}); give disjoint --train-steps and --eval-steps")
    timings: dict[str, float] = {}
    t0 = time.time()
    train_trees = {k: load_trees(train_dir, k) for k in train_steps}
    eval_trees = {k: load_trees(eval_dir, k) for k in eval_steps}
    train = [x for k in train_steps for x in samples_of(train_trees[k], k)]
    test = [x for k in eval_steps for x in samples_of(eval_trees[k], k)]
    if not train or not test:
        raise PredictorEvalError(f"no scored prefixes in the {'training' if not train else 'evaluated'} trees "
                                 "(every logged tree is empty)")
    log(f"{len(train)} training prefixes ({len(train_steps)} steps of {train_dir}), "
        f"{len(test)} held-out prefixes ({len(eval_steps)} steps of {eval_dir})")
    y = torch.tensor([x.successes / x.leaves for x in train], dtype=torch.float64)
    w = torch.tensor([float(x.leaves) for x in train], dtype=torch.float64)
    groups = [x.tree.task.id for x in train]  # CV folds never split a prompt
    base = float((y * w).sum() / w.sum())
    preds: dict[str, list[float]] = {}
    info: dict[str, Any] = {"base_rate": base}
    timings["load_s"] = time.time() - t0

    if "constant" in opts.predictors:
        preds["constant"] = [base] * len(test)
    if "prompt_rate" in opts.predictors:
        seen: dict[str, list[float]] = {}
        for x in train:
            if x.node == 0:
                acc = seen.setdefault(x.tree.task.id, [0.0, 0.0])
                acc[0], acc[1] = acc[0] + x.successes, acc[1] + x.leaves
        rate = {k: (sv + base) / (n + 1) for k, (sv, n) in seen.items()}
        preds["prompt_rate"] = [rate.get(x.tree.task.id, base) for x in test]
        info["prompt_rate_coverage"] = sum(x.leaves for x in test if x.tree.task.id in rate) / sum(x.leaves for x in test)
    if "features" in opts.predictors:
        t = time.time()
        xs = [torch.tensor([task_features(x.tree, x.node, cfg.env.max_turns) for x in part], dtype=torch.float64)
              for part in (train, test)]
        model = Logistic(seed=opts.seed).fit(xs[0], y, w, groups)
        preds["features"] = model.predict(xs[1])
        info["features_l2"] = model.l2
        timings["features_s"] = time.time() - t
    if "minilm" in opts.predictors:
        t = time.time()
        encoder = TextEncoder(cfg.run.device)
        xs = [encoder([history_text(x.tree, x.node) for x in part]).double() for part in (train, test)]
        model = Logistic(seed=opts.seed).fit(xs[0], y, w, groups)
        preds["minilm"] = model.predict(xs[1])
        info["minilm_l2"] = model.l2
        timings["minilm_s"] = time.time() - t

    wants_hidden = {"hidden", "hidden_offline", "hidden_task"} & set(opts.predictors)
    generators: dict[str, Any] = {}
    initial: dict[Path, Path] = {}

    def model_of(run: Path, c: Config, step: int) -> Path:
        path, exact = generator_of(run, step, lambda: initial.setdefault(run, initial_model(run, c)))
        generators[f"{run}:{step}"] = {"model": str(path), "exact": exact}
        return path

    # One policy at a time: the generator of each step fills that step's hidden states and, for
    # evaluated steps, samples the Monte-Carlo continuations.
    jobs: dict[Path, list[tuple[str, int]]] = {}
    if wants_hidden:
        for k in train_steps:
            jobs.setdefault(model_of(train_dir, train_cfg, k), []).append(("train", k))
    if wants_hidden or opts.mc:
        for k in eval_steps:
            jobs.setdefault(model_of(eval_dir, cfg, k), []).append(("eval", k))
    mc: dict[int, list[float]] = {}
    hidden_size = None
    env = build_env(cfg) if opts.mc else None
    t_hidden = t_mc = 0.0
    for path, todo in jobs.items():
        policy = _policy(path, cfg)
        hidden_size = policy.model.config.hidden_size
        for part, k in todo:
            if wants_hidden:
                t = time.time()
                fill_hidden(policy, (train_trees if part == "train" else eval_trees)[k], cfg.rollout.batch_size)
                t_hidden += time.time() - t
            if part == "eval" and opts.mc:
                t = time.time()
                mc[k] = mc_rates(policy, env, cfg, [x for x in test if x.step == k], opts.mc,
                                 seeding.generator(cfg.run.seed, k, "predictor_eval"))
                t_mc += time.time() - t
        del policy
    timings.update(hidden_states_s=t_hidden, mc_s=t_mc)
    if opts.mc:
        preds[CEILING] = [v for k in eval_steps for v in mc[k]]

    if wants_hidden:
        t = time.time()
        text = TextEncoder(cfg.run.device) if train_cfg.predictor.text_embedding else None
        pcfg = train_cfg.predictor.model_copy(update={"task_features": False})
        online = SuccessPredictor(pcfg, hidden_size, cfg.env.max_turns, opts.seed, text)
        for k in train_steps:
            online.observe(train_trees[k], k)
        info["hidden_warm"] = online.warm
        if "hidden" in opts.predictors:
            preds["hidden"] = online.predict([x.ref for x in test])
        if "hidden_offline" in opts.predictors:
            model = Logistic(seed=opts.seed).fit(online.features([x.ref for x in train]).double(), y, w, groups)
            preds["hidden_offline"] = model.predict(online.features([x.ref for x in test]))
            info["hidden_offline_l2"] = model.l2
        if "hidden_task" in opts.predictors:
            task = SuccessPredictor(pcfg.model_copy(update={"task_features": True}), hidden_size, cfg.env.max_turns,
                                    opts.seed, text)
            for k in train_steps:
                task.observe(train_trees[k], k)
            preds["hidden_task"] = task.predict([x.ref for x in test])
        timings["hidden_s"] = time.time() - t
    if "value_model" in opts.predictors:
        t = time.time()
        preds["value_model"] = value_model_predict(initial_model(train_dir, train_cfg), train, test,
                                                   epochs=opts.value_epochs, lr=opts.value_lr, batch_size=32,
                                                   max_tokens=opts.value_max_tokens, seed=opts.seed)
        timings["value_model_s"] = time.time() - t

    t = time.time()
    order = [k for k in (*PREDICTORS, CEILING) if k in preds]
    table = score({k: preds[k] for k in order}, test, opts.bootstrap, opts.seed)
    timings["score_s"] = time.time() - t
    if opts.mc > 1:  # E[p̂(1 − p̂)]/(n − 1) estimates Var(p̂) = V(1 − V)/n: what the finite sample adds to its Brier
        for name, mask in subsets([x.depth for x in test]).items():
            if name in table:
                pairs = [(v, x.leaves) for v, x, m in zip(preds[CEILING], test, mask) if m]
                noise = sum(n * v * (1 - v) for v, n in pairs) / (opts.mc - 1) / sum(n for _, n in pairs)
                table[name][CEILING]["brier_perfect_v"] = table[name][CEILING]["brier"] - noise
    exact = all(g["exact"] for g in generators.values())
    if generators and not exact:
        log("warning: some steps' generating checkpoints were not kept; the nearest earlier ones were used "
            "(train with trainer.checkpoint_every=1 and trainer.keep_checkpoints >= steps for exact results)")
    return {"eval_run": str(eval_dir), "train_run": str(train_dir), "train_steps": train_steps, "eval_steps": eval_steps,
            "train_prefixes": len(train), "eval_prefixes": len(test), "mc": opts.mc, "bootstrap": opts.bootstrap,
            "generators_exact": exact, "info": info, "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "table": table, "verdict": verdict(table) if DEFAULT in preds else None}


# ---------------------------------------------------------------------------------- presentation


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _auroc_cell(row: dict[str, Any] | None) -> str:
    if not row or row.get("auroc") is None:
        return "-"
    ci = row.get("auroc_ci")
    return f"{row['auroc']:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per predictor, AUROC [95% CI], Brier and ECE overall and at depth >= 1, and
    AUROC at each depth."""
    table = result["table"]
    depths = sorted((k for k in table if k.startswith("depth=")), key=lambda k: int(k.split("=")[1]))
    head = ["predictor", "AUROC all", "Brier all", "ECE all", "AUROC depth≥1", "Brier depth≥1", "ECE depth≥1",
            *[f"AUROC {d.replace('=', ' ')}" for d in depths]]
    rows = []
    for key in table["all"]:
        a, b = table["all"].get(key), table.get("depth>=1", {}).get(key)
        rows.append([LABELS.get(key, key), _auroc_cell(a), _fmt(a and a["brier"]), _fmt(a and a["ece"]),
                     _auroc_cell(b), _fmt(b and b["brier"]), _fmt(b and b["ece"]),
                     *[_fmt(table[d].get(key, {}).get("auroc")) for d in depths]])
    first = next(iter(table["all"]))
    size = lambda sub: f"{table[sub][first]['pairs']} ({table[sub][first]['prefixes']})" if sub in table else "-"  # noqa: E731
    counts = ["pairs (prefixes)", size("all"), "", "", size("depth>=1"), "", "", *[size(d) for d in depths]]
    rows.append(counts)
    return head, rows


def markdown(result: dict[str, Any]) -> str:
    head, rows = table_rows(result)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summary(result: dict[str, Any]) -> str:
    """The verdict in words."""
    v = result.get("verdict")
    if not v:
        return f"no verdict: the default predictor ({DEFAULT}) was not evaluated"
    beats = v["above_simple_baselines"]
    lines = [f"target at {v['subset']}: default ({v['reference']}) AUROC {_fmt(v['auroc'])}, Monte-Carlo ceiling {_fmt(v['ceiling'])} "
             f"-> within 0.05 of the ceiling: {v['within_margin_of_ceiling']}",
             "above each simple baseline's 95% interval: " + ", ".join(f"{k} {b}" for k, b in beats.items()),
             f"best predictor at {v['subset']} by AUROC: {v['best']}"]
    ceiling = result["table"].get(v["subset"], {}).get(CEILING, {})
    if "brier_perfect_v" in ceiling:
        lines.append(f"Monte-Carlo ceiling at {v['subset']}: Brier {_fmt(ceiling['brier'])} with {result['mc']} continuations, "
                     f"{_fmt(ceiling['brier_perfect_v'])} for a perfect V (sampling noise removed)")
    if result["info"].get("hidden_warm") is False:
        lines.append("note: the online predictors trained on fewer than predictor.warmup steps; in training "
                     "its values would not be used yet")
    cov = result["info"].get("prompt_rate_coverage")
    if cov is not None:
        lines.append(f"prompt_rate: {cov:.0%} of held-out pairs are of prompts seen in training")
    return "\n".join(lines)
