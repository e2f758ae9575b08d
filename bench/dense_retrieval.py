"""Benchmark: BM25 vs dense vs hybrid retrieval on the real-QA evaluation files (BENCHMARKS §17).

For each evaluation file (`*_migres*`: HotpotQA dev, MuSiQue-Ans, 2WikiMultihopQA; used here only to
measure retrieval) the question text alone is the query, and the searched documents are either all
distinct paragraphs of that file (`pooled`, the real-QA environment's default) or the question's own
paragraphs (`per_question`, the distractor setting). Reported per file and retriever: gold-paragraph
recall@3 and @5 (share of a question's gold paragraphs among the top k, averaged over questions); the
time to build the dense index (embedding every paragraph) and to read it back from the cache; latency
p50 / p99 of one in-process search; and the same through `tracerl serve-retriever [--dense|--hybrid]`
in its own process (one client, one query per request, keep-alive), over the largest file's paragraphs.

    PYTHONPATH=src:bench .venv/bin/python bench/dense_retrieval.py --data /work/shared/data/real_qa
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from tracerl.envs.qa_data import load_corpus, load_qa_file, pooled_documents
from tracerl.tools.bm25 import BM25Search
from tracerl.tools.dense import RETRIEVERS, DenseSearch, HybridSearch, default_cache_dir
from tracerl.tools.retrieval_client import RetrievalClient

from _results import save_result  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
EVAL_FILES = ("hotpotqa_dev_migres200.jsonl", "musique_ans_migres200.jsonl", "2wikimultihopqa_migres164.jsonl")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {"n": len(ms), "p50_ms": round(_percentile(ms, 0.5), 2), "p99_ms": round(_percentile(ms, 0.99), 2)}


def _recall(hits: list[dict], gold: list[str], k: int) -> float:
    found = {d["id"] for d in hits[:k]}
    return sum(g in found for g in gold) / len(gold)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _indexes(docs: list[dict], top_k: int) -> tuple[dict, dict]:
    """{retriever: search} over docs, and the dense index's build / cache-read seconds."""
    bm25 = BM25Search(docs, top_k)
    t0 = time.perf_counter()
    dense = DenseSearch(docs, top_k)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = DenseSearch(docs, top_k)
    read = time.perf_counter() - t0
    timing = {"dense_first_s": round(first, 2), "dense_first_built": dense.built,
              "dense_cached_read_s": round(read, 3), "cached_read_built": again.built}
    return {"bm25": bm25, "dense": dense, "hybrid": HybridSearch(bm25, dense, top_k)}, timing


def _file_result(path: Path, top_k: int) -> dict:
    items = [it for it in load_qa_file(path) if it.task.meta["gold_ids"]]
    docs = pooled_documents(items)
    indexes, timing = _indexes(docs, top_k)
    out: dict = {"questions": len(items), "paragraphs": len(docs), **timing, "pooled": {}, "per_question": {}}
    queries = [it.task.question for it in items]
    for kind, search in indexes.items():
        hits, lat = [], []
        for q in queries:
            t0 = time.perf_counter()
            hits.append(search.search(q, 5))
            lat.append(time.perf_counter() - t0)
        out["pooled"][kind] = {
            "recall@3": round(sum(_recall(h, it.task.meta["gold_ids"], 3) for h, it in zip(hits, items)) / len(items), 4),
            "recall@5": round(sum(_recall(h, it.task.meta["gold_ids"], 5) for h, it in zip(hits, items)) / len(items), 4),
            "latency": _ms(lat)}
    for kind in RETRIEVERS:  # the distractor setting: each question's own paragraphs
        r3 = r5 = 0.0
        for it in items:
            own = [{k: p[k] for k in ("id", "title", "text")} for p in it.paragraphs]
            bm25 = BM25Search(own, top_k)
            dense = indexes["dense"].subset([d["id"] for d in own]) if kind != "bm25" else None
            search = bm25 if kind == "bm25" else dense if kind == "dense" else HybridSearch(bm25, dense, top_k)
            h = search.search(it.task.question, 5)
            r3 += _recall(h, it.task.meta["gold_ids"], 3)
            r5 += _recall(h, it.task.meta["gold_ids"], 5)
        out["per_question"][kind] = {"recall@3": round(r3 / len(items), 4), "recall@5": round(r5 / len(items), 4)}
    return out


def _served(corpus: Path, queries: list[str], kind: str, requests: int, top_k: int) -> dict:
    port = _free_port()
    cmd = [sys.executable, "-m", "tracerl.cli", "serve-retriever", "--corpus", str(corpus), "--port", str(port),
           "--top-k", str(top_k)] + ([] if kind == "bm25" else [f"--{kind}"])
    t0 = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    try:
        banner = server.stdout.readline().strip()
        startup = time.perf_counter() - t0
        if not banner:
            raise RuntimeError(f"serve-retriever did not start: {server.stderr.read()[-500:]}")
        client = RetrievalClient(f"http://127.0.0.1:{port}", top_k=top_k, retries=0, timeout=30)
        for q in queries[:10]:  # warm-up
            client.search(q)
        lat = []
        for i in range(requests):
            t0 = time.perf_counter()
            client.search(queries[i % len(queries)])
            lat.append(time.perf_counter() - t0)
        client.close()
    finally:
        server.terminate()
        server.wait(10)
    return {"banner": banner, "startup_s": round(startup, 2), **_ms(lat)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "real_qa"), help="the real_qa data directory")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--requests", type=int, default=300, help="requests per served retriever")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "dense_retrieval.json"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    data = Path(args.data)
    files = {name: _file_result(data / name, args.top_k) for name in EVAL_FILES}
    largest = max(files, key=lambda n: files[n]["paragraphs"])
    queries = [it.task.question for name in EVAL_FILES for it in load_qa_file(data / name)]
    served = {kind: _served(data / largest, queries, kind, args.requests, args.top_k) for kind in RETRIEVERS}
    assert len(load_corpus(data / largest)) == files[largest]["paragraphs"]

    result = {
        "benchmark": "dense_retrieval", "data": str(data), "top_k": args.top_k, "files": files,
        "served": {"corpus": largest, "paragraphs": files[largest]["paragraphs"], **served},
        "index_cache": str(default_cache_dir()),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1min": round(os.getloadavg()[0], 2)},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    save_result(result, args.out, args.json)
    for name, r in files.items():
        print(f"{name}: {r['questions']} questions, {r['paragraphs']} paragraphs; dense index built in "
              f"{r['dense_first_s']} s (built={r['dense_first_built']}), read back in {r['dense_cached_read_s']} s")
        for kind in RETRIEVERS:
            pooled, own = r["pooled"][kind], r["per_question"][kind]
            print(f"  {kind:6s} pooled R@3 {pooled['recall@3']:.3f} R@5 {pooled['recall@5']:.3f} | per-question "
                  f"R@3 {own['recall@3']:.3f} R@5 {own['recall@5']:.3f} | in-process p50 "
                  f"{pooled['latency']['p50_ms']} ms p99 {pooled['latency']['p99_ms']} ms")
    for kind in RETRIEVERS:
        s = served[kind]
        print(f"served {kind:6s} over {largest}: start-up {s['startup_s']} s, p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms")


if __name__ == "__main__":
    main()
