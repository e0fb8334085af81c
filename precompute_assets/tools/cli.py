"""The ``precompute`` command: local stack, demo, benchmarks and tools."""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shlex
import signal
import socket
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ..stack import (
    ENV_APP_DB,
    ENV_DAGSTER_PG,
    ENV_HOME,
    ENV_REDIS,
    ENV_REDIS_ADMIN,
    NO_ANSWER,
    RedisError,
    ServiceStatus,
    Stack,
    StackError,
    default_home,
    one_line,
    project_dir,
    redact,
    url_error,
)
from .progress import progress

if TYPE_CHECKING:
    from ..storage.documents import DocumentStore
    from ..storage.lake import Lake

DOCUMENT_FIELD_OPTIONS = {
    "doc_id": "--id-field",
    "title": "--title-field",
    "body": "--body-field",
    "language": "--language-field",
}


class CliError(Exception):
    """Bad input or an unusable service: printed as one line, exit code 2."""


def _up(stack: Stack, *, postgres: bool = True, redis: bool = True) -> dict[str, str]:
    env = stack.up(postgres=postgres, redis=redis)
    os.environ.update(env)
    return env


@contextlib.contextmanager
def app_database(url: str) -> Iterator[None]:
    """Errors of the application database (``url``) as one line that names ``PRECOMPUTE_APP_DB_URL`` (a server that
    restarted mid-load printed psycopg2's message alone, naming no setting)."""
    import psycopg2

    try:
        yield
    except psycopg2.Error as error:
        detail = one_line(str(error)) or type(error).__name__
        raise CliError(f"{ENV_APP_DB} ({redact(url)}) failed: {detail}") from error


def _check_settings() -> None:
    """The settings the Definitions read when they load (timezone, partitions start, campaign cap, A/B experiment,
    executor), checked before ``up``, ``dev`` and ``env`` start or export anything: a typo'd one was exported with
    exit code 0 and only failed the code location's load in the Dagster UI."""
    from ..defs.executors import executor_from_env
    from ..defs.resources import experiment_fields
    from ..defs.settings import load_settings
    from ..storage.campaigns import max_ads_from_env

    try:
        load_settings()
        max_ads_from_env()
        experiment_fields()
        executor_from_env()
    except ValueError as error:  # a SettingError, or the cap's error naming its variable
        raise CliError(str(error)) from None


def cmd_up(args: argparse.Namespace) -> int:
    _check_settings()
    stack = Stack()
    _up(stack)
    return print_status(stack)


def cmd_down(args: argparse.Namespace) -> int:
    if not (home := default_home()).exists():  # a mistyped PRECOMPUTE_HOME: made, then reported stopped
        print(f"nothing to stop: {home} holds no embedded services (is {ENV_HOME} the one `up` used?)")
        return 0
    stack = Stack()
    if not args.force and (runs := runs_losing_servers(stack)):
        shown = ", ".join(runs[:3]) + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")
        raise CliError(
            f"Dagster runs in progress would lose their servers and fail ({shown}): let them finish, or terminate "
            "them in the UI (a run whose worker is gone: `precompute pools free --run ID`), or give --force"
        )
    if args.purge:
        service_folder = stack.postgres.runtime if stack.postgres.runtime.exists() else None  # none made: not named
        embedded = any(stack.embeds(variable) for variable in (ENV_REDIS, ENV_DAGSTER_PG, ENV_APP_DB))
        stack.purge()
        deleted = f"{stack.home}" + (f" and {service_folder}" if service_folder is not None else "")
        print(f"embedded services stopped; their data is deleted ({deleted})" if embedded
              else f"no embedded services here (the environment names every server); deleted {deleted}")  # fmt: skip
    else:
        stack.down()
        print("embedded services stopped")
    return 0


def runs_losing_servers(stack: Stack) -> list[str]:
    """The IDs of the runs in progress (STARTING, STARTED, CANCELING) whose Dagster storage is this stack's embedded
    PostgreSQL, which ``down`` would stop under them; none when it is not running or cannot be read (``down`` is not
    kept from stopping by a storage it cannot read)."""
    if (
        not stack.embeds(ENV_DAGSTER_PG)
        or stack.postgres.pid is None
        or not (stack.dagster_home / "dagster.yaml").exists()
    ):
        return []
    import dagster as dg

    from ..defs.runs import IN_PROGRESS

    try:  # the instance stored in the embedded PostgreSQL, whatever DAGSTER_HOME says (another project's, a SQLite)
        with dagster_instance(stack, own=True) as instance:
            return [
                record.dagster_run.run_id for record in instance.get_run_records(dg.RunsFilter(statuses=IN_PROGRESS))
            ]
    except Exception:  # a storage that cannot be read holds no run to protect
        return []


def cmd_status(args: argparse.Namespace) -> int:
    return print_status(Stack())


def print_status(stack: Stack) -> int:
    services = stack.status()
    for service in services:
        where = "embedded" if service.embedded else "external"
        state = f"running (pid {service.pid})" if service.pid else ("reachable" if service.running else "stopped")
        if not service.embedded and not service.running:
            state = "unreachable"
        silent = service.refused is not None and service.refused.startswith(NO_ANSWER)  # hung, or no TLS there
        if service.refused is not None and not silent:  # its port answers, but not for us: a wrong password, ...
            state = "refuses us"
        if silent and service.embedded:  # an external one is unreachable, its reason beside it
            state = f"not answering (pid {service.pid})" if service.pid else "not answering"
        if service.invalid is not None:  # not even a URL of such a server: nothing was asked
            state = "invalid URL"
        reason = service.refused or service.invalid
        version = f"  ({service.version})" if service.version else f"  ({reason})" if reason else ""
        print(f"{service.name:<9} {where:<9} {state:<22} {redact(service.url)}{version}")
        for warning in service.warnings:
            print(f"{service.name:<9} {'warning':<9} {warning}")
    print(f"state     {stack.home}")
    postgres = next(service for service in services if service.name == "postgres")
    for name, kind, status in automation(stack, postgres):
        print(f"{kind:<9} {status:<9} {name}")
    for line in lost_publish_lines(stack, next(service for service in services if service.name == "redis"), postgres):
        print(f"{'redis':<9} {'lost':<9} {line}")
    return 0


def dagster_unknown(stack: Stack, postgres: ServiceStatus) -> str | None:
    """Why Dagster's instance cannot be read now (``(unknown...)``, as ``status`` prints it), or None."""
    if postgres.invalid is not None:
        return "(unknown: DAGSTER_PG_URL is no PostgreSQL URL)"
    if not postgres.embedded and not postgres.running:  # `up` cannot start an external server
        return "(unknown: Dagster's database does not answer)"
    if postgres.refused is not None:  # its line above says why
        return "(unknown: Dagster's database refuses us)"
    if not postgres.running:
        return "(unknown until `precompute up`: Dagster's database is stopped)"
    # The instance is the one of DAGSTER_HOME: the stack's (its dagster.yaml is linked by `up`), or the deployment's
    # own, which production sets and `up` never has to run for.
    home = Path(stack.env()["DAGSTER_HOME"]).resolve()
    if not (home / "dagster.yaml").exists():
        if home == stack.dagster_home:
            return "(unknown until `precompute up`: it links the dagster.yaml of DAGSTER_HOME)"
        return f"(unknown: DAGSTER_HOME {home} has no dagster.yaml)"
    return None


def automation(stack: Stack, postgres: ServiceStatus) -> list[tuple[str, str, str]]:
    """Each schedule and sensor with the state the Dagster daemon acts on, each concurrency pool with what holds it,
    and each run in progress, when Dagster's database answers."""
    if (unknown := dagster_unknown(stack, postgres)) is not None:
        return [(unknown, "automation", "")]
    from ..definitions import defs
    from ..defs.automation import automation_states, pool_states, runs_in_progress
    from ..defs.runs import DAEMON_FRESH_S, daemon_heartbeat_age_s

    try:
        with dagster_instance(stack) as instance:
            definitions = defs()
            pools = [(state, "pool", name) for name, state in pool_states(instance, definitions)]
            runs = [(line, "run", status) for status, line in runs_in_progress(instance)]
            age = daemon_heartbeat_age_s(instance)
            if age is not None and age < DAEMON_FRESH_S:
                daemon = (f"(last heartbeat {age:.0f} s ago)", "daemon", "running")
            else:  # RUNNING below is what a daemon would act on: with none, nothing ticks
                seen = "never seen" if age is None else f"last heartbeat {age / 60:.0f} min ago"
                daemon = (f"({seen}: no schedule or sensor ticks; `precompute dev` runs one)", "daemon", "stopped")
            return [daemon, *automation_states(instance, definitions), *pools, *runs]
    except Exception as error:  # status reports; it never fails because Dagster's storage cannot be read
        return [(f"(unknown: {_one_line(error)})", "automation", "")]


def lost_publish_lines(stack: Stack, redis_service: ServiceStatus, postgres: ServiceStatus) -> list[str]:
    """One line per published kind whose version Dagster recorded and Redis no longer serves (``lost_publishes``:
    Redis restarted without its data, was flushed or failed over to an empty replica); none when Redis or Dagster's
    database cannot be read (their own lines say why)."""
    if not redis_service.running or redis_service.refused or redis_service.invalid:
        return []
    if dagster_unknown(stack, postgres) is not None:
        return []
    from ..defs.publishing import lost_publishes
    from ..serving import KeySchema, connect

    try:
        client = connect(redis_service.url, socket_timeout=5)
        try:
            with dagster_instance(stack) as instance:
                return lost_publishes(instance, client, KeySchema())
        finally:
            client.close()
    except Exception as error:  # status reports; it never fails because Redis or Dagster's storage cannot be read
        return [f"(unknown: {_one_line(error)})"]


def _keep_invalidations(client: Any, schema: Any, done: Any) -> None:
    """Copy Redis's record of what ``done`` (an ``Invalidated``) took out of the versions of a kind a restore publishes
    again (``ctr``) into Dagster's storage (``defs.invalidations``): a Redis that lost its data lost the record, and
    the restore wrote the invalidated values back. Storage that cannot be reached is one warning line."""
    from ..defs.invalidations import keep
    from ..defs.publishing import PUBLISHED_KINDS
    from ..serving.invalidate import recorded_members

    if done.kind != "ctr" or not done.recorded:
        return
    unkept = (f"precompute cache: warning: the invalidation of {', '.join(done.recorded)} is recorded in Redis only: "
              "a restore after Redis loses its data writes it back")  # fmt: skip
    root = logging.getLogger()
    level = root.level
    try:
        stack = Stack()
        home = Path(os.environ.get("DAGSTER_HOME") or stack.dagster_home)
        if not (home / "dagster.yaml").exists():  # Dagster would make a store there that no run reads
            print(f"{unkept} (no dagster.yaml in {home}: `precompute up`, or set DAGSTER_HOME)", file=sys.stderr)
            return
        root.setLevel(logging.ERROR)  # a storage that does not answer: Dagster's retries warn for 15 s, line by line
        with dagster_instance(stack) as instance:
            for version in done.recorded:
                keep(instance, PUBLISHED_KINDS["ctr"][0], version, recorded_members(client, schema, "ctr", version))
    except Exception as error:  # the invalidation is done: a record that fails is said, not raised
        print(f"{unkept} (Dagster's storage: {_one_line(error)})", file=sys.stderr)
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def dagster_instance(stack: Stack, *, own: bool = False) -> Iterator:
    """The Dagster instance of ``DAGSTER_HOME`` (the stack's unless set; with ``own``, the stack's whatever is set:
    the one on its ``DAGSTER_PG_URL``), with the stack's variables set while it is open (its dagster.yaml reads the
    PostgreSQL URL from them)."""
    import dagster as dg

    from ..storage.postgres import connect as postgres_connect

    env, saved = stack.env(), dict(os.environ)
    if own:
        env["DAGSTER_HOME"] = str(stack.dagster_home)
    if env["DAGSTER_HOME"] == str(stack.dagster_home):  # our dagster.yaml: its storage is DAGSTER_PG_URL
        # One attempt first: Dagster's own connection retries for 15 s, logging a warning each time, before it fails.
        postgres_connect(env[ENV_DAGSTER_PG]).close()
    os.environ.update(env)
    try:
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            yield instance
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}"


