"""The PostgreSQL helpers against the real embedded server, when the server ends a connection mid-work."""

from __future__ import annotations

import io
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest

from precompute_assets.storage.documents import DocumentStore
from precompute_assets.storage.embeddings import EmbeddingStore
from precompute_assets.storage.postgres import (
    KEEPALIVES,
    TCP_USER_TIMEOUT_MS,
    connect,
    copy_in,
    libpq_url,
    scratch_database,
    transaction,
)


def terminate(url: str, pid: int) -> None:
    admin = connect(libpq_url(url))
    try:
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
    finally:
        admin.close()


class EndedMidCopy(io.RawIOBase):
    """COPY data whose second read has the server end the connection that reads it."""

    def __init__(self, url: str, pid: int) -> None:
        self.url, self.pid, self.reads = url, pid, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        if self.reads == 2:
            terminate(self.url, self.pid)
        return b"x\n" * 20_000 if self.reads < 50 else b""


def test_a_copy_the_server_ends_raises_the_servers_reason_and_prints_nothing(app_db_url: str, capsys) -> None:
    url = libpq_url(app_db_url)
    with pytest.raises(psycopg2.OperationalError) as raised, transaction(url) as conn, conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE t (a TEXT)")
        copy_in(cur, "COPY t FROM STDIN", EndedMidCopy(app_db_url, conn.get_backend_pid()))
    assert str(raised.value).startswith("the server ended the COPY: terminating connection due to administrator")
    assert "(AdminShutdown)" in str(raised.value)
    assert capsys.readouterr().err == ""


def test_a_copy_passes_on_what_it_printed(app_db_url: str, capsys) -> None:
    with transaction(libpq_url(app_db_url)) as conn, conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE t (a TEXT)")
        copy_in(cur, "COPY t FROM STDIN", io.BytesIO(b"a\nb\n"))
        cur.execute("SELECT count(*) FROM t")
        assert cur.fetchone() == (2,)
    assert capsys.readouterr().err == ""


def test_a_connection_the_server_ended_raises_its_own_error_not_the_rollbacks(app_db_url: str) -> None:
    # Rolling back on a closed connection raises InterfaceError ("connection already closed"), which used to
    # replace the error that says what happened.
    url = libpq_url(app_db_url)
    with pytest.raises(psycopg2.OperationalError, match="closed the connection"), transaction(url) as conn:
        terminate(app_db_url, conn.get_backend_pid())
        with conn.cursor() as cur:
            cur.execute("SELECT 1")


def test_a_transaction_commits_on_success_and_rolls_back_on_error(app_db_url: str) -> None:
    url = libpq_url(app_db_url)
    with transaction(url) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS tx_probe (a INT)")
        cur.execute("TRUNCATE tx_probe")
    with pytest.raises(ZeroDivisionError), transaction(url) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO tx_probe VALUES (1)")
        1 / 0  # noqa: B018
    with transaction(url) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO tx_probe VALUES (2)")
    with transaction(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT array_agg(a) FROM tx_probe")
        assert cur.fetchone() == ([2],)
        cur.execute("DROP TABLE tx_probe")


STORES = {"documents": lambda url: DocumentStore(url), "embeddings": lambda url: EmbeddingStore(url)}


@pytest.mark.parametrize("store", sorted(STORES))
def test_first_loads_started_together_all_create_the_schema(app_db: str, store: str) -> None:
    """Loaders started at once on a fresh database (a corpus loaded shard by shard in parallel) each create the
    tables: before, concurrent CREATE ... IF NOT EXISTS collided in the catalog and all but one failed with
    UniqueViolation on pg_type_typname_nsp_index (9 of 10 rounds of 4)."""
    for round_ in range(5):
        with scratch_database(app_db, f"fresh{round_}") as url:
            start = threading.Barrier(4)

            def create(start=start, url=url) -> None:
                start.wait()
                STORES[store](url).ensure_schema()

            with ThreadPoolExecutor(4) as pool:
                for future in [pool.submit(create) for _ in range(4)]:
                    future.result()


@pytest.mark.parametrize("store", sorted(STORES))
def test_an_existing_schema_is_not_locked_behind_open_writes(app_db: str, store: str, monkeypatch) -> None:
    """ensure_schema (every docs load, sync, the documents_changed sensor's tick) while a load writes the tables:
    it finds them and returns. Before, CREATE INDEX IF NOT EXISTS waited for the table's share lock, i.e. for the
    whole load, so every sensor tick during a load of minutes timed out; here a lock_timeout makes that wait fail."""
    STORES[store](app_db).ensure_schema()
    table = "documents" if store == "documents" else "embedding_failures"
    writer = connect(app_db)
    try:
        with writer.cursor() as cur:  # a load in progress: its transaction holds the table's RowExclusiveLock
            cur.execute(f"LOCK TABLE {table} IN ROW EXCLUSIVE MODE")
        monkeypatch.setenv("PGOPTIONS", "-c lock_timeout=3000")  # libpq's: every new connection of the store
        STORES[store](app_db).ensure_schema()
    finally:
        writer.close()


@pytest.mark.parametrize("query", ["", "?keepalives_idle=5"])
def test_a_connection_probes_a_silent_server_within_a_minute(app_db_url: str, query: str) -> None:
    """A server gone without closing its connections (a failover, a lost host) is noticed by TCP keepalive probes:
    the kernel's settings on a real connection, after 30 s of silence (or the URL's own), not the system's two
    hours, which left a load or sync waiting for an answer that never came."""
    conn = connect(app_db_url + query)
    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        with sock:
            idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
            probes = (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                      sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))  # fmt: skip
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    finally:
        conn.close()
    assert idle == (5 if query else KEEPALIVES["keepalives_idle"])
    assert probes == (KEEPALIVES["keepalives_interval"], KEEPALIVES["keepalives_count"])
    assert idle + probes[0] * probes[1] <= 60


