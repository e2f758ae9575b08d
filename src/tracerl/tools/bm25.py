"""BM25 search over a small in-memory corpus (the built-in environments' search tool).

Built on `bm25s` with English stopwords and the PyStemmer Snowball stemmer. Each document is indexed
as its title followed by its text, so a search for an entity's name favours that entity's own page.
Ranking is fully deterministic: equal scores are broken by corpus order, and documents that share
no term with the query are never returned.
"""

from __future__ import annotations

from typing import Any

import bm25s
import numpy as np
import Stemmer


def checked_docs(docs: list[dict[str, Any]], top_k: int) -> list[dict[str, Any]]:
    """The corpus as {id, title, text} dicts, after checking `top_k` ≥ 1 and every document's keys
    (ValueError naming the first bad one); shared by the BM25 and dense retrievers."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    for i, doc in enumerate(docs):
        missing = {"id", "title", "text"} - set(doc)
        if missing:
            raise ValueError(f"document {i} lacks keys {sorted(missing)} (needs id, title, text)")
    return [{"id": d["id"], "title": d["title"], "text": d["text"]} for d in docs]


class BM25Search:
    """Top-k BM25 retrieval over documents given as dicts with keys id, title, text."""

    def __init__(self, docs: list[dict[str, Any]], top_k: int = 3):
        self.docs = checked_docs(docs, top_k)
        self.top_k = top_k
        self._stemmer = Stemmer.Stemmer("english")
        self._index = bm25s.BM25()
        if self.docs:
            corpus = self._tokenize([f"{d['title']} {d['text']}" for d in self.docs])
            self._index.index(corpus, show_progress=False)

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return bm25s.tokenize(
            texts, stopwords="en", stemmer=self._stemmer, return_ids=False, show_progress=False
        )

    def _rank(self, tokens: list[str], k: int) -> list[dict[str, Any]]:
        ids = self._index.get_tokens_ids(tokens) if self.docs else []
        if not ids or k <= 0:
            return []
        scores = self._index.get_scores_from_ids(ids)
        hits = np.flatnonzero(scores > 0)
        # lexsort: the last key is the primary one -> by descending score, then by corpus order.
        order = hits[np.lexsort((hits, -scores[hits]))][:k]
        return [{**self.docs[i], "score": float(scores[i])} for i in order]

    def search(self, query: str, k: int | None = None) -> list[dict[str, Any]]:
        """The k best documents (default top_k) as dicts with id, title, text, score."""
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: list[str], k: int | None = None) -> list[list[dict[str, Any]]]:
        """`search` for several queries at once (tokenised in one pass)."""
        k = self.top_k if k is None else k
        texts = [q if isinstance(q, str) else "" for q in queries]
        if not texts:
            return []
        return [self._rank(tokens, k) for tokens in self._tokenize(texts)]
