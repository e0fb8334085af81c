"""Honest hit-rate measurement: replay a key trace against LRU, static top-N, ours and an offline bound."""

from __future__ import annotations

import heapq
import io
import re
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .selection import ad_demand, daily_counts, select_top

_INT = r"[ \t]*[+-]?[0-9]+[ \t]*"
_NUM = r"[ \t]*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[ \t]*"
# The first line that is not a valid line of the format; one regex pass is fast and gives its position.
_BAD_LINE = {
    "key": re.compile(rf"^(?!{_INT}$)", re.MULTILINE),
    "csv": re.compile(rf"^(?!{_NUM},{_INT}$)", re.MULTILINE),
}
_INT_TOKEN = re.compile(_INT)
_NUM_TOKEN = re.compile(_NUM)
_INT64 = np.iinfo(np.int64)


class TraceError(ValueError):
    """A trace file that is not one integer key per line, nor ``timestamp,key`` lines."""


@dataclass(frozen=True)
class Trace:
    """Requested keys in request order, with their timestamps (seconds or ms) when the trace had them."""

    keys: np.ndarray
    timestamps: np.ndarray | None = None


def parse_trace(path: str | Path) -> Trace:
    """Read one integer key per line, or ``timestamp,key`` lines; raise TraceError naming the bad line."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = data.count(b"\n", 0, exc.start) + 1
        raise TraceError(f"line {line_no}: not valid UTF-8 text") from None
    text = text.replace("\r\n", "\n")
    if text.endswith("\n"):
        text = text[:-1]  # the newline that ends the last line, not an extra blank line
    if not text:
        raise TraceError("trace is empty")
    first_line = text.partition("\n")[0]
    kind = "csv" if "," in first_line else "key"
    bad = _BAD_LINE[kind].search(text)
    if bad is not None:
        line_no = text.count("\n", 0, bad.start()) + 1
        line = text[bad.start() :].partition("\n")[0]
        raise TraceError(f"line {line_no}: {_line_problem(line, kind)}")
    # Every line is valid, so whitespace only pads fields and can go before the fast C parser runs.
    clean = text.replace(" ", "").replace("\t", "")
    dtypes = {"timestamp": np.float64, "key": np.int64} if kind == "csv" else {"key": np.int64}
    try:
        frame = pd.read_csv(io.StringIO(clean), header=None, names=list(dtypes), dtype=dtypes, na_filter=False)
    except (OverflowError, ValueError):
        raise _out_of_range(text, kind) from None
    keys = frame["key"].to_numpy(dtype=np.int64)
    if kind == "key":
        return Trace(keys=keys)
    timestamps = frame["timestamp"].to_numpy(dtype=np.float64)
    infinite = np.flatnonzero(~np.isfinite(timestamps))
    if len(infinite):
        line_no = int(infinite[0]) + 1
        field = text.split("\n")[line_no - 1].split(",")[0].strip()
        raise TraceError(f"line {line_no}: timestamp {field!r} is not a finite number")
    return Trace(keys=keys, timestamps=timestamps)


def split_days(trace: Trace, days: int) -> list[np.ndarray]:
    """``days`` consecutive slices: equal time spans when the trace has timestamps, else equal counts.

    Requests are taken in time order (stable for equal times); if all timestamps are equal, time says nothing
    and the split falls back to equal counts.
    """
    if days < 1:
        raise ValueError("days must be >= 1")
    keys = np.asarray(trace.keys)
    ts = trace.timestamps
    if ts is None or len(ts) == 0 or ts.min() == ts.max():
        return [np.asarray(part) for part in np.array_split(keys, days)]
    order = np.argsort(ts, kind="stable")
    ts, keys = ts[order], keys[order]
    # Day of each request; the latest request belongs to the last day rather than one past it.
    day = np.minimum(((ts - ts[0]) / (ts[-1] - ts[0]) * days).astype(np.int64), days - 1)
    bounds = np.searchsorted(day, np.arange(days + 1), side="left")
    return [keys[bounds[d] : bounds[d + 1]] for d in range(days)]


def replay(day_keys: Sequence[np.ndarray], *, top_n: int, capacity: int, half_life_days: float = 2.0) -> dict:
    """Hit rates of four caches over days 1..D-1 (day 0 only warms them); see the helpers for each policy.

    ``hit_rate_lru``: read-through LRU of ``capacity`` keys. ``hit_rate_static_top_n``: only the top-N keys
    selected each day from the previous days' demand. ``hit_rate_ours``: that top-N set plus a read-through
    LRU of ``capacity - top_n`` keys. ``hit_rate_belady``: the offline optimum for ``capacity`` keys.
    """
    if capacity < 1 or top_n < 0:
        raise ValueError("need capacity >= 1 and top_n >= 0")
    if top_n > capacity:
        raise ValueError(f"top_n ({top_n}) cannot exceed capacity ({capacity})")
    if not day_keys:
        raise ValueError("need at least one day")
    days = [np.asarray(day) for day in day_keys]
    precomputed = _precomputed_sets(days, top_n=top_n, half_life_days=half_life_days)
    requests = sum(len(day) for day in days[1:])
    hits = {
        "lru": _lru_hits(days, capacity),
        "static_top_n": sum(_static_hits(day, precomputed[d]) for d, day in enumerate(days) if d > 0),
        "ours": _lru_hits(days, capacity - top_n, precomputed=precomputed),
        "belady": sum(belady_day_hits(day, capacity) for day in days[1:]),
    }
    result: dict = {f"hit_rate_{name}": (n / requests if requests else 0.0) for name, n in hits.items()}
    result.update(requests=int(requests), days=len(days), top_n=int(top_n), capacity=int(capacity))
    return result


def belady_day_hits(day: np.ndarray, capacity: int) -> int:
    """Most hits any cache of ``capacity`` keys can get on one day, given a free reload at the day's start.

    Plain demand-paging Belady (MIN) is not an upper bound here: a policy that swaps in precomputed keys at a
    day boundary (ours does) can beat it. So the bound gets the same power: at each boundary it reloads, for
    free, the ``capacity`` distinct keys that the coming day requests soonest; then, on a miss, it evicts the
    key whose next request is farthest away (declining to admit the requested key if that one is farthest).
    Reloading the keys needed soonest is MIN's own eviction rule applied to "every key is cached" at the
    boundary, so it is optimal; and since the reload erases any earlier state, days are independent. No
    online policy holding at most ``capacity`` keys and changing its contents only at day boundaries or on
    a miss can get more hits.
    """
    codes = pd.factorize(np.asarray(day))[0]
    m = len(codes)
    if m == 0 or capacity < 1:
        return 0
    order = np.argsort(codes, kind="stable")
    same = codes[order[1:]] == codes[order[:-1]]
    next_use = np.full(m, m, dtype=np.int64)  # m means "not again today"
    next_use[order[:-1][same]] = order[1:][same]
    first_use = np.sort(order[np.concatenate(([True], ~same))])[:capacity]

    cached_until = [-1] * (int(codes.max()) + 1)  # next use of each cached key, -1 when not cached
    heap = []  # (-next use, key); entries whose next use no longer matches are stale (lazy deletion)
    for position in first_use.tolist():
        key = int(codes[position])
        cached_until[key] = position
        heap.append((-position, key))
    heapq.heapify(heap)
    size, hits = len(heap), 0
    for key, upcoming in zip(codes.tolist(), next_use.tolist(), strict=True):
        if cached_until[key] >= 0:
            hits += 1
        elif size < capacity:
            size += 1
        else:
            while cached_until[heap[0][1]] != -heap[0][0]:
                heapq.heappop(heap)
            if upcoming >= -heap[0][0]:
                continue  # the requested key is the one needed farthest away: do not admit it
            cached_until[heapq.heappop(heap)[1]] = -1
        cached_until[key] = upcoming
        heapq.heappush(heap, (-upcoming, key))
    return hits


def _precomputed_sets(days: list[np.ndarray], *, top_n: int, half_life_days: float) -> list[set]:
    """The top-N set each day would get from the previous days' demand (day 0 has no history: empty)."""
    counts = [daily_counts(day) for day in days]
    demands = [ad_demand(counts[:d], half_life_days=half_life_days) for d in range(1, len(days))]
    return [set()] + [set(select_top(demand, top_n)) for demand in demands]