@pytest.mark.parametrize("query", ["", "?tcp_user_timeout=5000"])
def test_a_connection_gives_up_on_writes_a_silent_server_never_acknowledges_within_a_minute(
    app_db_url: str, query: str
) -> None:
    """Keepalive probes start only on a connection with nothing in flight: a load still sending rows (COPY) or a
    statement just sent when the server vanished waits for TCP's retransmissions to give up, about 15 minutes by the
    system's default, however the keepalives are set. libpq's tcp_user_timeout bounds that wait."""
    conn = connect(app_db_url + query)
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            timeout_ms = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
    finally:
        conn.close()
    assert timeout_ms == (5000 if query else TCP_USER_TIMEOUT_MS) and 0 < TCP_USER_TIMEOUT_MS <= 60_000


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:s3cret%zz@127.0.0.1:1/app",  # a '%' that is no escape: libpq quotes the password
        "postgresql+psycopg2://app:s3cret@[::1/app",  # an unclosed IPv6 bracket: libpq quotes the whole URL
        "postgresql://app:s3c@ret@127.0.0.1:1/app",  # libpq took 'ret@127.0.0.1' for the host: "could not translate"
        "postgresql://app:s3c/ret@127.0.0.1:1/app",  # ... and 's3c' for the port: 'invalid integer value "s3c"'
    ],
)
def test_a_url_libpq_cannot_read_is_refused_without_its_password(url: str) -> None:
    """libpq's "invalid dsn" error quoted the URL's password, which `up`, `status` and a failed run then showed."""
    with pytest.raises(psycopg2.ProgrammingError, match="invalid dsn") as refused:
        connect(url)
    assert "s3c" not in str(refused.value) and "ret@" not in str(refused.value), refused.value


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:s3cr%zz?et@127.0.0.1:1/app",  # libpq reads the user info to its '@', past the '?'
        "postgresql://app:s3cr%zz#et@127.0.0.1:1/app",
        "postgresql://app:s3c?r@et@127.0.0.1:1/app",  # ... and took 'et@127.0.0.1' for the host
    ],
)
def test_a_question_mark_or_hash_in_the_password_is_never_shown(url: str) -> None:
    """The user info was read only to the first '?' or '#': libpq's 'invalid percent-encoded token' quoted such a
    password whole, and one with an '@' after its '?' passed, for libpq to name the rest of it as the host."""
    with pytest.raises(psycopg2.ProgrammingError, match="invalid dsn") as refused:
        connect(url)
    assert "s3c" not in str(refused.value) and "et@" not in str(refused.value), refused.value


@pytest.mark.parametrize(
    "query", ["?password=s3cret%zz", "?sslmode=require&password=s3cret%zz", "?sslpassword=s3cret%zz&sslmode=require"]
)
def test_a_password_parameter_libpq_cannot_read_is_never_shown(query: str) -> None:
    """Only the user info's password was taken out of libpq's errors: a password given as a parameter, whose '%' is
    no escape, was quoted whole ('invalid percent-encoded token: "s3cret%zz"') by `up`, `status` and a failed run."""
    with pytest.raises(psycopg2.ProgrammingError, match="invalid dsn") as refused:
        connect(f"postgresql://app@127.0.0.1:1/app{query}")
    assert "s3cret" not in str(refused.value), refused.value


def test_an_at_sign_in_a_query_value_is_no_user_info() -> None:
    """``?user=me@corp`` (an Azure-style login) is a parameter, not a password to refuse: libpq reads it so."""
    with pytest.raises(psycopg2.OperationalError) as refused:  # nothing listens on port 1
        connect("postgresql://127.0.0.1:1/app?user=me@corp")
    assert "invalid dsn" not in str(refused.value), refused.value
