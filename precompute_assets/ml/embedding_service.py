"""An embedder backed by an HTTP inference service: OpenAI-compatible ``POST /v1/embeddings`` or
text-embeddings-inference ``POST /embed``. Standard library only (``http.client``, a thread pool).

Texts go out in batches of ``batch_size``, at most ``max_concurrency`` requests at once, each with a socket
timeout of ``timeout_s``. Timeouts, connection errors, 429 (its ``Retry-After`` honoured) and 5xx are retried
up to ``max_retries`` times with exponential backoff and full jitter. A batch that still fails, and every
item of a response that is not a finite vector of the expected dimension (or is missing), is reported per
text with a reason starting ``service:`` (``encode_checked``): never a silently wrong vector. The sync
records those in ``embedding_failures`` and retries them on its next run.

The API key is read from an environment variable (``PRECOMPUTE_EMBEDDING_API_KEY`` by default) and sent as
``Authorization: Bearer``; it is never part of the version, the repr, a reason or a log line.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import http.client
import json
import math
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import numpy as np

from ..serving.urls import split_userinfo
from .embedder import MAX_CHARS

ENV_URL = "PRECOMPUTE_EMBEDDING_URL"
ENV_API_KEY = "PRECOMPUTE_EMBEDDING_API_KEY"
APIS = ("openai", "tei")
REASON_PREFIX = "service:"  # failures the sync retries on its next run

TIMEOUT = "service: timeout"
CONNECTION = "service: connection error"
BAD_RESPONSE = "service: bad response"
WRONG_DIMENSION = "service: wrong dimension"
NON_FINITE = "service: non-finite value"
MISSING_ITEM = "service: missing item"


def http_reason(status: int) -> str:
    return f"service: http {status}"


def is_service_failure(reason: str) -> bool:
    """Whether a failure reason comes from the service (transient: the next sync retries it)."""
    return reason.startswith(REASON_PREFIX)


class EmbeddingServiceError(RuntimeError):
    """``encode`` could not embed every text; ``failures`` maps input positions to reasons."""

    def __init__(self, failures: dict[int, str]) -> None:
        counts: dict[str, int] = {}
        for reason in failures.values():
            counts[reason] = counts.get(reason, 0) + 1
        super().__init__(f"{len(failures)} texts were not embedded: {counts}")
        self.failures = failures


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


class _Fatal(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds (fractions accepted) or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _without_credentials(url: str) -> str:
    """``url`` without user:password (as ``serving.urls.split_userinfo`` reads it, past a password's unencoded '@',
    '/', '?' or '#', and without a '://' too), with its query's values as *** (a service may take its key there:
    ``?code=``, ``?key=``), and without fragment, for the error messages."""
    head, _, rest = split_userinfo(url)
    located, question, query = rest.partition("#")[0].partition("?")
    hidden = "&".join(f"{piece.partition('=')[0]}=***" if "=" in piece else "***" for piece in query.split("&"))
    return f"{head}{located}{question}{hidden if query else ''}"


@dataclass(eq=False)
class HttpEmbedder:
    """Embeddings from an HTTP service; see the module docstring. ``dim`` 0 asks the service once."""

    url: str = ""  # base URL (``http://host:port``) or the full endpoint; "" reads PRECOMPUTE_EMBEDDING_URL
    model: str = ""
    dim: int = 0
    api: str = "openai"  # "openai": POST {url}/v1/embeddings; "tei": POST {url}/embed
    api_key_env: str = ENV_API_KEY
    batch_size: int = 64
    max_concurrency: int = 4
    timeout_s: float = 30.0
    max_retries: int = 5
    backoff_s: float = 0.5  # first retry waits up to this (full jitter), doubling each time
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 120.0  # a longer Retry-After is cut to this
    max_chars: int = MAX_CHARS
    normalize: bool = True  # L2-normalise the returned vectors, as the other embedders do
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    version: str = field(init=False)
    _api_key: str | None = field(init=False, repr=False)
    _basic: str | None = field(init=False, repr=False)
    _local: threading.local = field(init=False, repr=False)

    def __repr__(self) -> str:
        """The dataclass's, with the URL's user info and query values hidden (``_without_credentials``)."""
        shown = (f"{f.name}={getattr(self, f.name) if f.name != 'url' else _without_credentials(self.url)!r}"
                 for f in fields(self) if f.repr)  # fmt: skip
        return f"{type(self).__name__}({', '.join(shown)})"

    def __post_init__(self) -> None:
        self.url = self.url or os.environ.get(ENV_URL, "")
        if not self.url:
            raise ValueError(f"the http embedding backend needs a URL (config url or {ENV_URL})")
        if self.api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {self.api!r}")
        if self.batch_size < 1 or self.max_concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0:
            raise ValueError("batch_size and max_concurrency must be >= 1, max_retries >= 0, timeout_s > 0")
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {_without_credentials(self.url)!r}")
        try:
            port = parts.port
            # urllib ends the authority at a password's '?', '#' or '/' also where what precedes reads as a host:port
            # ("k:2024?x@host": 'k', port 2024; "k:Se@cr/et@host": host 'cr'): its user info must be split_userinfo's
            readable = parts.netloc.rpartition("@")[0] == (split_userinfo(self.url)[1] or "")
        except ValueError:  # urllib's error quotes what followed the ':', a password's start when it holds a '/'
            port, readable = None, False
        if not readable:
            raise ValueError(
                "the embedding service URL's host:port cannot be read: it needs a port from 1 to 65535, and '/', '?', "
                "'#' and '@' in its user name and password percent-encoded (%2F, %3F, %23, %40)"
            )
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, port
        path = parts.path.rstrip("/")
        endpoint = "/v1/embeddings" if self.api == "openai" else "/embed"
        if not path.endswith(endpoint):
            path += endpoint
        self._path = path + (f"?{parts.query}" if parts.query else "")
        self._api_key = os.environ.get(self.api_key_env) or None
        # user:password in the URL is HTTP Basic authentication, as curl reads it (it was never sent: refused)
        userinfo = split_userinfo(self.url)[1]
        self._basic = None if not userinfo else base64.b64encode(urllib.parse.unquote(userinfo).encode()).decode()
        self._local = threading.local()
        if self.dim <= 0:
            self.dim = self.probe_dimension()
        endpoint = f"{parts.scheme}://{self._host}{f':{self._port}' if self._port else ''}{self._path}"
        identity = json.dumps([endpoint, self.model, self.dim])  # not the tuning, never the key
        self.version = f"http:{self.model or self.api}:{self.dim}:{hashlib.sha256(identity.encode()).hexdigest()[:12]}"

    def probe_dimension(self) -> int:
        """The dimension of the service's vectors, from one request."""
        self.dim = 0  # any length is accepted while probing
        vectors = self._embed_batch(["dimension probe"])
        if isinstance(vectors, str):
            raise RuntimeError(f"embedding service at {_without_credentials(self.url)}: {vectors}")
        (vector,) = vectors
        if isinstance(vector, str) or len(vector) == 0:
            raise RuntimeError(f"embedding service at {_without_credentials(self.url)}: no vector to probe")
        return len(vector)

    # -- the Embedder protocol ------------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts``: (n, dim) float32; raises ``EmbeddingServiceError`` if any text failed."""
        vectors, failures = self.encode_checked(texts)
        if failures:
            raise EmbeddingServiceError(failures)
        return vectors

    def encode_checked(self, texts: Sequence[str]) -> tuple[np.ndarray, dict[int, str]]:
        """(n, dim) float32 vectors and ``{position: reason}`` of the texts that failed (their rows are 0)."""
        texts = [t[: self.max_chars] for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        failures: dict[int, str] = {}
        starts = range(0, len(texts), self.batch_size)
        workers = min(self.max_concurrency, len(starts))
        if workers == 0:
            return out, failures

        def run(start: int) -> tuple[int, list[np.ndarray | str] | str]:
            return start, self._embed_batch(texts[start : start + self.batch_size])

        if workers == 1:
            results = map(run, starts)
        else:
            pool = ThreadPoolExecutor(workers, thread_name_prefix="embedding-http")
            results = pool.map(run, starts)
        try:
            for start, result in results:
                size = min(self.batch_size, len(texts) - start)
                for offset in range(size):
                    item = result if isinstance(result, str) else result[offset]
                    if isinstance(item, str):
                        failures[start + offset] = item
                    else:
                        out[start + offset] = item
        finally:
            if workers > 1:
                pool.shutdown()
        return out, failures

    # -- one batch --------------------------------------------------------------------------------------

    def _embed_batch(self, texts: list[str]) -> list[np.ndarray | str] | str:
        """The batch's vectors (or a reason per item), or one reason for the whole batch after retries."""
        body = json.dumps(self._request(texts), ensure_ascii=False).encode()
        reason = ""
        for attempt in range(self.max_retries + 1):
            try:
                return self._parse(self._post(body), len(texts))
            except _Fatal as fatal:
                return fatal.reason
            except _Retryable as error:
                reason = error.reason
                if attempt == self.max_retries:
                    break
                # full jitter: spreads retries of many workers; Retry-After is a floor, not a suggestion
                wait = random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt))
                if error.retry_after is not None:
                    wait = max(wait, min(error.retry_after, self.max_retry_after_s))
                self.sleep(wait)
        return reason

    def _request(self, texts: list[str]) -> object:
        if self.api == "tei":
            return {"inputs": texts, "truncate": True}
        request: dict[str, object] = {"input": texts, "encoding_format": "float"}
        if self.model:
            request["model"] = self.model
        return request

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            connection = cls(self._host, self._port, timeout=self.timeout_s)
            self._local.connection = connection
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            connection.close()

    def _post(self, body: bytes) -> object:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        elif self._basic:
            headers["Authorization"] = f"Basic {self._basic}"
        try:
            connection = self._connection()
            connection.request("POST", self._path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        except TimeoutError as error:  # socket.timeout is TimeoutError
            self._drop_connection()
            raise _Retryable(TIMEOUT) from error
        except (OSError, http.client.HTTPException) as error:  # refused, reset, closed mid-response
            self._drop_connection()
            raise _Retryable(CONNECTION) from error
        if response.will_close:
            self._drop_connection()
        status = response.status
        if status == 429 or status >= 500:
            raise _Retryable(http_reason(status), _retry_after(response.getheader("Retry-After")))
        if status != 200:
            raise _Fatal(http_reason(status))
        try:
            return json.loads(payload)
        except ValueError as error:  # a garbled body, like a dropped connection, may not happen again
            raise _Retryable(BAD_RESPONSE) from error

    def _parse(self, payload: object, n: int) -> list[np.ndarray | str]:
        """One vector or reason per text, in input order."""
        items: list[object] = [None] * n
        if self.api == "tei":
            if not isinstance(payload, list):
                raise _Retryable(BAD_RESPONSE)
            if len(payload) != n:  # a bare list: which text a vector belongs to is unknowable
                return [MISSING_ITEM] * n
            items = payload
        else:
            data = payload.get("data") if isinstance(payload, dict) else None
            if not isinstance(data, list):
                raise _Retryable(BAD_RESPONSE)
            for position, entry in enumerate(data):
                if not isinstance(entry, dict):
                    continue
                index = entry.get("index", position)
                if isinstance(index, int) and 0 <= index < n:
                    items[index] = entry.get("embedding")
        return [self._vector(item) for item in items]

    def _vector(self, item: object) -> np.ndarray | str:
        if item is None:
            return MISSING_ITEM
        if not isinstance(item, list):
            return BAD_RESPONSE
        try:
            vector = np.array(item, dtype=np.float64)  # null -> NaN
        except (TypeError, ValueError):
            return BAD_RESPONSE
        if vector.ndim != 1:
            return BAD_RESPONSE
        if self.dim and len(vector) != self.dim:
            return WRONG_DIMENSION
        if not np.isfinite(vector).all():
            return NON_FINITE
        vector = vector.astype(np.float32)
        if not np.isfinite(vector).all():  # finite in float64, overflows float32
            return NON_FINITE
        if self.normalize:
            norm = float(np.linalg.norm(vector.astype(np.float64)))
            if norm > 0:
                vector /= norm
        return vector

    def close(self) -> None:
        self._drop_connection()


def http_embedder_from_config(config: dict[str, object]) -> HttpEmbedder:
    """An ``HttpEmbedder`` from a saved or Dagster config dict (unknown keys ignored, never an API key)."""
    names = {
        "url", "model", "dim", "api", "api_key_env", "batch_size", "max_concurrency", "timeout_s",
        "max_retries", "backoff_s", "max_backoff_s",
    }  # fmt: skip
    return HttpEmbedder(**{k: v for k, v in config.items() if k in names})