def task_stats(window_s: float) -> dict:
    """``defs.tasks.task_run_stats`` for every registered task type, or ``{"unavailable": why}`` when Dagster's
    storage cannot be read (stats never fail because of it)."""
    from ..defs.tasks import task_registry, task_run_stats

    stack = Stack()
    if "DAGSTER_HOME" not in os.environ and not (stack.dagster_home / "dagster.yaml").exists():
        return {"unavailable": "no DAGSTER_HOME and no local stack (`precompute up`)"}
    try:
        with dagster_instance(stack) as instance:
            return task_run_stats(instance, task_registry().types, window_s=window_s)
    except Exception as error:
        named = os.environ.get(ENV_DAGSTER_PG)
        where = f"Dagster's storage, {ENV_DAGSTER_PG} ({redact(named)})" if named else "Dagster's storage"
        return {"unavailable": f"{where}: {_one_line(error)}"}


ENV_PUBLISHER_PASSWORD = "PRECOMPUTE_REDIS_PUBLISHER_PASSWORD"
ENV_READER_PASSWORD = "PRECOMPUTE_REDIS_READER_PASSWORD"


def cmd_redis_acl(args: argparse.Namespace) -> int:
    """Print the ACL file lines of a namespace's publisher and reader users, or apply them with ``--apply``."""
    import redis

    from ..serving import connect
    from ..serving.acl import acl_file_lines, apply_acl, unknown_commands

    users = {}
    for role, variable, name in (
        ("publisher", ENV_PUBLISHER_PASSWORD, args.publisher_user),
        ("reader", ENV_READER_PASSWORD, args.reader_user),
    ):
        password = os.environ.get(variable, "")
        if not password:
            raise CliError(f"set {variable} to the {role}'s password (passwords never go on the command line)")
        users[role] = (name or f"{args.namespace}-{role}", password)
    kinds = None if args.kinds is None else [kind for kind in args.kinds.split(",") if kind]
    if kinds == []:  # `--kinds "$KINDS"` with KINDS empty granted every kind: a blank never widens the reader's rights
        raise CliError("--kinds names no kind: give KIND[,KIND...], or leave the option out for every kind")
    url = ""
    try:
        if not args.apply:
            print("\n".join(acl_file_lines(args.namespace, kinds=kinds, **users)))  # password hashes only
            return 0
        admin = os.environ.get(ENV_REDIS_ADMIN)
        source = ENV_REDIS_ADMIN if admin else ENV_REDIS
        # an admin URL with no home here is an external server's: making a home (its state, its secret) is not ours
        stack = Stack() if not admin or default_home().exists() else None
        url = admin or stack.env()[ENV_REDIS]
        if (error := url_error(source, url)) is not None:  # as `up` and `cache` say it
            raise CliError(error)
        client = connect(url, socket_timeout=5)
        try:
            names = apply_acl(client, args.namespace, kinds=kinds, **users)
            if embedded := stack is not None and stack.owns_redis(url):  # ours to configure: its next start reads
                unknown = unknown_commands(client)
                stack.redis.keep_users(acl_file_lines(args.namespace, kinds=kinds, unknown=unknown, **users))
        finally:
            client.close()
    except ValueError as error:
        raise CliError(str(error)) from None
    except redis.RedisError as error:
        raise CliError(f"{redact(url)}: {error}") from None
    except OSError as error:
        raise CliError(f"{stack.redis.users_file}: {error.strerror or error}") from None
    kept = (
        f"kept in {stack.redis.users_file} for its restarts"
        if embedded
        else "until it restarts: persist them in its aclfile"
    )
    print(f"users {' and '.join(names)} set on {redact(url)} {kept}")
    return 0


MAX_DURATION_DAYS = 3650  # a window reaching further back than ten years is a typo (1e300 overflowed the dates)


def duration_s(text: str) -> float:
    """``90s``, ``30m``, ``1h``, ``2d`` (or plain seconds) as seconds, up to ``MAX_DURATION_DAYS``; argparse's type
    for ``--window``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration such as 90s, 30m, 1h or 2d, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive duration, got {text!r}")
    if value > MAX_DURATION_DAYS * 86400:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_DURATION_DAYS}d, got {text!r}")
    return value


def _serving_client(args: argparse.Namespace):
    """A client of the serving Redis (``PRECOMPUTE_REDIS_URL``, else the embedded one, which must be up)."""
    from ..serving import KeySchema, connect

    url = os.environ.get(ENV_REDIS)
    home = default_home()
    if not url:  # the embedded one: never made up here (a new home's state written, then "connection refused")
        if not (home / "stack.json").exists() or (stack := Stack()).redis.pid is None:
            raise CliError(f"no serving Redis: {ENV_REDIS} is not set and the embedded one of {home} is not running "
                           "(start it with `precompute up`)")  # fmt: skip
        url = stack.env()[ENV_REDIS]
    elif (home / "stack.json").exists() and _local_host(url):
        with contextlib.suppress(StackError, OSError):  # a home that cannot be read: the URL as it is, as before
            if (stack := Stack()).owns_redis(url):
                url = stack.env()[ENV_REDIS]  # this home's server, exported before `up` moved it to another port
    if (error := url_error(ENV_REDIS, url)) is not None:  # as `up` says it, not redis-py's line naming no variable
        raise CliError(error)
    try:
        return connect(url, socket_timeout=10), KeySchema(args.namespace), url
    except ValueError as error:
        raise CliError(str(error)) from None


def _local_host(url: str) -> bool:
    """Whether ``url`` is of 127.0.0.1, where a home's own servers listen (only such a URL may be one of them)."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).hostname == "127.0.0.1"
    except ValueError:
        return False


def _size(n_bytes: float) -> str:
    """A memory size as ``cache stats`` prints it, in the largest unit that keeps it at 1 or more: ``812B``,
    ``3.4kB``, ``12.0MB`` (a small kind's ``0.0MB`` said nothing)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f}{unit}"
    return f"{int(n_bytes)}B"


def _ttl(seconds: int | None) -> str:
    """A version's TTL as ``cache stats`` prints it: ``-`` when no bucket of it holds a key."""
    return "-" if seconds is None else f"{seconds}s"


def cmd_pools(args: argparse.Namespace) -> int:
    """``pools free``: free the concurrency-pool slots of runs that ended, or of one run whose worker is gone (JSON
    out); a Dagster database that cannot be read, or a ``--run`` that names no holder, is one line, exit code 2."""
    from ..definitions import defs
    from ..defs.automation import free_pool_slots

    stack = Stack()
    if (unknown := dagster_unknown(stack, next(s for s in stack.status() if s.name == "postgres"))) is not None:
        raise CliError(f"Dagster's instance cannot be read: {unknown.strip('()')}")
    try:
        with dagster_instance(stack) as instance:
            done = free_pool_slots(instance, defs(), run=args.run)
    except ValueError as error:
        raise CliError(str(error)) from None
    except Exception as error:  # Dagster's storage refused: one line
        raise CliError(f"Dagster's database: {_one_line(error)}") from None
    print(json.dumps(done))
    if done["held"] and args.run is None:
        ids = ", ".join(entry["run"][:8] for entry in done["held"])
        print(f"precompute pools: runs {ids} have not ended and keep their slots: if a worker is gone, "
              "`precompute pools free --run ID` marks its run failed and frees them", file=sys.stderr)  # fmt: skip
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """``cache invalidate`` and ``cache stats``; Redis errors and bad input are one line, exit code 2."""
    import redis

    from ..serving.invalidate import invalidate
    from ..serving.stats import cache_stats
    from ..serving.urls import tls_hint

    client, schema, url = _serving_client(args)
    try:
        if args.cache_command == "invalidate":
            done = invalidate(client, args.kind, key=args.key, prefix=args.prefix, version=args.version, schema=schema)
            print(json.dumps({"kind": done.kind, "version": done.version, "live_keys": done.live_keys,
                              "fields": done.fields, "buckets": done.buckets, "total": done.total}))  # fmt: skip
            if not done.total:  # as DEL of nothing: not an error (a rerun), but a typo must not pass unseen
                print(f"precompute cache: warning: nothing of kind {args.kind!r} in namespace {args.namespace!r} "
                      "matched (check --kind, --namespace, and the key, prefix or version)",
                      file=sys.stderr)  # fmt: skip
            _keep_invalidations(client, schema, done)
            return 0
        stats = cache_stats(client, schema, kinds=[args.kind] if args.kind else None, window_s=args.window)
    except ValueError as error:
        raise CliError(str(error)) from None
    except redis.RedisError as error:
        hint = tls_hint(url) if isinstance(error, redis.TimeoutError) else ""
        raise CliError(f"{redact(url)}: {error}{hint}") from None
    stats["tasks"] = task_stats(args.window)
    if args.json:
        print(json.dumps(stats))
        return 0
    print(f"{'kind':<16} {'version':<28} {'keys':>10} {'memory':>10} {'ttl':>8} {'requests':>9} {'hit rate':>8}")
    for kind, entry in stats["kinds"].items():
        if kind in stats["without_statistics"]:
            found = ", ".join(stats["kinds_with_statistics"]) or "none"
            print(f"{kind:<16} no statistics: no published version and no requests in the window "
                  f"(kinds with statistics: {found})")  # fmt: skip
            continue
        current, window = entry["current"], entry["window"]
        if "problem" in current:
            print(f"{kind:<16} {current['problem']}")
            continue
        rate = "-" if window["hit_rate"] is None else f"{window['hit_rate']:.1%}"
        print(
            f"{kind:<16} {current.get('version') or '-':<28} {current.get('keys', 0):>10} "
            f"{_size(current.get('memory_bytes', 0)):>10} {_ttl(current.get('ttl_s')):>8} "
            f"{window['requests']:>9} {rate:>8}"
        )
        replaced = entry["previous"]
        if replaced.get("version"):
            print(f"  replaced {replaced['version']:<22} {replaced['keys']:>10} {_size(replaced['memory_bytes']):>10} "
                  f"{_ttl(replaced['ttl_s']):>8}  (its grace)")  # fmt: skip
        for row in window["versions"]:
            print(f"  read {row['version'] or '(none)':<26} {row['requests']:>9} requests {row['hit_rate']:>8.1%}")
        if window["most_missed"]:
            print("  most missed: " + ", ".join(f"{key} ({n})" for key, n in window["most_missed"]))
    tasks = stats["tasks"]
    if "unavailable" in tasks:
        print(f"task runs: unavailable ({tasks['unavailable']})")
        return 0
    print(f"{'task type':<16} {'queued':>7} {'running':>8} {'succeeded':>10} {'failed':>7} {'avg run':>9}")
    for task, row in tasks.items():
        average = "-" if row["avg_run_s"] is None else f"{row['avg_run_s']:.1f}s"
        print(
            f"{task:<16} {row['queued']:>7} {row['running']:>8} {row['succeeded']:>10} {row['failed']:>7} {average:>9}"
        )
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    _check_settings()
    for name, value in exported_env(Stack()).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def exported_env(stack: Stack) -> dict[str, str]:
    """What ``precompute env`` exports: the stack's variables, the partitions start (with its default), and where they
    are set the ``shared_settings``, so a shell that evaluates it (or ``precompute dev`` started from it) keeps them."""
    from ..defs.settings import DEFAULT_PARTITIONS_START, ENV_PARTITIONS_START

    env = {**stack.env(), ENV_PARTITIONS_START: os.environ.get(ENV_PARTITIONS_START) or DEFAULT_PARTITIONS_START}
    # Set but blank is meaningful for the log-scaled columns (none), so "set" is what counts, not "non-empty".
    env.update({name: os.environ[name] for name in shared_settings() if name in os.environ})
    return env


