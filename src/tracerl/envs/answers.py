"""Answer checking for QA-style tasks: SQuAD-style normalisation, exact match and token F1.

The normalisation follows the usual open-domain QA convention (lowercase, drop punctuation and the
articles a/an/the, collapse whitespace) with two additions: Unicode is NFKC-folded so full-width or
ligature characters compare equal to their plain forms, and numbers are put in a canonical form
("7.0" -> "7", "1,000" -> "1000") before punctuation is stripped, so that the decimal point of
"3.5" survives instead of turning it into "35".
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

# A number not glued to a preceding word: optional sign, digits with optional thousands groups,
# optional decimals. "x2" or "v1.5" are left alone (they are names, not quantities).
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d,]*\d)")
_ARTICLES = frozenset({"a", "an", "the"})


def _canonical_number(text: str) -> str:
    """'1,000.50' -> '1000.5', '7.0' -> '7', '-0' -> '0'."""
    text = text.replace(",", "")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text


def _strip_punctuation(text: str) -> str:
    # Unicode categories P* (punctuation) and S* (symbols) cover ASCII punctuation as well as
    # typographic quotes, dashes and currency signs.
    return "".join(ch for ch in text if not unicodedata.category(ch)[0] in "PS")


def normalize_answer(s: str) -> str:
    """Lowercase, canonicalise numbers, strip punctuation and articles, collapse whitespace."""
    if not isinstance(s, str):
        s = "" if s is None else str(s)
    s = unicodedata.normalize("NFKC", s).casefold()
    pieces, last = [], 0
    for m in _NUMBER.finditer(s):
        pieces.append(_strip_punctuation(s[last : m.start()]))
        pieces.append(" " + _canonical_number(m.group()) + " ")
        last = m.end()
    pieces.append(_strip_punctuation(s[last:]))
    tokens = "".join(pieces).split()
    return " ".join(t for t in tokens if t not in _ARTICLES)


def _as_list(golds: str | Iterable[str]) -> list[str]:
    return [golds] if isinstance(golds, str) else list(golds)


def exact_match(pred: str, golds: str | Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in _as_list(golds)))


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        # Two empty answers agree; an empty answer against a non-empty one shares nothing.
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str, golds: str | Iterable[str]) -> float:
    """Token-level F1 between the normalised prediction and the best-matching gold answer."""
    p = normalize_answer(pred).split()
    return max((_token_f1(p, normalize_answer(g).split()) for g in _as_list(golds)), default=0.0)
