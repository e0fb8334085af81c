"""Redis clients built from URLs, with timeouts that fail fast instead of hanging the caller.

A URL selects Redis Cluster with the query parameter ``cluster``: ``redis://host:port?cluster=1`` (or
``rediss://...?cluster=1`` with TLS). ``host:port`` is any node of the cluster (the client discovers the others);
``cluster=0`` or no parameter is a single server. A cluster has one database, so a cluster URL names none (or
``/0``).

Redis Sentinel (a primary, its replicas, and sentinels that promote a replica when the primary dies) is selected by
the scheme: ``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]`` (``rediss+sentinel://``: TLS
to the sentinels and the data servers, with redis-py's ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_password`` (the key file's) and ``ssl_check_hostname`` as parameters). The hosts are sentinels
(port 26379 by default), ``service`` the name they monitor the primary by; user and password are the data servers'.
``?sentinel_username=...&sentinel_password=...`` authenticate to sentinels that require it. The client asks a
sentinel for the current primary on every new connection, so after a failover it reconnects to the promoted one.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from .urls import split_userinfo

if TYPE_CHECKING:
    from redis.cluster import RedisCluster

# Everything a serving path degrades on: dead or slow servers, and error replies (OOM, READONLY,
# CLUSTERDOWN, LOADING, NOPERM) alike; on a cluster also "no node reachable" and "slot not covered", which
# redis-py raises as ``RedisClusterException`` (not a ``RedisError``).
REDIS_ERRORS = (redis.RedisError, OSError, RedisClusterException)
CLUSTER_PARAMETER = "cluster"
CONNECT_RETRIES = 3  # attempts of a cluster client's constructor, each on the next node if one fails
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme: TLS?
SENTINEL_PORT = 26379
_SENTINEL_PARAMETERS = ("sentinel_username", "sentinel_password")
# TLS options of a rediss+sentinel:// URL, as redis-py names them; they apply to the sentinels and the data servers.
_TLS_PARAMETERS = (
    "ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_check_hostname"
)  # fmt: skip
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


# Why a URL's host:port cannot be read, without the URL: ``check_url_port`` and ``stack.url_problem`` say it.
URL_UNREADABLE = (
    "the URL's host:port cannot be read: it needs one host, a port from 1 to 65535, and '/', '?', '#', '@', '[' and "
    "']' in its user name and password percent-encoded (%2F, %3F, %23, %40, %5B, %5D)"
)


def check_url_port(url: str) -> None:
    """``ValueError`` without the URL when its port cannot be read: an unencoded '/', '?' or '#' in a password ends the
    authority there, and urllib's own error quotes what followed the ':' as the port, the start of the password (or,
    when that start is a number, the connection's error names it as host:port); a '[' or ']' in it is urllib's
    "Invalid IPv6 URL"."""
    try:
        parts = urlsplit(url)
        _ = parts.port
        # urllib ends the authority at a password's '?', '#' or '/' even when what it then reads as the host:port is
        # one ("app:2024?Summer@host": host 'app', port 2024; "app:Se@cr/et@host": host 'cr'), and the connection's
        # error names that host:port: its user info must be the one split_userinfo reads
        head, userinfo, _ = split_userinfo(url)
        readable = not head or parts.netloc.rpartition("@")[0] == (userinfo or "")
    except ValueError:
        readable = False
    if not readable:
        raise ValueError(URL_UNREADABLE)


def split_cluster_url(url: str) -> tuple[str, bool | None]:
    """``url`` without its ``cluster`` parameter, and what that parameter says (None: absent).

    ``ValueError`` for an unknown value, a repeated parameter, or a cluster URL that names a database other than 0.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    values = [value for name, value in query if name == CLUSTER_PARAMETER]
    if not values:
        return url, None
    if len(values) > 1:
        raise ValueError(f"the Redis URL names '{CLUSTER_PARAMETER}' {len(values)} times; give it once")
    value = values[0].strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(f"the Redis URL's '{CLUSTER_PARAMETER}={values[0]}' is not one of 1/0, true/false, yes/no")
    cluster = value in _TRUE
    if cluster and parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0; the URL names database {parts.path.strip('/')!r}")
    rest = urlencode([(name, v) for name, v in query if name != CLUSTER_PARAMETER])
    return urlunsplit(parts._replace(query=rest)), cluster


