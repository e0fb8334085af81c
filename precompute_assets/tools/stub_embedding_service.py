"""An OpenAI-compatible ``POST /v1/embeddings`` stub that answers at once with a fixed unit vector per input, run
in a process of its own on 127.0.0.1: ``bench embed`` measures the HTTP backend's own pipeline against it."""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _serve(port_out, dim: int) -> None:  # pragma: no cover - runs in the child process
    vector = json.dumps([1.0] + [0.0] * (dim - 1))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            items = ",".join(
                f'{{"object":"embedding","index":{i},"embedding":{vector}}}' for i in range(len(body["input"]))
            )
            payload = f'{{"object":"list","data":[{items}],"model":"stub"}}'.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port_out.put(server.server_address[1])
    server.serve_forever()


@contextmanager
def stub_embedding_service(dim: int = 384) -> Iterator[str]:
    """The stub's base URL while the block runs; the process is stopped on every exit path."""
    context = multiprocessing.get_context("spawn")
    port = context.Queue()
    process = context.Process(target=_serve, args=(port, dim), daemon=True)
    process.start()
    try:
        yield f"http://127.0.0.1:{port.get(timeout=60)}"
    finally:
        process.terminate()
        process.join(timeout=10)
