"""Where the flow starts and ends in one trajectory: question tokens (source) and answer tokens (sink).

A trajectory is the prompt (tokens 0..p−1), then turns of sampled tokens, each followed by its
observation tokens. Regions (docs/flowtracer.md §2):

* source Q: the tokens of the task's question inside the user prompt (`source = question`), found
  by locating the question text in the decoded prompt; if the template changed the text beyond
  recognition, the whole prompt. `source = prompt`: every prompt token. `obs_as_source` adds the
  observation tokens (they then receive no edges, like the prompt).
* sink Ans: the content of the last `<answer>…</answer>` (else the last `\\boxed{…}`) in the final
  turn's sampled tokens; when the final turn has none (a truncated or malformed episode), the last
  `fallback_tokens` sampled tokens (EOS excluded).

Text offsets are mapped to tokens by decoding prefixes (binary search, so O(log n) decodes); a
multi-byte character split over tokens can shift a boundary by one token, never more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tracerl.envs.tags import tag_spans

_BOXED = "\\boxed{"


@dataclass
class Regions:
    source: Tensor  # (N,) bool: Q
    sink: Tensor  # (N,) bool: Ans
    no_inflow: Tensor  # (N,) bool: tokens that receive no edges (prompt, sources)
    trainable: Tensor  # (N,) bool: sampled tokens that may be weighted (loss mask 1, EOS excluded)
    answer_found: bool  # False: the sink is the fallback span


def _decoded_len(tokenizer, ids: list[int], k: int) -> int:
    if k <= 0:
        return 0
    return len(tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False))


def char_span_to_tokens(tokenizer, ids: list[int], start: int, end: int) -> tuple[int, int]:
    """[first, last) token indices of `ids` whose decoded text overlaps characters [start, end) of
    decode(ids); empty span if none do."""
    if end <= start:
        return 0, 0

    def first_k(pred) -> int:  # smallest k in [0, n] with pred(k), pred monotone
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if pred(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    first = first_k(lambda k: _decoded_len(tokenizer, ids, k + 1) > start)  # token k ends after start
    last = first_k(lambda k: _decoded_len(tokenizer, ids, k) >= end)  # tokens before k cover end
    return first, max(first, last)


def _boxed_span(text: str) -> tuple[int, int] | None:
    at = text.rfind(_BOXED)
    if at < 0:
        return None
    depth, i = 1, at + len(_BOXED)
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return at + len(_BOXED), i
        i += 1
    return None


def answer_span(text: str) -> tuple[int, int] | None:
    """Character span of the final answer in a turn's text: the last <answer> content (its tags
    if it is empty), else the last \\boxed{} content; None if there is none."""
    last = None
    for last in tag_spans(text, "answer"):
        pass
    if last is not None:
        start, a, b, end = last
        return (a, b) if b > a else (start, end)
    return _boxed_span(text)


def trajectory_regions(tokenizer, token_ids: list[int], loss_mask: list[int], prompt_len: int,
                       turns: list[dict], question: str | None, source: str = "question",
                       obs_as_source: bool = False, fallback_tokens: int = 16,
                       eos_ids: set[int] | frozenset[int] = frozenset()) -> Regions:
    n = len(token_ids)
    mask = torch.tensor(loss_mask, dtype=torch.bool)
    trainable = mask & ~torch.tensor([t in eos_ids for t in token_ids], dtype=torch.bool)
    prompt = torch.zeros(n, dtype=torch.bool)
    prompt[:prompt_len] = True
    src = prompt.clone()
    if source == "question" and question:
        ids = token_ids[:prompt_len]
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        at = text.rfind(question)
        if at >= 0:
            a, b = char_span_to_tokens(tokenizer, ids, at, at + len(question))
            if b > a:
                src = torch.zeros(n, dtype=torch.bool)
                src[a:b] = True
    elif source not in ("question", "prompt"):
        raise ValueError(f"unknown flow source {source!r}; valid: question, prompt")
    observation = ~mask & ~prompt
    if obs_as_source:
        src |= observation
    sink = torch.zeros(n, dtype=torch.bool)
    found = False
    if turns:
        a, b = turns[-1]["span"][:2]
        ids = token_ids[a:b]
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        span = answer_span(text)
        if span is not None:
            lo, hi = char_span_to_tokens(tokenizer, ids, *span)
            if hi > lo:
                sink[a + lo:a + hi] = True
                found = True
    if not found and fallback_tokens > 0:
        gen = trainable.nonzero().flatten()
        sink[gen[-fallback_tokens:]] = True
    return Regions(src, sink, prompt | src, trainable, found)