def check_url_parameters(url: str, *, cluster: bool = False) -> None:
    """``ValueError`` naming the query parameters of a single server's URL (``redis://``, ``rediss://``, ``unix://``)
    that redis-py's connection does not take: it hands every one on as a keyword argument, and each command then
    failed with a ``TypeError`` ("unexpected keyword argument 'ssl_cert_reqs'") that ``up``, ``status`` and ``cache``
    showed as a traceback. A cluster URL (``?cluster=1``, or ``cluster``) takes only those its client hands its
    connections: it dropped any other unread (a misspelt ``socket_timout``). A URL whose host:port cannot be read is
    refused as ``check_url_port`` refuses it first: its query may start inside the password."""
    check_url_port(url)
    plain_url, in_url = split_cluster_url(url)
    parts = urlsplit(plain_url)
    scheme = parts.scheme.lower()
    connection = {"rediss": redis.SSLConnection, "unix": redis.UnixDomainSocketConnection}.get(scheme, redis.Connection)
    takes = _init_parameters(redis.ConnectionPool, connection)
    if cluster or in_url:
        takes &= _cluster_parameters()
    # Blank values are dropped, as redis-py drops them.
    unknown = sorted({name for name, _ in parse_qsl(parts.query)} - takes)
    if unknown:
        tls = set(unknown) <= {"ssl", *_init_parameters(redis.SSLConnection)} and scheme != "rediss"
        client = "cluster client" if cluster or in_url else f"{scheme}:// connection"
        raise ValueError(
            f"the Redis URL has parameter(s) {', '.join(unknown)} that redis-py's {client} does not "
            f"take{' (TLS options need rediss://)' if tls else ''}"
        )
    # redis-py reads a database that is not a number as 0: /l for /1 shared database 0 with whatever lives there.
    database = parts.path.strip("/")
    if scheme != "unix" and database and not database.isdigit():
        raise ValueError(f"the Redis URL's database {database!r} is not a number (redis://host:port/0)")
    redis.connection.parse_url(plain_url)  # its ValueError names a parameter whose value it cannot read


@functools.cache
def _cluster_parameters() -> frozenset[str]:
    """The options redis-py's cluster client hands its nodes' connections (``cleanup_kwargs``): it drops the rest."""
    from redis.cluster import KWARGS_DISABLED_KEYS, REDIS_ALLOWED_KEYS

    return frozenset(REDIS_ALLOWED_KEYS) - frozenset(KWARGS_DISABLED_KEYS)


@functools.cache
def _init_parameters(*classes: type) -> frozenset[str]:
    """The keyword arguments the constructors of ``classes`` and of their bases name."""
    return frozenset(
        parameter.name
        for cls in classes
        for base in cls.__mro__
        if "__init__" in vars(base)
        for parameter in inspect.signature(base.__init__).parameters.values()
        if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) and parameter.name != "self"
    )


