"""Benchmark: the retrieval server under a burst of clients while hundreds of connections stall.

A server implementation (a `retrieval_server.py` file: this tree's, or an older one saved with
`git show`) runs in its own process on 127.0.0.1 over a corpus file. Two phases, each C client threads
(default 200) sending R requests (default 10) back to back with one keep-alive connection each, one
question per request (Search-R1's payload):

1. the load alone;
2. the same load while S stalled connections (default 300) are held open: half send nothing, half
   send half a request head and then nothing. A keeper thread reopens any the server closes, so S stay
   open for the whole phase (what a slowloris client does); after the load they are held `--hold`
   seconds more, to see whether the server ever lets them go.

Reported per phase: failed requests, latency p50 / p99 / max, throughput; and the server's thread
count (peak, from /proc), how many stalled connections the server closed and after how long, and
how long the server took to exit on SIGTERM (and with which status).

    git show HEAD:src/tracerl/tools/retrieval_server.py > /tmp/orig_server.py
    PYTHONPATH=src:bench .venv/bin/python bench/retriever_stress.py --server-file /tmp/orig_server.py --label original
    PYTHONPATH=src:bench .venv/bin/python bench/retriever_stress.py --label new
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tracerl.envs.qa_data import load_corpus, load_qa_file
from tracerl.tools.retrieval_client import RetrievalClient

from _results import save_result  # bench/ is on sys.path when a script here runs
from retriever_load import _free_port, _percentile as load_percentile

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "real_qa"
PARTIAL_HEAD = b"POST /retrieve HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"


def _percentile(values: list[float], q: float) -> float:
    return load_percentile(values, q) if values else float("nan")


def serve(server_file: str, corpus: str, port: int, top_k: int) -> None:
    """Child mode: run the RetrievalServer of `server_file` (any version) until SIGTERM or Ctrl-C."""
    spec = importlib.util.spec_from_file_location("retrieval_server_under_test", server_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    server = module.RetrievalServer(load_corpus(corpus), "127.0.0.1", port, top_k)
    print("ready", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


class ThreadSampler(threading.Thread):
    """Samples a process's thread count (/proc/PID/status) every `interval` s; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak, self.last = pid, interval, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            self.last = int(next(line.split()[1] for line in text.splitlines() if line.startswith("Threads:")))
            self.peak = max(self.peak, self.last)


class StallKeeper(threading.Thread):
    """Holds `count` stalled connections open, reopening each one the server closes (and timing it)."""

    def __init__(self, port: int, count: int):
        super().__init__(daemon=True)
        self.port, self.count = port, count
        self.selector = selectors.DefaultSelector()
        self.opened_at: dict[socket.socket, float] = {}
        self.lifetimes: list[float] = []  # seconds from open to the server's close
        self.answers: dict[str, int] = {}  # first bytes of what the server sent before closing -> count
        self.connect_errors = 0
        self.stop = threading.Event()
        self.ready = threading.Event()

    def _open(self, partial: bool) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            if partial:
                sock.sendall(PARTIAL_HEAD)
        except OSError:
            self.connect_errors += 1
            return
        sock.setblocking(False)
        self.opened_at[sock] = time.monotonic()
        self.selector.register(sock, selectors.EVENT_READ, partial)

    def _on_closed(self, sock: socket.socket, partial: bool) -> None:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        status = data.split(b"\r\n", 1)[0].decode("latin-1")[:40] if data else "closed silently"
        self.answers[status] = self.answers.get(status, 0) + 1
        self.lifetimes.append(time.monotonic() - self.opened_at.pop(sock))
        self.selector.unregister(sock)
        sock.close()
        if not self.stop.is_set():
            self._open(partial)

    def run(self) -> None:
        for i in range(self.count):
            self._open(partial=bool(i % 2))
        self.ready.set()
        while not self.stop.is_set():
            for key, _ in self.selector.select(0.1):
                self._on_closed(key.fileobj, key.data)

    def close(self) -> float:
        """Stop and close everything; returns the age of the oldest connection still open (s)."""
        self.stop.set()
        self.join(5)
        now = time.monotonic()
        oldest = max((now - t for t in self.opened_at.values()), default=0.0)
        for sock in list(self.opened_at):
            sock.close()
        return oldest


