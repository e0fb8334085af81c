"""Publishing a version of precomputed values: write every bucket, then flip one pointer.

Readers see the previous version until the single ``SET`` of the pointer, and the new one after it; a
publish that fails half-way leaves the pointer untouched, and its partial buckets expire by their TTL.

On Redis Cluster the buckets of a version spread over every slot (their names carry no hash tag), so a publish
spreads its write load over all masters; readers resolve the pointer once and read buckets of exactly that
version, so they never mix versions there either. The pointer and the experiment are two slots: the experiment
is written first and the pointer second (readers read them in the opposite order, see ``flip_pointer``).
Campaign live values cannot be one transaction across slots: there each slot's keys are one MULTI/EXEC
(``transact_per_slot``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import operator
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

try:
    import hiredis
except ImportError:  # redis[hiredis] is a dependency; stay importable without it
    hiredis = None

from .acl import acl_hint, is_acl_refusal
from .admission import HAND_OVER, UNTRACK, evictable, fifo_names
from .cache import live_value_keys
from .connection import REDIS_ERRORS, cluster_send, follow_primary, is_cluster, key_slot, send_pipelined
from .events import evicted_since, restarted_since, server_mark
from .invalidate import INVALIDATED_MIN_TTL_S, Invalidations, bump_epoch, invalidations
from .keys import (
    MAX_BUCKETS,
    Codec,
    Experiment,
    Float32Codec,
    KeySchema,
    Pointer,
    bucket_ids,
    check_key,
    check_keys,
    check_kind,
    check_version,
    codec_for,
)
from .replication import REPLICA_WAIT_S, ReplicaLostError, Replicas, ReplicationTimeoutError, confirm_replicas

_log = logging.getLogger(__name__)
KEYS_PER_BUCKET = 64  # small hashes stay in Redis' compact listpack encoding
COMMANDS_PER_PIPELINE = 1000
# Keys per UNTRACK or HAND_OVER script of a settling: a script holds Redis for every other client until it ends, and
# 1000 keys took 2-5 ms (HAND_OVER, into a main LRU of 170,000 keys); 128 stay near two of _ADMIT's MAX_STEPS.
SETTLE_SCRIPT_KEYS = 128
FIELDS_PER_COMMAND = 1000  # hash fields one HSET or HDEL of patch_version writes or deletes at most


@dataclass(frozen=True)
class PublishResult:
    kind: str
    version: str
    keys: int
    buckets: int
    bytes: int
    seconds: float
    previous_version: str | None
    already_current: bool = False  # a retry of a publish whose flip had succeeded: nothing rewritten
    handed_over: int = 0  # keys of the version before handed to admission probation's live tier (settle_published)
    settle_error: str | None = None  # why that settling failed (the publish itself succeeded)
    mended: int = 0  # keys of an already current version written back: buckets a failover lost (``_mend_current``)

    @property
    def keys_per_s(self) -> float:
        return self.keys / self.seconds if self.seconds > 0 else float("inf")


def bucket_count(n_keys: int, keys_per_bucket: int = KEYS_PER_BUCKET) -> int:
    """How many hash buckets a version of ``n_keys`` keys gets; ``ValueError`` past ``MAX_BUCKETS``."""
    buckets = max(1, math.ceil(n_keys / keys_per_bucket))
    if buckets > MAX_BUCKETS:
        raise ValueError(
            f"{n_keys} keys is more than one version holds ({MAX_BUCKETS * keys_per_bucket}): split the kind"
        )
    return buckets


def publish_version(
    client: redis.Redis,
    kind: str,
    version: str,
    items: Iterable[tuple[str, Any]],
    *,
    n_keys: int,
    ttl_s: int | None = 2 * 86400,
    grace_s: int = 600,
    schema: KeySchema | None = None,
    progress: Callable[[int], None] | None = None,
    experiment: Experiment | None = None,
    replica_wait_s: float = REPLICA_WAIT_S,
    hand_over: bool = True,
) -> PublishResult:
    """Write ``items`` (``n_keys`` of them) as ``version`` of ``kind``, make it the current version, and record its
    key count for admission ``probation`` (``{kind}:fifo:{{...}}:published``). ``hand_over=False`` (a rollback from a
    bad version) settles probation's live tier without handing it the keys the replaced version drops.

    Buckets are written with their TTL in the same pipeline (``ttl_s=None``: no TTL while current, for
    versions patched in place); the previous version is given ``grace_s`` to live so that readers holding
    its pointer finish their reads, then expires as a whole. ``experiment`` is the A/B experiment the version
    serves, published with the flip (None ends any experiment of ``kind``). The flip waits up to ``replica_wait_s``
    for replicas to hold the version (``flip_pointer``).

    A retry of the version readers are on writes only the buckets that are missing (a failover lost them), gives
    the version it replaced its grace if the first attempt died before it did (``retire_replaced``), then records and
    settles it. On Redis Sentinel the sentinels are asked for the primary before the first write and after the flip
    (``connection.follow_primary``); when they named another one in between, ``redis.ConnectionError``.
    """
    schema = schema or KeySchema()
    check_kind(kind)
    check_version(version)
    codec = codec_for(kind)
    buckets = bucket_count(n_keys)
    started = time.perf_counter()
    pairs = list(items)
    if len(pairs) != n_keys:
        raise ValueError(f"publish of {kind} {version}: expected {n_keys} keys, got {len(pairs)}")
    keys, raw_values = zip(*pairs, strict=True) if pairs else ((), ())
    check_keys(keys)
    if len(set(keys)) != len(keys):
        raise ValueError(f"publish of {kind} {version}: {_duplicates(keys)}")
    fields = list(map(str.encode, keys))
    values = encode_many(codec, list(raw_values))
    written, n_bytes = len(pairs), sum(map(len, fields)) + sum(map(len, values))
    # Group by bucket with numpy: the per-key Python work is what bounds a million-key publish.
    ids = bucket_ids(fields, buckets)
    order = np.argsort(ids, kind="stable").tolist()
    bounds = (2 * np.searchsorted(ids[order], np.arange(buckets + 1))).tolist()
    flat: list[bytes] = [b""] * (2 * written)  # field, value, field, value ... in bucket order
    if written:
        pick = operator.itemgetter(*order)
        flat[0::2] = pick(fields) if written > 1 else [fields[0]]
        flat[1::2] = pick(values) if written > 1 else [values[0]]
    grouped = [flat[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

    names = [schema.bucket(kind, version, index).encode() for index in range(buckets)]
    filled = [(name, bucket) for name, bucket in zip(names, grouped, strict=True) if bucket]
    ttl = None if ttl_s is None else str(ttl_s).encode()
    writing = False  # buckets of a version readers are not on are being written
    try:
        primary = follow_primary(client)  # a long-lived publisher's connections may be older than a failover
        (current,) = run_commands(client, [(b"GET", schema.pointer(kind).encode())])
        serving = Pointer.decode_or_none(current)  # a malformed pointer is no version: this publish replaces it
        if serving is not None and serving.version == version:
            # Never rewrite the version readers are on (a step retried after its flip succeeded); its key count,
            # written after the flip, may be what failed.
            mended = _mend_current(client, schema, kind, version, filled, ttl, replica_wait_s)
            # A flip that died between its writes on a cluster (experiment, then pointer) may have left another one.
            run_commands(client, [experiment_command(schema.experiment(kind).encode(), experiment, version)])
            retire_replaced(client, schema, kind, grace_s=grace_s, replica_wait_s=replica_wait_s)
            previous = _replaced_pointer(client, schema, kind) if hand_over else None
            handed, settle_error = _settle(client, schema, kind, version, keys, previous, written=written, ttl_s=ttl_s)
            seconds = time.perf_counter() - started
            return PublishResult(
                kind, version, written, buckets, n_bytes, seconds, None, True, handed, settle_error, mended
            )
        writing = True
        if (taken := invalidations(client, schema, kind, version)) != Invalidations():
            # A version published again (a rollback to the one in its grace, a retry) keeps out what invalidations
            # took from it, as mending the current one does (h_inval)
            filled = [(name, kept) for name, bucket in filled if (kept := _without(bucket, taken))]
            written = sum(len(bucket) // 2 for _, bucket in filled)
        mark = server_mark(client)  # what tells eviction from a restart or a delete, should buckets go missing
        if _existing(client, names):
            # A retry of this version: start clean so no field of the failed attempt survives.
            send_commands(client, [(b"DEL", name) for name in names])
        batch: list[tuple[bytes, ...]] = []
        pending = sent = serving_lost = 0
        cluster = is_cluster(client)
        watch = _EvictionWatch(client, [] if serving is None else _bucket_names(schema, kind, serving), n_bytes)
        with contextlib.nullcontext(_bucket_sender(client)) if cluster else command_stream(client) as send:
            for name, bucket in filled:
                batch += _bucket_writes(name, bucket, ttl, cluster=cluster)
                pending += len(bucket) // 2
                if len(batch) >= watch.batch_commands:
                    send(batch)
                    if progress:
                        progress(pending)
                    sent += pending
                    batch, pending = [], 0
                    if serving_lost := watch.serving_lost():
                        break
            else:
                send(batch)
        if serving_lost:
            send_commands(client, [(b"DEL", name) for name in names])  # give the memory back to the serving version
            raise IncompleteVersionError(
                f"publish of {kind} version {version}: writing it evicted {serving_lost} of the {watch.present} "
                f"buckets of the version readers are on ({serving.version}){memory_note(client)}; stopped after "
                f"{sent} of {written} keys and deleted them. Readers stay on {serving.version} and miss the evicted "
                "buckets' keys until it is published again: give Redis more memory (maxmemory), or publish fewer keys"
            )
        if progress and pending:
            progress(pending)
        filled_names = [name for name, _ in filled]
        if (present := _existing(client, filled_names)) < len(filled):
            # At maxmemory a volatile policy evicts the version's own buckets (they carry a TTL) without an error.
            send_commands(client, [(b"DEL", name) for name in filled_names])  # give the memory back to the live one
            # ... or a failover promoted a replica without some (a cluster's master, Sentinel's primary)
            failover = cluster or primary is not None
            how, advice, evicted = _bucket_loss(mark, server_mark(client), failover)
            memory = memory_note(client) if evicted else ""
            raise IncompleteVersionError(
                f"publish of {kind} version {version}: {len(filled) - present} of {len(filled)} buckets were {how} "
                f"while being written{memory}; readers stay on the previous version"
                f"{_current_losses(client, schema, kind, current)}{advice}",
                evicted=evicted,
            )
    except REDIS_ERRORS as error:
        # Refused at maxmemory (noeviction, or nothing volatile left; inside a MULTI an EXECABORT), the partial
        # buckets held their memory for the whole TTL, and every write after (live values, the next publish) was
        # refused too. A version readers are on (mending it) is never deleted.
        deleted = False
        if writing:
            with contextlib.suppress(*REDIS_ERRORS):
                send_commands(client, [(b"DEL", name) for name in names])
                deleted = True
        left = "were deleted" if deleted else "expire by their TTL"
        error.add_note(
            f"publish of {kind} version {version} failed before its flip: readers stay on the previous version, "
            f"and the partial buckets {left}; retry the publish"
            + (" once Redis has the memory (or with fewer keys)" if "OOM" in str(error) else "")
        )
        raise

    try:
        previous = flip_pointer(
            client,
            schema,
            kind,
            Pointer(version, buckets),
            grace_s=grace_s,
            experiment=experiment,
            replica_wait_s=replica_wait_s,
        )
    except REDIS_ERRORS as error:
        error.add_note(
            f"publish of {kind} version {version} failed at its flip: readers are on the previous version, or on this "
            "complete one if the flip landed before the connection failed; retry the publish (a retry of the version "
            "readers are on only records and settles it)"
        )
        raise
    if primary is not None and follow_primary(client) != primary:
        # The version went to a primary the sentinels replaced meanwhile, which drops it when it is demoted.
        raise redis.ConnectionError(
            f"publish of {kind} version {version}: the sentinels named another primary during it, so it may be lost; "
            "retry the publish"
        )
    # Without ``previous`` the settling hands nothing over: a rollback must not copy the bad version's values live.
    handed_from = previous if hand_over else None
    handed, settle_error = _settle(client, schema, kind, version, keys, handed_from, written=written, ttl_s=ttl_s)
    return PublishResult(
        kind=kind,
        version=version,
        keys=written,
        buckets=buckets,
        bytes=n_bytes,
        seconds=time.perf_counter() - started,
        previous_version=previous.version if previous else None,
        handed_over=handed,
        settle_error=settle_error,
    )


def _mend_current(
    client: redis.Redis,
    schema: KeySchema,
    kind: str,
    version: str,
    filled: list[tuple[bytes, list[bytes]]],
    ttl: bytes | None,
    replica_wait_s: float,
) -> int:
    """Write back what a failover took from the current ``version`` (a replica promoted without some writes) or an
    eviction: its missing buckets (readers of this version miss those keys, never get other values), less what
    invalidations took out of it (``invalidate``), and its buckets' TTLs (a bucket's HSET may have reached the
    replica, its EXPIRE not). Returns how many keys were written back."""
    present = run_commands(client, [(b"EXISTS", name) for name, _ in filled])
    lost = [(name, bucket) for (name, bucket), here in zip(filled, present, strict=True) if not here]
    if lost and (taken := invalidations(client, schema, kind, version)) != Invalidations():
        lost = [(name, kept) for name, bucket in lost if (kept := _without(bucket, taken))]
    if lost:
        _log.warning("%s version %s is current but lost %d of %d buckets: writing them again",
                     kind, version, len(lost), len(filled))  # fmt: skip
        cluster = is_cluster(client)
        writes = [write for name, bucket in lost for write in _bucket_writes(name, bucket, ttl, cluster=cluster)]
        _bucket_sender(client)(writes)
        if (back := _existing(client, [name for name, _ in lost])) < len(lost):  # at maxmemory, evicted again
            raise IncompleteVersionError(
                f"{kind} version {version} is current and lost {len(lost)} of its {len(filled)} buckets: "
                f"{len(lost) - back} of them were evicted again while being written back{memory_note(client)}; "
                "readers miss their keys: give Redis more memory, or publish fewer keys"
            )
    if ttl is not None:
        send_commands(client, [(b"EXPIRE", name, ttl) for name, _ in filled])
    if lost:
        confirm_replicas(client, replica_wait_s)
    return sum(len(bucket) // 2 for _, bucket in lost)  # a bucket holds field, value, field, value ...


# KEYS: a bucket; ARGV: its TTL in seconds, then field, value, field, value ... The bucket's fields and its TTL in one
# step on Redis Cluster, whose per-master pipelines cannot carry a MULTI (every command needs a key to route them): a
# script runs whole. The EXPIRE follows the first HSET (after a script's first write Redis runs its others even at
# maxmemory). At most 2 * FIELDS_PER_COMMAND arguments an HSET: Lua's unpack fails beyond about 8,000.
_WRITE_BUCKET = f"""
for i = 2, #ARGV, {2 * FIELDS_PER_COMMAND} do
  redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + {2 * FIELDS_PER_COMMAND - 1}, #ARGV)))
  if i == 2 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