@dataclass(frozen=True)
class SentinelUrl:
    """A ``redis+sentinel://`` (``rediss+sentinel://``: TLS) URL taken apart (see the module docstring)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: tuple[tuple[str, Any], ...] | None = None  # None: no TLS; else redis-py's TLS options given (maybe none)


def parse_sentinel_url(url: str) -> SentinelUrl | None:
    """``url`` taken apart when it names Redis Sentinel (``redis+sentinel://``, ``rediss+sentinel://``), else None.
    ``ValueError`` (one line, without the password) for a Sentinel URL without sentinels or service name, with a bad
    port or database, or with a parameter other than ``sentinel_username``, ``sentinel_password`` and (TLS only)
    redis-py's ``ssl_*`` options."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in SENTINEL_SCHEMES:
        if "sentinel" in scheme.lower():
            raise ValueError(
                f"unknown Redis URL scheme {scheme!r}: Sentinel URLs start with redis+sentinel:// or rediss+sentinel://"
            )
        return None
    tls = SENTINEL_SCHEMES[scheme.lower()]
    # The user info as ``serving.urls.split_userinfo`` reads it, as ``stack.redact`` does: a password's unencoded '/'
    # or '@' (base64 has '/') is then neither a host, a path nor a parameter, and never shown in an error as one.
    _, userinfo, located = split_userinfo(url)
    end = min((rest.index(mark) for mark in "?#" if mark in rest), default=len(rest))
    ambiguous = userinfo is None and "@" in rest[end:] and not _in_parameter_values(rest[end:])
    if ambiguous or any(mark in (userinfo or "") for mark in "?#"):
        # A password's unencoded '?' or '#': urllib and redis-py end the authority inside it, so it is refused.
        raise ValueError(
            "the Sentinel URL has an '@' after its '?' or '#': percent-encode '?', '#' and '@' in its user name and "
            "password (%3F, %23, %40)"
        )
    username, _, password = (userinfo or "").partition(":")
    parts = urlsplit(f"redis+sentinel://{located}")
    hosts = parts.netloc
    sentinels = tuple(_sentinel_address(host) for host in hosts.split(",") if host.strip())
    if not sentinels:
        raise ValueError(f"the Sentinel URL names no sentinel: expected {scheme}://host:port[,host:port]/service")
    path = [unquote(piece) for piece in parts.path.split("/") if piece]
    if not path or len(path) > 2:
        raise ValueError(f"the Sentinel URL's path must be /service or /service/db, not {parts.path or '(none)'!r}")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"the Sentinel URL's database must be a whole number, not {path[1]!r}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    known = _SENTINEL_PARAMETERS + (_TLS_PARAMETERS if tls else ())
    unknown = sorted({name for name, _ in query} - set(known))
    if unknown:
        needs_tls = "" if tls or not set(unknown) <= set(_TLS_PARAMETERS) else " (TLS options need rediss+sentinel://)"
        raise ValueError(
            f"the Sentinel URL has unknown parameter(s) {', '.join(unknown)}{needs_tls}: it knows {', '.join(known)}"
        )
    options = dict(query)
    # Converted here: a bad value is an error of the URL, not of the first connection.
    tls_options = tuple(_tls_options([(name, value) for name, value in query if name in _TLS_PARAMETERS]).items())
    return SentinelUrl(
        sentinels,
        path[0],
        int(path[1]) if len(path) == 2 else 0,
        unquote(username) or None,
        unquote(password) or None,
        options.get("sentinel_username") or None,
        options.get("sentinel_password") or None,
        tls_options if tls else None,
    )


def _in_parameter_values(tail: str) -> bool:
    """Whether every '@' of ``tail`` (a Sentinel URL from its first '?' or '#') is in the value of a parameter it
    knows (``sentinel_password=p@ss``, an ``ssl_keyfile`` path): a query of its own, not a password's rest."""
    query, _, fragment = tail[1:].partition("#") if tail.startswith("?") else ("", "#", tail[1:])
    names = [name for name, _ in parse_qsl(query, keep_blank_values=True)]
    return "@" not in fragment and all(name in _SENTINEL_PARAMETERS + _TLS_PARAMETERS for name in names)


def _sentinel_address(host: str) -> tuple[str, int]:
    """``(host, port)`` of one sentinel of a Sentinel URL (``host``, ``host:port``, ``[ipv6]:port``)."""
    host = host.strip()
    name, port = host, ""
    if host.startswith("["):
        name, _, tail = host[1:].partition("]")
        port = tail.removeprefix(":")
    elif host.count(":") == 1:
        name, port = host.split(":")
    if not name or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"the Sentinel URL's sentinel {host!r} is not host:port")
    return name, int(port) if port else SENTINEL_PORT


