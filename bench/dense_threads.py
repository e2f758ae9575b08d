"""Benchmark: in-process latency of one dense query vs torch's intra-op thread count (BENCHMARKS §17).

One query at a time through `DenseSearch.search` over the cached index of a real-QA file's pooled
paragraphs (built by bench/dense_retrieval.py; built here if absent), split into the MiniLM forward and the
faiss search, first with torch's default thread count, then with `torch.set_num_threads(1)`.

    PYTHONPATH=src:bench .venv/bin/python bench/dense_threads.py --file /work/shared/data/real_qa/musique_ans_migres200.jsonl
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from tracerl.envs.qa_data import load_qa_file, pooled_documents
from tracerl.tools.dense import DenseSearch


def _p50_ms(fn, queries: list[str]) -> float:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t0)
    return round(sorted(times)[len(times) // 2] * 1000, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--file", required=True)
    p.add_argument("--queries", type=int, default=60)
    args = p.parse_args()
    items = [it for it in load_qa_file(args.file) if it.task.meta["gold_ids"]]
    search = DenseSearch(pooled_documents(items), 3)
    queries = [it.task.question for it in items][:args.queries]
    vector = search.encoder.embed(queries[:1])
    for threads in (torch.get_num_threads(), 1):
        torch.set_num_threads(threads)
        print(f"torch threads {threads}: search p50 {_p50_ms(lambda q: search.search(q, 5), queries)} ms, "
              f"MiniLM forward p50 {_p50_ms(lambda q: search.encoder.embed([q]), queries)} ms, "
              f"faiss p50 {_p50_ms(lambda q: search.index.search(vector, 13), queries)} ms "
              f"({len(search.docs)} paragraphs, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
