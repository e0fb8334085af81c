"""Test data written straight into the lake: hourly query logs, an ad catalog, daily impressions."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable

import pandas as pd
import redis

from precompute_assets.defs.partitions import DEFAULT_PARTITIONS
from precompute_assets.serving import connect
from precompute_assets.storage.lake import Lake
from precompute_assets.storage.tables import query_log_frame
from precompute_assets.workload.ads import generate_traffic, make_ads


def with_login(url: str, userinfo: str) -> str:
    """``url`` of the embedded PostgreSQL (user postgres, with the home's password) logging in as ``userinfo``."""
    changed = re.sub(r"://postgres(:[^@/]*)?@", f"://{userinfo}@", url, count=1)
    assert changed != url or f"://{userinfo}@" in url, url
    return changed


def log_client(url: str) -> redis.Redis:
    """A client for a test's query or event logger. The serving default (50 ms per command) suits lookups that
    would rather compute live; on a busy 2-core machine it fails whole batches, and tests count every write."""
    return connect(url, socket_timeout=5)


def day_start_ms(day: str) -> int:
    return int(DEFAULT_PARTITIONS.daily.time_window_for_partition_key(day).start.timestamp() * 1000)


def write_query_logs(
    lake: Lake, day: str, keys_per_hour: list[list[str]] | list[str], *, kind: str = "ctr", append: bool = False
) -> None:
    """Write one day of hourly query_logs partitions; ``keys_per_hour`` is one list of keys per hour, or one
    list used for every hour; ``append`` adds them to what the hour already holds."""
    hours = DEFAULT_PARTITIONS.hours_of(day)
    for index, hour in enumerate(hours):
        keys = keys_per_hour[index] if keys_per_hour and isinstance(keys_per_hour[0], list) else keys_per_hour
        start = day_start_ms(day) + index * 3_600_000
        rows = [
            {"stream_id": f"{start + i}-0", "ts_ms": start + i, "kind": kind, "key": key, "hit": False,
             "latency_us": 50, "user": None, "tenant": None}
            for i, key in enumerate(keys)
        ]  # fmt: skip
        frame = query_log_frame(rows)
        if append and lake.exists("query_logs", hour):
            frame = pd.concat([lake.read("query_logs", hour), frame], ignore_index=True)
        lake.write("query_logs", hour, frame)


def write_ad_platform(lake: Lake, days: list[str], *, n_ads: int = 2000, queries_per_day: int = 40_000, seed: int = 0):
    """An ad catalog, its traffic as hourly query logs and as daily impressions. Returns the ads table."""
    ads = make_ads(n_ads, days=len(days), seed=seed)
    lake.write("ads", None, ads)
    traffic = pd.concat(
        generate_traffic(
            ads, start_ms=day_start_ms(days[0]), days=len(days), queries_per_day=queries_per_day, seed=seed
        )
    )
    for day in days:
        start = day_start_ms(day)
        todays = traffic[(traffic["ts_ms"] >= start) & (traffic["ts_ms"] < start + 86_400_000)]
        lake.write("ad_impressions", day, todays[["ts_ms", "ad_id", "clicked"]])
        hour_index = (todays["ts_ms"].to_numpy() - start) // 3_600_000
        write_query_logs(lake, day, [todays["ad_id"][hour_index == h].tolist() for h in range(24)])
    return ads


def logged_queries(client, schema, *, min: str = "-", max: str = "+") -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Every query in the query-log stream between stream IDs ``min`` and ``max``, one ``(id, fields)`` each."""
    from precompute_assets.serving.querylog import expand_entries

    return list(expand_entries(client.xrange(schema.query_log(), min=min, max=max)))


class CountingClient:
    """A redis client that counts round trips: every direct command, every pipeline executed, and every connection
    taken from its pool (``connection.send_pipelined`` sends on one)."""

    def __init__(self, client):
        self.client, self.round_trips = client, 0
        self.connection_pool = _CountingPool(self)

    def pipeline(self, *args, **kwargs):
        pipe = self.client.pipeline(*args, **kwargs)
        execute = pipe.execute

        def counted(*a, **k):
            self.round_trips += 1
            return execute(*a, **k)

        pipe.execute = counted
        return pipe

    def __getattr__(self, name):
        attribute = getattr(self.client, name)
        if not callable(attribute):
            return attribute

        def counted(*args, **kwargs):
            self.round_trips += 1
            return attribute(*args, **kwargs)

        return counted


class _CountingPool:
    def __init__(self, counter: CountingClient):
        self._counter, self._pool = counter, counter.client.connection_pool

    def get_connection(self, *args, **kwargs):
        self._counter.round_trips += 1
        return self._pool.get_connection(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pool, name)


# A server started with these logs every command it runs (``commands_run`` reads them back).
LOG_EVERY_COMMAND = ("slowlog-log-slower-than 0", "slowlog-max-len 1000000")


def commands_run(client: redis.Redis) -> list[tuple[list[str], int]]:
    """The commands a server started with ``LOG_EVERY_COMMAND`` ran, oldest first, each as its first arguments (the
    slow log keeps 32) and its whole argument count; the log is emptied."""
    commands = []
    for entry in reversed(client.execute_command("SLOWLOG", "GET", "-1")):
        args = [arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg) for arg in entry[3]]
        more = args[-1].partition("... (")[2].partition(" more arguments)")[0] if args else ""
        count = len(args) - 1 + int(more) if more.isdigit() else len(args)
        commands.append((args, count))
    client.execute_command("SLOWLOG", "RESET")
    return commands


# A primary starts a replica's full sync at once: by default it waits 5 s for more replicas to share one diskless
# transfer, which every test that starts a replica (or fails over) spent doing nothing.
PROMPT_FULL_SYNC = "repl-diskless-sync-delay 0"


def wait_for_replica(primary: redis.Redis, replica: redis.Redis, timeout_s: float = 15.0) -> None:
    """Wait until ``replica`` has synced from ``primary`` as both see it: its link is up, and the primary lists it
    online. The replica reports its link up a moment before the primary lists it, and a publish in between waits
    for no replica at all (``replication.wait_for_replicas`` counts the ones online when it starts)."""
    from precompute_assets.serving.replication import online_replicas

    port = replica.connection_pool.connection_kwargs["port"]
    deadline = time.monotonic() + timeout_s
    while not (
        replica.info("replication").get("master_link_status") == "up"
        and any(name.endswith(f":{port}") for name in online_replicas(primary.info("replication")))
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"replica {port} never synced")
        time.sleep(0.05)


def run_interleaved(work: Callable[[], None], threads: int, path: str) -> None:
    """Run ``work`` in ``threads`` threads at once, switching between them between any two bytecodes of the code in
    ``path`` (``switching_between_bytecodes``), and wait for them all."""
    threading.settrace(switching_between_bytecodes(path))
    try:
        started = [threading.Thread(target=work) for _ in range(threads)]
        for thread in started:
            thread.start()
        for thread in started:
            thread.join()
    finally:
        threading.settrace(None)


def child_exit_code(pid: int, timeout_s: float = 15) -> int | None:
    """The exit code of the forked child ``pid``, or None when it has not ended within ``timeout_s`` (it hung: it is
    SIGKILLed and reaped)."""
    deadline = time.monotonic() + timeout_s
    while not (done := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0]:
        return os.waitstatus_to_exitcode(done[1])
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def switching_between_bytecodes(path: str):
    """A ``threading.settrace`` function that lets the other threads run between any two bytecodes of the code in
    ``path``: CPython's GIL rarely switches threads inside ``x += 1``, a free-threaded build runs them at once."""

    def each_opcode(frame, event, arg):
        if event == "opcode":
            time.sleep(0)  # releases the GIL: another thread may run now
        return each_opcode

    def on_call(frame, event, arg):
        if frame.f_code.co_filename != path:
            return None
        frame.f_trace_opcodes = True
        return each_opcode

    return on_call


def fill_the_disk_for(monkeypatch, asset: str) -> None:
    """Make the lake's writes of ``asset`` fail as on a full disk (``ENOSPC``); every other asset writes."""
    import errno

    from precompute_assets.storage.lake import Lake

    write = Lake.write

    def full(self, name, partition, frame):
        if name == asset:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, name, partition, frame)

    monkeypatch.setattr(Lake, "write", full)
