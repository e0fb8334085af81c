"""PostgreSQL helpers shared by the stack, the document store, the embedding store and the tests."""

from __future__ import annotations

import contextlib
import io
import sys
import uuid
from collections.abc import Iterator, Sequence
from typing import IO

import psycopg2

from ..serving.urls import split_userinfo


def libpq_url(url: str) -> str:
    """A SQLAlchemy-style ``postgresql+psycopg2://...`` URL in the form psycopg2.connect accepts."""
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)


CONNECT_TIMEOUT_S = 10  # a server that accepts the connection but never answers (not PostgreSQL) fails, not hangs
# A server that vanishes without closing its connections (a failover to a standby, a lost host or network) sends
# nothing more: a client waiting for its answer noticed only after the system's TCP keepalive, over two hours by
# default. Probed after 30 s of silence, 3 probes 10 s apart, the connection fails in about a minute instead (a busy
# server's kernel still answers the probes, so a long statement is not cut short).
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
# Keepalives probe only a connection with nothing in flight: a load still sending rows (COPY), or a statement sent
# as the server vanished, waited for TCP's retransmissions to give up (about 15 minutes by default). Data left
# unacknowledged this long fails the connection instead (libpq 12+; a slow statement sends nothing, so is not cut).
TCP_USER_TIMEOUT_MS = 60_000


def connect(url: str) -> psycopg2.extensions.connection:
    """A connection to ``url``, given up after ``CONNECT_TIMEOUT_S``, probed when silent (``KEEPALIVES``) and failed
    when what it sent stays unacknowledged (``TCP_USER_TIMEOUT_MS``), unless the URL sets these parameters itself."""
    dsn = libpq_url(url)
    if (problem := userinfo_problem(dsn)) is not None:
        raise psycopg2.ProgrammingError(f"invalid dsn: {problem}")
    try:
        given = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as error:
        # libpq quotes the part of the URL it cannot read, the password itself when a '%' in it is no escape
        # ('invalid percent-encoded token: "s3cret%zz"'): the error is shown by `up`, `status` and failed runs.
        raise psycopg2.ProgrammingError(without_password(" ".join(str(error).split()), dsn)) from None
    options: dict[str, int] = {"connect_timeout": CONNECT_TIMEOUT_S, **KEEPALIVES}
    if psycopg2.extensions.libpq_version() >= 120000:  # an older libpq refuses the option it does not know
        options["tcp_user_timeout"] = TCP_USER_TIMEOUT_MS
    return psycopg2.connect(dsn, **{name: value for name, value in options.items() if name not in given})


def userinfo_problem(url: str) -> str | None:
    """Why libpq would misread the user info of ``url`` (as ``serving.urls.split_userinfo`` reads it, past a
    password's '?' or '#' too, as libpq does), or None: an unencoded '@' or '/' in the user name or password."""
    head, userinfo, _ = split_userinfo(url)
    if not (head and userinfo) or ("@" not in userinfo and "/" not in userinfo):
        return None
    # libpq ends the user info at its first '@' or '/': the rest of the password became the host ('could not
    # translate host name "rest@db.example"') or the port ('invalid integer value "s3"'), shown in every error.
    return "an '@' or '/' in the URL's user name or password must be percent-encoded (%40, %2F)"


def without_password(text: str, url: str) -> str:
    """``text`` with every password of ``url`` replaced by ***: its user info's (as written:
    ``serving.urls.split_userinfo``) and the values of its ``password`` and ``sslpassword`` parameters, as written
    (libpq quotes the one whose '%' is no escape)."""
    head, userinfo, rest = split_userinfo(url)
    _, colon, password = (userinfo or "").partition(":")
    passwords = [password] if head and colon and password else []
    for parameter in rest.partition("#")[0].partition("?")[2].split("&"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() in ("password", "sslpassword") and value:
            passwords.append(value)
    for secret in sorted(passwords, key=len, reverse=True):  # a longer one first: a shorter may be part of it
        text = text.replace(secret, "***")
    return text


@contextlib.contextmanager
def transaction(url: str) -> Iterator[psycopg2.extensions.connection]:
    """A connection whose work commits on success and rolls back on error, then closes."""
    conn = connect(url)
    try:
        yield conn
        conn.commit()
    except BaseException:
        # A connection the server dropped cannot roll back (the server already has): its InterfaceError would
        # hide the error that says why.
        with contextlib.suppress(psycopg2.Error):
            conn.rollback()
        raise
    finally:
        conn.close()


SCHEMA_LOCK = "precompute.schema"  # the advisory lock that creators of our tables take turns on


def schema_missing(cur: psycopg2.extensions.cursor, names: Sequence[str]) -> bool:
    """Whether any relation of ``names`` (tables, indexes) is missing; if so, the caller's transaction now holds
    ``SCHEMA_LOCK`` and creates them. Concurrent ``CREATE ... IF NOT EXISTS`` of one table collide in the catalog
    (UniqueViolation on pg_type): creators take turns. When all exist no DDL runs: ``CREATE INDEX IF NOT EXISTS``
    takes a share lock on its table before it finds the index there, so it waited for every open write to the table
    (a docs load of minutes)."""
    cur.execute("SELECT " + ", ".join(["to_regclass(%s) IS NOT NULL"] * len(names)), tuple(names))
    if all(cur.fetchone()):
        return False
    cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (SCHEMA_LOCK,))
    return True


def copy_in(cur: psycopg2.extensions.cursor, statement: str, data: IO) -> None:
    """``COPY ... FROM STDIN`` of ``data``. When the server ends the connection mid-COPY, psycopg2 prints the
    server's error as a traceback on stderr itself and raises a bare ``invalid socket``: that print is caught, and
    the server's error (its first line) is raised instead. Otherwise what was printed is passed on."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            cur.copy_expert(statement, data)
    except psycopg2.Error as error:
        lines = printed.getvalue().splitlines()
        if cause := next((line for line in lines if line.startswith("psycopg2.")), None):
            name, _, message = cause.removeprefix("psycopg2.errors.").partition(": ")
            raise psycopg2.OperationalError(f"the server ended the COPY: {message} ({name})") from error
        sys.stderr.write(printed.getvalue())
        raise
    sys.stderr.write(printed.getvalue())


@contextlib.contextmanager
def scratch_database(url: str, prefix: str = "scratch", *, template: str | None = None) -> Iterator[str]:
    """Create a fresh database on the server of ``url`` (a copy of the database named ``template``, to which no one
    may be connected), yield its URL, drop it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = connect(url)
    admin.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        yield url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
