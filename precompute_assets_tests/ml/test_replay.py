"""Trace parsing, day splitting, and the replayed hit rates, with Belady's bound checked by brute force."""

from __future__ import annotations

import itertools
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from precompute_assets.ml.replay import Trace, TraceError, belady_day_hits, parse_trace, replay, split_days
from precompute_assets.ml.selection import ad_demand, coverage, daily_counts, select_top

RATES = ("hit_rate_lru", "hit_rate_static_top_n", "hit_rate_ours", "hit_rate_belady")


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "trace.txt"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def days_of(*days: list[int]) -> list[np.ndarray]:
    return [np.array(day, dtype=np.int64) for day in days]


def hits(result: dict, rate: str) -> int:
    return round(result[rate] * result["requests"])


# --- parsing ---------------------------------------------------------------------------------------------


def test_parse_bare_keys(tmp_path: Path):
    trace = parse_trace(write(tmp_path, "5\n3\n-2\n+7\n5\n"))
    assert trace.keys.dtype == np.int64
    assert trace.keys.tolist() == [5, 3, -2, 7, 5]
    assert trace.timestamps is None
    assert parse_trace(write(tmp_path, "1\n2")).keys.tolist() == [1, 2]  # no final newline


def test_parse_csv_seconds_and_milliseconds(tmp_path: Path):
    trace = parse_trace(write(tmp_path, "1700000000.5,10\n1700000001,11\n1.7e9,12\n"))
    assert trace.keys.tolist() == [10, 11, 12]
    assert trace.timestamps.tolist() == [1700000000.5, 1700000001.0, 1.7e9]
    ms = parse_trace(write(tmp_path, "1700000000123,4\r\n1700000000999, 5 \r\n"))
    assert ms.timestamps.tolist() == [1700000000123.0, 1700000000999.0]
    assert ms.keys.tolist() == [4, 5]


def test_parse_a_large_trace(tmp_path: Path):
    keys = np.random.default_rng(0).integers(0, 10**12, 200_000)
    path = write(tmp_path, "\n".join(map(str, keys.tolist())) + "\n")
    np.testing.assert_array_equal(parse_trace(path).keys, keys)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1\n2\n\n3\n", "line 3: blank line"),
        ("1\n2\n3\n\n", "line 4: blank line"),
        ("   \n1\n", "line 1: blank line"),
        ("1\n# warm-up\n2\n", "line 2: comment lines are not allowed"),
        ("# keys\n1\n", "line 1: comment lines are not allowed"),
        ("1\n2\nabc\n", "line 3: key 'abc' is not numeric"),
        ("1\n2.5\n", "line 2: key '2.5' is not an integer"),
        ("1\n2\n3,4\n", "line 3: mixed formats"),
        ("1.0,1\n2.0,2\n3\n", "line 3: mixed formats"),
        ("1,2\n3,4,5\n", "line 2: expected 2 comma-separated fields"),
        ("1,2\nnoon,4\n", "line 2: timestamp 'noon' is not numeric"),
        ("1,2\n3,x\n", "line 2: key 'x' is not numeric"),
        ("1\n99999999999999999999\n", "line 2: key '99999999999999999999' is out of the int64 range"),
        ("1,1\n1e999,2\n", "line 2: timestamp '1e999' is not a finite number"),
    ],
)
def test_parse_errors_name_the_line(tmp_path: Path, text: str, message: str):
    with pytest.raises(TraceError, match=f"^{message}"):
        parse_trace(write(tmp_path, text))


def test_parse_error_deep_in_a_large_trace(tmp_path: Path):
    lines = [str(i) for i in range(100_000)]
    lines[76_543] = "oops"
    with pytest.raises(TraceError, match="^line 76544: key 'oops' is not numeric$"):
        parse_trace(write(tmp_path, "\n".join(lines)))


def test_parse_rejects_empty_and_binary_files(tmp_path: Path):
    with pytest.raises(TraceError, match="empty"):
        parse_trace(write(tmp_path, ""))
    with pytest.raises(TraceError, match="^line 3: not valid UTF-8"):
        parse_trace(write(tmp_path, b"1\n2\n\xff\xfe\n"))
    assert issubclass(TraceError, ValueError)


# --- splitting -------------------------------------------------------------------------------------------


