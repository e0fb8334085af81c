"""The one rule of the nightly cleanup's retention settings: ``retention_days`` back from now, 0 keeps everything."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta


def retention_start(log: Callable[[str], None], retention_days: int, what: str, kept: str) -> datetime | None:
    """Now less ``retention_days``: what is older goes. None when the retention of ``what`` is off (0 or less), which
    is logged, saying what is ``kept``."""
    if retention_days <= 0:
        log(f"{what} retention is off (retention_days 0): {kept}")
        return None
    return datetime.now(UTC) - timedelta(days=retention_days)
