"""A local embedding inference service for tests: OpenAI ``POST /v1/embeddings`` and TEI ``POST /embed`` on
127.0.0.1, deterministic vectors, and faults injected per request by a plan the test sets.

Faults: ``timeout`` (answers after ``hang_s``), ``reset`` (TCP RST, no answer), ``429`` (with ``Retry-After``),
``500``, ``503``, ``400``, ``garbage`` (a body that is not JSON), and per item ``dim`` (one value short),
``nan`` (a NaN value) and ``missing`` (the item left out).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

REQUEST_FAULTS = ("timeout", "reset", "429", "500", "503", "400", "garbage")
ITEM_FAULTS = ("dim", "nan", "missing")


def vector_of(text: str, dim: int) -> np.ndarray:
    """The service's (unnormalised) vector for ``text``."""
    return np.random.default_rng(zlib.crc32(text.encode())).standard_normal(dim)


class FakeEmbeddingService:
    """``with FakeEmbeddingService(dim=32) as service:`` ... ``service.url``.

    ``plan(texts, request_number)`` returns a request fault or None; ``item_plan(text)`` an item fault or None.
    """

    def __init__(self, dim: int = 32, *, hang_s: float = 1.0, retry_after: str = "1") -> None:
        self.dim, self.hang_s, self.retry_after = dim, hang_s, retry_after
        self.plan: Callable[[list[str], int], str | None] = lambda texts, number: None
        self.item_plan: Callable[[str], str | None] = lambda text: None
        self.requests = 0
        self.attempts: Counter[str] = Counter()  # requests that carried each text
        self.faults: Counter[str] = Counter()
        self.authorization: list[str | None] = []
        self.shuffle = False  # answer OpenAI items out of order (each with its index)
        self.in_flight = self.max_in_flight = 0
        self.delay_s = 0.0
        self._lock = threading.Lock()
        self._release = threading.Event()
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                texts = body["inputs"] if self.path == "/embed" else body["input"]
                with service._lock:
                    number = service.requests
                    service.requests += 1
                    service.attempts.update(texts)
                    service.authorization.append(self.headers.get("Authorization"))
                    service.in_flight += 1
                    service.max_in_flight = max(service.max_in_flight, service.in_flight)
                try:
                    if service.delay_s:
                        service._release.wait(service.delay_s)
                    fault = service.plan(texts, number)
                    if fault:
                        with service._lock:
                            service.faults[fault] += 1
                    self._answer(texts, fault)
                finally:
                    with service._lock:
                        service.in_flight -= 1

            def _answer(self, texts: list[str], fault: str | None) -> None:
                if fault == "timeout":
                    service._release.wait(service.hang_s)
                elif fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                elif fault in ("429", "500", "503", "400"):
                    extra = {"Retry-After": service.retry_after} if fault == "429" else {}
                    return self._send(int(fault), b'{"error": "injected"}', extra)
                elif fault == "garbage":
                    return self._send(200, b'{"data": [', {})
                items: list[tuple[int, list | None]] = []
                for index, text in enumerate(texts):
                    vector = vector_of(text, service.dim).tolist()
                    item_fault = service.item_plan(text)
                    if item_fault:
                        with service._lock:
                            service.faults[item_fault] += 1
                    if item_fault == "missing":
                        continue
                    if item_fault == "dim":
                        vector = vector[:-1]
                    elif item_fault == "nan":
                        vector[3] = float("nan")
                    items.append((index, vector))
                if self.path == "/embed":
                    payload = [vector for _, vector in items]
                else:
                    if service.shuffle:
                        items.reverse()
                    payload = {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": v}
                                                           for i, v in items]}  # fmt: skip
                self._send(200, json.dumps(payload).encode(), {})  # NaN goes out as the NaN literal

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (its timeout)
                    self.close_connection = True

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # the injected resets

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-embeddings", daemon=True
        )

    def __enter__(self) -> FakeEmbeddingService:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def fault_by_title(texts: list[str], number: int) -> str | None:
    """The request fault named by a ``fault-<name>`` title of one of its texts."""
    for text in texts:
        if text.startswith("fault-") and (name := text[6:].split(maxsplit=1)[0]) in REQUEST_FAULTS:
            return name
    return None


def item_fault_by_title(text: str) -> str | None:
    if text.startswith("fault-") and (name := text[6:].split(maxsplit=1)[0]) in ITEM_FAULTS:
        return name
    return None
