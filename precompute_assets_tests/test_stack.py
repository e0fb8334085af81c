"""The embedded stack: works from private folders, changes nothing outside its own, and is ready when `up` returns."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg2
import pytest
import redis

from precompute_assets.stack import (
    ENV_APP_DB,
    ENV_REDIS,
    PG_SYSTEM_USER,
    SCRAM_ITERATIONS,
    PostgresServer,
    RedisError,
    RedisServer,
    Stack,
    StackError,
    default_redis_binary,
    ensure_system_user,
    free_port,
    reachable,
    server_version,
    service_addresses,
    service_root,
    wheel_pg_install,
)
from precompute_assets.storage.postgres import libpq_url


def modes_of_parents(*paths: Path) -> dict[Path, tuple[int, int, int]]:
    """Mode, owner and group of every ancestor of ``paths`` (the paths themselves excluded)."""
    out = {}
    for path in paths:
        for parent in Path(path).resolve().parents:
            info = parent.stat()
            out[parent] = (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid)
    return out


def test_up_from_a_private_folder_changes_no_mode_or_owner_outside_its_own(session_dir: Path) -> None:
    """A checkout in a 0700 folder (like /root or mktemp -d): `up` works, and no directory outside the home
    and the service folder has its mode or owner changed."""
    private = Path(tempfile.mkdtemp(prefix="precompute-private-"))  # mode 0700
    try:
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        home = private / "checkout" / ".precompute"
        home.parent.mkdir()
        watched = [home, wheel_pg_install() / "bin" / "postgres", Path(default_redis_binary()), service_root()]
        before = modes_of_parents(*watched)
        stack = Stack(home)
        try:
            env = stack.up()
            after = modes_of_parents(*watched)
            changed = {p: (before[p], after.get(p)) for p in before if after.get(p) != before[p]}
            assert not changed, f"modes/owners changed outside our folders: {changed}"
            assert stat.S_IMODE(private.stat().st_mode) == 0o700
            with psycopg2.connect(libpq_url(env[ENV_APP_DB])) as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
            assert redis.Redis.from_url(env[ENV_REDIS]).ping()
            for own in (home / "lake", home / "models", stack.dagster_home):  # query logs, models, run logs: private
                assert stat.S_IMODE(own.stat().st_mode) == 0o700, own
            if os.geteuid() == 0:  # PostgreSQL's data lives in the service folder, owned by its user, 0700
                assert stack.postgres.data.is_relative_to(service_root())
                assert stat.S_IMODE(stack.postgres.data.stat().st_mode) == 0o700
        finally:
            (home / "models").mkdir(exist_ok=True)
            (home / "models" / "mine.pt").write_text("x")
            (home / "notes.txt").write_text("mine")  # not the stack's: a mistaken PRECOMPUTE_HOME was deleted whole
            with pytest.raises(StackError, match=f"refusing to purge {home}: it also holds notes.txt, which"):
                stack.purge()
            assert (home / "models" / "mine.pt").exists() and stack.redis.pid is not None  # nothing done
            (home / "notes.txt").unlink()
            stack.purge()
        assert stack.postgres.pid is None and stack.redis.pid is None
        assert not stack.postgres.data.exists() and not home.exists()
    finally:
        import shutil

        shutil.rmtree(private, ignore_errors=True)


def test_the_embedded_redis_is_a_supported_release(redis_server) -> None:
    name, version = server_version(default_redis_binary())
    assert (name == "valkey" and version >= (7, 2)) or (name == "redis" and version >= (7, 2)), (name, version)
    server = redis_server()
    client = redis.Redis.from_url(server.url)
    assert client.config_get("hash-max-listpack-value") == {"hash-max-listpack-value": "512"}
    assert server.info_version() == f"{name} {'.'.join(map(str, version))}"


def test_start_returns_only_when_redis_answers_after_loading_a_large_dataset(redis_server) -> None:
    """A restart replays the saved data; `start` must not return while Redis still replies LOADING."""
    server = redis_server(extra_config=("enable-debug-command local",))
    client = redis.Redis.from_url(server.url, socket_timeout=60)
    client.execute_command("DEBUG", "POPULATE", 2_000_000, "k", 64)
    client.bgrewriteaof()
    while client.info("persistence")["aof_rewrite_in_progress"]:
        pass
    server.stop()
    server.start()
    assert client.info("persistence")["loading"] == 0
    client.set("first-write", "ok")  # raised BusyLoadingError before `start` waited
    assert client.dbsize() == 2_000_001


def test_a_server_that_cannot_start_is_one_clear_error(tmp_path: Path) -> None:
    from precompute_assets.stack import RedisError

    busy = RedisServer(tmp_path / "a", free_port(), extra_config=("maxmemory not-a-size",))
    with pytest.raises(RedisError, match="failed|exited") as raised:
        busy.start(timeout_s=10)
    assert "\n" not in str(raised.value)  # the server's multi-line complaint, as one line
    missing = RedisServer(tmp_path / "b", free_port(), binary=str(tmp_path / "no-such-server"))
    with pytest.raises(RedisError, match="cannot run"):
        missing.start()


def test_a_port_held_by_another_program_is_one_clear_error(tmp_path: Path) -> None:
    import socket

    from precompute_assets.stack import PortTakenError

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        server = RedisServer(tmp_path / "redis", other.getsockname()[1])
        with pytest.raises(PortTakenError, match="in use by another program"):
            server.start()
    assert server.pid is None


@pytest.mark.skipif(os.geteuid() != 0, reason="the service folder is used only as root")
def test_a_moved_home_keeps_its_postgresql_data(session_dir: Path) -> None:
    import shutil

    first = session_dir / "moved-a"
    stack = Stack(first)
    env = stack.up()
    try:
        with psycopg2.connect(libpq_url(env[ENV_APP_DB])) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE survives (x int)")
        stack.down()
        shutil.move(first, session_dir / "moved-b")
        moved = Stack(session_dir / "moved-b")
        assert moved.postgres.runtime == stack.postgres.runtime
        env = moved.up()
        with psycopg2.connect(libpq_url(env[ENV_APP_DB])) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM survives")
            assert cur.fetchone() == (0,)
    finally:
        Stack(session_dir / "moved-b").purge() if (session_dir / "moved-b").exists() else stack.purge()


@pytest.mark.skipif(os.geteuid() != 0, reason="the service folder is used only as root")
def test_a_home_from_before_the_service_folder_keeps_its_postgresql_data(session_dir: Path) -> None:
    """Before PostgreSQL's data moved to the service folder, root's cluster lived in ``$PRECOMPUTE_HOME/postgres/data``
    (and no ``runtime`` file said where): `up` of such a home moves that cluster over instead of making an empty one."""
    home = session_dir / "home-before-service-folder"
    stack = Stack(home)
    env = stack.up()
    try:
        with psycopg2.connect(libpq_url(env[ENV_APP_DB])) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE survives (x int); INSERT INTO survives VALUES (1)")
        stack.down()
        shutil.move(stack.postgres.data, home / "postgres" / "data")  # the older version's layout
        (home / "postgres" / "runtime").unlink()
        env = Stack(home).up()
        with psycopg2.connect(libpq_url(env[ENV_APP_DB])) as conn, conn.cursor() as cur:
            cur.execute("SELECT x FROM survives")
            assert cur.fetchall() == [(1,)]
        assert not (home / "postgres" / "data").exists()
        assert Stack(home).postgres.data == stack.postgres.data
    finally:
        Stack(home).purge()


@pytest.mark.skipif(os.geteuid() != 0, reason="the service folder is used only as root")
def test_an_older_cluster_left_in_the_home_is_named_not_used_or_deleted(session_dir: Path, capsys, monkeypatch) -> None:
    """A home whose `up` (by a version that did not move it) already made a new cluster keeps it; the older one in
    ``$PRECOMPUTE_HOME/postgres/data`` is left where it is, and `up` says so and how to go back to it. While the
    older version's server still runs on it, it is not moved."""
    from precompute_assets.stack import StackError

    home = session_dir / "home-with-two-clusters"
    stack = Stack(home)
    try:
        stack.up()
        stack.down()
        legacy = home / "postgres" / "data"
        shutil.copytree(stack.postgres.data, legacy, symlinks=True)
        capsys.readouterr()
        Stack(home).up()
        warning = capsys.readouterr().err
        assert f"{legacy} holds PostgreSQL data of an older version" in warning and "precompute down" in warning
        assert (legacy / "global" / "pg_control").is_file()
        Stack(home).down()
        shutil.rmtree(stack.postgres.data / "global")  # no cluster in use: the older one would be moved, but ...
        monkeypatch.setattr("precompute_assets.stack.processes_naming", lambda marker: [4242])  # ... its server runs
        with pytest.raises(StackError, match="older version still runs on .*precompute down"):
            Stack(home).postgres._prepare_runtime()
        assert (legacy / "global" / "pg_control").is_file()
    finally:
        Stack(home).purge()


