"""Per-token advantage weights for a step's trajectories: regions -> attention -> flow -> weights.

    credit = TokenCredit(cfg.credit, model, tokenizer, seed)
    cs = credit.start(leaves, adv, step)         # None when the rule is `none`
    hook = cs.hook(batch, model)                 # around / after the update's first forward of each
    ...                                          # micro-batch: weights -> batch.coef = A · w
    result = cs.result()                         # weights, metrics, samples for the report

The attention maps come from the forward the update runs anyway (`tap`), taken before any optimizer
step of the batch, so they are π_old's; the only extra work is recomputing the chosen layers'
attention probabilities and solving the flow. Each leaf's map is read over its own tokens
(`tap` gathers them from the row), so rows and packed trees give the same weights. `cs.compute()` instead runs a separate
no-grad forward (stopped after the last chosen layer), `batch_size` rows at a time.

Rows with A = 0 (and, with `nonneg_only`, A < 0), rows longer than `max_len` and rows whose flow is
0 (no path from the question to the answer) keep weight 1.

Tree rollouts: every leaf is weighted over its own path, so a token shared by several leaves may get a
different weight in each; the loss reads leaves one by one (packing.py's leaf-major matrix), so each
leaf's copy of the token carries its own A_ℓ·w_ℓ(t).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from tracerl import seeding
from tracerl.credit.attention import AttentionTap, check_supported, default_layers, num_layers
from tracerl.credit.flow import Flow, throughput
from tracerl.credit.regions import Regions, trajectory_regions
from tracerl.credit.weights import CREDIT
from tracerl.padding import right_pad
from tracerl.rundir import atomic_write_text


@dataclass
class CreditResult:
    weights: list[Tensor]  # per row (N_i,) float32, 1 outside the chosen tokens
    metrics: dict[str, float]
    samples: list[dict] = field(default_factory=list)  # rows for RUN_DIR/credit/ (see `sample_record`)


class TokenCredit:
    """The configured rule, bound to a policy; `start` opens one step's weighting."""

    def __init__(self, cfg, model, tokenizer, seed: int = 0):
        self.cfg, self.model, self.tokenizer, self.seed = cfg, model, tokenizer, seed
        self.fn = CREDIT.get(cfg.name)
        self.active = not CREDIT.trait(cfg.name, "identity")
        self.needs_flow = CREDIT.trait(cfg.name, "needs_flow")
        self.layers: list[int] = []
        if self.needs_flow:
            self.layers = list(cfg.layers) if cfg.layers else default_layers(num_layers(model), cfg.num_layers)
            check_supported(model, self.layers)
        eos = tokenizer.eos_token_id
        self.eos_ids = frozenset([eos]) if eos is not None else frozenset()

    def start(self, trajs, adv: Tensor, step: int, want_samples: bool = False) -> "CreditStep | None":
        return CreditStep(self, trajs, adv, step, want_samples) if self.active else None

    def __call__(self, trajs, adv: Tensor, step: int, want_samples: bool = False) -> CreditResult | None:
        """Weights from a separate attention pass (see `CreditStep.compute`)."""
        cs = self.start(trajs, adv, step, want_samples)
        if cs is None:
            return None
        cs.compute()
        return cs.result()


