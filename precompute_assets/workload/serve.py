"""Drive synthetic traffic through the real serving client, on a simulated clock."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pandas as pd

from ..serving import PredictionCache


@dataclass
class SimClock:
    """A settable clock in epoch milliseconds, for replaying traffic into the past."""

    now_ms: int = 0

    def __call__(self) -> int:
        return self.now_ms


@dataclass
class ServeStats:
    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def serve_traffic(
    cache: PredictionCache,
    clock: SimClock,
    chunks: Iterable[pd.DataFrame],
    compute: Callable[[str], float],
    *,
    kind: str = "ctr",
    progress: Callable[[int], None] | None = None,
) -> ServeStats:
    """Ask ``cache`` for every query (``ts_ms``, ``ad_id``, ``user``) in order, computing misses live."""
    hits_before, queries = cache.hits, 0
    for chunk in chunks:
        columns = (chunk["ts_ms"].tolist(), chunk["ad_id"].tolist(), chunk["user"].tolist())
        for ts_ms, ad_id, user in zip(*columns, strict=True):
            clock.now_ms = ts_ms
            cache.get_or_compute(kind, ad_id, compute, user=user)
        queries += len(chunk)
        if progress:
            progress(len(chunk))
    return ServeStats(queries=queries, hits=cache.hits - hits_before)
