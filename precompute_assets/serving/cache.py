"""``PredictionCache``: the read side of the serving cache, with read-through compute and query logging."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import secrets
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis

from .acl import acl_hint, is_acl_refusal
from .admission import AdmissionPolicy, Decision, admission_policy, evictable, observe_all
from .connection import (
    REDIS_ERRORS,
    AskTargetError,
    PendingCluster,
    cluster_send,
    connect,
    is_cluster,
    key_slot,
    routing_key,
    send_pipelined,
)
from .events import EventLogger
from .keys import (
    EMBEDDING_KIND,
    PROBABILITY_KINDS,
    Experiment,
    Float32Codec,
    JsonCodec,
    KeySchema,
    Pointer,
    VectorCodec,
    bucket_of,
    check_key,
    check_keys,
    check_kind,
    codec_for,
    key_list,
)
from .querylog import QueryLogger

FAILED = object()  # a cluster reply that did not come: an error reply, or its master failed
ABSENT = object()  # no value read (a miss), as decoded by ``_decode``: a published JSON null decodes to None, a hit
DEFAULT_XFETCH_BETA = 1.0
DEFAULT_RECOMPUTE_LOCK_MS = 1000
DEFAULT_LOCK_POLL_S = 0.005

log = logging.getLogger(__name__)
# What a cache counts (its attributes): lookups that hit and missed; Redis errors and undecodable values; misses whose
# value the admission policy did not store; calls of get_or_compute's compute, of them XFetch recomputations of a value
# that was still there, and of those the ones whose compute raised (the value read was served); misses served with the
# value another reader computed while holding the recompute lock; NOPERM on PTTL / the delta or lock keys (XFetch and
# the lock are then off for this client); computed values not stored because their kind was invalidated meanwhile.
COUNTERS = (
    "hits",
    "misses",
    "errors",
    "rejected",
    "computes",
    "early_recomputes",
    "failed_early_recomputes",
    "lock_waits",
    "refused",
    "invalidated",
)

# Every cache not collected yet, whose locks a forked child renews (``_renew_locks``).
_CACHES: weakref.WeakSet[PredictionCache] = weakref.WeakSet()
FAILED_EARLY_LOG_EVERY_S = 60.0  # a failing model fails every due hit's early recomputation: one warning a minute
REDIS_ERROR_LOG_EVERY_S = 60.0  # a wrong password or a dead server fails every lookup: one warning a minute


def live_delta_key(schema: KeySchema, kind: str, key: str) -> str:
    """``{ns}:1:{kind}:delta:{key}``: the seconds (decimal text) the live value of ``key`` took to compute, written
    by ``get_or_compute`` beside the value with the same TTL (the XFetch rule's delta)."""
    return f"{schema.prefix}:{check_kind(kind)}:delta:{check_key(key)}"


def live_value_keys(schema: KeySchema, kind: str, keys: Sequence[str]) -> list[str]:
    """The Redis keys of the live values of ``keys`` and of their XFetch deltas, to delete together."""
    return [name for key in keys for name in (schema.live(kind, key), live_delta_key(schema, kind, key))]


def recompute_lock_key(schema: KeySchema, kind: str, key: str) -> str:
    """``{ns}:1:{kind}:lock:{key}``: held (``SET NX PX``) by the one reader recomputing the live value of ``key``."""
    return f"{schema.prefix}:{check_kind(kind)}:lock:{check_key(key)}"


def xfetch_due(ttl_ms: int | None, delta_s: float | None, beta: float, rand: float) -> bool:
    """The XFetch rule (Vattani et al., "Optimal probabilistic cache stampede prevention", VLDB 2015): recompute
    early when ``now - delta * beta * ln(rand) >= expiry``, i.e. when ``-delta * beta * ln(rand) >= ttl``.
    ``rand`` is uniform in (0, 1]; an unknown delta or TTL, or a key without expiry (``ttl_ms < 0``), is never
    due."""
    if ttl_ms is None or delta_s is None or ttl_ms < 0 or beta <= 0 or delta_s <= 0:
        return False
    return -delta_s * beta * math.log(max(rand, 1e-300)) * 1000.0 >= ttl_ms


# Release the lock only while it still holds this reader's token: a computation slower than recompute_lock_ms has
# lost its lock, maybe to another reader, whose lock a plain SET would have released. ``SET 0 PX 1`` rather than
# ``DEL``: the reader may only SET lock keys; waiters read ``0`` as released.
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('SET', KEYS[1], '0', 'PX', '1', 'XX')
end
return false
"""


# Store a computed value (and its delta) only if the kind's invalidation epoch is still the one read before computing:
# an invalidation in between (``serving.invalidate`` increments it before deleting) would otherwise be undone by a
# value computed from the data it invalidated, served for a whole live TTL. KEYS: epoch, value[, delta]; ARGV: the
# epoch read ('' for none), value, TTL s, 'XX' or '', delta. 1: stored (or XX found nothing), 0: invalidated since.
_STORE = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then
    return 0
end
for i = 2, #KEYS do
    local value = i == 2 and ARGV[2] or ARGV[5]
    if ARGV[4] == 'XX' then
        redis.call('SET', KEYS[i], value, 'EX', ARGV[3], 'XX')
    else
        redis.call('SET', KEYS[i], value, 'EX', ARGV[3])
    end
end
return 1
"""


def _unfenced_store(command: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """The plain ``SET``s that the ``_STORE`` script ``command`` makes when its epoch still matches, for a Redis user
    that may not run it (an ACL made before it)."""
    n_keys = int(command[2])
    keys, (_, encoded, ttl, only, delta) = command[4 : 3 + n_keys], command[3 + n_keys :]
    flags = (b"XX",) if only == b"XX" else ()
    return [(b"SET", name, value, b"EX", ttl, *flags) for name, value in zip(keys, (encoded, delta), strict=False)]


def _release_command(schema: KeySchema, kind: str, key: str, token: bytes) -> tuple[bytes | str, ...]:
    """Let the recompute lock lapse within a millisecond if it is still ``token``'s (its owner's), else leave it."""
    return (b"EVAL", _RELEASE_LOCK, b"1", recompute_lock_key(schema, kind, key), token)


def stored_encoding(kind: str, value: Any) -> bytes | None:
    """The bytes ``get_or_compute`` stores for ``value`` of ``kind``, encoded once, or None when it stores nothing: a
    None (a None computed live is returned, not cached), for float32 kinds (``ctr``, ``campaign``) a number that is
    not a probability (not finite, or outside [0, 1]: a logit), as the publish path requires of every prediction (a
    NaN or a logit the model returned once would otherwise be served for a whole live TTL), and for JSON kinds a
    value with NaN or Infinity (no JSON: readers in other languages refuse them, as tasks.py writes values). A value
    the codec cannot encode raises."""
    if value is None:
        return None
    codec = codec_for(kind)
    if isinstance(codec, JsonCodec):
        try:
            return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        except ValueError:
            codec.encode(value)  # a circular value raises here as the codec would; a NaN or Infinity encodes
            return None
    encoded = codec.encode(value)
    if isinstance(codec, Float32Codec) and not _prediction(kind, float(value)):
        return None
    return encoded


def _prediction(kind: str, value: float) -> bool:
    """Whether ``value`` of a float32 kind may be served: finite, and a probability for ``PROBABILITY_KINDS``."""
    return math.isfinite(value) and (kind not in PROBABILITY_KINDS or 0.0 <= value <= 1.0)


def _finite_vector(vector: Any) -> bool:
    """Whether every component of a decoded embedding is finite (numpy is imported only by readers of embeddings)."""
    import numpy as np

    return bool(np.isfinite(vector).all())


def _store_failure(error: BaseException) -> str:
    """What a failed store of a computed value means: one whose reply timed out may have landed (Redis read the whole
    value, then took longer than ``socket_timeout`` to answer); one refused, or whose write timed out (redis-py then
    drops the connection mid-value), did not."""
    if isinstance(error, redis.TimeoutError) and str(error).startswith("Timeout reading"):
        return "a computed value's store was not confirmed (it may have been stored all the same)"
    return "a computed value was not stored"


def _lookup_failure(error: BaseException) -> str:
    """What a failed round trip of a lookup means: a server that does not answer makes lookups misses for
    ``backoff_s``; one that answered with an error (MISCONF on a full disk, OOM, NOPERM) failed that command alone."""
    if isinstance(error, redis.ResponseError):
        return "that command was refused; the server answers, and other lookups go on"
    return "lookups are misses, computed live"


def _seconds(raw: Any) -> float | None:
    """A stored delta (decimal seconds) as a float; anything else is unknown."""
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _renew_locks() -> None:
    """In a forked child, new count and pointer locks for every cache: one that a thread of the parent held at the
    fork would stay held for ever, and the child's first lookup would hang on it. Its counters start at 0, as its
    query logger's: a worker counts its own lookups, not the parent's before the fork."""
    for cache in list(_CACHES):
        cache._count_lock = threading.Lock()
        cache._pointer_lock = threading.Lock()
        cache._reset_counters()


class PredictionCache:
    """Reads precomputed predictions from Redis; falls back to values computed live.

    A lookup reads the bucket of the currently published version (the pointer is re-read at most every
    ``pointer_ttl_s``; a batch always reads one version), then the live read-through key. A Redis error
    makes lookups misses for ``backoff_s`` instead of making every caller wait for a timeout.
    ``hits``, ``misses`` and ``errors`` count what this client saw, in all the threads that share it (none is lost);
    ``rejected`` the misses of ``get_or_compute`` whose value the ``admission`` policy did not store (see
    ``serving.admission``).

    The A/B experiment of a kind (``{kind}:experiment``) is read with its pointer, in the same round trip and
    on the same cadence; while one is active, every logged query of the kind carries its key's ``arm``. On Redis
    Cluster the two live in different slots: the pointer is read first and the experiment after its reply (two
    round trips per refresh, see ``publish.flip_pointer``), so the new version is never paired with the old
    experiment.

    ``get_or_compute`` protects hot live values from stampedes (the XFetch rule and a short recompute lock, see
    its docstring); ``computes``, ``early_recomputes`` (``failed_early_recomputes`` of them raised), ``lock_waits``
    and ``refused`` count what that did; ``invalidated`` the computed values not stored because their kind was
    invalidated while they computed.

    Kinds and keys are checked first (``keys.check_kind``, ``keys.check_key``): a malformed one raises
    ``ValueError`` before anything is read or stored.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        schema: KeySchema | None = None,
        logger: QueryLogger | None = None,
        events: EventLogger | None = None,
        live_ttl_s: int = 3600,
        pointer_ttl_s: float = 1.0,
        backoff_s: float = 1.0,
        admission: AdmissionPolicy | str = "always",
        xfetch_beta: float = DEFAULT_XFETCH_BETA,
        recompute_lock_ms: int = DEFAULT_RECOMPUTE_LOCK_MS,
        lock_poll_s: float = DEFAULT_LOCK_POLL_S,
    ) -> None:
        if not xfetch_beta >= 0:
            raise ValueError(f"xfetch_beta must be >= 0 (0: no early recomputation), got {xfetch_beta}")
        if not isinstance(recompute_lock_ms, int) or recompute_lock_ms < 0:
            raise ValueError(f"recompute_lock_ms must be an integer >= 0 (0: no lock), got {recompute_lock_ms!r}")
        if not lock_poll_s > 0:
            raise ValueError(f"lock_poll_s must be positive, got {lock_poll_s}")
        self.client = client
        self.admission = admission_policy(admission)
        self.schema = schema or KeySchema()
        self.logger = logger
        # While Redis answers a lookup, the query logger sends its full entries: logging then costs lookups no time.
        self._while_waiting = None if logger is None else logger.send_ready
        if logger is not None:
            logger.lookup_sends = True
        self.events = events
        self.live_ttl_s = live_ttl_s
        self.pointer_ttl_s = pointer_ttl_s
        self.backoff_s = backoff_s
        self._count_lock = threading.Lock()  # every counter's updates (``_count``)
        _CACHES.add(self)
        self._reset_counters()
        self.xfetch_beta = float(xfetch_beta)
        self.recompute_lock_ms = recompute_lock_ms
        self.lock_poll_s = lock_poll_s
        self._failed_early_logged_at = -math.inf
        self._redis_error_logged_at = -math.inf
        self._stampede_refused = False
        # kinds whose store script the ACL refused (an older ACL, or a reader limited to other kinds): plain SETs there
        self._fence_refused: set[str] = set()
        self._release_refused = False  # NOPERM on the lock's release script (an older ACL): locks lapse at their PX
        self._random = random.Random()
        self._pointers: dict[str, tuple[Pointer | None, Experiment | None, float]] = {}
        # Pointer reads are numbered when they start and when they end (``_pointer_ticket``): a read is stored only if
        # it started after the stored one ended, so that one read no earlier, and the cached pointer never goes back.
        self._pointer_lock = threading.Lock()
        self._pointer_tickets = 0
        self._pointer_read_ends: dict[str, int] = {}  # per kind, the end ticket of the read stored in ``_pointers``
        # Per thread, (kind, pointer, experiment) of its last lookup: what its query is logged with, whatever another
        # thread has refreshed in ``_pointers`` since.
        self._read_here = threading.local()
        self._retry_at = 0.0
        # Redis Cluster: lookups go to each master directly, and a failing master backs off alone (its keys are
        # misses for backoff_s) while the others keep answering.
        self._cluster = is_cluster(client)
        self._node_retry_at: dict[str, float] = {}
        self._refreshed_at = 0.0
        self._recorder = redis.Redis() if self._cluster else None  # builds admission commands, never connects

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        socket_timeout: float = 0.05,
        namespace: str = "pc",
        schema: KeySchema | None = None,
        log_queries: bool = True,
        log_events: bool = True,
        clock: Callable[[], int] | None = None,
        stream_maxlen: int | None = None,
        **options: Any,
    ) -> PredictionCache:
        """A cache on ``url``, of the keys of ``namespace`` (or ``schema``, as the constructor takes it); query and
        event logging use connections of their own so they never queue behind lookups. A Redis Cluster none of whose
        nodes answers yet is no error: lookups are misses until one does (``connection.PendingCluster``), as on a
        single server that is down. ``stream_maxlen``: the cap, in entries, of the query-log and user-event streams
        (the loggers' default, 10 million, when None), to bound their memory while nothing drains them."""
        if schema is not None and namespace not in ("pc", schema.namespace):
            raise ValueError(f"namespace {namespace!r} and schema {schema.namespace!r} differ: give one of them")
        schema = schema or KeySchema(namespace)
        capped = {} if stream_maxlen is None else {"stream_maxlen": stream_maxlen}
        client = connect(url, socket_timeout=socket_timeout, pending=True)
        logger = (
            QueryLogger(
                connect(url, socket_timeout=max(socket_timeout, 1.0), pending=True), schema, clock=clock, **capped
            )
            if log_queries
            else None
        )
        events = (
            EventLogger(connect(url, socket_timeout=max(socket_timeout, 1.0), pending=True), schema, **capped)
            if log_events
            else None
        )
        return cls(client, schema=schema, logger=logger, events=events, **options)

    # --- public API -----------------------------------------------------------------------------------

    def get(self, kind: str, key: str, *, user: str | None = None, tenant: str | None = None) -> Any | None:
        """The cached value of ``key`` or None on a miss (or when Redis is unreachable); a published JSON null is None
        too, but a hit."""
        check_kind(kind)
        check_key(key)
        start = time.perf_counter_ns()
        value = self._lookup(kind, key)
        self._log(kind, key, value is not ABSENT, start, user, tenant)
        return None if value is ABSENT else value

    def get_many(
        self, kind: str, keys: Iterable[str], *, user: str | None = None, tenant: str | None = None
    ) -> list[Any | None]:
        """Values for ``keys`` in order (None for misses), those the published version holds from that one version:
        one round trip (per 10,000 keys, ``connection.PIPELINE_CHUNK``), plus one for live read-through values when
        some keys are not in the published version (on Redis Cluster: one round trip per master, in parallel). A live
        value is whatever was stored for its key: computed by ``get_or_compute``, or, under ``probation``, handed
        over from a version before when the publish dropped the key, so a batch may hold values of older versions
        for the keys the current one does not serve. ``keys`` may be any iterable of str (``key_list``)."""
        check_kind(kind)
        keys = key_list(keys)
        check_keys(keys)
        start = time.perf_counter_ns()
        values = self._lookup_many(kind, keys)
        self._log_many(kind, keys, [value is not ABSENT for value in values], start, user, tenant)
        return [None if value is ABSENT else value for value in values]

    def get_or_compute(
        self,
        kind: str,
        key: str,
        compute: Callable[[str], Any],
        *,
        user: str | None = None,
        tenant: str | None = None,
        admission: AdmissionPolicy | str | None = None,
    ) -> Any:
        """The cached value (a published JSON null too: None, a hit, nothing computed), or ``compute(key)``, stored with
        the live TTL if the admission policy (this call's ``admission``, else the cache's) admits it; a None result, or
        a non-finite one of a float32 kind, is returned but never stored (``stored_encoding``). Redis trouble never
        raises here.

        Stampede protection (on unless ``xfetch_beta=0`` and ``recompute_lock_ms=0``, the plain read-through):

        - the live ``GET`` carries ``PTTL`` of the value and ``GET {kind}:delta:{key}`` (the seconds its last
          computation took, written beside it with the same TTL) in the same round trip; a value that is still
          there is recomputed early when the XFetch rule says so (``xfetch_due``: ``-delta * beta * ln(rand) >=
          ttl``), by the one reader that wins the lock; every other reader keeps serving the value it read;
        - a miss that will be stored takes the lock ``{kind}:lock:{key}`` (``SET NX PX recompute_lock_ms``) before
          computing; a reader that finds it taken polls the live value every ``lock_poll_s`` for at most
          ``recompute_lock_ms`` (less if the lock goes away) and computes itself if the value still is not there;
          the lock holds a random token and only its owner releases it: a computation slower than
          ``recompute_lock_ms`` loses the lock (another reader may take it and compute too; the later store wins)
          but never releases another reader's.

        No computed value is stored after an invalidation of its kind that it started before: the kind's epoch
        (``KeySchema.epoch``) is read before computing and compared when storing (``_STORE``; on a cluster just
        before, ``_invalidated_on_cluster``); such a value is returned, counted in ``invalidated``.

        A value without a delta (written by a task run) is never recomputed early; an early recomputation that raises
        serves the value read (logged as a warning), since it is still valid; one that succeeds stores only over a
        value still there (``SET ... XX``: an invalidation or an eviction meanwhile wins). A reader whose ACL refuses
        ``PTTL`` or the delta/lock keys (``NOPERM``) falls back to the plain read-through, counted in ``refused``.
        """
        check_kind(kind)
        check_key(key)
        policy = self.admission if admission is None else admission_policy(admission)
        early_on = self.xfetch_beta > 0 and not self._stampede_refused
        if not early_on and (self.recompute_lock_ms <= 0 or self._stampede_refused):
            return self._get_or_compute_plain(kind, key, compute, policy, user, tenant)
        start = time.perf_counter_ns()
        cached, decision, ttl_ms, delta_s = self._lookup_admitting(kind, key, policy, extras=early_on)
        self._log(kind, key, cached is not ABSENT, start, user, tenant)
        if cached is not ABSENT:
            if decision is not None and xfetch_due(ttl_ms, delta_s, self.xfetch_beta, 1.0 - self._random.random()):
                lock, epoch, _ = self._take_lock(kind, key)
                if lock is not False and self._available():  # ours, or no lock (off): recompute; else the holder does
                    self._count("early_recomputes")
                    try:  # nothing new (not storable): the value read is valid, and returned
                        return self._compute_and_store(
                            kind,
                            key,
                            compute,
                            policy,
                            None,
                            locked=lock or None,
                            replace=True,
                            epoch=epoch,
                            keep=cached,
                        )
                    except Exception:  # the value read is still valid: a failed early recomputation serves it
                        self._failed_early(kind, key)
            return cached
        if decision is None or not self._available():
            self._count("computes")
            value = compute(key)  # Redis failed during the lookup: nothing is stored
            # a value the codec refuses raises as when Redis answers
            return self._as_read(kind, value, stored_encoding(kind, value))
        if not decision.admit:
            self._count("rejected")
            return self._compute_and_store(kind, key, compute, policy, decision, store=False)
        lock, epoch, stored = self._take_lock(kind, key, reread=True)
        if lock is False:  # another reader computes it: wait for its value, bounded
            waited = self._wait_for_value(kind, key)
            if waited is not ABSENT:
                self._count("lock_waits")
                return waited
        elif (value := self._decode(kind, stored, count=False)) is not ABSENT:
            # A holder stored the value and released its lock between this reader's lookup and its lock: served, not
            # computed again (a fast compute was often computed twice by a stampede of readers); also when the lock
            # itself failed (its master down, or refused) but the value was read
            if lock:
                self._release_lock(kind, key, lock)
            self._count("lock_waits")
            return value
        return self._compute_and_store(kind, key, compute, policy, decision, locked=lock or None, epoch=epoch)

    def _get_or_compute_plain(
        self,
        kind: str,
        key: str,
        compute: Callable[[str], Any],
        policy: AdmissionPolicy,
        user: str | None,
        tenant: str | None,
    ) -> Any:
        """The read-through without XFetch or lock: every reader that misses computes and stores."""
        start = time.perf_counter_ns()
        cached, decision, _, _ = self._lookup_admitting(kind, key, policy)
        self._log(kind, key, cached is not ABSENT, start, user, tenant)
        if cached is not ABSENT:
            return cached
        epoch = self._epoch(kind) if decision is not None and decision.admit else None
        self._count("computes")
        value = compute(key)
        encoded = stored_encoding(kind, value)  # whether or not it is stored: a value the codec refuses always raises
        value = self._as_read(kind, value, encoded)
        if decision is None or not self._available():
            return value  # Redis failed during the lookup: nothing is stored
        if not decision.admit:
            self._count("rejected")
        try:
            commands = []
            if decision.admit and self._invalidated_on_cluster(kind, epoch):
                return value  # nothing stored, nothing admitted: a tracked key without a value wastes a slot
            if decision.admit:
                if encoded is None:  # not stored; the housekeeping runs as for a rejected miss (_compute_and_store)
                    decision = dataclasses.replace(decision, admit=False)
                else:
                    commands = self._store_commands(kind, key, encoded, None, epoch=epoch)
            self._send_with_housekeeping(kind, key, commands, policy, decision, epoch=epoch)
        except REDIS_ERRORS as error:  # OOM, READONLY, a dead server: the caller still gets its value
            self._trip(error, store=True)
        return value

    def get_embedding(self, doc_id: str, *, user: str | None = None, tenant: str | None = None):
        """The document's embedding as a float32 numpy vector, or None."""
        return self.get(EMBEDDING_KIND, doc_id, user=user, tenant=tenant)

    def get_embeddings(self, doc_ids: Iterable[str], *, user: str | None = None, tenant: str | None = None):
        """Embeddings of ``doc_ids`` in order (None where missing), from one version (see ``get_many``)."""
        return self.get_many(EMBEDDING_KIND, doc_ids, user=user, tenant=tenant)

    def current_version(self, kind: str) -> Pointer | None:
        """The published version of ``kind`` as this reader currently sees it: while Redis fails (or the client
        backs off after a failure), the one it last read, None before any; never raises."""
        return self.current(kind)[0]

    def current_experiment(self, kind: str) -> Experiment | None:
        """The A/B experiment of ``kind`` as this reader currently sees it (refreshed with the pointer, as
        ``current_version``)."""
        return self.current(kind)[1]

    def current(self, kind: str) -> tuple[Pointer | None, Experiment | None]:
        """``current_version`` and ``current_experiment`` read together: the experiment is the version's, even when
        a publish flips between two calls of those (to log a query outside the cache under its arm and version)."""
        self._refresh_pointer(kind)
        cached = self._pointers.get(kind)
        return (None, None) if cached is None else (cached[0], cached[1])

    def _refresh_pointer(self, kind: str) -> None:
        """``_pointer`` unless backing off; a Redis error keeps what was last read and backs off (``_trip``)."""
        if not self._cluster and not self._available():
            return
        try:
            self._pointer(kind)
        except REDIS_ERRORS as error:
            self._trip(error)

    def record_event(
        self, user: str | None, action: str | None, *, entity: str | None = None, tenant: str | None = None
    ) -> None:
        """Queue one user event (login, creative_upload, ...; see ``serving.events``) on the event stream, from which
        ``user_event_sensor`` precomputes what the user will ask for next; never raises, never blocks on Redis (a
        missing user or action is quarantined by the drain)."""
        if self.events is not None:
            self.events.record_event(user, action, entity=entity, tenant=tenant)

    def close(self) -> None:
        """Flush pending query and user events and close connections."""
        for logger in (self.logger, self.events):
            if logger is not None:
                logger.close()
                logger.client.close()
        self.client.close()

    # --- stampede protection ----------------------------------------------------------------------------

    def _compute_and_store(
        self,
        kind: str,
        key: str,
        compute: Callable[[str], Any],
        policy: AdmissionPolicy,
        decision: Decision | None,
        *,
        store: bool = True,
        locked: bytes | None = None,
        replace: bool = False,
        epoch: bytes | None = None,
        keep: Any = ABSENT,
    ) -> Any:
        """``compute(key)``, timed; stored with its delta when ``store``; the policy's housekeeping after a miss
        (``decision``; None for an early recomputation, which is no miss). ``replace`` (an early recomputation)
        stores only over a value still there (``_store_commands``). Redis errors are absorbed. Returns the value as a
        hit reads it (``_as_read``), or ``keep`` (unless ``ABSENT``) instead of one that is not storable."""
        self._count("computes")
        started = time.perf_counter()
        try:
            value = compute(key)
            delta_s = time.perf_counter() - started
            # encoded whether or not it is stored: a value the codec refuses raises at every call, not only at those
            # the policy admits (a service tried on its first request broke on the second)
            encoded = stored_encoding(kind, value)
        except BaseException:
            if locked:  # let the waiting readers compute for themselves now (also when the codec refuses the value)
                self._release_lock(kind, key, locked)
            raise
        value = self._as_read(kind, value, encoded) if encoded is not None or keep is ABSENT else keep
        if store and encoded is None:
            # A None is not cached: it would take a write and, under probation, a slot (evicting a real value). A NaN
            # is no prediction. The policy's housekeeping still runs, as for a rejected miss (the sketch ages per
            # miss, whatever was computed: the replay, which knows no values, decides the same).
            if locked:
                self._release_lock(kind, key, locked)
            store, decision = False, None if decision is None else dataclasses.replace(decision, admit=False)
        if not self._available():
            return value
        if store and self._invalidated_on_cluster(kind, epoch):
            if locked:  # the release goes with the store, which there is none of now
                self._release_lock(kind, key, locked)
            return value  # nothing stored, nothing admitted: a tracked key without a value wastes a slot
        try:
            commands = []
            if store:
                commands = self._store_commands(
                    kind, key, encoded, delta_s, release=locked, replace=replace, epoch=epoch
                )
            self._send_with_housekeeping(kind, key, commands, policy, decision, epoch=epoch)
        except REDIS_ERRORS as error:  # OOM, READONLY, a dead server: the caller still gets its value
            self._trip(error, store=True)
        return value

    def _as_read(self, kind: str, value: Any, encoded: bytes | None) -> Any:
        """A computed ``value`` as a hit returns it, stored or not: its ``encoded`` bytes decoded (an embedding's
        bytes are a float32 vector, a float32 kind's number a float, JSON's tuples lists and its keys strings), so a
        caller gets one type on a miss and on a hit; ``value`` itself when it is not storable (``encoded`` None)."""
        if encoded is None:
            return value
        decoded = self._decode(kind, encoded, count=False)
        return value if decoded is ABSENT else decoded

    def _evict_live(self, kind: str, keys: Sequence[str]) -> None:
        """Delete the live values (and their deltas) of ``keys``, which the admission policy evicted, but not those
        to live longer than this reader stores them (``admission.evictable``): two round trips, a ``PTTL`` and an
        ``UNLINK`` per key (on a cluster each goes to its own master)."""
        if not keys:
            return
        send = self._cluster_fetch if self._cluster else self._round_trip
        ttls = send([(b"PTTL", self.schema.live(kind, key)) for key in keys])
        doomed = [key for key, ttl in zip(keys, ttls, strict=True) if evictable(ttl, self.live_ttl_s)]
        if doomed:
            send([(b"UNLINK", name) for name in live_value_keys(self.schema, kind, doomed)])

    def _store_commands(
        self,
        kind: str,
        key: str,
        encoded: bytes,
        delta_s: float | None,
        *,
        release: bytes | None = None,
        replace: bool = False,
        epoch: bytes | None = None,
    ) -> list[tuple[Any, ...]]:
        """``SET`` of the live value with the live TTL and, when XFetch is on, of its delta beside it; ``release``
        (the lock's token) lets the recompute lock lapse after them (``_release_lock``). ``replace`` adds ``XX``: an
        early recomputation refreshes a value that is still there, and must not bring back one that an invalidation or
        ``probation``'s eviction deleted while it computed (stale, or a value outside the capacity). ``epoch``, the
        kind's invalidation epoch read before computing (b"" when there was none), makes the store one ``_STORE``
        script on one server; on a cluster, where the epoch is in another slot, plain ``SET``s
        (``_invalidated_on_cluster`` checked it just before). ``delta_s`` None: no delta (the plain read-through)."""
        name, ttl = self.schema.live(kind, key), b"%d" % self.live_ttl_s
        only = (b"XX",) if replace else ()
        delta = None
        if delta_s is not None and self.xfetch_beta > 0 and not self._stampede_refused:
            delta = (live_delta_key(self.schema, kind, key), b"%.6f" % delta_s)
        commands: list[tuple[Any, ...]]
        if epoch is not None and not self._cluster and kind not in self._fence_refused:
            keys = [self.schema.epoch(kind), name] + ([delta[0]] if delta else [])
            args = [epoch, encoded, ttl, b"XX" if replace else b"", delta[1] if delta else b""]
            commands = [(b"EVAL", _STORE, b"%d" % len(keys), *keys, *args)]
        else:
            commands = [(b"SET", name, encoded, b"EX", ttl, *only)]
            if delta:
                commands.append((b"SET", delta[0], delta[1], b"EX", ttl, *only))
        if release and not self._release_refused:
            commands.append(_release_command(self.schema, kind, key, release))
        return commands

    def _send_with_housekeeping(
        self,
        kind: str,
        key: str,
        commands: list[tuple[Any, ...]],
        policy: AdmissionPolicy,
        decision: Decision | None,
        *,
        epoch: bytes | None = None,
    ) -> None:
        """Send the store's ``commands`` (value first, then its delta, then the lock release) and the admission
        policy's housekeeping after a miss (``decision``; None for an early recomputation, which is no miss) in
        one round trip, then delete the live values the policy evicted, even when the value could not be stored (on
        one server its script deleted them, atomically with their eviction: then only those it could not). A store
        fenced by ``epoch`` (``_STORE``) fences the housekeeping too: an invalidation that refused the store (the
        epoch moved, no value there) makes ``probation`` admit nothing, rather than track a key that has no value.
        On one server an error reply of the value or the housekeeping then raises, and the delta's is handled as
        ``_extra_reply`` handles it (NOPERM turns XFetch off); on a cluster every error is ``FAILED``, counted in
        ``errors`` (``_cluster_fetch``)."""
        fenced = epoch if commands and commands[0][:2] == (b"EVAL", _STORE) else None
        after = (
            None
            if decision is None
            else policy.after_miss(
                self.schema, kind, key, decision, self.live_ttl_s, deletes=not self._cluster, epoch=fenced
            )
        )
        if after is not None:
            commands = [*commands, after]
        if not commands:
            return
        if self._cluster:
            replies = self._cluster_fetch(commands)
        else:
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            replies = pipe.execute(raise_on_error=False)
        delta = live_delta_key(self.schema, kind, key)
        for command, reply in zip(commands, replies, strict=True):
            if command[1] == delta:
                self._extra_reply(reply)
            elif command[:2] == (b"EVAL", _RELEASE_LOCK) and isinstance(reply, redis.exceptions.NoPermissionError):
                self._refuse_release()  # the lock lapses anyway, at recompute_lock_ms
        if commands[0][:2] == (b"EVAL", _STORE):
            if replies[0] == 0:
                self._count("invalidated")
            elif isinstance(replies[0], redis.exceptions.NoPermissionError):
                self._refuse_fence(kind)  # and store as the script would have, so this value is not lost
                value_reply, *delta_reply = send_pipelined(self.client, _unfenced_store(commands[0]))
                replies[0] = value_reply
                for reply in delta_reply:
                    self._extra_reply(reply)
        evicted = replies[-1] if after is not None else None
        if after is not None and evicted is not FAILED and not isinstance(evicted, BaseException):
            self._evict_live(kind, policy.evicted(evicted))  # on one server only those the script could not delete
            if policy.refused(evicted):  # probation without room: the value went as it was written
                self._count("rejected")
        for reply in (replies[0], evicted):
            if isinstance(reply, BaseException):
                raise reply

    def _take_lock(self, kind: str, key: str, *, reread: bool = False) -> tuple[bytes | bool | None, bytes | None, Any]:
        """This reader's token (random, never ``0``) when it now holds the recompute lock; False: another does; None:
        no lock (off, refused, or Redis failed: compute without one). With it, the kind's invalidation epoch read in
        the same round trip (``_epoch``), and with ``reread`` the live value read after the lock was taken (raw; None
        when not read)."""
        if self.recompute_lock_ms <= 0 or self._stampede_refused or not self._available():
            return None, self._epoch(kind), None
        token = secrets.token_hex(8).encode()
        command = (
            b"SET",
            recompute_lock_key(self.schema, kind, key),
            token,
            b"NX",
            b"PX",
            b"%d" % self.recompute_lock_ms,
        )
        live = [(b"GET", self.schema.live(kind, key))] if reread else []
        epoch_read = [] if kind in self._fence_refused else [(b"GET", self.schema.epoch(kind))]
        commands = [command, *live, *epoch_read]
        if self._cluster:
            reply, *rest = self._cluster_fetch(commands)
            stored, epoch = rest[0] if live else None, rest[len(live) :]
            return None if reply is FAILED else reply is not None and token, self._epoch_reply(epoch), stored
        try:
            pipe = self.client.pipeline(transaction=False)
            for each in commands:
                pipe.execute_command(*each)
            reply, *rest = pipe.execute(raise_on_error=False)
        except REDIS_ERRORS as error:
            self._trip(error)
            return None, None, None
        stored, epoch = rest[0] if live else None, rest[len(live) :]
        if isinstance(reply, redis.exceptions.NoPermissionError):
            self._refuse()
            return None, self._epoch_reply(epoch), None
        if isinstance(reply, BaseException):
            self._trip(reply)
            return None, self._epoch_reply(epoch), None
        return reply is not None and token, self._epoch_reply(epoch), stored

    def _epoch(self, kind: str) -> bytes | None:
        """The kind's invalidation epoch (b"" when it has none) before a computation that will be stored, for
        ``_store_commands``; None: unknown (Redis failed, or the fence is refused), the store is then not fenced."""
        if kind in self._fence_refused or not self._available():
            return None
        command = (b"GET", self.schema.epoch(kind))
        if self._cluster:
            return self._epoch_reply(self._cluster_fetch([command]))
        try:
            return self._epoch_reply(self._round_trip([command]))
        except REDIS_ERRORS as error:
            self._trip(error)
            return None

    def _invalidated_on_cluster(self, kind: str, epoch: bytes | None) -> bool:
        """On a cluster, whether the kind's epoch moved since ``epoch`` was read (counted in ``invalidated``): it is in
        another slot than the value, so it is compared just before the store, not atomically with it (an invalidation
        within that one round trip can still be undone); on one server ``_STORE`` compares it atomically."""
        if epoch is None or not self._cluster or self._epoch(kind) in (epoch, None):
            return False
        self._count("invalidated")
        return True

    def _epoch_reply(self, replies: list[Any]) -> bytes | None:
        """The epoch from the reply of its ``GET`` (none: b""); None when there is no reply or it failed."""
        if not replies or replies[0] is FAILED or isinstance(replies[0], BaseException):
            return None
        return replies[0] or b""

    def _release_lock(self, kind: str, key: str, token: bytes) -> None:
        """Let the lock lapse within a millisecond if it is still ours (``_release_command``)."""
        if self._release_refused:
            return
        command = _release_command(self.schema, kind, key, token)
        if self._cluster:
            self._cluster_fetch([command])
            return
        try:
            self.client.execute_command(*command)
        except redis.exceptions.NoPermissionError:
            self._refuse_release()
        except REDIS_ERRORS:
            self._count("errors")

    def _wait_for_value(self, kind: str, key: str) -> Any:
        """Poll the live value (and the lock) every ``lock_poll_s`` for at most ``recompute_lock_ms``: the value
        (decoded) once the lock holder stored it; ``ABSENT`` when the time is up, the lock went away without a value,
        or Redis failed. A value that does not decode (garbage, or a key of another type, which the holder's store
        replaces) is waited past as a missing one: every waiter computed at once."""
        live, lock = self.schema.live(kind, key), recompute_lock_key(self.schema, kind, key)
        deadline = time.monotonic() + self.recompute_lock_ms / 1000
        while time.monotonic() < deadline:
            time.sleep(min(self.lock_poll_s, max(0.0, deadline - time.monotonic())))
            if self._cluster:
                raw, held = self._cluster_fetch([(b"GET", live), (b"GET", lock)])
                if raw is FAILED or held is FAILED:  # a master down: compute now rather than poll out the wait
                    return ABSENT
            else:
                try:
                    pipe = self.client.pipeline(transaction=False)
                    pipe.get(live)
                    pipe.get(lock)
                    raw, held = pipe.execute(raise_on_error=False)
                except REDIS_ERRORS as error:
                    self._trip(error)
                    return ABSENT
                if isinstance(held, BaseException):
                    self._trip(held)
                    return ABSENT
            value = self._decode(kind, raw, count=False)
            if value is not ABSENT:
                return value
            if held is None or held == b"0":
                return ABSENT
        return ABSENT

    def _extra_reply(self, reply: Any) -> Any:
        """A reply of PTTL / the delta key: an error is None (unknown), and NOPERM turns the extras off."""
        if isinstance(reply, redis.exceptions.NoPermissionError):
            self._refuse()
            return None
        if isinstance(reply, BaseException) or reply is FAILED:
            if reply is not FAILED:
                self._count("errors")
            return None
        return reply

    def _refuse_release(self) -> None:
        """The ACL refuses the lock's release script (it predates it): each lock is held until recompute_lock_ms."""
        if not self._release_refused:
            log.warning(
                "the Redis user may not EVAL on %s:*:lock:*: recompute locks are held for recompute_lock_ms after "
                "each computation (readers waiting on a failed one wait that long); see serving.acl",
                self.schema.prefix,
            )
        self._release_refused = True
        self._count("refused")

    def _refuse_fence(self, kind: str) -> None:
        """The ACL refuses the store script of ``kind`` (it predates it, or is limited to other kinds): store that
        kind with plain ``SET``s from now on, unfenced."""
        if kind not in self._fence_refused:
            log.warning(
                "the Redis user may not EVAL on %s:%s:live:* with the kind's epoch: get_or_compute stores %s with "
                "plain SETs, and a value computed before an invalidation may be stored after it (a user made by an "
                "older `precompute redis acl`: run `precompute redis acl --apply` again; or one whose --kinds leave "
                "it out)",
                self.schema.prefix, kind, kind,
            )  # fmt: skip
        self._fence_refused.add(kind)
        self._count("refused")

    def _refuse(self) -> None:
        if not self._stampede_refused:
            log.warning(
                "the Redis user may not run PTTL or write %s:*:delta:* / %s:*:lock:*: get_or_compute falls back to "
                "the plain read-through (no early recomputation, no lock); see serving.acl",
                self.schema.prefix,
                self.schema.prefix,
            )
        self._stampede_refused = True
        self._count("refused")

    # --- internals ------------------------------------------------------------------------------------

    def _decode(self, kind: str, raw: Any, *, count: bool = True) -> Any:
        """Decode a stored value, ``ABSENT`` when there is none (a reply that is no bytes: None, ``FAILED``); a corrupt
        one (a float32 one or an embedding not finite too) counts as an error (with ``count``) and is ``ABSENT`` (a
        miss), never an exception. A JSON null is a value (None): the model's answer was "nothing"."""
        if not isinstance(raw, bytes):
            return ABSENT
        codec = codec_for(kind)
        try:
            value = codec.decode(raw)
        except (ValueError, TypeError, struct.error, RecursionError):  # RecursionError: JSON nested too deep
            value = ABSENT
        if value is not ABSENT and (
            (isinstance(codec, Float32Codec) and not _prediction(kind, value))  # a writer's NaN, Infinity or logit
            or (isinstance(codec, VectorCodec) and not _finite_vector(value))  # a vector no cosine can rank (h_emb)
        ):
            value = ABSENT
        if value is ABSENT and count:
            self._count("errors")
        return value

    def _failed_early(self, kind: str, key: str) -> None:
        """Count an early recomputation whose compute raised; warn, with its traceback, at most once a minute."""
        self._count("failed_early_recomputes")
        now = time.monotonic()
        if now - self._failed_early_logged_at >= FAILED_EARLY_LOG_EVERY_S:
            self._failed_early_logged_at = now
            log.warning(
                "early recomputation of %s %r failed (%d so far; served the cached value)",
                kind, key, self.failed_early_recomputes, exc_info=True,
            )  # fmt: skip

    def _reset_counters(self) -> None:
        """Every counter to 0 (``COUNTERS``)."""
        for counter in COUNTERS:
            setattr(self, counter, 0)

    def _count(self, counter: str, n: int = 1) -> None:
        """Add ``n`` to the counter named ``counter`` (``hits``, ``errors``, ...). Services share a cache across a
        thread pool, and ``+=`` is a read and a write that another thread can come between (a lost count); the lock
        is held for the addition only, never across a round trip."""
        with self._count_lock:
            setattr(self, counter, getattr(self, counter) + n)

    def _available(self) -> bool:
        return time.monotonic() >= self._retry_at

    def _trip(self, error: BaseException | None = None, *, store: bool = False) -> None:
        """Count a failed round trip and back off for ``backoff_s``, unless ``error`` is an error reply (OOM at
        ``maxmemory``, READONLY, NOPERM): the server answered at once, so only that command failed; or unless the
        round trip was a ``store`` right after a lookup that succeeded: the server is up, and what failed was this
        write (a value too big for ``socket_timeout`` or the server's ``proto-max-bulk-len``), which backing off made
        a miss of every lookup for ``backoff_s``, again at each request of the key. Warns at most once every
        ``REDIS_ERROR_LOG_EVERY_S``: a wrong password or an unreachable server otherwise served every request live
        with nothing said but the ``errors`` count."""
        self._count("errors")
        now = time.monotonic()
        if error is not None and now - self._redis_error_logged_at >= REDIS_ERROR_LOG_EVERY_S:
            self._redis_error_logged_at = now
            log.warning(
                "Redis failed (%s: %s): %s (%d errors so far)%s",
                type(error).__name__, " ".join(str(error).split()),
                _store_failure(error) if store else _lookup_failure(error), self.errors,
                f"; {acl_hint(error)}" if is_acl_refusal(error) else "",
            )  # fmt: skip
        if not self._cluster and isinstance(error, redis.ResponseError) and str(error).startswith("Protocol error"):
            # The server closes the connection after this reply (a value over its proto-max-bulk-len), maybe only
            # after the pool has handed it out again: the next lookup then failed and backed off every lookup.
            self.client.connection_pool.disconnect(inuse_connections=False)
        if store:
            return
        if not self._cluster and not isinstance(error, redis.ResponseError):  # a cluster backs off per master
            self._retry_at = time.monotonic() + self.backoff_s

    def _refresh_slots(self) -> None:
        """Re-read the cluster's slot map (a failover moved slots), at most once per ``backoff_s``."""
        now = time.monotonic()
        if now - self._refreshed_at < self.backoff_s:
            return
        self._refreshed_at = now
        try:
            self.client.nodes_manager.initialize()
        except REDIS_ERRORS:
            self._count("errors")

    def _cluster_fetch(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run single-key ``commands`` on a cluster (``connection.cluster_send``: one round trip, every master in
        parallel). Replies come back in order; an error reply is ``FAILED``, and so is every command of a master
        that fails or is backing off (it then backs off for ``backoff_s``: its keys are misses without touching
        the network, while the other masters keep answering), and every command redirected by ASK to a node that
        fails or is backing off (that node backs off, not the master that answered ASK). Before any node answered
        (``from_url``) every command is ``FAILED``: the client is built at most once per ``backoff_s``
        (``_start_cluster``)."""
        if isinstance(self.client, PendingCluster) and not self._start_cluster():
            return [FAILED] * len(commands)
        now = time.monotonic()
        replies: list[Any] = [FAILED] * len(commands)
        nodes, chosen = [], []
        for index, command in enumerate(commands):
            try:
                node = self.client.nodes_manager.get_node_from_slot(key_slot(routing_key(command))).name
            except REDIS_ERRORS:  # a slot no master serves
                self._count("errors")
                continue
            if self._node_retry_at.get(node, 0.0) <= now:
                nodes.append(node)
                chosen.append(index)
        failed: set[str] = set()
        # Another thread may record a master failing for the first time meanwhile: iterate a copy. dict.copy() is one C
        # call that runs no Python code; list(items()), which builds a tuple per entry, still raised "dictionary changed
        # size during iteration" in 3 of 4 runs of the test (a garbage collection it starts can run other code).
        backing_off = {name for name, retry_at in self._node_retry_at.copy().items() if retry_at > now}
        for index, node, reply in zip(
            chosen, nodes, cluster_send(self.client, [commands[i] for i in chosen], avoid=backing_off), strict=True
        ):
            if not isinstance(reply, BaseException):
                replies[index] = reply
            elif isinstance(reply, AskTargetError):  # the node the ASK named failed (or backs off), not this master
                if reply.tried:
                    failed.add(reply.node)
            elif isinstance(reply, redis.ResponseError):  # OOM, NOPERM, MOVED after a failover: this key fails
                self._trip(reply)  # counted, and warned of as on one server (an older ACL was silent on a cluster)
                if isinstance(reply, redis.exceptions.AskError):
                    self._refresh_slots()
            else:
                failed.add(node)
        for node in failed:
            self._node_failed(node)
        return replies

    def _start_cluster(self) -> bool:
        """Build the cluster client that no node answered for yet, unless backing off from the last attempt: a failure
        counts as an error and backs off for ``backoff_s`` (lookups are misses, ``get_or_compute`` computes live)."""
        pending = self.client
        if not self._available():
            return False
        try:
            client = pending.start()
        except REDIS_ERRORS:
            self._count("errors")
            self._retry_at = time.monotonic() + self.backoff_s
            return False
        if self.client is pending:
            self.client = client
        else:  # another thread built it first
            client.close()
        return True

    def _node_failed(self, name: str) -> None:
        self._count("errors")
        self._node_retry_at[name] = time.monotonic() + self.backoff_s
        self._refresh_slots()

    def _pointer(self, kind: str) -> Pointer | None:
        """The current pointer of ``kind``; refreshing it also refreshes the kind's experiment (one round trip)."""
        now = time.monotonic()
        cached = self._pointers.get(kind)
        if cached is not None and now - cached[2] < self.pointer_ttl_s:
            return self._read(kind, cached)
        started = self._pointer_ticket()
        # Looked at again after the ticket: one another refresh stored before it is the last read that the branches
        # below keep; one stored after it wins over this refresh's (``_store_pointer``).
        cached = self._pointers.get(kind)
        if self._cluster:
            # Pointer first, experiment after its reply: the experiment is written before the pointer.
            (raw,) = self._cluster_fetch([(b"GET", self.schema.pointer(kind))])
            (raw_experiment,) = self._cluster_fetch([(b"GET", self.schema.experiment(kind))])
            if raw is FAILED:  # its master is down: the last pointer read is still the current one (nobody can flip)
                last = cached or (None, None, 0.0)
                return self._read(kind, self._store_pointer(kind, (last[0], last[1], now), started))
            if raw_experiment is FAILED:  # the experiment's master is down: keep what was read with this pointer
                kept = cached[1] if cached is not None and cached[0] is not None else None
                raw_experiment = kept.encode() if kept is not None and cached[0].encode() == raw else None
        else:
            pipe = self.client.pipeline(transaction=False)
            pipe.get(self.schema.pointer(kind))
            pipe.get(self.schema.experiment(kind))
            raw, raw_experiment = pipe.execute(raise_on_error=False)
            raw = self._answer(raw)  # an error reply (WRONGTYPE): as a malformed pointer
            if isinstance(raw_experiment, BaseException):  # an error reply (WRONGTYPE): a malformed experiment
                self._count("errors")
                raw_experiment = None
        pointer = None
        if raw is not None:
            try:
                pointer = Pointer.decode(raw)
            except (ValueError, UnicodeDecodeError):  # a malformed pointer is no published version: live values
                self._count("errors")
        experiment = None
        if raw_experiment is not None:
            try:
                experiment = Experiment.decode(raw_experiment)
            except ValueError:  # a malformed experiment is no experiment: queries are logged without arms
                self._count("errors")
            served = Experiment.served_version(raw_experiment)
            if served is not None and (pointer is None or served != pointer.version):
                experiment = None  # read around a flip: the other version's, whose arms are not this version's
        return self._read(kind, self._store_pointer(kind, (pointer, experiment, now), started))

    def _pointer_ticket(self) -> int:
        """The next number of the sequence that orders this cache's pointer reads (their starts and ends)."""
        with self._pointer_lock:
            self._pointer_tickets += 1
            return self._pointer_tickets

    def _store_pointer(
        self, kind: str, entry: tuple[Pointer | None, Experiment | None, float], started: int
    ) -> tuple[Pointer | None, Experiment | None, float]:
        """Cache ``entry``, read by a refresh that took ticket ``started``, unless the stored read ended after that
        (two refreshes overlapped, and this one may have read Redis first: its pointer may be the older one); the
        entry cached now, which the caller reads."""
        with self._pointer_lock:
            self._pointer_tickets += 1
            if started > self._pointer_read_ends.get(kind, 0):
                self._pointers[kind] = entry
                self._pointer_read_ends[kind] = self._pointer_tickets
            return self._pointers[kind]

    def _read(self, kind: str, entry: tuple[Pointer | None, Experiment | None, float]) -> Pointer | None:
        """``entry``'s pointer, remembered as the one this thread's lookup of ``kind`` reads (``_last_read``)."""
        self._read_here.last = (kind, entry)
        return entry[0]

    def _last_read(self, kind: str) -> tuple[Pointer | None, Experiment | None]:
        """The pointer and experiment this thread's last lookup of ``kind`` read (else the last read of any
        thread): another thread may have refreshed them after a flip since."""
        last = getattr(self._read_here, "last", None)
        entry = last[1] if last is not None and last[0] == kind else self._pointers.get(kind)
        return (None, None) if entry is None else (entry[0], entry[1])

    def _version(self, kind: str) -> str | None:
        """The published version this thread's lookup of ``kind`` read, without touching Redis."""
        pointer = self._last_read(kind)[0]
        return None if pointer is None else pointer.version

    def _experiment(self, kind: str) -> Experiment | None:
        """The experiment read with that version, without touching Redis (logging never adds a round trip)."""
        return self._last_read(kind)[1]

    def _lookup(self, kind: str, key: str) -> Any:
        """The value of ``key`` (decoded), ``ABSENT`` on a miss: the published version's, else the live one. A
        published value that does not decode, or an error reply for its bucket (a key of another type), is counted
        as an error and read past, to the live value: it made a miss of every lookup of the key, while the value
        ``get_or_compute`` stored for it went unread."""
        if self._cluster:
            return self._lookup_many(kind, [key])[0]
        if not self._available():
            return ABSENT
        try:
            pointer = self._pointer(kind)
            if pointer is not None:
                (raw,) = self._round_trip_per_key([(b"HGET", self.schema.bucket_for_key(kind, pointer, key), key)])
                if (value := self._decode(kind, raw)) is not ABSENT:
                    return value
            (raw,) = self._round_trip_per_key([(b"GET", self.schema.live(kind, key))])
            if (value := self._decode(kind, raw)) is not ABSENT:
                self._observe_live_hits(kind, [key])
            return value
        except REDIS_ERRORS as error:
            self._trip(error)
            return ABSENT

    def _observe_live_hits(self, kind: str, keys: Sequence[str]) -> None:
        """Show the cache's admission policy the live values ``get`` and ``get_many`` read, as ``get_or_compute``'s
        lookups do (``probation`` counts a probation hit or refreshes the key in its LRU, ``frequency`` counts the
        key): one more round trip, none under ``always``. A key read only through ``get`` was never refreshed, and
        left the tier while hot. Their misses are not shown: they store nothing, and a caller that computes one with
        ``get_or_compute`` shows it then. Replies are not read (a refused touch is no reason to fail a read)."""
        if not keys or self.admission.name == "always":  # no commands: not even a pipeline built, on the read path
            return
        builder = self._recorder if self._cluster else self.client
        pipe = builder.pipeline(transaction=False)
        if not observe_all(self.admission, pipe, self.schema, kind, keys):
            return
        commands = [args for args, _ in pipe.command_stack]
        if self._cluster:
            self._cluster_fetch(commands)
            return
        try:
            send_pipelined(self.client, commands, while_waiting=self._while_waiting)
        except REDIS_ERRORS as error:
            self._trip(error)

    def _round_trip(self, commands: list[tuple]) -> list:
        """The replies of ``commands`` (``connection.send_pipelined``), the query logger sending its full entries
        while Redis works on them; an error reply raises."""
        replies = send_pipelined(self.client, commands, while_waiting=self._while_waiting)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _round_trip_per_key(self, commands: list[tuple]) -> list:
        """``_round_trip`` for a batch of one command per key (or per bucket): an error reply (a key of another type:
        WRONGTYPE) fails only its own command, which is counted as an error and replied ``FAILED``; the other replies
        keep their places."""
        replies = send_pipelined(self.client, commands, while_waiting=self._while_waiting)
        for index, reply in enumerate(replies):
            if isinstance(reply, Exception):
                self._trip(reply)
                replies[index] = FAILED
        return replies

    def _lookup_admitting(
        self, kind: str, key: str, policy: AdmissionPolicy, *, extras: bool = False
    ) -> tuple[Any, Decision | None, int | None, float | None]:
        """``_lookup`` whose live ``GET`` carries the policy's commands in the same round trip; the decision is
        None when Redis failed (or the client is backing off), or refused the policy's commands (the value read is
        still returned). With ``extras``, the same round trip also reads the live value's ``PTTL`` (ms) and its
        delta (s): both None when published, unknown or refused. A live key that does not decode, or is of another
        type, is a miss whose computed value is stored over it: it made every call compute and store nothing."""
        if self._cluster:
            return self._lookup_admitting_cluster(kind, key, policy, extras)
        if not self._available():
            return ABSENT, None, None, None
        try:
            pointer = self._pointer(kind)
            if pointer is not None:
                raw = self._answered(self.client.hget, self.schema.bucket_for_key(kind, pointer, key), key)
                if (value := self._decode(kind, raw)) is not ABSENT:
                    return value, Decision(True), None, None  # published: the policy never sees it
            live = self.schema.live(kind, key)
            pipe = self.client.pipeline(transaction=False)
            pipe.get(live)
            if extras:
                pipe.pttl(live)
                pipe.get(live_delta_key(self.schema, kind, key))
            if not policy.observe(pipe, self.schema, kind, key) and not extras:
                return self._decode(kind, self._answered(self.client.get, live)), Decision(True), None, None  # always
            raw, *replies = pipe.execute(raise_on_error=False)
            ttl, delta, *replies = replies if extras else (None, None, *replies)
            value = self._decode(kind, self._answer(raw))  # WRONGTYPE: a miss, whose store (SET) replaces the key
            refused = next((reply for reply in replies if isinstance(reply, BaseException)), None)
            if refused is not None:  # the policy's writes were refused (OOM at maxmemory): the value read still serves
                self._trip(refused)
                return value, None, None, None
            if not extras:
                return value, policy.decide(replies), None, None
            return value, policy.decide(replies), self._extra_reply(ttl), _seconds(self._extra_reply(delta))
        except REDIS_ERRORS as error:
            self._trip(error)
            return ABSENT, None, None, None

    def _answered(self, command: Callable[..., Any], *args: Any) -> Any:
        """``command(*args)``'s reply, as ``_answer`` takes a pipeline's."""
        try:
            return command(*args)
        except redis.ResponseError as error:
            return self._answer(error)

    def _answer(self, reply: Any) -> Any:
        """``reply``, or None for an error reply (a key of another type: WRONGTYPE), counted as an error; a failure
        of the connection raises."""
        if isinstance(reply, redis.ResponseError):
            self._trip(reply)
            return None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def _lookup_admitting_cluster(
        self, kind: str, key: str, policy: AdmissionPolicy, extras: bool = False
    ) -> tuple[Any, Decision | None, int | None, float | None]:
        """``_lookup_admitting`` on a cluster: the live ``GET`` (and with ``extras`` its ``PTTL`` and delta) and the
        policy's commands go out together, each to its own master; a failing master makes the decision None
        (nothing stored)."""
        pointer = self._pointer(kind)
        if pointer is not None:
            (raw,) = self._cluster_fetch([(b"HGET", self.schema.bucket_for_key(kind, pointer, key), key)])
            if raw is FAILED:
                return ABSENT, None, None, None
            if (value := self._decode(kind, raw)) is not ABSENT:
                return value, Decision(True), None, None
        recorder = self._recorder.pipeline(transaction=False)
        policy.observe(recorder, self.schema, kind, key)
        live = self.schema.live(kind, key)
        head = [(b"GET", live)]
        if extras:
            head += [(b"PTTL", live), (b"GET", live_delta_key(self.schema, kind, key))]
        raw, *rest = self._cluster_fetch([*head, *(args for args, _ in recorder.command_stack)])
        ttl, delta = (rest[0], rest[1]) if extras else (None, None)
        replies = rest[2:] if extras else rest
        if raw is FAILED:
            return ABSENT, None, None, None
        value = self._decode(kind, raw)
        if any(reply is FAILED for reply in replies):  # the policy's commands failed: the value read still serves
            return value, None, None, None
        decision = policy.decide(replies) if replies else Decision(True)
        return value, decision, self._extra_reply(ttl), _seconds(self._extra_reply(delta))

    def _lookup_many(self, kind: str, keys: Sequence[str]) -> list[Any]:
        """The values of ``keys`` (decoded, ``ABSENT`` for misses), as ``_lookup``: those of the published version,
        and live values for the keys it lacks, holds undecodable, or answered an error for."""
        if keys and self._cluster:
            return self._lookup_many_cluster(kind, keys)
        if not keys or not self._available():
            return [ABSENT] * len(keys)
        try:
            pointer = self._pointer(kind)
            found: list[Any] = [ABSENT] * len(keys)
            if pointer is not None:
                replies = self._round_trip_per_key(
                    [
                        (b"HGET", self.schema.bucket(kind, pointer.version, bucket_of(k, pointer.buckets)), k)
                        for k in keys
                    ]
                )
                found = [self._decode(kind, raw) for raw in replies]
            self._read_live(kind, keys, found, [i for i, value in enumerate(found) if value is ABSENT])
            return found
        except REDIS_ERRORS as error:
            self._trip(error)
            return [ABSENT] * len(keys)

    def _read_live(self, kind: str, keys: Sequence[str], found: list[Any], missing: list[int]) -> None:
        """Fill ``found`` at the indexes ``missing`` with the live values of those keys (decoded; one round trip, on a
        cluster one per master), and show the admission policy the hits."""
        if not missing:
            return
        commands = [(b"GET", self.schema.live(kind, keys[i])) for i in missing]
        live = self._cluster_fetch(commands) if self._cluster else self._round_trip_per_key(commands)
        for i, raw in zip(missing, live, strict=True):
            found[i] = self._decode(kind, raw)
        self._observe_live_hits(kind, [keys[i] for i in missing if found[i] is not ABSENT])

    def _lookup_many_cluster(self, kind: str, keys: Sequence[str]) -> list[Any]:
        """``_lookup_many`` on a cluster: one round trip to every master holding a bucket, plus one for live values;
        the keys of a failing master (or an error reply) are misses, the others answer from the same version."""
        pointer = self._pointer(kind)
        found: list[Any] = [ABSENT] * len(keys)
        missing = list(range(len(keys)))
        if pointer is not None:
            replies = self._cluster_fetch(
                [(b"HGET", self.schema.bucket(kind, pointer.version, bucket_of(k, pointer.buckets)), k) for k in keys]
            )
            found = [self._decode(kind, raw) for raw in replies]
            # not FAILED: a dead master's keys stay misses
            missing = [i for i, raw in enumerate(replies) if raw is not FAILED and found[i] is ABSENT]
        self._read_live(kind, keys, found, missing)
        return found

    def _log_many(
        self, kind: str, keys: Sequence[str], hits: Sequence[bool], start_ns: int, user: str | None, tenant: str | None
    ) -> None:
        """``_log`` for every key of one batch lookup, queued at once."""
        found = sum(hits)
        with self._count_lock:
            self.hits += found
            self.misses += len(hits) - found
        if self.logger is not None:
            latency_us = (time.perf_counter_ns() - start_ns) // 1000
            experiment = self._experiment(kind)
            arms = None if experiment is None else [experiment.arm(key) for key in keys]
            self.logger.log_many(kind, keys, hits, latency_us=latency_us, user=user, tenant=tenant, arms=arms,
                                 version=self._version(kind))  # fmt: skip

    def _log(self, kind: str, key: str, hit: bool, start_ns: int, user: str | None, tenant: str | None) -> None:
        with self._count_lock:  # ``_count`` inline: a third of its cost, on every lookup
            if hit:
                self.hits += 1
            else:
                self.misses += 1
        if self.logger is not None:
            latency_us = (time.perf_counter_ns() - start_ns) // 1000
            experiment = self._experiment(kind)
            arm = None if experiment is None else experiment.arm(key)
            self.logger.log(kind, key, hit=hit, latency_us=latency_us, user=user, tenant=tenant, arm=arm,
                            version=self._version(kind))  # fmt: skip


os.register_at_fork(after_in_child=_renew_locks)  # once per process: hooks are never removed
