"""Annotators: key spans in successful rollouts, error spans in failed ones (docs/distillation.md §3).

An annotator reads a trajectory's response text (`spans.ResponseText`) and returns, per leaf, one
coarse diagnostic type and character spans `[start, end)` over that text. Registry `ANNOTATORS`:

- `rule`: hand-written rules per built-in environment (`RULES`: multihop, arith), always valid.
- `self`: the current policy, greedy, with a separate prompt (online self-annotation).
- `external`: another local model (`distill.annotator_model`), same prompt and validation.
- `none`: no spans (routed distillation degenerates to plain GRPO; a control).

LLM annotators must answer with one strict JSON object (optionally inside one ```json fence):

    {"diag_type": "<label>", "spans": [{"kind": "key" | "error", "start": 0, "end": 5, "quote": "exact text"}]}

Validation (`parse_annotation`): exactly the keys diag_type and spans; the label belongs to the
taxonomy of the leaf's outcome (KEY_LABELS for successes, ERROR_LABELS for failures); a span is kept
when its kind matches the outcome and `text[start:end] == quote`, else at the first exact occurrence
of `quote`, and when it overlaps policy-generated text; other spans are dropped. Unparseable output
or a wrong schema gets one sampled retry, then counts as invalid: no spans for that leaf (it trains
with the policy-gradient term only). Model output never raises.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tracerl.backends.base import GenerationBackend, SamplingParams
from tracerl.backends.hf import HFPolicy
from tracerl.envs.answers import normalize_answer
from tracerl.envs.base import Environment, Task
from tracerl.envs.tags import tag_spans
from tracerl.distill.spans import ResponseText
from tracerl.registry import Registry

KEY_LABELS = ("key_step", "correct_retrieval", "final_answer")
ERROR_LABELS = ("retrieval_miss", "reasoning_error", "arithmetic_error", "format_error", "wrong_final")


@dataclass
class Annotation:
    diag_type: str
    key: list[tuple[int, int]] = field(default_factory=list)  # character spans (successful leaves)
    error: list[tuple[int, int]] = field(default_factory=list)  # character spans (failed leaves)
    valid: bool = True  # False: the annotator's output was unusable (counted in annotator_invalid_rate)
    dropped: int = 0  # spans of a valid answer that failed validation


@dataclass
class AnnotationItem:
    """What an annotator sees of one leaf."""

    task: Task
    success: bool
    response: ResponseText


@dataclass
class AnnotatorContext:
    env: Environment
    policy: GenerationBackend | None  # the current policy (annotator=self)
    chat_template: str = "auto"
    max_new_tokens: int = 96
    max_spans: int = 3
    model_path: str | None = None  # annotator=external
    device: str = "cpu"
    batch_size: int = 16


AnnotatorFn = Callable[[list[AnnotationItem], "torch.Generator | None"], list[Annotation]]
ANNOTATORS: Registry[Callable[[AnnotatorContext], AnnotatorFn]] = Registry("annotator")
RULES: Registry[Callable[[AnnotationItem], Annotation]] = Registry("rule annotator")


# ------------------------------------------------------------------------------------------ rules
_THINK_END = "</think>"
_NUMBER = re.compile(r"-?\d+")
_EQUATION = re.compile(r"(-?\d+)\s*([-+*/x×÷])\s*(-?\d+)\s*=\s*(-?\d+)")


def _inner(text: str, span: tuple[int, int, int, int], offset: int) -> tuple[int, int]:
    """The whitespace-stripped inside of a tag pair (`tag_spans`), as absolute character offsets."""
    a, b = span[1], span[2]
    body = text[a:b]
    a += len(body) - len(body.lstrip())
    b -= len(body) - len(body.rstrip())
    return offset + a, offset + max(a, b)


def turn_action(text: str, start: int, end: int) -> tuple[str, tuple[int, int]] | None:
    """("search" | "answer", inner span) of the first action tag after the think block of one turn
    (text[start:end]); None for a turn without exactly one kind of action."""
    seg = text[start:end]
    body_at = seg.rfind(_THINK_END)
    body_at = 0 if body_at < 0 else body_at + len(_THINK_END)
    body = seg[body_at:]
    s, a = next(tag_spans(body, "search"), None), next(tag_spans(body, "answer"), None)
    if (s is None) == (a is None):
        return None
    kind, span = ("search", s) if s is not None else ("answer", a)
    return kind, _inner(body, span, start + body_at)


@RULES.register("multihop")
def multihop_rule(item: AnnotationItem) -> Annotation:
    """Success: key = the final answer, then each search naming an entity of the gold chain (the start
    and bridge entities). Failure: error = the first search that leaves the chain (retrieval_miss) or
    else the wrong answer (wrong_final); no action to blame gives no spans (format_error)."""
    text = item.response.text
    chain = {normalize_answer(n) for n in item.task.meta.get("chain", [])}
    actions = [turn_action(text, a, b) for a, b in item.response.turns]
    if item.success:
        key = [span for act in actions if act and act[0] == "answer" for span in [act[1]]]
        hits = [act[1] for act in actions if act and act[0] == "search" and normalize_answer(text[slice(*act[1])]) in chain]
        return Annotation("correct_retrieval" if hits else "final_answer", key=key + hits)
    for act in actions:
        if act is None:
            continue
        kind, span = act
        if kind == "search" and normalize_answer(text[slice(*span)]) not in chain:
            return Annotation("retrieval_miss", error=[span])
        if kind == "answer":
            return Annotation("wrong_final", error=[span])
    return Annotation("format_error")


def _arith_ok(a: int, op: str, b: int, r: int) -> bool:
    if op == "+":
        return a + b == r
    if op == "-":
        return a - b == r
    if op in "*x×":
        return a * b == r
    return b != 0 and a == r * b  # exact division


@RULES.register("arith")
def arith_rule(item: AnnotationItem) -> Annotation:
    """Success: key = the answer number, then the equation `a op b = r` giving the gold result, then
    results equal to a gold intermediate value. Failure: error = the first equation whose arithmetic is
    wrong (arithmetic_error), else the answer (wrong_final); no answer gives no spans (format_error)."""
    text = item.response.text
    turns = item.response.turns
    if not turns:
        return Annotation("format_error")
    start, end = turns[-1]
    act = turn_action(text, start, end)
    ans_end = end
    answer = None
    if act is not None and act[0] == "answer":
        a, b = act[1]
        m = _NUMBER.search(text, a, b)
        answer = m.span() if m else (a, b)
        ans_end = a
    eqs = list(_EQUATION.finditer(text, start, ans_end))
    if item.success:
        gold = item.task.answers[0]
        steps = item.task.meta.get("steps", [])
        inter = {str(s[3]) for s in steps[:-1]}
        key = [answer] if answer else []
        final = [m.span() for m in eqs if m.group(4) == gold]
        key += final[-1:]
        key += [m.span(4) for m in eqs if m.group(4) in inter and m.group(4) != gold]
        return Annotation("final_answer", key=key)
    for m in eqs:
        a_, op, b_, r = m.groups()
        if not _arith_ok(int(a_), op, int(b_), int(r)):
            return Annotation("arithmetic_error", error=[m.span()])
    if answer is not None:
        return Annotation("wrong_final", error=[answer])
    return Annotation("format_error")


@ANNOTATORS.register("rule")
def rule_annotator(ctx: AnnotatorContext) -> AnnotatorFn:
    rule = RULES.get(ctx.env.name)

    def annotate(items: list[AnnotationItem], generator: torch.Generator | None = None) -> list[Annotation]:
        return [rule(it) for it in items]

    return annotate


@ANNOTATORS.register("none")
def no_annotator(ctx: AnnotatorContext) -> AnnotatorFn:
    def annotate(items: list[AnnotationItem], generator: torch.Generator | None = None) -> list[Annotation]:
        return [Annotation("key_step" if it.success else "wrong_final") for it in items]

    return annotate


# ------------------------------------------------------------------------------------------ LLM
def annotation_prompt(env: Environment, item: AnnotationItem, max_spans: int) -> str:
    """The annotator's instruction; offsets index the attempt text exactly as shown between the markers."""
    kind, labels = ("key", KEY_LABELS) if item.success else ("error", ERROR_LABELS)
    what = ("the steps that made it succeed" if item.success else "where it went wrong")
    example = json.dumps({"diag_type": labels[0], "spans": [{"kind": kind, "start": 0, "end": 4, "quote": "text"}]})
    return (
        f"You check one attempt of an agent at a task.\nTask: {env.user_prompt(item.task)}\n"
        f"Reference answer: {item.task.answers[0]}\nOutcome: the attempt {'succeeded' if item.success else 'failed'}.\n"
        f"Attempt (character offsets count from 0 at the first character after <<< ):\n<<<{item.response.text}>>>\n"
        f"Mark at most {max_spans} {kind} spans: {what}. Choose diag_type from: {', '.join(labels)}.\n"
        f"Reply with one JSON object only, like {example}"
    )


