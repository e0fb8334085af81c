"""Publishing a version of precomputed values: write every bucket, then flip one pointer.

Readers see the previous version until the single ``SET`` of the pointer, and the new one after it; a
publish that fails half-way leaves the pointer untouched, and its partial buckets expire by their TTL.
"""

from __future__ import annotations

import contextlib
import math
import operator
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

try:
    import hiredis
except ImportError:  # redis[hiredis] is a dependency; stay importable without it
    hiredis = None

from .keys import (
    Codec,
    Experiment,
    Float32Codec,
    KeySchema,
    Pointer,
    bucket_ids,
    check_kind,
    check_version,
    codec_for,
)

KEYS_PER_BUCKET = 64  # small hashes stay in Redis' compact listpack encoding
COMMANDS_PER_PIPELINE = 1000


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

    @property
    def keys_per_s(self) -> float:
        return self.keys / self.seconds if self.seconds > 0 else float("inf")


def bucket_count(n_keys: int, keys_per_bucket: int = KEYS_PER_BUCKET) -> int:
    """How many hash buckets a version of ``n_keys`` keys gets."""
    return max(1, math.ceil(n_keys / keys_per_bucket))


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
) -> PublishResult:
    """Write ``items`` (``n_keys`` of them) as ``version`` of ``kind`` and make it the current version.

    Buckets are written with their TTL in the same pipeline (``ttl_s=None``: no TTL while current, for
    versions patched in place); the previous version is given ``grace_s`` to live so that readers holding
    its pointer finish their reads, then expires as a whole. ``experiment`` is the A/B experiment the version
    serves, published with the flip (None ends any experiment of ``kind``).
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

    current = client.get(schema.pointer(kind))
    if current is not None and Pointer.decode(current).version == version:
        # Never rewrite the version readers are on (a step retried after its flip succeeded).
        return PublishResult(kind, version, written, buckets, n_bytes, time.perf_counter() - started, None, True)
    names = [schema.bucket(kind, version, index).encode() for index in range(buckets)]
    if client.exists(*names):
        # A retry of this version: start clean so no field of the failed attempt survives.
        send_commands(client, [(b"DEL", name) for name in names])
    batch: list[tuple[bytes, ...]] = []
    pending = 0
    ttl = None if ttl_s is None else str(ttl_s).encode()
    with command_stream(client) as send:
        for name, bucket in zip(names, grouped, strict=True):
            if not bucket:
                continue
            batch.append((b"HSET", name, *bucket))
            if ttl is not None:
                batch.append((b"EXPIRE", name, ttl))
            pending += len(bucket) // 2
            if len(batch) >= COMMANDS_PER_PIPELINE:
                send(batch)
                if progress:
                    progress(pending)
                batch, pending = [], 0
        send(batch)
    if progress and pending:
        progress(pending)

    previous = flip_pointer(client, schema, kind, Pointer(version, buckets), grace_s=grace_s, experiment=experiment)
    return PublishResult(
        kind=kind,
        version=version,
        keys=written,
        buckets=buckets,
        bytes=n_bytes,
        seconds=time.perf_counter() - started,
        previous_version=previous.version if previous else None,
    )


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
    pool = getattr(client, "connection_pool", None)
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
                    connection.read_response(disconnect_on_error=False)
                except redis.ResponseError as error:
                    errors.append(error)
                except BaseException as error:  # the connection is gone: nothing more will come
                    errors.append(error)
                    return

    def send(commands: list[tuple[bytes, ...]]) -> None:
        if errors:
            raise errors[0]
        if commands:
            connection.send_packed_command([hiredis.pack_command(command) for command in commands])
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


def send_commands(client: redis.Redis, commands: list[tuple[bytes, ...]]) -> None:
    """Send ``commands`` in one pipeline and raise on the first error reply.

    On a plain client the commands are packed by hiredis and written on one connection directly: at a
    million keys, redis-py's per-argument pipeline bookkeeping costs more than Redis itself.
    """
    if not commands:
        return
    pool = getattr(client, "connection_pool", None)
    if hiredis is None or pool is None:  # Redis Cluster, or no hiredis: the ordinary pipeline
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        pipe.execute()
        return
    connection = pool.get_connection()
    try:
        connection.send_packed_command([hiredis.pack_command(command) for command in commands])
        errors = []
        for _ in commands:
            try:
                connection.read_response()
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
) -> int:
    """Write and delete single keys of an existing version in place; returns commands sent.

    For incremental updates of independent values (one document's embedding): each key changes
    atomically, and the version's bucket layout stays what its pointer says.
    """
    schema = schema or KeySchema()
    encode = codec_for(kind).encode
    upserts = list(upserts)
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

    # One command per bucket: a chunk of 20,000 documents is ~300 HSETs, not 20,000.
    commands = [(b"HSET", name(index), *fields) for index, fields in writes.items()]
    commands += [(b"HDEL", name(index), *fields) for index, fields in removals.items()]
    for start in range(0, len(commands), COMMANDS_PER_PIPELINE):
        send_commands(client, commands[start : start + COMMANDS_PER_PIPELINE])
    return len(commands)


def flip_pointer(
    client: redis.Redis,
    schema: KeySchema,
    kind: str,
    pointer: Pointer,
    *,
    grace_s: int,
    experiment: Experiment | None = None,
) -> Pointer | None:
    """Atomically make ``pointer`` current, with ``experiment`` (or none: its key is deleted) in the same
    MULTI/EXEC; shorten the life of the version it replaces to ``grace_s``.

    On Redis Cluster the two keys live in different slots, which one transaction cannot span: there they go
    out as one pipeline, each key atomic on its own (a reader may pair the old version with the new
    experiment, or the reverse, until its next pointer refresh).
    """
    pipe = client.pipeline(transaction=getattr(client, "connection_pool", None) is not None)
    if experiment is None:
        pipe.delete(schema.experiment(kind))
    else:
        pipe.set(schema.experiment(kind), experiment.encode())
    pipe.set(schema.pointer(kind), pointer.encode(), get=True)
    raw = pipe.execute()[-1]
    previous = None if raw is None else Pointer.decode(raw)
    if previous is not None and previous.version != pointer.version:
        pipe = client.pipeline(transaction=False)
        for index in range(previous.buckets):
            pipe.expire(schema.bucket(kind, previous.version, index), grace_s)
            if len(pipe) >= COMMANDS_PER_PIPELINE:
                pipe.execute()
        pipe.execute()
    return previous


def write_live_values(
    client: redis.Redis,
    kind: str,
    items: Iterable[tuple[str, Any]],
    *,
    expire_at: int | None,
    schema: KeySchema | None = None,
) -> int:
    """Write ``items`` as live values of ``kind`` (``{kind}:live:{key}``), each expiring at the Unix time
    ``expire_at`` or later if it already lived longer (None: no expiry), in one MULTI/EXEC transaction;
    returns how many were written.

    Readers see all of them or none; a later publish of a version leaves them in place (readers fall back to
    live values for keys the published version lacks). On Redis Cluster a transaction cannot span the slots
    of many keys: there they go out as one pipeline, each key atomic on its own.
    """
    schema = schema or KeySchema()
    check_kind(kind)
    pairs = list(items)
    if not pairs:
        return 0
    values = encode_many(codec_for(kind), [value for _, value in pairs])
    pipe = client.pipeline(transaction=getattr(client, "connection_pool", None) is not None)
    for (key, _), value in zip(pairs, values, strict=True):
        name = schema.live(kind, key)
        if expire_at is None:
            pipe.set(name, value)
            continue
        # A key shared by several campaigns lives until the latest of their ends: set the expiry where there is
        # none (a new key), extend it where it is earlier, never shorten it (Redis 7+: EXPIREAT NX / GT).
        pipe.set(name, value, keepttl=True)
        pipe.expireat(name, int(expire_at), nx=True)
        pipe.expireat(name, int(expire_at), gt=True)
    pipe.execute()
    return len(pairs)


def delete_live_values(client: redis.Redis, keys: Iterable[tuple[str, str]], *, schema: KeySchema | None = None) -> int:
    """Delete the live values of ``(kind, key)`` pairs in one MULTI/EXEC transaction (one pipeline on Redis
    Cluster); returns how many existed."""
    schema = schema or KeySchema()
    names = [schema.live(check_kind(kind), key) for kind, key in keys]
    if not names:
        return 0
    pipe = client.pipeline(transaction=getattr(client, "connection_pool", None) is not None)
    for name in names:  # one key per DEL: a cluster pipeline refuses multi-key ones
        pipe.delete(name)
    return int(sum(pipe.execute()))
