"""Query logging: prediction queries appended to a Redis Stream in batches, written off the caller's path.

A stream entry holds the queries of one flush, at least ``ENTRY_EVENTS`` of them unless the flush had fewer:
``n`` the number of queries, ``cols`` the comma-separated names of a group's values (``GROUP_COLUMNS``) and
``groups`` a JSON array of groups, one per logging call (a ``get`` logs one key, a ``get_many`` or ``rerank``
all of theirs): ``[ts, kind, keys, hits, lat_us, user, tenant, arms, ver]`` with ``ts`` the query time in ms
since the epoch, ``keys`` an array of keys, ``hits`` a string with one ``1`` (hit) or ``0`` (miss) per key,
``lat_us`` the lookup latency in microseconds, ``user`` / ``tenant`` when known, ``arms`` the A/B experiment
arm of each key (an array, or null outside an experiment: see ``keys.Experiment``) and ``ver`` the published
version the lookup read; null where a value is unknown. One entry per query cost Redis an ``XADD`` per lookup
and the service process the packing of one: about a third of Redis's CPU and the lookups' p999 under load.
``expand_entries`` turns entries back into one field mapping per query (``ts``, ``kind``, ``key``, ``hit``,
``lat_us``, ``user``, ``tenant``, ``arm``, ``ver``), and still reads an entry of the earlier
one-query-per-entry form, whose fields were those. The stream ID is the arrival time, so an hour of logs is one
``XRANGE``. ``{ns}:1:stats:{kind}`` counts hits/misses.

Logging never breaks or blocks the caller: a call is queued as one group in a bounded in-memory buffer. Full
entries go out on the caller's thread with one non-blocking ``send`` on the logger's own connection: while a
``PredictionCache`` lookup waits for Redis (``send_ready``), or from ``log()`` itself for other callers. A
background thread sends the rest every ``flush_interval_s``, whatever a caller could not send without blocking,
and reads the replies. A writer thread that did all the work competed with the
lookups for the GIL and the cores: it tripled their p999 under load. When Redis is down or the buffer is full,
queries are counted as dropped, never retried without bound. Loggers still open when the interpreter exits are
closed (so flushed) on its way out.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import inspect
import json
import os
import socket
import sys
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from .acl import acl_hint
from .connection import REDIS_ERRORS, PendingCluster, cluster_send, is_cluster, pack_resp
from .keys import ARM_PATTERN, KIND_PATTERN, VERSION_PATTERN, KeySchema

MAX_KEY_LENGTH = 256
# A logged key, user or tenant is cut to this many characters: a longer one is quarantined all the same (longer than
# MAX_KEY_LENGTH) and its quarantine shows no more, while a whole request body logged as a key (1 MB) stayed in the
# buffer and in the stream, which Redis never evicts.
LOGGED_TEXT_CHARS = 1024
MAX_CLOCK_SKEW_MS = 3_600_000  # an event's own time may trail its arrival by at most an hour
STALE_MS = MAX_CLOCK_SKEW_MS - 300_000  # a logger drops what it buffered longer (it would arrive past that hour)
# and lead it by at most 5 minutes: the service's clock may run ahead of Redis's (a server whose clock was 2 s fast
# had every query quarantined), while a wrong unit or a clock years off is still caught
MAX_CLOCK_AHEAD_MS = 300_000
FORK_WAIT_S = 5.0  # a fork waits at most this long for the flushing thread to let go of the connection
PR_SET_TIMERSLACK = 29  # Linux prctl: the calling thread's timer slack in ns (default 50,000)
GROUP_COLUMNS = ("ts", "kind", "keys", "hits", "lat_us", "user", "tenant", "arms", "ver")
MAX_LATENCY_US = 2**63 - 1  # the largest ``lat_us`` the lake's int64 ``latency_us`` holds
ENTRY_EVENTS = 64  # queries per stream entry, at least: 64 single lookups' JSON takes about 25 us to build
CALLER_QUERIES = 4 * ENTRY_EVENTS  # at most this much JSON (whole groups) is built and sent by one lookup
ENTRY_ERROR = b"_error"  # in an expanded entry: why the entry or its group could not be read (see validate_entry)
ENTRY_QUERIES = b"_queries"  # ... and how many queries that error stands for, when not one (``queries_of``)
_COLS = ",".join(GROUP_COLUMNS).encode()


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
    dropped_closed: int = 0  # logged after close(): nothing sends them any more
    dropped_stale: int = 0  # buffered past ``STALE_MS`` (a long Redis outage): the drain would quarantine them
    dropped_invalid: int = 0  # a user event whose field has no text (its ``str()`` raised): nothing to record
    # Sent, but the connection failed (or timed out) before Redis's reply: written or not, never twice. Counted as
    # dropped, they made a 3 s stall look like lost queries that all landed.
    unconfirmed: int = 0
    flush_errors: int = 0

    @property
    def dropped(self) -> int:
        return (
            self.dropped_buffer_full
            + self.dropped_write_failed
            + self.dropped_closed
            + self.dropped_stale
            + self.dropped_invalid
        )

    @property
    def not_confirmed(self) -> int:
        """Events not confirmed written: dropped, or sent without a reply (``unconfirmed``), as benchmarks count."""
        return self.dropped + self.unconfirmed


class QueryLogger:
    """Appends query events to the query-log stream from a background thread.

    ``clock`` returns milliseconds since the epoch; pass a simulated clock to replay traffic into the past,
    in which case stream IDs are derived from the event times (single writer only). ``stream_maxlen`` caps the
    stream's entries (each up to ``ENTRY_EVENTS`` queries).
    """

    send_unit = ENTRY_EVENTS  # queries the thread sends per hold of the lock (one entry: ~25 us of Python)
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
        if stream_maxlen < 1:  # MAXLEN ~ 0 trimmed the stream as it was written; a negative one refused every XADD
            raise ValueError(f"stream_maxlen must be at least 1 entry, got {stream_maxlen}")
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
        self._buffer: deque = deque()  # groups in GROUP_COLUMNS order (the event logger: UserEvents)
        self._queued = 0  # queries in the buffer (a group holds len(keys); an event is one)
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
        self.lookup_sends = False  # True: lookups call send_ready while they wait; log() sends only past 4 entries
        self._thread = threading.Thread(target=self._run, name="query-logger", daemon=True)
        self._held_for_fork = False  # _lock is held by this process's fork (``_before_fork``)
        self._thread.start()
        _OPEN.add(self)
        if _in_multiprocessing_child():
            _register_multiprocessing_flush()
        with _FORKABLE_LOCK:
            _FORKABLE.add(self)

    def _before_fork(self) -> None:
        """Hold ``_lock`` across a fork, so that the thread is not inside redis-py then: a child whose parent's thread
        held the connection pool's lock at the fork (taking a connection: the thread connects as soon as it starts,
        so a service that forks its workers right after building the cache often caught it there) inherits the lock
        held and its thread hangs for ever in the pool's fork reset, its queries piling up unsent. Waits at most
        ``FORK_WAIT_S`` for a thread stuck on a silent server."""
        self._held_for_fork = self._lock.acquire(timeout=FORK_WAIT_S)

    def _after_fork_in_parent(self) -> None:
        if self._held_for_fork:
            self._held_for_fork = False
            self._lock.release()

    def _after_fork(self) -> None:
        """In a forked child: the parent's thread is gone, its connection (and the queries buffered and sent on it)
        stay the parent's, and a lock may have been held at the fork. Start afresh with a thread of its own."""
        self._lock = threading.Lock()
        self._held_for_fork = False
        self._count_lock = threading.Lock()
        self._wake = threading.Event()
        self._connection = None  # never closed here: the socket is the parent's too
        self._buffer.clear()
        self._queued = 0
        self._sent.clear()
        self._unsent = b""
        self._retry_at = 0.0
        self.stats = LoggerStats()
        if not self._stopped:
            self._thread = threading.Thread(target=self._run, name=self._thread.name, daemon=True)
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
        arms = None if arm is None else [arm]
        flag = "1" if hit else "0"
        key, user, tenant = _bounded(key), _bounded(user), _bounded(tenant)
        self._queue(1, lambda _: (self.clock(), kind, [key], flag, latency_us, user, tenant, arms, version))
        self._after_queue()  # a full buffer too: sending is what empties it

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
        """Queue one event per key of a batch lookup (one time, one latency) as one group; never raises (keys,
        hits and arms of different lengths are the caller's bug: ``ValueError``)."""
        if len(keys) != len(hits) or (arms is not None and len(arms) != len(keys)):
            raise ValueError("log_many needs one hit (and one arm, when given) per key")
        user, tenant = _bounded(user), _bounded(tenant)

        def group(room: int) -> tuple:
            flags = "".join("1" if hit else "0" for hit in hits[:room])
            kept = None if arms is None else list(arms[:room])
            return (self.clock(), kind, _bounded_keys(keys[:room]), flags, latency_us, user, tenant, kept, version)

        self._queue(len(keys), group)
        self._after_queue()

    def _queue(self, size: int, item: Callable[[int], Any]) -> int:
        """Count ``size`` queries as logged and buffer ``item(room)``, the item of the ``room`` of them that fit (the
        rest are dropped, counted); the room. One hold of the count lock: ``close()`` stops the counting under it
        before its last take, so no query is counted and then buffered after that take, neither sent nor dropped."""
        with self._count_lock:  # callers share the logger across threads; `+=` alone can lose counts
            self.stats.logged += size
            if self._stopped:  # a lookup still finishing after close(), as in a graceful shutdown
                self.stats.dropped_closed += size
                return 0
            room = max(0, min(size, self.max_buffer - self._queued))
            self.stats.dropped_buffer_full += size - room
            if room:
                try:
                    built = item(room)
                except Exception:  # noqa: BLE001 - a value no encoding takes: a logger never raises, the loss is counted
                    self.stats.dropped_invalid += room
                    return 0
                self._buffer.append(built)
                self._queued += room
        return room

    def send_ready(self, *, at_least: int = ENTRY_EVENTS) -> None:
        """Send the full entries buffered, on the caller's thread, if that can be done without blocking and at
        least ``at_least`` queries wait. A serving client calls it while it waits for a lookup's reply
        (``PredictionCache`` does, and sets ``lookup_sends``), so the work overlaps Redis's. Never raises."""
        if self._queued >= at_least and self._caller_sends:
            with contextlib.suppress(Exception):  # logging must never break a lookup; the thread sends the rest
                self._caller_flush()

    def _after_queue(self) -> None:
        if self._caller_sends:  # past four entries when lookups send the log as they wait, else at one
            self.send_ready(at_least=4 * ENTRY_EVENTS if self.lookup_sends else ENTRY_EVENTS)
        elif self._queued >= self.batch_size:
            self._wake.set()

    def _take(self, limit: int) -> tuple[list, int]:
        """Buffered items from the oldest, until they hold ``limit`` queries or the buffer is empty; and how many
        queries they hold. Items buffered longer than ``STALE_MS`` (through a Redis outage) are dropped, counted in
        ``dropped_stale``: the drain would quarantine every one of them as "ts more than an hour before its arrival"
        while the logger counted them ``written``."""
        items, size, stale = [], 0, 0
        # Redis stamps an entry with its arrival; on a simulated clock the entry's ID is its own time: never stale.
        stale_before = -1 if self.explicit_ids else self.clock() - STALE_MS
        while size < limit and self._buffer:
            item = self._buffer.popleft()
            if self._time(item) < stale_before:
                stale += self._size(item)
                continue
            items.append(item)
            size += self._size(item)
        with self._count_lock:
            self._queued -= size + stale
            self.stats.dropped_stale += stale
        return items, size

    @staticmethod
    def _size(item: tuple) -> int:
        return len(item[2])

    @staticmethod
    def _time(item: tuple) -> int:
        return item[0]

    @property
    def pending(self) -> int:
        """Queries buffered and not yet sent."""
        return self._queued

    def flush(self) -> None:
        """Send everything buffered now and read Redis's replies (what Redis refuses is dropped, counted)."""
        self._drain()

    def close(self) -> None:
        """Flush, stop the background thread and give the connection back."""
        _OPEN.discard(self)
        with self._count_lock:  # a query counted by _room from now on is dropped_closed, never left in the buffer
            self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)
        self._drain()
        with self._lock:
            # Whatever Redis would not take (backoff after a failure) is counted, not silently discarded.
            self.stats.dropped_write_failed += self._take(self._queued + 1)[1]
            self.stats.unconfirmed += sum(self._sent)
            self._sent.clear()
            self._unsent = b""
            self._release_connection()

    def _run(self) -> None:
        fine_timer_slack()
        if self._caller_sends:
            with self._lock:  # connect now, so that callers can send from their first full entry
                try:
                    if self._connection is None:  # a flush() right after the start connected already, and sent on it
                        self._connect()
                except REDIS_ERRORS:
                    self._fail()
        while not self._stopped:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            if not self._stopped:
                try:
                    self._drain()
                except Exception:  # noqa: BLE001 - the thread must outlive any one batch; losses are counted
                    self.stats.flush_errors += 1

    def _caller_flush(self) -> None:
        """On the caller's thread, once ``ENTRY_EVENTS`` queries are buffered: send up to ``CALLER_QUERIES`` of them
        with one non-blocking ``send``; whatever would block (the thread holds the connection, it is not connected
        yet, Redis is failing or slow to read: the socket's buffer is full) is left to the thread, which also reads
        the replies. This costs the lookup that fills an entry about 50 us (the JSON and the loopback send), on
        its own thread: no second thread competes for the GIL or a core on the request path (one did, and tripled
        the lookups' p999 under load)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            connection = self._connection
            # _caller_sends again, under the lock: a caller that read it before the thread connected a test double
            # (or a TLS socket) would otherwise send on a socket it cannot use, fail, and back the logger off.
            stalled = connection is None or self._unsent or self._stopped or time.monotonic() < self._retry_at
            if stalled or not self._caller_sends:
                return
            if self._stale():  # the thread reconnects
                self._release_connection()
                self._wake.set()
                return
            commands = self._built(self._take(CALLER_QUERIES)[0])
            if not commands:
                return
            self._sent.extend(events for _, events in commands)
            payload = pack_resp([command for command, _ in commands])
            sock = connection._sock
            try:
                timeout = sock.gettimeout()  # redis-py's socket timeout: a send would wait for room that long
                sock.settimeout(0)
                try:
                    sent = sock.send(payload)
                finally:
                    sock.settimeout(timeout)
            except BlockingIOError:
                sent = 0
            except (OSError, AttributeError):  # AttributeError: the connection has no socket any more
                self._fail()
                return
            if sent < len(payload):
                self._unsent = payload[sent:]
                self._wake.set()
        finally:
            self._lock.release()

    def _built(self, batch: list) -> list[tuple[tuple[bytes, ...], int]]:
        """``_commands`` of ``batch``; a batch whose commands cannot be built (a value no encoding takes) is counted
        as dropped, never raised to a caller or the thread."""
        try:
            return list(self._commands(batch))
        except Exception:  # noqa: BLE001 - a logger never raises; the loss is counted
            self._dropped(sum(self._size(item) for item in batch), back_off=False)
            return []

    def _drain(self) -> None:
        """Send what is buffered now, then read every reply; after a failure, nothing is sent for ``backoff_s``:
        the buffer fills up and sheds what does not fit. The lock is taken for ``send_unit`` queries at a time and
        the GIL handed over between: a lookup in another thread waits for at most one unit's Python work
        (``fine_timer_slack`` keeps each hand-over short), and callers may send their own entries in between."""
        left = self._queued  # callers adding more do not keep the thread here
        while True:
            with self._lock:
                self._send_unsent()
                if left <= 0 or not self._buffer or time.monotonic() < self._retry_at:
                    break
                batch, size = self._take(min(self.send_unit, left))
                left -= size
                if self._direct:
                    self._send(batch)
                else:
                    self._write_pipeline(batch)
            time.sleep(0)  # hand the GIL to a lookup waiting for it
        while True:
            with self._lock:
                self._send_unsent()  # a caller may have sent part of a command since: its reply comes after it
                if not self._read_replies(limit=8):
                    return
            time.sleep(0)

    def _send_unsent(self) -> None:
        """(Holding ``_lock``.) The rest of a caller's partial send, with a blocking write."""
        if self._unsent and self._connection is not None:
            try:
                self._connection.send_packed_command([self._unsent], check_health=False)
                self._unsent = b""
            except REDIS_ERRORS:
                self._fail()

    def _send(self, batch: list) -> None:
        """(Holding ``_lock``.) Send ``batch``'s commands on the logger's connection (connecting if needed), in one
        write; ``_read_replies`` reads the replies. A failure drops the connection and counts the queries."""
        commands = self._built(batch)
        if not commands:
            return
        if self._stale():
            self._release_connection()
        self._sent.extend(events for _, events in commands)
        try:
            if self._connection is None:
                self._connect()
            self._connection.send_packed_command([pack_resp([command for command, _ in commands])], check_health=False)
        except REDIS_ERRORS:
            self._fail()

    def _stale(self) -> bool:
        """(Holding ``_lock``.) Whether the kept connection was closed while idle (Redis's ``timeout``, a proxy): with
        no reply due, anything to read is its end. Checked before a send, as redis-py's pool checks a connection it
        hands out; a batch sent on it was lost."""
        connection = self._connection
        if connection is None or self._sent or self._unsent:
            return False
        if getattr(connection, "_sock", None) is None:
            return True
        try:
            return bool(connection.can_read(timeout=0))
        except (*REDIS_ERRORS, AttributeError):  # AttributeError: a test double without a parser
            return True

    def _connect(self) -> None:
        """(Holding ``_lock``.) Open the logger's own connection. Callers send on it only if its socket is a plain
        TCP or Unix one (not TLS, not a test double); otherwise the thread sends everything."""
        self._connection = self.client.connection_pool.get_connection()
        self._caller_sends = self._caller_sends and type(self._connection._sock) is socket.socket

    def _read_replies(self, *, limit: int) -> bool:
        """(Holding ``_lock``; the thread.) Read at most ``limit`` replies of the commands sent, waiting for each,
        counting their queries as written or, for an error reply, dropped (then back off). True when replies are
        still due."""
        connection = self._connection
        for _ in range(limit):
            if not self._sent or connection is None:
                return False
            try:
                connection.read_response()
                self.stats.written += self._sent.popleft()
            except redis.ResponseError:
                self._dropped(self._sent.popleft())
            except REDIS_ERRORS:
                self._fail()
                return False
        return bool(self._sent) and self._connection is not None

    def _fail(self) -> None:
        """(Holding ``_lock``.) The connection failed: what was sent and not answered is counted as unconfirmed, the
        connection is dropped (the thread reconnects after ``backoff_s``)."""
        self._dropped(sum(self._sent), unconfirmed=True)
        self._sent.clear()
        self._unsent = b""
        self._release_connection()

    def _dropped(self, queries: int, *, back_off: bool = True, unconfirmed: bool = False) -> None:
        """Count ``queries`` as lost to a failed write (``unconfirmed``: sent, their reply lost), and (``back_off``)
        send nothing for ``backoff_s``."""
        if unconfirmed:
            self.stats.unconfirmed += queries
        else:
            self.stats.dropped_write_failed += queries
        self.stats.flush_errors += 1
        if back_off:
            self._retry_at = time.monotonic() + self.backoff_s

    def _release_connection(self) -> None:
        if self._connection is not None:
            self._connection.disconnect()
            self.client.connection_pool.release(self._connection)
            self._connection = None

    def _write_pipeline(self, batch: list) -> None:
        """A client without a plain connection pool (a cluster): ``batch``'s commands, replies at once. A cluster none
        of whose nodes answered yet (``PendingCluster``) is built first; while it cannot be, the batch is dropped and
        the logger backs off. On a cluster the commands go through ``cluster_send``, which never sends again a command
        that may have run: redis-py's cluster pipeline sends again those whose reply timed out (a master that stalled
        for a second), and each such ``XADD`` wrote its queries twice, counted once. A command without a reply is
        counted as unconfirmed (it may have landed: at most once)."""
        if isinstance(self.client, PendingCluster):
            try:
                self.client = self.client.start()
            except REDIS_ERRORS:
                self._dropped(sum(self._size(item) for item in batch))
                return
        commands = self._built(batch)
        try:
            if is_cluster(self.client):
                replies = cluster_send(self.client, [command for command, _ in commands])
            else:
                pipe = self.client.pipeline(transaction=False)
                for command, _ in commands:
                    pipe.execute_command(*command)
                replies = pipe.execute(raise_on_error=False)
        except REDIS_ERRORS:
            self._dropped(sum(self._size(item) for item in batch), unconfirmed=True)
            return
        for (_, events), reply in zip(commands, replies, strict=True):
            if isinstance(reply, Exception):  # an error reply was not written; a lost one may have been
                self._dropped(events, unconfirmed=not isinstance(reply, redis.ResponseError))
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
        """``(command, queries it writes)``: an ``XADD`` per entry of groups holding ``ENTRY_EVENTS`` queries or more
        (on a simulated clock, also per second of query time, so an entry's ID stays within a second of its
        queries' times), then one ``HINCRBY`` per kind and outcome."""
        counts: Counter[tuple[str, bytes]] = Counter()
        for group in batch:
            hits = group[3].count("1")
            counts[(group[1], b"hit")] += hits
            counts[(group[1], b"miss")] += len(group[3]) - hits
        for entry_id, groups, n in self._entries(batch):
            payload = json.dumps(groups, separators=(",", ":"), default=str).encode()
            yield self._xadd(entry_id, ((b"n", b"%d" % n), (b"cols", _COLS), (b"groups", payload))), n
        for (kind, outcome), n in counts.items():
            if n:
                yield (b"HINCRBY", self.schema.stats(kind).encode("utf-8", "surrogatepass"), outcome, b"%d" % n), 0

    def _entries(self, batch: list[tuple]) -> Iterator[tuple[str, list[tuple], int]]:
        """``(entry ID, groups, queries)`` per entry."""
        groups: list[tuple] = []
        n = 0
        for group in batch:
            if groups and (
                n >= ENTRY_EVENTS or (self.explicit_ids and not groups[0][0] <= group[0] < groups[0][0] + 1000)
            ):
                yield self._entry_id(groups[0][0]), groups, n
                groups, n = [], 0
            groups.append(group)
            n += len(group[2])
        if groups:
            yield self._entry_id(groups[0][0]), groups, n

    def _entry_id(self, ts_ms: int) -> str:
        return self._next_id(ts_ms) if self.explicit_ids else "*"

    def _next_id(self, ts_ms: int) -> str:
        """The next explicit stream ID for an entry whose first event happened at ``ts_ms``: never below the last."""
        ms, seq = self._last_id
        self._last_id = (ts_ms, 0) if ts_ms > ms else (ms, seq + 1)
        return f"{self._last_id[0]}-{self._last_id[1]}"