def shared_settings() -> tuple[str, ...]:
    """The settings our commands read as the Definitions do, and must agree with them on: the ad feature set (``ads
    load`` validates by it) and the campaign cap (``campaign register`` refuses campaigns warming would refuse)."""
    from ..ml.features import ENV_AD_CATEGORICAL, ENV_AD_LOG_SCALED, ENV_AD_NUMERIC
    from ..storage.campaigns import ENV_CAMPAIGN_MAX_ADS

    return ENV_AD_NUMERIC, ENV_AD_CATEGORICAL, ENV_AD_LOG_SCALED, ENV_CAMPAIGN_MAX_ADS


def cmd_dev(args: argparse.Namespace) -> int:
    _check_settings()
    with socket.socket() as probe:  # a second `dev` on a taken port ran a hidden daemon beside the first
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as error:
            hint = " (another `precompute dev`? give --port)" if error.errno == errno.EADDRINUSE else " (check --host)"
            raise CliError(f"cannot serve the UI on {args.host}:{args.port}: {error.strerror or error}{hint}") from None
    env = _up(Stack())
    command = [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-w",
        str(project_dir() / "workspace.yaml"),
        "-h",
        args.host,
        "-p",
        str(args.port),
    ]
    print(f"Dagster UI on http://{args.host}:{args.port}  (DAGSTER_HOME={env['DAGSTER_HOME']})", flush=True)
    # In DAGSTER_HOME, whose dagster.yaml is the one used (the project's, linked): from the project folder, Dagster
    # warned that the dagster.yaml it found there "will not be used", and users took the pools and limits for off. A
    # relative lake or model store is the caller's, as every other command reads it: made absolute before the move.
    from ..stack import ENV_LAKE, ENV_MODEL_STORE

    for name in (ENV_LAKE, ENV_MODEL_STORE):
        if (value := env.get(name)) and "://" not in value and not os.path.isabs(value):
            env[name] = os.path.abspath(value)
    os.chdir(env["DAGSTER_HOME"])
    _restore_interrupt()
    os.execve(command[0], command, {**os.environ, **env})


def _restore_interrupt() -> None:
    """Give SIGINT its default action again if it is ignored, which an ignored signal keeps across ``execve``. A shell
    starts a background job (``precompute dev &`` in a script) with SIGINT ignored, and ``dagster dev`` answers SIGTERM
    with SIGINT's handler: both were then ignored, so a supervisor's SIGTERM left the UI, daemon and runs going."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.SIG_DFL)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..defs.embeddings import EmbeddingModelConfig
    from .demo import run_demo

    capacity = 2 * args.top_n if args.capacity is None else args.capacity
    if capacity < args.top_n:  # checked before anything starts
        raise CliError(f"--capacity {capacity} is smaller than --top-n {args.top_n}")
    dim = EmbeddingModelConfig.model_fields["dim"].default
    if args.docs <= dim:  # embedding_model failed on it minutes in, after the whole daily graph
        raise CliError(f"--docs must be more than {dim}, the embedder's dimensions, got {args.docs}")
    check_demo_days(args.days)
    stack = Stack()
    _up(stack)
    summary = run_demo(
        stack,
        days=args.days,
        queries_per_day=args.queries_per_day,
        n_ads=args.ads,
        top_n=args.top_n,
        capacity=capacity,
        n_docs=args.docs,
        seed=args.seed,
    )
    print(json.dumps(summary, indent=2))
    print("\nServices are still running for `precompute dev`; stop them with `precompute down`.")
    return 0


def check_demo_days(days: int) -> None:
    """CliError, before anything starts, for ``demo --days`` whose traffic (from ``days + 1`` days ago, as ``run_demo``
    places it) begins before the first partition: the demo failed after resetting Redis and serving the history, on
    Dagster's "Could not find a partition with key ..." (an OverflowError for a huge number), naming no option."""
    from datetime import date, datetime
    from zoneinfo import ZoneInfo

    from ..defs.settings import ENV_PARTITIONS_START, load_settings

    try:
        settings = load_settings()
    except ValueError as error:  # a malformed PRECOMPUTE_TIMEZONE or PRECOMPUTE_PARTITIONS_START
        raise CliError(str(error)) from None
    if days < 2:  # the CTR model's time split holds out the last day: it failed after the reset, naming no option
        raise CliError(f"--days {days}: the demo needs at least 2 days of history (the CTR model holds out the last)")
    first = date.fromisoformat(settings.partitions_start)
    most = (datetime.now(ZoneInfo(settings.timezone)).date() - first).days - 1
    if days > most:
        raise CliError(
            f"--days {days} starts the demo's traffic before the first partition day {first} ({ENV_PARTITIONS_START}): "
            f"at most {most} days of history fit after it; give fewer, or set an earlier start"
        )


# The benchmarks that read each of `bench`'s options: given to another, an option was silently ignored.
BENCH_OPTIONS = {
    "processes": ("load",),
    "daemon_logins": ("events",),
    "seconds": ("load",),
    "docs": ("embed",),
    "queries": ("graph",),
    "ads": ("graph",),
    "n": ("publish",),
    "keys": ("serve", "demand", "load", "rerank", "admission"),
    "days": ("demand",),
    "seed": ("demand",),
    "lookups": ("serve", "admission"),
    "capacity": ("admission",),
}


# The benchmarks that use PostgreSQL (the application database, Dagster's storage); the others need only Redis.
BENCH_DATABASES = ("embed", "campaign", "events")


def _given(args: argparse.Namespace, option: str) -> bool:
    """Whether ``option`` (``--name``) was on the command line (``args.argv``), abbreviated or with ``=value``."""
    tokens = [token.split("=", 1)[0] for token in getattr(args, "argv", []) if token[:2] == "--" and len(token) > 2]
    return any(option.startswith(token) for token in tokens)


def check_bench_options(args: argparse.Namespace) -> None:
    """CliError naming the options given that ``bench WHAT`` does not read: given on the command line (``args.argv``;
    an option given its default value was let through when they were compared with the defaults)."""
    ignored = [name for name, readers in BENCH_OPTIONS.items() if args.what not in readers
               and _given(args, f"--{name.replace('_', '-')}")]  # fmt: skip
    if ignored:
        named = ", ".join(f"--{name.replace('_', '-')} (bench {'/'.join(BENCH_OPTIONS[name])})" for name in ignored)
        raise CliError(f"bench {args.what} does not read {named}")


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    check_bench_options(args)  # before any service starts
    if args.what == "demand":  # in memory: no services needed
        keys = 100_000 if args.keys is None else args.keys
        try:
            result = bench.bench_demand(keys=keys, days=args.days, seed=args.seed)
        except ValueError as error:
            raise CliError(str(error)) from None
        print(json.dumps(result))
        return 0
    if args.what == "rerank" and args.keys is not None and args.keys < 100:
        raise CliError(f"bench rerank needs --keys of at least 100 (each call re-ranks 100 of them), got {args.keys}")
    if args.what == "graph":
        try:
            bench.check_graph_queries(args.queries)  # before any service starts
        except ValueError as error:
            raise CliError(str(error)) from None
    _check_settings()  # as `up` does: a bad campaign cap failed `bench campaign` after its servers and a model
    stack = Stack()
    env = _up(stack, postgres=args.what in BENCH_DATABASES)  # the others took seconds to start one they never use
    keys = 10_000 if args.keys is None else args.keys
    if args.what == "serve":
        result = bench.bench_serve(env[ENV_REDIS], n_keys=keys, lookups=args.lookups)
    elif args.what == "publish":
        # redis-benchmark writes and deletes keys outside our namespace: only on the embedded server, which is ours.
        result = bench.bench_publish(env[ENV_REDIS], n=args.n, redis_benchmark=stack.embeds(ENV_REDIS))
    elif args.what == "embed":
        result = bench.bench_embed(env[ENV_REDIS], env[ENV_APP_DB], docs=args.docs)
    elif args.what == "graph":
        result = bench.bench_graph(queries=args.queries, ads=args.ads)
    elif args.what == "campaign":
        from ..stack import ENV_DAGSTER_PG

        result = bench.bench_campaign(env[ENV_REDIS], env[ENV_APP_DB], env[ENV_DAGSTER_PG])
    elif args.what == "events":
        from ..stack import ENV_DAGSTER_PG
        from .bench_events import bench_events

        result = bench_events(env[ENV_REDIS], env[ENV_APP_DB], env[ENV_DAGSTER_PG], daemon_logins=args.daemon_logins)
    elif args.what == "rerank":
        result = bench.bench_rerank(env[ENV_REDIS], docs=100_000 if args.keys is None else args.keys)
    elif args.what == "admission":
        from .bench_admission import bench_admission

        keys = 100_000 if args.keys is None else args.keys
        result = bench_admission(env[ENV_REDIS], n_keys=keys, lookups=args.lookups, capacity=args.capacity)
    elif args.what == "load":
        from .load import bench_load

        keys = 100_000 if args.keys is None else args.keys
        result = bench_load(env[ENV_REDIS], processes=args.processes, seconds=args.seconds, keys=keys)
    else:
        raise SystemExit(f"unknown benchmark {args.what!r}")
    print(json.dumps(result))
    return 0


def top_n_or_auto(text: str) -> int | str:
    """``--top-n``: a number of keys, or ``auto`` (the share is tuned each day on the previous days)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None


def field_filter(text: str) -> tuple[str, frozenset[str]]:
    """``--where FIELD=VALUE[,VALUE...]``: keep the requests whose field (a 1-based number or a header name) is
    one of the values, e.g. ``6=get,gets``."""
    field, equals, listed = text.partition("=")
    values = frozenset(value.strip() for value in listed.split(",")) - {""}
    if not equals or not field.strip() or not values:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE[,VALUE...], e.g. 6=get,gets; got {text!r}")
    return field.strip(), values


def add_trace_options(parser: argparse.ArgumentParser) -> None:
    """The options that say how to read a trace: ``--where``, ``--format``, ``--key-field``, ``--time-field``."""
    parser.add_argument(
        "--where",
        type=field_filter,
        help="keep only the requests whose field is one of the values: FIELD=VALUE[,VALUE...], the field a 1-based "
        "number or a header name (6=get,gets for Twitter's cache traces, 4=Read for MSR's: neither has a header)",
    )
    parser.add_argument(
        "--format",
        choices=["auto", "text", "oracle-general", "oracle-general-opns", "parquet"],
        default="auto",
        help="auto (default): Parquet for a folder, a .parquet file or Parquet bytes; oracleGeneral (or "
        "oracleGeneralOpNS) when the file name says so; else text",
    )
    parser.add_argument(
        "--key-field",
        help="the key's field in each CSV line: a 1-based number or a header name (default 2; Parquet: key)",
    )
    parser.add_argument(
        "--time-field",
        help="the timestamp's field: a 1-based number, a header name, or none (default 1; Parquet: ts)",
    )


def check_trace_options(args: argparse.Namespace) -> None:
    """CliError for an empty ``--key-field`` or ``--time-field``."""
    for option, value in (("--key-field", args.key_field), ("--time-field", args.time_field)):
        if value is not None and not value.strip():
            raise CliError(f"{option} is empty: give a 1-based field number or a header name")


STDIN_PATH = "/dev/stdin"


def input_path(path: str) -> str:
    """``path``, or standard input's for ``-`` (a log piped in: ``zcat log.gz | precompute replay --trace - ...``)."""
    return STDIN_PATH if path == "-" else path


def read_trace(
    path: str, args: argparse.Namespace, *, quarantine: bool = False, exact_keys: bool = False, spelled: bool = False
):
    """The trace at ``path`` read as ``add_trace_options``' options say; a file that cannot be read is a CliError.
    ``quarantine``: ``(trace, malformed lines cut)`` from ``parse_trace_quarantining`` instead (request-log imports);
    ``exact_keys``: keys as written (``007`` stays ``007``, CSV quotes removed); ``spelled``: integer spellings
    only (``spelled_keys``), see ``parse_trace``."""
    from ..ml.parquet_trace import PARQUET_COLUMNS, is_parquet
    from ..ml.replay import NAMED, TraceError, parse_trace, parse_trace_quarantining

    columns, source = None, input_path(path)
    if args.time_field is not None or args.key_field is not None:
        parquet = args.format == "parquet" or (args.format == "auto" and is_parquet(source))
        default_time, default_key = PARQUET_COLUMNS if parquet else (NAMED, NAMED)  # a text trace: as its header says
        time_field = default_time if args.time_field is None else args.time_field
        columns = (None if time_field.lower() == "none" else time_field, args.key_field or default_key)
    try:
        if quarantine:
            return parse_trace_quarantining(
                source, columns=columns, trace_format=args.format, where=args.where, exact_keys=exact_keys
            )
        return parse_trace(
            source, columns=columns, trace_format=args.format, where=args.where, exact_keys=exact_keys,
            spelled_keys=spelled,
        )  # fmt: skip
    except TraceError as error:
        notes = "".join(f" ({note})" for note in getattr(error, "__notes__", ()))  # how many lines were cut first
        raise CliError(f"{path}: {error}{notes}") from None
    except OSError as error:
        raise CliError(f"{path}: {error.strerror or error}") from None
    except MemoryError:
        raise CliError(f"{path}: the trace does not fit in memory (read a sample of it)") from None