def _static_hits(day: np.ndarray, chosen: set[Hashable]) -> int:
    if not chosen or len(day) == 0:
        return 0
    return int(np.isin(day, np.array(list(chosen), dtype=day.dtype)).sum())


def _lru_hits(days: list[np.ndarray], slots: int, *, precomputed: list[set] | None = None) -> int:
    """Hits on days >= 1 of a read-through LRU of ``slots`` keys carried across days.

    Requests for that day's precomputed keys are hits and leave the LRU untouched.
    """
    cache: OrderedDict[Hashable, None] = OrderedDict()
    hits = 0
    for d, day in enumerate(days):
        chosen = precomputed[d] if precomputed is not None else set()
        day_hits = 0
        for key in day.tolist():
            if key in chosen:
                day_hits += 1
            elif key in cache:
                cache.move_to_end(key)
                day_hits += 1
            elif slots > 0:
                cache[key] = None
                if len(cache) > slots:
                    cache.popitem(last=False)
        if d > 0:
            hits += day_hits
    return hits


def _line_problem(line: str, kind: str) -> str:
    """Why one line is not a valid trace line of format ``kind``."""
    if not line.strip():
        return "blank line"
    if line.lstrip().startswith("#"):
        return "comment lines are not allowed"
    if kind == "key" and "," in line:
        return "mixed formats: line 1 is a bare key but this line has 'timestamp,key' fields"
    if kind == "csv" and "," not in line:
        return "mixed formats: line 1 has 'timestamp,key' fields but this line is a bare key"
    if kind == "csv":
        fields = line.split(",")
        if len(fields) != 2:
            return f"expected 2 comma-separated fields 'timestamp,key', got {len(fields)}"
        if not _NUM_TOKEN.fullmatch(fields[0]):
            return f"timestamp {fields[0].strip()!r} is not numeric"
        line = fields[1]
    token = line.strip(" \t")
    if _NUM_TOKEN.fullmatch(token):
        return f"key {token!r} is not an integer"
    return f"key {token!r} is not numeric"


def _out_of_range(text: str, kind: str) -> TraceError:
    """Locate the key that does not fit in int64 (the only way a validated trace fails to convert)."""
    for line_no, line in enumerate(text.split("\n"), start=1):
        token = line.rsplit(",", 1)[-1].strip()
        if not _INT64.min <= int(token) <= _INT64.max:
            return TraceError(f"line {line_no}: key {token!r} is out of the int64 range")
    return TraceError("trace could not be converted to numbers")