def stream_ms(entry_id: str | bytes) -> int:
    """When the stream entry ``entry_id`` (``MILLISECONDS-SEQUENCE``, as text or bytes) arrived, in ms since the
    epoch."""
    return int(entry_id.split(b"-" if isinstance(entry_id, bytes) else "-", 1)[0])


def _bounded(text: Any) -> Any:
    """``text`` cut to ``LOGGED_TEXT_CHARS`` characters (anything else as it is)."""
    return text[:LOGGED_TEXT_CHARS] if isinstance(text, str) and len(text) > LOGGED_TEXT_CHARS else text


def _bounded_keys(keys: Sequence[Any]) -> list[Any]:
    """``_bounded`` of each key, in a new list (one pass at C speed when none is too long)."""
    try:
        if max(map(len, keys), default=0) <= LOGGED_TEXT_CHARS:
            return list(keys)
    except TypeError:  # a key without a length: written as it is, quarantined downstream
        pass
    return [_bounded(key) for key in keys]


_OPEN: weakref.WeakSet[QueryLogger] = weakref.WeakSet()  # the loggers not closed yet, closed at exit


@atexit.register
def _close_at_exit() -> None:
    """Close (so flush) every logger still open when the interpreter exits: a service whose worker returns or calls
    ``sys.exit`` without ``close()`` (gunicorn's workers do, when they are recycled or stopped) lost the queries still
    buffered (up to ``flush_interval_s`` of them), counted nowhere. A forked child closes its own copy."""
    for logger in list(_OPEN):
        with contextlib.suppress(Exception):
            logger.close()


