"""Every PartitionsDefinition of the project, all in one timezone (``PRECOMPUTE_TIMEZONE``, default UTC)."""

from __future__ import annotations

import os

import dagster as dg

TIMEZONE = os.environ.get("PRECOMPUTE_TIMEZONE", "UTC")
START_DATE = "2026-01-01"

hourly_partitions = dg.HourlyPartitionsDefinition(start_date=f"{START_DATE}-00:00", timezone=TIMEZONE)
daily_partitions = dg.DailyPartitionsDefinition(start_date=START_DATE, timezone=TIMEZONE)