def mode_problem(client: object) -> str | None:
    """Why the server a plain (not cluster) ``client`` talks to is not one to keep data in, from ``INFO server``'s
    ``redis_mode`` (Valkey's ``server_mode``): a Redis Cluster node (it answers PING, then MOVED for most keys) or a
    Sentinel (it answers PING, then refuses GET); None for a standalone server, a cluster client, or a server or user
    that does not say."""
    import redis

    if is_cluster(client):
        return None
    try:
        server = client.info("server")
    except (redis.ResponseError, AttributeError):
        return None
    mode = server.get("redis_mode") or server.get("server_mode")  # Redis's name, Valkey's (8.0 on)
    if mode == "cluster":
        return "a Redis Cluster node: add ?cluster=1 to the URL"
    if mode == "sentinel":
        return "a Redis Sentinel, not a data server: use redis+sentinel://host:port/service_name"
    return None


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` selects Redis Cluster (``?cluster=1``)."""
    return bool(split_cluster_url(url)[1])


def cannot_persist(error: BaseException) -> bool:
    """Whether ``error`` is a server's ``MISCONF`` reply: it cannot write its AOF or RDB (a full disk), and refuses
    writes, ``PING`` included, while it still answers reads. Not a refusal of the login."""
    return isinstance(error, redis.ResponseError) and str(error).startswith("MISCONF")


def is_cluster(client: object) -> bool:
    """Whether ``client`` is a Redis Cluster client (a cluster has no single connection pool), or one not built yet
    (``PendingCluster``)."""
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster | PendingCluster)


class PendingCluster:
    """The client of a Redis Cluster none of whose nodes answered when it was built (``connect(..., pending=True)``):
    building a cluster client reads the slot map, so it cannot exist before a node answers. ``start()`` builds it
    (raising as ``connect`` does while still no node answers); its holder swaps it in then. ``close()`` does
    nothing."""

    def __init__(self, url: str, **options: Any) -> None:
        self.url = url
        self.options = options

    def start(self) -> redis.Redis:
        return connect(self.url, **self.options)

    def close(self) -> None:
        pass


def key_slot(name: bytes | str) -> int:
    """The Redis Cluster slot of the key ``name`` (CRC16 of its hash tag, or of the whole name)."""
    from redis.crc import key_slot as slot

    return slot(name.encode() if isinstance(name, str) else name)


class AskTargetError(redis.ConnectionError):
    """The reply of a command whose ASK redirection was not followed: the node it names (``node``, ``host:port``)
    could not be reached (``tried``), or was to be avoided (``cluster_send``'s ``avoid``). That node failed, not the
    master that answered ASK."""

    def __init__(self, node: str, message: str, *, tried: bool) -> None:
        super().__init__(message)
        self.node = node
        self.tried = tried


def cluster_send(client, commands: list[tuple], *, retry: bool = False, avoid: Collection[str] = ()) -> list:
    """Run single-key ``commands`` (``(NAME, key, args...)``) on a Redis Cluster client: one packed write per master
    holding their slots, every master written before any is read, so one round trip in parallel. Returns the
    replies in order, error replies and the failure of a master's connection as exception objects in place (a
    connection failure or a MOVED reply also refreshes the client's slot map, which a failover changed). A command
    answered with ASK (its slot is migrating and its key has moved) is sent once more, after ``ASKING``, to the
    node the reply names, as Redis Cluster asks; the slot map is unchanged until the migration ends. When that node
    cannot be reached, or is named in ``avoid`` (node names a caller backs off), the reply is an ``AskTargetError``
    naming it (no refresh: the slot map does not name it).

    A command answered with MOVED (its slot has moved for good: a resharding ended, a failover) was not run: it is
    sent once more after the refresh. ``retry=True`` also sends once more the commands whose master's connection
    failed, which may have run (for idempotent writes: a publish after a failover reaches the promoted replica).
    ``PIPELINE_CHUNK`` commands at a time, as ``send_pipelined``."""
    return [reply for part in _chunks(commands) for reply in _cluster_send(client, part, retry=retry, avoid=avoid,
                                                                           again=True)]  # fmt: skip


def _cluster_send(client, commands: list[tuple], *, retry: bool, avoid: Collection[str], again: bool) -> list:
    """``cluster_send``; ``again``: whether the commands MOVED (or failed, with ``retry``) are sent once more."""
    replies, failed = _cluster_send_once(client, commands)
    _follow_asks(client, commands, replies, avoid)
    if failed or any(_moved_or_gone(reply) for reply in replies):
        with contextlib.suppress(*REDIS_ERRORS):
            client.nodes_manager.initialize()
        redo = [i for i, reply in enumerate(replies) if _moved(reply) or (retry and _moved_or_gone(reply))]
        if redo and again:
            resent = _cluster_send(client, [commands[i] for i in redo], retry=False, avoid=avoid, again=False)
            for index, reply in zip(redo, resent, strict=True):
                replies[index] = reply
    return replies


def routing_key(command: Sequence[bytes | str | int]) -> bytes | str | int:
    """The key that picks a command's cluster slot: the first key of ``EVAL``/``EVALSHA`` (``EVAL script
    numkeys key ...``), else the first argument."""
    name = command[0]
    if (name.decode() if isinstance(name, bytes) else str(name)).upper() in ("EVAL", "EVALSHA"):
        return command[3]
    return command[1]


def pack_resp(commands: Sequence[Sequence[bytes | str | int]]) -> bytes:
    """``commands`` as one RESP2 byte string, ready to send: about twice as fast as redis-py's ``pack_commands``
    (the query and event loggers send tens of thousands of commands a second from a thread that shares the GIL
    with the service's lookups; a re-rank sends a hundred). Arguments are ``bytes``, ``str`` or numbers."""
    parts = []
    for command in commands:
        parts.append(b"*%d\r\n" % len(command))
        for argument in command:
            if not isinstance(argument, bytes):
                argument = str(argument).encode()  # str as UTF-8; numbers as redis-py writes them
            parts.append(b"$%d\r\n%s\r\n" % (len(argument), argument))
    return b"".join(parts)


# Commands written before their replies are read. A whole get_many of 200,000 keys in one write outlasted the serving
# client's 50 ms socket timeout while Redis worked through it: every key a miss, and the client backing off.
PIPELINE_CHUNK = 10_000


def _chunks(commands: list[tuple]) -> Iterator[list[tuple]]:
    """``commands``, ``PIPELINE_CHUNK`` at a time."""
    return (commands[start : start + PIPELINE_CHUNK] for start in range(0, len(commands), PIPELINE_CHUNK))


def send_pipelined(client, commands: list[tuple], *, while_waiting: Callable[[], None] | None = None) -> list:
    """Replies of ``commands`` in order, in one round trip per ``PIPELINE_CHUNK`` of them: on a plain client packed
    and written at once on one pooled connection and read back reply by reply (about half the Python time of a
    redis-py pipeline for a hundred commands), error replies as exception objects in place; on a cluster,
    ``cluster_send``. A failure of the connection raises (it is then dropped, not reused). ``while_waiting`` runs
    between the first write and its first read, while Redis works on the commands (the serving client sends its
    query log then)."""
    if is_cluster(client):
        return cluster_send(client, commands)
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        replies = []
        for number, part in enumerate(_chunks(commands)):
            connection.send_packed_command([pack_resp(part)], check_health=False)
            if while_waiting is not None and not number:
                while_waiting()
            replies += [_read_reply(connection) for _ in part]
        return replies
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


def _read_reply(connection) -> Any:
    """The next reply on ``connection``; an error reply (OOM, MOVED, ASK, ...) as its exception object."""
    try:
        return connection.read_response()
    except redis.ResponseError as error:
        return error


def _moved_or_gone(reply: object) -> bool:
    from redis.exceptions import AskError

    return (
        isinstance(reply, AskError | redis.ConnectionError | redis.TimeoutError | OSError)
        and not _ask(reply)
        and not isinstance(reply, AskTargetError)
    )


def _moved(reply: object) -> bool:
    from redis.exceptions import MovedError

    return isinstance(reply, MovedError)


def _ask(reply: object) -> bool:
    """An ASK redirection (a MOVED one is an ``AskError`` too, in redis-py)."""
    from redis.exceptions import AskError, MovedError

    return isinstance(reply, AskError) and not isinstance(reply, MovedError)


def _follow_asks(client, commands: list[tuple], replies: list, avoid: Collection[str] = ()) -> None:
    """Replace each ASK reply in ``replies`` by the reply of its command sent, after ``ASKING``, to the node the ASK
    names (one write per node); a node the client does not know leaves the ASK reply, one named in ``avoid`` or whose
    connection fails gives an ``AskTargetError`` naming it."""
    targets: dict[tuple[str, int], list[int]] = {}
    for index, reply in enumerate(replies):
        if _ask(reply):
            targets.setdefault((reply.host, int(reply.port)), []).append(index)
    for (host, port), indexes in targets.items():
        node = client.get_node(host=host, port=port)
        if node is None:
            continue
        if node.name in avoid:
            for index in indexes:
                replies[index] = AskTargetError(node.name, f"ASK to {node.name}, which is avoided", tried=False)
            continue
        pool = client.get_redis_connection(node).connection_pool
        connection = None
        try:
            connection = pool.get_connection()
            connection.send_packed_command([pack_resp([c for i in indexes for c in ((b"ASKING",), commands[i])])])
            for index in indexes:
                _read_reply(connection)  # ASKING's OK
                replies[index] = _read_reply(connection)
        except REDIS_ERRORS as error:
            if connection is not None:
                connection.disconnect()  # replies may be left unread: never hand this connection out again
            for index in indexes:
                if _ask(replies[index]):
                    replies[index] = AskTargetError(node.name, f"ASK to {node.name}: {error}", tried=True)
        except BaseException:  # interrupted (a signal): never hand out a connection with replies unread
            if connection is not None:
                connection.disconnect()
            raise
        finally:
            if connection is not None:
                pool.release(connection)


def _cluster_send_once(client, commands: list[tuple]) -> tuple[list, bool]:
    """The replies of ``commands``, one write per master, and whether a master's connection failed."""
    groups: dict[str, tuple[object, list[int]]] = {}
    replies: list = [None] * len(commands)
    for index, command in enumerate(commands):
        try:
            node = client.nodes_manager.get_node_from_slot(key_slot(routing_key(command)))
        except REDIS_ERRORS as error:  # a slot no master serves
            replies[index] = error
            continue
        groups.setdefault(node.name, (node, []))[1].append(index)
    sent: list[tuple[Any, Any, list[int]]] = []  # connections written on (or being written), not yet given back
    failed = False
    try:
        for node, indexes in groups.values():
            pool = client.get_redis_connection(node).connection_pool
            connection = None
            try:
                connection = pool.get_connection()
                sent.append((pool, connection, indexes))
                connection.send_packed_command([pack_resp([commands[i] for i in indexes])])
            except REDIS_ERRORS as error:
                if connection is not None:
                    sent.pop()
                    connection.disconnect()
                    pool.release(connection)
                for index in indexes:
                    replies[index] = error
                failed = True
        while sent:
            pool, connection, indexes = sent[0]
            done = 0
            try:
                for index in indexes:
                    replies[index] = _read_reply(connection)
                    done += 1
            except REDIS_ERRORS as error:
                connection.disconnect()  # replies may be left unread: never hand this connection out again
                for index in indexes[done:]:
                    replies[index] = error
                failed = True
            del sent[0]
            pool.release(connection)
    except BaseException:  # interrupted (a signal): replies may be left unread on every connection not given back
        for pool, connection, _ in sent:
            connection.disconnect()
            pool.release(connection)
        raise
    return replies, failed


@functools.cache  # one class per process, not one per client
def _cluster_class():
    from redis.cluster import RedisCluster

    class ClusterClient(RedisCluster):
        """``RedisCluster`` that also takes command names as bytes (``b"XADD"``), as a single-server client does:
        redis-py's cluster routing looks names up as text."""

        def execute_command(self, *args, **options):
            return super().execute_command(*_text_name(args), **options)

        def pipeline(self, transaction=None, shard_hint=None):
            pipe = super().pipeline(transaction, shard_hint)
            execute = pipe.execute_command
            pipe.execute_command = lambda *args, **options: execute(*_text_name(args), **options)
            return pipe

    return ClusterClient


def _text_name(args: tuple) -> tuple:
    return (args[0].decode(), *args[1:]) if args and isinstance(args[0], bytes) else args


def connect(
    url: str,
    *,
    socket_timeout: float | None = 0.05,
    cluster: bool = False,
    retries: int = 0,
    pending: bool = False,
) -> redis.Redis | RedisCluster | PendingCluster:
    """A client for ``url`` (``redis://``, ``rediss://`` with TLS, user/password for AUTH; ``redis+sentinel://``: the
    primary a sentinel names, found again after a failover).

    ``socket_timeout`` bounds every connect and command, so a dead server costs at most that long;
    ``retries`` defaults to none because a serving path would rather compute live than wait twice.
    ``cluster=True`` or ``?cluster=1`` in the URL returns a ``redis.cluster.RedisCluster`` (``cluster=True`` with
    ``?cluster=0`` is a contradiction: ``ValueError``). The cluster client tolerates slots without a master (a
    dead master and no replica): commands on the other slots still work. Building it reads the slot map from a node:
    when none answers it raises, unless ``pending`` (the serving client and its loggers, which must start during an
    outage as they do on a single server): it then returns a ``PendingCluster`` to build the client later.
    """
    options = dict(
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), retries),
        health_check_interval=0,
    )
    if (sentinel := parse_sentinel_url(url)) is not None:
        if cluster:
            raise ValueError("cluster=True, but the Redis URL names a Sentinel primary, not a Redis Cluster")
        return sentinel_primary(sentinel, **options)
    check_url_parameters(url, cluster=cluster)  # the port first, as check_url_port
    plain_url, in_url = split_cluster_url(url)
    if cluster and in_url is False:
        raise ValueError("cluster=True, but the Redis URL says cluster=0")
    if cluster or in_url:
        # The path's "/0" would become db=0, which the cluster client refuses outright.
        parts = urlsplit(plain_url)
        if parts.path.strip("/") not in ("", "0"):
            raise ValueError(f"a Redis Cluster has only database 0; the URL names database {parts.path.strip('/')!r}")
        # Building the client reads the slot map and the command table from some node: while a master is down
        # (and not yet replaced) that may be the dead one, so the constructor gets a few retries of its own,
        # on other nodes; then the client keeps the caller's.
        options["retry"] = Retry(NoBackoff(), max(retries, CONNECT_RETRIES))
        try:
            client = _cluster_class().from_url(
                urlunsplit(parts._replace(path="")), require_full_coverage=False, **options
            )
        except REDIS_ERRORS:
            if not pending:
                raise
            return PendingCluster(url, socket_timeout=socket_timeout, cluster=cluster, retries=retries)
        client.set_retry(Retry(NoBackoff(), retries))
        return client
    return redis.Redis.from_url(plain_url, **options)


def sentinel_primary(target: SentinelUrl, **options: Any) -> redis.Redis:
    """A client of the primary the sentinels of ``target`` name: every new connection asks them (no connection is
    made here), and one to a primary since demoted fails its next write with a connection error and is dropped."""
    # The sentinels' clients get the data connections' timeouts and retry policy too: redis-py's default retry (10
    # attempts with backoff) made each dead sentinel cost seconds on every new connection, lookups included.
    names = ("socket_timeout", "socket_connect_timeout", "retry")
    timeouts = {name: options[name] for name in names if name in options}
    credentials = {"username": target.sentinel_username, "password": target.sentinel_password}
    tls = {} if target.tls is None else {"ssl": True, **dict(target.tls)}
    sentinels = _sentinel_class()(list(target.sentinels), sentinel_kwargs={**timeouts, **credentials, **tls})
    connection_class = _sentinel_connection_class(tls=target.tls is not None)
    return sentinels.master_for(
        target.service, db=target.db, username=target.username, password=target.password,
        connection_class=connection_class, **tls, **options,
    )  # fmt: skip


@functools.cache  # one class per process and TLS or not, not one per client
def _sentinel_connection_class(*, tls: bool) -> type:
    """redis-py's connection to a Sentinel-managed primary (with ``tls``, its TLS one) that drops itself when a read
    fails, as its plain ``Connection`` does: redis-py's own defaults to keeping it, so a lookup interrupted while it
    waited for its reply (``KeyboardInterrupt``, a worker's timeout signal, a gevent ``Timeout``) gave the connection
    back to the pool with that reply unread, and the next command sent on it before the reply came read it as its
    own (another key's value)."""
    from redis.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

    base = SentinelManagedSSLConnection if tls else SentinelManagedConnection

    class DroppedOnReadError(base):
        def read_response(self, *args: Any, disconnect_on_error: bool = True, **kwargs: Any) -> Any:
            return super().read_response(*args, disconnect_on_error=disconnect_on_error, **kwargs)

    return DroppedOnReadError


@functools.cache  # one class per process, not one per client
def _sentinel_class():
    from redis.sentinel import MasterNotFoundError, Sentinel

    class Sentinels(Sentinel):
        """redis-py's ``Sentinel`` whose "no primary" error says in one short line what each sentinel answered:
        redis-py's own holds the repr of every sentinel's client, over a kilobyte each, and no word on a sentinel that
        answered but does not monitor the service (a misspelt name)."""

        def discover_master(self, service_name):
            problems = []
            for number, sentinel in enumerate(self.sentinels):
                address = "{host}:{port}".format_map(sentinel.connection_pool.connection_kwargs)
                try:
                    masters = sentinel.sentinel_masters()
                except (redis.ConnectionError, redis.TimeoutError) as error:
                    problems.append(f"{address}: {error}")
                    continue
                state = masters.get(service_name)
                if state is None:
                    problems.append(f"{address} monitors no {service_name!r} (it monitors {sorted(masters)})")
                elif not self.check_master_state(state, service_name):
                    problems.append(f"{address} holds {service_name!r} as down or not a primary")
                else:  # as redis-py: the sentinel that answered is asked first next time
                    self.sentinels[0], self.sentinels[number] = sentinel, self.sentinels[0]
                    return (state["ip"] if self._force_master_ip is None else self._force_master_ip), state["port"]
            raise MasterNotFoundError(f"no sentinel names a primary for {service_name!r}: {'; '.join(problems)}")

    return Sentinels


def _tls_options(given: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """redis-py's keyword arguments for the ``ssl_*`` options of a URL (``ssl_check_hostname`` a boolean)."""
    options: dict[str, Any] = {}
    for name, value in given:
        if name == "ssl_check_hostname":
            if value.strip().lower() not in _TRUE + _FALSE:
                raise ValueError(f"the Sentinel URL's ssl_check_hostname={value!r} is not one of 1/0, true/false")
            options[name] = value.strip().lower() in _TRUE
        else:
            options[name] = value
    return options


def sentinel_servers(client: redis.Redis) -> list[redis.Redis]:
    """The primary of a Sentinel client and a client of each replica the sentinels know (same credentials and
    database): per-server settings such as ACL users must reach all of them, since a replica may be promoted."""
    pool = client.connection_pool
    manager = pool.sentinel_manager
    replicas = manager.discover_slaves(pool.service_name)
    # The primary's retry policy too: redis-py's default (10 attempts with backoff) held a failing replica for seconds.
    names = ("username", "password", "db", "socket_timeout", "socket_connect_timeout", "retry", *_TLS_PARAMETERS)
    kwargs = {name: pool.connection_kwargs[name] for name in names if name in pool.connection_kwargs}
    if issubclass(pool.connection_class, redis.SSLConnection):
        kwargs["ssl"] = True
    return [client, *(redis.Redis(host=host, port=port, **kwargs) for host, port in replicas)]


def follow_primary(client: object) -> tuple[str, int] | None:
    """For a Sentinel client: ask the sentinels for the primary now, close its idle connections if they named
    another one, and return its address (None for other clients). The pool asks only when it opens a connection, so
    connections opened before a failover keep writing to a replaced primary that still runs as one (a partition; the
    seconds before the sentinels demote it), which loses what they write when it is demoted."""
    if not is_sentinel(client):
        return None
    return client.connection_pool.get_master_address()  # redis-py closes the idle connections on a change


def is_sentinel(client: object) -> bool:
    """Whether ``client`` talks to a Sentinel-managed primary."""
    from redis.sentinel import SentinelConnectionPool

    return isinstance(getattr(client, "connection_pool", None), SentinelConnectionPool)
