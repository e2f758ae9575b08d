"""The Search-R1-style retrieval server and client over real HTTP on 127.0.0.1."""

import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from tracerl.envs.qa_data import load_corpus
from tracerl.tools.bm25 import BM25Search
from tracerl.tools.retrieval_client import RetrievalClient, RetrievalError, document_from_wire
from tracerl.tools.retrieval_server import RetrievalServer

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]
QUERIES = ["Glass Harbor director", "Veloria", "capital of Norland", "sculptor Kesh", "zzzz unknown", "", "the of"]


@contextmanager
def running(server):
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def docs():
    return load_corpus(FIXTURES / "real_qa_tiny.jsonl")


@pytest.fixture(scope="module")
def server(docs):
    with running(RetrievalServer(docs, "127.0.0.1", 0, top_k=3)) as s:
        yield s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_binds_localhost_by_default(docs):
    s = RetrievalServer(docs, port=0)
    try:
        assert s.server_address[0] == "127.0.0.1"
    finally:
        s.server_close()


def test_served_results_equal_in_process(server, docs):
    local = BM25Search(docs, top_k=3)
    client = RetrievalClient(server.url, top_k=3)
    for k in (1, 3, 5):
        served = client.search_batch(QUERIES, k)
        expected = local.search_batch(QUERIES, k)
        assert [[(d["id"], d["title"], d["text"]) for d in q] for q in served] == \
               [[(d["id"], d["title"], d["text"]) for d in q] for q in expected]
        for s, e in zip(served, expected):
            assert [d["score"] for d in s] == pytest.approx([d["score"] for d in e])
    assert client.search("Veloria")[0]["title"] == "Marta Quenell"
    assert client.search_batch([]) == []


def test_wire_format_is_search_r1s(server):
    body = {"queries": ["Glass Harbor", "Veloria"], "topk": 2, "return_scores": True}
    r = requests.post(server.url + "/retrieve", json=body, timeout=5)
    assert r.status_code == 200
    result = r.json()["result"]
    assert len(result) == 2 and len(result[0]) == 2
    entry = result[0][0]
    assert set(entry) == {"document", "score"} and isinstance(entry["score"], float)
    assert entry["document"]["contents"] == '"Glass Harbor"\nGlass Harbor is a 1994 drama film directed by Marta Quenell.'
    # without scores: bare documents; without topk: the server's default
    r = requests.post(server.url + "/retrieve", json={"queries": ["Glass Harbor"]}, timeout=5)
    [[first, *rest]] = r.json()["result"]
    assert "contents" in first and "score" not in first and len(rest) == 2
    assert requests.get(server.url + "/health", timeout=5).json() == {"status": "ok", "documents": 15, "retriever": "bm25"}


def test_client_reads_search_r1_documents_without_title_fields():
    d = document_from_wire({"document": {"id": "7", "contents": '"Kesh"\nKesh is a town.'}, "score": 2})
    assert d == {"id": "7", "title": "Kesh", "text": "Kesh is a town.", "score": 2.0}
    assert document_from_wire({"id": "8", "contents": '"A"\nb'})["score"] is None  # return_scores=false layout
    with pytest.raises(ValueError):
        document_from_wire({"document": {"id": "1"}, "score": 1.0})


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not JSON"),
    (json.dumps({"queries": "Veloria"}).encode(), "'queries' must be a list of strings"),
    (json.dumps({"queries": ["a"], "topk": "3"}).encode(), "'topk' must be an integer"),
    (json.dumps({"queries": ["a"], "topk": 10_000}).encode(), "'topk' must be an integer in 1..100"),
    (json.dumps({"queries": ["a"], "return_scores": "yes"}).encode(), "'return_scores' must be true or false"),
    (json.dumps(["a"]).encode(), "must be a JSON object"),
])
def test_server_rejects_bad_requests(server, body, message):
    r = requests.post(server.url + "/retrieve", data=body, timeout=5)
    assert r.status_code == 400 and message in r.json()["error"]
    # and keeps serving
    assert requests.post(server.url + "/retrieve", json={"queries": ["Kesh"]}, timeout=5).status_code == 200


