"""The PostgreSQL helpers against the real embedded server, when the server ends a connection mid-work."""

from __future__ import annotations

import io

import psycopg2
import pytest

from precompute_assets.storage.postgres import connect, copy_in, libpq_url, transaction


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