def cmd_replay(args: argparse.Namespace) -> int:
    """Print the replayed hit rates as one JSON object; a bad input raises CliError (one line, exit code 2)."""
    # Arguments first: they are cheap to check and a long trace should not be read for nothing.
    if not str(args.trace).strip():
        raise CliError("--trace is empty: give a trace file or folder")
    check_trace_options(args)
    if args.days < 2:
        raise CliError(f"--days must be at least 2 (day 0 only warms the caches), got {args.days}")
    if args.days > MAX_DURATION_DAYS:  # each day replays every candidate share and trains on the days before it
        raise CliError(f"--days {args.days} is more than ten years of days: at most {MAX_DURATION_DAYS}")
    if args.capacity < 1:
        raise CliError(f"--capacity must be at least 1, got {args.capacity}")
    if args.top_n != "auto" and args.top_n < 0:
        raise CliError(f"--top-n must be at least 0, got {args.top_n}")
    if args.top_n != "auto" and args.capacity < args.top_n:
        raise CliError(f"--capacity {args.capacity} is smaller than --top-n {args.top_n}")
    if args.admission is not None:
        from ..serving.admission import ADMISSION_NAMES

        if args.admission not in ADMISSION_NAMES:
            raise CliError(f"unknown --admission {args.admission!r}: use one of {', '.join(ADMISSION_NAMES)}")
    strategies = [] if args.strategy is None else replay_strategies(args.strategy)
    arms = None
    if args.ab is not None:
        from ..ml.experiment import parse_arms

        try:
            arms = parse_arms(args.ab)
        except ValueError as error:
            raise CliError(f"--ab {args.ab!r}: {error}") from None
        if args.top_n == "auto":
            raise CliError("--ab needs a fixed --top-n: each arm precomputes half of it")
        if int(args.top_n) < 2:  # no arm, or one, would precompute anything: no experiment to report
            raise CliError(f"--ab needs --top-n of at least 2: each arm precomputes half of it, got {args.top_n}")
    if not 0 < args.sample <= 1:  # NaN too
        raise CliError(f"--sample must be above 0 and at most 1, got {args.sample}")
    if args.sample < 1 and (args.next_key or ("prefetch" in strategies and args.strategy.strip() != "all")):
        raise CliError(
            f"--sample keeps every request of a share of the keys, which cuts the sequences across keys that the "
            f"next-key model learns: not with {'--next-key' if args.next_key else '--strategy prefetch'}"
        )
    if args.sample < 1:  # all: every strategy a sample can replay (a note says prefetch is left out)
        strategies = [name for name in strategies if name != "prefetch"]
    learned = args.next_key or "prefetch" in strategies
    if args.train_days is not None and args.sample < 1:
        raise CliError(
            "--train-days is the next-key LSTM's, which --sample does not train (not even in --strategy all)"
        )
    if args.train_days is not None and not learned:
        raise CliError("--train-days is the next-key LSTM's: give it with --next-key or --strategy prefetch|all")
    train_days = args.train_days if args.train_days is not None else max(1, args.days // 2)
    if learned and not 1 <= train_days < args.days:
        raise CliError(f"--train-days must be at least 1 and less than --days {args.days}, got {train_days}")
    if not math.isfinite(args.margin):
        raise CliError(f"--margin must be a finite number, got {args.margin}")
    from ..serving.keys import clean_salt

    try:
        args.ab_salt = clean_salt(args.ab_salt)  # as the deployment's, or the replay's split is not production's
    except ValueError as error:
        raise CliError(f"--ab-salt {error}") from None
    if not 0 <= args.prefetch_threshold <= 1:  # a probability; NaN and infinity too
        raise CliError(f"--prefetch-threshold must be a probability between 0 and 1, got {args.prefetch_threshold}")
    unread = [
        option
        for option, read in (
            ("--ab-salt", arms is not None),
            ("--prefetch-threshold", "prefetch" in strategies),
            ("--margin", bool({"lstm", "auto"} & {*strategies, *(arms or ())})),
        )
        if not read and _given(args, option)
    ]
    if unread:  # as --train-days: an option given to a replay that does not read it was silently ignored
        raise CliError(f"this replay does not read {', '.join(unread)}: --ab-salt is --ab's, --prefetch-threshold "
                       "--strategy prefetch's, --margin lstm's and auto's (as --strategy or an --ab arm)")  # fmt: skip
    demand = [name for name in strategies if name != "prefetch"]
    stages = 2 + (arms is not None) + learned
    if not (demand or learned):  # the policies replay here, each announced: not one stage of minutes
        from ..ml.replay import replay_stages

        stages += replay_stages(auto=args.top_n == "auto", admission=args.admission is not None) - 1
    if demand:
        from ..ml.strategies import progress_stages

        stages += progress_stages(demand)
    with _Stages(stages) as stage:
        return _replay_stages(args, stage, strategies, arms, learned, train_days)


def replay_strategies(option: str) -> list[str]:
    """``--strategy``'s names: one, several separated by commas (``frequency,ewma``; each once, in the order
    given), or ``all``; an unknown or empty name is a CliError."""
    from ..ml.strategies import REPLAY_STRATEGIES

    if option.strip() == "all":
        return list(REPLAY_STRATEGIES)
    names = [name.strip() for name in option.split(",")]
    for name in names:
        if name not in REPLAY_STRATEGIES:
            known = ", ".join(REPLAY_STRATEGIES)
            raise CliError(f"unknown --strategy {name!r}: use one of {known}, several separated by commas, or all")
    return list(dict.fromkeys(names))


class _Stages:
    """The progress of a command's stages on stderr (``tools.progress``: a bar on a terminal, a line per stage
    elsewhere): ``stage(name)`` starts the next one."""

    def __init__(self, total: int) -> None:
        self._bar = progress(desc="starting", total=total, unit="stages")
        self._started = 0

    def __call__(self, name: str) -> None:
        if self._started:
            self._bar.update()
        self._started += 1
        self._bar.set_description_str(name)

    def __enter__(self) -> _Stages:
        return self

    def __exit__(self, failed: type | None, *exc) -> None:
        if self._started and failed is None:
            self._bar.update()  # the last stage is over too
        self._bar.__exit__(failed, *exc)


def _replay_stages(
    args: argparse.Namespace, stage: _Stages, strategies: list[str], arms, learned: bool, train_days: int
) -> int:
    """``replay``'s work once its arguments are checked, announcing each stage to ``stage``."""
    from ..ml.replay import logged_hit_rate, read_through_day_hits, replay, shards_adjusted, split_days, trace_notes

    stage("reading the trace")
    # --ab's arms and the frequency sketch hash each key's text, as top_ads and the serving client hash the id as
    # written: read as an integer, "007" hashed as "7", and the replay's split was not production's (h_replay).
    hashed = args.ab is not None or args.admission == "frequency"
    trace = read_trace(args.trace, args, spelled=hashed)
    if args.days > len(trace.keys):
        raise CliError(f"--days {args.days} is larger than the number of requests ({len(trace.keys)})")
    whole, sample, asked = trace, None, args
    try:
        day_keys = split_days(whole, args.days)
        if args.sample < 1:
            trace, day_keys, sample, args = _sampled(whole, day_keys, args)
        notes = trace_notes(trace, day_keys, key_chosen=args.key_field is not None)
        for note in notes:
            print(f"precompute replay: warning: {note}", file=sys.stderr)
        demand_strategies = [name for name in strategies if name != "prefetch"]
        sampled = {}  # a sample's strategies and arms replay its keys on the whole trace's days, as its policies do
        if sample is not None and (demand_strategies or arms is not None):
            from ..ml.strategies import sampled_hyper_params

            sampled = dict(sample=args.sample, hp=sampled_hyper_params(args.sample))
        # More than the policies to replay: each piece in a process of its own, while the LSTM trains here.
        with _replay_pool(bool(demand_strategies) or learned) as pool:
            requests = f"{len(trace.keys):,} requests"
            if pool:
                stage(f"replaying the policies over {requests}")
            policies = dict(top_n=args.top_n, capacity=args.capacity, admission=args.admission)
            if learned:
                prefetching = "prefetch" in strategies
                trained = pool.submit(learned_results, day_keys, args, train_days, with_prefetch=prefetching)
            read_through = None
            if demand_strategies and args.top_n == "auto":  # the policies' LRU, every strategy's N = 0: replayed once
                read_through = read_through_day_hits(day_keys, args.capacity, admission=args.admission)
            replayed = pool.submit(replay, day_keys, **policies, read_through=read_through) if pool else None
            if demand_strategies:
                from ..ml.strategies import compare_strategies

                compared = compare_strategies(
                    whole,
                    args.days,
                    demand_strategies,
                    top_n=args.top_n,
                    capacity=args.capacity,
                    admission=args.admission,
                    margin=args.margin,
                    progress=stage,
                    pool=pool,
                    read_through=read_through,
                    **sampled,
                )
            result = (
                replayed.result()
                if replayed
                else replay(day_keys, **policies, progress=lambda name: stage(f"{name} over {requests}"))
            )
            if sample is not None:
                rates = {name: value for name, value in result.items() if name.startswith("hit_rate_")}
                # the shortfall counts as hits of the hottest keys: not for a static top-N that holds no key (N = 0,
                # or `auto` choosing 0 on every day)
                empty = args.top_n == 0 or not any(result.get("top_n_chosen", [args.top_n]))
                adjusted = {n: r for n, r in rates.items() if not (n == "hit_rate_static_top_n" and empty)}
                result.update(shards_adjusted(adjusted, args.sample, result["requests"], sample["requests_counted"]))
                sample["hit_rates_unadjusted"] = rates
            if whole.logged_hits is not None:  # what the serving client saw on the same counted requests
                result["hit_rate_logged"] = logged_hit_rate(whole, args.days)
            if demand_strategies:
                if sample is not None:
                    compared = _sampled_strategies(compared, sample, asked, result["requests"])
                result.update(compared)
            if arms is not None:
                from ..ml.experiment import ab_replay

                stage(f"replaying the experiment {arms[0]} vs {arms[1]}")
                experiment = ab_replay(
                    whole,
                    args.days,
                    arms=arms,
                    top_n=args.top_n,
                    capacity=args.capacity,
                    salt=args.ab_salt,
                    admission=args.admission,
                    margin=args.margin,
                    **sampled,
                )
                if sample is not None:
                    experiment["ab"]["notes"].append(
                        f"on a --sample of {args.sample}: the arms' keys, requests and hit rates (not adjusted) are "
                        f"the sample's, and top_n and capacity its scaled ones"
                    )
                result.update(experiment)
            if learned:
                stage("training the next-key model")
                learned_out = trained.result()
                prefetch = learned_out.pop("strategies", {})
                prefetch_notes = learned_out.pop("prefetch_notes", [])
                result.update(learned_out)
                if prefetch:
                    result["strategies"] = {**result.get("strategies", {}), **prefetch}
                    first = prefetch["prefetch"]["counted_from_day"]
                    result["strategy_notes"] = [
                        *result.get("strategy_notes", []),
                        f"prefetch: counted on days {first}..{args.days - 1} only (its next-key model trains on the "
                        "days before), the other strategies from day 1: compare its hit_rate with "
                        "hit_rate_ours_same_days",
                        *prefetch_notes,
                    ]
    except ValueError as error:
        raise CliError(str(error)) from None
    except BrokenProcessPool as error:  # a worker was killed, e.g. out of memory
        raise CliError(f"a replay process ended abruptly: {error}") from None
    except MemoryError:
        raise CliError("out of memory while replaying (a smaller --capacity, fewer --strategy, or --sample)") from None
    shape = {"trace": str(args.trace), "trace_layout": trace.layout(), "requests_per_day": [len(d) for d in day_keys]}
    if sample is not None:
        shape["sample"] = sample
    if notes:
        shape["trace_notes"] = notes
    print(json.dumps({**shape, **result}))
    return 0


def _sampled(trace, day_keys: list, args: argparse.Namespace) -> tuple[Any, list, dict, argparse.Namespace]:
    """``replay``'s ``--sample``: the trace's SHARDS sample, its requests within the whole trace's days ``day_keys``
    (so both count the same days), what was kept (and the whole trace's counted requests, for ``shards_adjusted``),
    and the arguments with the capacity and a fixed top-n scaled to it."""
    from ..ml.replay import SAMPLED_CACHE_MIN, sample_trace, sampled_size, shards_keep

    sampled = sample_trace(trace, args.sample)
    if len(sampled.keys) < args.days:
        raise CliError(
            f"--sample {args.sample} kept {len(sampled.keys):,} of the {len(trace.keys):,} requests, fewer than "
            f"--days {args.days}: use a larger rate"
        )
    if args.capacity < SAMPLED_CACHE_MIN:  # no rate up to 1 helps: the hint below would ask for one above 1
        raise CliError(
            f"--sample needs --capacity of at least {SAMPLED_CACHE_MIN} keys, got {args.capacity}: replay a cache "
            "this small without --sample"
        )
    if (capacity := sampled_size(args.capacity, args.sample)) < SAMPLED_CACHE_MIN:
        raise CliError(
            f"--sample {args.sample} scales --capacity {args.capacity} to {capacity} keys, too few to model a cache: "
            f"use a rate of at least {SAMPLED_CACHE_MIN / args.capacity:.3g}, or no --sample"
        )
    top_n = args.top_n if args.top_n == "auto" else sampled_size(args.top_n, args.sample)
    if args.ab is not None and top_n < 2:  # as without --sample: no arm, or one, would precompute anything
        raise CliError(
            f"--sample {args.sample} scales --top-n {args.top_n} to {top_n}: --ab needs at least 2, each arm "
            f"precomputing half of it; use a rate of at least {2 / args.top_n:.3g}, or no --sample"
        )
    scaled = argparse.Namespace(**{**vars(args), "capacity": capacity, "top_n": top_n})
    sampled_days = [day[shards_keep(day, args.sample)] for day in day_keys]  # the keys sample_trace kept
    summary = {
        "rate": args.sample,
        "requests_read": len(trace.keys),
        "requests_kept": len(sampled.keys),
        "requests_counted": sum(len(day) for day in day_keys[1:]),
        "capacity": scaled.capacity,
        "top_n": top_n,
    }
    return sampled, sampled_days, summary, scaled


def _sampled_strategies(compared: dict, sample: dict, asked: argparse.Namespace, kept: int) -> dict:
    """``compare_strategies``' result on a ``--sample`` in the whole trace's terms: hit rates adjusted as the
    policies' are (``shards_adjusted``; ``kept``: the sample's counted requests) and top-N shares in the whole
    trace's keys (a fixed ``--top-n`` as asked, a tuned share divided by the rate). What the sample replayed, hit
    rates and shares in its own keys, goes to ``sample["strategies_unadjusted"]``."""
    from ..ml.replay import shards_adjusted

    rate, counted = sample["rate"], sample["requests_counted"]
    whole = {}
    for name, entry in compared["strategies"].items():
        rates = {key: value for key, value in entry.items() if key.startswith("hit_rate")}
        shares = {
            key: (asked.top_n if key == "top_n" and asked.top_n != "auto" else value / rate)
            for key, value in entry.items()
            if key in ("top_n", "top_n_admission")
        }
        if "top_n_chosen" in entry:
            shares["top_n_chosen"] = [round(share / rate) for share in entry["top_n_chosen"]]
        whole[name] = {**entry, **shards_adjusted(rates, rate, kept, counted), **shares}
    sample["strategies_unadjusted"] = compared["strategies"]
    note = (
        f"sampled at {rate}: each strategy's hit rates are adjusted as the policies' are, and its top_n is in the "
        f"whole trace's keys (the sample's divided by {rate}; sample.strategies_unadjusted has both as replayed)"
    )
    if "prefetch" not in compared["strategies"] and asked.strategy.strip() == "all":
        note += "; prefetch is not replayed on a sample: its next-key model learns sequences across keys"
    return {**compared, "strategies": whole, "strategy_notes": [*compared["strategy_notes"], note]}


@contextlib.contextmanager
def _replay_pool(wanted: bool) -> Iterator[ProcessPoolExecutor | None]:
    """Processes for a replay's independent pieces (spawned, one per usable CPU) when ``wanted``, else None. On an
    error or Ctrl-C the jobs not started are dropped and the running ones stopped, not waited for."""
    if not wanted:
        yield None
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    pool = _ReplayPool(cpus, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    except BaseException:
        processes = list((getattr(pool, "_processes", None) or {}).values())  # Python 3.14: terminate_workers()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:  # SIGKILL: a SIGTERM may be ignored (inherited from a shell's background job)
            process.kill()
        raise
    pool.shutdown()


class _ReplayPool(ProcessPoolExecutor):
    """A pool whose workers ignore SIGINT from their first instruction: a terminal's Ctrl-C reaches every process of
    the command, and each worker printed its own KeyboardInterrupt traceback (an initializer that ignored it left out
    the workers still importing); the main process stops them (``_replay_pool``) and says it once."""

    def submit(self, fn, /, *args, **kwargs):
        """``ProcessPoolExecutor.submit``, which starts a worker when none is idle, with SIGINT ignored meanwhile."""
        from .interrupts import interrupts_ignored

        with interrupts_ignored():
            return super().submit(fn, *args, **kwargs)


def learned_results(day_keys: list, args: argparse.Namespace, train_days: int, *, with_prefetch: bool) -> dict:
    """``replay --next-key`` and the ``prefetch`` strategy from one next-key LSTM trained on the first
    ``train_days`` days. Under ``--top-n auto`` prefetch runs beside no precompute (top-N 0: LRU plus prefetch).
    ``prefetch_notes`` says when the model's training was cut by its time safety stop."""
    from ..ml.next_key import learned_prefetch, next_key_accuracy, train_next_key, training_stopped_note

    model = train_next_key(day_keys, train_days=train_days)
    out: dict = {}
    if args.next_key:
        out.update(next_key_accuracy(day_keys, train_days=train_days, model=model))
    if with_prefetch:
        top_n = 0 if args.top_n == "auto" else args.top_n
        entry = learned_prefetch(
            day_keys,
            top_n=top_n,
            capacity=args.capacity,
            model=model,
            train_days=train_days,
            threshold=args.prefetch_threshold,
        )
        out["strategies"] = {"prefetch": entry}
        if model.stopped_by_time:
            out["prefetch_notes"] = [f"prefetch: {training_stopped_note(model)}"]
    return out


def cmd_docs(args: argparse.Namespace) -> int:
    from ..storage.documents import DocumentFields, DocumentStore, check_document_file

    fields = None
    if args.docs_command == "load":
        try:
            kind = check_document_file(args.file)
            given = {c: getattr(args, f"field_{c}") for c in DOCUMENT_FIELD_OPTIONS}
            names = {c: name for c, name in given.items() if name is not None}
            fields = DocumentFields(names, header=not args.no_header, language=args.language)
        except (OSError, ValueError) as error:
            raise CliError(str(error)) from None
        if args.no_header and kind not in ("csv", "tsv"):
            raise CliError(f"--no-header is for CSV and TSV files, not {kind}")
    env = _up(Stack(), redis=False)  # the documents are the database's: the embedding sync serves them
    with app_database(env[ENV_APP_DB]):
        return _docs(args, DocumentStore(env[ENV_APP_DB]), fields)


def _docs(args: argparse.Namespace, store: DocumentStore, fields: Any) -> int:
    """``cmd_docs`` on its database (``fields``: how a file to load names them)."""
    import psycopg2

    from ..storage.documents import DocumentFileError

    store.ensure_schema()
    if args.docs_command == "quarantine":
        return _print_quarantined(store, args.load_id)
    if args.docs_command == "delete":
        return _delete_documents(store, args)
    if args.docs_command == "load":
        try:
            with progress(desc="documents", total=1.0, share=True) as bar:
                result = store.load_file(args.file, fields, progress=lambda share: bar.update(share - bar.n))
        except DocumentFileError as error:
            options = ", ".join(DOCUMENT_FIELD_OPTIONS.values())
            raise CliError(f"{args.file}: {error}; nothing was loaded ({options} name the file's fields)") from None
    else:
        from ..storage.documents import LoadResult
        from ..workload.documents import generate_documents

        result = LoadResult()
        with progress(desc="documents", total=args.n, unit="documents") as bar:
            for chunk in generate_documents(args.n, seed=args.seed, start_id=args.start_id):
                part = store.load_frame(chunk)
                result.rows += part.rows
                result.inserted += part.inserted
                result.updated += part.updated
                result.unchanged += part.unchanged
                bar.update(len(chunk))
    summary = result.summary()
    summary["first_rejections"] = [f"{r.where}: {r.reason}" for r in result.first_rejections(20)]
    try:
        summary["documents"] = store.count()
    except psycopg2.Error as error:  # the load has committed: a count that fails after it does not undo it
        summary["documents"] = None
        print(f"precompute docs: warning: loaded, but the count failed: {_one_line(error)}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def _delete_documents(store: DocumentStore, args: argparse.Namespace) -> int:
    """``docs delete``: soft-delete the ids given and those of ``--file`` (one a line, as written: only the line's end
    and a byte order mark go, since ``docs load`` keeps an id's blanks too; blank lines are skipped), so the next
    embedding sync removes them offline and from Redis; prints ``{"deleted": n, "not_live": m}`` and the first ids not
    live (unknown or deleted already), ``first_not_live``."""
    ids = list(args.ids)
    if args.file is not None:
        try:
            with open(args.file, encoding="utf-8-sig") as lines:
                ids += [line.removesuffix("\n") for line in lines if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise CliError(f"{args.file}: {error}") from None
    if not ids:
        raise CliError("name the documents to delete: doc ids, or --file with one id a line")
    ids = list(dict.fromkeys(ids))
    deleted = store.delete_returning(ids)
    not_live = [doc_id for doc_id in ids if doc_id not in deleted]
    print(json.dumps({"deleted": len(deleted), "not_live": len(not_live), "first_not_live": not_live[:20]}))
    return 0


def _print_quarantined(store: DocumentStore, load_id: str) -> int:
    """Print the rows a documents load quarantined, one JSON object a line; say so on stderr when there are none. A
    ``load_id`` that no load could have (a typo, a file name) is a CliError."""
    from ..storage.documents import LOAD_ID

    load_id = load_id.strip()  # pasted from a summary with the line's end
    if LOAD_ID.fullmatch(load_id) is None:
        raise CliError(
            f"{load_id!r} is not a load id: give the load_id of a `docs load` summary (like 20261207T061500Z-1a2b3c)"
        )
    shown = 0
    for position, reason, raw in store.quarantined(load_id):
        print(json.dumps({"position": position, "reason": reason, "raw": raw}, ensure_ascii=False))
        shown += 1
    if not shown:
        print(
            f"precompute docs: load {load_id!r} quarantined no rows (it rejected none, or there is no such load: the"
            f" load_id of a `docs load` summary)",
            file=sys.stderr,
        )
    return 0


def cmd_ads(args: argparse.Namespace) -> int:
    """Validate an ads file and make its valid rows the lake's ``ads``; print one JSON summary."""
    from functools import partial

    from ..ml.features import feature_problems, spec_dict, spec_from_env
    from ..stack import ENV_LAKE
    from ..storage.ad_data import AdDataError, file_format, load_ads
    from ..storage.lake import Lake

    try:
        file_format(args.file)  # checked before anything is touched
        spec = spec_from_env()  # the Definitions' feature set, read without importing Dagster (about a second)
    except ValueError as error:  # AdDataError, or a malformed PRECOMPUTE_AD_* feature set
        raise CliError(str(error)) from None
    lake = Lake(Stack().env()[ENV_LAKE])
    try:
        with _rows_read("ads") as rows_read:
            summary = load_ads(
                args.file,
                lake,
                required=spec.columns,
                row_problems=partial(feature_problems, spec=spec),
                text_columns=spec.categorical,
                progress=rows_read,
            )
    except AdDataError as error:
        raise CliError(str(error)) from None
    print(json.dumps({**summary.as_dict(), "features": spec_dict(spec)}))
    return 0


def cmd_impressions(args: argparse.Namespace) -> int:
    """Validate an impressions file and write its rows into the lake's daily ``ad_impressions``; print JSON."""
    import time

    from ..defs.settings import load_settings
    from ..serving.querylog import MAX_CLOCK_AHEAD_MS
    from ..stack import ENV_LAKE
    from ..storage.ad_data import AdDataError, file_format, load_impressions
    from ..storage.files import exclusive_lock
    from ..storage.lake import Lake

    try:
        file_format(args.file)
        settings = load_settings()  # the partitions' timezone and first day, without Dagster's definitions of them
    except ValueError as error:  # AdDataError, or a malformed PRECOMPUTE_TIMEZONE / PRECOMPUTE_PARTITIONS_START
        raise CliError(str(error)) from None
    stack = Stack()
    lake = Lake(stack.env()[ENV_LAKE])

    def waiting() -> None:
        print("precompute impressions: waiting for another impressions load of this lake to finish", file=sys.stderr)

    try:
        with _rows_read("impressions") as rows_read:
            summary = load_impressions(
                args.file,
                lake,
                timezone=settings.timezone,
                first_day=settings.partitions_start,
                not_after_ms=int(time.time() * 1000) + MAX_CLOCK_AHEAD_MS,
                append=args.append,
                progress=rows_read,
                exclusive=exclusive_lock(_load_lock_file(stack, lake, "ad_impressions"), waiting),
            )
    except AdDataError as error:
        raise CliError(str(error)) from None
    result = {**summary.as_dict(), "timezone": settings.timezone, "mode": "append" if args.append else "replace"}
    result["unknown_ad_impressions"] = summary.unknown_ad_impressions  # null without an ads catalog
    print(json.dumps(result))
    return 0


def _load_lock_file(stack: Stack, lake: Lake, asset: str) -> Path:
    """The lock file that loads into ``asset`` of ``lake`` take turns on (an append reads a partition and writes it
    back): beside its partitions in a local lake, so every process writing there sees it; in the state folder for a
    lake at a URI, which only this machine's loads see."""
    if "://" not in lake.base_uri:
        return Path(lake.path(asset)).parent / ".load.lock"
    digest = hashlib.sha256(lake.path(asset).encode()).hexdigest()[:16]
    return stack.home / "locks" / f"{asset}-{digest}.lock"


@contextlib.contextmanager
def _rows_read(what: str) -> Iterator[Callable[[int], None]]:
    """A counter of the rows a load has read, on stderr (``tools.progress``), as a callback of the rows read so far:
    reading and checking 20M impressions takes minutes before the days are written."""
    with progress(desc=what, unit="rows") as bar:
        yield lambda rows: bar.update(rows - bar.n)


def cmd_query_logs(args: argparse.Namespace) -> int:
    """Import a request log into the lake's hourly ``query_logs`` partitions; print one JSON summary. Its progress
    (``tools.progress``) names each stage from the first: reading and grouping a large log take most of the time."""
    with progress(desc=f"reading {args.file}", unit="hours") as bar:
        return _import_query_logs(args, bar)


def _counted(items: Iterable, bar: Any) -> Iterator:
    """``items``, each counted on ``bar`` once it is done."""
    for item in items:
        yield item
        bar.update()


def _import_query_logs(args: argparse.Namespace, bar: Any) -> int:
    """``cmd_query_logs``'s work, its stages told to ``bar``."""
    import time
    from collections import Counter
    from datetime import date, datetime
    from pathlib import Path
    from zoneinfo import ZoneInfo

    import numpy as np

    from ..defs.settings import load_settings
    from ..serving.keys import KIND_PATTERN
    from ..stack import ENV_LAKE
    from ..storage.files import exclusive_lock
    from ..storage.lake import Lake
    from ..storage.query_log_import import (
        epoch_seconds,
        first_valid_second,
        hour_rows,
        is_imported,
        is_relative,
        looks_like_filetime,
        merge_hour,
        other_kinds_imported,
        other_unit,
        placed_span_hours,
        time_unit,
    )

    check_trace_options(args)
    if not KIND_PATTERN.fullmatch(args.kind):
        raise CliError(f"invalid --kind {args.kind!r}: lower-case letters, digits and _, starting with a letter")
    try:
        settings = load_settings()
    except ValueError as error:  # a malformed PRECOMPUTE_TIMEZONE or PRECOMPUTE_PARTITIONS_START
        raise CliError(str(error)) from None
    try:
        start = None if args.start is None else date.fromisoformat(args.start)
    except ValueError as error:
        raise CliError(f"--start {args.start}: {error}") from None
    # the lake's keys must be the ids clients ask for: 007 must not become 7 as the replay may read it
    trace, malformed = read_trace(args.file, args, quarantine=True, exact_keys=True)
    if malformed:
        line_no, problem = malformed[0]
        first = problem if trace.format == "parquet" else f"line {line_no}: {problem}"  # a row's names its file and row
        print(f"precompute query-logs: warning: quarantined {len(malformed)} malformed lines (first: {first})",
              file=sys.stderr)  # fmt: skip
    if trace.timestamps is None:
        raise CliError(f"{args.file}: the requests have no timestamps (name their field with --time-field)")
    if trace.dated and args.time_unit not in ("auto", "s"):  # a unit would have scaled seconds: 4 days into 6 minutes
        raise CliError(f"{args.file}: --time-unit {args.time_unit} reads numeric timestamps, and these are date-times "
                       "(seconds since 1970 already): leave it out; nothing was written")  # fmt: skip
    unit = time_unit(trace.timestamps) if args.time_unit == "auto" else args.time_unit  # found once, used twice
    seconds = epoch_seconds(trace.timestamps, unit)
    if args.time_unit == "auto" and is_relative(seconds) and looks_like_filetime(trace.timestamps):
        raise CliError(f"{args.file}: the timestamps look like Windows file times (100 ns since 1601, as in MSR "
                       "Cambridge's traces): give --time-unit filetime; nothing was written")  # fmt: skip
    if start is not None and args.time_unit == "auto" and is_relative(seconds):
        # Their size cannot tell: 3919 is an hour in seconds and 4 seconds in milliseconds.
        raise CliError(f"{args.file}: timestamps relative to the trace's start need --time-unit (s, ms, us or ns): "
                       "their size does not tell seconds from milliseconds; nothing was written")  # fmt: skip
    shift, trace_start = 0.0, -np.inf
    if start is not None:  # the first request moves to the start of that local day, the others with it
        if (first_valid := first_valid_second(seconds)) is None:
            raise CliError(f"{args.file}: no timestamp can be a request's (finite, from 2000 on as epoch time, or not "
                           "negative counted from the trace's start); nothing was written")  # fmt: skip
        midnight = datetime.combine(start, datetime.min.time(), tzinfo=ZoneInfo(settings.timezone))
        shift = midnight.timestamp() - first_valid
        if is_relative(seconds):  # its 0 is the trace's start: a negative one was placed in the day before
            trace_start = shift
        seconds = seconds + shift
    elif is_relative(seconds):
        first = float(np.nanmin(seconds))
        raise CliError(f"{args.file}: the timestamps count from the trace's start, not from 1970 (first: {first:g}): "
                       "give --start YYYY-MM-DD to place the first request")  # fmt: skip
    # Dagster (about a second to import) only once the file has been read: a bad file or option fails at once.
    import dagster as dg

    from ..defs.partitions import Partitions

    hourly = Partitions.of_settings(settings).hourly
    first_s = hourly.time_window_for_partition_key(hourly.get_first_partition_key()).start.timestamp()
    now_key = hourly.get_partition_key_for_timestamp(time.time())  # the hour in progress is not over
    last_s = hourly.time_window_for_partition_key(now_key).start.timestamp()
    source = Path(input_path(args.file)).name.replace(":", "_")[:40]
    bar.set_description_str(f"grouping {len(trace.keys):,} requests by hour")
    rows = hour_rows(trace.keys, seconds, kind=args.kind, source=source,
                     partition_key=hourly.get_partition_key_for_timestamp, first_s=first_s, last_s=last_s,
                     trace_start_s=trace_start,
                     strays=other_unit(trace.timestamps, unit) if args.time_unit == "auto" else None)  # fmt: skip
    check_placement(args, rows, len(trace.keys), seconds, settings.timezone)
    bar.set_description_str("starting the stack")
    stack = Stack()
    lake = Lake(_up(stack, redis=False)[ENV_LAKE])  # the hours go to the lake and Dagster, not to the cache
    written, kept, recorded, kept_logged = {}, [], [], []

    def waiting() -> None:
        print("precompute query-logs: waiting for another import into this lake to finish", file=sys.stderr)

    # Imports of one lake take turns: an import of another kind merges its rows into an hour another may be writing.
    lock = exclusive_lock(_load_lock_file(stack, lake, "query_logs"), waiting)
    with lock, dagster_instance(stack) as instance:

        def record(hour: str, frame, source: str) -> None:
            """The lake's ``hour`` as a ``query_logs`` materialization; a failing Dagster storage is a CliError."""
            metadata = {"dagster/row_count": len(frame), "distinct_keys": int(frame["key"].nunique()),
                        "imported": is_imported(frame), "source": source}  # fmt: skip
            try:
                instance.report_runless_asset_event(
                    dg.AssetMaterialization(asset_key="query_logs", partition=hour, metadata=metadata)
                )
            except _dagster_storage_errors() as error:
                raise CliError(f"Dagster's storage failed recording hour {hour}, which the lake holds "
                               f"({len(written)} hours written and recorded before it): {_one_line(error)}; "
                               "run the same import again to record it") from None  # fmt: skip

        try:
            materialized = instance.get_materialized_partitions(dg.AssetKey("query_logs"))
        except _dagster_storage_errors() as error:
            raise CliError(f"Dagster's storage cannot be read, nothing was written: {_one_line(error)}") from None
        bar.set_description_str("writing the hours")
        bar.total = len(rows.frames)
        for hour in _counted(sorted(rows.frames), bar):
            existing = lake.read("query_logs", hour) if lake.exists("query_logs", hour) else None
            others = None if existing is None else other_kinds_imported(existing, args.kind)
            # An hour the stream wrote is kept (even with --replace: the client's own log of it), one that holds this
            # kind already unless --replace; other kinds' imports and an hour drained empty are not.
            logged = existing is not None and len(existing) > 0 and others is None
            taken = logged or (others is not None and len(others) < len(existing))
            if logged or (taken and not args.replace):
                kept.append(hour)
                if logged and args.replace:
                    kept_logged.append(hour)
                if hour not in materialized:  # written by an import that failed before Dagster recorded it
                    record(hour, existing, "lake")
                    recorded.append(hour)
                continue
            frame = rows.frames[hour]  # built now: one hour's rows in memory at a time
            written[hour] = len(frame)
            if others is not None and len(others):  # imports of other kinds stay beside this one
                frame = merge_hour(others, frame)
            lake.write("query_logs", hour, frame)
            record(hour, frame, source)
    summary = {
        "requests": len(trace.keys),
        "imported": sum(written.values()),
        "hours": len(written),
        "first_hour": min(written, default=None),
        "last_hour": max(written, default=None),
        "kept_hours": len(kept),
        "kept_requests": sum(rows.frames.requests(hour) for hour in kept),
        "kept_hours_recorded": len(recorded),  # kept hours Dagster did not know of, recorded now
        "quarantined": sum(rows.quarantined.values()) + len(malformed),
        "quarantine_reasons": dict((rows.quarantined + Counter({"malformed line": len(malformed)})).most_common()),
        "malformed_lines": [{"line": line_no, "problem": problem} for line_no, problem in malformed[:10]],
        "shift_s": shift,
        "span_hours": placed_span_hours(
            seconds, first_s, last_s, trace_start
        ),  # a quarantined 1e300 showed 2.8e293 hours
        "timezone": settings.timezone,
    }
    if trace.skipped is not None:  # Redis MONITOR commands naming no key (PING, AUTH...): read, and no request
        summary["skipped_commands"] = trace.skipped
    if kept_logged:
        print(f"precompute query-logs: warning: kept {len(kept_logged)} hours the serving client logged (first "
              f"{min(kept_logged)}): --replace overwrites only imported hours", file=sys.stderr)  # fmt: skip
    elif kept:
        print(f"precompute query-logs: warning: kept {len(kept)} hours the lake already holds "
              f"(first {min(kept)}); --replace overwrites the imported ones", file=sys.stderr)  # fmt: skip
    print(json.dumps(summary))
    return 0


def check_placement(args: argparse.Namespace, rows, requests: int, seconds, timezone: str) -> None:
    """CliError, before anything is written, for an import that would quarantine every request, or, unless
    ``--allow-outside``, more than half of them for falling outside the hourly partitions (misread timestamps)."""
    import numpy as np

    from ..storage.query_log_import import outside_share

    reasons = ", ".join(f"{n} {reason}" for reason, n in rows.quarantined.most_common())
    if rows.frames and (args.allow_outside or outside_share(rows, requests) <= 0.5):
        return
    finite = seconds[np.isfinite(seconds)]
    span = ""
    if len(finite):
        first, last = (_local_minute(float(f(finite)), timezone) for f in (np.min, np.max))
        span = f"; the requests were placed from {first} to {last} {timezone}"
    what = "every request" if not rows.frames else f"more than half of the {requests} requests"
    hint = "check --start and --time-unit" + ("" if not rows.frames else ", or --allow-outside imports the rest")
    raise CliError(f"{args.file}: {what} would be quarantined ({reasons}){span}: {hint}; nothing was written")


def _local_minute(second: float, timezone: str) -> str:
    """``second`` as ``check_placement`` names a placed request's time; beyond the years a date can show (a corrupt
    1e26 failed the refusal with "OverflowError: timestamp out of range", not naming why nothing was written), which
    side."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    try:
        return f"{datetime.fromtimestamp(second, ZoneInfo(timezone)):%Y-%m-%d %H:%M}"
    except (OverflowError, ValueError, OSError):
        return "after the year 9999" if second > 0 else "before the year 1"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``precompute: ...``) and exit code 2, like every CLI error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    return _whole_number(text, 1)


def bench_size(text: str) -> int:
    """An argparse type: a benchmark's size, 1..``MAX_BENCH_SIZE`` (a typo of a few more zeros ran out of memory
    before it said anything)."""
    return _whole_number(text, 1, MAX_BENCH_SIZE)


def client_processes(text: str) -> int:
    """An argparse type: load-test client processes, 1..``MAX_PROCESSES`` (bounded: each is a Python process)."""
    return _whole_number(text, 1, MAX_PROCESSES)


MAX_BENCH_SIZE = 100_000_000  # keys, documents, ads or queries a benchmark generates
MAX_PROCESSES = 64


def percentile_samples(text: str) -> int:
    """An argparse type: a whole number of timed samples, 100 (a p99 of fewer is one of the few it had) to
    ``MAX_BENCH_SIZE`` (two billion filled memory before a word)."""
    return _whole_number(text, 100, MAX_BENCH_SIZE)


def phase_seconds(text: str) -> int:
    """An argparse type: seconds of a load phase, 1..``MAX_PHASE_S``."""
    return _whole_number(text, 1, MAX_PHASE_S)


def daemon_logins(text: str) -> int:
    """An argparse type: logins timed through the daemon, 0..``MAX_DAEMON_LOGINS`` (each takes 5-15 s)."""
    return _whole_number(text, 0, MAX_DAEMON_LOGINS)


MAX_PHASE_S = 3600
MAX_DAEMON_LOGINS = 100


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    return _whole_number(text, 0)


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1..65535."""
    return _whole_number(text, 1, 65535)


def _whole_number(text: str, least: int, most: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    if most is not None and value > most:
        raise argparse.ArgumentTypeError(f"must be at most {most}, got {value}")
    return value


NAMESPACE_HELP = "the key namespace (default pc): keys are NAMESPACE:1:..."


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="precompute", description=__doc__.replace("``", ""))  # the docstring's markup is not help
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the embedded PostgreSQL and Redis (unless URLs are set)").set_defaults(fn=cmd_up)
    down = sub.add_parser("down", help="stop the embedded services")
    down.add_argument(
        "--purge",
        action="store_true",
        help="also delete their data (PRECOMPUTE_HOME and, as root, PostgreSQL's folder)",
    )
    down.add_argument(
        "--force",
        action="store_true",
        help="stop them also under Dagster runs in progress (which then fail); without it, such runs refuse the stop",
    )
    down.set_defaults(fn=cmd_down)
    sub.add_parser("status", help="what runs where").set_defaults(fn=cmd_status)
    sub.add_parser("env", help="print the environment variables of the stack").set_defaults(fn=cmd_env)
    cache = sub.add_parser("cache", help="operate the serving cache: invalidate values, show statistics")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    inval = cache_sub.add_parser("invalidate", help="remove values of one kind by key, key prefix or old version")
    inval.add_argument(
        "--kind", required=True, help="the kind of prediction (ctr, doc_embedding, a task type...): one kind at a time"
    )
    target = inval.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--key", help="one key: from the current version, the version it replaced while in its grace, and the live tier"
    )
    target.add_argument("--prefix", help="every key starting with this (SCAN/HSCAN in bounded batches)")
    target.add_argument("--version", help="every bucket of a version that is not current")
    inval.add_argument("--namespace", default="pc", help=NAMESPACE_HELP)
    inval.set_defaults(fn=cmd_cache)
    stats = cache_sub.add_parser(
        "stats",
        help="per kind: current version, keys, memory, TTL, hit rate (per version read), most missed; "
        "per task type: queued and running runs, average run time",
    )
    stats.add_argument("--kind", help="only this kind (default: every kind with a version or requests in the window)")
    stats.add_argument("--window", type=duration_s, default=3600.0, help="query-log window: 90s, 30m, 1h, 2d")
    stats.add_argument("--json", action="store_true", help="one JSON object")
    stats.add_argument("--namespace", default="pc", help=NAMESPACE_HELP)
    stats.set_defaults(fn=cmd_cache)
    pools = sub.add_parser("pools", help="Dagster's concurrency pools (redis_publish, embedding_sync)")
    free = pools.add_subparsers(dest="pools_command", required=True).add_parser(
        "free",
        help="free the slots of runs that ended (a daemon frees them 30 s after the end; without one nothing does, "
        "and every later run of the pool waits)",
    )
    free.add_argument("--run", help="also this run (its ID or first characters): marked failed if it has not ended")
    free.set_defaults(fn=cmd_pools)
    redis_sub = sub.add_parser("redis", help="Redis administration").add_subparsers(dest="redis_command", required=True)
    acl = redis_sub.add_parser(
        "acl",
        help="least-privilege publisher and reader users of a namespace: print ACL file lines, or --apply them "
        f"(passwords from {ENV_PUBLISHER_PASSWORD} and {ENV_READER_PASSWORD})",
    )
    acl.add_argument("--namespace", default="pc", help=NAMESPACE_HELP)
    acl.add_argument("--publisher-user", help="default: NAMESPACE-publisher")
    acl.add_argument("--reader-user", help="default: NAMESPACE-reader")
    acl.add_argument("--kinds", help="comma-separated kinds the reader may write live values of (default: any)")
    acl.add_argument(
        "--apply",
        action="store_true",
        help=f"ACL SETUSER both users on {ENV_REDIS_ADMIN} (default {ENV_REDIS}), as a user allowed to run it "
        "(without it: print the ACL file lines, password hashes only)",
    )
    acl.set_defaults(fn=cmd_redis_acl)
    dev = sub.add_parser("dev", help="up + the Dagster UI (dagster dev -w workspace.yaml)")
    dev.add_argument("--host", default="127.0.0.1", help="the Dagster UI's address (default 127.0.0.1)")
    dev.add_argument("--port", type=port_number, default=3000, help="the Dagster UI's port (default 3000)")
    dev.set_defaults(fn=cmd_dev)
    demo = sub.add_parser("demo", help="synthetic traffic through the serving client, then the asset graph")
    demo.add_argument("--days", type=positive_int, default=3, help="days of history before the replayed day")
    demo.add_argument("--queries-per-day", type=positive_int, default=40_000, help="synthetic queries a day (40,000)")
    demo.add_argument("--ads", type=positive_int, default=20_000, help="ads in the synthetic catalog (20,000)")
    demo.add_argument("--top-n", type=positive_int, default=1000, help="ads to precompute (1000)")
    demo.add_argument(
        "--capacity", type=positive_int, help="cache capacity in keys for the hit-rate comparison (default 2 x top-n)"
    )
    demo.add_argument(
        "--docs",
        type=positive_int,
        default=50_000,
        help="documents to generate and embed (more than the embedder's dimensions, 300)",
    )
    demo.add_argument("--seed", type=non_negative_int, default=0, help="of the synthetic traffic (0)")
    demo.set_defaults(fn=cmd_demo)
    bench = sub.add_parser("bench", help="benchmarks: print one JSON object")
    bench.add_argument(
        "what",
        choices=["serve", "publish", "graph", "embed", "campaign", "demand", "load", "rerank", "events", "admission"],
    )
    bench.add_argument("--processes", type=client_processes, default=2, help="load: client processes (at most 64)")
    bench.add_argument(
        "--daemon-logins",
        type=daemon_logins,
        default=0,
        help="events: logins also timed through a real dagster-daemon (about 5-15 s each; 0: none)",
    )
    bench.add_argument("--seconds", type=phase_seconds, default=10, help="load: seconds per phase (at most 3600)")
    bench.add_argument("--docs", type=bench_size, default=1_000_000, help="embed: documents")
    bench.add_argument(
        "--queries", type=bench_size, default=10_000_000, help="graph: logged queries over 7 days (at least 7)"
    )
    bench.add_argument("--ads", type=bench_size, default=100_000, help="graph: ads in the catalog")
    bench.add_argument("--n", type=bench_size, default=1_000_000, help="publish: keys to publish")
    bench.add_argument(
        "--keys",
        type=bench_size,
        help="serve: keys (default 10,000); demand, load, rerank, admission: keys or documents (100,000)",
    )
    bench.add_argument("--days", type=positive_int, default=14, help="demand: days of hourly counts (last held back)")
    bench.add_argument("--seed", type=non_negative_int, default=0, help="demand: synthetic counts")
    bench.add_argument("--lookups", type=percentile_samples, default=50_000,
                       help="serve, admission: lookups timed (50,000; at least 100, for a p99)")  # fmt: skip
    bench.add_argument("--capacity", type=bench_size, help="admission: probation's keys (default: a tenth of --keys)")
    bench.set_defaults(fn=cmd_bench)
    docs = sub.add_parser(
        "docs", help="the document store: load a file, list a load's quarantined rows, generate documents"
    )
    docs_sub = docs.add_subparsers(dest="docs_command", required=True)
    load = docs_sub.add_parser(
        "load", help="upsert documents from JSONL, CSV, TSV or Parquet (doc_id, title, body, language)"
    )
    load.add_argument("file", help=".jsonl/.ndjson/.json, .csv or .tsv (each optionally .gz), or .parquet")
    for column, option in DOCUMENT_FIELD_OPTIONS.items():
        load.add_argument(
            option,
            dest=f"field_{column}",
            metavar="FIELD",
            help=f"the file's field that holds {column} (default: {column}, if the file has it"
            + (")" if column != "doc_id" else "; it must)")
            + "; a 1-based number with --no-header",
        )
    load.add_argument("--no-header", action="store_true", help="a CSV or TSV file without a header line")
    load.add_argument("--language", metavar="TAG", help="the BCP 47 tag of documents that have none (e.g. en)")
    quarantine = docs_sub.add_parser(
        "quarantine", help="the rows a load rejected, one JSON object a line (position, reason, raw), in file order"
    )
    quarantine.add_argument("load_id", help="the load_id of a `docs load` summary")
    delete = docs_sub.add_parser(
        "delete",
        help="delete documents (kept as tombstones): the next embedding sync removes them offline and from Redis; "
        "never DELETE rows in SQL, which no sync sees",
    )
    delete.add_argument("ids", nargs="*", help="doc ids")
    delete.add_argument("--file", help="a text file of doc ids, one a line")
    generate = docs_sub.add_parser("generate", help="synthetic documents in 14 languages and scripts")
    generate.add_argument("--n", type=bench_size, required=True, help="documents to generate")
    generate.add_argument("--seed", type=non_negative_int, default=0, help="the same seed, the same documents (0)")
    generate.add_argument("--start-id", type=non_negative_int, default=0, help="the first document's id (0)")
    docs.set_defaults(fn=cmd_docs)
    ads = sub.add_parser("ads", help="the lake's ad catalog: load your own ads")
    ads_sub = ads.add_subparsers(dest="ads_command", required=True)
    ads_load = ads_sub.add_parser("load", help="validate a Parquet or CSV file and make it the lake's ads table")
    ads_load.add_argument("file")
    ads.set_defaults(fn=cmd_ads)
    impressions = sub.add_parser("impressions", help="the lake's daily ad impressions: load your own")
    impressions_sub = impressions.add_subparsers(dest="impressions_command", required=True)
    impressions_load = impressions_sub.add_parser(
        "load", help="validate a Parquet or CSV file (ts_ms, ad_id, clicked) into daily ad_impressions partitions"
    )
    impressions_load.add_argument("file")
    impressions_load.add_argument(
        "--append", action="store_true", help="add to the days' partitions instead of replacing them"
    )
    impressions.set_defaults(fn=cmd_impressions)
    from .campaigns import cmd_campaign

    campaign = sub.add_parser("campaign", help="the campaign registry: register, list, show, cancel (JSON out)")
    campaign_sub = campaign.add_subparsers(dest="campaign_command", required=True)
    register = campaign_sub.add_parser("register", help="register or update the campaigns of a JSONL or CSV file")
    register.add_argument("--file", required=True, help="JSONL: one campaign per line; CSV: one row per ad")
    listing = campaign_sub.add_parser("list", help="registered campaigns by launch time")
    listing.add_argument("--tenant", help="only this tenant's campaigns")
    listing.add_argument("--status", choices=["active", "cancelled"], help="only campaigns with this status")
    show = campaign_sub.add_parser("show", help="one campaign with its ads")
    show.add_argument("campaign_id")
    cancel = campaign_sub.add_parser("cancel", help="cancel a campaign (its warmed values are removed)")
    cancel.add_argument("campaign_id")
    campaign.set_defaults(fn=cmd_campaign)
    query_logs = sub.add_parser("query-logs", help="the lake's hourly query_logs: import a request log")
    query_logs_sub = query_logs.add_subparsers(dest="query_logs_command", required=True)
    importing = query_logs_sub.add_parser(
        "import", help="a request log (any trace replay reads, with timestamps) into hourly query_logs partitions"
    )
    importing.add_argument("file", help="a trace file or folder, as replay's --trace; - reads standard input")
    importing.add_argument(
        "--kind",
        default="ctr",
        help="the kind every imported row is labelled with (default ctr); it does not filter: --where kind=ctr does",
    )
    importing.add_argument(
        "--start",
        help="YYYY-MM-DD: move the first request to this local day (timestamps relative to the start, which need "
        "--time-unit)",
    )
    importing.add_argument("--replace", action="store_true", help="overwrite hours the lake already holds")
    importing.add_argument(
        "--allow-outside",
        action="store_true",
        help="import even when more than half of the requests fall outside the hourly partitions (before the first "
        "or in the hour in progress; they are quarantined and counted); without it such an import writes nothing",
    )
    importing.add_argument(
        "--time-unit",
        choices=["auto", "s", "ms", "us", "ns", "filetime"],
        default="auto",
        help="of numeric timestamps (ISO 8601 and Parquet timestamps are exact); auto: by size, for epoch "
        "timestamps only: relative ones (with --start) must name their unit; filetime: Windows file times (100 ns "
        "since 1601, MSR Cambridge's traces)",
    )
    add_trace_options(importing)
    query_logs.set_defaults(fn=cmd_query_logs)
    replay = sub.add_parser(
        "replay", help="hit rates of LRU, S3-FIFO, ARC, static top-N, ours and two offline bounds on a trace"
    )
    replay.add_argument(
        "--trace",
        required=True,
        help="one key per line, or timestamp,key[,more fields] lines (timestamps in seconds, ms or ISO 8601; "
        "a header line is skipped; fields separated by "
        "commas, or by spaces or tabs), Redis MONITOR output, or libCacheSim's binary oracleGeneral records; .gz, "
        ".bz2, .xz, .zst, .lz4 "
        "and .br files are decompressed; or a Parquet file or folder of them (the lake's query_logs), local or "
        "a URI (s3://...); - reads standard input",
    )
    add_trace_options(replay)
    replay.add_argument("--days", type=int, required=True, help="split the trace into this many days (2 to 3650)")
    replay.add_argument(
        "--top-n",
        type=top_n_or_auto,
        required=True,
        help="keys precomputed each day, or 'auto': chosen each day by replaying the previous days",
    )
    replay.add_argument("--capacity", type=int, required=True, help="cache capacity in keys (>= top-n)")
    replay.add_argument(
        "--strategy",
        help="also replay top-N ranked by this demand strategy (frequency, ewma, seasonal, lstm, auto), or prefetch "
        "(ours plus learned next-key prefetch), several separated by commas, or 'all', each plus an LRU of "
        "capacity - top-n keys",
    )
    replay.add_argument(
        "--next-key",
        action="store_true",
        help="next-key top-1/top-10 accuracy of an LSTM, Markov-1 and most-popular on the later days",
    )
    replay.add_argument(
        "--train-days", type=int, help="days the next-key LSTM trains on (default: the first half of --days)"
    )
    replay.add_argument(
        "--ab",
        metavar="A,B",
        help="an A/B experiment of two strategies: keys split by a salted hash, each arm precomputing half of "
        "top-n by its own strategy; per-arm hit rates with bootstrap-over-keys intervals and a sample-ratio check",
    )
    replay.add_argument("--ab-salt", default="ab1", help="the salt of --ab's key split")
    replay.add_argument(
        "--margin",
        type=float,
        default=0.005,
        help="the beats_baselines rule's margin (demand_model's): auto uses a day's LSTM, and the next day's training "
        "warm-starts from it, only when its held-back hit rate beats the best baseline's by more than this. Unlike "
        "demand_model's, it may be negative here, to see what following LSTMs that lost would have given",
    )
    replay.add_argument(
        "--prefetch-threshold",
        type=float,
        default=0.5,
        help="prefetch each of the 4 most likely next keys at this confidence or more",
    )
    replay.add_argument(
        "--admission",
        help="always, second_miss, frequency or probation: also replay LRU and ours with get_or_compute's "
        "admission policy (hit_rate_lru_admission, hit_rate_ours_admission; with --top-n auto the share is tuned "
        "on that live tier), each demand strategy beside it (hit_rate_admission; not prefetch), and --ab's arms",
    )
    replay.add_argument(
        "--sample",
        type=float,
        default=1.0,
        metavar="RATE",
        help="replay only the requests of a fixed hash-sampled share RATE of the keys (SHARDS), with --capacity and "
        "--top-n scaled by RATE: estimates of the whole trace's hit rates in about RATE of the time (default 1: all); "
        "the policies, --strategy (not prefetch: 'all' leaves it out) and --ab on the sampled keys, not --next-key",
    )
    replay.set_defaults(fn=cmd_replay)
    return parser


def _interruptions() -> tuple[type[BaseException], ...]:
    """What Ctrl-C raises: ``KeyboardInterrupt``, or inside a Dagster run in process, Dagster's own error for it
    (looked up only where Dagster was imported: the light commands never import it)."""
    errors = sys.modules.get("dagster._core.errors")
    return (KeyboardInterrupt,) if errors is None else (KeyboardInterrupt, errors.DagsterExecutionInterruptedError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    # Dagster warns about its own internal use of a beta parameter whenever Definitions resolve sensors: noise
    # on every command's stderr that no setting of ours can change.
    warnings.filterwarnings("ignore", message="Parameter `owners` of initializer `SensorDefinition.__init__`")
    if sys.stdout is None:  # started with it closed (`>&-`): Python prints nothing, and a result would be lost
        if sys.stderr is not None:
            print(f"precompute {args.command}: standard output is closed: nowhere to write the result", file=sys.stderr)
        return 2
    try:
        return args.fn(args) or 0
    except (CliError, StackError, RedisError) as error:
        if os.environ.get(ENV_TRACEBACK) and error.__context__ is not None:
            error.__suppress_context__ = False  # the error of a file, URL or server it stands for, and where it was
            raise
        print(f"precompute {args.command}: {one_line(str(error))}", file=sys.stderr)  # one line, always
        return 2
    except _interruptions():
        # Ctrl-C: one line, and the shell's code of an interrupted command (128 + SIGINT); a run in process (demo,
        # bench) turns it into Dagster's own interruption, which is an interruption all the same.
        if os.environ.get(ENV_TRACEBACK):
            raise
        print(f"precompute {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`| head`): no traceback, and no flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except MemoryError as error:  # numpy's "Unable to allocate ..." too: an input too big for the machine, not a bug
        if os.environ.get(ENV_TRACEBACK):
            raise
        detail = one_line(str(error)) or "an allocation failed"
        print(f"precompute {args.command}: out of memory ({detail}): the input is too large for this machine's "
              f"memory; load it in parts ({ENV_TRACEBACK}=1 shows where)", file=sys.stderr)  # fmt: skip
        return 2
    except _environment_errors() as error:  # a file, URL, server or value we were given that does not work
        if os.environ.get(ENV_TRACEBACK):
            raise
        detail = one_line(str(error)) or "no detail"
        print(
            f"precompute {args.command}: {type(error).__name__}: {detail} ({ENV_TRACEBACK}=1 shows where)",
            file=sys.stderr,
        )
        return 2


ENV_TRACEBACK = "PRECOMPUTE_TRACEBACK"


def _dagster_storage_errors() -> tuple[type[BaseException], ...]:
    """What Dagster's storage raises when its database fails: its own errors, SQLAlchemy's and psycopg2's."""
    import psycopg2
    import sqlalchemy.exc
    from dagster import DagsterError
    from dagster_postgres.utils import DagsterPostgresException

    return DagsterError, DagsterPostgresException, sqlalchemy.exc.SQLAlchemyError, psycopg2.Error


def _environment_errors() -> tuple[type[BaseException], ...]:
    """What bad input or a bad environment raises below the checks the commands make themselves: files (OSError),
    values and formats (ValueError, pyarrow's ArrowInvalid among them; OverflowError), and the database and Redis
    clients' errors (RedisClusterException is no RedisError; Dagster's storage, ``_dagster_storage_errors``)."""
    import psycopg2
    import redis.exceptions

    return (
        OSError,
        ValueError,
        ArithmeticError,
        psycopg2.Error,
        redis.exceptions.RedisError,
        redis.exceptions.RedisClusterException,
        # Only a command that imported Dagster can raise its errors; importing it here to name them cost a command
        # that never needed it a second on its way out.
        *(_dagster_storage_errors() if "dagster" in sys.modules else ()),
    )


if __name__ == "__main__":
    sys.exit(main())