@pytest.mark.skipif(os.geteuid() != 0, reason="the service folder is used only as root")
def test_a_service_root_others_can_write_is_refused(tmp_path: Path, monkeypatch) -> None:
    from precompute_assets.stack import StackError

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("PRECOMPUTE_SERVICE_ROOT", str(shared))
    stack = Stack(tmp_path / "home")
    with pytest.raises(StackError, match="writable only by root"):
        stack.postgres.start()
    assert not any(shared.iterdir())  # nothing was created or chowned in it
    stack.redis.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the service folder is used only as root")
def test_a_service_root_under_a_folder_others_cannot_enter_is_refused_naming_it(tmp_path: Path) -> None:
    """initdb failed with a bare "Permission denied" on its own binary: the service user could not pass the 0700
    parent (pytest's tmp_path is under one)."""
    from precompute_assets.stack import StackError

    private = Path(tempfile.mkdtemp())  # 0700
    try:
        services = private / "services"
        with pytest.raises(StackError, match=rf"{private} \(mode 0700\) keeps embedded_postgres out"):
            PostgresServer(tmp_path / "pg", free_port(), services=services).binaries()
        # ... but a parent the service user enters by its group is fine (the mode bits of others alone refused it)
        os.chown(private, 0, ensure_system_user(PG_SYSTEM_USER).pw_gid)
        private.chmod(0o750)
        assert PostgresServer(tmp_path / "pg", free_port(), services=services).binaries().is_dir()
    finally:
        shutil.rmtree(private)


