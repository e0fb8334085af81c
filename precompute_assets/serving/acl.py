"""Least-privilege Redis ACL users for one namespace: a *publisher* and a *reader* (Redis 7+ / Valkey ACL syntax).

Every key of schema version 1 starts with ``{namespace}:1:`` (``keys.KeySchema``). The two users:

- **publisher** (Dagster: ``publish_version`` with its settling of admission ``probation``'s live tier,
  ``flip_pointer``, ``patch_version``, ``write_live_values``, ``delete_live_values``, the embedding sync, the
  ``query_logs`` drain, the query-log cleanup and the sensors that read the newest queries): reads and writes keys
  under ``{ns}:1:*`` and nothing else, with ``PUBLISHER_COMMANDS`` only (its ``EVAL`` runs the settling scripts and,
  on Redis Cluster, the one that writes a bucket with its TTL, checked against the same key rules).
- **reader** (``PredictionCache``, its ``QueryLogger`` and the admission policies): reads ``{ns}:1:*`` with
  ``READER_COMMANDS`` only, and writes exactly what the serving client writes, each command granted on its keys
  alone by a Redis 7 selector ``(keys +commands)`` (``READER_WRITES``): the live read-through values
  (``SET ... EX`` on ``{ns}:1:{kind}:live:*``, and ``UNLINK`` of the values ``probation`` evicts; the ``EVAL`` that
  stores a value and its delta only while ``{ns}:1:{kind}:epoch`` is unchanged, which it may read, not write), the
  ``probation`` queues (its two ``EVAL`` scripts and their list, hash and sorted-set commands on
  ``{ns}:1:{kind}:fifo:*``), the ``second_miss`` markers (``SET ... PX NX GET`` on
  ``{ns}:1:{kind}:seen:*``), the ``frequency`` sketch (``BITFIELD ... INCRBY`` and the aging ``EVAL``, whose
  ``GETRANGE``/``SETRANGE`` halve a step of it, on ``{ns}:1:{kind}:sketch``), the query-log stream
  (``XADD ... MAXLEN``, write-only, on ``{ns}:1:qlog``) and the hit/miss counters (``HINCRBY`` on
  ``{ns}:1:stats:*``). It can neither write a version bucket, the pointer or the experiment, nor read the
  query-log stream back.

Neither user gets a command of ``@admin``/``@dangerous`` (``FLUSHALL``, ``FLUSHDB``, ``CONFIG``, ``KEYS``, ``DEBUG``,
``SHUTDOWN``, ``ACL``, ``MODULE``...), except the publisher's read-only ``INFO`` (``flip_pointer`` reads replication
offsets with it; it shows server statistics, such as other namespaces' key counts, and changes nothing), nor
``SCAN`` (its replies are not filtered by key patterns: it would list other namespaces' key names), nor any Pub/Sub
channel, nor ``SELECT`` (use database 0). Commands inside Lua scripts are checked against the same rules, so the
reader's ``EVAL`` can only run its own commands on its own keys.

Passwords go to the server as SHA-256 hashes (``#<hex>``), never in clear text, in ``ACL SETUSER`` and in ACL
files alike. ``ACL SETUSER`` rules last until the server restarts: persist them in the server's ACL file
(``acl_file_lines``) or with ``ACL SAVE`` when it has one. Connections authenticate with the user in the URL:
``redis://pc-reader:PASSWORD@host:6379/0`` (``connection.connect``, ``PredictionCache.from_url``).

Residual risks, inherent to Redis ACLs (they restrict commands and keys, not arguments): a stolen reader password
can still trim the query-log stream (``XADD ... MAXLEN 0``), overwrite live values and admission state, and run a
busy Lua script until ``busy-reply-threshold``; it cannot touch a published version. Key patterns are globs over
the key schema: a model version named ``live`` or ``seen`` would put its buckets under the reader's writable
patterns (and collide with live keys in the schema itself), so never name a version like that.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Sequence

import redis

from .connection import is_sentinel, sentinel_servers
from .keys import KIND_PATTERN, SCHEMA_VERSION

NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # no glob characters, spaces or ':' in a key pattern
USERNAME_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
MIN_PASSWORD_LENGTH = 16

# Users made by an older ``precompute redis acl`` lack the commands granted since (the publisher's XREVRANGE, read by
# cache_health and live_refresh_sensor, and the commands of probation's settling; the reader's GETRANGE and SETRANGE,
# the sketch's aging steps): the server then says only NOPERM, on every sensor tick, settling or aging step.
REAPPLY_HINT = (
    "the Redis user lacks a permission this version needs (users made by an older `precompute redis acl` do):"
    " run `precompute redis acl --apply` again; the reader never has an operator command's (`cache stats`,"
    " `cache invalidate`): run those with an admin URL"
)


# A URL naming a database other than 0: the users have no SELECT (it would let them reach other databases' keys).
DATABASE_HINT = (
    "the users of `precompute redis acl` work on database 0 only (they are granted no SELECT, which would reach"
    " other databases' keys): name database 0 in the URL (redis://USER:PASSWORD@HOST:PORT/0)"
)


def refused_select(error: BaseException) -> bool:
    """Whether ``error`` is the ACL refusal of ``SELECT``: the connection's URL names a database other than 0."""
    return is_acl_refusal(error) and "'select'" in str(error).lower()