def test_client_error_is_not_retried(server):
    client = RetrievalClient(server.url + "/retrieve", retries=3, backoff=5.0)  # a retry would take 5 s
    t0 = time.time()
    with pytest.raises(RetrievalError, match="refused the request: HTTP 400 .*topk.* must be an integer"):
        client.search("Kesh", k=10_000)
    assert time.time() - t0 < 2


def test_server_down_fails_after_bounded_retries_with_backoff():
    url = f"http://127.0.0.1:{_free_port()}"
    client = RetrievalClient(url, retries=2, backoff=0.1, timeout=1.0)
    t0 = time.time()
    with pytest.raises(RetrievalError) as err:
        client.search("Kesh")
    elapsed = time.time() - t0
    assert "failed after 3 attempts: cannot connect" in str(err.value) and "serve-retriever" in str(err.value)
    assert 0.3 - 0.05 <= elapsed < 3  # backoff 0.1 then 0.2 seconds


class _Scripted(BaseHTTPRequestHandler):
    """A misbehaving server: each request takes the next behaviour from server.script."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        kind = self.server.script.pop(0) if len(self.server.script) > 1 else self.server.script[0]
        self.server.calls += 1
        if kind == "slow":
            time.sleep(1.0)
        body = {"ok": json.dumps({"result": [[{"document": {"id": "1", "contents": '"A"\nB'}, "score": 1.5}]]}),
                "slow": json.dumps({"result": [[]]}),
                "garbage": "<html>not json",
                "wrong_shape": json.dumps({"result": "nothing"}),
                "500": json.dumps({"error": "boom"})}[kind].encode()
        self.send_response(500 if kind == "500" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextmanager
def scripted(*script):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # the client hangs up on the slow answer
    server.script, server.calls = list(script), 0
    with running(server):
        yield server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize("kind, message", [
    ("slow", "no complete answer within 0.2 s"),
    ("garbage", "malformed answer"),
    ("wrong_shape", "malformed answer"),
    ("500", "HTTP 500"),
])
def test_misbehaving_server_raises_after_retries(kind, message):
    with scripted(kind) as (server, url):
        client = RetrievalClient(url, retries=1, backoff=0.01, timeout=0.2)
        with pytest.raises(RetrievalError, match=message):
            client.search("x")
        assert server.calls == 2  # the first attempt and one retry


def test_transient_faults_are_retried():
    with scripted("500", "garbage", "ok") as (server, url):
        client = RetrievalClient(url, retries=2, backoff=0.01, timeout=2.0)
        assert client.search("x") == [{"id": "1", "title": "A", "text": "B", "score": 1.5}]
        assert server.calls == 3


def test_client_options_are_checked():
    with pytest.raises(ValueError, match="top_k"):
        RetrievalClient("http://127.0.0.1:1", top_k=0)
    with pytest.raises(ValueError, match="timeout"):
        RetrievalClient("http://127.0.0.1:1", timeout=0)


def test_serve_retriever_command_in_its_own_process(docs):
    port = _free_port()
    cmd = [sys.executable, "-m", "tracerl.cli", "serve-retriever", "--corpus", str(FIXTURES / "search_r1_corpus.jsonl"),
           "--port", str(port), "--top-k", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")})
    try:
        line = proc.stdout.readline()
        assert f"serving 15 documents from" in line and f"http://127.0.0.1:{port}/retrieve (top-k 2)" in line
        client = RetrievalClient(f"http://127.0.0.1:{port}", top_k=2, retries=5, backoff=0.1)
        hits = client.search_batch(QUERIES)
        local = BM25Search(load_corpus(FIXTURES / "search_r1_corpus.jsonl"), top_k=2).search_batch(QUERIES)
        assert [[(d["id"], d["title"]) for d in q] for q in hits] == [[(d["id"], d["title"]) for d in q] for q in local]
        assert hits[0][0]["id"] == "0"  # the Search-R1 corpus's own ids are served
    finally:
        proc.terminate()
        proc.wait(10)


def test_serve_retriever_reports_a_bad_corpus(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"body": 1}\n')
    out = subprocess.run([sys.executable, "-m", "tracerl.cli", "serve-retriever", "--corpus", str(bad)],
                         capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert f"error: {bad}:1: a corpus line needs 'contents'" in out.stderr


# --- robustness: stalled and hostile clients, slow servers, shutdown (issue 19) -----------------------

def _connect(server) -> socket.socket:
    sock = socket.create_connection(server.server_address[:2], timeout=5)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _response(raw: bytes) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one raw HTTP answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, json.loads(body[:int(headers["content-length"])])


def _exchange(server, data: bytes) -> tuple[int, dict, dict]:
    with _connect(server) as sock:
        sock.sendall(data)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server already answered and closed (a refusal does not wait for the request)
            pass
        return _response(_read_all(sock))


def _post_raw(body: bytes) -> bytes:
    return (b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body)


def test_stalled_connections_are_closed_after_the_read_timeout(docs):
    with running(RetrievalServer(docs, "127.0.0.1", 0, read_timeout=0.5)) as s:
        idle, partial = _connect(s), _connect(s)
        partial.sendall(b"POST /retrieve HTTP/1.1\r\nContent-Length: 20\r\n")  # never finished
        t0 = time.monotonic()
        assert _read_all(idle) == b""  # an idle connection is closed without a word
        status, headers, body = _response(_read_all(partial))
        elapsed = time.monotonic() - t0
        assert status == 408 and headers["content-type"] == "application/json"
        assert body == {"error": "request not complete within 0.5 s"}
        assert 0.3 < elapsed < 2.0
        idle.close()
        partial.close()


def test_a_slow_but_steady_client_is_cut_off_by_the_deadline_not_per_read(docs):
    with running(RetrievalServer(docs, "127.0.0.1", 0, read_timeout=0.6)) as s, _connect(s) as sock:
        t0 = time.monotonic()
        for byte in _post_raw(b'{"queries": ["Kesh"]}')[:12]:  # one byte every 0.1 s: each read is quick
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
        assert _response(_read_all(sock))[0] == 408 and time.monotonic() - t0 < 2.0


def test_stalled_connections_hold_no_thread_and_do_not_delay_a_request(docs):
    with running(RetrievalServer(docs, "127.0.0.1", 0, workers=2, read_timeout=5)) as s:
        client = RetrievalClient(s.url, retries=0, timeout=5)
        client.search("warm-up")
        threads = threading.active_count()
        stalled = [_connect(s) for _ in range(50)]
        for sock in stalled[::2]:
            sock.sendall(b"POST /retrieve HTTP/1.1\r\nContent-Le")  # half a head; the rest never comes
        try:
            t0 = time.monotonic()
            for _ in range(5):
                assert client.search("Veloria")[0]["title"] == "Marta Quenell"
            assert time.monotonic() - t0 < 1.0
            assert threading.active_count() <= threads  # no thread per connection (others may end meanwhile)
        finally:
            for sock in stalled:
                sock.close()


def test_deeply_nested_json_gets_a_json_400(server):
    deep = b'{"queries": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    r = requests.post(server.url + "/retrieve", data=deep, timeout=5)
    assert r.status_code == 400 and r.json() == {"error": "request JSON nests deeper than 32 levels"}
    flat = json.dumps({"queries": ["[[[[{{{{" * 100, "\\\"[[["]}).encode()  # brackets inside strings do not count
    assert requests.post(server.url + "/retrieve", data=flat, timeout=5).status_code == 200


@pytest.mark.parametrize("request_bytes, status, message", [
    (b"GARBAGE\r\n\r\n", 400, "Bad request syntax ('GARBAGE')"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "Bad request"),  # a TLS hello
    (b"GET /health HTTP/2.0\r\n\r\n", 505, "Invalid HTTP version (2.0)"),
    (b"BREW /retrieve HTTP/1.1\r\n\r\n", 501, "Unsupported method ('BREW')"),
    (b"GET /health HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431, "exceed 65536 bytes"),
    (b"POST /retrieve HTTP/1.1\r\n\r\n", 411, "with a Content-Length"),
    (b"POST /retrieve HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411, "chunked"),
    (b"POST /retrieve HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 400, "need a JSON body"),
    (b"POST /search HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 404, "use POST /retrieve"),
])
def test_every_error_is_a_json_body(server, request_bytes, status, message):
    got, headers, body = _exchange(server, request_bytes)
    assert got == status and headers["content-type"] == "application/json"
    assert message in body["error"]


def test_oversized_body_gets_413_even_while_it_is_still_being_sent(server):
    r = requests.post(server.url + "/retrieve", data=b"[" + b" " * (2 << 20) + b"]", timeout=5)
    assert r.status_code == 413 and r.json() == {"error": f"request body of {(2 << 20) + 2} bytes exceeds {1 << 20}"}
    # the head alone is enough to refuse: the server does not wait for 2 MiB that never come
    with _connect(server) as sock:
        sock.sendall(b"POST /retrieve HTTP/1.1\r\nContent-Length: 2097152\r\n\r\n")
        assert _response(_read_all(sock))[0] == 413


def test_expect_100_continue_and_pipelined_requests(server):
    with _connect(server) as sock:
        body = b'{"queries": ["Kesh"]}'
        sock.sendall(b"POST /retrieve HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body + b"GET /health HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        answers = _read_all(sock).split(b"HTTP/1.1 ")[1:]
        assert [a[:3] for a in answers] == [b"200"] * 3 and b'"documents": 15' in answers[2]


def test_connections_beyond_the_limit_get_503(docs):
    with running(RetrievalServer(docs, "127.0.0.1", 0, max_connections=2)) as s:
        held = [_connect(s), _connect(s)]
        time.sleep(0.1)
        try:
            status, _, body = _exchange(s, b"GET /health HTTP/1.1\r\n\r\n")
            assert status == 503 and "2 connections open" in body["error"]
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)  # the slots are free again
        assert requests.get(s.url + "/health", timeout=5).status_code == 200


def test_client_reuses_its_connection_after_the_server_closed_it_idle(docs):
    with running(RetrievalServer(docs, "127.0.0.1", 0, read_timeout=0.2)) as s:
        client = RetrievalClient(s.url, retries=0, timeout=5)
        assert client.search("Kesh")
        time.sleep(0.5)  # the server has closed the keep-alive connection meanwhile
        assert client.search("Kesh")
        client.close()


@contextmanager
def slow_drip_server(interval: float = 0.5):
    """A server that reads a request, then answers one byte every `interval` seconds, forever."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drip(conn):
        answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b" " * 1000
        with conn:
            conn.recv(65536)
            for byte in answer:
                if stop.wait(interval):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def accept():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()


