"""Historical request logs into the lake's hourly ``query_logs`` partitions, so the daily graph learns from history
on its first day instead of waiting a week for the serving client's logs.

Each request becomes a row like the serving client's, with what a request log does not know left empty (``hit``,
``latency_us``, ``user``, ``tenant``, ``arm``, ``version``). Its ``stream_id`` starts with ``IMPORTED``: the
``query_logs`` asset keeps such an hour when the stream holds nothing for it, instead of emptying it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..ml.replay import EPOCH_2000_S, EPOCH_2200_S, FILETIME_EPOCH_S
from ..serving.querylog import MAX_KEY_LENGTH  # the serving client's query log quarantines longer keys too
from .tables import QUERY_LOGS

IMPORTED = "import:"  # the stream_id prefix of imported rows


class HourFrames(Mapping[str, pd.DataFrame]):
    """``query_logs`` frames by hourly partition key, each built when it is read: an import's frames all at once would
    hold every request as a row of Python strings (2.6 GB for 10M requests) before the first hour is written."""

    def __init__(self, rows: dict[str, np.ndarray], build: Callable[[np.ndarray], pd.DataFrame]) -> None:
        self._rows, self._build = rows, build

    def __getitem__(self, hour: str) -> pd.DataFrame:
        return self._build(self._rows[hour])

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def requests(self, hour: str) -> int:
        """The hour's requests, without building its frame."""
        return len(self._rows[hour])


@dataclass
class HourRows:
    """The imported requests' frames by hourly partition key, and why the others were left out."""

    frames: Mapping[str, pd.DataFrame] = field(default_factory=dict)
    quarantined: Counter = field(default_factory=Counter)  # reason -> requests


BEFORE_FIRST, NOT_OVER = "before the first hourly partition", "in an hour that is not over"
# a timestamp counted from the trace's start that is negative: not a request's (``first_valid_second``)
BEFORE_TRACE_START = "before the trace's start (a negative relative timestamp)"
OUTSIDE = (BEFORE_FIRST, NOT_OVER)  # the quarantine reasons of requests placed outside the partitions


def outside_share(rows: HourRows, requests: int) -> float:
    """The share of ``requests`` quarantined for falling outside the hourly partitions (before the first, or from the
    hour in progress on): a large one means misread or misplaced timestamps (``--start``, ``--time-unit``)."""
    return sum(rows.quarantined[reason] for reason in OUTSIDE) / requests if requests else 0.0


TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, "filetime": 1e-7}
# "auto": the unit that puts the largest absolute timestamp after 2000 in seconds (1e9 s is 2001, 1e11 s the year 5138)
_AUTO_LIMITS = ((1e17, "ns"), (1e14, "us"), (1e11, "ms"))


def time_unit(timestamps: np.ndarray) -> str:
    """The unit of epoch timestamps, by the size of their median: seconds up to 1e11, then ms, us and ns. One outlier
    (a corrupt row's 1e300) changes nothing: by their largest, it had every other request read as nanoseconds."""
    typical = _typical(np.abs(timestamps))
    return next((unit for limit, unit in _AUTO_LIMITS if typical > limit), "s")


def _typical(values: np.ndarray) -> float:
    """The median of the finite ``values`` (0 for none): the lower of the middle two, one of the values, as a blend of
    a log half in seconds and half in milliseconds is neither."""
    finite = values[np.isfinite(values)]
    return float(np.quantile(finite, 0.5, method="lower")) if len(finite) else 0.0


OTHER_UNIT = "timestamp in another unit than the log's (by its size)"


def other_unit(timestamps: np.ndarray, unit: str | None = None) -> np.ndarray:
    """Per epoch timestamp, whether it is written in another unit than the log's, ``unit`` (None: ``time_unit`` of
    ``timestamps``; a caller that has it passes it): read in the unit its own size says, it is a time from 2000 to
    2200, which it is not in the log's (a logger that moved from seconds to milliseconds). Read in the log's unit,
    such a request was placed in 1970 or beyond the year 50,000."""
    values = np.asarray(timestamps, dtype=np.float64)
    sizes = [values > limit for limit, _ in _AUTO_LIMITS]
    own_factor = np.select(sizes, [TIME_UNITS[own] for _, own in _AUTO_LIMITS], TIME_UNITS["s"])
    own_seconds = values * own_factor
    in_range = (own_seconds >= EPOCH_2000_S) & (own_seconds < EPOCH_2200_S)
    return (own_factor != TIME_UNITS[time_unit(values) if unit is None else unit]) & in_range