# Every logger not collected yet, closed or not, whose fork methods the process's fork hooks call. One set of hooks per
# process: os.register_at_fork has no unregister, and hooks registered per logger piled up for ever (three per logger).
_FORKABLE: weakref.WeakSet[QueryLogger] = weakref.WeakSet()
# Held by a fork from its before-hook to its after-hooks: no logger is added to the set while a hook goes through it.
_FORKABLE_LOCK = threading.Lock()


class _Token:
    """Something multiprocessing's registry of after-fork calls can hold a weak reference to."""

    registered = False
    finalized_in: int | None = None  # the process whose multiprocessing finalizers close the loggers


_MULTIPROCESSING_TOKEN = _Token()


def _flush_in_multiprocessing_children() -> None:
    """Have each child multiprocessing forks (``Process``, ``Pool``, ``ProcessPoolExecutor``) send what its loggers
    buffered before it exits. Once its target returns it ends with ``os._exit``, past atexit, after multiprocessing's
    own finalizers: the queries it still buffered were lost, counted nowhere. Its fork clears the finalizers the parent
    registered, then runs the after-fork calls registered here, which register one. Only once multiprocessing is
    imported."""
    util = sys.modules.get("multiprocessing.util")
    if util is None or _MULTIPROCESSING_TOKEN.registered:
        return
    util.register_after_fork(_MULTIPROCESSING_TOKEN, lambda _: _register_multiprocessing_flush())
    _MULTIPROCESSING_TOKEN.registered = True