@pytest.mark.skipif(os.geteuid() != 0, reason="the binaries are copied only as root")
def test_a_copy_of_the_binaries_that_fails_says_so_in_one_line_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    """On a full disk shutil.Error listed every file it could not copy: a "one-line" error of 900 KB, and each
    attempt left its staging folder behind."""
    from precompute_assets.stack import StackError

    services = Path(tempfile.mkdtemp(dir=os.environ["PRECOMPUTE_SERVICE_ROOT"]))
    services.chmod(0o711)

    def full_disk(source, target, **kwargs):
        Path(target).mkdir(parents=True)
        (Path(target) / "part").write_bytes(b"x")
        raise shutil.Error([(f"{source}/{n}", f"{target}/{n}", "[Errno 28] No space left on device") for n in range(9)])

    monkeypatch.setattr(shutil, "copytree", full_disk)
    try:
        with pytest.raises(StackError) as error:
            PostgresServer(tmp_path / "pg", free_port(), services=services).binaries()
        assert str(error.value) == (
            f"cannot copy PostgreSQL's binaries into {services}: [Errno 28] No space left on device"
        )
        assert not list(services.iterdir())
    finally:
        shutil.rmtree(services)


def test_up_on_a_hung_embedded_redis_fails_in_one_line_instead_of_waiting(redis_server, monkeypatch) -> None:
    """A SIGSTOPped server accepts connections and never answers: `up` (and `dev`, `demo`, `bench`) waited its
    10-minute deadline without a word, as for a server loading its data (which answers LOADING at once)."""
    import signal

    from precompute_assets import stack as stack_module

    server = redis_server()
    monkeypatch.setattr(stack_module, "HUNG_REDIS_S", 1.0)
    os.kill(server.pid, signal.SIGSTOP)
    try:
        with pytest.raises(RedisError, match=rf"our Redis \(pid {server.pid}\) on port {server.port} has not answered"):
            RedisServer(server.dir, server.port).start(timeout_s=120)  # not "not ready after 120 s"
    finally:
        os.kill(server.pid, signal.SIGCONT)
    RedisServer(server.dir, server.port).start(timeout_s=30)  # running again: answers


def test_a_down_behind_another_up_of_the_home_says_it_waits(tmp_path: Path, capsys) -> None:
    """`down` behind a hung `up` of the same home blocked without a word."""
    import threading

    from precompute_assets.storage.files import exclusive_lock

    stack = Stack(tmp_path / "home")
    with exclusive_lock(stack.home / "stack.lock"):  # an up that holds it
        down = threading.Thread(target=stack.down)
        down.start()
        for _ in range(200):
            if "waiting for another up or down" in capsys.readouterr().err:
                break
            down.join(0.05)
        else:
            pytest.fail("down did not say it waits")
        assert down.is_alive()
    down.join(30)
    assert not down.is_alive()


def refuses_a_login_without_password(stack: Stack) -> bool:
    """Whether both embedded servers of ``stack`` refuse a client that has no password (any local account)."""
    try:
        psycopg2.connect(host="127.0.0.1", port=stack.postgres.port, user="postgres", dbname="postgres").close()
        return False
    except psycopg2.OperationalError as error:
        assert "no password supplied" in str(error)
    with redis.Redis(port=stack.redis.port) as bare:
        try:
            bare.ping()
            return False
        except redis.AuthenticationError:
            return True


