"""Synthetic users of the ad platform: sessions of actions with habits, deterministic under ``seed``.

Each user belongs to a tenant and has a preferred hour (sessions start around it, in UTC), a number of sessions
per working day (fewer at weekends), a mean session length and a role (creator or analyst). A session starts with
``login``; each next action is drawn from ``next_action_probabilities``: a first-order structure on the last
action (an upload is often followed by another upload or a variant review, a campaign by uploads), reshaped by the
time of day (dashboards and analytics in the morning, creation in the afternoon, analytics late), the weekend, the
user's first session of the day and uploads piling up in a session. So the next action depends on more than the
last one: a model that sees the hour, the day and the session can beat a first-order Markov chain.

Entities: ``creative_upload`` makes a new creative ``{user}-cr{n}`` and ``variant_review`` reviews the user's
latest one; ``campaign_create`` makes ``{user}-c{n}`` and ``analytics_view`` looks at the latest one;
``dashboard_view`` is about the tenant; ``login`` about nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import redis

from ..serving.events import ACTION_INDEX, ACTIONS, EventLogger
from ..serving.keys import KeySchema
from ..serving.querylog import LoggerStats

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
SESSION_GAP_MS = 30 * MINUTE_MS  # a pause this long ends a session (the model's sessions use the same gap)

# Rows: last action; columns: next action (ACTIONS order). A session never logs in twice.
_BASE = np.array(
    [
        # login dash  camp  upl   rev   anal
        [0.00, 0.55, 0.10, 0.10, 0.05, 0.20],  # login
        [0.00, 0.05, 0.30, 0.15, 0.10, 0.40],  # dashboard_view
        [0.00, 0.05, 0.05, 0.75, 0.05, 0.10],  # campaign_create
        [0.00, 0.05, 0.05, 0.45, 0.40, 0.05],  # creative_upload
        [0.00, 0.15, 0.10, 0.30, 0.15, 0.30],  # variant_review
        [0.00, 0.35, 0.15, 0.05, 0.10, 0.35],  # analytics_view
    ]
)
_DASH, _CAMP, _UPLOAD, _REVIEW, _ANALYTICS = (ACTION_INDEX[a] for a in ACTIONS[1:])


def next_action_probabilities(
    last: str, hour: float, weekend: bool, first_session_today: bool, uploads_in_session: int, role: str
) -> np.ndarray:
    """The distribution of the action after ``last`` (over ``ACTIONS``), given the user's situation."""
    p = _BASE[ACTION_INDEX[last]].copy()
    if hour < 11:
        p[[_DASH, _ANALYTICS]] *= 2.5
    elif hour < 16:
        p[[_CAMP, _UPLOAD]] *= 2.5
    else:
        p[_ANALYTICS] *= 3.0
        p[_REVIEW] *= 1.5
    if weekend:
        p[_CAMP] *= 0.2
        p[_ANALYTICS] *= 2.0
    if first_session_today and last == "login":
        p[_DASH] *= 4.0
    if uploads_in_session >= 3:
        p[_REVIEW] *= 4.0
        p[_UPLOAD] *= 0.3
    if role == "creator":
        p[[_CAMP, _UPLOAD]] *= 1.5
    else:
        p[[_DASH, _ANALYTICS]] *= 1.5
    return p / p.sum()