def _strict_json(raw: str) -> Any:
    s = raw.strip()
    fence = re.fullmatch(r"```(?:json)?\s*\n?(.*?)\n?```", s, re.DOTALL)
    if fence:
        s = fence.group(1).strip()
    try:
        return json.loads(s)
    except (json.JSONDecodeError, RecursionError):
        return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_annotation(raw: str, item: AnnotationItem, max_spans: int = 3) -> Annotation:
    """Validate an annotator's raw answer for one leaf (see the module doc). Never raises."""
    obj = _strict_json(raw)
    labels = KEY_LABELS if item.success else ERROR_LABELS
    if not isinstance(obj, dict) or set(obj) != {"diag_type", "spans"} or obj["diag_type"] not in labels \
            or not isinstance(obj["spans"], list):
        return Annotation("", valid=False)
    text, kind = item.response.text, ("key" if item.success else "error")
    generated = item.response.turns
    kept: list[tuple[int, int]] = []
    dropped = 0
    for sp in obj["spans"]:
        span = None
        if isinstance(sp, dict) and sp.get("kind") == kind and isinstance(sp.get("quote"), str) and sp["quote"]:
            q, a, b = sp["quote"], sp.get("start"), sp.get("end")
            if _is_int(a) and _is_int(b) and 0 <= a < b <= len(text) and text[a:b] == q:
                span = (a, b)
            elif (at := text.find(q)) >= 0:
                span = (at, at + len(q))
        if span is None or not any(span[0] < e and s < span[1] for s, e in generated) or len(kept) >= max_spans:
            dropped += 1
            continue
        kept.append(span)
    ann = Annotation(obj["diag_type"], dropped=dropped)
    if item.success:
        ann.key = kept
    else:
        ann.error = kept
    return ann