def acl_hint(error: BaseException) -> str:
    """What to do about the ACL refusal ``error``: ``DATABASE_HINT`` when it refused ``SELECT`` (re-applying the
    users changes nothing then), else ``REAPPLY_HINT``."""
    return DATABASE_HINT if refused_select(error) else REAPPLY_HINT


def is_acl_refusal(error: BaseException) -> bool:
    """Whether ``error`` is an ACL refusal: NOPERM, or a command of a script refused (a plain error reply)."""
    return isinstance(error, redis.exceptions.NoPermissionError) or "ACL failure in script" in str(error)


# Handshake: redis-py sends CLIENT SETINFO after AUTH (its errors ignored, but logged in ACL LOG); PING for health.
# Its cluster client reads the slot map (CLUSTER SLOTS) and the command table (COMMAND), and follows ASK redirects
# (ASKING): without them a user cannot connect to a Redis Cluster at all. All three read server metadata only.
CONNECTION_COMMANDS = ("ping", "client|setinfo", "cluster|slots", "command", "asking")
# Granted where the server knows them: CLIENT SETINFO is Redis 7.2+/Valkey, and Redis 7.0 refuses a whole ACL SETUSER
# (or ACL file line) that names a command it does not know. redis-py ignores the handshake's error there.
OPTIONAL_COMMANDS = ("client|setinfo",)

PUBLISHER_COMMANDS = (
    *CONNECTION_COMMANDS,
    # publish_version / flip_pointer / patch_version / the embedding sync: buckets, pointer, experiment, sentinels
    "get", "set", "del", "exists", "expire", "expireat", "hset", "hdel",
    "multi", "exec", "discard",
    # a task run's write of its live values WATCHes the kind's epoch (write_live_values' fence)
    "watch", "unwatch",
    # invalidate / delete_live_values: the kind's epoch, incremented (redis-py sends INCRBY) before values go
    "incrby",
    # the query_logs drain and the cleanup: read the stream, record the trimmed boundary, trim; cache_health and
    # live_refresh_sensor read its newest queries first
    "xrange", "xrevrange", "xtrim", "xdel", "xlen", "xinfo|stream",
    # read-only inspection inside the namespace (operators, checks)
    "hget", "hmget", "hlen", "ttl", "pttl", "type",
    # settle_published: probation's scripts after a flip, its order list, and the live values it hands over or deletes;
    # on Redis Cluster a bucket's HSET and EXPIRE are one script too (publish._WRITE_BUCKET)
    "eval", "lrange", "rpush", "unlink", "zrem", "zadd", "zscore", "zrange", "zcard", "llen", "hexists",
    # flip_pointer: INFO replication, to wait until replicas hold a version before flipping to it; the drains: INFO
    # memory's maxmemory and MEMORY USAGE of their stream (``query_logs.stream_footprint``)
    "info", "memory|usage",
    # the query_logs and user_events drains: Redis's clock, which stamps the stream IDs, says when an hour is over
    "time",
    # invalidate records what it takes out of a version; a restore or a mend of the version reads it back
    "sadd", "smembers",
)  # fmt: skip

