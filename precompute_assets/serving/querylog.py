"""Query logging: prediction queries appended to a Redis Stream in batches, written off the caller's path.

A stream entry holds up to ``ENTRY_EVENTS`` queries of one flush: ``n`` the count, ``cols`` the comma-separated
column names (``LOG_COLUMNS``) and ``rows`` a JSON array of rows, one array of values per query in ``cols``
order, ``null`` where a value is unknown. Columns: ``ts`` query time in ms since the epoch, ``kind``, ``key``,
``hit`` (``1``/``0``), ``lat_us`` lookup latency in microseconds, ``user`` / ``tenant`` when known, ``ver`` the
published version the lookup read (null when the kind had none), and ``arm``, the A/B experiment arm of the key,
when an experiment is active for the kind (see ``keys.Experiment``). One entry per query cost Redis an ``XADD``
per lookup and the service process the packing of one: about a third of Redis's CPU and the lookups' p999 under
load. ``expand_entries`` turns entries back into one field mapping per query, and still reads an entry of the
earlier one-query-per-entry form (the fields above as entry fields). The stream ID is the arrival time, so an
hour of logs is one ``XRANGE``. ``{ns}:1:stats:{kind}`` counts hits/misses.

Logging never breaks or blocks the caller: a query is queued as one tuple in a bounded in-memory buffer. The
lookup that fills an entry sends it itself, with one non-blocking ``send`` on the logger's own connection (about
35 us of Python per 64 lookups); a background thread sends the rest every ``flush_interval_s``, whatever a caller
could not send without blocking, and reads the replies. A writer thread that did all the work competed with the
lookups for the GIL and the cores: it tripled their p999 under load. When Redis is down or the buffer is full,
queries are counted as dropped, never retried without bound.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import socket
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from .connection import REDIS_ERRORS, pack_resp
from .keys import ARM_PATTERN, KIND_PATTERN, VERSION_PATTERN, KeySchema

MAX_KEY_LENGTH = 256
MAX_CLOCK_SKEW_MS = 3_600_000  # an event's own time may trail its arrival by at most an hour
PR_SET_TIMERSLACK = 29  # Linux prctl: the calling thread's timer slack in ns (default 50,000)
LOG_COLUMNS = ("ts", "kind", "key", "hit", "lat_us", "user", "tenant", "arm", "ver")
ENTRY_EVENTS = 64  # queries per stream entry: its JSON takes the flushing thread about 35 us to build
ENTRY_ERROR = b"_error"  # in an expanded entry: why the entry or its row could not be read (see validate_entry)
_COLS = ",".join(LOG_COLUMNS).encode()


def fine_timer_slack() -> bool:
    """Give the calling thread a timer slack of 1 ns (Linux; elsewhere nothing): its ``sleep(0)`` GIL hand-over
    then takes about 30 us instead of about 90 us (the default 50 us slack plus the wake-up), so the flushing
    thread gives a lookup waiting for the GIL its turn sooner. Only this thread's timers change. True when it
    was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


@dataclass
class LoggerStats:
    """Counters: ``logged`` and ``dropped_buffer_full`` are kept by callers (under a lock, since callers may
    share a logger across threads), the others by the flushing thread."""

    logged: int = 0
    written: int = 0
    dropped_buffer_full: int = 0
    dropped_write_failed: int = 0
    flush_errors: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_buffer_full + self.dropped_write_failed


