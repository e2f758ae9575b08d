"""Dense and hybrid retrieval (tools/dense.py): real all-MiniLM-L6-v2 weights, a real faiss index on disk,
the real-QA environment's `retriever` option and `tracerl serve-retriever --dense` in its own process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tracerl.envs import make_env
from tracerl.envs.qa_data import load_corpus
from tracerl.errors import OptionError, TracerlError
from tracerl.tools.bm25 import BM25Search
from tracerl.tools.dense import INDEX_FILE, META_FILE, DenseSearch, HybridSearch, make_search
from tracerl.tools.retrieval_client import RetrievalClient
from tracerl.tools.retrieval_server import RetrievalServer

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]
# Paraphrases that share no indexed term with their document (BM25 finds nothing or the wrong page).
PARAPHRASES = {
    "old maritime transport company": "Ostrel Group",
    "a place famous for crossings over water": "Kesh",
    "Which lender started taking deposits in the early twentieth century?": "Kesh Trust",
}


@pytest.fixture(scope="module")
def docs():
    return load_corpus(FIXTURES / "real_qa_tiny.jsonl")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dense_index")


@pytest.fixture(scope="module")
def dense(docs, cache):
    return DenseSearch(docs, top_k=3, cache_dir=cache)


def test_dense_finds_paraphrased_documents_bm25_misses(docs, dense):
    bm25 = BM25Search(docs, top_k=3)
    for query, title in PARAPHRASES.items():
        assert dense.search(query)[0]["title"] == title, query
        assert [d["title"] for d in bm25.search(query)][:1] != [title]
    hits = dense.search("Who directed the film Glass Harbor?")
    assert hits[0]["title"] == "Glass Harbor" and set(hits[0]) == {"id", "title", "text", "score"}
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert -1.0 <= hits[-1]["score"] <= hits[0]["score"] <= 1.0  # cosine similarity


def test_batch_equals_single_and_limits(dense):
    queries = list(PARAPHRASES) + ["", "   ", 3]
    batch = dense.search_batch(queries, 2)
    assert batch[-3:] == [[], [], []]  # blank (or non-string) queries return nothing, as with BM25
    for q, hits in zip(queries, batch[:3]):
        single = dense.search(q, 2)
        assert [d["id"] for d in hits] == [d["id"] for d in single]
        assert [d["score"] for d in hits] == pytest.approx([d["score"] for d in single], abs=1e-5)
    assert len(dense.search("a village", 100)) == len(dense.docs) and dense.search("a village", 0) == []


def test_index_is_cached_reused_and_rebuilt_when_the_corpus_changes(docs, dense, cache):
    assert dense.built and (dense.index_dir / INDEX_FILE).is_file()
    meta = json.loads((dense.index_dir / META_FILE).read_text())
    assert meta["documents"] == len(docs) and dense.index_dir.parent == cache
    again = DenseSearch(docs, top_k=3, cache_dir=cache)
    assert not again.built and again.index_dir == dense.index_dir  # read back, not re-embedded
    q = list(PARAPHRASES)
    assert again.search_batch(q) == dense.search_batch(q)
    changed = [dict(d) for d in docs]
    changed[0]["text"] = "Glass Harbor is a 1994 comedy film directed by Marta Quenell."
    rebuilt = DenseSearch(changed, top_k=3, cache_dir=cache)
    assert rebuilt.built and rebuilt.index_dir != dense.index_dir
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == \
           sorted([dense.index_dir.name, rebuilt.index_dir.name])
    # a damaged index file is not trusted: it is rebuilt and replaced
    (rebuilt.index_dir / INDEX_FILE).write_bytes(b"not a faiss index")
    repaired = DenseSearch(changed, top_k=3, cache_dir=cache)
    assert repaired.built and repaired.search_batch(q) == rebuilt.search_batch(q)
    assert not DenseSearch(changed, top_k=3, cache_dir=cache).built


def test_hybrid_fuses_both_rankings(docs, dense):
    hybrid = HybridSearch(BM25Search(docs, 3), dense, 3)
    # lexical-only and paraphrase-only matches both come first
    assert hybrid.search("Brask Cathedral")[0]["title"] == "Brask Cathedral"
    assert hybrid.search("old maritime transport company")[0]["title"] == "Ostrel Group"
    hits = hybrid.search("Who directed the film Glass Harbor?", 5)
    assert hits[0]["title"] == "Glass Harbor" and hits[0]["score"] == pytest.approx(2 / 61)  # rank 1 in both
    with pytest.raises(ValueError, match="same documents"):
        HybridSearch(BM25Search(docs[:3], 3), dense, 3)


def test_subset_reuses_vectors(dense):
    ids = [d["id"] for d in dense.docs[4:7]]  # Ostrel Group, Kesh Trust, Kesh
    sub = dense.subset(ids, top_k=1)
    assert [d["id"] for d in sub.docs] == ids and not sub.built
    assert sub.search("a bank")[0]["title"] == "Kesh Trust"
    with pytest.raises(ValueError, match="not in this index"):
        dense.subset(["nope"])


def test_real_qa_env_retriever_option(cache, monkeypatch):
    monkeypatch.setenv("TRACERL_CACHE", str(cache))
    for retrieval in ("pooled", "per_question"):
        for kind in ("dense", "hybrid"):
            env = make_env("real_qa", test_files=str(FIXTURES / "real_qa_tiny.jsonl"), retriever=kind,
                           retrieval=retrieval, top_k=2)
            task = env.tasks("test")[1]  # Ostrel Group vs Kesh Trust
            observation, ids = env.search(task.meta, "the oldest savings bank")
            assert "Doc 1 (Kesh Trust)" in observation, (retrieval, kind, observation)
            if retrieval == "per_question":  # only this question's paragraphs are searched
                allowed = {p["id"] for p in env._items[task.meta["file"]][task.meta["row"]].paragraphs}
                assert set(ids) <= allowed
    env = make_env("real_qa", test_files=str(FIXTURES / "real_qa_tiny.jsonl"), corpus=str(FIXTURES / "search_r1_corpus.jsonl"),
                   retriever="dense", top_k=1)
    assert env.search(env.tasks("test")[0].meta, "old maritime transport company")[1] == ("4",)


@pytest.mark.parametrize("options, message", [
    ({"retriever": "colbert"}, "config key 'env.options.retriever': must be 'bm25', 'dense' or 'hybrid', got 'colbert'"),
    ({"retriever": "dense", "retriever_url": "http://127.0.0.1:8000"},
     "env.options.retriever=dense picks the in-process search tool, but env.options.retriever_url"),
])
def test_bad_retriever_options_are_one_line_errors(options, message):
    from tracerl.envs import check_options

    with pytest.raises(TracerlError) as e:
        check_options("real_qa", {"test_files": "t.jsonl", **options}, max_turns=4)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(OptionError, match="unknown retriever 'colbert'; valid: bm25, dense, hybrid"):
        make_search("colbert", [], 3)


def test_missing_faiss_is_a_one_line_error(docs, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # what `import faiss` sees when it is not installed
    with pytest.raises(TracerlError, match=r"needs the optional package faiss-cpu \(pip install 'tracerl\[dense\]'\)"):
        DenseSearch(docs, cache=False)


def test_server_with_dense_search_answers_search_r1_requests(docs, dense):
    server = RetrievalServer(docs, "127.0.0.1", 0, top_k=3, search=dense)
    import threading

    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        assert requests.get(server.url + "/health", timeout=5).json() == \
               {"status": "ok", "documents": len(docs), "retriever": "dense"}
        client = RetrievalClient(server.url, top_k=3)
        served = client.search_batch(list(PARAPHRASES))
        local = dense.search_batch(list(PARAPHRASES))
        assert [[d["id"] for d in q] for q in served] == [[d["id"] for d in q] for q in local]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_retriever_dense_command(tmp_path):
    """`tracerl serve-retriever --dense` in its own process answers Search-R1's payload and caches its index."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TRACERL_CACHE": str(tmp_path)}
    cmd = [sys.executable, "-m", "tracerl.cli", "serve-retriever", "--corpus", str(FIXTURES / "search_r1_corpus.jsonl"),
           "--port", str(port), "--top-k", "2", "--dense"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving 15 documents from" in line and f"(dense) at http://127.0.0.1:{port}/retrieve (top-k 2)" in line, \
            line + proc.stderr.read() if proc.poll() is not None else line
        body = {"queries": list(PARAPHRASES), "topk": 1, "return_scores": True}
        result = requests.post(f"http://127.0.0.1:{port}/retrieve", json=body, timeout=30).json()["result"]
        assert [q[0]["document"]["title"] for q in result] == list(PARAPHRASES.values())
        assert result[0][0]["document"]["contents"].startswith('"Ostrel Group"\n') and 0 < result[0][0]["score"] <= 1
    finally:
        proc.terminate()
        proc.wait(10)
    assert len(list((tmp_path / "dense_index").glob("*/" + INDEX_FILE))) == 1  # built once, kept for the next start


def test_serve_retriever_refuses_two_retrievers(capsys):
    from tracerl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve-retriever", "--corpus", "c.jsonl", "--dense", "--hybrid"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "argument --hybrid: not allowed with argument --dense" in err