def epoch_seconds(timestamps: np.ndarray, unit: str = "auto") -> np.ndarray:
    """``timestamps`` in ``unit`` (``TIME_UNITS``, or ``"auto"``: ``time_unit``) as float64 seconds since 1970."""
    values = np.asarray(timestamps, dtype=np.float64)
    seconds = values * TIME_UNITS[time_unit(values) if unit == "auto" else unit]
    return seconds - FILETIME_EPOCH_S if unit == "filetime" else seconds


def looks_like_filetime(timestamps: np.ndarray) -> bool:
    """Whether ``timestamps`` are Windows file times from 2000 to 2200 (which ``"auto"`` reads as ns before 2000)."""
    seconds = epoch_seconds(timestamps, "filetime")
    seconds = seconds[np.isfinite(seconds)]
    return bool(len(seconds)) and seconds.min() >= EPOCH_2000_S and seconds.max() < EPOCH_2200_S


def is_relative(seconds: np.ndarray) -> bool:
    """Whether the timestamps count from the trace's start: their median is before 2000-01-01 as epoch seconds (one
    corrupt row's 0 or -5 is quarantined as before the first partition, not taken for the whole log's reading)."""
    return bool(len(seconds)) and _typical(seconds) < EPOCH_2000_S


def first_valid_second(seconds: np.ndarray) -> float | None:
    """The earliest timestamp that can be a request's, which ``--start`` moves to midnight: finite, and from 2000 to
    2200 as epoch seconds or, counted from the trace's start (``is_relative``), not negative; None when there is none.
    A corrupt row's 0 among epoch seconds was the earliest, and moved every real request 56 years on."""
    lowest, highest = (0.0, np.inf) if is_relative(seconds) else (EPOCH_2000_S, EPOCH_2200_S)
    valid = seconds[np.isfinite(seconds) & (seconds >= lowest) & (seconds < highest)]
    return float(valid.min()) if len(valid) else None


def key_problems(keys: pd.Index) -> np.ndarray:
    """Why each key cannot be logged ("" when it can): empty, longer than ``MAX_KEY_LENGTH``, control characters."""
    text = pd.Series(keys, dtype=object).astype(str)
    lengths = text.str.len().to_numpy()
    control = text.str.contains(r"[\x00-\x1f\x7f]", regex=True).to_numpy()
    problems = [lengths == 0, lengths > MAX_KEY_LENGTH, control]
    reasons = ["empty key", f"key longer than {MAX_KEY_LENGTH} characters", "key contains control characters"]
    return np.select(problems, reasons, default="").astype(object)


