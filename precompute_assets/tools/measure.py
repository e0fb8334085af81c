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