end
"""


def _bucket_writes(
    name: bytes, bucket: list[bytes], ttl: bytes | None, *, cluster: bool = False
) -> list[tuple[bytes, ...]]:
    """The commands that write one bucket (``bucket``: field, value, field, value ...) with its TTL, if any.

    With a TTL, in one step: on one server a ``MULTI``/``EXEC``, on a ``cluster`` the ``_WRITE_BUCKET`` script. A
    publisher killed mid-write can have the kernel drop the rest of its stream (a SIGKILL with replies unread resets
    the connection), and Redis then ran a bucket's ``HSET`` without its ``EXPIRE``: a bucket of a version that never
    flipped, which nothing retires, lived forever. A transaction cut short is discarded whole, a script is never cut.
    """
    if ttl is None:
        return [(b"HSET", name, *bucket)]
    if cluster:
        return [(b"EVAL", _WRITE_BUCKET, b"1", name, ttl, *bucket)]
    return [(b"MULTI",), (b"HSET", name, *bucket), (b"EXPIRE", name, ttl), (b"EXEC",)]


def _unscripted(commands: list[tuple[bytes, ...]]) -> list[tuple[bytes, ...]]:
    """``commands`` with each ``_WRITE_BUCKET`` script as the ``HSET`` and ``EXPIRE`` it runs."""
    plain: list[tuple[bytes, ...]] = []
    for command in commands:
        if command[0] == b"EVAL" and command[1] is _WRITE_BUCKET:
            _, _, _, name, ttl, *bucket = command
            plain += [(b"HSET", name, *bucket), (b"EXPIRE", name, ttl)]
        else:
            plain.append(command)
    return plain


# Cluster clients that may not run ``_WRITE_BUCKET`` (an ACL made before it, or EVAL renamed away): they write buckets
# unscripted.
_SCRIPT_REFUSED: weakref.WeakSet = weakref.WeakSet()
RENAMED_HINT = "the server has no EVAL (renamed or disabled by rename-command): allow it for atomic bucket writes"


def script_refusal_hint(error: redis.ResponseError) -> str | None:
    """What to do when a cluster refused ``_WRITE_BUCKET`` with ``error``: the publisher's ACL user predates the
    script (``REAPPLY_HINT``), or the server has no EVAL (``RENAMED_HINT``); None when it was refused for another
    reason (a key outside the user's namespace, a full memory) that writing without the script would not help."""
    text = str(error).lower()
    if "'eval'" not in text:
        return None
    if is_acl_refusal(error):
        return acl_hint(error)
    return RENAMED_HINT if "unknown command" in text else None


def _bucket_sender(client: redis.Redis) -> Callable[[list[tuple[bytes, ...]]], None]:
    """``send_commands`` for ``_bucket_writes``. A cluster publisher that may not run them (an ACL user that predates
    them, a server with ``EVAL`` renamed away) writes each bucket's ``HSET`` and ``EXPIRE`` as two commands instead, as
    before, after one warning naming the fix (``script_refusal_hint``): a publish on an upgraded package goes on, and a
    kill between the two leaves that bucket without its TTL. The refusal is remembered for ``client``: an embedding
    sync patches page after page, each with a sender of its own, and each page was sent twice (refused, then again)
    with a warning of its own."""

    def send(commands: list[tuple[bytes, ...]]) -> None:
        if client not in _SCRIPT_REFUSED:
            try:
                send_commands(client, commands)
                return
            except redis.ResponseError as error:
                hint = script_refusal_hint(error) if is_cluster(client) else None
                if hint is None:
                    raise  # refused for another reason (a key outside the user's namespace) or not a refusal
                _SCRIPT_REFUSED.add(client)  # every EVAL was refused: nothing of these commands was written
                _log.warning("bucket writes without their script (%s): a publisher killed mid-write can leave a "
                             "bucket without its TTL; %s", error, hint)  # fmt: skip
        send_commands(client, _unscripted(commands))

    return send


def _bucket_loss(before: str | None, after: str | None, failover: bool) -> tuple[str, str, bool]:
    """How a version's buckets went while they were written, by the servers' ``server_mark`` around it; the advice
    (with its leading colon); and whether memory is to blame: evicted at maxmemory (or lost in a failover), lost in a
    restart, or deleted by someone (a ``FLUSHDB`` evicts nothing: blaming memory sent operators to resize a server
    that had room)."""
    more_memory = ": give Redis more memory, or publish fewer keys"
    if failover:
        return "evicted or lost in a failover", f"{more_memory} (after a failover, retry it)", True
    if before is not None and after is not None:
        if restarted_since(before, after):
            return "lost in a restart of Redis", ": publish again", False
        if not evicted_since(before, after):
            return (
                "deleted, and nothing was evicted (a FLUSHDB, FLUSHALL or DEL by another client?)",
                ": publish again",
                False,
            )
    return "evicted", more_memory, True


class IncompleteVersionError(RuntimeError):
    """A version that lost buckets before its flip (evicted at maxmemory): it is not flipped to. ``evicted``: memory
    is to blame, and a retry evicts again unless memory was freed; else a failover or a delete lost them."""

    def __init__(self, message: str, *, evicted: bool = True) -> None:
        super().__init__(message)
        self.evicted = evicted


def _bucket_names(schema: KeySchema, kind: str, pointer: Pointer) -> list[bytes]:
    return [schema.bucket(kind, pointer.version, index).encode() for index in range(pointer.buckets)]


class _EvictionWatch:
    """Whether the version readers are on (its bucket ``names``) lost buckets while a new one of ``n_bytes`` is
    written: at maxmemory a volatile policy evicts them as readily as anything else with a TTL, and a version too big
    for the memory evicted the serving one whole before its own loss was found (h_pub). Asks ``INFO stats`` once a
    batch, and the buckets only after evictions; a server whose free memory may not hold the version gets batches of
    a tenth (``batch_commands``), so that a loss is found within a few dozen buckets. Only buckets lost since the
    watch began count: those gone before (expired, evicted earlier) are what this publish replaces, and blaming it
    for them refused every publish while the live tier evicted (h_diff7). On Redis Cluster (a count per node) it
    does not watch."""

    def __init__(self, client: redis.Redis, names: list[bytes], n_bytes: int) -> None:
        self.client, self.names = client, names
        self.batch_commands, self.seen, self.present = COMMANDS_PER_PIPELINE, None, 0
        if not names or is_cluster(client):
            return
        try:
            memory = client.info("memory")
        except redis.ResponseError:  # a user without INFO: not watched
            return
        limit, used = int(memory.get("maxmemory", 0)), int(memory.get("used_memory", 0))
        if not limit:  # no limit, no eviction
            return
        if limit - used < 2 * n_bytes:  # a bucket takes more memory than its fields and values
            self.batch_commands = COMMANDS_PER_PIPELINE // 10
        self.seen = _evicted_keys(client)
        self.present = _existing(client, names) if self.seen is not None else 0

    def serving_lost(self) -> int:
        """How many of the serving version's buckets went since the watch began, when keys were evicted since the last
        call; else 0."""
        if self.seen is None or (now := _evicted_keys(self.client)) is None or now == self.seen:
            return 0
        self.seen = now
        return max(0, self.present - _existing(self.client, self.names))


def _evicted_keys(client: redis.Redis) -> int | None:
    """A single server's count of evicted keys (``INFO stats``), None when it may not be asked."""
    try:
        return int(client.info("stats").get("evicted_keys", 0))
    except redis.ResponseError:
        return None


def _existing(client: redis.Redis, names: list[bytes]) -> int:
    """How many of ``names`` exist (EXISTS counts each; a cluster client needs one per key's slot). One EXISTS per
    ``COMMANDS_PER_PIPELINE`` names: a version's every bucket in one command (15,625 at a million keys) held Redis
    for milliseconds, and longer the bigger the version."""
    if not names:
        return 0
    if is_cluster(client):
        return sum(run_commands(client, [(b"EXISTS", name) for name in names]))
    step = COMMANDS_PER_PIPELINE
    return sum(run_commands(client, [(b"EXISTS", *names[at : at + step]) for at in range(0, len(names), step)]))


def sampled_buckets(pointer: Pointer) -> list[int]:
    """The buckets of ``pointer``'s version that say whether its values are still there: its first, written first and
    so the first to expire, and its last. Every bucket of a version with keys holds some (``bucket_count`` gives a
    bucket 64 keys on average: one of several is empty with a probability below e^-32)."""
    return sorted({0, pointer.buckets - 1})


def missing_buckets(client: redis.Redis, schema: KeySchema, kind: str, pointer: Pointer) -> int:
    """How many of ``sampled_buckets(pointer)`` are gone from Redis (expired under a pointer that has no TTL, evicted,
    lost in a failover), not counting those an invalidation emptied. An empty version (no keys) has no bucket."""
    indexes = sampled_buckets(pointer)
    names = [schema.bucket(kind, pointer.version, index).encode() for index in indexes]
    present = run_commands(client, [(b"EXISTS", name) for name in names])
    if missing := [index for index, here in zip(indexes, present, strict=True) if not here]:
        emptied = invalidations(client, schema, kind, pointer.version).emptied
        missing = [index for index in missing if index not in emptied]
    return len(missing)


def _without(bucket: list[bytes], taken: Invalidations) -> list[bytes]:
    """A bucket's ``field, value, ...`` less the fields ``taken`` covers."""
    kept: list[bytes] = []
    for field, value in zip(bucket[0::2], bucket[1::2], strict=True):
        if not taken.covers(field.decode()):
            kept += (field, value)
    return kept


def _duplicates(keys: Sequence[str]) -> str:
    """What a publish says of ``keys`` that hold some key twice: a bucket keeps one value a key, so the count
    recorded for the version (and probation's sizing by it) would be wrong, and which value wins arbitrary."""
    repeated = [key for key, count in collections.Counter(keys).items() if count > 1]
    shown = ", ".join(map(repr, repeated[:3])) + (", ..." if len(repeated) > 3 else "")
    return f"{len(repeated)} keys appear more than once ({shown}): give one value a key"


def _current_losses(client: redis.Redis, schema: KeySchema, kind: str, current: bytes | None) -> str:
    """``, but the version they are on lost B of its N buckets too`` when a volatile policy evicted the current
    version's buckets along with the new ones (they carry a TTL too); nothing when it lost none or cannot be told."""
    try:
        pointer = Pointer.decode_or_none(current)
        if pointer is None or not pointer.buckets:
            return ""
        names = _bucket_names(schema, kind, pointer)
        lost = len(names) - _existing(client, names)
    except (*REDIS_ERRORS, ValueError):
        return ""
    if not lost:
        return ""
    return (f", but the version they are on ({pointer.version}) lost {lost} of its {len(names)} buckets too (readers "
            "miss those keys until it is published again)")  # fmt: skip


def memory_note(client: redis.Redis) -> str:
    """`` (Redis at U of maxmemory M bytes, policy P)``, or nothing when Redis does not say (a cluster client)."""
    if is_cluster(client):
        return ""
    try:
        memory = client.info("memory")
    except REDIS_ERRORS:
        return ""
    return (f" (Redis at {memory.get('used_memory')} of maxmemory {memory.get('maxmemory')} bytes, policy "
            f"{memory.get('maxmemory_policy')})")  # fmt: skip


def record_published(client: redis.Redis, schema: KeySchema, kind: str, keys: int) -> None:
    """Record that ``kind``'s current version holds ``keys`` keys: admission ``probation`` sizes the live tier to
    its capacity less these (``{kind}:fifo:{{...}}:published``). Written after every flip or in-place patch."""
    run_commands(client, [(b"SET", schema.admission_fifo(kind, "published").encode(), b"%d" % keys)])


def _replaced_pointer(client: redis.Redis, schema: KeySchema, kind: str) -> Pointer | None:
    """The pointer the last flip replaced, while its grace lasts (``flip_pointer`` keeps it); None when it is gone
    or cannot be read (a retried publish then hands nothing over)."""
    try:
        (raw,) = run_commands(client, [(b"GET", schema.previous(kind).encode())])
        return None if raw is None else Pointer.decode(raw)
    except (*REDIS_ERRORS, ValueError):
        return None


def _settle(
    client: redis.Redis, schema: KeySchema, kind: str, *args: Any, written: int, ttl_s: int | None
) -> tuple[int, str | None]:
    """After a flip that succeeded, ``record_published`` (the live tier of admission ``probation`` holds its
    capacity less the ``written`` published keys; until this lands it sizes itself by the version before) and
    ``settle_published(client, schema, kind, *args)``: how many keys it handed over, and None. A Redis error there
    (a publisher whose ACL predates it has no ``EVAL``, a connection lost) leaves the tier unsettled, to shrink by
    itself as before, and is returned and logged, never raised: readers are on the new version either way, and a
    retry of the publish records and settles again."""
    try:
        record_published(client, schema, kind, written)
        return len(settle_published(client, schema, kind, *args, ttl_s=ttl_s)), None
    except (*REDIS_ERRORS, ValueError) as error:  # ValueError: a tier hash another writer left unreadable
        message = f"{type(error).__name__}: {str(error).rpartition('caused error: ')[2]}"[:300]  # not the script
        if is_acl_refusal(error):
            message += f"; {acl_hint(error)}"
        _log.warning("%s version published, but probation's live tier was not settled: %s", kind, message)
        return 0, message


def settle_published(
    client: redis.Redis,
    schema: KeySchema,
    kind: str,
    version: str,
    keys: Sequence[str],
    previous: Pointer | None,
    *,
    ttl_s: int | None,
    chunk: int = 1000,
    script_keys: int = SETTLE_SCRIPT_KEYS,
) -> list[str]:
    """After the flip to ``version`` (its ``keys``, best first), settle admission ``probation``'s live tier of
    ``kind``; nothing before a ``probation`` client has stored a miss of ``kind`` (which records its capacity).
    Returns the keys handed over.

    1. The new version's keys leave the main LRU and their live values are deleted: the version serves them, so
       a live copy would only hold a slot (``UNTRACK``; only keys the main LRU holds are sent). Not a value to live
       longer than the tier stores them (``admission.evictable``): a campaign's warming wrote it.
    2. The keys of the version before (``previous``) that the new one drops and the tier does not track enter the
       main LRU below every key there, best first, while the tier has room (``HAND_OVER``), with their value from
       that version (``SET NX``; TTL: the client's live one, ``ttl_s`` if shorter; then deleted again for those
       readers' misses evicted meanwhile; on one server not for a key invalidated since, see ``_copy_to_live``): a
       smaller version leaves a warm tier, not an empty one. Their order is
       ``:order``, kept by the settling of that version; when ``:order`` lists another version (that settling
       failed or never ran), nothing is handed over.
    3. The new version's first ``capacity`` keys become ``:order``, and ``version`` its ``order_version``.

    Settling again after a retried flip (``previous`` read back from ``KeySchema.previous``) hands over only what
    the first attempt did not, and copies the values of all it handed over (the first may have died before).
    ``ml.replay`` models each step at every day's publish."""
    names = fifo_names(schema, kind)
    _, _, main, _, _, _, tier, order = (name.encode() for name in names)  # FIFO_PARTS order
    ((capacity, live_ttl_s, order_version), tracked) = run_commands(
        client, [(b"HMGET", tier, b"capacity", b"live_ttl_s", b"order_version"), (b"ZCARD", main)]
    )
    if capacity is None:
        return []
    tier_ttl = int(live_ttl_s) if live_ttl_s is not None else None
    published = set(keys)
    if len(keys) > tracked:  # send the keys of the main LRU that the version serves, not the whole version
        keys_in_main = [key for key in _sorted_set_members(client, main, chunk) if key in published]
    else:
        keys_in_main = list(keys) if tracked else []
    for start in range(0, len(keys_in_main), script_keys):
        batch = keys_in_main[start : start + script_keys]
        # Values first: a kill (or a lost reply) between the two leaves tracked keys without a value, which ``_ADMIT``
        # keeps and the retry untracks, never untracked values outliving the tier's capacity until their TTL.
        _unlink_live(client, schema, kind, [_text(key) for key in batch], tier_ttl)
        (gone,) = run_commands(client, [(b"EVAL", UNTRACK, 1, main, *batch)])
        # A reader still on the old pointer may have stored a value between the two, which its _ADMIT left as it
        # was (tracked): deleted now, unless a later miss tracks it again (h_concur)
        _unlink_untracked(client, schema, kind, [_text(key) for key in gone], tier_ttl)
    handed: list[str] = []
    if previous is not None and order_version is not None and _text(order_version) == previous.version:
        before = _list_items(client, order, chunk)
        dropped = list(dict.fromkeys(key for key in before if key not in published))
        for start in range(0, len(dropped), script_keys):
            hand_over = (b"EVAL", HAND_OVER, 7, *names[:7], *dropped[start : start + script_keys])  # all but the order
            ((room, taken),) = run_commands(client, [hand_over])
            handed += [_text(key) for key in taken]
            if room <= 0:
                break
        # Every dropped key the main LRU tracks now gets its value, not only those taken just now: a settling killed
        # between its HAND_OVER and this copy left keys tracked without a value, which its retry takes no more.
        # (Any other tracked one a reader admitted since the flip, with a value, which SET NX keeps.)
        tracked_now = set(_sorted_set_members(client, main, chunk))
        live = [int(ttl) for ttl in (ttl_s, live_ttl_s) if ttl is not None and int(ttl) > 0]
        copied = [key for key in dropped if key in tracked_now]
        _copy_to_live(client, schema, kind, copied, previous, min(live) if live else None)
        _unlink_untracked(client, schema, kind, copied, tier_ttl)
    kept = list(keys[: int(capacity)])
    commands: list[tuple[Any, ...]] = [(b"UNLINK", order)]  # up to capacity names: freed off the main thread
    commands += [(b"RPUSH", order, *kept[start : start + chunk]) for start in range(0, len(kept), chunk)]
    commands.append((b"HSET", tier, b"order_version", version.encode()))
    run_commands(client, commands)
    return handed


def _sorted_set_members(client: redis.Redis, name: bytes, page: int) -> list[str]:
    """The members of the sorted set ``name`` in score order, ``page`` per ``ZRANGE ... BYSCORE LIMIT``: one
    ``ZRANGE 0 -1`` of probation's main LRU (up to its capacity) holds Redis for every other client while it replies.
    Each page starts past the last score read (``(score``, no offset), once every member of that score is read (in
    the same round trip; one member in practice: ``_ADMIT`` and ``_TOUCH`` score by ``:seq``, ``HAND_OVER`` below the
    coldest). Readers evict the lowest scores and a lookup moves a member to the newest: neither shifts an unread
    member past the cursor, so every member present throughout is read (one refreshed may twice)."""
    members: dict[str, None] = {}
    last: bytes | None = None  # the score the page before ended at
    while True:
        low = b"-inf" if last is None else b"(" + last
        commands = [(b"ZRANGE", name, low, b"+inf", b"BYSCORE", b"LIMIT", b"0", b"%d" % page, b"WITHSCORES")]
        if last is not None:
            # An offset into the last score's members (for one of them past that page) shifts when a member read
            # leaves or moves meanwhile, and the member after it was skipped: that score is read whole.
            commands.insert(0, (b"ZRANGE", name, last, last, b"BYSCORE", b"LIMIT", b"0", b"%d" % page))
        *tied, reply = run_commands(client, commands)
        if last is not None:
            members.update((member, None) for member in _members_of_score(client, name, last, page, tied[0]))
        # redis-py pairs the reply up itself when it sees WITHSCORES; a cluster's packed send replies it flat
        flat = reply and not isinstance(reply[0], list | tuple)
        pairs = [(_text(m), float(s)) for m, s in (zip(reply[0::2], reply[1::2], strict=True) if flat else reply)]
        members.update((member, None) for member, _ in pairs)
        if len(pairs) < page:
            return list(members)
        last = repr(pairs[-1][1]).encode()


def _members_of_score(client: redis.Redis, name: bytes, score: bytes, page: int, first: list) -> list[str]:
    """The members of ``name`` with exactly ``score``, given ``first``, the first ``page`` of them; more pages only
    for more than ``page`` members of one score (never in the main LRU)."""
    members = list(map(_text, first))
    while len(first) == page:
        offset = b"%d" % len(members)
        (first,) = run_commands(client, [(b"ZRANGE", name, score, score, b"BYSCORE", b"LIMIT", offset, b"%d" % page)])
        members += map(_text, first)
    return members


def _list_items(client: redis.Redis, name: bytes, page: int) -> list[str]:
    """The items of the list ``name``, ``page`` per ``LRANGE`` rather than one ``LRANGE 0 -1`` of up to probation's
    capacity (only the settling writes ``:order``, so it does not change while it is read)."""
    items: list[str] = []
    while True:
        (reply,) = run_commands(client, [(b"LRANGE", name, b"%d" % len(items), b"%d" % (len(items) + page - 1))])
        items += map(_text, reply)
        if len(reply) < page:
            return items


# KEYS: the kind's epoch, then the bucket and the live value of each key; ARGV: the epoch read before (b"" for none),
# the live TTL (b"" for none), the keys. Copies each key's value in the version's bucket to its live value (``SET NX``)
# only while the epoch is unchanged: ``invalidate`` and ``delete_live_values`` increment it before deleting, and a
# value read before an invalidation and written after it came back for a live TTL. The value is read here, not
# passed in: an invalidation that already removed the key from the bucket (it does before deleting the live value)
# leaves nothing to copy, even if it incremented the epoch before it was read. Replies how many were written.
_COPY_FENCED = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
local written = 0
for i = 3, #ARGV do
  local value = redis.call('HGET', KEYS[2 * i - 4], ARGV[i])
  if value then
    local set
    if ARGV[2] == '' then
      set = redis.call('SET', KEYS[2 * i - 3], value, 'NX')
    else
      set = redis.call('SET', KEYS[2 * i - 3], value, 'NX', 'EX', ARGV[2])
    end
    if set then written = written + 1 end
  end
end
return written
"""


def _copy_to_live(
    client: redis.Redis, schema: KeySchema, kind: str, keys: list[str], version: Pointer, ttl_s: int | None
) -> None:
    """Write the values ``keys`` have in ``version`` as their live values (``SET NX``: a value a reader computed
    meanwhile stays); a key whose value that version no longer holds gets none, and its next lookup computes it.
    On one server fenced by the kind's epoch, read first (``_COPY_FENCED``, ``SETTLE_SCRIPT_KEYS`` arguments a script):
    a key invalidated meanwhile gets no value back. On a cluster, where the epoch, buckets and live values are in
    different slots, unfenced."""
    if not keys:
        return
    by_bucket: dict[int, list[str]] = {}
    for key, bucket in zip(keys, bucket_ids([key.encode() for key in keys], version.buckets).tolist(), strict=True):
        by_bucket.setdefault(bucket, []).append(key)
    if not is_cluster(client):
        epoch = schema.epoch(kind).encode()
        (read,) = run_commands(client, [(b"GET", epoch)])  # before the values: the scripts read those
        names = [(schema.bucket(kind, version.version, bucket).encode(), schema.live(kind, key).encode(), key.encode())
                 for bucket, members in by_bucket.items() for key in members]  # fmt: skip
        ttl = b"" if ttl_s is None else b"%d" % ttl_s
        scripts, step = [], SETTLE_SCRIPT_KEYS - 2  # ARGV: the epoch, the TTL and the keys, as many as the others'
        for start in range(0, len(names), step):
            chunk = names[start : start + step]
            declared = [name for bucket, live, _ in chunk for name in (bucket, live)]
            fields = [field for _, _, field in chunk]
            scripts.append((b"EVAL", _COPY_FENCED, b"%d" % (1 + len(declared)), epoch, *declared, read or b"", ttl,
                            *fields))  # fmt: skip
        send_commands(client, scripts)
        return
    reads = [(b"HMGET", schema.bucket(kind, version.version, bucket).encode(), *map(str.encode, members))
             for bucket, members in by_bucket.items()]  # fmt: skip
    expiry = () if ttl_s is None else (b"EX", b"%d" % ttl_s)
    writes = [
        (b"SET", schema.live(kind, key).encode(), value, b"NX", *expiry)
        for members, values in zip(by_bucket.values(), run_commands(client, reads), strict=True)
        for key, value in zip(members, values, strict=True)
        if value is not None
    ]
    send_commands(client, writes)


def _unlink_untracked(
    client: redis.Redis, schema: KeySchema, kind: str, keys: list[str], live_ttl_s: int | None
) -> None:
    """Delete the live values of those of ``keys`` that probation's tier no longer tracks. Handed-over keys are the
    coldest of the main LRU: readers' misses may evict them before ``_copy_to_live`` wrote their values, which then
    nothing would track or delete. Checked after the copy: a key evicted later had its value deleted by the
    eviction."""
    if not keys:
        return
    _, hits, main, *_ = (name.encode() for name in fifo_names(schema, kind))
    names = [key.encode() for key in keys]
    replies = run_commands(
        client, [(b"HEXISTS", hits, name) for name in names] + [(b"ZSCORE", main, name) for name in names]
    )
    in_small, in_main = replies[: len(keys)], replies[len(keys) :]
    gone = [key for key, small, score in zip(keys, in_small, in_main, strict=True) if not small and score is None]
    _unlink_live(client, schema, kind, gone, live_ttl_s)


def _unlink_live(client: redis.Redis, schema: KeySchema, kind: str, keys: list[str], live_ttl_s: int | None) -> None:
    """Delete the live values of ``keys`` and their XFetch deltas, but not those to live longer than the tier's
    ``live_ttl_s`` (``admission.evictable``: a campaign's warming wrote them)."""
    if not keys:
        return
    if live_ttl_s is not None:
        ttls = run_commands(client, [(b"PTTL", schema.live(kind, key).encode()) for key in keys])
        keys = [key for key, ttl in zip(keys, ttls, strict=True) if evictable(ttl, live_ttl_s)]
    send_commands(client, [(b"UNLINK", name.encode()) for name in live_value_keys(schema, kind, keys)])


def _text(key: bytes | str) -> str:
    return key.decode() if isinstance(key, bytes) else key


def encode_many(codec: Codec, values: list[Any]) -> list[bytes]:
    """Encode ``values``; float32 in one numpy call instead of one struct call per value."""
    if isinstance(codec, Float32Codec):
        raw = np.asarray(values, dtype="<f4").tobytes()
        return [raw[i : i + 4] for i in range(0, len(raw), 4)]
    return [codec.encode(value) for value in values]


@contextlib.contextmanager
def command_stream(client: redis.Redis) -> Iterator[Callable[[list[tuple[bytes, ...]]], None]]:
    """Yield ``send(commands)``, which writes a pipeline without waiting for its replies; a reader thread
    drains them meanwhile, so Redis works on one batch while the next is packed. On exit every reply
    has been read; the first error reply or connection error is raised."""
    pool = None if is_cluster(client) else getattr(client, "connection_pool", None)
    if hiredis is None or pool is None:  # Redis Cluster, or no hiredis: one ordinary pipeline per batch
        yield lambda commands: send_commands(client, commands)
        return
    connection = pool.get_connection()
    expected: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    errors: list[BaseException] = []

    def drain() -> None:
        while (count := expected.get()) is not None:
            for _ in range(count):
                try:
                    # Never close the socket from this thread: the sender may be writing on it. A dead
                    # connection then fails the sender's next write with a ConnectionError of its own.
                    errors.extend(_failed_in(connection.read_response(disconnect_on_error=False)))
                except redis.ResponseError as error:
                    errors.append(error)
                except BaseException as error:  # the connection is gone: nothing more will come
                    errors.append(error)
                    return

    def send(commands: list[tuple[bytes, ...]]) -> None:
        if errors:
            raise errors[0]
        if commands:
            connection.send_packed_command([b"".join(map(hiredis.pack_command, commands))])  # one write
            expected.put(len(commands))

    reader = threading.Thread(target=drain, name="publish-replies", daemon=True)
    reader.start()
    failed = False
    try:
        yield send
    except BaseException:
        failed = True
        raise
    finally:
        expected.put(None)
        reader.join()
        if failed or errors:
            connection.disconnect()  # replies may be left unread: never hand this connection out again
        pool.release(connection)
    if errors:
        raise errors[0]


def _failed_in(reply: Any) -> list[redis.ResponseError]:
    """The errors an ``EXEC``'s reply holds (a command that failed inside the transaction); none for any other."""
    return [item for item in reply if isinstance(item, redis.ResponseError)] if isinstance(reply, list) else []


def send_commands(client: redis.Redis, commands: list[tuple[bytes, ...]]) -> None:
    """Send ``commands`` in one pipeline and raise on the first error reply.

    On a plain client the commands are packed by hiredis and written on one connection directly: at a
    million keys, redis-py's per-argument pipeline bookkeeping costs more than Redis itself.
    """
    if not commands:
        return
    if is_cluster(client):  # one packed write per master, all of them in parallel
        errors = [reply for reply in cluster_send(client, commands, retry=True) if isinstance(reply, BaseException)]
        if errors:
            raise errors[0]
        return
    pool = getattr(client, "connection_pool", None)
    if hiredis is None or pool is None:  # no hiredis: the ordinary pipeline
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        pipe.execute()
        return
    connection = pool.get_connection()
    try:
        connection.send_packed_command([b"".join(map(hiredis.pack_command, commands))])  # one write
        errors = []
        for _ in commands:
            try:
                errors.extend(_failed_in(connection.read_response()))
            except redis.ResponseError as error:
                errors.append(error)
    except BaseException:
        connection.disconnect()  # replies may be left unread: never hand this connection out again
        raise
    finally:
        pool.release(connection)
    if errors:
        raise errors[0]


def patch_version(
    client: redis.Redis,
    kind: str,
    pointer: Pointer,
    upserts: Iterable[tuple[str, Any]] = (),
    deletes: Iterable[str] = (),
    *,
    schema: KeySchema | None = None,
    ttl_s: int | None = None,
) -> int:
    """Write and delete single keys of an existing version in place; returns commands sent.

    For incremental updates of independent values (one document's embedding): each key changes
    atomically, and the version's bucket layout stays what its pointer says. ``ttl_s``: the TTL of every bucket
    written, set in the same pipeline (a version being built must expire even if its build never finishes).
    """
    schema = schema or KeySchema()
    check_kind(kind)
    check_version(pointer.version)
    encode = codec_for(kind).encode
    upserts = list(upserts)
    deletes = list(deletes)
    check_keys([key for key, _ in upserts])
    check_keys(deletes)
    fields = [key.encode() for key, _ in upserts]
    writes: dict[int, list[bytes]] = {}
    for index, field, (_, value) in zip(bucket_ids(fields, pointer.buckets).tolist(), fields, upserts, strict=True):
        writes.setdefault(index, []).extend((field, encode(value)))
    fields = [key.encode() for key in deletes]
    removals: dict[int, list[bytes]] = {}
    for index, field in zip(bucket_ids(fields, pointer.buckets).tolist(), fields, strict=True):
        removals.setdefault(index, []).append(field)

    def name(index: int) -> bytes:
        return schema.bucket(kind, pointer.version, index).encode()

    # One command per bucket: a chunk of 20,000 documents is ~300 HSETs, not 20,000. Each EXPIRE follows its HSET in
    # one transaction or script (_bucket_writes), a transaction's 4 commands in the same pipeline
    # (COMMANDS_PER_PIPELINE is a multiple of 4): a patch cut off anywhere leaves no bucket without its TTL. At most
    # FIELDS_PER_COMMAND fields per command: a version built for a small corpus has few buckets, and a big load patched
    # into it put 100,000 fields in one HSET (41-177 ms of server time).
    ttl = None if ttl_s is None else b"%d" % ttl_s
    cluster = is_cluster(client)
    commands: list[tuple[bytes, ...]] = []
    for index, fields in writes.items():
        for start in range(0, len(fields), 2 * FIELDS_PER_COMMAND):  # field, value, field, value ...
            chunk = fields[start : start + 2 * FIELDS_PER_COMMAND]
            commands += _bucket_writes(name(index), chunk, ttl, cluster=cluster)
    for index, fields in removals.items():
        for start in range(0, len(fields), FIELDS_PER_COMMAND):
            commands.append((b"HDEL", name(index), *fields[start : start + FIELDS_PER_COMMAND]))
    send = _bucket_sender(client)
    for start in range(0, len(commands), COMMANDS_PER_PIPELINE):
        send(commands[start : start + COMMANDS_PER_PIPELINE])
    return len(commands)


def flip_pointer(
    client: redis.Redis,
    schema: KeySchema,
    kind: str,
    pointer: Pointer,
    *,
    grace_s: int,
    experiment: Experiment | None = None,
    replica_wait_s: float = REPLICA_WAIT_S,
) -> Pointer | None:
    """Atomically make ``pointer`` current, with ``experiment`` (or none: its key is deleted) and the pointer it
    replaces (``KeySchema.previous``) in the same MULTI/EXEC; then shorten the life of the version it replaces, and of
    that record, to ``grace_s``. A process killed between the two leaves the record without a TTL: the next flip (or a
    retried publish of the same version) finds it and gives the grace then (``retire_replaced``), instead of the
    replaced version living out its whole TTL beside the new one.

    Replicas come first (``replication.wait_for_replicas``, up to ``replica_wait_s``; 0: no wait): the flip waits
    until every online replica holds what its primary holds, the new version's buckets included, or raises
    ``ReplicationTimeoutError`` without flipping. After the pointer write it waits again before it shortens the old
    version's life; if its replicas do not confirm the flip, the old version keeps its TTL (a warning says so), so a
    failover that loses the flip still serves a whole version. A server that refuses ``INFO`` (an ACL user without
    it, a proxy) waits for nothing (a warning says so too).

    On Redis Cluster the three keys live in different slots, which one transaction cannot span: there the experiment is
    written first, the record of the replaced pointer second and the pointer last, each waiting for its reply, and
    readers on a cluster read the pointer first and the experiment second (``PredictionCache``). A reader that sees the
    new pointer therefore read the experiment after it was written: it never pairs the new version with the old
    experiment. It may read the old version with the new experiment, as a single-server reader may too (its GET of the
    pointer can run just before the EXEC, its GET of the experiment just after): the experiment names the version it is
    served with, and such a reader takes none until its next pointer refresh. If the pointer write fails, the pointer is
    read back: a write that landed (only its reply was lost) is a flip; one that did not puts the old experiment back
    (best effort) and raises; when Redis cannot say, it raises and leaves the new experiment, which a retried publish
    writes again.

    A flip sent twice (its reply lost, the client's retries) reads its own pointer back from the second ``SET ...
    GET``: the version read before the flip is then the one it replaced, retired and settled as usual.
    """
    check_kind(kind)
    check_version(pointer.version)
    try:
        held = confirm_replicas(client, replica_wait_s)
    except ReplicationTimeoutError as error:
        error.add_note(f"the pointer of {kind} was not flipped to {pointer.version}: readers stay where they were")
        raise
    # A flip whose process died before it gave the version it replaced its grace: that version is no one's to read,
    # unless this flip goes back to it (a rollback).
    retire_replaced(client, schema, kind, grace_s=grace_s, replica_wait_s=replica_wait_s, keep=pointer.version)
    pointer_key, replaced_key, new = schema.pointer(kind).encode(), schema.previous(kind).encode(), pointer.encode()
    if is_cluster(client):
        experiment_key = schema.experiment(kind).encode()
        previous_experiment, before = run_commands(client, [(b"GET", experiment_key), (b"GET", pointer_key)])
        run_commands(client, [experiment_command(experiment_key, experiment, pointer.version)])
        try:
            if before not in (None, new):  # before the pointer (another slot): a kill between them names the current
                run_commands(client, [(b"SET", replaced_key, before)])  # version, which nothing retires
            (raw,) = run_commands(client, [(b"SET", pointer_key, new, b"GET")])
        except REDIS_ERRORS as error:
            landed = _pointer_landed(client, pointer_key, new)
            if landed is False:  # put the old experiment back with the old pointer (best effort)
                with contextlib.suppress(*REDIS_ERRORS):
                    restore = (b"DEL", experiment_key) if previous_experiment is None else None
                    run_commands(client, [restore or (b"SET", experiment_key, previous_experiment)])
                error.add_note(
                    f"the pointer of {kind} was not flipped to {pointer.version}: readers stay where they were"
                )
                raise
            if landed is None:  # the new experiment stays: had the write landed, the old one would pair with it
                error.add_note(
                    f"whether the pointer of {kind} now names {pointer.version} is unknown: retry the publish"
                )
                raise
            raw = before  # the write landed and only its reply was lost: the flip is done
    else:
        (before,) = run_commands(client, [(b"GET", pointer_key)])
        pipe = client.pipeline(transaction=True)
        pipe.execute_command(*experiment_command(schema.experiment(kind).encode(), experiment, pointer.version))
        pipe.set(pointer_key, new, get=True)
        if before not in (None, new):
            pipe.set(replaced_key, before)  # in the flip's transaction: a kill after it still knows what to retire
        raw = pipe.execute()[1]
    if raw == new and before not in (None, new):
        # The flip was sent again after its reply was lost (the client's retries; ``cluster_send`` after a failover):
        # the first one replaced ``before``, which still needs its grace and its settling.
        raw = before
    if raw not in (before, new, None):  # another flip came between our read and ours (pools keep them apart)
        run_commands(client, [(b"SET", replaced_key, raw)])
    previous = None if raw is None else Pointer.decode(raw)
    if previous is not None and previous.version != pointer.version:
        _retire(client, schema, kind, pointer.version, previous, grace_s, replica_wait_s, since=held)
    elif held:  # nothing to retire: the flip is confirmed all the same
        _confirm_flip(client, kind, pointer.version, replica_wait_s, held, "")
    return previous


def _confirm_flip(
    client: redis.Redis, kind: str, version: str, replica_wait_s: float, since: Replicas | None, kept: str
) -> bool:
    """Wait until the replicas hold the flip of ``kind`` to ``version``; whether they confirmed it. Replicas that lag
    are warned about (``kept``: what that costs). A replica that held the version before the flip and went offline, a
    primary demoted, or (with ``since``) one that stopped answering is what a failover that may drop the flip looks
    like: ``ReplicaLostError``, so that the publish fails and its retry finds out."""
    try:
        confirm_replicas(client, replica_wait_s, since=since)
        return True
    except ReplicaLostError as error:
        error.add_note(f"a failover may have lost the flip of {kind} to {version}")
        raise
    except REDIS_ERRORS as error:
        if since and not isinstance(error, ReplicationTimeoutError | redis.ResponseError):
            lost = ReplicaLostError(f"a primary stopped answering after the flip of {kind} to {version} ({error})")
            lost.add_note("a failover may have lost the flip: retry the publish")
            raise lost from error
        _log.warning("%s version %s is current, but its replicas did not confirm the flip (%s)%s", kind, version,
                     error, kept)  # fmt: skip
        return False


def _pointer_landed(client: redis.Redis, pointer_key: bytes, new: bytes) -> bool | None:
    """Whether the pointer at ``pointer_key`` is ``new`` (a write whose reply was lost may have landed); None when
    Redis cannot say."""
    try:
        return run_commands(client, [(b"GET", pointer_key)])[0] == new
    except REDIS_ERRORS:
        return None


def retire_replaced(
    client: redis.Redis, schema: KeySchema, kind: str, *, grace_s: int, replica_wait_s: float, keep: str | None = None
) -> None:
    """Give the version the last flip of ``kind`` replaced its ``grace_s`` now if that flip's process died before it
    did (``KeySchema.previous`` without a TTL: written in the flip, given the grace after it); else nothing. Never
    version ``keep``: the one a flip is about to go back to, whose buckets its publish has just written whole."""
    try:
        raw, ttl_ms, current = run_commands(
            client,
            [(b"GET", schema.previous(kind).encode()), (b"PTTL", schema.previous(kind).encode()),
             (b"GET", schema.pointer(kind).encode())],
        )  # fmt: skip
        replaced = None if raw is None or ttl_ms != -1 else Pointer.decode(raw)
    except (*REDIS_ERRORS, ValueError) as error:
        _log.warning("%s: cannot read the version the last flip replaced (%s): it keeps its TTL", kind, error)
        return
    if replaced is not None and current not in (None, raw) and replaced.version != keep:
        _retire(client, schema, kind, Pointer.decode(current).version, replaced, grace_s, replica_wait_s)


def _retire(
    client: redis.Redis, schema: KeySchema, kind: str, version: str, previous: Pointer, grace_s: int,
    replica_wait_s: float, *, since: Replicas | None = None,
) -> None:  # fmt: skip
    """After the flip from ``previous`` to ``version``: once replicas confirm it (``since``: the replicas that confirmed
    the wait before the flip, all of which must), shorten ``previous``'s life to ``grace_s`` and remember it for as
    long (``KeySchema.previous``). ``EXPIRE ... LT`` never lengthens a life: a retry that retires again does not
    restart the grace. Replicas that do not confirm leave ``previous`` its TTL; signs of a failover that may drop the
    flip also raise ``ReplicaLostError`` (``_confirm_flip``)."""
    grace = b"%d" % max(1, grace_s)
    remember = (b"EXPIRE", schema.previous(kind).encode(), grace, b"LT")
    kept = f": version {previous.version} keeps its TTL, so that a failover that loses the flip still serves it whole"
    if not _confirm_flip(client, kind, version, replica_wait_s, since, kept):
        run_commands(client, [remember])
        return
    name = schema.bucket
    expire = [(b"EXPIRE", name(kind, previous.version, i).encode(), grace, b"LT") for i in range(previous.buckets)]
    for start in range(0, len(expire), COMMANDS_PER_PIPELINE):
        run_commands(client, expire[start : start + COMMANDS_PER_PIPELINE])
    # What invalidations took out of it: a version without a TTL kept its record without one too, which outlived it
    # (h_diff); now the record's usual minimum, never lengthened
    record = schema.invalidated(kind, previous.version).encode()
    run_commands(client, [remember, (b"EXPIRE", record, b"%d" % max(grace_s, INVALIDATED_MIN_TTL_S), b"LT")])


def experiment_command(name: bytes, experiment: Experiment | None, version: str) -> tuple[bytes, ...]:
    """The command that makes ``experiment`` (None: none), served with ``version``, the one stored at ``name``."""
    return (b"DEL", name) if experiment is None else (b"SET", name, experiment.encode(version))


def run_commands(client: redis.Redis, commands: list[tuple[bytes, ...]]) -> list[Any]:
    """Run single-key ``commands`` and return their replies; raise the first error reply. On Redis Cluster one
    round trip per master (``connection.cluster_send``), sent once more to the new master after a failover."""
    if not is_cluster(client):
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute()
    replies = cluster_send(client, commands, retry=True)
    errors = [reply for reply in replies if isinstance(reply, BaseException)]
    if errors:
        raise errors[0]
    return replies


TRANSACTION_ATTEMPTS = 4  # sends of a slot's transaction, at most, while its slot migrates (``transact_per_slot``)


def transact_per_slot(client: redis.Redis, commands: list[tuple[bytes, ...]]) -> list[Any]:
    """Run ``commands`` (each ``(NAME, key, args...)`` on one key) as MULTI/EXEC transactions and return their
    replies in order; raise the first error reply (``ExecAbortError`` when a transaction was refused whole).

    On a single server: one transaction. On Redis Cluster, which cannot run a transaction over several slots:
    one transaction per slot, all of a master's slots packed in one write, so one round trip per master. Each
    slot's keys change together; keys of different slots do not (a reader may see one slot's writes and not yet
    another's, and a master failing mid-way leaves the slots it had written). A slot's transaction refused with ASK
    (the slot is migrating) is sent once more, after ``ASKING``, to the node the reply names; one refused with MOVED
    (the slot has moved), once more where the refreshed slot map puts it: a refused transaction ran none of its
    commands. One refused with TRYAGAIN (its keys are split between the two nodes of a migrating slot, or not all
    there yet) is sent again as one transaction per key: during a migration a slot's keys change together per key.
    """
    if not commands:
        return []
    if not is_cluster(client):
        pipe = client.pipeline(transaction=True)
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute()
    by_slot: dict[int, list[int]] = {}
    for index, command in enumerate(commands):
        by_slot.setdefault(key_slot(command[1]), []).append(index)
    replies: list[Any] = [None] * len(commands)
    errors: list[BaseException] = []
    groups, asks = list(by_slot.values()), {}
    # A slot's transaction, redirected (ASK) and refused there (TRYAGAIN); then its keys' apart, redirected again.
    for attempt in range(TRANSACTION_ATTEMPTS):
        last = attempt == TRANSACTION_ATTEMPTS - 1
        groups, asks = _transact_groups(client, commands, groups, asks, replies, errors, redirect=not last)
        if not groups:
            break
    if errors:
        raise errors[0]
    return replies


def _transact_groups(
    client: Any,
    commands: list[tuple[bytes, ...]],
    groups: list[list[int]],
    asks: dict[int, tuple[str, int]],
    replies: list[Any],
    errors: list[BaseException],
    *,
    redirect: bool,
) -> tuple[list[list[int]], dict[int, tuple[str, int]]]:
    """(``transact_per_slot``.) Send each group (the indexes of one slot's commands) as a transaction to the master
    of its slot, or after ``ASKING`` to the node ``asks`` names for its position; fill ``replies``, append errors to
    ``errors``. With ``redirect``, returns the groups refused with ASK or MOVED, and the ASK targets by position in
    that list, and those refused with TRYAGAIN split by key, rather than counting them as errors."""
    by_node: dict[tuple[str, bool], tuple[Any, bool, list[int]]] = {}
    for number, indexes in enumerate(groups):
        target = asks.get(number)
        if target is None:
            node = client.nodes_manager.get_node_from_slot(key_slot(commands[indexes[0]][1]))
        elif (node := client.get_node(host=target[0], port=target[1])) is None:
            errors.append(redis.exceptions.AskError(f"{key_slot(commands[indexes[0]][1])} {target[0]}:{target[1]}"))
            continue
        by_node.setdefault((node.name, target is not None), (node, target is not None, []))[2].append(number)
    again: list[list[int]] = []
    asked: dict[int, tuple[str, int]] = {}
    refresh = False
    for node, asking, numbers in by_node.values():
        packed: list[tuple[bytes, ...]] = []
        for number in numbers:  # ASKING holds for the transaction that follows it
            packed += [*([(b"ASKING",)] if asking else []), (b"MULTI",), *(commands[i] for i in groups[number])]
            packed.append((b"EXEC",))
        try:
            results = send_pipelined(client.get_redis_connection(node), packed)
        except REDIS_ERRORS as error:  # a dead master: the slots of the others are still written
            refresh = True  # the slot map may have moved (failover)
            errors.append(error)
            continue
        position = 0
        for number in numbers:
            indexes = groups[number]
            size = len(indexes) + 2 + asking  # (ASKING's OK,) MULTI's OK, a QUEUED per command, EXEC's
            block = results[position + asking : position + size]
            position += size
            executed = block[-1]
            if isinstance(executed, list):
                for i, reply in zip(indexes, executed, strict=True):
                    replies[i] = reply
                    if isinstance(reply, BaseException):
                        errors.append(reply)
                continue
            # refused whole (EXECABORT): name the command's own error, or follow its redirection
            refused = [reply for reply in block if isinstance(reply, BaseException)]
            causes = [e for e in refused if not isinstance(e, redis.exceptions.ExecAbortError)] or refused
            moved = next((e for e in causes if isinstance(e, redis.exceptions.AskError)), None)  # MOVED or ASK
            keys = {commands[i][1] for i in indexes}
            if redirect and len(keys) > 1 and any(isinstance(e, redis.exceptions.TryAgainError) for e in causes):
                again += [[i for i in indexes if commands[i][1] == key] for key in keys]
                continue
            if moved is not None and redirect:
                if not isinstance(moved, redis.exceptions.MovedError):
                    asked[len(again)] = (moved.host, int(moved.port))
                refresh = refresh or isinstance(moved, redis.exceptions.MovedError)
                again.append(indexes)
                continue
            refresh = refresh or moved is not None
            errors.append(causes[0] if causes else redis.ResponseError(repr(executed)))
    if refresh:
        with contextlib.suppress(*REDIS_ERRORS):
            client.nodes_manager.initialize()
    return again, asked


# Computations a fenced writer (a task run, a campaign warming) makes while its kind's epoch keeps moving, before it
# fails for its retry policy: each reads its inputs again
FENCED_ATTEMPTS = 3


class InvalidatedMeanwhile(RuntimeError):
    """The kind was invalidated after the values to write were computed (its epoch moved): nothing was written."""


def read_epoch(client: redis.Redis, schema: KeySchema, kind: str) -> bytes:
    """The kind's invalidation epoch (b"" when it has none), to read before computing what ``write_live_values``
    writes with ``epoch=``."""
    return client.get(schema.epoch(kind)) or b""


def write_live_values(
    client: redis.Redis,
    kind: str,
    items: Iterable[tuple[str, Any]],
    *,
    expire_at: int | None,
    schema: KeySchema | None = None,
    also: Sequence[tuple[bytes, ...]] = (),
    exact: Mapping[str, int] | None = None,
    epoch: bytes | None = None,
) -> int:
    """Write ``items`` as live values of ``kind`` (``{kind}:live:{key}``), each expiring at the Unix time
    ``expire_at`` or later if it already lived longer (None: no expiry), in one MULTI/EXEC transaction with the
    single-key commands ``also`` (a ``DEL`` of what the values make stale); returns how many were written. A key in
    ``exact`` (key -> Unix time) expires at its time whatever its expiry was: earlier too (a campaign whose end moved
    earlier).

    Readers see all of them or none; a later publish of a version leaves them in place (readers fall back to
    live values for keys the published version lacks). On Redis Cluster a transaction cannot span the slots
    of many keys: there each slot's keys are one transaction (``transact_per_slot``): a key's value and its
    expiry always change together, but readers may see some keys of a campaign before others for the length of
    the write (one round trip per master), and a master that fails mid-way leaves the other masters' keys
    written (the run fails and its retry writes all of them again).

    ``epoch`` (``read_epoch`` before the values were computed) fences the write as ``get_or_compute``'s store is
    fenced: when an invalidation of ``kind`` moved it since, nothing is written and ``InvalidatedMeanwhile`` is
    raised (values computed from what was invalidated would come back for their whole TTL). On one server the
    transaction ``WATCH``es the epoch; on a cluster, where it lives in another slot, it is compared just before.
    """
    schema = schema or KeySchema()
    check_kind(kind)
    pairs = list(items)
    if not pairs and not also:
        return 0
    check_keys([key for key, _ in pairs])
    values = encode_many(codec_for(kind), [value for _, value in pairs])
    commands: list[tuple[bytes, ...]] = []
    when = None if expire_at is None else b"%d" % int(expire_at)
    for (key, _), value in zip(pairs, values, strict=True):
        name = schema.live(kind, key).encode()
        if when is None:
            commands.append((b"SET", name, value))
            continue
        if exact and key in exact:
            commands.append((b"SET", name, value, b"EXAT", b"%d" % int(exact[key])))
            continue
        # A key shared by several campaigns lives until the latest of their ends: set the expiry where there is
        # none (a new key), extend it where it is earlier, never shorten it (Redis 7+: EXPIREAT NX / GT).
        commands += [
            (b"SET", name, value, b"KEEPTTL"),
            (b"EXPIREAT", name, when, b"NX"),
            (b"EXPIREAT", name, when, b"GT"),
        ]
    if epoch is not None and not is_cluster(client):
        try:
            _fenced_transaction(client, schema.epoch(kind), epoch, [*commands, *also])
            return len(pairs)
        except redis.exceptions.NoPermissionError as error:  # a publisher user made before the fence: unfenced
            _log.warning("%s values written without their invalidation fence (%s); %s", kind, error, acl_hint(error))
    if epoch is not None and read_epoch(client, schema, kind) != epoch:
        raise InvalidatedMeanwhile(f"{kind} was invalidated while its values were computed: none written")
    transact_per_slot(client, [*commands, *also])
    return len(pairs)


def _fenced_transaction(client: redis.Redis, epoch_key: str, epoch: bytes, commands: list[tuple[bytes, ...]]) -> None:
    """``commands`` in one MULTI/EXEC that runs only while ``epoch_key`` holds ``epoch`` (``WATCH``);
    ``InvalidatedMeanwhile`` when it did not."""
    with client.pipeline(transaction=True) as pipe:
        pipe.watch(epoch_key)
        if (pipe.get(epoch_key) or b"") != epoch:
            raise InvalidatedMeanwhile(f"{epoch_key} moved while the values were computed: none written")
        pipe.multi()
        for command in commands:
            pipe.execute_command(*command)
        try:
            pipe.execute()
        except redis.WatchError:
            raise InvalidatedMeanwhile(f"{epoch_key} moved while the values were written: none written") from None


def delete_live_values(client: redis.Redis, keys: Iterable[tuple[str, str]], *, schema: KeySchema | None = None) -> int:
    """Delete the live values of ``(kind, key)`` pairs in one MULTI/EXEC transaction (one per slot on Redis
    Cluster, see ``transact_per_slot``), after incrementing their kinds' epochs (``KeySchema.epoch``: a read-through
    computation already running stores nothing); returns how many existed."""
    schema = schema or KeySchema()
    pairs = [(check_kind(kind), check_key(key)) for kind, key in keys]
    names = [schema.live(kind, key).encode() for kind, key in pairs]
    kinds = list(dict.fromkeys(kind for kind, _ in pairs))
    unfenced = [kind for kind in kinds if not bump_epoch(client, kind, schema)]  # before the deletes
    # one key per DEL: a cluster refuses multi-key commands over several slots
    deleted = int(sum(transact_per_slot(client, [(b"DEL", name) for name in names])))
    for kind in unfenced:  # refused at maxmemory: the deletes freed memory
        bump_epoch(client, kind, schema)
    return deleted
