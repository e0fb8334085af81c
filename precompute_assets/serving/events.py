"""User events: one Redis Stream entry per user action, written off the caller's path.

``EventLogger.record_event(user, action, entity=..., tenant=...)`` queues an event and returns at once; the
query logger's background thread (``QueryLogger``, reused here) writes them in pipelined ``XADD ... MAXLEN ~``
chunks to ``{ns}:1:events``. A full buffer, a failing Redis, a closed logger or a field without text (its ``str()``
raised) drops events and counts them (``stats.dropped_buffer_full``, ``stats.dropped_write_failed``,
``stats.dropped_closed``, ``stats.dropped_stale``, ``stats.dropped_invalid``): a caller is never blocked and never
sees an error.

Stream entry fields (all strings): ``ts`` event time in ms since the epoch, ``user``, ``action`` (one of
``ACTIONS``; others are stored and quarantined downstream as unknown), ``entity`` (what the action was about:
a creative id for ``creative_upload`` / ``variant_review``, a campaign id for ``campaign_create`` /
``analytics_view``) and ``tenant`` when known. The stream ID is the arrival time: an hour is one ``XRANGE``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from .connection import connect, is_cluster
from .keys import KeySchema
from .querylog import (
    READ_PAGE,
    QueryLogger,
    _bounded,
    _clean_text,
    _int_field,
    read_stream_window,
    stream_ms,
    ts_problem,
)

ACTIONS = ("login", "dashboard_view", "campaign_create", "creative_upload", "variant_review", "analytics_view")
ACTION_INDEX = {action: i for i, action in enumerate(ACTIONS)}
EVENT_FIELDS = (b"ts", b"user", b"action", b"entity", b"tenant")
DEFAULT_EVENTS_MAXLEN = 10_000_000


def events_stream(schema: KeySchema) -> str:
    """The user-event stream of ``schema``'s namespace (``{ns}:1:events``)."""
    return schema.events()


@dataclass
class UserEvent:
    ts_ms: int
    user: str
    action: str
    entity: str | None = None
    tenant: str | None = None

    def fields(self) -> dict[str, str]:
        out = {"ts": str(self.ts_ms), "user": self.user, "action": self.action}
        if self.entity is not None:
            out["entity"] = self.entity
        if self.tenant is not None:
            out["tenant"] = self.tenant
        return out