def test_split_days_by_count_without_timestamps():
    parts = split_days(Trace(keys=np.arange(10)), 3)
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_split_days_by_equal_time_spans():
    # Span 0..90 in three days of 30: [0, 30), [30, 60), [60, 90] (the last request closes the last day).
    trace = Trace(keys=np.array([1, 2, 3, 4, 5, 6]), timestamps=np.array([0.0, 10, 29, 30, 31, 90]))
    assert [p.tolist() for p in split_days(trace, 3)] == [[1, 2, 3], [4, 5], [6]]


def test_split_days_orders_by_time_and_keeps_empty_days():
    trace = Trace(keys=np.array([30, 10, 20, 11]), timestamps=np.array([3000.0, 1000, 2000, 1000]))
    parts = split_days(trace, 4)  # days of 500 starting at 1000: 2000 opens day 2, day 1 is empty
    assert [p.tolist() for p in parts] == [[10, 11], [], [20], [30]]


def test_split_days_with_constant_time_falls_back_to_counts():
    trace = Trace(keys=np.arange(4), timestamps=np.full(4, 5.0))
    assert [p.tolist() for p in split_days(trace, 2)] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError):
        split_days(trace, 0)


# --- replay: known examples ------------------------------------------------------------------------------


def test_replay_small_example_by_hand():
    result = replay(days_of([1, 1, 2], [1, 2, 3, 1]), top_n=1, capacity=2)
    assert result == {
        # LRU holds [1, 2]: 1 hit, 2 hit, 3 evicts 1, then 1 misses.
        "hit_rate_lru": 0.5,
        # Day 0 demand {1: 2, 2: 1} selects key 1, requested twice.
        "hit_rate_static_top_n": 0.5,
        # Key 1 precomputed, one LRU slot holding 2: 1, 2, 1 hit; 3 misses.
        "hit_rate_ours": 0.75,
        # Reload {1, 2}; 3 is needed no sooner than 2, so it is not admitted; 1 hits.
        "hit_rate_belady": 0.75,
        "requests": 4,
        "days": 2,
        "top_n": 1,
        "capacity": 2,
    }


def test_precomputed_hits_leave_the_lru_alone():
    # LRU of 2 slots ends day 0 as [2, 1]; key 1 is precomputed on day 1 and its hit does not refresh or
    # free its LRU slot, so 3 evicts 2 and 2 then misses.
    result = replay(days_of([2, 1, 1], [1, 3, 2]), top_n=1, capacity=3)
    assert hits(result, "hit_rate_ours") == 1


def test_day_zero_only_warms():
    assert replay(days_of([1, 1, 1]), top_n=0, capacity=1) == {
        **dict.fromkeys(RATES, 0.0),
        "requests": 0,
        "days": 1,
        "top_n": 0,
        "capacity": 1,
    }
    result = replay(days_of([1, 2], [], [1, 2]), top_n=0, capacity=2)
    assert result["requests"] == 2 and result["hit_rate_lru"] == 1.0


def test_lru_fails_on_a_scan_longer_than_the_cache_while_belady_does_not():
    scan = list(range(5)) * 4
    result = replay(days_of(scan, scan), top_n=0, capacity=4)
    assert result["hit_rate_lru"] == 0.0
    # Reload 0..3; key 4 is always the one needed last, so it is never admitted and only its 4 requests miss.
    assert result["hit_rate_belady"] == 0.8


def test_belady_with_room_for_every_key_misses_nothing():
    day = np.random.default_rng(1).integers(0, 50, 500)
    assert belady_day_hits(day, 50) == 500
    assert belady_day_hits(day, 0) == 0
    assert belady_day_hits(np.array([], dtype=np.int64), 3) == 0


def test_static_top_n_is_the_selection_modules_choice():
    rng = np.random.default_rng(3)
    days = [np.minimum(rng.zipf(1.2, 2000), 300) + 10 * d for d in range(4)]
    result = replay(days, top_n=20, capacity=40, half_life_days=1.5)
    expected = 0
    for d in range(1, 4):
        demand = ad_demand([daily_counts(day) for day in days[:d]], half_life_days=1.5)
        expected += coverage(select_top(demand, 20), daily_counts(days[d])) * len(days[d])
    assert result["hit_rate_static_top_n"] == pytest.approx(expected / result["requests"])


