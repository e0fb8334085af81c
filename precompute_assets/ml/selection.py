"""Which keys to precompute: recency-weighted demand, top-N selection, coverage, and the off-peak window.

Shared by the Dagster assets and the offline replay so the replayed policy is the one that runs.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import numpy as np
import pandas as pd

HOURS_PER_DAY = 24
DEMAND_WINDOW_DAYS = 7  # the days of logs ad_demand weighs: the newest and the six before it


def daily_counts(keys: np.ndarray | pd.Series) -> pd.Series:
    """Requests per key (index: key, values: int64 counts), most requested first."""
    series = keys if isinstance(keys, pd.Series) else pd.Series(np.asarray(keys))
    counts = series.value_counts(sort=True, dropna=True)
    counts = counts[counts > 0]  # a categorical input lists unused categories with count 0
    counts.index.name = None
    return counts.astype(np.int64).rename("count")


def ad_demand(days: Sequence[pd.Series], *, half_life_days: float = 2.0) -> pd.Series:
    """Sum of per-day counts (oldest first), the newest weighted 1 and a day k older 0.5**(k/half_life_days).

    Sorted by demand descending, ties by key ascending, so the selection is deterministic.
    """
    if half_life_days <= 0:
        raise ValueError("half_life_days must be positive")
    weighted = [
        counts.astype(float) * 0.5 ** ((len(days) - 1 - i) / half_life_days)
        for i, counts in enumerate(days)
        if len(counts)
    ]
    if not weighted:
        return pd.Series(dtype=float, name="demand")
    demand = pd.concat(weighted).groupby(level=0, sort=False).sum()
    return _rank(demand).rename("demand")


def select_top(demand: pd.Series, n: int) -> list[Hashable]:
    """The ``n`` keys of highest demand (ties by key ascending), as plain Python values."""
    if n <= 0 or demand.empty:
        return []
    return _rank(demand).index[:n].tolist()


def coverage(selected: Iterable[Hashable], counts: pd.Series) -> float:
    """Share of the requests in ``counts`` whose key is in ``selected``; 0.0 when there are none."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    chosen = pd.Index(list(selected))
    return float(counts[counts.index.isin(chosen)].sum() / total)


def traffic_profile(hourly_counts: Sequence[float], *, window_hours: int = 4) -> dict:
    """Hourly volume and the quietest circular window of ``window_hours`` hours (ties: earliest start)."""
    volume = np.asarray(hourly_counts, dtype=float)
    if volume.shape != (HOURS_PER_DAY,):
        raise ValueError(f"need {HOURS_PER_DAY} hourly counts, got shape {volume.shape}")
    if not np.isfinite(volume).all() or (volume < 0).any():
        raise ValueError("hourly counts must be finite and non-negative")
    if not 1 <= window_hours <= HOURS_PER_DAY:
        raise ValueError(f"window_hours must be in 1..{HOURS_PER_DAY}")
    windows = (np.arange(HOURS_PER_DAY)[:, None] + np.arange(window_hours)[None, :]) % HOURS_PER_DAY
    load = volume[windows].sum(axis=1)
    # Equal windows may differ in the last float bit depending on summation order; treat them as tied.
    start = int(np.flatnonzero(np.isclose(load, load.min(), rtol=1e-12, atol=0.0))[0])
    return {
        "queries_per_hour": volume.tolist(),
        "offpeak_start_hour": start,
        "offpeak_hours": int(window_hours),
    }


def _rank(values: pd.Series) -> pd.Series:
    # Sorting by key first and then stably by value gives key order among equal values.
    return values.sort_index(kind="stable").sort_values(ascending=False, kind="stable")