class EventLogger(QueryLogger):
    """Appends user events to the event stream from a background thread (the query logger's machinery: bounded
    buffer, chunked pipelined ``XADD`` with ``MAXLEN ~``, backoff after a failure, drops counted in ``stats``).

    ``clock`` returns ms since the epoch; a simulated clock (replaying a workload into the past) makes stream
    IDs follow event times (single writer only).
    """

    send_unit = 8  # one small XADD per event: 8 packed and sent per hold of the lock
    caller_flush = False  # a few events a second: the thread sends them

    def __init__(
        self,
        client: redis.Redis,
        schema: KeySchema | None = None,
        *,
        stream_maxlen: int = DEFAULT_EVENTS_MAXLEN,
        **options: Any,
    ) -> None:
        """``QueryLogger``'s options, with the event stream's own cap."""
        super().__init__(client, schema, stream_maxlen=stream_maxlen, **options)
        self._stream = events_stream(self.schema).encode()
        self._thread.name = "event-logger"

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "pc", socket_timeout: float = 1.0, **options: Any) -> EventLogger:
        """A logger on its own connection to ``url`` (it never queues behind a service's lookups)."""
        return cls(connect(url, socket_timeout=socket_timeout, pending=True), KeySchema(namespace), **options)

    def record_event(
        self, user: str | None, action: str | None, *, entity: str | None = None, tenant: str | None = None
    ) -> None:
        """Queue one user event; never raises, never blocks on Redis (a full buffer drops it, counted). A missing
        user or action is written empty, for the drain to quarantine and count; text longer than
        ``LOGGED_TEXT_CHARS`` is cut to it (still quarantined), as the query logger cuts it: a request body recorded
        whole stayed in the buffer and in the stream, which Redis never evicts."""
        try:  # before taking a slot of the buffer: a field whose str() raised kept its slot for good
            texts = [None if value is None else _bounded(_text(value)) for value in (user, action, entity, tenant)]
        except Exception:
            with self._count_lock:
                self.stats.logged += 1
                self.stats.dropped_invalid += 1
            return
        user_text, action_text, entity_text, tenant_text = texts
        # not "None": the drain quarantines an empty user or action
        self._queue(1, lambda _: UserEvent(self.clock(), user_text or "", action_text or "", entity_text, tenant_text))
        self._after_queue()

    def log(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - guard against misuse
        raise TypeError("EventLogger records user events: call record_event(user, action, entity=, tenant=)")

    @staticmethod
    def _size(item: UserEvent) -> int:
        return 1

    @staticmethod
    def _time(item: UserEvent) -> int:
        return item.ts_ms

    def _commands(self, batch: list[UserEvent]) -> Iterator[tuple[tuple[bytes, ...], int]]:
        """One ``XADD`` per event (no hit/miss statistics: events are not lookups)."""
        for event in batch:
            fields = ((name.encode(), _wire(value)) for name, value in event.fields().items())
            yield self._xadd(self._entry_id(event.ts_ms), fields), 1


def _wire(text: str) -> bytes:
    """``text`` as the bytes it came from: bytes that were no UTF-8 (``_text``) as they were, a lone surrogate of a
    ``str`` as its UTF-8 form; either way no UTF-8, which the drain quarantines."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _text(value: Any) -> str:
    """A field as text: bytes (a user id read from Redis) decoded as UTF-8, not ``"b'...'"`` as ``str`` gives. Bytes
    that are no UTF-8 stay what they were (``surrogateescape``), written back as they came for the drain to quarantine
    and count: decoded with U+FFFD, two users of different bytes became one."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, (bytes, bytearray)) else str(value)


# --- reading the stream back (the user_events asset and the user_event_sensor) ---------------------------


def read_event_window(
    client: redis.Redis, schema: KeySchema, start_ms: int, end_ms: int, *, page: int = READ_PAGE
) -> Iterator[list[tuple[bytes, dict[bytes, bytes]]]]:
    """Yield pages of event entries that arrived in ``[start_ms, end_ms)``, in ID order (idempotent)."""
    return read_stream_window(client, schema, start_ms, end_ms, page=page, stream=events_stream(schema))


def read_events_after(
    client: redis.Redis, schema: KeySchema, after_id: str, *, limit: int, page: int = READ_PAGE
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """At most ``limit`` entries with IDs after ``after_id`` (``ms-seq``), in ID order: what a cursor reads."""
    stream, lower, out = events_stream(schema), f"({after_id}", []
    while len(out) < limit:
        want = min(page, limit - len(out))
        entries = client.xrange(stream, min=lower, max="+", count=want)
        out += entries
        if len(entries) < want:
            break
        lower = "(" + entries[-1][0].decode()
    return out


USER_STATE_TTL_S = 2 * 86_400  # a local day in any time zone, and a session that goes on past its end
USER_STATE_CHUNK = 1_000  # users per pipelined round trip


def read_user_states(
    client: redis.Redis, schema: KeySchema, users: Sequence[str], fields: Sequence[bytes]
) -> dict[str, list[bytes | None]]:
    """The ``fields`` of the stored session states of ``users`` (``HMGET``: the publisher's ACL user may run it);
    users without one are left out."""
    out: dict[str, list[bytes | None]] = {}
    for start in range(0, len(users), USER_STATE_CHUNK):
        chunk = users[start : start + USER_STATE_CHUNK]
        pipe = client.pipeline(transaction=False)
        for user in chunk:
            pipe.hmget(schema.user_state(user), list(fields))
        out.update((user, values) for user, values in zip(chunk, pipe.execute(), strict=True) if any(values))
    return out


@dataclass(frozen=True)
class UserStatesSpan:
    """Stream IDs between which ``user_event_sensor`` stored the state of every event's user without a gap: after
    ``since``, through ``through``, on servers that lost no key meanwhile (``server``, their ``server_mark``; None
    when they do not say). A stored state whose day and session began after ``since`` saw every event of them
    (``UserState.whole_since``)."""

    since: str
    through: str
    server: str | None = None

    @property
    def since_ms(self) -> int:
        return stream_ms(self.since)

    def encode(self) -> str:
        return " ".join((self.since, self.through, *((self.server,) if self.server else ())))

    @classmethod
    def decode(cls, raw: bytes | None) -> UserStatesSpan | None:
        """The span read back; None for none, or one that is malformed (no span: every state is partial)."""
        try:
            since, through, *server = raw.decode().split(" ")
            stream_ms(since)
        except (AttributeError, ValueError, UnicodeDecodeError):
            return None
        return cls(since, through, *server) if len(server) <= 1 else None

    def carries(self, read_after: str, server: str | None) -> bool:
        """Whether this span goes on over the events after ``read_after``, on servers marked ``server`` now: it ends
        where they begin, and its servers lost nothing since (the same mark, one they gave)."""
        return self.through == read_after and server is not None and self.server == server

    def after(self, read_after: str, read_through: str, server: str | None) -> UserStatesSpan:
        """The span once the states of the events after ``read_after`` through ``read_through`` are stored, on
        servers marked ``server``: this one carried on (``carries``), else a new one from there. A state Redis
        evicted, or lost in a restart, starts its user afresh: its day and session then look as if they began after
        it; a new span does not vouch for them."""
        return UserStatesSpan(self.since if self.carries(read_after, server) else read_after, read_through, server)


def server_mark(client: redis.Redis) -> str | None:
    """What changes whenever the servers behind ``client`` may have lost a key: each primary's ``run_id`` (a
    restart) and ``evicted_keys`` (``INFO``); None when they do not say (``INFO`` refused: an ACL, a proxy)."""

    def per_node(section: str) -> dict:
        reply = client.info(section, target_nodes="primaries") if is_cluster(client) else client.info(section)
        # one server's reply, or a cluster's of one primary (redis-py unwraps a single node's): else one per node
        return {"": reply} if not all(isinstance(value, dict) for value in reply.values()) else reply

    try:
        servers, stats = per_node("server"), per_node("stats")
        marks = [f"{servers[node]['run_id']}:{stats[node]['evicted_keys']}" for node in sorted(servers)]
        return ",".join(marks) if marks else None
    except (redis.ResponseError, KeyError, TypeError, AttributeError):
        return None


def _marks(mark: str) -> list[tuple[str, int]]:
    """A ``server_mark``'s ``(run_id, evicted_keys)`` per primary."""
    return [(run, int(evicted)) for run, _, evicted in (node.rpartition(":") for node in mark.split(","))]


def restarted_since(before: str | None, after: str | None) -> bool:
    """Whether servers whose ``server_mark`` was ``before`` and is ``after`` restarted (or changed) in between."""
    if before is None or after is None:
        return False
    return [run for run, _ in _marks(before)] != [run for run, _ in _marks(after)]


def evicted_since(before: str | None, after: str | None) -> bool:
    """Whether servers whose ``server_mark`` was ``before`` and is ``after`` evicted keys in between, and did not
    restart (a restart loses what it held; evictions say the memory is too small for it)."""
    if before is None or after is None or restarted_since(before, after):
        return False
    return any(now > then for (_, then), (_, now) in zip(_marks(before), _marks(after), strict=True))


def read_user_states_span(client: redis.Redis, schema: KeySchema) -> UserStatesSpan | None:
    return UserStatesSpan.decode(client.get(schema.user_states_span()))


def write_user_states(
    client: redis.Redis,
    schema: KeySchema,
    states: Mapping[str, Mapping[str, str]],
    *,
    span: UserStatesSpan | None = None,
    ttl_s: int = USER_STATE_TTL_S,
) -> None:
    """Store each user's session-state fields, replacing what was there, with a TTL of ``ttl_s``; then, only when
    every one of them was written, ``span`` (the states' span carried on to the events they counted)."""
    users = list(states)
    for start in range(0, len(users), USER_STATE_CHUNK):
        pipe = client.pipeline(transaction=False)
        for user in users[start : start + USER_STATE_CHUNK]:
            key = schema.user_state(user)
            pipe.hset(key, mapping=dict(states[user]))
            pipe.expire(key, ttl_s)
        pipe.execute()
    if span is not None:
        client.set(schema.user_states_span(), span.encode())


def validate_event(entry_id: bytes, fields: dict[bytes, bytes]) -> tuple[dict[str, Any] | None, str | None]:
    """One stream entry as a clean row, or the reason it must be quarantined. An action outside ``ACTIONS`` is
    quarantined with a reason starting ``unknown action`` (counted per action by the asset)."""
    arrival_ms = stream_ms(entry_id)
    ts, reason = _int_field(fields.get(b"ts"), "ts")
    if reason:
        return None, reason
    if reason := ts_problem(ts, arrival_ms):
        return None, reason
    values: dict[str, str | None] = {}
    for name, required in (("user", True), ("action", True), ("entity", False), ("tenant", False)):
        values[name], reason = _clean_text(fields.get(name.encode()), name, required=required)
        if reason:
            return None, reason
    if values["action"] not in ACTION_INDEX:
        return None, f"unknown action: {values['action'][:64]!r}"
    for name in ("user", "entity", "tenant"):  # each may name the key of a task's value: no cache key holds a brace
        if values[name] is not None and ("{" in values[name] or "}" in values[name]):
            return None, f"{name} has a brace ('{{' or '}}'): no cache key can name it"
    for name in ("entity", "tenant"):
        values[name] = values[name] or None  # written empty: none, as when the field is left out
    return {"stream_id": entry_id.decode(), "ts_ms": ts, **values}, None


def unknown_action(reason: str | None) -> bool:
    return reason is not None and reason.startswith("unknown action")
