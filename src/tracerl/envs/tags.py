"""The agent protocol's tags in model text (<think>, <search>, <answer>), found in linear time.

Model output is arbitrary: a lazy regex such as `<think>.*?</think>` rescans the rest of the text from
every unclosed tag, so 8,192 unclosed tags took 1.8 s. These scans use `str.find` and never look at a
character twice. A first <tag> that is never closed means no later one is either (every closing tag after
a later opening tag is also after the first one), which is what keeps them linear.
"""

from __future__ import annotations

from typing import Iterator


def tag_spans(text: str, tag: str) -> Iterator[tuple[int, int, int, int]]:
    """(open start, inner start, inner end, close end) of each <tag>…</tag> pair, left to right, each
    opening tag paired with the nearest closing tag after it (what `re.finditer` of the lazy pattern gives)."""
    opening, closing = f"<{tag}>", f"</{tag}>"
    pos = 0
    while (i := text.find(opening, pos)) >= 0 and (j := text.find(closing, i + len(opening))) >= 0:
        yield i, i + len(opening), j, j + len(closing)
        pos = j + len(closing)


def tag_body(text: str, tag: str) -> str | None:
    """What the first <tag>…</tag> pair holds, or None when there is none."""
    span = next(tag_spans(text, tag), None)
    return text[span[1]:span[2]] if span is not None else None


def strip_think(text: str) -> str:
    """Every closed <think>…</think> block replaced by a space; an unclosed one and the rest kept."""
    out, pos = [], 0
    for start, _, _, end in tag_spans(text, "think"):
        out += [text[pos:start], " "]
        pos = end
    out.append(text[pos:])
    return "".join(out)
