"""Fault: the Redis server restarts (same port, same data folder) while readers are serving.

Readers are real ``PredictionCache`` clients (``from_url``: 50 ms socket timeout, query logging on, the default
``backoff_s``) in threads, each in a closed loop of ``get`` (and one of ``get_or_compute``) on a private Valkey
server of the ``redis_server`` fixture, which is stopped (SIGTERM, the AOF flushed) and started again on the same
port. Callers never see an exception: lookups during the outage are misses (``get_or_compute`` computes them), and
every reader hits again, at most about one ``backoff_s`` after the server answers; the published version survives
the restart (AOF).
"""

import threading
import time
from dataclasses import dataclass, field

from precompute_assets.serving import KeySchema, PredictionCache, connect, publish_version
from precompute_assets_tests.faults.figures import record

KEYS = [f"ad-{i}" for i in range(200)]
OUTAGE_S = 1.5  # the server is down this long (plus its shutdown)
AFTER_S = 2.5  # readers keep going this long after the server answers again


@dataclass
class Reader:
    """One serving thread's view: when it saw hits, misses and exceptions."""

    cache: PredictionCache
    compute: bool = False
    events: list[tuple[float, float, bool]] = field(default_factory=list)  # (monotonic start, end, hit)
    exceptions: list[BaseException] = field(default_factory=list)
    computed: int = 0

    def run(self, stop: threading.Event) -> None:
        i = 0
        while not stop.is_set():
            key = KEYS[i % len(KEYS)]
            i += 1
            started = time.monotonic()
            try:
                if self.compute:
                    value = self.cache.get_or_compute("ctr", f"live-{key}", lambda k: 0.5)
                    assert value is not None
                    value = self.cache.get("ctr", key)
                else:
                    value = self.cache.get("ctr", key)
                self.events.append((started, time.monotonic(), value is not None))
            except BaseException as error:  # what a caller would see
                self.exceptions.append(error)
            time.sleep(0.002)


def test_readers_get_misses_not_exceptions_while_redis_restarts(redis_server, record_property):
    server = redis_server()
    schema = KeySchema("faults")
    admin = connect(server.url, socket_timeout=5)
    publish_version(admin, "ctr", "v1", [(k, 0.01 * (i % 100)) for i, k in enumerate(KEYS)], n_keys=len(KEYS),
                    schema=schema)  # fmt: skip
    admin.close()

    readers = [Reader(PredictionCache.from_url(server.url, namespace=schema.namespace)) for _ in range(3)]
    readers.append(Reader(PredictionCache.from_url(server.url, namespace=schema.namespace), compute=True))
    backoff_s = readers[0].cache.backoff_s
    stop = threading.Event()
    threads = [threading.Thread(target=r.run, args=(stop,), daemon=True) for r in readers]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while not all(any(hit for *_, hit in r.events) for r in readers):  # warm: everyone hits before the fault
            assert time.monotonic() < deadline, [r.cache.errors for r in readers]
            time.sleep(0.05)
        time.sleep(0.3)

        down_at = time.monotonic()
        server.stop()
        stopped_at = time.monotonic()
        time.sleep(OUTAGE_S)
        restarting_at = time.monotonic()
        server.start()  # same port, same folder: returns once it answers PING
        up_at = time.monotonic()
        time.sleep(AFTER_S)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        for reader in readers:
            reader.cache.close()

    exceptions = [e for r in readers for e in r.exceptions]
    assert not exceptions, exceptions[:3]
    # Every lookup made while no server ran is a miss
    during = [hit for r in readers for start, end, hit in r.events if stopped_at <= start and end < restarting_at]
    assert during and not any(during)
    recovery, misses_after = [], 0
    for reader in readers:
        first_hit = next((end for start, end, hit in reader.events if start >= up_at and hit), None)
        assert first_hit is not None  # every reader recovers on its own, and the published version survived (AOF)
        recovery.append(max(0.0, first_hit - up_at))
        misses_after += sum(not hit for start, _, hit in reader.events if start > first_hit)
    errors = sum(r.cache.errors for r in readers)
    assert errors >= len(readers)  # each client saw the fault (and backed off), none raised it
    dropped = sum(r.cache.logger.stats.dropped for r in readers)
    record(
        record_property,
        "redis restarted while readers run",
        readers=len(readers),
        backoff_s=backoff_s,
        exceptions=len(exceptions),
        shutdown_s=round(stopped_at - down_at, 3),
        outage_s=round(up_at - stopped_at, 3),
        lookups_during_outage=len(during),
        misses_during_outage=len(during) - sum(during),
        client_errors_counted=errors,
        recovery_s_max=round(max(recovery), 3),
        recovery_s_each=[round(s, 3) for s in recovery],
        misses_after_recovery=misses_after,
        query_events_dropped=dropped,
    )
