"""Client of a Search-R1-style retrieval server (the search tool when retrieval runs in its own process).

The protocol is Search-R1's: `POST /retrieve` with `{"queries": [...], "topk": k, "return_scores": true}`
answers `{"result": [[{"document": {"id": ..., "contents": "\\"Title\\"\\ntext"}, "score": s}, ...], ...]}`,
one list per query. Documents may also carry `title` and `text` (tracerl's server sends both).

An unreachable, slow or malformed server is an infrastructure fault, never a wrong answer of the
policy: the client retries with exponential backoff and then raises `RetrievalError`, which stops the
rollout (the environment step raises) instead of scoring the episode 0.

`timeout` is a deadline for a whole attempt — connect, send, status line, headers and the whole body —
not a limit per socket read: a per-read timeout (what `requests` offers) never fires on a server that
sends one byte every second, and such a server would hang a rollout for good. Each send and receive
gets as its socket timeout whatever is left of the deadline. The HTTP exchange itself is the standard
library's `http.client`, with one keep-alive connection reused per idle caller.
"""

from __future__ import annotations

import http.client
import io
import json
import math
import select
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from tracerl.errors import TracerlError
from tracerl.tools.corpus import split_contents


class RetrievalError(TracerlError):
    """The retrieval server could not be reached or answered something unusable."""


class _ConnectFailed(Exception):
    """Connecting failed (so nothing was sent): the server is down or the address is wrong."""


def document_from_wire(item: Any) -> dict[str, Any]:
    """One `{"document": {...}, "score": s}` entry (or a bare document) -> id, title, text, score."""
    doc, score = (item.get("document"), item.get("score")) if isinstance(item, dict) and "document" in item else (item, None)
    if not isinstance(doc, dict):
        raise ValueError(f"a result entry must be an object with a 'document', got {type(doc).__name__}")
    if isinstance(doc.get("title"), str) and isinstance(doc.get("text"), str):
        title, text = doc["title"], doc["text"]
    elif isinstance(doc.get("contents"), str):
        title, text = split_contents(doc["contents"])
    else:
        raise ValueError("a document needs 'contents' or 'title' and 'text'")
    if score is not None and (not isinstance(score, (int, float)) or isinstance(score, bool)):
        raise ValueError(f"a score must be a number, got {type(score).__name__}")
    return {"id": str(doc.get("id", "")), "title": title, "text": text,
            "score": None if score is None else float(score)}


class _DeadlineSocket:
    """A connected socket whose every send and receive times out at the owner's deadline.

    http.client reads the status line and headers with `readline`, which loops over receives until a
    newline; arming each receive with the time left (instead of a fixed timeout) is what bounds the
    whole answer."""

    def __init__(self, sock: Any, owner: "_DeadlineMixin"):
        self._sock, self._owner = sock, owner

    def _arm(self) -> None:
        left = self._owner.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self._sock.settimeout(left)

    def sendall(self, data: bytes) -> None:
        self._arm()
        self._sock.sendall(data)  # since Python 3.5 the timeout bounds the whole sendall

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        self._arm()
        return self._sock.recv_into(buffer, nbytes)

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        self._sock.close()

    def __getattr__(self, name: str) -> Any:  # fileno, setsockopt, ...
        return getattr(self._sock, name)


class _DeadlineReader(io.RawIOBase):
    """The raw stream under http.client's response reader: receives through the deadline socket."""

    def __init__(self, sock: _DeadlineSocket):
        super().__init__()
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._sock.recv_into(buffer)


class _DeadlineMixin:
    """An http.client connection whose socket obeys `deadline` (time.monotonic() seconds)."""

    deadline: float = math.inf
    sock: Any
    timeout: float | None

    def connect(self) -> None:
        self.timeout = max(1e-3, self.deadline - time.monotonic())
        super().connect()  # type: ignore[misc]
        self.sock = _DeadlineSocket(self.sock, self)