def run_load(url: str, queries: list[str], clients: int, requests: int, timeout: float) -> dict:
    """C threads x R single-query requests, started together; latency of every successful request."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def worker(c: int) -> None:
        client = RetrievalClient(url, top_k=3, retries=0, timeout=timeout)
        mine, failed = [], []
        start.wait()
        for r in range(requests):
            t0 = time.perf_counter()
            try:
                client.search_batch([queries[(c * requests + r) % len(queries)]])
                mine.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 (counted and reported)
                failed.append(f"{type(e).__name__}: {e}"[:300])
        client.close()
        with lock:
            latencies.extend(mine)
            errors.extend(failed)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = [x * 1000 for x in latencies]
    return {"clients": clients, "requests": clients * requests, "ok": len(ms), "failed": len(errors),
            "wall_s": round(wall, 2), "requests_per_s": round(len(ms) / wall, 1),
            "p50_ms": round(_percentile(ms, 0.5), 1), "p99_ms": round(_percentile(ms, 0.99), 1),
            "max_ms": round(max(ms), 1) if ms else None, "errors": sorted(set(errors))[:3]}


def stop_server(proc: subprocess.Popen) -> dict:
    """SIGTERM the server; how long it took to exit and its status (killed after 10 s)."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = f"killed after 10 s (rc {proc.wait(10)})"
    return {"returncode": rc, "exit_s": round(time.monotonic() - t0, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server-file", default=str(REPO / "src" / "tracerl" / "tools" / "retrieval_server.py"),
                   help="the retrieval_server.py to run (default: this tree's)")
    p.add_argument("--label", default="new", help="names the result file")
    p.add_argument("--corpus", default=str(DATA / "musique_ans_train_hipporag100.jsonl"))
    p.add_argument("--queries", nargs="+", default=[str(DATA / "hotpotqa_train_hipporag100.jsonl"),
                                                     str(DATA / "musique_ans_train_hipporag100.jsonl")])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--requests", type=int, default=10, help="requests per client")
    p.add_argument("--stalled", type=int, default=300)
    p.add_argument("--hold", type=float, default=8.0, help="seconds the stalled connections are held after the load")
    p.add_argument("--client-timeout", type=float, default=30.0, help="the load clients' deadline per request")
    p.add_argument("--out", default=None, help="default: bench/results/retriever_stress_<label>.json")
    p.add_argument("--json", action="store_true")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # child mode
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.server_file, args.corpus, args.port, 3)
        return

    queries = [item.task.question for path in args.queries for item in load_qa_file(path)]
    port = _free_port()
    cmd = [sys.executable, __file__, "--serve", "--server-file", args.server_file, "--corpus", args.corpus,
           "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "bench")])}
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    sampler = ThreadSampler(server.pid)
    try:
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        sampler.start()
        run_load(url, queries, 4, 10, args.client_timeout)  # warm-up
        time.sleep(0.3)
        threads_idle = sampler.last
        alone = run_load(url, queries, args.clients, args.requests, args.client_timeout)
        peak_alone, sampler.peak = sampler.peak, 0
        keeper = StallKeeper(port, args.stalled)
        t_open = time.monotonic()
        keeper.start()
        keeper.ready.wait()
        stall_open_s = time.monotonic() - t_open
        time.sleep(0.5)
        threads_stalled = sampler.last
        stalled = run_load(url, queries, args.clients, args.requests, args.client_timeout)
        time.sleep(args.hold)
        threads_after_hold = sampler.last
        oldest_open = keeper.close()
        health = run_load(url, queries, 1, 5, args.client_timeout)  # still answering afterwards?
        shutdown = stop_server(server)
    finally:
        sampler.stop.set()
        if server.poll() is None:
            server.kill()
            server.wait(10)
    lifetimes = keeper.lifetimes
    result = {
        "benchmark": "retriever_stress", "label": args.label, "server_file": args.server_file,
        "corpus": args.corpus, "queries": len(queries),
        "load_alone": {**alone, "server_threads_peak": peak_alone},
        "load_with_stalled": {**stalled, "stalled_connections": args.stalled, "server_threads_peak": sampler.peak},
        "server_threads": {"idle": threads_idle, "with_stalled_before_load": threads_stalled,
                           f"after_{args.hold:g}s_hold": threads_after_hold},
        "stalled": {"open_all_s": round(stall_open_s, 2), "closed_by_server": len(lifetimes),
                    "oldest_open_at_end_s": round(oldest_open, 1),
                    "lifetime_s_p50": round(_percentile(lifetimes, 0.5), 2) if lifetimes else None,
                    "lifetime_s_max": round(max(lifetimes), 2) if lifetimes else None,
                    "answers": keeper.answers, "connect_errors": keeper.connect_errors,
                    "held_s_after_load": args.hold},
        "after": {"failed": health["failed"], "p50_ms": health["p50_ms"]},
        "sigterm": shutdown,
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1min": round(os.getloadavg()[0], 2)},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    out = args.out or str(REPO / "bench" / "results" / f"retriever_stress_{args.label}.json")
    save_result(result, out, args.json)
    for name in ("load_alone", "load_with_stalled"):
        r = result[name]
        print(f"{args.label} {name}: {r['requests']} requests, {r['failed']} failed, p50 {r['p50_ms']} ms, "
              f"p99 {r['p99_ms']} ms, max {r['max_ms']} ms, {r['requests_per_s']} req/s, "
              f"server threads peak {r['server_threads_peak']}")
    s = result["stalled"]
    print(f"stalled: opening {args.stalled} took {s['open_all_s']} s; {s['closed_by_server']} closed by the server "
          f"(lifetime p50 {s['lifetime_s_p50']} s, "
          f"max {s['lifetime_s_max']} s; {s['answers']}), oldest still open at the end {s['oldest_open_at_end_s']} s; "
          f"server threads {result['server_threads']}; SIGTERM: {shutdown}")


if __name__ == "__main__":
    main()