def _register_multiprocessing_flush() -> None:
    """Have this process's multiprocessing finalizers run ``_flush_at_multiprocessing_exit``, once: a child started by
    the ``forkserver`` method (Python 3.14's default on Linux) makes its loggers after its start, and ends with
    ``os._exit`` too."""
    util = sys.modules.get("multiprocessing.util")
    if util is not None and _MULTIPROCESSING_TOKEN.finalized_in != os.getpid():
        util.Finalize(None, _flush_at_multiprocessing_exit, exitpriority=0)
        _MULTIPROCESSING_TOKEN.finalized_in = os.getpid()


def _flush_at_multiprocessing_exit() -> None:
    """What a multiprocessing child's finalizers run once its target returned: wait for its other threads, as Python's
    exit would later (they may log still: a server thread, pending executor work), then send what every open logger
    buffered. The loggers stay open: closed there, a thread's later queries were dropped, and a spawn child's own
    ``atexit`` hooks, which run after the finalizers, could log no more."""
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon and thread.is_alive():
            thread.join()
    for logger in list(_OPEN):
        with contextlib.suppress(Exception):
            logger.flush()


def _in_multiprocessing_child() -> bool:
    process = sys.modules.get("multiprocessing.process")
    return process is not None and process.parent_process() is not None


def _before_fork() -> None:
    """Before a fork: every logger holds its lock across it (``QueryLogger._before_fork``)."""
    _flush_in_multiprocessing_children()
    _FORKABLE_LOCK.acquire()
    for logger in list(_FORKABLE):
        logger._before_fork()