def test_ours_reduces_to_lru_and_to_static_at_the_extremes():
    rng = np.random.default_rng(4)
    days = [np.minimum(rng.zipf(1.1, 1500), 400) for _ in range(3)]
    no_precompute = replay(days, top_n=0, capacity=30)
    assert no_precompute["hit_rate_ours"] == no_precompute["hit_rate_lru"]
    all_precompute = replay(days, top_n=30, capacity=30)
    assert all_precompute["hit_rate_ours"] == all_precompute["hit_rate_static_top_n"]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="top_n"):
        replay(days_of([1], [1]), top_n=3, capacity=2)
    with pytest.raises(ValueError):
        replay(days_of([1], [1]), top_n=0, capacity=0)
    with pytest.raises(ValueError):
        replay([], top_n=0, capacity=1)


# --- replay: the bound -----------------------------------------------------------------------------------


def best_possible_hits(days: list[list[int]], capacity: int, *, reload: bool = True) -> int:
    """Exhaustive search over every read-through policy: on each request keep any subset of cache + key.

    With ``reload``, at each day boundary the cache may also become any set of ``capacity`` keys.
    Hits count on days >= 1 only.
    """
    requests = [(d, key) for d, day in enumerate(days) for key in day]
    universe = sorted({key for _, key in requests})

    def subsets(keys: frozenset | list) -> list[frozenset]:
        keys = sorted(keys)
        sizes = range(min(capacity, len(keys)) + 1)
        return [frozenset(c) for r in sizes for c in itertools.combinations(keys, r)]

    everything = subsets(universe)

    @cache
    def best(i: int, held: frozenset) -> int:
        if i == len(requests):
            return 0
        day, key = requests[i]
        starts = everything if reload and (i == 0 or requests[i - 1][0] != day) else [held]
        return max(
            int(key in start and day > 0) + max(best(i + 1, after) for after in subsets(start | {key}))
            for start in starts
        )

    return best(0, frozenset())


def test_belady_is_optimal_by_exhaustive_search():
    rng = np.random.default_rng(11)
    for _ in range(150):
        capacity = int(rng.integers(1, 3))
        days = [rng.integers(0, int(rng.integers(2, 5)), int(rng.integers(1, 5))).tolist() for _ in range(3)]
        result = replay([np.array(day) for day in days], top_n=0, capacity=capacity)
        assert hits(result, "hit_rate_belady") == best_possible_hits(days, capacity), (days, capacity)


def test_day_boundary_preload_beats_any_demand_paging_cache():
    """Why the bound needs the free reload: ours beats the best cache that only loads on misses."""
    a, b, c = 1, 2, 3
    days = [[a, a, a], [b] * 6 + [a] + [c] * 4 + [a], [b, c]]
    result = replay([np.array(day) for day in days], top_n=1, capacity=2)
    demand_paging_optimum = best_possible_hits(days, 2, reload=False)
    assert demand_paging_optimum == 11
    assert hits(result, "hit_rate_ours") == 12
    assert hits(result, "hit_rate_belady") == best_possible_hits(days, 2) == 13


def random_traces() -> list[tuple[str, list[np.ndarray]]]:
    rng = np.random.default_rng(5)
    zipf = [np.minimum(rng.zipf(1.05, 3000), 2000) for _ in range(4)]
    drifting = [np.minimum(rng.zipf(1.2, 3000), 500) + 37 * d for d in range(5)]
    uniform = [rng.integers(0, 300, 2000) for _ in range(3)]
    scans = [np.tile(np.arange(d * 10, d * 10 + 60), 20) for d in range(3)]
    bursts = [np.repeat(rng.integers(0, 100, 200), rng.integers(1, 6, 200)) for _ in range(4)]
    tiny = [rng.integers(0, 4, 12) for _ in range(3)]
    return [
        ("zipf", zipf), ("drifting", drifting), ("uniform", uniform),
        ("scans", scans), ("bursts", bursts), ("tiny", tiny),
    ]  # fmt: skip


@pytest.mark.parametrize(("name", "days"), random_traces(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize(("top_n", "capacity"), [(0, 1), (1, 1), (1, 2), (5, 20), (20, 50), (100, 100)])
def test_no_policy_beats_belady(name: str, days: list[np.ndarray], top_n: int, capacity: int):
    result = replay(days, top_n=top_n, capacity=capacity)
    assert result["requests"] == sum(len(day) for day in days[1:])
    for rate in RATES:
        assert 0.0 <= result[rate] <= result["hit_rate_belady"] <= 1.0, (rate, result)
    # Ours serves every precomputed hit static top-N gets, and more from its LRU.
    assert result["hit_rate_ours"] >= result["hit_rate_static_top_n"]
