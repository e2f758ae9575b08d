"""A Search-R1-compatible retrieval server over BM25, dense or hybrid search (`tracerl serve-retriever`).

    tracerl serve-retriever --corpus corpus.jsonl --port 8000 --top-k 3 [--dense | --hybrid]

`POST /retrieve` takes `{"queries": [...], "topk": k, "return_scores": true|false}` and answers
`{"result": [...]}` with one list per query: `{"document": {"id", "contents", "title", "text"}, "score"}`
entries with scores, bare documents without (Search-R1's own layout, so its clients work unchanged).
`GET /health` answers `{"status": "ok", "documents": N, "retriever": "bm25|dense|hybrid"}`. Every error, the HTTP layer's own included
(a garbled request line, an unknown method), is a JSON object `{"error": "..."}` with its status.

Why not one thread per connection (the standard library's `ThreadingHTTPServer`): a client that opens
a connection and never finishes its request held a thread forever, so a few hundred stalled sockets
meant a few hundred parked threads. Here connections wait in a *reception*: one thread that reads
whatever has arrived on every open socket (non-blocking, one selector) until a request is complete —
its head and its `Content-Length` body — and only then hands it to a fixed pool of workers. A stalled
or slow client therefore costs a file descriptor and a buffer, never a worker, and is closed once
`read_timeout` has passed without a complete request (408 if it had sent part of one). Complete requests
beyond the workers wait in a queue rather than getting 503: each is about a millisecond of BM25 under
one lock, so a short wait is cheaper for the caller than a refusal it must back off from and retry.
Only connections beyond `max_connections` (file descriptors and buffers are the scarce resource) are
refused, with 503. The worker runs the standard library's request parser (`BaseHTTPRequestHandler`)
on the buffered bytes, so HTTP parsing is not reimplemented; only the framing is.

It binds 127.0.0.1 unless told otherwise; it executes nothing a client sends, and bounds the head,
the body, the JSON nesting depth, the batch size and the time a request may take to arrive.
`serve_forever` in the main thread stops cleanly on SIGTERM (in-flight answers finish, then it returns).
"""

from __future__ import annotations

import heapq
import io
import itertools
import json
import queue
import re
import selectors
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from tracerl.tools.bm25 import BM25Search
from tracerl.tools.corpus import join_contents

MAX_BODY_BYTES = 1 << 20
MAX_HEAD_BYTES = 64 << 10  # request line + headers
MAX_JSON_DEPTH = 32  # a valid request nests 2 deep
MAX_QUERIES = 1024
MAX_TOPK = 100
READ_TIMEOUT_S = 5.0  # a whole request (head and body) must arrive within this; also the keep-alive idle limit
WRITE_TIMEOUT_S = 10.0  # sending one answer to a client that does not read
WORKERS = 8  # BM25 runs under one lock and JSON under the GIL: more threads would only wait
MAX_CONNECTIONS = 1024
LINGER_S = 2.0  # after answering with close, how long unread input is drained (see `_Reception.linger`)

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_JSON_SIGNIFICANT = re.compile(rb'[\[\]{}"\\]')


class RequestHeadTooLarge(ValueError):
    """The request line and headers did not end within MAX_HEAD_BYTES."""


def document_to_wire(doc: dict[str, Any]) -> dict[str, Any]:
    """A BM25 hit -> the document object of Search-R1's answer (plus title and text)."""
    return {"id": doc["id"], "contents": join_contents(doc["title"], doc["text"]), "title": doc["title"], "text": doc["text"]}


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """Whether the JSON text nests arrays/objects deeper than `limit` (brackets inside strings ignored).

    Checked before `json.loads`, whose recursive decoder raises RecursionError (and the old server
    dropped the connection) on deep input. Only brackets, quotes and backslashes are visited, so a
    normal request costs a few dozen steps and a hostile one stops at the first level too deep."""
    depth, in_string, escaped_at = 0, False, -1
    for m in _JSON_SIGNIFICANT.finditer(body):
        c, pos = m.group(), m.start()
        if in_string:
            if pos == escaped_at:
                continue
            if c == b"\\":
                escaped_at = pos + 1
            elif c == b'"':
                in_string = False
        elif c == b'"':
            in_string = True
        elif c in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif c in (b"]", b"}"):
            depth -= 1
    return False