def _after_fork_in_parent() -> None:
    for logger in list(_FORKABLE):
        logger._after_fork_in_parent()
    _FORKABLE_LOCK.release()


def _after_fork_in_child() -> None:
    for logger in list(_FORKABLE):
        logger._after_fork()
    _FORKABLE_LOCK.release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def log_prediction_query(
    kind: str, logger: QueryLogger, *, key_arg: int | str = 0, cache: Any = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a live prediction function so that every call logs a query (a miss: computed live).

    The key is the argument ``key_arg`` names (a parameter's position or name), passed by position or by name;
    ``user=`` / ``tenant=`` keyword arguments of the call are logged when present. A call that does not pass the
    key is not logged (the function's own error, if any, is the caller's). ``cache`` (a ``PredictionCache``):
    each query is logged with the published version of ``kind`` the cache currently sees and, under an A/B
    experiment, the key's arm, as the cache's own lookups are; without it, ``selection_experiment`` leaves the
    queries out of the experiment's report (no arm).
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        name, index = _key_parameter(fn, key_arg)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if name is not None and name in kwargs:
                key = kwargs[name]
            elif index is not None and index < len(args):
                key = args[index]
            else:
                return fn(*args, **kwargs)
            key = str(key)
            pointer, experiment = (None, None) if cache is None else cache.current(kind)
            arm = None if experiment is None else experiment.arm(key)
            version = None if pointer is None else pointer.version
            with query_logger(logger, kind, key, user=kwargs.get("user"), tenant=kwargs.get("tenant"), arm=arm,
                              version=version):  # fmt: skip
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def _key_parameter(fn: Callable[..., Any], key_arg: int | str) -> tuple[str | None, int | None]:
    """The name and the position of ``fn``'s parameter ``key_arg`` (either); None where it has none."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read: take key_arg as given
        parameters = []
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if isinstance(key_arg, str):
        return key_arg, positional.index(key_arg) if key_arg in positional else None
    return (positional[key_arg] if 0 <= key_arg < len(positional) else None), key_arg


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
    version: str | None = None,
) -> Iterator[QueryRecord]:
    """Time the block and log one query event for it, even when the block raises. ``arm``: the key's A/B arm, and
    ``version``: the published version the block read (``PredictionCache.current_version(kind).version``):
    ``selection_experiment`` credits a row to the experiment its version was published with, and leaves out an arm's
    row without one once the day's other rows name theirs."""
    record = QueryRecord()
    start = time.perf_counter_ns()
    try:
        yield record
    finally:
        latency_us = (time.perf_counter_ns() - start) // 1000
        logger.log(kind, key, hit=record.hit, latency_us=latency_us, user=user, tenant=tenant, arm=arm, version=version)


# --- reading the stream back (used by the query_logs asset) -------------------------------------------


# Stream entries per XRANGE of a drain: 10,000 query-log entries (64 queries each, ~9 MB) held Redis 11 ms per reply.
READ_PAGE = 1000


def read_stream_window(
    client: redis.Redis,
    schema: KeySchema,
    start_ms: int,
    end_ms: int,
    *,
    page: int = READ_PAGE,
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


def cut_after(client: redis.Redis, stream: str, after: str) -> bool:
    """Whether entries after ``after`` (a reader's cursor) may have gone unread: ``stream`` holds later entries but
    none at or before it, its own included. Entries go from the old end only (``MAXLEN`` and ``MINID`` trims, a
    restart that lost the stream), so a stream that still holds the cursor's entry, or an older one, lost nothing
    after it. (``XINFO STREAM``'s ``max-deleted-entry-id`` would be exact, but trims do not update it.)"""
    pipe = client.pipeline(transaction=False)
    pipe.xrevrange(stream, max=after, min="-", count=1)
    pipe.xrange(stream, min=f"({after}", max="+", count=1)
    older, newer = pipe.execute()
    return not older and bool(newer)


TRIM_BATCH = 1000  # stream entries one XTRIM frees at most (a day of query-log entries is millions)


def trim_stream_before(client: redis.Redis, stream: str, min_id: str, *, batch: int = TRIM_BATCH) -> int:
    """Delete the entries of ``stream`` with IDs below ``min_id`` and return how many went: whole nodes first, at
    most ``batch`` entries per ``XTRIM MINID ~ LIMIT``, then one exact ``XTRIM`` for the rest of the oldest node
    (up to ``stream-node-max-entries``, 100 by default). One exact ``XTRIM`` of a day of entries freed them all in
    one command, holding Redis for every other client meanwhile."""
    removed = 0
    while trimmed := client.xtrim(stream, minid=min_id, approximate=True, limit=batch):
        removed += trimmed
    return removed + client.xtrim(stream, minid=min_id, approximate=False)


def expand_entries(
    entries: Iterable[tuple[bytes, dict[bytes, bytes]]],
) -> Iterator[tuple[bytes, dict[bytes, bytes]]]:
    """One ``(query_id, fields)`` per query of query-log ``entries``: each key of each group of a batch entry as a
    field mapping of the one-query form (values as bytes, nulls left out) with the ID ``{entry_id}/{i}``, ``i``
    counting the entry's queries; an entry of the one-query form as it is. A batch that cannot be read, or a
    group of it, comes out once with ``ENTRY_ERROR`` saying why (``validate_entry`` quarantines it); so does an entry
    that holds a field of the names the expansion marks entries with (``ENTRY_ERROR``, ``ENTRY_QUERIES``), which no
    logger writes: kept under ``written:{name}``, they would be read as the expansion's own (a ``_queries`` of text
    failed every drain of its hour)."""
    for entry_id, fields in entries:
        claimed = _count(fields.get(b"n")) if b"groups" in fields else None
        whole = {} if claimed is None or claimed <= 1 else {ENTRY_QUERIES: b"%d" % claimed}  # all of its queries
        if marked := fields.keys() & (ENTRY_ERROR, ENTRY_QUERIES):
            kept = {(b"written:" + name if name in marked else name): value for name, value in fields.items()}
            names = ", ".join(sorted(name.decode() for name in marked))
            why = f"a field named {names}, which no query logger writes".encode()
            yield entry_id, {**kept, ENTRY_ERROR: why, **whole}  # a batch's: all of its queries
            continue
        if b"groups" not in fields:
            yield entry_id, fields
            continue
        try:
            columns = tuple(fields.get(b"cols", b"").decode("ascii").split(","))
            groups = json.loads(fields[b"groups"])
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            yield entry_id, {**fields, ENTRY_ERROR: f"unreadable batch entry: {str(error)[:200]}".encode(), **whole}
            continue
        if columns != GROUP_COLUMNS or not isinstance(groups, list):
            reason = "unreadable batch entry: " + ("unknown cols" if columns != GROUP_COLUMNS else "not an array")
            yield entry_id, {**fields, ENTRY_ERROR: reason.encode(), **whole}
            continue
        index = covered = 0  # queries yielded (their ids), and the queries they stand for (a bad group: its keys)
        for group in groups:
            for query in _expand_group(group):
                yield b"%s/%d" % (entry_id, index), query
                index += 1
                covered += queries_of(query)
        if claimed != covered or fields.get(b"n") != b"%d" % claimed:  # no count, empty groups, or queries missing
            said = fields.get(b"n", b"nothing")[:32]
            reason = f"batch entry's n is not its count: holds {covered} queries, its n says {said!r}"
            missing = max(0, claimed - covered) if claimed is not None else 0
            yield b"%s/n" % entry_id, {**fields, ENTRY_ERROR: reason.encode(), ENTRY_QUERIES: b"%d" % missing}


def queries_of(fields: dict[bytes, bytes]) -> int:
    """How many queries an expanded entry stands for: one, or what its error mapping says (a batch entry rejected
    whole: its n; a group: its keys; a count saying more than the entry holds: the missing ones)."""
    return int(fields.get(ENTRY_QUERIES, b"1"))


def _count(raw: bytes | None) -> int | None:
    """A batch entry's ``n`` when it is a plain count (at most 9 digits), else None."""
    return int(raw) if raw is not None and raw.isdigit() and len(raw) <= 9 else None


def _expand_group(group: Any) -> Iterator[dict[bytes, bytes]]:
    """The queries of one group (``GROUP_COLUMNS``), or one error mapping when its shape is wrong."""
    if not isinstance(group, list) or len(group) != len(GROUP_COLUMNS):
        yield {b"group": _shown(group), ENTRY_ERROR: b"batch group is not an array of 9 values"}
        return
    ts, kind, keys, hits, latency, user, tenant, arms, version = group
    if not (isinstance(keys, list) and isinstance(hits, str) and len(hits) == len(keys)) or not (
        arms is None or (isinstance(arms, list) and len(arms) == len(keys))
    ):
        reason = b"batch group needs keys (an array), hits (a string) and arms (null or an array) of one length"
        stands_for = {ENTRY_QUERIES: b"%d" % len(keys)} if isinstance(keys, list) and len(keys) > 1 else {}
        yield {b"group": _shown(group), ENTRY_ERROR: reason, **stands_for}
        return
    shared: dict[bytes, bytes] = {}
    reason = None
    for name, value in ((b"ts", ts), (b"kind", kind), (b"lat_us", latency), (b"user", user), (b"tenant", tenant),
                        (b"ver", version)):  # fmt: skip
        reason = reason or _put(shared, name, value)
    for i, key in enumerate(keys):
        query = {**shared, b"hit": hits[i].encode("utf-8", "surrogatepass")}
        why = reason or _put(query, b"key", key) or (None if arms is None else _put(query, b"arm", arms[i]))
        if why:
            query[ENTRY_ERROR] = why.encode()
        yield query


def _shown(group: Any) -> bytes:
    """A malformed group as kept in the quarantine (JSON, truncated)."""
    try:
        return json.dumps(group).encode()[:1024]
    except (ValueError, RecursionError):
        return b"(nested too deep to show)"


def _put(fields: dict[bytes, bytes], name: bytes, value: Any) -> str | None:
    """``fields[name]`` = a JSON string or integer as bytes (null: left out); or why ``value`` cannot be one."""
    if isinstance(value, str):
        fields[name] = value.encode("utf-8", "surrogatepass")
    elif isinstance(value, int) and not isinstance(value, bool):
        fields[name] = b"%d" % value
    elif value is not None:
        return f"{name.decode()} is a JSON {type(value).__name__}, not a string or an integer"
    return None


def read_newest_queries(
    client: redis.Redis, schema: KeySchema, since_ms: int, *, limit: int, page: int = 1000
) -> Iterator[tuple[bytes, dict[bytes, bytes]]]:
    """The queries (``expand_entries``) of the query-log entries that arrived since ``since_ms``, newest first, at
    most ``limit`` of them, reading ``page`` entries at a time."""
    upper, left = "+", limit
    while left > 0:
        try:
            entries = client.xrevrange(schema.query_log(), max=upper, min=f"{since_ms}-0", count=page)
        except redis.exceptions.NoPermissionError as error:
            raise redis.exceptions.NoPermissionError(f"{error}; {acl_hint(error)}") from None
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


UNIT_TOLERANCE_MS = 24 * 3600 * 1000  # a ts read in another unit within a day of its arrival is a unit error


def ts_problem(ts: int, arrival_ms: int) -> str | None:
    """Why an event's own time ``ts`` cannot be that of an entry that arrived at ``arrival_ms``, or None: more than
    ``MAX_CLOCK_SKEW_MS`` before it or ``MAX_CLOCK_AHEAD_MS`` after it."""
    if not arrival_ms - MAX_CLOCK_SKEW_MS <= ts <= arrival_ms + MAX_CLOCK_AHEAD_MS:
        if unit := _unit_of(ts, arrival_ms):  # a unit error, not a clock's
            return f"ts in {unit}, not milliseconds: ts {ts}, arrival {arrival_ms}"
        where = (
            "more than an hour before its arrival (held back by a writer, or a clock behind)"
            if ts < arrival_ms
            else "more than 5 minutes after its arrival (a clock ahead)"
        )
        return f"ts {where}: ts {ts}, arrival {arrival_ms}"
    return None


def _unit_of(ts: int, arrival_ms: int) -> str | None:
    """The unit a ``ts`` that is no time in milliseconds near ``arrival_ms`` was written in: seconds, microseconds or
    nanoseconds, when read so it falls within ``UNIT_TOLERANCE_MS`` of the arrival (a factor of a thousand is no
    clock's error, whatever the writer's skew; a clock a few minutes off as well was called "a clock behind"); None
    otherwise, and for an arrival that is no clock's epoch time (before 1973)."""
    if ts <= 0 or arrival_ms < 10**11:
        return None
    for unit, ms in (("seconds", ts * 1000), ("microseconds", ts // 1000), ("nanoseconds", ts // 1_000_000)):
        if abs(ms - arrival_ms) <= UNIT_TOLERANCE_MS:
            return unit
    return None


def validate_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> tuple[dict[str, Any] | None, str | None]:
    """Turn one query (an entry, or a row of a batch entry, from ``expand_entries``) into a clean row, or return
    the reason it must be quarantined: a fixed text, then after a colon any offending values (the drains count the
    reasons by the text before the first colon)."""
    if ENTRY_ERROR in fields:
        return None, fields[ENTRY_ERROR].decode("utf-8", "replace")
    arrival_ms = stream_ms(entry_id)
    ts, reason = _int_field(fields.get(b"ts"), "ts")
    if reason:
        return None, reason
    if reason := ts_problem(ts, arrival_ms):
        return None, reason
    kind, reason = _clean_text(fields.get(b"kind"), "kind", required=True)
    if reason:
        return None, reason
    if not KIND_PATTERN.fullmatch(kind):
        return None, f"invalid kind: {kind!r}"
    key, reason = _clean_text(fields.get(b"key"), "key", required=True)
    if reason:
        return None, reason
    hit = fields.get(b"hit")
    if hit not in (b"0", b"1"):
        return None, "missing field hit" if hit is None else f"hit must be 0 or 1: got {hit[:32]!r}"
    latency, reason = _int_field(fields.get(b"lat_us"), "lat_us")
    if reason:
        return None, reason
    if latency < 0:
        return None, f"negative lat_us: {latency}"
    if latency > MAX_LATENCY_US:  # a writer's unsigned underflow, say: the lake's column is a signed 64-bit integer
        return None, f"lat_us out of range: {latency}"
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
        return None, f"invalid arm: {arm[:64]!r}"
    version, reason = _clean_text(fields.get(b"ver"), "ver", required=False)
    if reason:
        return None, reason
    if version is not None and not VERSION_PATTERN.fullmatch(version):
        return None, f"invalid ver: {version[:64]!r}"
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
        if k not in (ENTRY_ERROR, ENTRY_QUERIES)
    }
    return {"stream_id": entry_id.decode(), "reason": reason, "raw": repr(raw)}