class CreditStep:
    """One step's weights: rows to weight, their regions, and the weights as they are computed."""

    def __init__(self, credit: TokenCredit, trajs, adv: Tensor, step: int, want_samples: bool):
        t0 = time.perf_counter()
        self.credit, self.cfg, self.trajs, self.step = credit, credit.cfg, list(trajs), step
        self.want_samples = want_samples
        self.adv = adv.tolist()
        cfg = self.cfg
        self.weights = [torch.ones(len(t.token_ids), dtype=torch.float32) for t in self.trajs]
        self.todo = [i for i, (t, a) in enumerate(zip(self.trajs, self.adv))
                     if (a > 0 or (a < 0 and not cfg.nonneg_only)) and len(t.token_ids) <= cfg.max_len]
        self.regions: dict[int, Regions] = {i: self._regions(self.trajs[i]) for i in self.todo}
        self.pending = set(self.todo) if credit.needs_flow else set()
        self.scores: dict[int, Tensor] = {}
        self.flow_z: dict[int, float] = {}
        self.generator = seeding.generator(credit.seed, step, "credit")
        if not credit.needs_flow:
            for i in self.todo:
                self._weigh(i, torch.zeros(len(self.trajs[i].token_ids)))
        self.seconds = time.perf_counter() - t0

    def _regions(self, traj) -> Regions:
        c = self.cfg
        return trajectory_regions(self.credit.tokenizer, traj.token_ids, traj.loss_mask, traj.prompt_len, traj.turns,
                                  traj.task.question if traj.task is not None else None, c.source,
                                  c.obs_as_source, c.answer_fallback_tokens, self.credit.eos_ids)

    def _weigh(self, i: int, score: Tensor) -> None:
        self.weights[i] = self.credit.fn(score, self.regions[i].trainable, fraction=self.cfg.top_fraction,
                                         boost=self.cfg.boost, generator=self.generator)

    def _use_flow(self, i: int, attn: Tensor) -> None:
        r, c = self.regions[i], self.cfg
        flow: Flow = throughput(attn, r.source, r.sink, r.no_inflow, c.drop_sink, c.topk_parents)
        self.flow_z[i] = flow.z
        self.pending.discard(i)
        if flow.z > 0:  # else no question-to-answer flow: weights stay 1
            self.scores[i] = {"phi": flow.phi, "h": flow.h, "alpha": flow.alpha}[c.score]
            self._weigh(i, self.scores[i])

    # ------------------------------------------------------------------ attention from a forward
    @contextlib.contextmanager
    def tap(self, model, leaves: list[tuple[int, int, Tensor]]):
        """Around a forward (rows or packed trees): weigh the pending trajectories among `leaves` — (batch
        row holding the leaf, trajectory index, (n,) indices of the leaf's tokens in that row, in order)
        — from that forward's attention, each map read over the leaf's own tokens."""
        todo = [(row, i, idx) for row, i, idx in leaves if i in self.pending]
        if not todo:
            yield
            return
        with AttentionTap(model, self.credit.layers, self.cfg.chunk_rows,
                          gather=[(row, idx) for row, _, idx in todo]) as tap:
            yield
        t0 = time.perf_counter()
        maps = tap.mean()
        tap.maps = None
        for (_, i, idx), m in zip(todo, maps):
            if len(idx) != len(self.trajs[i].token_ids):
                raise ValueError(f"trajectory {i}: {len(idx)} packed tokens for a row of {len(self.trajs[i].token_ids)}")
            self._use_flow(i, m.cpu())
        self.seconds += tap.seconds + time.perf_counter() - t0

    def hook(self, batch, model) -> "CreditHook":
        """The trainer's forward hook over a token batch whose leaves are this step's rows, in order."""
        return CreditHook(self, batch, model)

    def compute(self) -> None:
        """Weigh every pending row with separate no-grad forwards (stopped after the last chosen
        layer), `batch_size` rows at a time, longest first."""
        model, tok = self.credit.model, self.credit.tokenizer
        device = next(model.parameters()).device
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        order = sorted(self.pending, key=lambda i: -len(self.trajs[i].token_ids))
        for b0 in range(0, len(order), self.cfg.batch_size):
            t0 = time.perf_counter()
            batch = order[b0:b0 + self.cfg.batch_size]
            ids = right_pad([self.trajs[i].token_ids for i in batch], pad)
            maps = AttentionTap(model, self.credit.layers, self.cfg.chunk_rows, stop_after_last=True).run(ids.to(device))
            for j, i in enumerate(batch):
                n = len(self.trajs[i].token_ids)
                self._use_flow(i, maps[j, :n, :n].cpu())
            del maps
            self.seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ results
    def result(self) -> CreditResult:
        """Weights, metrics (credit_s: time spent on credit so far) and, if asked, report samples."""
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} rows were never seen by a tapped forward; call compute()")
        gen = [torch.tensor(t.loss_mask, dtype=torch.bool) for t in self.trajs]
        total = sum(int(g.sum()) for g in gen)
        boosted = sum(int((w[g] != 1).sum()) for w, g in zip(self.weights, gen))
        wsum = sum(float(w[g].sum()) for w, g in zip(self.weights, gen))
        metrics = {"credit_weight_mean": wsum / total if total else 1.0,
                   "credit_hub_frac": boosted / total if total else 0.0,
                   "credit_rows": float(len(self.todo)), "credit_s": self.seconds}
        if self.todo:
            metrics["credit_answer_found"] = sum(self.regions[i].answer_found for i in self.todo) / len(self.todo)
        if self.flow_z:
            metrics["credit_no_flow_rows"] = float(sum(1 for z in self.flow_z.values() if z <= 0))
        return CreditResult(self.weights, metrics, self._samples() if self.want_samples else [])

    def _samples(self) -> list[dict]:
        """A few weighted rows (fixed-seed pick) for the report: response tokens, throughput, weights."""
        scored = [i for i in self.todo if i in self.scores or not self.credit.needs_flow]
        k = min(self.cfg.log_samples, len(scored))
        pick = sorted(seeding.rng(self.credit.seed, self.step, "credit_samples").sample(scored, k))
        return [sample_record(self.credit.tokenizer, self.trajs[i], self.adv[i], self.weights[i], self.regions[i],
                              self.scores.get(i), self.step) for i in pick]


def sample_record(tokenizer, traj, advantage: float, weights: Tensor, regions, score: Tensor | None,
                  step: int) -> dict:
    """One trajectory's response as JSON-ready lists: token text, kind (g = sampled, o = observation,
    a = answer/sink), score (throughput) and weight."""
    p = traj.prompt_len
    ids = traj.token_ids[p:]
    kinds = ["a" if regions.sink[p + k] else ("g" if traj.loss_mask[p + k] else "o") for k in range(len(ids))]
    return {"step": step + 1, "task_id": traj.task.id, "question": traj.task.question,
            "gold": traj.task.answers[0] if traj.task.answers else None, "reward": traj.reward,
            "advantage": advantage, "answer_found": regions.answer_found,
            "tokens": [tokenizer.decode([t], skip_special_tokens=False) for t in ids], "kind": kinds,
            "score": [round(float(x), 6) for x in score[p:]] if score is not None else None,
            "weight": [float(x) for x in weights[p:]]}


class CreditHook:
    """Around a micro-batch forward: weigh its pending leaves from that forward's attention (each leaf's
    map over its own tokens, wherever the layout puts them); after it, hand every leaf's weights to the
    batch, which multiplies them into the leaf's advantages (`TokenBatch.set_weights`)."""

    def __init__(self, cs: CreditStep, batch, model):
        self.cs, self.batch, self.model = cs, batch, model
        self.done: set[int] = set()

    def around(self, mb):
        return self.cs.tap(self.model, [(row, leaf, seq) for row, leaf, seq in mb.tap_rows])

    def after(self, mb) -> None:
        for leaf in mb.leaves:
            if leaf not in self.done and leaf not in self.cs.pending:
                self.batch.set_weights(leaf, self.cs.weights[leaf])
                self.done.add(leaf)


def write_samples(records: list[dict], path: str | Path) -> None:
    """One sampled row per line (RUN_DIR/credit/step_XXXXXX.jsonl), written atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_samples(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
