"""Next-day demand per key: a PyTorch LSTM over the last days of hourly request counts plus daily totals, and
the baselines it must beat.

Everything here is measured on a held-back day: the last day of the data is never seen in training, each method
forecasts it from the days before, and is scored by

- ``hit_rate``: the share of the held-back day's requests whose key is in the method's top-N (what a precompute
  of N keys would have served), and
- ``mase``: mean absolute scaled error of the per-key daily forecast, ``mean_k |f_k - y_k| / s`` where the scale
  ``s`` is the in-sample error of the seasonal-naive forecast of daily totals, pooled over keys and over the days
  before the held-back day: ``mean_{k,j} |y_{k,j} - y_{k,j-m}|`` with season ``m`` = 7 days (1 day when there are
  not more than 7 days before the held-back day). One pooled scale, because a per-key scale is zero for every
  key that was never requested. Below 1: better than the in-sample seasonal-naive error; NaN when ``s`` is 0 (no
  key's daily requests changed from one season to the next), and the evaluation's ``mase_note`` says why.
  Both are taken over the keys requested before the held-back day, a set fixed before it: a key first requested
  on that day would enter only because it was requested, where every baseline forecasts 0 and the LSTM does not.

Methods: ``lstm``; ``frequency`` (recency-weighted daily counts, ``selection.ad_demand``'s semantics over its
``DEMAND_WINDOW_DAYS``, whatever the LSTM's ``window_days``); ``seasonal`` (seasonal naive: the same hours a week
earlier, or the day before when the data holds no day a week earlier); ``ewma`` (an exponentially smoothed hourly
rate, times 24).

Weights are plain ``state_dict``s written with ``torch.save`` and read only with ``torch.load(weights_only=True)``:
a file that holds anything else (a pickle that would run code) is refused with ``UnsafeModelFile``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .selection import DEMAND_WINDOW_DAYS, ad_demand, coverage, select_top

if TYPE_CHECKING:  # torch is imported where the LSTM is built, trained or loaded: a code location that only
    import torch  # defines the assets, and every run of another job, start 1.3 s sooner without it

METHODS = ("lstm", "frequency", "seasonal", "ewma")
BASELINES = METHODS[1:]
HOURS_PER_DAY = 24
MIN_DAYS = 3  # a day to train on, one for its features, and the held-back day
# Step features (one step per hour of the last sequence_days): log1p(count), missing hour, sin/cos hour of day,
# sin/cos day of week, same weekday as the target day, key age (hours since its first request within the
# window_days before the target day: every target day sees that much history, in training as in serving, so a
# key's age does not depend on how far back the data goes). Head features beside the LSTM's last state: target
# weekday one-hot and three log1p daily totals (window_days mean, last day, a week before the target), so the
# network can lean on what the baselines see. Weight shapes do not depend on the number of steps.
STEP_FEATURES = 8
HEAD_FEATURES = 7 + 3
AGE_CAP_HOURS = 28 * HOURS_PER_DAY


class UnsafeModelFile(ValueError):
    """A weights file that is not a plain ``state_dict`` of tensors (refused, never executed)."""


@dataclass(frozen=True)
class DemandHyperParams:
    """The LSTM and its training budget: training stops at ``max_epochs`` or ``max_steps`` optimizer steps,
    whichever comes first, a budget of work, not of time, so the same data, seed and threads train the same weights
    however busy the machine (with the same torch build). ``max_steps`` is what 45 s reached on 2 shared cores (load
    about 4) at the default sizes: 1981 steps on ``tools.bench.bench_demand``'s workload (100,000 keys, 14 days, whose
    30 epochs are 1410 steps) and 2115 on a replayed day's model of an 8-day, 1.2-million-request trace (30 epochs:
    240 steps); the default lookback's training ends by ``max_epochs``. ``max_seconds`` (feature building included)
    is only a safety stop for a machine far slower than that: when it fires the weights depend on the machine's
    speed, and ``train_lstm`` says so (``stopped_by``).

    ``window_days``: the days before a target day that its features summarise (daily totals in the head) and the
    first target day trained on; ``sequence_days``: the last days of that window the LSTM steps through hour by
    hour. Two days of hours plus the window's daily totals forecast as well as seven days of hours on
    ``tools.bench.bench_demand`` (held-back hit rate 0.5109 against 0.5103-0.511 for seven days, whose training
    the clock cut short; an oracle that knows each key's true rate scores 0.5111) and train all ``max_epochs``
    in about a quarter of the seconds: the LSTM's cost grows with its steps, and faster than linearly once a
    batch's states no longer fit in cache. Weight shapes do not depend on ``sequence_days``."""

    window_days: int = DEMAND_WINDOW_DAYS
    hidden_size: int = 32
    max_epochs: int = 30
    max_steps: int = 2000  # optimizer steps (batches): what 45 s reached on 2 shared cores, see above
    max_seconds: float = 180.0  # a safety stop only, reported when it fires
    learning_rate: float = 0.01
    batch_size: int = 256
    max_train_keys: int = 2000  # keys sampled (by seed) for training; every key is forecast
    sequence_days: int = 2  # hourly LSTM steps: the last sequence_days (at most window_days) before the target
    top_n: int = 1000
    half_life_days: float = 2.0  # frequency baseline, as ad_demand
    ewma_half_life_hours: float = 12.0
    seed: int = 0
    # Days of logs a forecast reads before its target day (None: as many as the data holds, of which the features
    # use max(window_days, 7)). Training sets it (``trained_hyper_params``) to the days its held-back forecast had,
    # so a model trained on a short lookback forecasts tomorrow from the same layout, not a longer one.
    history_days: int | None = None
    # torch CPU threads while training and forecasting (None: torch's default). One by default: on 2 shared cores a
    # second thread made the LSTM's steps several times slower, and one thread is bit-for-bit reproducible.
    threads: int | None = 1

    def __post_init__(self) -> None:
        whole = (
            "window_days",
            "hidden_size",
            "max_epochs",
            "max_steps",
            "batch_size",
            "max_train_keys",
            "sequence_days",
        )
        for name in whole:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("max_seconds", "learning_rate", "half_life_days", "ewma_half_life_hours"):
            if not (math.isfinite(value := getattr(self, name)) and value > 0):  # inf trained, then failed to save
                raise ValueError(f"{name} must be a finite number above 0, got {value}")
        if self.seed < 0:
            raise ValueError(f"seed must be at least 0, got {self.seed}")
        if self.top_n < 0:
            raise ValueError("top_n must be non-negative")
        if self.history_days is not None and self.history_days < 1:
            raise ValueError("history_days must be at least 1")
        if self.threads is not None and self.threads < 0:  # 0 or None: torch's default
            raise ValueError(f"threads must be at least 0 (0 or null: torch's default), got {self.threads}")


@dataclass
class HourlyCounts:
    """Requests per key and hour: ``counts`` is keys × hours (NaN where the hour's log is missing), with each
    hour's local hour of day, weekday (Monday 0) and day index (0 = the oldest day)."""

    keys: np.ndarray
    counts: np.ndarray
    hour_of_day: np.ndarray
    weekday: np.ndarray
    day: np.ndarray
    missing: np.ndarray | None = None  # hours whose log is missing (default: the hours that are NaN for every key)

    @classmethod
    def from_hours(cls, hours: Iterable[tuple[int, datetime, pd.Series | None]]) -> HourlyCounts:
        """From ``(day index, local start of the hour, requests per key or None if missing)``, oldest first."""
        series, hour_of_day, weekday, day = [], [], [], []
        for index, start, counts in hours:
            series.append(counts)
            hour_of_day.append(start.hour)
            weekday.append(start.weekday())
            day.append(index)
        present = [s for s in series if s is not None and len(s)]
        keys = pd.Index(sorted(set().union(*(s.index for s in present)), key=str)) if present else pd.Index([])
        matrix = np.zeros((len(keys), len(series)), dtype=np.float32)
        for t, s in enumerate(series):
            if s is None:
                matrix[:, t] = np.nan
            elif len(s):
                matrix[keys.get_indexer(s.index), t] = s.to_numpy(dtype=np.float32)
        return cls(
            np.asarray(keys, dtype=object),
            matrix,
            np.asarray(hour_of_day, dtype=np.int64),
            np.asarray(weekday, dtype=np.int64),
            np.asarray(day, dtype=np.int64),
            np.asarray([s is None for s in series], dtype=bool),
        )

    @property
    def n_days(self) -> int:
        return int(self.day.max()) + 1 if len(self.day) else 0

    @property
    def missing_hours(self) -> int:
        return int(self._lost_hours().sum())

    def _lost_hours(self) -> np.ndarray:
        """Per hour (bool): whether its logs are missing (recorded so, or no key has a count for it)."""
        if self.missing is not None:
            return self.missing
        return np.isnan(self.counts).all(axis=0) if len(self.keys) else np.zeros(len(self.day), dtype=bool)

    def daily(self) -> np.ndarray:
        """Requests per key and day (keys × days; a missing hour counts 0)."""
        out = np.zeros((len(self.keys), self.n_days), dtype=np.float64)
        if len(self.day) and np.all(self.day[1:] >= self.day[:-1]):  # hours oldest first: a slice per day
            bounds = np.searchsorted(self.day, np.arange(self.n_days + 1), side="left")
            for d in range(self.n_days):
                out[:, d] = np.nansum(self.counts[:, bounds[d] : bounds[d + 1]], axis=1)
            return out
        for d in range(self.n_days):
            out[:, d] = np.nansum(self.counts[:, self.day == d], axis=1)
        return out

    def whole_days(self) -> np.ndarray:
        """Per day (bool, days,): whether none of its hours of logs is missing. A missing hour counts 0 in ``daily``,
        so only whole days compare (``_mase_scale``)."""
        return np.bincount(self.day[self._lost_hours()], minlength=self.n_days) == 0

    def logged_days(self) -> np.ndarray:
        """Per day (bool, days,): whether any of its hours was logged (a day of none is no day of zero requests)."""
        return np.bincount(self.day[~self._lost_hours()], minlength=self.n_days) > 0

    def day_start(self, d: int) -> int:
        """Index of the first hour of day ``d`` (the number of hours when ``d`` is one past the last day)."""
        return int(np.searchsorted(self.day, d, side="left"))

    def last_days(self, n: int) -> HourlyCounts:
        """The last ``n`` days (renumbered from 0), every key kept; hours oldest first."""
        first = max(0, self.n_days - n)
        begin = self.day_start(first)
        missing = None if self.missing is None else self.missing[begin:]
        return HourlyCounts(self.keys, self.counts[:, begin:], self.hour_of_day[begin:], self.weekday[begin:],
                            self.day[begin:] - first, missing)  # fmt: skip


@cache
def _demand_lstm_class() -> type:
    """The ``DemandLSTM`` module class, defined on first use (it needs torch)."""
    import torch
    from torch import nn

    class DemandLSTM(nn.Module):
        """LSTM over the hourly steps of the last ``sequence_days``, and a small head on its last state plus
        calendar/total features; predicts log1p of the key's requests on the target day."""

        def __init__(self, hidden_size: int = 32) -> None:
            super().__init__()
            self.lstm = nn.LSTM(STEP_FEATURES, hidden_size, batch_first=True)
            self.head = nn.Sequential(
                nn.Linear(hidden_size + HEAD_FEATURES, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 1)
            )

        def forward(self, steps: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
            _, (h, _) = self.lstm(steps)
            return self.head(torch.cat([h[-1], static], dim=1)).squeeze(1)

    return DemandLSTM


def demand_lstm(hidden_size: int = 32) -> torch.nn.Module:
    """A new, untrained ``DemandLSTM`` (see ``_demand_lstm_class``)."""
    return _demand_lstm_class()(hidden_size)


@dataclass
class DemandEvaluation:
    """The held-back day's scores of every method, the forecasts they came from, and how the LSTM was trained."""

    hit_rate: dict[str, float]
    mase: dict[str, float]
    forecasts: dict[str, pd.Series]
    winner: str
    best_baseline: str
    keys: int
    train_seconds: float
    epochs: int
    train_samples: int
    warm_started: bool
    notes: list[str] = field(default_factory=list)
    train_steps: int = 0  # optimizer steps made
    stopped_by: str = "epochs"  # the bound that ended training (``train_lstm``): "epochs", "steps" or "seconds"
    new_keys: int = 0  # keys first requested on the held-back day (no method can rank them; outside the MASE)
    new_key_requests: float = 0.0  # their requests on that day
    mase_note: str | None = None  # why ``mase`` holds NaNs (``mase_undefined``); None when it holds none
    train_days: int = 0  # the days it learned to forecast (``trained_days``: days with logs)


def approves(evaluation: DemandEvaluation, margin: float) -> bool:
    """The ``beats_baselines`` rule: the LSTM's held-back hit rate beats the best baseline's by more than ``margin``,
    and its training ended by its budget of work, not by the ``max_seconds`` safety stop (weights it cut short depend
    on the machine's load: two runs of one day differed in their verdicts, and so in the ads they published)."""
    lift = evaluation.hit_rate["lstm"] - evaluation.hit_rate[evaluation.best_baseline]
    return lift > margin and evaluation.stopped_by != "seconds"


@dataclass
class DemandResult:
    model: torch.nn.Module  # a DemandLSTM
    evaluation: DemandEvaluation
    hyper_params: DemandHyperParams  # as trained (``trained_hyper_params``): what to forecast with

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (None: torch's default), then restore the previous count."""
    import torch

    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _window(data: HourlyCounts, rows: np.ndarray | slice, target_day: int, hp: DemandHyperParams,
            daily: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Step and head features of ``rows`` for forecasting ``target_day``: one step per hour of the last
    ``sequence_days`` days before it (at most ``window_days``; zero-padded, marked missing, when the data starts
    later), and head features from the daily totals of the ``window_days`` before it (and of the day a week before
    it); nothing earlier is read, so the features are the same from any data that holds those days, however far
    back it goes. Float32, C-contiguous."""
    length = min(hp.sequence_days, hp.window_days) * HOURS_PER_DAY
    end = data.day_start(target_day)
    horizon = data.day_start(max(0, target_day - hp.window_days))
    begin = max(0, end - length)
    pad = length - (end - begin)
    counts = data.counts[rows, begin:end]
    n = counts.shape[0]
    target_weekday = (
        int(data.weekday[end]) if end < len(data.weekday) else (int(data.weekday[end - 1]) + 1) % 7
    )  # the day after the data: the next weekday
    hours = np.arange(begin, end)
    hod, dow = data.hour_of_day[begin:end], data.weekday[begin:end]
    calendar = np.stack(  # the same for every key: computed once, broadcast
        [
            np.sin(2 * np.pi * hod / 24),
            np.cos(2 * np.pi * hod / 24),
            np.sin(2 * np.pi * dow / 7),
            np.cos(2 * np.pi * dow / 7),
            dow == target_weekday,
        ],
        axis=1,
    ).astype(np.float32)
    steps = np.zeros((n, length, STEP_FEATURES), dtype=np.float32)
    missing = np.isnan(counts)
    steps[:, pad:, 0] = np.log1p(np.where(missing, np.float32(0), counts))
    steps[:, pad:, 1] = missing
    steps[:, :pad, 1] = 1.0
    steps[:, pad:, 2:7] = calendar
    first = _first_seen(data, rows, horizon, end)[:, None]
    age = np.where((first >= 0) & (first <= hours[None, :]), hours[None, :] - first, 0)
    steps[:, pad:, 7] = np.minimum(age, AGE_CAP_HOURS) * np.float32(1 / AGE_CAP_HOURS)
    static = np.zeros((n, HEAD_FEATURES), dtype=np.float32)
    static[:, target_weekday] = 1.0
    totals = daily[rows]
    first_day = max(0, target_day - hp.window_days)
    static[:, 7] = np.log1p(totals[:, first_day:target_day].mean(axis=1)) if target_day > first_day else 0.0
    static[:, 8] = np.log1p(totals[:, target_day - 1]) if target_day >= 1 else 0.0
    static[:, 9] = np.log1p(totals[:, target_day - 7]) if target_day >= 7 else 0.0
    return steps, static


def _first_seen(
    data: HourlyCounts, rows: np.ndarray | slice = slice(None), begin: int = 0, end: int | None = None
) -> np.ndarray:
    """Each of ``rows``' first hour with a request among hours ``begin..end-1`` (-1: none); NaN (a missing hour) is
    not a request."""
    seen = data.counts[rows, begin:end] > 0
    return np.where(seen.any(axis=1), seen.argmax(axis=1) + begin, -1)


def _predict(model: torch.nn.Module, data: HourlyCounts, target_day: int, hp: DemandHyperParams, daily: np.ndarray,
             chunk: int = 8192, batch: int = 1024) -> np.ndarray:  # fmt: skip
    """The model's forecast of every key for ``target_day``: features a ``chunk`` of keys at a time, the network
    ``batch`` keys at a time (small batches keep the LSTM's per-step state in cache: faster than large ones)."""
    import torch

    out = np.zeros(len(data.keys), dtype=np.float64)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(data.keys), chunk):
            stop = min(start + chunk, len(data.keys))
            steps, static = _window(data, slice(start, stop), target_day, hp, daily)
            steps, static = torch.from_numpy(steps), torch.from_numpy(static)
            for b in range(0, stop - start, batch):
                y = model(steps[b : b + batch], static[b : b + batch])
                out[start + b : start + b + len(y)] = torch.expm1(y).clamp(min=0).numpy()
    return out


def trained_hyper_params(hp: DemandHyperParams, last_day: int) -> DemandHyperParams:
    """``hp`` as a model trained to forecast ``last_day`` uses them: ``window_days`` shortened to leave a day to
    train on when fewer days come before ``last_day``, and ``history_days`` the days its forecast of ``last_day``
    had; forecasting tomorrow with these feeds the features it was trained and scored on."""
    window = min(hp.window_days, last_day - 1)
    if window < 1:
        raise ValueError(f"need at least {MIN_DAYS} days of logs to train and hold back a day, got {last_day + 1}")
    return replace(hp, window_days=window, history_days=last_day)


def stopped_by(hp: DemandHyperParams, epochs: int, steps: int, seconds: float) -> str | None:
    """The bound of ``hp`` that ends training after ``epochs`` epochs, ``steps`` steps and ``seconds`` seconds:
    "epochs", "steps" (the budget's, in that order) or "seconds" (the safety stop's); None while none does."""
    if epochs >= hp.max_epochs:
        return "epochs"
    if steps >= hp.max_steps:
        return "steps"
    return "seconds" if seconds >= hp.max_seconds else None


def safety_stop_note(hp: DemandHyperParams, steps: int, epochs: int, seconds: float) -> str:
    """What a training whose ``max_seconds`` safety stop fired tells its reader: not the step budget's weights."""
    return (
        f"LSTM training stopped by its max_seconds safety stop ({hp.max_seconds:g} s, feature building included) "
        f"after {steps} of {hp.max_steps} steps, in epoch {epochs} of {hp.max_epochs} ({seconds:.1f} s): a slower "
        "machine than the step budget was sized for, so another run may train other weights"
    )


def train_lstm(
    data: HourlyCounts,
    hp: DemandHyperParams,
    last_day: int,
    *,
    init_state: Mapping[str, torch.Tensor] | None = None,
    progress: Callable[[int, float, float], None] | None = None,
) -> tuple[torch.nn.Module, dict]:
    """An LSTM trained to forecast days ``window_days .. last_day - 1`` (never ``last_day``; only the days
    ``trained_days`` keeps: days with logs after some; the newest of them whose samples the step budget can reach,
    ``max_steps × batch_size``) of up to
    ``max_train_keys`` keys sampled by ``seed`` among those requested before ``last_day`` (nothing of ``last_day``
    or later, not even which keys it holds, changes the training), warm-started from ``init_state`` when its shapes
    fit; returns the model and ``{"seconds", "epochs", "steps", "stopped_by", "samples", "warm_started", "days"}``.

    Training stops at ``max_epochs`` or ``max_steps`` (``stopped_by`` "epochs" or "steps"; both reached at once:
    "epochs"), or when the ``max_seconds`` safety stop fires ("seconds"): it counts feature building too (so does
    ``seconds``) and is checked before the first epoch and after every step. ``epochs`` counts an epoch a stop cut
    short. ``progress`` is told after each epoch: the epochs done, that epoch's mean training loss (MSE of log1p
    requests per day) and the seconds since the start."""
    import torch
    from torch import nn

    started = time.perf_counter()
    hp_window = trained_hyper_params(hp, last_day)
    window = hp_window.window_days
    rng = np.random.default_rng(hp.seed)
    # Keys requested before last_day only: a key that appears first on (or after) the held-back day has nothing to
    # learn from before it, and letting it into the sample would let that day's key set choose the training rows.
    rows = np.flatnonzero((data.counts[:, : data.day_start(last_day)] > 0).any(axis=1))
    if len(rows) > hp.max_train_keys:
        rows = np.sort(rng.choice(rows, hp.max_train_keys, replace=False))
    # Only the sampled keys are ever looked at: their counts and daily totals.
    sample = HourlyCounts(data.keys[rows], data.counts[rows], data.hour_of_day, data.weekday, data.day, data.missing)
    daily = sample.daily()
    every = slice(None)
    days = trained_days(data, window, last_day)
    if not days:
        raise ValueError(
            f"no day before the held-back one to train on: each of days {window}..{last_day - 1} has no logs, or "
            f"follows {window} days without any (a day without logs is no day of zero requests)"
        )
    # The step budget sees at most max_steps × batch_size samples: a long lookback's older days beyond them are never
    # reached in a first epoch, and their features cost memory (a year of 2,000 keys took 2.8 GB): the newest days go.
    usable = max(1, hp.max_steps * hp.batch_size // max(1, len(rows)))
    days = days[-usable:]
    parts = [_window(sample, every, d, hp_window, daily) for d in days]
    steps = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    static = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    target = torch.from_numpy(np.log1p(daily[:, days].T.reshape(-1)).astype(np.float32))
    del parts
    torch.manual_seed(hp.seed)
    model = demand_lstm(hp.hidden_size)
    warm = False
    if init_state is not None and fits(model, init_state):
        model.load_state_dict(dict(init_state))
        warm = True
    optimizer = torch.optim.Adam(model.parameters(), lr=hp.learning_rate)
    generator = torch.Generator().manual_seed(hp.seed)
    epochs, steps_done = 0, 0
    stop = stopped_by(hp, epochs, steps_done, time.perf_counter() - started)
    model.train()
    while stop is None:
        order = torch.randperm(len(target), generator=generator)
        starts = range(0, len(order), hp.batch_size)
        total, seen = 0.0, 0
        for begin in starts:
            batch = order[begin : begin + hp.batch_size]
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(steps[batch], static[batch]), target[batch])
            loss.backward()
            optimizer.step()
            steps_done += 1
            total, seen = total + loss.detach().item() * len(batch), seen + len(batch)
            # Within an epoch only the steps or the clock can end it; after its last batch the epochs bound goes first.
            if begin != starts[-1] and (stop := stopped_by(hp, epochs, steps_done, time.perf_counter() - started)):
                break
        epochs += 1
        if progress is not None:
            progress(epochs, total / max(seen, 1), time.perf_counter() - started)
        stop = stop or stopped_by(hp, epochs, steps_done, time.perf_counter() - started)
    info = {
        "seconds": time.perf_counter() - started,
        "epochs": epochs,
        "steps": steps_done,
        "stopped_by": stop,
        "samples": len(target),
        "warm_started": warm,
        "days": len(days),
    }
    return model, info


def trained_days(data: HourlyCounts, window: int, last_day: int) -> list[int]:
    """The days of ``window .. last_day - 1`` the LSTM learns to forecast: those with logs, each after ``window`` days
    of which at least one has logs. A day without any logs is no day of zero requests (a deployment's first days, a
    lost day); a missing hour of a day with logs counts as no requests, as everywhere (``missing_hours``), since an
    import writes no file for an hour without requests, and the quiet nights of a service are no loss."""
    logged = data.logged_days()
    return [d for d in range(window, last_day) if logged[d] and logged[d - window : d].any()]


def frequency_forecast(daily: np.ndarray, keys: np.ndarray, target_day: int, hp: DemandHyperParams) -> np.ndarray:
    """Recency-weighted requests per day over the ``DEMAND_WINDOW_DAYS`` before ``target_day`` (``ad_demand``)."""
    # ad_demand's window, not the LSTM's window_days: the baseline is the ranking top_ads falls back to, and a
    # shorter window made it a weaker one (the LSTM approved against a ranking never used).
    first = max(0, target_day - DEMAND_WINDOW_DAYS)
    days = [pd.Series(daily[:, d], index=pd.Index(keys)) for d in range(first, target_day)]
    demand = ad_demand(days, half_life_days=hp.half_life_days)
    weights = sum(0.5 ** ((len(days) - 1 - i) / hp.half_life_days) for i in range(len(days))) or 1.0
    return (demand.reindex(pd.Index(keys)).fillna(0.0) / weights).to_numpy()


def seasonal_forecast(daily: np.ndarray, target_day: int, logged: np.ndarray | None = None) -> np.ndarray:
    """The same hours a week earlier; when the data holds no day a week earlier, or that day has no logs (``logged``,
    per day: ``HourlyCounts.logged_days``; None: every day has), the latest day before ``target_day`` with logs (zeros
    when none has: a day without logs ranked every key 0, so by name)."""
    logged = np.ones(daily.shape[1], dtype=bool) if logged is None else logged
    earlier = ([target_day - 7] if target_day >= 7 else []) + list(range(target_day - 1, -1, -1))
    day = next((d for d in earlier if logged[d]), None)
    return np.zeros(daily.shape[0]) if day is None else daily[:, day]


def ewma_forecast(data: HourlyCounts, target_day: int, hp: DemandHyperParams) -> np.ndarray:
    """24 × the exponentially smoothed hourly rate at the end of the day before ``target_day`` (missing hours
    leave it unchanged)."""
    alpha = 1 - 0.5 ** (1 / hp.ewma_half_life_hours)
    rate = np.zeros(len(data.keys))
    started = np.zeros(len(data.keys), dtype=bool)
    for t in range(data.day_start(target_day)):
        x = np.ascontiguousarray(data.counts[:, t])  # the hour's column read once (a strided view read by each step)
        if np.isnan(x).all():
            continue
        if not np.isfinite(x).all():  # nan_to_num copies every column, and counts rarely hold a NaN
            x = np.nan_to_num(x, nan=0.0)
        rate = np.where(started, alpha * x + (1 - alpha) * rate, x)
        started[:] = True
    return HOURS_PER_DAY * rate


def _mase_scale(daily: np.ndarray, held_day: int, whole: np.ndarray | None = None) -> tuple[float, str | None]:
    """The pooled in-sample seasonal-naive error of the keys of ``daily`` before ``held_day`` (MASE's scale), and
    why it cannot scale anything (missing or 0), or None when it can. ``whole``: which days have no missing hour
    (``HourlyCounts.whole_days``); only pairs of whole days count, and the held-back day must be whole. A day whose
    logs were missing counted 0 requests: every pair with it added its whole traffic to the scale (a deployment's
    first two weeks scaled errors by 2.7 where 1.5 was due, and reported frequency better than seasonal naive)."""
    season = 7 if held_day > 7 else 1
    if daily.shape[0] == 0:
        return math.nan, "no key was requested before the held-back day"
    if held_day <= season:
        return math.nan, f"{held_day} day(s) before the held-back day: too few for a season of {season} day(s)"
    whole = np.ones(daily.shape[1], dtype=bool) if whole is None else whole
    if held_day < len(whole) and not whole[held_day]:
        return math.nan, "hours of logs are missing on the held-back day: its requests are not all known"
    later = [d for d in range(season, held_day) if whole[d] and whole[d - season]]
    if not later:
        return math.nan, f"no two whole days {season} day(s) apart before the held-back day (hours of logs missing)"
    scale = float(np.abs(daily[:, later] - daily[:, [d - season for d in later]]).mean())
    if scale == 0:
        return scale, (
            f"no key's daily requests changed from one {season}-day season to the next before the held-back day, "
            "so the scale (the in-sample seasonal-naive error) is 0"
        )
    return scale, None


def mase_undefined(daily: np.ndarray, held_day: int, whole: np.ndarray | None = None) -> str | None:
    """Why the MASE of the keys of ``daily`` cannot be measured on ``held_day`` (its scale is missing or 0, or the
    days it needs are not ``whole``), or None when it can."""
    return _mase_scale(daily, held_day, whole)[1]


def mase(
    forecast: np.ndarray, actual: np.ndarray, daily: np.ndarray, held_day: int, whole: np.ndarray | None = None
) -> float:
    """Mean absolute error of ``forecast`` scaled by the pooled in-sample seasonal-naive error of the ``whole`` days
    (module doc); NaN when that scale is undefined or 0 (``mase_undefined`` says why)."""
    return _scaled_error(forecast, actual, *_mase_scale(daily, held_day, whole))


def _scaled_error(forecast: np.ndarray, actual: np.ndarray, scale: float, undefined: str | None) -> float:
    """``mase`` of ``forecast`` with its scale (``_mase_scale``) found already."""
    return math.nan if undefined is not None else float(np.abs(forecast - actual).mean() / scale)


def evaluate_demand(
    data: HourlyCounts,
    hp: DemandHyperParams,
    *,
    init_state: Mapping[str, torch.Tensor] | None = None,
    progress: Callable[[int, float, float], None] | None = None,
) -> DemandResult:
    """Train the LSTM on every day but the last, forecast the last with it and the baselines, score them all;
    ``progress`` follows the training (``train_lstm``)."""
    if len(data.keys) == 0:
        raise ValueError("no requests in the lookback: nothing to forecast")
    if data.n_days < MIN_DAYS:
        raise ValueError(f"need at least {MIN_DAYS} days of logs to train and hold back a day, got {data.n_days}")
    held = data.n_days - 1
    daily = data.daily()
    notes = []
    if data.missing_hours:
        notes.append(f"{data.missing_hours} hours of logs missing (counted as no requests)")
    with torch_threads(hp.threads):
        model, info = train_lstm(data, hp, held, init_state=init_state, progress=progress)
        trained = trained_hyper_params(hp, held)
        lstm = _predict(model, data, held, trained, daily)
    if init_state is not None and not info["warm_started"]:
        notes.append("previous weights did not fit these hyper-parameters: trained from scratch")
    if info["stopped_by"] == "seconds":
        notes.append(safety_stop_note(hp, info["steps"], info["epochs"], info["seconds"]))
    forecasts = {
        "lstm": lstm,
        "frequency": frequency_forecast(daily, data.keys, held, hp),
        "seasonal": seasonal_forecast(daily, held, data.logged_days()),
        "ewma": ewma_forecast(data, held, hp),
    }
    actual = daily[:, held]
    if not actual.sum() > 0:
        missing = int(data.missing[data.day == held].sum()) if data.missing is not None else 0
        notes.append(
            f"the held-back day has no requests ({missing} of its hours missing): every method scores 0: the "
            "evaluation tells none apart"
        )
    known = daily[:, :held].sum(axis=1) > 0  # a method can only choose keys requested before the held-back day
    actual_series = pd.Series(actual, index=pd.Index(data.keys))
    scale, mase_note = _mase_scale(daily[known], held, data.whole_days())  # the same for every method: found once
    hit_rate, errors, series = {}, {}, {}
    for name, forecast in forecasts.items():
        s = pd.Series(forecast, index=pd.Index(data.keys))
        series[name] = s
        chosen = select_top(s[known], hp.top_n)
        hit_rate[name] = coverage(chosen, actual_series)
        errors[name] = _scaled_error(forecast[known], actual[known], scale, mase_note)
    if mase_note is not None:
        notes.append(f"MASE not measured: {mase_note}")
    best_baseline = max(BASELINES, key=lambda name: (hit_rate[name], -BASELINES.index(name)))
    winner = "lstm" if hit_rate["lstm"] > hit_rate[best_baseline] else best_baseline
    evaluation = DemandEvaluation(
        hit_rate=hit_rate,
        mase=errors,
        forecasts=series,
        winner=winner,
        best_baseline=best_baseline,
        keys=len(data.keys),
        train_seconds=info["seconds"],
        epochs=info["epochs"],
        train_samples=info["samples"],
        train_days=info["days"],
        warm_started=info["warm_started"],
        notes=notes,
        train_steps=info["steps"],
        stopped_by=info["stopped_by"],
        new_keys=int((~known & (actual > 0)).sum()),
        new_key_requests=float(actual[~known].sum()),
        mase_note=mase_note,
    )
    return DemandResult(model, evaluation, trained)


def forecast_next_day(model: torch.nn.Module, data: HourlyCounts, hp: DemandHyperParams) -> pd.Series:
    """Requests per key the LSTM expects on the day after the data (for choosing tomorrow's keys), from its last
    ``history_days`` days when set; ``hp``: the ones it was trained with (``DemandResult.hyper_params``)."""
    if hp.history_days is not None and data.n_days > hp.history_days:
        data = data.last_days(hp.history_days)
    window = max(1, min(hp.window_days, data.n_days))
    hp_window = DemandHyperParams(**{**hp.__dict__, "window_days": window})
    daily = np.concatenate([data.daily(), np.zeros((len(data.keys), 1))], axis=1)
    with torch_threads(hp.threads):
        values = _predict(model, data, data.n_days, hp_window, daily)
    return pd.Series(values, index=pd.Index(data.keys), name="forecast")


def fits(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` has exactly ``model``'s tensors, by name and shape. Checked before loading: a strict
    ``load_state_dict`` that fails has already copied the tensors that fit."""
    own = model.state_dict()
    return own.keys() == state.keys() and all(own[name].shape == state[name].shape for name in own)


def load_model(state: Mapping[str, torch.Tensor], hidden_size: int) -> torch.nn.Module:
    """A ``DemandLSTM`` with the weights of ``state``."""
    model = demand_lstm(hidden_size)
    model.load_state_dict(dict(state))
    return model


def save_weights(state: Mapping[str, torch.Tensor], file) -> None:
    """Write a plain ``state_dict`` (str → tensor) with ``torch.save``; anything else is refused."""
    import torch

    _check_plain(state, "refusing to save")
    torch.save(dict(state), file)


def load_weights(file: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a plain ``state_dict`` with ``torch.load(weights_only=True)``: nothing in the file is executed, and a
    file holding anything but tensors by name raises ``UnsafeModelFile``."""
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except OSError as error:
        if error.errno is not None:
            raise  # the file could not be read (missing, no permission): no verdict on what it holds
        raise UnsafeModelFile(f"{file} is not a plain state_dict: the weights-only loader failed ({error})") from error
    except Exception as error:  # a malformed pickle raises almost anything (IndexError, KeyError, TypeError, ...)
        raise UnsafeModelFile(
            f"{file} is not a plain state_dict: refused by the weights-only loader ({_loader_finding(error)})"
        ) from error
    _check_plain(state, f"{file} is not a plain state_dict")
    return state


def _loader_finding(error: Exception) -> str:
    """What the weights-only loader found in a file it refused, without PyTorch's advice around it: to load the file
    again with ``weights_only=False`` (which would run the code of a tampered file) and where its documentation is."""
    advice = ("Weights only load failed", "Check the documentation of torch.load")
    found = [" ".join(part.split()) for part in str(error).split("\n\n") if part.strip()]
    kept = [part for part in found if not part.startswith(advice)]
    return "; ".join(kept) or type(error).__name__


def _check_plain(state: object, what: str) -> None:
    import torch

    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UnsafeModelFile(f"{what}: expected a mapping of names to tensors, got {type(state).__name__}")