class _HTTPConnection(_DeadlineMixin, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineMixin, http.client.HTTPSConnection):
    pass


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle keep-alive connection was closed by the server (readable while idle = EOF)."""
    if conn.sock is None:
        return True
    try:
        return bool(select.select([conn.sock.fileno()], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class RetrievalClient:
    """`search` / `search_batch` like `BM25Search`, answered by a server over HTTP.

    url: the server's base URL (`http://127.0.0.1:8000`) or its `/retrieve` endpoint.
    timeout: seconds for a whole attempt (connect, send, and the complete answer); retries: extra
    attempts after the first (after a connection error, a timeout, HTTP 5xx / 429 or a malformed answer);
    backoff: seconds before the first retry, doubled for each further one. A request therefore gives up
    after at most (retries + 1) * timeout + backoff * (2 ** retries - 1) seconds. Thread-safe."""

    def __init__(self, url: str, top_k: int = 3, timeout: float = 10.0, retries: int = 3, backoff: float = 0.5):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"need timeout > 0, retries >= 0, backoff >= 0; got {timeout}, {retries}, {backoff}")
        url = url.rstrip("/")
        self.url = url if url.endswith("/retrieve") else url + "/retrieve"
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"retrieval server URL must be http(s)://host[:port][/retrieve], got {url!r}")
        self._connection_class = _HTTPSConnection if parts.scheme == "https" else _HTTPConnection
        self._host, self._port = parts.hostname, parts.port
        self._path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.top_k, self.timeout, self.retries, self.backoff = top_k, timeout, retries, backoff
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def search(self, query: str, k: int | None = None) -> list[dict[str, Any]]:
        """The k best documents (default top_k) as dicts with id, title, text, score."""
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: list[str], k: int | None = None) -> list[list[dict[str, Any]]]:
        """One request for several queries; raises RetrievalError once the retries are spent."""
        if not queries:
            return []
        k = self.top_k if k is None else k
        if k <= 0:
            return [[] for _ in queries]
        payload = {"queries": [q if isinstance(q, str) else "" for q in queries], "topk": k, "return_scores": True}
        body = json.dumps(payload).encode("utf-8")
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                status, answer = self._post(body, time.monotonic() + self.timeout)
            except TimeoutError:
                problem = f"no complete answer within {self.timeout:g} s"
                continue
            except _ConnectFailed as e:
                problem = f"cannot connect ({e})"
                continue
            except (OSError, http.client.HTTPException) as e:
                problem = f"connection lost or broken answer ({type(e).__name__})"
                continue
            if status >= 500 or status == 429:
                problem = f"HTTP {status}"
                continue
            if status != 200:  # a client error will not heal by retrying
                raise RetrievalError(f"retrieval server {self.url} refused the request: HTTP "
                                     f"{status} {answer[:200].decode('utf-8', 'replace')!r}")
            try:
                return self._parse(answer, len(queries))
            except (ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep to decode
                problem = f"malformed answer ({type(e).__name__}: {str(e)[:200]})"
        raise RetrievalError(f"retrieval server {self.url} failed after {self.retries + 1} attempts: {problem}; "
                             "is `tracerl serve-retriever` (or Search-R1's retrieval server) running there?")

    def _post(self, body: bytes, deadline: float) -> tuple[int, bytes]:
        """(status, body) of one POST finished before `deadline`, on an idle connection or a new one.

        A reused connection the server closed just as it was taken fails before any answer; the request
        (a pure lookup, safe to repeat) then goes once more on a fresh connection, not counted as a retry."""
        conn = self._take_idle()
        if conn is not None:
            try:
                return self._exchange(conn, body, deadline)
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                pass
        conn = self._connection_class(self._host, self._port)
        conn.deadline = deadline
        try:
            conn.connect()
        except TimeoutError:
            conn.close()
            raise
        except OSError as e:
            conn.close()
            raise _ConnectFailed(type(e).__name__) from None
        return self._exchange(conn, body, deadline)

    def _exchange(self, conn: Any, body: bytes, deadline: float) -> tuple[int, bytes]:
        conn.deadline = deadline
        try:
            conn.request("POST", self._path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = response.read()
        except BaseException:
            conn.close()
            raise
        if response.will_close:
            conn.close()
        else:
            with self._lock:
                self._idle.append(conn)
        return response.status, answer

    def _take_idle(self) -> http.client.HTTPConnection | None:
        """An idle keep-alive connection the server has not closed, or None."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                conn = self._idle.pop()
            if not _dropped(conn):
                return conn
            conn.close()

    @staticmethod
    def _parse(answer: bytes, n: int) -> list[list[dict[str, Any]]]:
        body = json.loads(answer)  # raises a ValueError subclass on broken JSON
        result = body.get("result") if isinstance(body, dict) else None
        if not isinstance(result, list) or len(result) != n:
            raise ValueError(f"expected {{'result': [...]}} with {n} lists")
        out = []
        for hits in result:
            if not isinstance(hits, list):
                raise ValueError("each query's result must be a list")
            out.append([document_from_wire(h) for h in hits])
        return out

    def close(self) -> None:
        """Close the idle keep-alive connections."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