def test_client_deadline_covers_the_whole_answer_of_a_slow_drip_server():
    with slow_drip_server(0.5) as url:
        client = RetrievalClient(url, retries=1, backoff=0.1, timeout=1.2)
        t0 = time.monotonic()
        with pytest.raises(RetrievalError) as err:
            client.search("Kesh")
        elapsed = time.monotonic() - t0
    message = str(err.value)
    assert "\n" not in message and url in message
    assert "failed after 2 attempts: no complete answer within 1.2 s" in message
    assert 2 * 1.2 + 0.1 - 0.05 <= elapsed < 2 * 1.2 + 0.1 + 1.0  # two full deadlines, not hours of drip


def test_sigterm_stops_serve_retriever_cleanly(tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "tracerl.cli", "serve-retriever", "--corpus", str(FIXTURES / "search_r1_corpus.jsonl"),
           "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")})
    try:
        assert "serving 15 documents" in proc.stdout.readline()
        client = RetrievalClient(f"http://127.0.0.1:{port}", retries=0, timeout=5)
        assert client.search("Kesh")
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(b"POST /retrieve HTTP/1.1\r\n")  # shutdown must not wait for it
        t0 = time.monotonic()
        proc.send_signal(__import__("signal").SIGTERM)
        rc = proc.wait(10)
        elapsed = time.monotonic() - t0
        stalled.close()
        assert rc == 0 and elapsed < 3, (rc, elapsed, proc.stderr.read())
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
