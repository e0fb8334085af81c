"""Invalidation: take values out of the serving cache by key, key prefix or whole version, within one kind.

Every pattern stays inside the kind's own namespace (``{ns}:1:{kind}:``), is glob-escaped, and is walked with
``SCAN``/``HSCAN`` in bounded batches (never ``KEYS``), so a large delete neither blocks Redis nor reaches
another kind. Invalidating keys first increments the kind's epoch (``KeySchema.epoch``): a ``get_or_compute`` whose
computation started before then returns its value but does not store it (on one server; see ``cache._STORE``).
The current version's buckets are never deleted whole: invalidating keys removes their fields
from it (readers then miss, never read a mix), and ``version=`` refuses the version readers are on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis

from .acl import acl_hint
from .admission import UNPUBLISH
from .keys import MAX_BUCKETS, KeySchema, Pointer, check_kind, check_version

log = logging.getLogger(__name__)

SCAN_COUNT = 1000  # keys or fields per SCAN/HSCAN call, and per delete
_GLOB = re.compile(r"([*?\[\]\\])")


@dataclass(frozen=True)
class Invalidated:
    """What one invalidation removed."""

    kind: str
    live_keys: int = 0  # read-through values (``{kind}:live:{key}``) deleted
    fields: int = 0  # keys removed from the current version's buckets
    buckets: int = 0  # whole buckets of a non-current version deleted
    version: str | None = None  # the current version the fields were removed from, or the version deleted
    recorded: tuple[str, ...] = ()  # the versions whose record of invalidations (``KeySchema.invalidated``) it added to

    @property
    def total(self) -> int:
        return self.live_keys + self.fields + self.buckets


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return _GLOB.sub(r"\\\1", text)


def invalidate(
    client: redis.Redis,
    kind: str,
    *,
    key: str | None = None,
    prefix: str | None = None,
    version: str | None = None,
    schema: KeySchema | None = None,
) -> Invalidated:
    """Remove one ``key``, every key starting with ``prefix``, or every bucket of a non-current ``version`` of
    ``kind`` (exactly one of the three). Keys go from the current version, from the version the last flip replaced
    (in its grace: readers not on the new pointer yet, and ``probation``'s settling, still read it) and from the live
    tier; ``fields`` counts the current version's."""
    schema = schema or KeySchema()
    check_kind(kind)
    if sum(arg is not None for arg in (key, prefix, version)) != 1:
        raise ValueError("give exactly one of key, prefix or version")
    if version is not None:
        return _drop_version(client, kind, check_version(version), schema)
    if key is not None:
        live_name = schema.live(kind, key)  # validates the key
    elif not prefix:
        raise ValueError("an empty prefix would invalidate every key of the kind: use a version, or a real prefix")
    fenced = bump_epoch(client, kind, schema)
    pointer, exact = _current_or_named(client, kind, schema)
    # The version the last flip replaced, in its grace: readers whose pointer is not refreshed yet read it, and
    # probation's settling hands its dropped keys' values over to the live tier (publish.settle_published).
    previous = _previous(client, kind, schema, pointer)
    if key is not None:
        fields = 0
        for version in (pointer, previous):
            if version is not None:
                recorded = _record(client, schema, kind, version, f"k:{key}")
                # the key's bucket, or each bucket where a malformed pointer leaves the count unknown
                whole = version is not pointer or exact
                buckets = [schema.bucket_for_key(kind, version, key)] if whole else [
                    schema.bucket(kind, version.version, index) for index in range(version.buckets)
                ]  # fmt: skip
                for start in range(0, len(buckets), SCAN_COUNT):  # pipelined, a bounded number at a time
                    part = buckets[start : start + SCAN_COUNT]
                    pipe = client.pipeline(transaction=False)
                    for bucket in part:
                        pipe.hdel(bucket, key)
                    for bucket, removed in zip(part, pipe.execute(), strict=True):
                        if removed:
                            _record_if_emptied(client, schema, kind, version, bucket)
                        fields += int(removed) if version is pointer else 0
                if not recorded:  # refused at maxmemory: the delete freed memory
                    _record(client, schema, kind, version, f"k:{key}")
        live_keys = int(client.unlink(live_name))
        if not fenced:
            bump_epoch(client, kind, schema)
        _unpublish(client, schema, kind, fields)
        return Invalidated(kind, live_keys=live_keys, fields=fields, version=_name(pointer),
                           recorded=_names(pointer, previous))  # fmt: skip
    fields = 0
    for version in (pointer, previous):
        if version is None:
            continue
        recorded = _record(client, schema, kind, version, f"p:{prefix}")
        for index in range(version.buckets):
            bucket = schema.bucket(kind, version.version, index)
            pairs = client.hscan_iter(bucket, match=f"{glob_escape(prefix)}*", count=SCAN_COUNT)  # NOVALUES: 7.4+
            matching = (field for field, _ in pairs)
            removed = _delete_in_batches(matching, lambda *found, bucket=bucket: client.hdel(bucket, *found))
            if removed:
                _record_if_emptied(client, schema, kind, version, bucket)
            fields += removed if version is pointer else 0
        if not recorded:  # refused at maxmemory: the deletes freed memory
            _record(client, schema, kind, version, f"p:{prefix}")
    # The live values last, as for one key: probation's settling copies a field of the version before to the live tier
    # (publish._copy_to_live), and one copied after its live value was deleted but before its field was would stay.
    live_pattern = f"{schema.live(kind, 'x')[:-1]}{glob_escape(prefix)}*"
    live = _delete_in_batches(client.scan_iter(match=live_pattern, count=SCAN_COUNT), client.unlink)
    if not fenced:
        bump_epoch(client, kind, schema)
    _unpublish(client, schema, kind, fields)
    return Invalidated(kind, live_keys=live, fields=fields, version=_name(pointer), recorded=_names(pointer, previous))


def _names(*versions: Pointer | None) -> tuple[str, ...]:
    return tuple(version.version for version in versions if version is not None)


def _unpublish(client: redis.Redis, schema: KeySchema, kind: str, fields: int) -> None:
    """Take ``fields`` keys the current version no longer holds off the count admission ``probation`` sizes its live
    tier by (``publish.record_published``): they are read through now. A Redis that refuses it (at ``maxmemory``, a
    publisher whose ACL predates ``EVAL``) leaves the tier short of them until the next publish, with a warning."""
    if fields:
        try:
            client.eval(UNPUBLISH, 1, schema.admission_fifo(kind, "published"), fields)
        except redis.exceptions.RedisError as error:
            log.warning(
                "%s: probation's live tier stays %d keys short until the next publish (%s)", kind, fields, error
            )


INVALIDATED_MIN_TTL_S = 7 * 86_400  # what an invalidation took out is remembered at least this long


def _record(client: redis.Redis, schema: KeySchema, kind: str, version: Pointer, *members: str) -> bool:
    """Remember ``members`` (see ``KeySchema.invalidated``) for ``version``, before deleting, for as long as the
    version's buckets live (at least ``INVALIDATED_MIN_TTL_S``): a restore of the version (``cache_health``, after
    Redis lost some of its buckets) or a retried publish of it wrote the invalidated values back. False when Redis
    refused it at ``maxmemory``."""
    name = schema.invalidated(kind, version.version)
    try:
        ttls = [client.ttl(schema.bucket(kind, version.version, index)) for index in {0, version.buckets - 1}]
        client.sadd(name, *members)
        if -1 not in ttls:  # a version without a TTL (patched in place): so is the record, which lives as long
            client.expire(name, max(INVALIDATED_MIN_TTL_S, *ttls))
    except redis.exceptions.OutOfMemoryError:
        return False  # at maxmemory: the caller records it again once its deletes freed memory
    except redis.exceptions.NoPermissionError as error:
        hint = acl_hint(error)
        log.warning("%s: not recorded, so a restore of the version writes it back (%s); %s", name, error, hint)
    return True


def _record_if_emptied(client: redis.Redis, schema: KeySchema, kind: str, version: Pointer, bucket: str) -> None:
    """Redis deletes a hash whose last field goes: remember that the invalidation emptied ``bucket``, which would
    otherwise look lost (expired or evicted) to ``cache_health``."""
    if not client.exists(bucket):
        _record(client, schema, kind, version, f"b:{bucket.rpartition(':')[2]}")


@dataclass(frozen=True)
class Invalidations:
    """What invalidations took out of one version (``KeySchema.invalidated``)."""

    keys: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    emptied: frozenset[int] = frozenset()  # bucket indexes

    def covers(self, key: str) -> bool:
        return key in self.keys or key.startswith(self.prefixes)


def recorded_members(client: redis.Redis, schema: KeySchema, kind: str, version: str) -> list[str]:
    """The record of what invalidations took out of ``version`` (``KeySchema.invalidated``), as its members, sorted:
    what a copy kept outside Redis (``remember``) gives back after Redis lost its data."""
    return sorted(m.decode() if isinstance(m, bytes) else m for m in client.smembers(schema.invalidated(kind, version)))


def remember(client: redis.Redis, schema: KeySchema, kind: str, version: Pointer, members: Iterable[str]) -> int:
    """Add ``members`` (``recorded_members`` of ``version`` kept elsewhere) to Redis's record of what invalidations
    took out of ``version``, as ``invalidate`` records them (for as long as its buckets live, at least a week), before
    a publish of it: a restore after Redis lost its data wrote the invalidated values back. How many it lacked."""
    there = set(recorded_members(client, schema, kind, version.version))
    missing = [member for member in dict.fromkeys(members) if member not in there]
    if missing and not _record(client, schema, kind, version, *missing):
        name = schema.invalidated(kind, version.version)
        raise redis.exceptions.OutOfMemoryError(f"{name}: not recorded, Redis is at maxmemory")
    return len(missing)


def invalidations(client: redis.Redis, schema: KeySchema, kind: str, version: str) -> Invalidations:
    """What invalidations took out of ``version`` of ``kind`` while it lived; nothing, with a warning, for a publisher
    user whose ACL predates the record (no ``SMEMBERS``): a restore then writes the version back whole, as before."""
    try:
        raw = client.smembers(schema.invalidated(kind, version))
    except redis.exceptions.NoPermissionError as error:
        log.warning("%s: not read (%s); %s", schema.invalidated(kind, version), error, acl_hint(error))
        return Invalidations()
    members = [m.decode() if isinstance(m, bytes) else m for m in raw]
    by_tag: dict[str, list[str]] = {"k": [], "p": [], "b": []}
    for member in members:
        tag, _, value = member.partition(":")
        by_tag.setdefault(tag, []).append(value)
    emptied = frozenset(int(index) for index in by_tag["b"] if index.isdigit())
    return Invalidations(frozenset(by_tag["k"]), tuple(by_tag["p"]), emptied)


def bump_epoch(client: redis.Redis, kind: str, schema: KeySchema) -> bool:
    """Increment the kind's epoch before its values are deleted: a read-through computation that started before then
    stores nothing after it (``cache._STORE``); after the deletes, a store between them would bring an old value back.
    False when the server refused it at ``maxmemory`` (``INCRBY`` may grow memory, a delete may not): the caller
    deletes anyway, which frees memory, and increments after (a refused store is refused there too). A publisher
    whose Redis user predates the epoch (no ``INCRBY``) deletes unfenced, with a warning: an invalidation must not
    fail because the fence against a rare race is refused."""
    try:
        client.incr(schema.epoch(kind))
    except redis.exceptions.OutOfMemoryError:
        return False
    except redis.exceptions.NoPermissionError as error:
        log.warning("%s: deleting without the invalidation fence (%s); %s", schema.epoch(kind), error, acl_hint(error))
    return True


def _delete_in_batches(names: Iterable, delete: Callable[..., int]) -> int:
    """``delete(*batch)`` for every ``SCAN_COUNT`` of ``names``; how many went."""
    deleted, batch = 0, []
    for name in names:
        batch.append(name)
        if len(batch) >= SCAN_COUNT:
            deleted += int(delete(*batch))
            batch = []
    return deleted + (int(delete(*batch)) if batch else 0)


def _drop_version(client: redis.Redis, kind: str, version: str, schema: KeySchema) -> Invalidated:
    raw = client.get(schema.pointer(kind))
    if raw is not None and _named_version(raw) == version:
        if _decoded(raw) is not None:
            raise ValueError(
                f"{kind} version {version} is current: readers are on it; publish or flip to another version first, "
                "or invalidate keys or a prefix"
            )
        raise ValueError(  # a malformed pointer that, repaired, serves it again
            f"{kind} version {version} is named by the malformed current pointer {raw[:80]!r}: repair the pointer "
            "or flip to another version first, or invalidate keys or a prefix"
        )
    pattern = f"{glob_escape(schema.bucket(kind, version, ''))}*"

    def ours(name: bytes | str) -> bool:  # bucket numbers and the embedding version's meta, nothing else
        suffix = (name.decode() if isinstance(name, bytes) else name).rpartition(":")[2]
        return suffix.isdigit() or suffix == "meta"

    def unlink_unless_current(*names: bytes) -> int:
        # Checked again before each batch: a publish of this version (a retry of the failed one whose partial
        # buckets an operator is removing) may flip to it meanwhile; its own check before its flip sees deleted ones.
        if (now := _current(client, kind, schema)) is not None and now.version == version:
            raise ValueError(f"{kind} version {version} became current while it was being deleted (a publish of it "
                             "flipped to it): stopped; invalidate keys or a prefix instead")  # fmt: skip
        return int(client.unlink(*names))

    names = (name for name in client.scan_iter(match=pattern, count=SCAN_COUNT) if ours(name))
    buckets = _delete_in_batches(names, unlink_unless_current)
    client.unlink(schema.invalidated(kind, version))
    if (previous := _pointer_at(client, schema.previous(kind))) is not None and previous.version == version:
        # its grace ends with it (cache stats showed a version that was gone); unless a flip replaced it meanwhile
        client.eval(_DELETE_IF_EQUAL, 1, schema.previous(kind), previous.encode())
    return Invalidated(kind, buckets=buckets, version=version)


_DELETE_IF_EQUAL = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def _pointer_at(client: redis.Redis, name: str) -> Pointer | None:
    """The pointer stored at ``name``; None when there is none or it is malformed, as readers take it (no published
    version: they serve live values, which an invalidation must still reach)."""
    return _decoded(client.get(name))


def _decoded(raw: bytes | None) -> Pointer | None:
    """``raw`` as a pointer; None when it is None or malformed."""
    try:
        return None if raw is None else Pointer.decode(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _current(client: redis.Redis, kind: str, schema: KeySchema) -> Pointer | None:
    return _pointer_at(client, schema.pointer(kind))


def _current_or_named(client: redis.Redis, kind: str, schema: KeySchema) -> tuple[Pointer | None, bool]:
    """The current pointer and True; or, when it is malformed (``v1:abc``) but names a version, that version with
    one bucket past the highest it has in Redis, and False: readers serve none of it now, but a repaired pointer
    would serve it again, so an invalidation takes keys out of it too (from every bucket: its count is unknown)."""
    raw = client.get(schema.pointer(kind))
    pointer = _decoded(raw)
    if raw is None or pointer is not None:
        return pointer, True
    version = _named_version(raw)
    if version is None:
        return None, True
    log.warning("%s: malformed pointer %r; invalidating in the version it names, %s", kind, raw[:80], version)
    indexes = [
        index
        for name in client.scan_iter(match=f"{glob_escape(schema.bucket(kind, version, ''))}*", count=SCAN_COUNT)
        if (suffix := (name.decode() if isinstance(name, bytes) else name).rpartition(":")[2]).isdigit()
        and (index := int(suffix)) < MAX_BUCKETS  # a stray key numbered past any version's buckets is none of them
    ]
    return (Pointer(version, max(indexes) + 1), False) if indexes else (None, True)


def _named_version(raw: bytes | str) -> str | None:
    """The version a malformed pointer names (the text before its last ``:``), if it is a version name."""
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        return check_version(text.rpartition(":")[0])
    except (ValueError, UnicodeDecodeError):
        return None


def _previous(client: redis.Redis, kind: str, schema: KeySchema, current: Pointer | None) -> Pointer | None:
    """The pointer the last flip replaced while its grace lasts (``KeySchema.previous``), unless it is ``current``
    (a flip back) or malformed."""
    previous = _pointer_at(client, schema.previous(kind))
    return None if previous == current else previous


def _name(pointer: Pointer | None) -> str | None:
    return None if pointer is None else pointer.version