# The reader's root permissions: these commands read anywhere in the namespace, and write nowhere.
READER_COMMANDS = (
    *CONNECTION_COMMANDS,
    "get",
    "hget",
    "hmget",
    "pttl",
)  # pointer, experiment, buckets, live values; PTTL: XFetch
# ``EVAL`` of admission ``probation``'s two scripts, and the commands they run on its list, hash and sorted sets.
PROBATION_COMMANDS = ("eval", "hexists", "hincrby", "hset", "hdel", "zscore", "zadd", "zrem", "zcard", "zpopmin",
                      "incr", "llen", "lpop", "rpush")  # fmt: skip
# Each of its writes is granted only with the keys it writes, as a Redis 7 selector ``(keys commands)``.
READER_WRITES = (
    ("~{prefix}:{kind}:live:*", ("set", "unlink")),  # get_or_compute: SET EX of an admitted value; probation evicts
    ("~{prefix}:{kind}:delta:*", ("set", "unlink")),  # get_or_compute: SET EX of its compute seconds (XFetch's delta)
    # get_or_compute's store script: compares the kind's epoch, then SETs the value and its delta (EVAL declares its
    # keys read-write; the script itself may only GET the epoch: no selector grants a write of it)
    ("~{prefix}:{kind}:live:* ~{prefix}:{kind}:delta:* ~{prefix}:{kind}:epoch", ("eval",)),
    ("~{prefix}:{kind}:lock:*", ("set", "eval")),  # get_or_compute: SET NX PX of the lock; its owner's EVAL releases
    ("~{prefix}:{kind}:seen:*", ("set",)),  # second_miss: SET PX NX GET of the marker (reads it back: ~)
    # frequency: INCRBY; aging steps (the default shape's sketch, and one of another shape)
    ("~{prefix}:{kind}:sketch ~{prefix}:{kind}:sketch:*", ("bitfield", "eval", "getrange", "setrange")),
    ("~{prefix}:{kind}:fifo:*", PROBATION_COMMANDS),  # probation: its two scripts and what they run on its queues
    ("%W~{prefix}:qlog", ("xadd",)),  # the query logger: XADD MAXLEN, write-only (the stream is never read back)
    ("%W~{prefix}:events", ("xadd",)),  # the event logger (record_event), write-only too
    ("~{prefix}:stats:*", ("hincrby",)),  # its hit/miss counters (HINCRBY replies the count: ~)
)

# Never granted to either user (checked by ``check_rules`` and the tests).
FORBIDDEN_COMMANDS = frozenset(
    {"flushall", "flushdb", "config", "keys", "scan", "debug", "shutdown", "acl", "module", "save", "bgsave",
     "bgrewriteaof", "replicaof", "slaveof", "migrate", "restore", "sort", "monitor", "script", "function", "select",
     "swapdb", "move", "copy", "rename", "renamenx", "object", "client", "cluster", "failover", "sync", "psync"}
)  # fmt: skip
ALLOWED_SUBCOMMANDS = frozenset({"client|setinfo", "cluster|slots"})  # of a forbidden command: redis-py's handshake


