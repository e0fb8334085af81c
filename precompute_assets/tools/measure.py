"""Latency sampling shared by the benchmarks and the demo."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def percentile_us(samples_ns: list[int], q: float) -> float:
    """The ``q``-th percentile of nanosecond samples, in microseconds (one decimal)."""
    return round(float(np.percentile(np.asarray(samples_ns), q)) / 1000, 1)


def timed(fn: Callable[[str], object], keys: list[str]) -> list[int]:
    """Nanoseconds of ``fn(key)`` for each key."""
    out = []
    clock = time.perf_counter_ns
    for key in keys:
        start = clock()
        fn(key)
        out.append(clock() - start)
    return out


def bare_get(client, prefix: str = "") -> Callable[[str], object]:
    """A reference lookup: ``GET prefix+key`` on ``client`` through ``send_pipelined``, the transport the serving
    client sends its own commands on (redis-py's ``get`` costs more per call, which made ours look better)."""
    from ..serving.connection import send_pipelined

    return lambda key: send_pipelined(client, [(b"GET", prefix + key)])[0]