def make_users(n_users: int, *, n_tenants: int | None = None, seed: int = 0) -> pd.DataFrame:
    """``n_users`` users with their habits: ``user``, ``tenant``, ``peak_hour``, ``sessions_per_day``,
    ``mean_session_actions``, ``role``."""
    if n_users < 0:
        raise ValueError("need n_users >= 0")
    rng = np.random.default_rng([seed, 10])
    tenants = n_tenants or max(1, n_users // 10)
    return pd.DataFrame(
        {
            "user": [f"u{i:05d}" for i in range(n_users)],
            "tenant": [f"t{int(t):03d}" for t in rng.integers(0, tenants, n_users)],
            "peak_hour": np.clip(rng.normal(13.0, 3.0, n_users), 7.0, 20.0),
            "sessions_per_day": rng.uniform(0.8, 3.0, n_users),
            "mean_session_actions": rng.uniform(3.0, 9.0, n_users),
            "role": np.where(rng.random(n_users) < 0.5, "creator", "analyst"),
        }
    )


def generate_user_events(users: pd.DataFrame, *, start_ms: int, days: int, seed: int = 0) -> pd.DataFrame:
    """Every user's sessions over ``days`` days from ``start_ms`` (a midnight, UTC), sorted by time:
    ``ts_ms``, ``user``, ``tenant``, ``action``, ``entity`` (None for logins)."""
    rng = np.random.default_rng([seed, 11])
    ts, who, tenant_of, action_of, entity_of = [], [], [], [], []
    for profile in users.itertuples(index=False):
        creatives = campaigns = 0
        for day in range(days):
            day_ms = start_ms + day * DAY_MS
            weekday = int(pd.Timestamp(day_ms, unit="ms").dayofweek)
            weekend = weekday >= 5
            n_sessions = rng.poisson(profile.sessions_per_day * (0.3 if weekend else 1.0))
            starts = np.sort(np.clip(rng.normal(profile.peak_hour, 2.5, n_sessions), 0.0, 23.5)) * HOUR_MS
            free_at = day_ms
            for index, offset in enumerate(starts):
                at = max(day_ms + int(offset), free_at)
                if at >= day_ms + DAY_MS - HOUR_MS:
                    break
                length = 1 + rng.geometric(1.0 / profile.mean_session_actions)
                last, uploads = "login", 0
                for step in range(length):
                    if step:
                        hour = (at - day_ms) / HOUR_MS
                        p = next_action_probabilities(last, hour, weekend, index == 0, uploads, profile.role)
                        last = ACTIONS[rng.choice(len(ACTIONS), p=p)]
                    entity: str | None = None
                    if last == "creative_upload":
                        creatives, uploads = creatives + 1, uploads + 1
                        entity = f"{profile.user}-cr{creatives}"
                    elif last == "variant_review":
                        entity = f"{profile.user}-cr{creatives}" if creatives else None
                    elif last == "campaign_create":
                        campaigns += 1
                        entity = f"{profile.user}-c{campaigns}"
                    elif last == "analytics_view":
                        entity = f"{profile.user}-c{campaigns}" if campaigns else None
                    elif last == "dashboard_view":
                        entity = profile.tenant
                    ts.append(at)
                    who.append(profile.user)
                    tenant_of.append(profile.tenant)
                    action_of.append(last)
                    entity_of.append(entity)
                    at += 5_000 + int(rng.exponential(75_000))
                free_at = at + SESSION_GAP_MS + MINUTE_MS
    frame = pd.DataFrame(
        {
            "ts_ms": np.asarray(ts, dtype=np.int64),
            "user": pd.Series(who, dtype=object),
            "tenant": pd.Series(tenant_of, dtype=object),
            "action": pd.Series(action_of, dtype=object),
            "entity": pd.Series(entity_of, dtype=object),
        }
    )
    return frame.sort_values(["ts_ms", "user"], kind="stable", ignore_index=True)


def send_user_events(
    events: pd.DataFrame, client: redis.Redis, schema: KeySchema, *, max_buffer: int = 1_000_000
) -> LoggerStats:
    """Send ``events`` (sorted by time) through the serving client's ``EventLogger`` on a simulated clock, so each
    lands in the event stream at its own time; returns the logger's counters."""
    now = [0]
    clock: Callable[[], int] = lambda: now[0]  # noqa: E731
    logger = EventLogger(client, schema, clock=clock, max_buffer=max_buffer)
    try:
        for ts, user, tenant, action, entity in events[["ts_ms", "user", "tenant", "action", "entity"]].itertuples(
            index=False, name=None
        ):
            now[0] = int(ts)
            text = entity if isinstance(entity, str) else None  # a null read back from Parquet may be NaN
            logger.record_event(user, action, entity=text, tenant=tenant)
    finally:
        logger.close()
    return logger.stats
