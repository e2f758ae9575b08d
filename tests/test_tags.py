"""The protocol's tags are found in linear time, with the lazy regexes' exact results."""

from __future__ import annotations

import re
import time

from hypothesis import given, settings, strategies as st

from tracerl.credit.regions import answer_span
from tracerl.envs.multihop import parse_turn
from tracerl.envs.tags import strip_think, tag_body, tag_spans

PIECES = ["<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>", "a", " ", "x y", "<", ">", "/"]
texts = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)


@settings(max_examples=400, deadline=None)
@given(texts)
def test_the_scans_agree_with_the_lazy_regexes(text):
    assert strip_think(text) == re.sub(r"<think>.*?</think>", " ", text, flags=re.DOTALL)
    for tag in ("search", "answer"):
        pattern = re.compile(f"<{tag}>(.*?)</{tag}>", re.DOTALL)
        assert [(m.start(), m.start(1), m.end(1), m.end()) for m in pattern.finditer(text)] == list(tag_spans(text, tag))
        m = pattern.search(text)
        assert tag_body(text, tag) == (m.group(1) if m else None)


def _best_time(text: str, repeats: int = 5) -> float:
    """Least wall time of parse_turn + answer_span on `text` over `repeats` runs (one run if it took over
    0.5 s: a quadratic parser fails at once instead of five times)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        parse_turn(text), answer_span(text)
        best = min(best, time.perf_counter() - t0)
        if best > 0.5:
            break
    return best


def test_thousands_of_unclosed_tags_parse_in_linear_time():
    # the lazy regexes took 1.8 s on the first of these (quadratic in the number of unclosed tags)
    for tag in ("<think>", "<search>", "<answer>"):
        small, big = tag * 2048, tag * 8192
        t_small, t_big = _best_time(small), _best_time(big)  # best of 5: a busy machine's pauses left out
        assert t_big < 0.05, (tag, t_big)
        assert t_big < 8 * max(t_small, 1e-4)  # 4x the text: about 4x the time, not 16x
        kind, why = parse_turn(big)
        assert kind == "invalid" and why in ("no_action", "unclosed_tag")
