"""Answer checking for QA-style tasks: answer normalisation, exact match and token F1, in two modes.

``tracerl`` (the default) follows the usual open-domain QA convention (lowercase, drop punctuation and the
articles a/an/the, collapse whitespace) with two additions: Unicode is NFKC-folded so full-width or
ligature characters compare equal to their plain forms, and numbers are put in a canonical form
("7.0" -> "7", "1,000" -> "1000") before punctuation is stripped, so that the decimal point of
"3.5" survives instead of turning it into "35".

``squad`` is the plain SQuAD / Search-R1 normalisation, for numbers comparable with published ones
(docs/evaluation.md): lowercase, delete ASCII punctuation, drop the whole words a/an/the, collapse
whitespace; nothing else. The config key `eval.em` picks the mode of the training reward
(`set_em_mode`); `tracerl eval` reports both.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable

# A number not glued to a preceding word: optional sign, digits with optional thousands groups,
# optional decimals. "x2" or "v1.5" are left alone (they are names, not quantities).
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d,]*\d)")
_ARTICLES = frozenset({"a", "an", "the"})

EM_MODES = ("tracerl", "squad")
_mode = "tracerl"  # the process's default mode (set_em_mode); tracerl unless a config says otherwise
_SQUAD_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SQUAD_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def set_em_mode(mode: str) -> None:
    """Make `mode` ("tracerl" or "squad") the default of exact_match / f1_score in this process."""
    global _mode
    _mode = _check_mode(mode)


def em_mode() -> str:
    """The process's default answer-matching mode."""
    return _mode


def _check_mode(mode: str) -> str:
    if mode not in EM_MODES:
        raise ValueError(f"unknown exact-match mode {mode!r}; valid: {', '.join(EM_MODES)}")
    return mode


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


def normalize_answer_squad(s: str) -> str:
    """SQuAD / Search-R1 normalisation: lowercase, delete ASCII punctuation, drop the articles
    a/an/the as whole words, collapse whitespace. No Unicode folding, no number canonicalisation."""
    if not isinstance(s, str):
        s = "" if s is None else str(s)
    s = s.lower().translate(_SQUAD_PUNCTUATION)
    return " ".join(_SQUAD_ARTICLES.sub(" ", s).split())


def normalizer(mode: str | None = None):
    """The normalisation function of `mode` (None: the process default, see set_em_mode)."""
    return normalize_answer_squad if _check_mode(mode or _mode) == "squad" else normalize_answer


def _as_list(golds: str | Iterable[str]) -> list[str]:
    return [golds] if isinstance(golds, str) else list(golds)


def exact_match(pred: str, golds: str | Iterable[str], mode: str | None = None) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0 (normalised the
    way `mode` says; None: the process default, tracerl unless set_em_mode changed it)."""
    norm = normalizer(mode)
    p = norm(pred)
    return float(any(p == norm(g) for g in _as_list(golds)))


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


def f1_score(pred: str, golds: str | Iterable[str], mode: str | None = None) -> float:
    """Token-level F1 between the normalised prediction and the best-matching gold answer (`mode` as
    for exact_match)."""
    norm = normalizer(mode)
    p = norm(pred).split()
    return max((_token_f1(p, norm(g).split()) for g in _as_list(golds)), default=0.0)