def parse_request(body: bytes, default_k: int) -> tuple[list[str], int, bool]:
    """(queries, topk, return_scores) of a /retrieve request; ValueError names what is wrong."""
    if json_depth_exceeds(body, MAX_JSON_DEPTH):
        raise ValueError(f"request JSON nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"request body is not JSON: {e}") from None
    if not isinstance(req, dict):
        raise ValueError("request body must be a JSON object")
    queries = req.get("queries")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise ValueError("'queries' must be a list of strings")
    if len(queries) > MAX_QUERIES:
        raise ValueError(f"at most {MAX_QUERIES} queries per request, got {len(queries)}")
    k = req.get("topk") or default_k  # Search-R1 treats a missing or null topk as the default
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_TOPK:
        raise ValueError(f"'topk' must be an integer in 1..{MAX_TOPK}")
    scores = req.get("return_scores", False)
    if not isinstance(scores, bool):
        raise ValueError("'return_scores' must be true or false")
    return queries, k, scores


def error_response(status: int, message: str) -> bytes:
    """A complete `Connection: close` JSON error answer, for the reception (no handler runs there)."""
    body = json.dumps({"error": message}).encode("utf-8")
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("ascii") + body


@dataclass(frozen=True)
class Framing:
    """Where the first request in a buffer ends: `size` bytes once complete (head + body to read)."""

    head_size: int
    size: int
    expects_continue: bool


def frame_request(buffer: bytes | bytearray, scan_from: int = 0) -> Framing | None:
    """The framing of the first request in `buffer`, or None while its head is incomplete.

    Only the blank line ending the head and the first Content-Length are looked at; everything else is
    left to the handler, which answers bad or oversized lengths itself (so a body over MAX_BODY_BYTES
    is not waited for). `scan_from` resumes the search for the blank line, so a client dripping its
    head byte by byte costs linear, not quadratic, time."""
    end = _HEAD_END.search(buffer, max(0, scan_from - 3), MAX_HEAD_BYTES + 4)
    if end is None:
        if len(buffer) > MAX_HEAD_BYTES:
            raise RequestHeadTooLarge(f"request line and headers exceed {MAX_HEAD_BYTES} bytes")
        return None
    length, expects_continue = None, False
    for line in bytes(buffer[:end.start()]).split(b"\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length" and length is None:  # the first one, as the handler's headers.get
            length = int(value) if value.strip().isdigit() else 0
        elif name == b"expect":
            expects_continue = value.strip().lower() == b"100-continue"
    body = length if length is not None and length <= MAX_BODY_BYTES else 0
    return Framing(end.end(), end.end() + body, expects_continue)


class RetrievalHandler(BaseHTTPRequestHandler):
    """Answers one complete request held in memory; the server does all socket I/O.

    `request` is the request's bytes, not a socket: the reception has already read them, so nothing
    here can block on a slow client, and the answer is collected in `wfile` and sent in one write."""

    server: "RetrievalServer"
    protocol_version = "HTTP/1.1"  # keep-alive: a client's session reuses one connection
    # The stdlib's default (HTTP/0.9) writes no status line or headers when a request line cannot be
    # parsed, so a garbled request got a bare HTML page; 1.0 makes every answer a full HTTP response.
    default_request_version = "HTTP/1.0"

    def setup(self) -> None:
        self.rfile = io.BytesIO(self.request)
        self.wfile = io.BytesIO()

    def handle(self) -> None:
        self.handle_one_request()

    def finish(self) -> None:
        pass  # wfile is read by the server after the handler returns

    def handle_expect_100(self) -> bool:
        return True  # the body is already here: the reception sent `100 Continue` when it was due

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own errors (bad request line, unknown method, long headers) as JSON, not HTML."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        self._send(code, {"error": f"{text}: {explain}" if explain else text})

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") == "/health":
            self._send(HTTPStatus.OK, {"status": "ok", "documents": len(self.server.search.docs),
                                       "retriever": getattr(self.server.search, "kind", "bm25")})
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": "use POST /retrieve or GET /health"})

    def _body_problem(self) -> tuple[int, str] | None:
        """Why the request body cannot be read (status, message), or None when it can."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length (chunked is not supported)"
        if "Content-Length" not in self.headers:
            return HTTPStatus.LENGTH_REQUIRED, f"need a JSON body of 1..{MAX_BODY_BYTES} bytes with a Content-Length"
        value = self.headers["Content-Length"].strip()
        length = int(value) if value.isascii() and value.isdigit() else -1
        if length > MAX_BODY_BYTES:
            return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}"
        if length < 1:
            return HTTPStatus.BAD_REQUEST, f"need a JSON body of 1..{MAX_BODY_BYTES} bytes"
        return None

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/retrieve":
            self._send(HTTPStatus.NOT_FOUND, {"error": "use POST /retrieve"})
            return
        problem = self._body_problem()
        if problem:
            self.close_connection = True  # the unread body must not be taken for the next request
            self._send(problem[0], {"error": problem[1]})
            return
        try:
            queries, k, scores = parse_request(self.rfile.read(int(self.headers["Content-Length"])), self.server.top_k)
        except ValueError as e:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            return
        with self.server.lock:  # the stemmer and bm25s' scoring buffers (and the encoder) are not meant to be shared
            hits = self.server.search.search_batch(queries, k)
        if scores:
            result = [[{"document": document_to_wire(h), "score": h["score"]} for h in q] for q in hits]
        else:
            result = [[document_to_wire(h) for h in q] for q in hits]
        self._send(HTTPStatus.OK, {"result": result})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.verbose:
            super().log_message(format, *args)


@dataclass(eq=False)
class Connection:
    """One client socket and what it has sent of its next request."""

    sock: socket.socket
    address: Any
    buffer: bytearray = field(default_factory=bytearray)
    deadline: float = 0.0  # when the request under way must be complete (or lingering must end)
    scanned: int = 0  # bytes of buffer already searched for the end of the head
    continued: bool = False  # `100 Continue` sent for the request under way
    lingering: bool = False  # answered with close: input is drained and discarded until EOF or deadline
    closed: bool = False


class _Reception(threading.Thread):
    """Reads every waiting connection without blocking and passes complete requests to the workers.

    Only this thread touches the selector and the buffers; other threads hand connections in through
    `admit`, which wakes the selector with a byte on a socket pair."""

    def __init__(self, server: "RetrievalServer"):
        super().__init__(name="retrieval-reception", daemon=True)
        self.server = server
        self.selector = selectors.DefaultSelector()
        self.inbox: queue.SimpleQueue[tuple[Connection, bool]] = queue.SimpleQueue()
        self.timers: list[tuple[float, int, Connection]] = []  # (deadline, tie-break, conn), stale entries skipped
        self.tie = itertools.count()
        self.waiting: set[Connection] = set()
        self.stopping = False
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)

    def admit(self, conn: Connection, linger: bool = False) -> None:
        """Wait for `conn`'s next request (or, with `linger`, drain it and close): any thread."""
        if self.stopping:
            self.server.close_connection(conn)
            return
        self.inbox.put((conn, linger))
        try:
            self.wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or closed (stopping)

    def stop(self) -> None:
        """End the loop and close every connection still waiting."""
        self.stopping = True
        try:
            self.wake_w.send(b"\0")
        except OSError:
            pass
        if self.is_alive():
            self.join(5)
        while not self.inbox.empty():
            self.server.close_connection(self.inbox.get()[0])
        for conn in list(self.waiting):
            self._forget(conn)
            self.server.close_connection(conn)
        self.selector.close()
        self.wake_r.close()
        self.wake_w.close()

    def run(self) -> None:
        while not self.stopping:
            timeout = max(0.0, self.timers[0][0] - time.monotonic()) if self.timers else None
            for key, _ in self.selector.select(timeout):
                if key.data is None:
                    self._take_inbox()
                else:
                    self._guarded(self._on_readable, key.data)
            self._expire(time.monotonic())

    def _guarded(self, step: Any, conn: Connection) -> None:
        """One step for one connection; an unexpected failure closes that connection, not the reception."""
        try:
            step(conn)
        except Exception:  # noqa: BLE001 (this thread serves every waiting connection: it must live)
            self.server.handle_error(conn.sock, conn.address)
            self._close(conn)

    def _take_inbox(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while not self.inbox.empty():
            conn, linger = self.inbox.get()
            self._guarded(self.linger if linger else self._wait_for_request, conn)

    def _watch(self, conn: Connection, deadline: float) -> None:
        conn.deadline = deadline
        heapq.heappush(self.timers, (deadline, next(self.tie), conn))
        if conn not in self.waiting:
            conn.sock.setblocking(False)
            self.selector.register(conn.sock, selectors.EVENT_READ, conn)
            self.waiting.add(conn)

    def _forget(self, conn: Connection) -> None:
        if conn in self.waiting:
            self.waiting.discard(conn)
            try:
                self.selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass  # the socket was closed under the selector

    def _wait_for_request(self, conn: Connection) -> None:
        conn.continued, conn.scanned = False, 0
        self._watch(conn, time.monotonic() + self.server.read_timeout)
        if conn.buffer:  # a pipelined request may already be complete
            self._try_dispatch(conn)

    def linger(self, conn: Connection) -> None:
        """Half-close after an answer with `Connection: close`, then drain until the client closes.

        Closing a socket with unread input sends a reset, and the client's kernel may then discard
        the answer before the client reads it (a 413 sent while the client is still uploading would
        be lost). Draining for a bounded time lets the answer arrive."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.lingering, conn.buffer = True, bytearray()
        self._watch(conn, time.monotonic() + min(LINGER_S, self.server.read_timeout))

    def _on_readable(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)  # the client closed (or reset) its end
        elif not conn.lingering:
            conn.buffer += data
            self._try_dispatch(conn)

    def _try_dispatch(self, conn: Connection) -> None:
        if conn.buffer[:1] in (b"\r", b"\n"):  # blank lines before a request line are ignored (RFC 9112 2.2)
            del conn.buffer[:len(conn.buffer) - len(conn.buffer.lstrip(b"\r\n"))]
        try:
            framing = frame_request(conn.buffer, conn.scanned)
        except RequestHeadTooLarge as e:
            self._refuse(conn, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, str(e))
            return
        if framing is None:
            conn.scanned = len(conn.buffer)
            return
        if len(conn.buffer) < framing.size:
            conn.scanned = framing.head_size - 1  # the head is complete; only the body is awaited
            if framing.expects_continue and not conn.continued:
                conn.continued = True
                self._send_quietly(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        request = bytes(conn.buffer[:framing.size])
        del conn.buffer[:framing.size]
        self._forget(conn)
        self.server.jobs.put((conn, request))

    def _refuse(self, conn: Connection, status: int, message: str) -> None:
        self._send_quietly(conn, error_response(status, message))
        self.linger(conn)

    @staticmethod
    def _send_quietly(conn: Connection, data: bytes) -> None:
        """A short write on a non-blocking socket; a client too slow to take it just misses it."""
        try:
            conn.sock.send(data)
        except OSError:
            pass

    def _expire(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            deadline, _, conn = heapq.heappop(self.timers)
            if conn not in self.waiting or conn.deadline != deadline:
                continue  # dispatched, closed, or given a later deadline since
            if conn.lingering or not conn.buffer:
                self._close(conn)  # an idle keep-alive connection is closed without a word
            else:
                self._guarded(self._time_out, conn)

    def _time_out(self, conn: Connection) -> None:
        self._refuse(conn, HTTPStatus.REQUEST_TIMEOUT, f"request not complete within {self.server.read_timeout:g} s")

    def _close(self, conn: Connection) -> None:
        self._forget(conn)
        self.server.close_connection(conn)


def _default_max_connections() -> int:
    """MAX_CONNECTIONS, or fewer when the file-descriptor limit would run out first.

    Accepting past that limit fails inside the listener loop, which then spins on a listening socket
    it cannot drain; refusing with 503 below it keeps the server answering."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return MAX_CONNECTIONS
    return MAX_CONNECTIONS if soft == resource.RLIM_INFINITY else max(16, min(MAX_CONNECTIONS, soft - 64))


class RetrievalServer(HTTPServer):
    """An HTTP server holding one BM25 index: a reception thread, `workers` threads, bounded waits.

    read_timeout: seconds a request (head and body) may take to arrive, counted from the connection's
    accept or its previous answer; an idle keep-alive connection is closed after it too.
    workers: threads answering complete requests. max_connections: open connections beyond which new
    ones get 503 (default 1024, less under a low file-descriptor limit). search: the index answering
    queries, anything with `docs` and `search_batch(queries, k)` (default: BM25 over `docs`)."""

    request_queue_size = 1024  # listen backlog: the stdlib's 5 drops connects in a burst (1 s SYN retry)

    def __init__(self, docs: list[dict[str, Any]], host: str = "127.0.0.1", port: int = 8000, top_k: int = 3,
                 verbose: bool = False, *, read_timeout: float = READ_TIMEOUT_S, workers: int = WORKERS,
                 max_connections: int | None = None, write_timeout: float = WRITE_TIMEOUT_S, search: Any = None):
        limit_ok = max_connections is None or max_connections >= 1
        if min(read_timeout, write_timeout) <= 0 or workers < 1 or not limit_ok:
            raise ValueError(f"need read_timeout > 0, write_timeout > 0, workers >= 1, max_connections >= 1; got "
                             f"{read_timeout}, {write_timeout}, {workers}, {max_connections}")
        # any search tool with BM25Search's interface (tools/dense.py: dense, hybrid); default BM25 over docs
        self.search = BM25Search(docs, top_k) if search is None else search
        self.top_k, self.verbose = top_k, verbose
        self.read_timeout, self.write_timeout, self.workers = read_timeout, write_timeout, workers
        self.max_connections = max_connections or _default_max_connections()
        self.lock = threading.Lock()
        self.jobs: queue.Queue[tuple[Connection, bytes] | None] = queue.Queue()
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._reception: _Reception | None = None
        self._worker_threads: list[threading.Thread] = []
        super().__init__((host, port), RetrievalHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    # --- lifecycle ---------------------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until `shutdown()` (or SIGTERM, when called in the main thread); then stop the threads."""
        self._start_threads()
        restore = self._stop_on_sigterm()
        try:
            super().serve_forever(poll_interval)
        finally:
            restore()
            self._stop_threads()

    def _stop_on_sigterm(self):
        """Make SIGTERM end serve_forever like shutdown() does; returns what restores the old handler.

        `tracerl serve-retriever` runs serve_forever in the main thread, and SIGTERM's default action
        kills the process without its cleanup. The handler cannot call shutdown() itself: that waits
        for serve_forever, which is the very frame the handler interrupts, so a thread does it."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: threading.Thread(
            target=self.shutdown, name="retrieval-sigterm", daemon=True).start())
        return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    def _start_threads(self) -> None:
        self._reception = _Reception(self)
        self._reception.start()
        self._worker_threads = [threading.Thread(target=self._work, name=f"retrieval-worker-{i}", daemon=True)
                                for i in range(self.workers)]
        for t in self._worker_threads:
            t.start()

    def _stop_threads(self) -> None:
        """Let queued and in-flight requests finish, end the workers, then close every connection.

        The workers go first so that the connections they hand back still find a reception; requests
        the reception completes after the workers' stop signal are closed unanswered at the end."""
        for _ in self._worker_threads:
            self.jobs.put(None)
        for t in self._worker_threads:
            t.join(self.write_timeout + 1)
        self._worker_threads = []
        if self._reception is not None:
            self._reception.stop()
            self._reception = None
        while not self.jobs.empty():
            job = self.jobs.get()
            if job is not None:
                self.close_connection(job[0])

    def server_close(self) -> None:
        self._stop_threads()
        super().server_close()

    # --- connections -------------------------------------------------------------------------------

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Hand a new connection to the reception (no thread of its own), or refuse it with 503."""
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(0.5)
                request.sendall(error_response(HTTPStatus.SERVICE_UNAVAILABLE,
                                               f"server busy: {self.max_connections} connections open"))
                request.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            request.close()
            return
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # answers are single small writes
        conn = Connection(request, client_address)
        reception = self._reception
        if reception is None:
            self.close_connection(conn)
        else:
            reception.admit(conn)

    def close_connection(self, conn: Connection) -> None:
        """Close a connection and free its slot; closing twice does nothing."""
        if conn.closed:
            return
        conn.closed = True
        try:
            conn.sock.close()
        finally:
            self._slots.release()

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            self._answer(*job)

    def _answer(self, conn: Connection, request: bytes) -> None:
        """Run the handler on one complete request and send its answer in one write."""
        try:
            handler = RetrievalHandler(request, conn.address, self)
            reply, close = handler.wfile.getvalue(), handler.close_connection
        except Exception:  # noqa: BLE001 (a bug must cost one answer, not the worker)
            self.handle_error(conn.sock, conn.address)
            reply, close = error_response(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error"), True
        try:
            conn.sock.settimeout(self.write_timeout)
            conn.sock.sendall(reply)
        except OSError:
            self.close_connection(conn)
            return
        reception = self._reception
        if reception is None or not reply:  # stopping, or no request line: nothing to answer or drain
            self.close_connection(conn)
        else:
            reception.admit(conn, linger=close)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # a client gave up (timeout) and hung up
            return
        super().handle_error(request, client_address)
