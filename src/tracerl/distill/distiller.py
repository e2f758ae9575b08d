"""The trainer's view of routed self-distillation: per step, annotate -> route -> teacher -> loss.

`Distiller.prepare(batch, step)` runs once per update: λ(step), annotations (successes get key
spans; failures error spans when they are used), the token masks of the three channels and the
teacher sequences, all in the token batch's leaf-major matrix. The objective takes the policy-gradient
channel from `DistillBatch.pg_mask` and adds `DistillBatch.loss(...)` per micro-batch: the teacher pass
for the leaves that route tokens to a KL, and their KL terms. At λ = 0 nothing is annotated and no
teacher runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from typing import Any

import torch
from torch import Tensor

from tracerl import seeding
from tracerl.algos.distill import kl_weight_at, route_masks, routed_kl
from tracerl.backends.base import GenerationBackend
from tracerl.config import Config, ConfigError
from tracerl.distill.annotate import ANNOTATORS, RULES, Annotation, AnnotationItem, AnnotatorContext
from tracerl.distill.spans import ResponseText, response_text, spans_to_tokens
from tracerl.distill.teacher import TeacherSequence, privileged_note, teacher_logprobs, teacher_sequence
from tracerl.envs.base import Environment
from tracerl.tree import Leaf


def schedule_lengths(cfg: Config) -> tuple[int, int, int]:
    """(warm-up, hold, anneal) steps; None fields take the defaults of docs/distillation.md §7 (10% / 40% of trainer.steps)."""
    d, S = cfg.distill, cfg.trainer.steps
    warm = d.warmup_steps if d.warmup_steps is not None else round(0.1 * S)
    anneal = d.anneal_steps if d.anneal_steps is not None else round(0.4 * S)
    return warm, d.hold_steps, anneal


def capped_tokens(response: ResponseText, spans: list[tuple[int, int]], max_spans: int, max_frac: float) -> list[int]:
    """Response-token indices of the spans, taken in order while at most `max_spans` spans and
    `max_frac` of the generated tokens are covered; a span that would break a cap is skipped."""
    chosen: set[int] = set()
    limit, used = max_frac * response.n_generated, 0
    for span in spans:
        if used >= max_spans:
            break
        toks = set(spans_to_tokens(response, [span]))
        if not toks or len(chosen | toks) > limit:
            continue
        chosen |= toks
        used += 1
    return sorted(chosen)


@dataclass
class DistillBatch:
    """Routing of one update's leaves, in the leaf-major matrix (N, n_max) of its token batch: row ℓ,
    column k is leaf ℓ's k-th sampled token (`TokenBatch.sampled_pos`)."""

    distiller: "Distiller"
    weight: float
    pg: Tensor  # (N, n_max) tokens of the policy-gradient channel
    fkl: Tensor  # (N, n_max) forward-KL (key span) tokens
    rkl: Tensor  # (N, n_max) reverse-KL (error span) tokens
    teacher: list[TeacherSequence | None]  # per leaf; None: the leaf routes nothing to a KL
    sampled_pos: list[Tensor]  # per leaf: positions of its sampled tokens in its own sequence
    metrics: dict[str, float] = field(default_factory=dict)
    teacher_s: float = 0.0
    # Under torchrun: the teacher pass runs on this (unsharded) model instead of the one being trained,
    # and the KL channels divide by token counts summed over ranks (`counts`, then set by the trainer).
    teacher_model: Any = None
    global_counts: Tensor | None = None

    def pg_mask(self, leaves: list[int]) -> Tensor:
        return self.pg[leaves]

    def counts(self, leaves: list[int]) -> Tensor:
        """(forward-KL tokens, reverse-KL tokens) of these leaves: the KL channels' denominators."""
        return torch.stack([self.fkl[leaves].sum(), self.rkl[leaves].sum()]).float()

    def loss(self, model, mb, logits: Tensor, den_leaves: list[int], stats: dict[str, list[float]]) -> Tensor:
        """The teacher channels of a micro-batch: logits (n, n_max, V) are the student's at its leaves'
        sampled tokens (policy temperature); `den_leaves` are the mini-batch's leaves (denominators)."""
        d = self.distiller
        fm, rm = self.fkl[mb.leaves].to(logits.device), self.rkl[mb.leaves].to(logits.device)
        teacher = None
        routed = [j for j, i in enumerate(mb.leaves) if self.teacher[i] is not None]
        if self.weight > 0 and routed and bool((fm + rm).sum() > 0):
            t0 = time.perf_counter()
            seqs = [self.teacher[mb.leaves[j]] for j in routed]
            tlp = teacher_logprobs(self.teacher_model if self.teacher_model is not None else model, seqs, max(s.student_len for s in seqs) - 1, pad_id=d.pad_id,
                                   temperature=d.temperature, device=d.device, bf16=d.bf16)
            V = logits.shape[-1]
            teacher = torch.full_like(logits, -torch.log(torch.tensor(float(V))).item())
            for r, j in enumerate(routed):
                t = self.sampled_pos[mb.leaves[j]] - 1  # the target index of each sampled token
                teacher[j, : t.numel()] = tlp[r, t.to(tlp.device), :V].to(logits.device)
            self.teacher_s += time.perf_counter() - t0
        counts = self.counts(den_leaves) if self.global_counts is None else self.global_counts
        counts = counts.clamp(min=1).to(logits.device)
        loss, kst = routed_kl(fm, rm, logits, teacher, weight=self.weight, topk=d.cfg.topk,
                              fkl_denominator=counts[0], rkl_denominator=counts[1])
        for k in ("kl_key", "kl_error"):
            if k in kst:
                stats.setdefault(k, []).append(kst[k])
        return loss

    def summary(self) -> dict[str, float]:
        return {**self.metrics, "teacher_s": self.teacher_s}


