"""A synthetic ad platform: ads with a known click-through rate, and drifting, seasonal prediction traffic.

Everything is deterministic under ``seed``. Volume model (see ``hourly_volume``): a day is the 24 hours
starting at ``start_ms + d * DAY_MS``; its total is ``round(queries_per_day * WEEKDAY_FACTOR[weekday])``
(the factors average exactly 1 over a week, so ``queries_per_day`` is the mean over a full week), split over
its 24 hours by ``hour_weights`` with largest-remainder rounding, so every day's total is exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

N_CATEGORIES = 20
ADS_PER_CAMPAIGN = 20
LATE_AD_SHARE = 0.2  # share of ads launched after day 0, spread evenly over the later days

# Monday..Sunday; mean is exactly 1.0 so a week holds 7 * queries_per_day queries.
WEEKDAY_FACTOR = np.array([1.08, 1.08, 1.08, 1.08, 1.08, 0.80, 0.80])
NIGHT_DEPTH = 0.7  # hourly volume ranges over 1 +/- NIGHT_DEPTH
TROUGH_HOUR = 4.0  # UTC; hours 03 and 04 are the quietest

ZIPF_EXPONENT = 1.05
AGE_HALF_LIFE_DAYS = 10.0  # creative fatigue: popularity halves every ten days
LAUNCH_BOOST = 1.5  # peak log-popularity boost of a new ad, reached LAUNCH_PEAK_DAYS after launch
LAUNCH_PEAK_DAYS = 2.0
TREND_START_PROB = 0.001  # daily chance that an ad starts a random trend
DAILY_JITTER = 0.1

# Category-dependent effect of quality on the CTR logit: helps in most categories, hurts in a few
# (e.g. "premium-looking" creatives underperform for bargain categories), so no single linear slope fits.
_QUALITY_SLOPE = np.array([2.5, -1.5, 1.0, 3.0, 0.0, 2.0, -1.0, 1.5, 2.5, 0.5,
                           3.0, -2.0, 1.0, 2.0, 0.5, 2.5, -0.5, 1.5, 3.0, 1.0])  # fmt: skip
_CATEGORY_BASE = np.linspace(-0.6, 0.6, N_CATEGORIES)[np.random.default_rng(7).permutation(N_CATEGORIES)]


def make_ads(n_ads: int, *, days: int, seed: int = 0) -> pd.DataFrame:
    """``n_ads`` ads in campaigns of ~20; most live from day 0, ``LATE_AD_SHARE`` launch on days 1..days-1."""
    if n_ads < 0 or days < 1:
        raise ValueError("need n_ads >= 0 and days >= 1")
    rng = np.random.default_rng([seed, 0])
    n_campaigns = max(1, round(n_ads / ADS_PER_CAMPAIGN))
    campaign = rng.integers(0, n_campaigns, n_ads)
    # Ads of one campaign sell one kind of thing, so they share its category.
    campaign_category = rng.integers(0, N_CATEGORIES, n_campaigns)
    late = rng.random(n_ads) < LATE_AD_SHARE if days > 1 else np.zeros(n_ads, dtype=bool)
    created_day = np.where(late, rng.integers(1, max(days, 2), n_ads), 0)
    return pd.DataFrame(
        {
            "ad_id": _labels("ad", np.arange(n_ads), width=6),
            "campaign_id": _labels("c", campaign, width=5),
            "category": campaign_category[campaign].astype(np.int64),
            "quality": rng.beta(2.0, 2.0, n_ads),
            "bid": rng.lognormal(0.0, 0.6, n_ads),
            "text_len": rng.integers(10, 301, n_ads).astype(np.int64),
            "created_day": created_day.astype(np.int64),
        }
    )


def true_ctr(ads: pd.DataFrame) -> np.ndarray:
    """Known click probability per ad (0.5%..20%): category x quality interaction, bid step, length band."""
    category = ads["category"].to_numpy(dtype=np.int64)
    quality = ads["quality"].to_numpy(dtype=float)
    bid = ads["bid"].to_numpy(dtype=float)
    text_len = ads["text_len"].to_numpy(dtype=float)
    logit = (
        -3.6
        + _CATEGORY_BASE[category]
        + _QUALITY_SLOPE[category] * (quality - 0.5)
        + np.where(bid > 1.5, 0.8, 0.0)  # premium placement above a bid threshold
        + np.where((text_len >= 40) & (text_len <= 120), 0.5, -0.2)  # short but not terse copy wins
        + np.where((quality > 0.7) & (bid > 1.0), 0.6, 0.0)
    )
    return np.clip(1.0 / (1.0 + np.exp(-logit)), 0.005, 0.20)


def hour_weights(hours: np.ndarray) -> np.ndarray:
    """Relative query volume of each UTC hour of day: a cosine with its trough at 04:00 and peak at 16:00."""
    centre = np.asarray(hours, dtype=float) + 0.5
    return 1.0 - NIGHT_DEPTH * np.cos(2 * np.pi * (centre - TROUGH_HOUR) / 24)


def hourly_volume(*, start_ms: int, days: int, queries_per_day: int) -> np.ndarray:
    """Queries in each hour of each day, shape (days, 24); see the module docstring for the model."""
    if days < 0 or queries_per_day < 0:
        raise ValueError("days and queries_per_day must be >= 0")
    day_start = start_ms + np.arange(days, dtype=np.int64) * DAY_MS
    # 1970-01-01 was a Thursday (Monday = 0); judge the weekday at the middle of the day.
    weekday = ((day_start + DAY_MS // 2) // DAY_MS + 3) % 7
    totals = np.rint(queries_per_day * WEEKDAY_FACTOR[weekday]).astype(np.int64)
    slot_start = day_start[:, None] + np.arange(24, dtype=np.int64) * HOUR_MS
    weights = hour_weights((slot_start // HOUR_MS) % 24)
    share = totals[:, None] * weights / weights.sum(axis=1, keepdims=True)
    counts = np.floor(share).astype(np.int64)
    # Largest remainder: hand the leftover queries to the hours with the biggest fractional parts.
    leftover = totals - counts.sum(axis=1)
    order = np.argsort(-(share - counts), axis=1, kind="stable")
    bump = np.arange(24)[None, :] < leftover[:, None]
    np.put_along_axis(counts, order, np.take_along_axis(counts, order, axis=1) + bump, axis=1)
    return counts


def generate_traffic(
    ads: pd.DataFrame,
    *,
    start_ms: int,
    days: int,
    queries_per_day: int,
    seed: int = 0,
    chunk_size: int = 1_000_000,
) -> Iterator[pd.DataFrame]:
    """Impressions in time order, ``chunk_size`` rows per chunk: ``ts_ms``, ``ad_id``, ``user``, ``clicked``.

    Each day, the ads live that day are ranked by a drifting log-popularity (intrinsic appeal and bid, decay
    with age, a launch boost peaking two days after launch, random multi-day trends, a little noise) and
    requested with Zipf probabilities by rank. The output does not depend on ``chunk_size``.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    n_ads = len(ads)
    volume = hourly_volume(start_ms=start_ms, days=days, queries_per_day=queries_per_day)
    if n_ads == 0 or volume.sum() == 0:
        return
    created = ads["created_day"].to_numpy(dtype=np.int64)
    ctr = true_ctr(ads)
    ad_ids = pa.array(ads["ad_id"].astype(str).tolist(), type=pa.large_string())
    n_users = int(min(1_000_000, max(100, queries_per_day // 3)))
    users = pa.array(_labels("u", np.arange(n_users), width=0), type=pa.large_string())

    pop_rng = np.random.default_rng([seed, 1])
    base = pop_rng.normal(0.0, 1.0, n_ads) + 0.5 * np.log(ads["bid"].to_numpy(dtype=float))
    # Ads live at day 0 were launched some time before; later ads launch on their created_day.
    launch = created - np.where(created == 0, pop_rng.exponential(20.0, n_ads), 0.0)
    trend_rng = np.random.default_rng([seed, 2])
    trend_until = np.full(n_ads, -1, dtype=np.int64)
    trend_boost = np.zeros(n_ads)
    zipf = np.arange(1, n_ads + 1, dtype=float) ** -ZIPF_EXPONENT
    zipf_cdf = np.cumsum(zipf)

    pending: list[tuple[np.ndarray, ...]] = []
    pending_rows = 0
    for day in range(days):
        starting = trend_rng.random(n_ads) < TREND_START_PROB
        trend_until[starting] = day + trend_rng.integers(2, 6, int(starting.sum()))
        trend_boost[starting] = trend_rng.uniform(1.5, 3.0, int(starting.sum()))
        live = np.flatnonzero(created <= day)
        n_day = int(volume[day].sum())
        if len(live) == 0 or n_day == 0:
            continue
        day_rng = np.random.default_rng([seed, 3, day])
        age = day - launch[live]
        score = (
            base[live]
            - age * (np.log(2.0) / AGE_HALF_LIFE_DAYS)
            + LAUNCH_BOOST * (age / LAUNCH_PEAK_DAYS) * np.exp(1.0 - age / LAUNCH_PEAK_DAYS)
            + np.where(trend_until[live] >= day, trend_boost[live], 0.0)
            + day_rng.normal(0.0, DAILY_JITTER, len(live))
        )
        by_rank = live[np.argsort(-score, kind="stable")]
        cdf = zipf_cdf[: len(live)]
        rank = np.searchsorted(cdf, day_rng.random(n_day) * cdf[-1], side="right")
        ad_index = by_rank[np.minimum(rank, len(live) - 1)]
        # Popularity is fixed within a day, so ads drawn iid can be paired with sorted arrival times.
        slot_start = start_ms + day * DAY_MS + np.arange(24, dtype=np.int64) * HOUR_MS
        ts = np.repeat(slot_start, volume[day]) + day_rng.integers(0, HOUR_MS, n_day)
        ts.sort()
        user_index = day_rng.integers(0, n_users, n_day)
        clicked = day_rng.random(n_day) < ctr[ad_index]
        pending.append((ts, ad_index, user_index, clicked))
        pending_rows += n_day
        if pending_rows >= chunk_size:
            columns = _concat(pending)
            n_full = pending_rows // chunk_size * chunk_size
            for lo in range(0, n_full, chunk_size):
                yield _frame(tuple(c[lo : lo + chunk_size] for c in columns), ad_ids, users)
            pending = [tuple(c[n_full:] for c in columns)]
            pending_rows -= n_full
    if pending_rows:
        yield _frame(_concat(pending), ad_ids, users)


def _labels(prefix: str, numbers: np.ndarray, *, width: int) -> list[str]:
    return [f"{prefix}{n:0{width}d}" if width else f"{prefix}{n}" for n in numbers.tolist()]


def _concat(blocks: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    return tuple(np.concatenate(parts) for parts in zip(*blocks, strict=True))


def _frame(columns: tuple[np.ndarray, ...], ad_ids: pa.Array, users: pa.Array) -> pd.DataFrame:
    ts, ad_index, user_index, clicked = columns
    return pd.DataFrame(
        {
            "ts_ms": ts.astype(np.int64),
            # Arrow take builds the string columns ~10x faster than indexing Python string objects.
            "ad_id": pd.array(ad_ids.take(pa.array(ad_index)), dtype="str"),
            "user": pd.array(users.take(pa.array(user_index)), dtype="str"),
            "clicked": clicked,
        }
    )