def _encode(tokenizer, text: str, chat_template: str) -> list[int]:
    if chat_template != "none" and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


class LLMAnnotator:
    """Greedy JSON annotation by a causal LM; one sampled retry for unusable answers."""

    def __init__(self, ctx: AnnotatorContext, policy: GenerationBackend):
        self.ctx, self.policy = ctx, policy
        self.gen_tokens = 0  # tokens the annotator generated (cost)

    def _generate(self, prompts: list[list[int]], temperature: float, generator) -> list[str]:
        out = [""] * len(prompts)
        room = self.policy.max_context - self.ctx.max_new_tokens
        todo = [i for i, p in enumerate(prompts) if len(p) <= room]  # too long: empty answer, i.e. invalid
        params = SamplingParams(self.ctx.max_new_tokens, temperature, 1.0, ())
        for k in range(0, len(todo), self.ctx.batch_size):
            chunk = todo[k:k + self.ctx.batch_size]
            gens, _ = self.policy.generate([prompts[i] for i in chunk], params, generator)
            for i, g in zip(chunk, gens):
                self.gen_tokens += len(g.token_ids)
                out[i] = self.policy.decode(g.token_ids)
        return out

    def __call__(self, items: list[AnnotationItem], generator: torch.Generator | None = None) -> list[Annotation]:
        tok = self.policy.tokenizer
        prompts = [_encode(tok, annotation_prompt(self.ctx.env, it, self.ctx.max_spans), self.ctx.chat_template)
                   for it in items]
        anns = [parse_annotation(r, it, self.ctx.max_spans) for r, it in zip(self._generate(prompts, 0.0, generator), items)]
        retry = [i for i, a in enumerate(anns) if not a.valid]
        if retry:
            raws = self._generate([prompts[i] for i in retry], 1.0, generator)
            for i, raw in zip(retry, raws):
                anns[i] = parse_annotation(raw, items[i], self.ctx.max_spans)
        return anns


@ANNOTATORS.register("self")
def self_annotator(ctx: AnnotatorContext) -> AnnotatorFn:
    if ctx.policy is None:
        raise ValueError("annotator 'self' needs the current policy")
    return LLMAnnotator(ctx, ctx.policy)


@ANNOTATORS.register("external")
def external_annotator(ctx: AnnotatorContext) -> AnnotatorFn:
    from tracerl.models.io import load_policy

    if not ctx.model_path:
        raise ValueError("annotator 'external' needs distill.annotator_model (a local model directory)")
    model, tok = load_policy(ctx.model_path)
    model.to(ctx.device).eval().requires_grad_(False)
    return LLMAnnotator(ctx, HFPolicy(model, tok, ctx.device, getattr(model.config, "max_position_embeddings", 2048)))