class QueryLogger:
    """Appends query events to the query-log stream from a background thread.

    ``clock`` returns milliseconds since the epoch; pass a simulated clock to replay traffic into the past,
    in which case stream IDs are derived from the event times (single writer only). ``stream_maxlen`` caps the
    stream's entries (each up to ``ENTRY_EVENTS`` queries).
    """

    pack_chunk = 1  # commands packed and sent between GIL hand-overs: one entry's JSON is work enough
    caller_flush = True  # full entries are sent by the lookup's own thread (``_caller_flush``)

    def __init__(
        self,
        client: redis.Redis,
        schema: KeySchema | None = None,
        *,
        max_buffer: int = 100_000,
        batch_size: int = 1000,
        flush_interval_s: float = 0.05,
        stream_maxlen: int = 10_000_000,
        clock: Callable[[], int] | None = None,
        backoff_s: float = 1.0,
    ) -> None:
        self.client = client
        self.schema = schema or KeySchema()
        self.max_buffer = max_buffer
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.stream_maxlen = stream_maxlen
        self.clock = clock or (lambda: time.time_ns() // 1_000_000)
        self.explicit_ids = clock is not None
        self.backoff_s = backoff_s
        self.stats = LoggerStats()
        self._stream = self.schema.query_log().encode()
        self._maxlen = str(stream_maxlen).encode()
        self._buffer: deque = deque()  # rows in LOG_COLUMNS order (the event logger: UserEvents)
        self._last_id = (0, 0)
        self._retry_at = 0.0
        self._lock = threading.Lock()  # the connection and the counts of what was sent: one writer at a time
        self._connection: Any = None  # the logger's own connection, kept (not returned to the pool between writes)
        self._sent: deque[int] = deque()  # per command sent and not yet answered: the queries it writes
        self._unsent = b""  # the rest of what a caller's non-blocking send could not hand to the kernel
        pool = getattr(client, "connection_pool", None)
        self._direct = isinstance(client, redis.Redis) and pool is not None
        self._caller_sends = (
            self.caller_flush and self._direct and not issubclass(pool.connection_class, redis.SSLConnection)
        )
        self._count_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="query-logger", daemon=True)
        self._thread.start()

    def log(
        self,
        kind: str,
        key: str,
        *,
        hit: bool,
        latency_us: int = 0,
        user: str | None = None,
        tenant: str | None = None,
        arm: str | None = None,
        version: str | None = None,
    ) -> None:
        """Queue one event (``version``: the published version the lookup read); never raises, never blocks."""
        with self._count_lock:  # callers share the logger across threads; `+=` alone can lose counts
            self.stats.logged += 1
            if len(self._buffer) >= self.max_buffer:
                self.stats.dropped_buffer_full += 1
                return
        self._buffer.append((self.clock(), kind, key, 1 if hit else 0, latency_us, user, tenant, arm, version))
        self._queued()

    def log_many(
        self,
        kind: str,
        keys: Sequence[str],
        hits: Sequence[bool],
        *,
        latency_us: int = 0,
        user: str | None = None,
        tenant: str | None = None,
        arms: Sequence[str | None] | None = None,
        version: str | None = None,
    ) -> None:
        """Queue one event per key of a batch lookup (one time, one latency), under one lock; never raises."""
        with self._count_lock:
            self.stats.logged += len(keys)
            room = max(0, self.max_buffer - len(self._buffer))
            self.stats.dropped_buffer_full += max(0, len(keys) - room)
        now = self.clock()
        if arms is None:
            self._buffer.extend(
                (now, kind, key, 1 if hit else 0, latency_us, user, tenant, None, version)
                for key, hit in zip(keys[:room], hits[:room], strict=True)
            )
        else:
            self._buffer.extend(
                (now, kind, key, 1 if hit else 0, latency_us, user, tenant, arm, version)
                for key, hit, arm in zip(keys[:room], hits[:room], arms[:room], strict=True)
            )
        self._queued()

    def _queued(self) -> None:
        if len(self._buffer) >= ENTRY_EVENTS and self._caller_sends:
            self._caller_flush()
        elif len(self._buffer) >= self.batch_size:
            self._wake.set()

    @property
    def pending(self) -> int:
        """Events buffered and not yet sent."""
        return len(self._buffer)

    def flush(self) -> None:
        """Send everything buffered now and read Redis's replies (what Redis refuses is dropped, counted)."""
        with self._lock:
            self._write_all()

    def close(self) -> None:
        """Flush, stop the background thread and give the connection back."""
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)
        with self._lock:
            self._write_all()
            # Whatever Redis would not take (backoff after a failure) is counted, not silently discarded.
            self.stats.dropped_write_failed += len(self._buffer)
            self._buffer.clear()
            if self._connection is not None:
                self._connection.disconnect()
                self.client.connection_pool.release(self._connection)
                self._connection = None

    def _run(self) -> None:
        fine_timer_slack()
        if self._caller_sends:
            with self._lock:  # connect now, so that callers can send from their first full entry
                try:
                    self._connect()
                except REDIS_ERRORS:
                    self._fail()
        while not self._stopped:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            if not self._stopped:
                with self._lock:
                    self._write_all()

    def _caller_flush(self) -> None:
        """On the caller's thread, once ``ENTRY_EVENTS`` queries are buffered: send the full entries with one
        non-blocking ``send`` and read the replies that have already arrived; whatever would block (the thread
        holds the connection, it is not connected yet, Redis is failing or slow to read) is left to the thread.
        Building an entry is about 35 us of Python per 64 lookups, on the lookup's own thread: no second thread
        competes for the GIL or a core on the request path (it did, and tripled the lookups' p999 under load)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            connection = self._connection
            if connection is None or self._unsent or time.monotonic() < self._retry_at:
                return
            self._read_replies(block=False)
            if self._connection is None:
                return
            rows = [self._buffer.popleft() for _ in range(len(self._buffer) // ENTRY_EVENTS * ENTRY_EVENTS)]
            commands = list(self._commands(rows))
            self._sent.extend(events for _, events in commands)
            payload = pack_resp([command for command, _ in commands])
            try:
                sent = connection._sock.send(payload, socket.MSG_DONTWAIT)  # no _sock: AttributeError, an OSError
            except BlockingIOError:
                sent = 0
            except (OSError, AttributeError):
                self._fail()
                return
            if sent < len(payload):
                self._unsent = payload[sent:]
                self._wake.set()
        finally:
            self._lock.release()

    def _write_all(self) -> None:
        """(Holding ``_lock``.) Send what is buffered, ``batch_size`` queries at a time, and read every reply; after
        a failure, nothing is sent for ``backoff_s``: the buffer fills up and sheds what does not fit."""
        if self._unsent:
            try:
                self._connection.send_packed_command([self._unsent], check_health=False)
                self._unsent = b""
            except REDIS_ERRORS:
                self._fail()
        while self._buffer and time.monotonic() >= self._retry_at:
            batch = [self._buffer.popleft() for _ in range(min(self.batch_size, len(self._buffer)))]
            if not self._direct:
                self._write_pipeline(batch)
                continue
            try:
                self._send(batch)
            except REDIS_ERRORS:
                self._fail()
        self._read_replies(block=True)

    def _send(self, batch: list) -> None:
        """(Holding ``_lock``.) Send ``batch``'s commands on the logger's connection (connecting if needed),
        ``pack_chunk`` commands at a time with the GIL handed over after each: a lookup waiting for the GIL waits
        for at most one chunk's Python work (``fine_timer_slack`` keeps each hand-over short). The replies are read
        by ``_read_replies``."""
        queued = 0  # queries of the batch whose command is counted in _sent (_fail counts those as dropped)
        try:
            if self._connection is None:
                self._connect()
            connection, chunk = self._connection, []
            for command, events in self._commands(batch):
                chunk.append(command)
                self._sent.append(events)
                queued += events
                if len(chunk) == self.pack_chunk:
                    connection.send_packed_command([pack_resp(chunk)], check_health=False)
                    chunk = []
                    time.sleep(0)  # hand the GIL to a lookup waiting for it
            if chunk:
                connection.send_packed_command([pack_resp(chunk)], check_health=False)
        except REDIS_ERRORS:
            self.stats.dropped_write_failed += len(batch) - queued
            raise

    def _connect(self) -> None:
        """(Holding ``_lock``.) Open the logger's own connection. Callers send on it only if its socket is a plain
        TCP or Unix one (not TLS, not a test double); otherwise the thread sends everything."""
        self._connection = self.client.connection_pool.get_connection()
        self._caller_sends = self._caller_sends and type(self._connection._sock) is socket.socket

    def _read_replies(self, *, block: bool) -> None:
        """(Holding ``_lock``.) Read the replies of the commands sent, counting their queries as written or, for an
        error reply, dropped (then back off); without ``block``, only those that have arrived."""
        connection, index = self._connection, 0
        while self._sent and connection is not None:
            try:
                if not block and not connection.can_read(0):
                    return
                try:
                    connection.read_response()
                    self.stats.written += self._sent.popleft()
                except redis.ResponseError:
                    self.stats.dropped_write_failed += self._sent.popleft()
                    self.stats.flush_errors += 1
                    self._retry_at = time.monotonic() + self.backoff_s
            except REDIS_ERRORS:
                self._fail()
                return
            index += 1
            if block and index % 8 == 0:
                time.sleep(0)

    def _fail(self) -> None:
        """(Holding ``_lock``.) The connection failed: what was sent and not answered is counted as dropped, the
        connection is dropped (the thread reconnects after ``backoff_s``)."""
        self.stats.dropped_write_failed += sum(self._sent)
        self.stats.flush_errors += 1
        self._sent.clear()
        self._unsent = b""
        self._retry_at = time.monotonic() + self.backoff_s
        if self._connection is not None:
            self._connection.disconnect()
            self.client.connection_pool.release(self._connection)
            self._connection = None

    def _write_pipeline(self, batch: list) -> None:
        """A client without a plain connection pool (a cluster): ``batch`` through its pipeline, replies at once."""
        pipe = self.client.pipeline(transaction=False)
        commands = list(self._commands(batch))
        for command, _ in commands:
            pipe.execute_command(*command)
        try:
            replies = pipe.execute(raise_on_error=False)
        except REDIS_ERRORS:
            self.stats.dropped_write_failed += len(batch)
            self.stats.flush_errors += 1
            self._retry_at = time.monotonic() + self.backoff_s
            return
        for (_, events), reply in zip(commands, replies, strict=True):
            if isinstance(reply, Exception):
                self.stats.dropped_write_failed += events
                self.stats.flush_errors += 1
                self._retry_at = time.monotonic() + self.backoff_s
            else:
                self.stats.written += events

    def _xadd(self, entry_id: str, fields: Iterable[tuple[bytes, bytes]]) -> tuple[bytes, ...]:
        """``XADD stream MAXLEN ~ N id field value ...`` (approximate trimming: exact trimming costs Redis a
        listpack rewrite on every add)."""
        args = [b"XADD", self._stream, b"MAXLEN", b"~", self._maxlen, entry_id.encode()]
        for name, value in fields:
            args += (name, value)
        return tuple(args)

    def _commands(self, batch: list[tuple]) -> Iterator[tuple[tuple[bytes, ...], int]]:
        """``(command, queries it writes)``: an ``XADD`` per ``ENTRY_EVENTS`` rows (on a simulated clock, also per
        second of query time, so an entry's ID stays within a second of its queries' times), then one ``HINCRBY``
        per kind and outcome."""
        counts: Counter[tuple[str, int]] = Counter((row[1], row[3]) for row in batch)
        for entry_id, rows in self._entries(batch):
            payload = json.dumps(rows, separators=(",", ":"), default=str).encode()
            yield self._xadd(entry_id, ((b"n", b"%d" % len(rows)), (b"cols", _COLS), (b"rows", payload))), len(rows)
        for (kind, hit), n in counts.items():
            yield (b"HINCRBY", self.schema.stats(kind).encode(), b"hit" if hit else b"miss", b"%d" % n), 0

    def _entries(self, batch: list[tuple]) -> Iterator[tuple[str, list[tuple]]]:
        if not self.explicit_ids:
            for start in range(0, len(batch), ENTRY_EVENTS):
                yield "*", batch[start : start + ENTRY_EVENTS]
            return
        rows: list[tuple] = []
        for row in batch:
            if rows and not (rows[0][0] <= row[0] < rows[0][0] + 1000 and len(rows) < ENTRY_EVENTS):
                yield self._next_id(rows[0][0]), rows
                rows = []
            rows.append(row)
        if rows:
            yield self._next_id(rows[0][0]), rows

    def _next_id(self, ts_ms: int) -> str:
        """The next explicit stream ID for an entry whose first event happened at ``ts_ms``: never below the last."""
        ms, seq = self._last_id
        self._last_id = (ts_ms, 0) if ts_ms > ms else (ms, seq + 1)
        return f"{self._last_id[0]}-{self._last_id[1]}"


def log_prediction_query(
    kind: str, logger: QueryLogger, *, key_arg: int | str = 0
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a live prediction function so that every call logs a query (a miss: computed live).

    The key is the positional argument at index ``key_arg`` or the keyword argument named ``key_arg``;
    ``user=`` / ``tenant=`` keyword arguments of the call are logged when present.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            key = kwargs[key_arg] if isinstance(key_arg, str) else args[key_arg]
            with query_logger(logger, kind, str(key), user=kwargs.get("user"), tenant=kwargs.get("tenant")):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


@dataclass
class QueryRecord:
    """What a ``query_logger`` block reports; set ``hit = True`` when the answer came from a cache."""

    hit: bool = False


@contextlib.contextmanager
def query_logger(
    logger: QueryLogger,
    kind: str,
    key: str,
    *,
    user: str | None = None,
    tenant: str | None = None,
    arm: str | None = None,
) -> Iterator[QueryRecord]:
    """Time the block and log one query event for it, even when the block raises (``arm``: the key's A/B arm)."""
    record = QueryRecord()
    start = time.perf_counter_ns()
    try:
        yield record
    finally:
        latency_us = (time.perf_counter_ns() - start) // 1000
        logger.log(kind, key, hit=record.hit, latency_us=latency_us, user=user, tenant=tenant, arm=arm)


# --- reading the stream back (used by the query_logs asset) -------------------------------------------


def read_stream_window(
    client: redis.Redis,
    schema: KeySchema,
    start_ms: int,
    end_ms: int,
    *,
    page: int = 10_000,
    stream: str | None = None,
) -> Iterator[list[tuple[bytes, dict[bytes, bytes]]]]:
    """Yield pages of entries of ``stream`` (default: the query log) that arrived in ``[start_ms, end_ms)``, in
    ID order; the same window reads the same entries (idempotent)."""
    stream = stream or schema.query_log()
    lower: str = f"{start_ms}-0"
    upper = f"{end_ms - 1}-18446744073709551615"
    while True:
        entries = client.xrange(stream, min=lower, max=upper, count=page)
        if not entries:
            return
        yield entries
        if len(entries) < page:
            return
        lower = "(" + entries[-1][0].decode()


def expand_entries(
    entries: Iterable[tuple[bytes, dict[bytes, bytes]]],
) -> Iterator[tuple[bytes, dict[bytes, bytes]]]:
    """One ``(event_id, fields)`` per query of query-log ``entries``: a batch entry's rows as field mappings of the
    one-query form (values as bytes, nulls left out) with the ID ``{entry_id}/{row}``; an entry of the one-query
    form as it is. A batch that cannot be read, or a row of it, comes out once with ``ENTRY_ERROR`` saying why
    (``validate_entry`` quarantines it)."""
    for entry_id, fields in entries:
        payload = fields.get(b"rows")
        if payload is None:
            yield entry_id, fields
            continue
        try:
            columns = [name.encode() for name in fields.get(b"cols", b"").decode("ascii").split(",")]
            rows = json.loads(payload)
        except (UnicodeDecodeError, ValueError) as error:
            yield entry_id, {**fields, ENTRY_ERROR: f"unreadable batch entry: {error}".encode()}
            continue
        if not isinstance(rows, list):
            yield entry_id, {**fields, ENTRY_ERROR: b"unreadable batch entry: rows is not a JSON array"}
            continue
        for index, row in enumerate(rows):
            event_id = b"%s/%d" % (entry_id, index)
            if not isinstance(row, list) or len(row) != len(columns):
                reason = f"batch row is not an array of {len(columns)} values"
                yield event_id, {b"row": json.dumps(row).encode(), ENTRY_ERROR: reason.encode()}
                continue
            event, reason = {}, None
            for name, value in zip(columns, row, strict=True):
                if isinstance(value, str):
                    event[name] = value.encode("utf-8", "surrogatepass")
                elif isinstance(value, int) and not isinstance(value, bool):
                    event[name] = b"%d" % value
                elif value is not None:
                    reason = f"{name.decode()} is a JSON {type(value).__name__}, not a string or an integer"
            if reason:
                event[ENTRY_ERROR] = reason.encode()
            yield event_id, event


def read_newest_queries(
    client: redis.Redis, schema: KeySchema, since_ms: int, *, limit: int, page: int = 1000
) -> Iterator[tuple[bytes, dict[bytes, bytes]]]:
    """The queries (``expand_entries``) of the query-log entries that arrived since ``since_ms``, newest first, at
    most ``limit`` of them, reading ``page`` entries at a time."""
    upper, left = "+", limit
    while left > 0:
        entries = client.xrevrange(schema.query_log(), max=upper, min=f"{since_ms}-0", count=page)
        for entry in entries:
            queries = list(expand_entries([entry]))
            yield from reversed(queries[-left:])
            left -= len(queries)
            if left <= 0:
                return
        if len(entries) < page:
            return
        upper = "(" + entries[-1][0].decode()


def _clean_text(raw: bytes | None, name: str, *, required: bool) -> tuple[str | None, str | None]:
    """Decode a text field; returns (value, reason-if-invalid)."""
    if raw is None:
        return None, (f"missing field {name}" if required else None)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"{name} is not valid UTF-8"
    if required and not text:
        return None, f"empty {name}"
    if len(text) > MAX_KEY_LENGTH:
        return None, f"{name} longer than {MAX_KEY_LENGTH} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return None, f"{name} contains control characters"
    return text, None


def _int_field(raw: bytes | None, name: str) -> tuple[int | None, str | None]:
    if raw is None:
        return None, f"missing field {name}"
    try:
        return int(raw), None
    except ValueError:
        return None, f"{name} is not an integer: {raw[:32]!r}"


def validate_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> tuple[dict[str, Any] | None, str | None]:
    """Turn one query (an entry, or a row of a batch entry, from ``expand_entries``) into a clean row, or return
    the reason it must be quarantined."""
    if ENTRY_ERROR in fields:
        return None, fields[ENTRY_ERROR].decode("utf-8", "replace")
    arrival_ms = int(entry_id.split(b"-")[0])
    ts, reason = _int_field(fields.get(b"ts"), "ts")
    if reason:
        return None, reason
    if not arrival_ms - MAX_CLOCK_SKEW_MS <= ts <= arrival_ms + 1000:
        return None, f"ts {ts} is more than an hour from its arrival {arrival_ms} (or in the future)"
    kind, reason = _clean_text(fields.get(b"kind"), "kind", required=True)
    if reason:
        return None, reason
    if not KIND_PATTERN.fullmatch(kind):
        return None, f"invalid kind {kind!r}"
    key, reason = _clean_text(fields.get(b"key"), "key", required=True)
    if reason:
        return None, reason
    hit = fields.get(b"hit")
    if hit not in (b"0", b"1"):
        return None, "missing field hit" if hit is None else f"hit must be 0 or 1, got {hit[:32]!r}"
    latency, reason = _int_field(fields.get(b"lat_us"), "lat_us")
    if reason:
        return None, reason
    if latency < 0:
        return None, f"negative lat_us {latency}"
    user, reason = _clean_text(fields.get(b"user"), "user", required=False)
    if reason:
        return None, reason
    tenant, reason = _clean_text(fields.get(b"tenant"), "tenant", required=False)
    if reason:
        return None, reason
    arm, reason = _clean_text(fields.get(b"arm"), "arm", required=False)
    if reason:
        return None, reason
    if arm is not None and not ARM_PATTERN.fullmatch(arm):
        return None, f"invalid arm {arm[:64]!r}"
    version, reason = _clean_text(fields.get(b"ver"), "ver", required=False)
    if reason:
        return None, reason
    if version is not None and not VERSION_PATTERN.fullmatch(version):
        return None, f"invalid ver {version[:64]!r}"
    row = {
        "stream_id": entry_id.decode(),
        "ts_ms": ts,
        "kind": kind,
        "key": key,
        "hit": hit == b"1",
        "latency_us": latency,
        "user": user,
        "tenant": tenant,
        "arm": arm,
        "version": version,
    }
    return row, None


def quarantine_row(entry_id: bytes, fields: dict[bytes, bytes], reason: str) -> dict[str, Any]:
    """A quarantine record keeping the raw entry (bytes shown with escapes, truncated) and the reason."""
    raw = {
        k.decode("utf-8", "backslashreplace"): v[:1024].decode("utf-8", "backslashreplace")
        for k, v in fields.items()
        if k != ENTRY_ERROR
    }
    return {"stream_id": entry_id.decode(), "reason": reason, "raw": repr(raw)}