def hour_rows(
    keys: np.ndarray,
    seconds: np.ndarray,
    *,
    kind: str,
    source: str,
    partition_key: Callable[[float], str],
    first_s: float,
    last_s: float,
    trace_start_s: float = -np.inf,
    strays: np.ndarray | None = None,
) -> HourRows:
    """The requests (``keys`` at epoch ``seconds``) of ``kind`` as ``query_logs`` frames by hourly partition key
    (``partition_key`` of a timestamp); requests before ``first_s`` (the first partition) or from ``last_s`` on (the
    hour that is not over), before ``trace_start_s`` (where ``--start`` put a relative trace's 0: a negative one),
    ``strays`` (per request: its timestamp is in another unit, ``other_unit``) and unusable keys are quarantined and
    counted. ``source`` names the file in stream ids."""
    out = HourRows()
    codes, uniques = pd.factorize(keys, sort=False)  # distinct keys are distinct as text: stringify the uniques only
    uniques = pd.Series(np.asarray(uniques), dtype=object).astype(str).to_numpy(dtype=object)
    problems = key_problems(pd.Index(uniques))[codes]
    keep = problems == ""
    out.quarantined.update(Counter(problems[~keep].tolist()))
    for mask, reason in (
        (~np.isfinite(seconds), "timestamp is not a finite number"),
        (np.zeros(len(seconds), dtype=bool) if strays is None else strays, OTHER_UNIT),
        (seconds < trace_start_s, BEFORE_TRACE_START),
        (seconds < first_s, BEFORE_FIRST),
        (seconds >= last_s, NOT_OVER),
    ):
        out.quarantined[reason] += int((mask & keep).sum())
        keep &= ~mask
    out.quarantined = +out.quarantined  # drop zero counts
    rows = np.flatnonzero(keep)
    if not len(rows):
        return out
    # Hours are local, and some zones are 30 or 45 minutes off UTC: key each quarter hour once.
    quarters = np.floor(seconds[rows] / 900.0).astype(np.int64)
    distinct, which = np.unique(quarters, return_inverse=True)
    hour_of_quarter = np.array([partition_key(float(q) * 900.0) for q in distinct], dtype=object)
    hours = hour_of_quarter[which]
    order = np.argsort(seconds[rows], kind="stable")
    rows, hours = rows[order], hours[order]
    starts = np.flatnonzero(np.r_[True, hours[1:] != hours[:-1]])
    by_hour = {str(hours[lo]): rows[lo:hi] for lo, hi in zip(starts, np.r_[starts[1:], len(rows)], strict=True)}

    def frame(picked: np.ndarray) -> pd.DataFrame:
        n = len(picked)
        table = pa.table(
            {
                # "import:SOURCE:ROW" joined by Arrow, not one Python f-string per request
                "stream_id": pc.binary_join_element_wise(
                    f"{IMPORTED}{source}:", pa.array(picked).cast(pa.string()), ""
                ),
                "ts": pa.array(np.round(seconds[picked] * 1000).astype(np.int64)).cast(QUERY_LOGS.field("ts").type),
                "kind": pa.array([kind] * n, pa.string()),
                "key": pa.array(uniques[codes[picked]], pa.string()),
                "hit": pa.nulls(n, pa.bool_()),
                "latency_us": pa.nulls(n, pa.int64()),
                "user": pa.nulls(n, pa.string()),
                "tenant": pa.nulls(n, pa.string()),
            },
            schema=QUERY_LOGS,
        )
        hour = table.to_pandas()
        hour["arm"] = pd.Series([None] * n, dtype=object)
        hour["version"] = pd.Series([None] * n, dtype=object)
        return hour

    out.frames = HourFrames(by_hour, frame)
    return out


def placed_span_hours(seconds: np.ndarray, first_s: float, last_s: float, trace_start_s: float = -np.inf) -> float:
    """Hours from the first to the last request that has an hourly partition (``first_s`` to ``last_s``, from
    ``trace_start_s`` on, as ``hour_rows`` places them): a corrupt timestamp it quarantines (1e300, -5) does not
    stretch the span."""
    placed = seconds[np.isfinite(seconds) & (seconds >= max(first_s, trace_start_s)) & (seconds < last_s)]
    return round(float(placed.max() - placed.min()) / 3600, 2) if len(placed) else 0.0


def is_imported(frame: pd.DataFrame) -> bool:
    """Whether a ``query_logs`` partition's rows came from an import (not from the serving client's stream)."""
    return bool(len(frame)) and str(frame["stream_id"].iloc[0]).startswith(IMPORTED)


def other_kinds_imported(existing: pd.DataFrame, kind: str) -> pd.DataFrame | None:
    """The rows of an hour the lake holds that an import of ``kind`` keeps beside its own: when every row was imported,
    those of other kinds; None when the serving client's stream wrote (some of) the hour."""
    imported = existing["stream_id"].astype(str).str.startswith(IMPORTED)
    if not len(existing) or not bool(imported.all()):
        return None
    return existing[existing["kind"] != kind]


def merge_hour(others: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """An hour's rows of other kinds and an import's, in time order (stable: ties keep the other kinds first)."""
    merged = pd.concat([others, frame[others.columns]], ignore_index=True)
    return merged.sort_values("ts", kind="stable", ignore_index=True)