def password_hash(password: str) -> str:
    """The ACL rule that sets ``password`` without sending or storing it in clear: ``#`` + SHA-256 hex."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def _check_user(user: tuple[str, str], role: str) -> tuple[str, str]:
    if not isinstance(user, tuple | list) or len(user) != 2:
        raise ValueError(f"the {role} user is a (name, password) pair")
    name, password = user
    if not isinstance(name, str) or not USERNAME_PATTERN.fullmatch(name) or name == "default":
        raise ValueError(f"invalid {role} user name {name!r}: 1-64 characters from [A-Za-z0-9_.@-], not 'default'")
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(
            f"the {role} password must be at least {MIN_PASSWORD_LENGTH} characters (e.g. `openssl rand -hex 24`)"
        )
    return name, password


def _prefix(namespace: str) -> str:
    if not isinstance(namespace, str) or not NAMESPACE_PATTERN.fullmatch(namespace):
        raise ValueError(f"invalid namespace {namespace!r}: 1-64 characters from [A-Za-z0-9_.-]")
    return f"{namespace}:{SCHEMA_VERSION}"


def _kinds(kinds: Sequence[str] | None) -> list[str]:
    """The kind part of per-kind key patterns: ``*`` for every kind, else the named kinds."""
    if kinds is None:
        return ["*"]
    if isinstance(kinds, str) or not kinds:
        raise ValueError("kinds is a non-empty list of kind names, or None for every kind")
    for kind in kinds:
        if not isinstance(kind, str) or not KIND_PATTERN.fullmatch(kind):
            raise ValueError(f"invalid kind {kind!r}: expected lower-case letters, digits and '_' (max 64)")
    return list(dict.fromkeys(kinds))


def _granted(commands: Sequence[str], unknown: Collection[str]) -> list[str]:
    """``+command`` rules of ``commands``, less the optional ones the server does not know (``unknown``)."""
    return [f"+{c}" for c in commands if not (c in OPTIONAL_COMMANDS and c in unknown)]


def publisher_rules(namespace: str = "pc", *, unknown: Collection[str] = ()) -> list[str]:
    """The publisher's key and command rules (no user, state or password): read/write ``{ns}:1:*`` only.
    ``unknown``: optional commands the server does not know (``unknown_commands``), left out."""
    prefix = _prefix(namespace)
    return ["resetkeys", f"~{prefix}:*", "resetchannels", "-@all", *_granted(PUBLISHER_COMMANDS, unknown)]


def reader_rules(
    namespace: str = "pc", *, kinds: Sequence[str] | None = None, unknown: Collection[str] = ()
) -> list[str]:
    """The reader's rules: read ``{ns}:1:*``; each write only on the keys the serving client writes it to.

    ``kinds`` limits the writable live/admission keys to those kinds (None: any kind, ``{ns}:1:*:live:*``).
    """
    prefix = _prefix(namespace)
    selectors = []
    for keys, commands in READER_WRITES:
        patterns = dict.fromkeys(keys.format(prefix=prefix, kind=kind) for kind in _kinds(kinds))
        selectors.append("(" + " ".join([*patterns, *(f"+{c}" for c in commands)]) + ")")
    rules = ["resetkeys", f"%R~{prefix}:*", "resetchannels", "-@all", *_granted(READER_COMMANDS, unknown)]
    return [*rules, "clearselectors", *selectors]


def unknown_commands(client: redis.Redis, names: Sequence[str] = OPTIONAL_COMMANDS) -> set[str]:
    """Of ``names`` (``command`` or ``command|subcommand``), those the server of ``client`` does not know:
    ``COMMAND INFO`` answers nil for them (Redis 7.0 has no ``CLIENT SETINFO``)."""
    from .connection import send_pipelined

    (reply,) = send_pipelined(client, [("COMMAND", "INFO", *names)])
    if isinstance(reply, BaseException):
        raise reply
    return {name for name, info in zip(names, reply, strict=True) if not info}


def _user_rules(user: tuple[str, str], role: str, rules: list[str]) -> list[str]:
    name, password = _check_user(user, role)
    return [name, "reset", "on", password_hash(password), *rules]


def _both(
    namespace: str,
    publisher: tuple[str, str],
    reader: tuple[str, str],
    kinds: Sequence[str] | None,
    unknown: Collection[str] = (),
) -> list[list[str]]:
    users = [
        _user_rules(publisher, "publisher", publisher_rules(namespace, unknown=unknown)),
        _user_rules(reader, "reader", reader_rules(namespace, kinds=kinds, unknown=unknown)),
    ]
    if users[0][0] == users[1][0]:
        raise ValueError("the publisher and the reader must be two different users")
    if publisher[1] == reader[1]:  # every reader service would hold the publisher's password
        raise ValueError("the publisher and the reader must have different passwords")
    for user in users:
        check_rules(user[1:])
    return users


def acl_setuser_commands(
    namespace: str = "pc",
    *,
    publisher: tuple[str, str],
    reader: tuple[str, str],
    kinds: Sequence[str] | None = None,
    unknown: Collection[str] = (),
) -> list[list[str]]:
    """``ACL SETUSER`` commands (argument lists) that create or reset the two users of ``namespace``.

    ``publisher`` and ``reader`` are ``(name, password)`` pairs (passwords of at least 16 characters, sent as
    SHA-256 hashes). Each command starts with ``reset``, so applying them again converges to exactly these rules.
    ``unknown``: the optional commands the server does not know (``unknown_commands``), left out.
    """
    return [["ACL", "SETUSER", *user] for user in _both(namespace, publisher, reader, kinds, unknown)]


def acl_file_lines(
    namespace: str = "pc",
    *,
    publisher: tuple[str, str],
    reader: tuple[str, str],
    kinds: Sequence[str] | None = None,
    unknown: Collection[str] = (),
) -> list[str]:
    """The two users as lines of a Redis/Valkey ACL file (``aclfile``; no clear-text password in it). The file must
    also define every other user the server needs, ``default`` included (an ACL file replaces all users). For
    Redis 7.0, ``unknown=OPTIONAL_COMMANDS``: it refuses a line naming ``client|setinfo``."""
    return [" ".join(["user", *user]) for user in _both(namespace, publisher, reader, kinds, unknown)]


def apply_acl(
    client: redis.Redis,
    namespace: str = "pc",
    *,
    publisher: tuple[str, str],
    reader: tuple[str, str],
    kinds: Sequence[str] | None = None,
) -> list[str]:
    """Create or reset both users on the server of ``client`` (a connection allowed to run ``ACL SETUSER``) in one
    MULTI/EXEC, or on every node of a Redis Cluster, or on a Sentinel primary and every replica its sentinels know
    (ACL users are per server); returns their names. They last until a restart unless saved (see the module). The
    optional commands a server does not know are left out of its rules (``unknown_commands``: Redis 7.0 refuses
    ``client|setinfo``)."""
    acl_setuser_commands(namespace, publisher=publisher, reader=reader, kinds=kinds)  # bad arguments: before any write
    if isinstance(client, redis.RedisCluster):
        servers = [client.get_redis_connection(node) for node in client.get_nodes()]
    elif is_sentinel(client):
        servers = sentinel_servers(client)
    else:
        servers = [client]
    made = servers[1:] if is_sentinel(client) else []  # the replicas' clients, made here (a cluster's are its own)
    try:
        # ACL changes are not rolled back: resetting the user this connection runs as took its own rights away half-way
        # (the next SETUSER was refused, the first had landed), and an operator whose only admin it was was locked out.
        names = {publisher[0], reader[0]}
        for server in servers:
            if (admin := _whoami(server)) in names:
                raise ValueError(
                    f"the {'publisher' if admin == publisher[0] else 'reader'} user {admin!r} is the user this "
                    "connection runs as (PRECOMPUTE_REDIS_ADMIN_URL): resetting it would take its admin rights away; "
                    "name another user"
                )
        for server in servers:
            unknown = unknown_commands(server)
            commands = acl_setuser_commands(namespace, publisher=publisher, reader=reader, kinds=kinds, unknown=unknown)
            pipe = server.pipeline(transaction=True)
            for command in commands:
                pipe.execute_command(*command)
            pipe.execute()
    finally:
        for server in made:
            server.close()
    return [command[2] for command in commands]


def _whoami(server: redis.Redis) -> str | None:
    """The ACL user ``server``'s connection runs as (None when the server will not say)."""
    try:
        name = server.execute_command("ACL", "WHOAMI")
    except redis.ResponseError:
        return None
    return name.decode() if isinstance(name, bytes) else name


def check_rules(rules: Sequence[str]) -> None:
    """Raise ``ValueError`` if ``rules`` grant a forbidden command, a category, all keys or any channel."""
    for rule in [part for argument in rules for part in argument.strip("()").split()]:
        lowered = rule.lower()
        if lowered.startswith("+"):
            name = lowered[1:]
            forbidden = name in FORBIDDEN_COMMANDS or (
                name.split("|")[0] in FORBIDDEN_COMMANDS and name not in ALLOWED_SUBCOMMANDS
            )
            if name.startswith("@") or forbidden:
                raise ValueError(f"rule {rule!r} grants a forbidden command or a whole category")
        elif lowered in {"allkeys", "allcommands", "allchannels", "nopass", "~*", "%r~*", "%w~*", "&*"}:
            raise ValueError(f"rule {rule!r} is too broad")
        elif lowered.startswith("&"):
            raise ValueError(f"rule {rule!r} grants a Pub/Sub channel")
