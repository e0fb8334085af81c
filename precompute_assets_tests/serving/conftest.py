"""A real Redis Cluster for the serving tests: three masters (optionally a replica each) on 127.0.0.1, from the
same embedded server binary as every other test server (``PRECOMPUTE_REDIS_SERVER`` overrides it), formed with
``CLUSTER ADDSLOTSRANGE`` / ``CLUSTER MEET`` / ``CLUSTER REPLICATE`` (no ``--cluster create`` CLI needed); and a
Redis Sentinel deployment (a primary, a replica, a sentinel) of the same binary."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from precompute_assets.stack import RedisServer, free_port
from precompute_assets_tests.factories import PROMPT_FULL_SYNC, wait_for_replica

SLOTS = 16384
CLUSTER_CONFIG = (
    "cluster-enabled yes",
    "cluster-config-file nodes.conf",
    "cluster-node-timeout 1000",  # a dead master is marked failed (and a replica promoted) within ~2 s
    # The surviving masters keep serving their slots while one master is down without a replica.
    "cluster-require-full-coverage no",
    "appendonly no",
    'save ""',
    PROMPT_FULL_SYNC,
)


@dataclass
class Cluster:
    masters: list[RedisServer]
    replicas: list[RedisServer] = field(default_factory=list)

    @property
    def nodes(self) -> list[RedisServer]:
        return self.masters + self.replicas

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.masters[0].port}?cluster=1"

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, decode_responses=True)

    def info(self, port: int) -> dict[str, str]:
        with self.client(port) as node:
            text = node.execute_command("CLUSTER", "INFO")
        text = text.decode() if isinstance(text, bytes) else text
        return dict(line.split(":", 1) for line in text.strip().splitlines() if ":" in line)

    def node_id(self, port: int) -> str:
        with self.client(port) as node:
            return node.execute_command("CLUSTER", "MYID")

    def master_of_slot(self, slot: int) -> RedisServer:
        return self.masters[min(slot * len(self.masters) // SLOTS, len(self.masters) - 1)]

    def wait_ok(self, ports: list[int] | None = None, timeout_s: float = 30) -> None:
        ports = ports or [server.port for server in self.nodes if server.pid is not None]
        deadline = time.monotonic() + timeout_s
        while True:
            states = {port: self.info(port) for port in ports}
            if all(
                s.get("cluster_state") == "ok"
                and s.get("cluster_slots_assigned") == str(SLOTS)
                and s.get("cluster_known_nodes") == str(len(self.nodes))
                for s in states.values()
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok after {timeout_s} s: {states}")
            time.sleep(0.05)

    def stop(self) -> None:
        for server in self.nodes:
            server.stop()


def start_cluster(base: Path, *, masters: int = 3, replicas: int = 0, extra_config: tuple[str, ...] = ()) -> Cluster:
    """Start and form a cluster (``extra_config``: lines added to every server's configuration); on any failure every
    server started is stopped again."""
    started: list[RedisServer] = []
    bus_ports: dict[int, int] = {}

    def server() -> RedisServer:
        # The bus port is chosen too: the default (port + 10000) can fall beyond 65535 for an ephemeral port.
        bus = free_port()
        config = (*CLUSTER_CONFIG, f"cluster-port {bus}", *extra_config)
        node = RedisServer(base / uuid.uuid4().hex[:8], free_port(), extra_config=config)
        bus_ports[node.port] = bus
        started.append(node)
        node.start(timeout_s=30)
        return node

    try:
        cluster = Cluster([server() for _ in range(masters)])
        cluster.replicas = [server() for _ in range(replicas * masters)]
        for index, master in enumerate(cluster.masters):
            low, high = index * SLOTS // masters, (index + 1) * SLOTS // masters - 1
            with cluster.client(master.port) as node:
                node.execute_command("CLUSTER", "ADDSLOTSRANGE", low, high)
                node.execute_command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
        with cluster.client(cluster.masters[0].port) as first:
            for other in cluster.nodes[1:]:
                first.execute_command("CLUSTER", "MEET", "127.0.0.1", other.port, bus_ports[other.port])
        for index, replica in enumerate(cluster.replicas):
            master_id = cluster.node_id(cluster.masters[index % masters].port)
            deadline = time.monotonic() + 15
            with cluster.client(replica.port) as node:
                while True:  # the replica must know its master (gossip) before it can follow it
                    try:
                        node.execute_command("CLUSTER", "REPLICATE", master_id)
                        break
                    except redis.ResponseError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
        cluster.wait_ok()
        if cluster.replicas:
            for index, replica in enumerate(cluster.replicas):
                master = cluster.masters[index % masters]
                wait_for_replica(cluster.client(master.port), cluster.client(replica.port))
        return cluster
    except BaseException:
        for node in started:
            node.stop()
        raise


@pytest.fixture(scope="module")
def redis_cluster(session_dir: Path) -> Iterator[Cluster]:
    """Three masters without replicas, shared by a test module (tests isolate by key namespace)."""
    cluster = start_cluster(session_dir / "servers")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_factory(session_dir: Path) -> Iterator[Callable[..., Cluster]]:
    """Private clusters for tests that kill nodes (``cluster_factory(replicas=1)``); stopped when the test ends."""
    clusters: list[Cluster] = []

    def make(**options) -> Cluster:
        cluster = start_cluster(session_dir / "servers", **options)
        clusters.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.stop()


# --- Redis Sentinel ---------------------------------------------------------------------------------------

SERVICE = "serving"


class SentinelServer(RedisServer):
    """A sentinel (the embedded server with ``--sentinel``) monitoring the primary on ``primary_port`` as ``SERVICE``,
    with a quorum of one and a short down-after, so a killed primary is replaced within a few seconds."""

    def __init__(
        self, directory: Path, port: int, primary_port: int, *, binary: str | None = None, extra_config: tuple = ()
    ) -> None:
        super().__init__(directory, port, binary=binary, extra_config=extra_config)
        self.primary_port = primary_port

    def config(self, version: tuple[int, ...]) -> list[str]:
        return [
            *self.process_config(),
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} 1",
            f"sentinel down-after-milliseconds {SERVICE} 500",
            f"sentinel failover-timeout {SERVICE} 5000",
            *self.extra_config,
        ]

    def start(self, timeout_s: float = 30) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "sentinel.conf"  # the sentinel rewrites its config file: it must be its own
        conf.write_text("\n".join(self.config(())) + "\n")
        subprocess.run([self.binary, str(conf), "--sentinel"], check=True, capture_output=True)
        self.wait_ready(timeout_s)


@dataclass
class SentinelGroup:
    primary: RedisServer
    replica: RedisServer
    sentinel: SentinelServer

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{SERVICE}"

    def primary_port(self) -> int:
        with redis.Redis(port=self.sentinel.port, socket_timeout=2) as sentinel:
            return int(sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)[1])

    def wait_failover(self, old_port: int, timeout_s: float = 30) -> int:
        """The new primary's port, once the sentinel has promoted another server than ``old_port``."""
        deadline = time.monotonic() + timeout_s
        while (port := self.primary_port()) == old_port:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no failover from {old_port} after {timeout_s} s")
            time.sleep(0.1)
        return port

    def stop(self) -> None:
        for server in (self.sentinel, self.replica, self.primary):
            server.stop()


def start_sentinel_group(base: Path) -> SentinelGroup:
    """A primary, one replica of it, and a sentinel watching them, all on 127.0.0.1; on any failure every server
    started is stopped again."""
    started: list[RedisServer] = []
    try:
        config = ("appendonly no", PROMPT_FULL_SYNC)  # the replica too: it is the primary after a failover
        primary = RedisServer(base / uuid.uuid4().hex[:8], free_port(), extra_config=config)
        started.append(primary)
        primary.start(timeout_s=30)
        replica = RedisServer(
            base / uuid.uuid4().hex[:8],
            free_port(),
            extra_config=(*config, f"replicaof 127.0.0.1 {primary.port}"),
        )
        started.append(replica)
        replica.start(timeout_s=30)
        wait_for_replica(redis.Redis(port=primary.port), redis.Redis(port=replica.port))
        sentinel = SentinelServer(base / uuid.uuid4().hex[:8], free_port(), primary.port)
        started.append(sentinel)
        sentinel.start()
        group = SentinelGroup(primary, replica, sentinel)
        deadline = time.monotonic() + 15
        while True:  # the sentinel learns of the replica from the primary's INFO, within a second or so
            with redis.Redis(port=sentinel.port, socket_timeout=2) as client:
                if client.execute_command("SENTINEL", "REPLICAS", SERVICE):
                    return group
            if time.monotonic() > deadline:
                raise RuntimeError("the sentinel never saw the replica")
            time.sleep(0.1)
    except BaseException:
        for server in started:
            server.stop()
        raise


@pytest.fixture
def sentinel_group(session_dir: Path) -> Iterator[SentinelGroup]:
    """A private primary, replica and sentinel for one test (tests kill the primary); stopped when it ends."""
    group = start_sentinel_group(session_dir / "servers")
    try:
        yield group
    finally:
        group.stop()