def test_the_embedded_servers_ask_for_the_homes_password(stack: Stack) -> None:
    """PostgreSQL trusted every login on 127.0.0.1 and Redis had no password: any account of the machine was the
    database superuser (COPY ... TO PROGRAM ran as its server's user) and could flush the cache."""
    if not all(stack.embeds(v) for v in (ENV_REDIS, ENV_APP_DB)):
        pytest.skip("the environment names its own servers: nothing embedded to check")
    secret = stack.home / "secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    password = secret.read_text().strip()
    assert password in stack.env()[ENV_REDIS] and password in stack.env()[ENV_APP_DB]
    assert refuses_a_login_without_password(stack)
    # Redis's config holds the password and its AOF the cache: both were readable by every account
    assert stat.S_IMODE(stack.redis.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((stack.redis.dir / "redis.conf").stat().st_mode) == 0o600


def test_the_embedded_postgresql_hashes_its_random_password_with_few_scram_iterations(stack: Stack) -> None:
    """Dagster connects anew for every event it writes; 4096 iterations (PostgreSQL's default) cost each connect 2 ms
    and add no strength to a 192-bit random password."""
    if not stack.embeds(ENV_APP_DB):
        pytest.skip("the environment names its own PostgreSQL: its roles are not ours to hash")
    with psycopg2.connect(libpq_url(stack.env()[ENV_APP_DB])) as conn, conn.cursor() as cur:
        cur.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'")
        (verifier,) = cur.fetchone()
        cur.execute("SHOW scram_iterations")  # the server's default stays: roles an operator adds get its count
        (default,) = cur.fetchone()
    conn.close()
    assert verifier.startswith(f"SCRAM-SHA-256${SCRAM_ITERATIONS}:") and default == "4096"


def test_a_secret_that_no_longer_matches_is_named(tmp_path: Path) -> None:
    """A deleted or replaced secret made a new password the cluster did not know: `up` said only that PostgreSQL
    refused the login, and an empty one (a write cut short) said to delete the home."""
    stack = Stack(tmp_path / "home")
    secret = stack.home / "secret"
    try:
        stack.up()
        stack.down()
        kept = secret.read_text()
        secret.write_text("Another-password-of-32-characters\n")
        with pytest.raises(StackError, match=f"{secret} no longer holds the password its cluster was given"):
            Stack(stack.home).up()
        secret.write_text("")
        with pytest.raises(StackError, match=rf"{secret} does not hold this home's password \(empty or changed\)"):
            Stack(stack.home)
        secret.write_text(kept)
    finally:
        Stack(stack.home).purge()


@pytest.mark.skipif(os.geteuid() != 0, reason="initdb runs as the service user only as root")
def test_initdb_never_follows_what_the_service_user_put_at_its_password_file(tmp_path: Path) -> None:
    """The runtime folder is the service user's: root followed a symlink it planted at .pwfile, and truncated, wrote
    the password into and handed over whatever file it named."""
    services = Path(tempfile.mkdtemp(dir=os.environ["PRECOMPUTE_SERVICE_ROOT"]))
    services.chmod(0o711)
    victim = tmp_path / "victim"
    victim.write_text("ORIGINAL")
    server = PostgresServer(tmp_path / "pg", free_port(), services=services, password="p" * 24)
    try:
        server._prepare_runtime()
        (server.runtime / ".pwfile").symlink_to(victim)
        server._initdb()
        assert victim.read_text() == "ORIGINAL" and victim.stat().st_uid == 0
        assert (server.data / "global" / "pg_control").exists()
    finally:
        shutil.rmtree(services)


def test_a_home_made_before_passwords_asks_for_one_after_its_next_up(tmp_path: Path, monkeypatch, capsys) -> None:
    """A cluster made with --auth=trust and a Redis started without requirepass, both running, get the home's
    password at the next `up` and keep it across a restart; also from a shell that exported the old URLs (they
    counted as external servers, so the upgrade was skipped), and saying that running clients must restart."""
    home = tmp_path / "home"
    with monkeypatch.context() as before:
        before.setattr(Stack, "_secret", lambda self: None)  # as before passwords
        old = Stack(home)
    try:
        old.up()
        assert not refuses_a_login_without_password(old)
        for name, value in old.env().items():  # `eval "$(precompute env)"` of that version
            monkeypatch.setenv(name, value)
        new = Stack(home)
        assert new.embeds(ENV_REDIS) and new.embeds(ENV_APP_DB) and new.embeds("DAGSTER_PG_URL")
        capsys.readouterr()
        new.up()  # the servers still run: given the password in place
        said = capsys.readouterr().err
        assert "this home's Redis now asks for the password" in said and "PostgreSQL now asks" in said, said
        assert new.redis.pid == old.redis.pid and new.postgres.pid == old.postgres.pid
        assert refuses_a_login_without_password(new)
        assert stat.S_IMODE(new.redis.dir.stat().st_mode) == 0o700  # its AOF was readable by every account
        with psycopg2.connect(libpq_url(new.env()[ENV_APP_DB])) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
        new.down()
        new.up()
        assert refuses_a_login_without_password(new)
        assert redis.Redis.from_url(new.env()[ENV_REDIS]).ping()
    finally:
        Stack(home).purge()


def test_a_redis_binary_of_another_name_is_known_as_ours(tmp_path: Path, monkeypatch) -> None:
    """A PRECOMPUTE_REDIS_SERVER named neither redis-server nor valkey-server (keydb-server, a wrapper) was never
    taken for ours: `up` said another program answered, and left the server it had started, which `down` missed."""
    renamed = tmp_path / "bin" / "kv-server"
    renamed.parent.mkdir()
    renamed.symlink_to(default_redis_binary())
    monkeypatch.setenv("PRECOMPUTE_REDIS_SERVER", str(renamed))
    stack = Stack(tmp_path / "home")
    try:
        stack.up(postgres=False)
        pid = stack.redis.pid
        assert pid is not None and b"kv-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    finally:
        stack.down()
    assert stack.redis.pid is None and not _running(pid)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_an_up_that_fails_after_postgres_started_stops_both_servers(tmp_path: Path, monkeypatch) -> None:
    """A database `up` could not make (or check) failed it with PostgreSQL left running."""
    from precompute_assets.stack import StackError

    def refuse(self, *names):
        raise StackError("cannot make the databases")

    monkeypatch.setattr(PostgresServer, "ensure_databases", refuse)
    stack = Stack(tmp_path / "home")
    try:
        with pytest.raises(StackError, match="cannot make the databases"):
            stack.up()
        assert stack.postgres.pid is None and stack.redis.pid is None
    finally:
        stack.purge()


def test_the_embedded_redis_has_bounded_memory_and_evicts_only_keys_with_a_ttl(redis_server, monkeypatch):
    monkeypatch.setenv("PRECOMPUTE_REDIS_MAXMEMORY", "64MB")
    server = redis_server()
    client = redis.Redis.from_url(server.url)
    assert client.config_get("maxmemory") == {"maxmemory": str(64 * 1024 * 1024)}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "volatile-lru"}
    monkeypatch.setenv("PRECOMPUTE_REDIS_MAXMEMORY", "lots")
    stopped = RedisServer(Path(tempfile.mkdtemp()), free_port())  # down and status need it: it was refused here
    assert stopped.pid is None
    with pytest.raises(RedisError, match="PRECOMPUTE_REDIS_MAXMEMORY='lots' is not a size"):
        stopped.start()
    assert not stopped.dir.joinpath("redis.conf").exists()