class Distiller:
    """Built by the trainer when distill.mode != off."""

    def __init__(self, cfg: Config, env: Environment, policy: GenerationBackend, temperature: float = 1.0,
                 max_positions: int | None = None):
        """`policy` samples the self-annotator's notes; `max_positions`: the trained model's position limit
        (teacher sequences longer than that are cut)."""
        d = cfg.distill
        self.cfg, self.full, self.env, self.policy = d, cfg, env, policy
        self.tokenizer = policy.tokenizer
        self.pad_id, self.temperature = policy.pad_id, temperature
        self.device, self.bf16 = cfg.run.device, cfg.trainer.bf16
        self.schedule = schedule_lengths(cfg)
        if d.annotator not in ANNOTATORS:
            raise ConfigError(f"config key 'distill.annotator': unknown name {d.annotator!r}; valid: {', '.join(ANNOTATORS.names())}")
        if d.mode == "routed" and d.annotator == "rule" and env.name not in RULES:
            raise ConfigError(f"distill.annotator=rule has no rules for environment {env.name!r} (rules: "
                              f"{', '.join(RULES.names())}); use distill.annotator=self or external")
        self.annotate = None
        self.annotator_gen_tokens = 0
        if d.mode == "routed":
            ctx = AnnotatorContext(env, policy, cfg.model.chat_template, d.annotator_max_tokens, d.max_spans,
                                   d.annotator_model, cfg.run.device, cfg.rollout.batch_size)
            self.annotate = ANNOTATORS.get(d.annotator)(ctx)
        self.max_teacher_len = int(max_positions) if max_positions else 1 << 30

    def weight(self, step: int) -> float:
        return kl_weight_at(step, self.cfg.kl_weight, *self.schedule)

    def _annotations(self, trajs: list[Leaf], responses: list[ResponseText], step: int) -> list[Annotation | None]:
        """One annotation per row that can route something (successes; failures when RKL is on)."""
        want = [i for i, t in enumerate(trajs) if t.reward > 0 or self.cfg.reverse_kl_on_errors]
        items = [AnnotationItem(trajs[i].task, trajs[i].reward > 0, responses[i]) for i in want]
        gen = seeding.generator(self.full.run.seed, step, "annotator")
        out: list[Annotation | None] = [None] * len(trajs)
        before = getattr(self.annotate, "gen_tokens", 0)
        for i, ann in zip(want, self.annotate(items, gen) if items else []):
            out[i] = ann
        self.annotator_gen_tokens = getattr(self.annotate, "gen_tokens", 0) - before
        return out

    def prepare(self, batch, step: int) -> DistillBatch:
        """λ(step), annotations, routing and teacher sequences of a `TokenBatch`'s leaves."""
        d = self.cfg
        trajs = batch.leaves
        w = self.weight(step)
        L = max(len(t.token_ids) for t in trajs)
        mask = torch.zeros(len(trajs), L)
        key, error = torch.zeros(len(trajs), L), torch.zeros(len(trajs), L)
        for i, t in enumerate(trajs):
            mask[i, : len(t.loss_mask)] = torch.tensor(t.loss_mask, dtype=torch.float32)
        teacher: list[TeacherSequence | None] = [None] * len(trajs)
        m = {"distill_weight": w, "annotate_s": 0.0, "annotator_invalid_rate": 0.0, "key_token_frac": 0.0,
             "error_token_frac": 0.0, "teacher_rows": 0.0, "teacher_too_long": 0.0}
        diags = [("success" if t.reward > 0 else "failure") for t in trajs]  # annotators refine these
        if w > 0:
            t0 = time.perf_counter()
            if d.mode == "routed":
                responses = [response_text(self.tokenizer, t.token_ids, t.loss_mask, t.prompt_len) for t in trajs]
                anns = self._annotations(trajs, responses, step)
                done = [a for a in anns if a is not None]
                m["annotator_invalid_rate"] = sum(not a.valid for a in done) / max(1, len(done))
                m["annotated_leaves"] = float(len(done))
                m["annotator_spans_dropped"] = float(sum(a.dropped for a in done))
                for i, (t, a, r) in enumerate(zip(trajs, anns, responses)):
                    if a is None or not a.valid:
                        continue
                    diags[i] = a.diag_type
                    for spans, target in ((a.key, key), (a.error, error)):
                        for k in capped_tokens(r, spans, d.max_spans, d.max_span_frac):
                            target[i, t.prompt_len + k] = 1.0
                m["annotator_gen_tokens"] = float(self.annotator_gen_tokens)
                # the part sampled by the policy itself (annotator=self): generation the trainer adds to
                # gen_tokens / cum_gen_tokens, the cost equal-cost comparisons use (docs/cost.md §9)
                m["annotator_policy_tokens"] = float(self.annotator_gen_tokens if d.annotator == "self" else 0)
            m["annotate_s"] = time.perf_counter() - t0
        tmask = mask[:, 1:]
        pg_mask, fkl_mask, rkl_mask = route_masks(d.mode, tmask, key[:, 1:], error[:, 1:], weight=w,
                                                  reverse_on_errors=d.reverse_kl_on_errors,
                                                  pg_on_distilled=d.all_tokens_pg)
        for i, t in enumerate(trajs):
            if (fkl_mask[i].sum() + rkl_mask[i].sum()) == 0:
                continue
            note = privileged_note(self.env, t.task, d.teacher_context, diags[i] if d.teacher_diagnosis else None)
            seq = teacher_sequence(self.tokenizer, self.env, t.task, t.token_ids, t.prompt_len, note,
                                   self.full.model.chat_template)
            if len(seq.ids) > self.max_teacher_len:  # no room for the note: this row keeps the PG term only
                pg_mask[i], fkl_mask[i], rkl_mask[i] = tmask[i], 0.0, 0.0
                m["teacher_too_long"] += 1
                continue
            teacher[i] = seq
        m["teacher_rows"] = float(sum(s is not None for s in teacher))
        gen = tmask.sum().clamp(min=1)  # routed shares of the generated tokens (all_tokens: key = every token)
        m["key_token_frac"], m["error_token_frac"] = float(fkl_mask.sum() / gen), float(rkl_mask.sum() / gen)
        pg, fkl, rkl = (to_leaf_matrix(x, batch.sampled_pos, batch.mask.shape[1]) for x in (pg_mask, fkl_mask, rkl_mask))
        return DistillBatch(self, w, pg, fkl, rkl, teacher, batch.sampled_pos, m)


def to_leaf_matrix(shifted: Tensor, sampled_pos: list[Tensor], n_max: int) -> Tensor:
    """A (B, L − 1) mask over target positions -> the leaf-major (B, n_max) matrix of sampled tokens
    (the token at sequence position p is the target at position p − 1)."""
    out = torch.zeros(shifted.shape[0], n_max, dtype=shifted.dtype)
    for i, pos in enumerate(sampled_pos):
        out[i, : pos.numel()] = shifted[i, pos - 1]
    return out