def test_a_maxmemory_set_after_the_embedded_redis_started_is_applied_by_up(redis_server, monkeypatch):
    """PRECOMPUTE_REDIS_MAXMEMORY was read only when the server started: setting it and running `up` again left the
    running server at its old limit, silently; unset, the running server's limit is left as it is."""
    monkeypatch.setenv("PRECOMPUTE_REDIS_MAXMEMORY", "64MB")
    server = redis_server()
    client = redis.Redis.from_url(server.url)
    monkeypatch.setenv("PRECOMPUTE_REDIS_MAXMEMORY", "32mb")
    again = RedisServer(server.dir, server.port)
    again.start()
    assert again.pid == server.pid  # the same server, not restarted
    assert client.config_get("maxmemory") == {"maxmemory": str(32 * 1024 * 1024)}
    monkeypatch.delenv("PRECOMPUTE_REDIS_MAXMEMORY")
    RedisServer(server.dir, server.port).start()
    assert client.config_get("maxmemory") == {"maxmemory": str(32 * 1024 * 1024)}


def test_a_stale_pid_file_naming_another_homes_server_is_not_ours(stack: Stack, session_dir: Path) -> None:
    """After a reboot, a stale pid file may name another home's server (same program, same user): `status` must
    not count it, `down` must not stop it, and `up` must start this home's own server."""
    other_pg, other_redis = stack.postgres.pid, stack.redis.pid
    assert other_pg is not None and other_redis is not None
    home = Stack(session_dir / "stale-pids")
    try:
        home.up()
        home.down()
        (home.postgres.data / "postmaster.pid").write_text(f"{other_pg}\n{home.postgres.data}\n")
        (home.redis.dir / "redis.pid").write_text(f"{other_redis}\n")
        assert home.postgres.pid is None and home.redis.pid is None
        assert not any(service.running for service in home.status())
        home.down()
        assert stack.postgres.pid == other_pg and stack.redis.pid == other_redis  # still running
        env = home.up()
        assert home.postgres.pid not in (None, other_pg) and home.redis.pid not in (None, other_redis)
        with psycopg2.connect(libpq_url(env[ENV_APP_DB])) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        home.purge()
    assert stack.postgres.pid == other_pg and stack.redis.pid == other_redis


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv (util-linux)")
def test_servers_are_recognised_without_the_right_to_read_their_working_directory(session_dir: Path) -> None:
    """As root in a default container (no CAP_SYS_PTRACE) the working directory of PostgreSQL, which runs as its
    service user, cannot be read: status must still see the server, and a second up must neither take it for
    stopped nor delete its lock file (PostgreSQL shuts down within a minute when it finds its lock file gone)."""
    home = Stack(session_dir / "no-ptrace")
    try:
        env = home.up()
        pg, lock = home.postgres.pid, home.postgres.lock_file.read_text()
        script = (
            "import sys; from pathlib import Path; from precompute_assets.stack import Stack; "
            "s = Stack(Path(sys.argv[1])); print(s.postgres.pid, s.redis.pid); s.up(); s.up(); print(s.postgres.pid)"
        )
        without_ptrace = ["setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace"]
        done = subprocess.run([*without_ptrace, sys.executable, "-c", script, str(home.home)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [str(pg), str(home.redis.pid), str(pg)]
        assert home.postgres.lock_file.read_text() == lock  # untouched
        with psycopg2.connect(libpq_url(env[ENV_APP_DB])) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        home.purge()


def test_a_home_and_service_folder_with_spaces_work(session_dir: Path, redis_server) -> None:
    """Paths are quoted in the Redis config (unquoted, a space split them: FATAL CONFIG FILE ERROR) and in pg_ctl."""
    quoted = RedisServer(session_dir / 'a "quoted" \\ folder', free_port())
    try:
        quoted.start()
        assert quoted.pid is not None and redis.Redis.from_url(quoted.url).ping()
    finally:
        quoted.stop()
    odd = session_dir / "a folder with spaces"
    stack = Stack(odd / "home", services=odd / "service root")
    try:
        env = stack.up()
        assert redis.Redis.from_url(env[ENV_REDIS]).ping()
        assert stack.redis.pid is not None and stack.postgres.pid is not None
        with psycopg2.connect(libpq_url(env[ENV_APP_DB])) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        stack.purge()
    assert stack.redis.pid is None and stack.postgres.pid is None


def test_up_redoes_an_initdb_that_was_killed(session_dir: Path) -> None:
    """An `up` killed during the first initdb leaves PG_VERSION without global/pg_control (pg_ctl then failed on
    every later `up`), or a half-made staging folder: the next `up` makes the cluster anew."""
    stack = Stack(session_dir / "killed-initdb")
    try:
        stack.postgres._prepare_runtime()
        (stack.postgres.data / "PG_VERSION").write_text("18\n")
        (stack.postgres.data / "base").mkdir()
        (stack.postgres.runtime / "data.initdb" / "global").mkdir(parents=True)
        env = stack.up()
        with psycopg2.connect(libpq_url(env[ENV_APP_DB])) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        assert not (stack.postgres.runtime / "data.initdb").exists()
        (kept,) = stack.postgres.runtime.glob("data.without-pg_control.*")  # moved aside, never deleted
        assert (kept / "PG_VERSION").read_text() == "18\n"
        if os.geteuid() == 0:
            assert stat.S_IMODE(stack.postgres.data.stat().st_mode) == 0o700
            assert stack.postgres.data.stat().st_uid != 0
    finally:
        stack.purge()


def test_a_first_up_leaves_no_folder_moved_aside(session_dir: Path) -> None:
    """The first `up` of a home made its data folder empty, then initdb's rename took it for the leftover of a
    killed initdb: every new deployment kept an empty `data.without-pg_control.<time>` beside its cluster, which
    reads as a cluster that lost its pg_control. An empty folder holds nothing to keep."""
    stack = Stack(session_dir / "first-up")
    try:
        stack.up()
        assert stack.postgres.pid is not None and (stack.postgres.data / "global" / "pg_control").is_file()
        assert list(stack.postgres.runtime.glob("data.without-pg_control.*")) == []
    finally:
        stack.purge()


def test_up_right_after_a_postmaster_was_killed_starts_it_again(session_dir: Path) -> None:
    """A postmaster killed with kill -9 stays a zombie until it is reaped, and PostgreSQL refuses a lock file whose
    PID exists: `up` right then takes the zombie's lock file for stale instead of failing once."""
    from precompute_assets.stack import process_state

    stack = Stack(session_dir / "zombie")
    try:
        stack.up()
        stack.down()
        as_user = {"user": PG_SYSTEM_USER} if os.geteuid() == 0 else {}  # PostgreSQL ignores others' processes
        killed = subprocess.Popen(["sleep", "600"], **as_user)
        killed.kill()
        while process_state(killed.pid) != "Z":  # our own unreaped child stands for the killed postmaster
            time.sleep(0.01)
        (stack.postgres.data / "postmaster.pid").write_text(f"{killed.pid}\n{stack.postgres.data}\n")
        stack.up()  # before the zombie is reaped
        assert stack.postgres.pid is not None and process_state(killed.pid) == "Z"
        killed.wait()
    finally:
        stack.purge()


def test_a_postgresql_that_cannot_start_says_why_in_one_line(session_dir: Path) -> None:
    """pg_ctl only says "Examine the log output": the error carries the server's FATAL line, and a port held by
    another program is named as such."""
    import socket

    from precompute_assets.stack import StackError

    stack = Stack(session_dir / "cannot-start")
    try:
        stack.up()
        stack.down()
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the stopped server's sockets may linger
            other.bind(("127.0.0.1", stack.postgres.port))
            other.listen()
            with pytest.raises(StackError, match=f"port {stack.postgres.port} is in use by another program"):
                stack.postgres.start()
        # A configuration PostgreSQL refuses: pg_ctl fails, and the error is the log's FATAL line, on one line.
        with open(stack.postgres.data / "postgresql.conf", "a") as conf:
            conf.write("shared_buffers = nonsense\n")
        refused = r'FATAL: +configuration file ".*postgresql.conf" contains errors'
        with pytest.raises(StackError, match=refused) as raised:
            stack.postgres.start()
        assert "\n" not in str(raised.value)
    finally:
        stack.purge()


def test_up_moves_off_a_port_taken_while_postgresql_was_being_made(session_dir: Path, capsys, monkeypatch) -> None:
    """A new home's ports are chosen free, then its PostgreSQL runs ``initdb`` for seconds: a server started meanwhile
    (another test's, on a busy CI machine) took the port, and the first ``up`` failed "in use by another program".
    It now moves to another port, as it does for one taken before the ``up``."""
    import socket

    from precompute_assets.stack import PostgresServer

    stack = Stack(session_dir / "taken-during-initdb")
    chosen, real_initdb = stack.postgres.port, PostgresServer._initdb
    with socket.socket() as squatter:

        def initdb_then_taken(server: PostgresServer) -> None:
            real_initdb(server)
            squatter.bind(("127.0.0.1", chosen))
            squatter.listen()

        monkeypatch.setattr(PostgresServer, "_initdb", initdb_then_taken)
        try:
            env = stack.up()
            assert stack.postgres.port != chosen and f":{stack.postgres.port}/" in env["PRECOMPUTE_APP_DB_URL"]
            assert Stack(stack.home).postgres.port == stack.postgres.port  # recorded for the home
            assert f"port {chosen} is in use by another program; PostgreSQL moves" in capsys.readouterr().err
        finally:
            stack.purge()


def test_up_moves_a_server_whose_port_another_program_took(session_dir: Path, capsys, monkeypatch) -> None:
    """Ports are chosen once per home; when another program holds one at the next `up` (after a reboot, say), that
    server moves to a free port, recorded for the next Stack of the home, and the move is said on stderr. A
    server that then fails to start leaves no Redis of this `up` running. URLs exported before the move still name
    the home's servers, and a Stack made before it (a second `up` started at once) uses the new ports."""
    import socket

    from precompute_assets.stack import StackError

    home = session_dir / "moved-ports"
    stack = Stack(home)
    try:
        stack.up()
        exported = stack.env()  # `eval "$(precompute env)"` in some shell
        stack.down()
        stale = Stack(home)  # read its ports before the move
        old_redis, old_pg = stack.redis.port, stack.postgres.port
        with socket.socket() as redis_squatter, socket.socket() as pg_squatter:
            for squatter, port in ((redis_squatter, old_redis), (pg_squatter, old_pg)):
                squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the stopped servers' may linger
                squatter.bind(("127.0.0.1", port))
                squatter.listen()
            env = Stack(home).up()
        moved = Stack(home)
        assert moved.redis.port != old_redis and moved.postgres.port != old_pg
        assert str(moved.redis.port) in env["PRECOMPUTE_REDIS_URL"] and moved.redis.pid is not None
        assert f":{moved.postgres.port}/" in env["PRECOMPUTE_APP_DB_URL"] and moved.postgres.pid is not None
        said = capsys.readouterr().err
        assert f"port {old_redis} is in use by another program; Redis moves to port {moved.redis.port}" in said
        assert f"port {old_pg} is in use by another program; PostgreSQL moves to port {moved.postgres.port}" in said
        assert stale.up() == env  # it pinged the old ports, where another program sat, until its deadline
        for name in (ENV_REDIS, ENV_APP_DB, "DAGSTER_PG_URL"):
            monkeypatch.setenv(name, exported[name])
        after = Stack(home)  # the old URLs counted as external servers, which no longer answered
        assert after.env() == env and after.embeds(ENV_REDIS) and after.embeds(ENV_APP_DB)
        # `status` called the moved servers healthy; other processes with the old URLs reached the squatter (h_ops)
        warned = {service.name: service.warnings for service in after.status()}
        assert any(f"PRECOMPUTE_REDIS_URL names port {old_redis}, but" in w for w in warned["redis"]), warned
        assert any(f"DAGSTER_PG_URL names port {old_pg}, but" in w for w in warned["postgres"]), warned
        assert any(f"PRECOMPUTE_APP_DB_URL names port {old_pg}, but" in w for w in warned["postgres"]), warned
        assert not any("names port" in w for w in sum((s.warnings for s in moved.status()), ())), moved.status()
        # `cache stats` and `cache invalidate` too, which timed out on the old port (h_readme)
        from precompute_assets.tools.cli import main

        monkeypatch.setenv("PRECOMPUTE_HOME", str(home))
        assert main(["cache", "stats", "--json", "--kind", "ctr"]) == 0, capsys.readouterr().err
        for name in (ENV_REDIS, ENV_APP_DB, "DAGSTER_PG_URL"):
            monkeypatch.delenv(name)
        moved.down()
        with open(moved.postgres.data / "postgresql.conf", "a") as conf:
            conf.write("shared_buffers = nonsense\n")
        with pytest.raises(StackError, match="contains errors"):
            moved.up()
        assert moved.redis.pid is None and not reachable(moved.redis.url)
    finally:
        Stack(home).purge()


def test_a_url_of_the_homes_server_naming_another_database_is_refused(tmp_path: Path, monkeypatch) -> None:
    """A URL with the home's password counted as the home's own whatever it named: Redis index 3 or an app database
    `nodb` was replaced by the home's, so Dagster published to db 0 while a service on the user's URL read db 3."""
    home = tmp_path / "home"
    own = Stack(home).env()
    monkeypatch.setenv(ENV_REDIS, own[ENV_REDIS].removesuffix("/0") + "/3")
    with pytest.raises(StackError, match=f"{ENV_REDIS} names this home's server but database 3, where the embedded"):
        Stack(home)
    monkeypatch.setenv(ENV_REDIS, own[ENV_REDIS].removesuffix("/0"))  # no index: 0, the home's own
    monkeypatch.setenv(ENV_APP_DB, own[ENV_APP_DB].rsplit("/", 1)[0] + "/nodb")
    with pytest.raises(StackError, match="but database nodb, where the embedded stack serves precompute"):
        Stack(home)
    monkeypatch.setenv(ENV_APP_DB, own[ENV_APP_DB])
    assert Stack(home).embeds(ENV_REDIS) and Stack(home).embeds(ENV_APP_DB)
    # A typo'd or Sentinel scheme on the home's password and port is the user's URL, checked as such, not the home's
    # silently (h_readme: `up` exited 0 on redi://...)
    for scheme in ("redi", "redis+sentinel"):
        monkeypatch.setenv(ENV_REDIS, scheme + own[ENV_REDIS].removeprefix("redis"))
        assert not Stack(home).embeds(ENV_REDIS)


def test_a_redis_whose_pid_file_is_empty_is_still_ours(redis_server) -> None:
    """On a full disk Redis starts but writes an empty pid file: it is still our server (it runs in our folder and
    reports its process id), so `up` does not call it another program's and `down` stops it."""
    server = redis_server()
    pid = server.pid
    (server.dir / "redis.pid").write_text("")
    assert server.pid == pid
    server.start(timeout_s=10)  # said "another program answers on port ..." before
    server.stop()
    assert server.pid is None and not reachable(server.url)


def test_a_url_of_the_homes_server_keeps_its_options(tmp_path: Path, monkeypatch) -> None:
    """A user's URL of the home's own server was replaced by the bare embedded one: its options (a
    ``socket_timeout``, an app database's ``connect_timeout``) were gone from what `env` exports and Dagster used."""
    home = tmp_path / "home"
    own = Stack(home).env()
    monkeypatch.setenv(ENV_REDIS, own[ENV_REDIS] + "?socket_timeout=2&health_check_interval=5")
    monkeypatch.setenv(ENV_APP_DB, own[ENV_APP_DB] + "?connect_timeout=3")
    stack = Stack(home)
    assert stack.embeds(ENV_REDIS) and stack.embeds(ENV_APP_DB)
    env = stack.env()
    assert env[ENV_REDIS] == own[ENV_REDIS] + "?socket_timeout=2&health_check_interval=5"
    assert env[ENV_APP_DB] == own[ENV_APP_DB] + "?connect_timeout=3"
    assert env["DAGSTER_PG_URL"] == own["DAGSTER_PG_URL"]


def test_a_corrupt_aof_is_refused_with_a_repair_that_runs_here(tmp_path: Path) -> None:
    """A byte flipped inside the AOF (not a cut tail, which Redis loads) stopped `up` with Valkey's own advice, to run
    ./valkey-check-aof, which the embedded wheel does not ship; the repair it names now runs as given."""
    from precompute_assets.stack import RedisError, RedisServer, free_port

    server = RedisServer(tmp_path / "redis", free_port(), "aof-pw-0123456789")
    server.start(timeout_s=30)
    client = redis.Redis.from_url(server.url)
    for i in range(2000):
        client.set(f"k{i}", "v" * 50)
    client.close()
    server.stop()
    (incremental,) = (tmp_path / "redis" / "appendonlydir").glob("*.incr.aof")
    data = bytearray(incremental.read_bytes())
    middle = data.index(b"\n*", len(data) // 2) + 1
    data[middle : middle + 1] = b"X"  # a command's array marker, mid-file
    incremental.write_bytes(bytes(data))
    with pytest.raises(RedisError, match="Bad file format reading the append only file") as refused:
        server.start(timeout_s=30)
    repair = str(refused.value).split("then run: ")[1].split(" (it cuts")[0]
    done = subprocess.run(repair, shell=True, input="y\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Successfully truncated AOF" in done.stdout, done.stdout + done.stderr
    server.start(timeout_s=30)
    try:
        client = redis.Redis.from_url(server.url)
        assert 0 < client.dbsize() < 2000 and client.get("k0") == b"v" * 50  # the writes before the bad record
        client.close()
    finally:
        server.stop()


def test_a_url_without_a_port_is_reached_where_its_client_connects(monkeypatch) -> None:
    """``redis://:pw@host/0`` or ``postgresql://u:pw@host/db``, as production URLs on the default port are written, was
    "unreachable" (port 0): ``up`` and every command that runs it refused a server the serving client used fine. A
    PostgreSQL URL's port is libpq's: its ``port`` parameter over the URL's, then ``PGPORT``, then 5432; and libpq's
    failover form lists several hosts, of which any may answer (the first is often the one that failed)."""
    import socket

    monkeypatch.delenv("PGPORT", raising=False)
    monkeypatch.delenv("PGHOST", raising=False)
    assert service_addresses("redis://:pw@db.internal/0") == [("db.internal", 6379)]
    assert service_addresses("rediss://db.internal") == [("db.internal", 6379)]
    assert service_addresses("postgresql+psycopg2://u:pw@db.internal/app") == [("db.internal", 5432)]
    assert service_addresses("postgresql://u@db.internal:1/app?port=6432") == [("db.internal", 6432)]  # libpq's order
    assert service_addresses("postgresql://u@h/app?host=a,b&port=5999,5432") == [("a", 5999), ("b", 5432)]
    assert service_addresses("postgresql://u@h/app?host=a,b&port=6000") == [("a", 6000), ("b", 6000)]
    monkeypatch.setenv("PGPORT", "6543")
    assert service_addresses("postgresql://u@db.internal/app") == [("db.internal", 6543)]
    assert service_addresses("postgresql://u@db.internal:5433/app") == [("db.internal", 5433)]
    with socket.socket() as listener:  # a PostgreSQL that only PGPORT, the port parameter or a second host names
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        monkeypatch.setenv("PGPORT", str(port))
        assert reachable("postgresql://u:pw@127.0.0.1/app") and reachable(f"postgresql://u@127.0.0.1:1/app?port={port}")
        down = free_port()
        failover = f"postgresql://u@127.0.0.1/app?host=127.0.0.1,127.0.0.1&port={down},{port}"
        assert reachable(failover) and not reachable(f"postgresql://u@127.0.0.1/app?port={down}")
