"""Deployment settings that shape the Definitions themselves: the timezone and first day of the partitions.

They are read from the environment by ``load_settings``, called once when Dagster loads the Definitions
(``definitions.py``), never at import: importing an asset module reads no environment variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from zoneinfo import ZoneInfo

from ..stack import ENV_TIMEZONE

ENV_PARTITIONS_START = "PRECOMPUTE_PARTITIONS_START"
DEFAULT_TIMEZONE = "UTC"
DEFAULT_PARTITIONS_START = "2026-01-01"
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


class SettingError(ValueError):
    """A deployment setting is missing or malformed; the message names its environment variable."""


def unset_error(variable: str, what: str) -> SettingError:
    """The error for a required location that is not set (nothing falls back to the working directory)."""
    return SettingError(
        f"{variable} is not set: it names {what}. `precompute up` sets it for the local stack (to run "
        f'`dagster` yourself, first `eval "$(precompute env)"`); elsewhere, export it.'
    )


@dataclass(frozen=True)
class Settings:
    """The one timezone of partitions and schedules, and the first daily partition (``YYYY-MM-DD``)."""

    timezone: str = DEFAULT_TIMEZONE
    partitions_start: str = DEFAULT_PARTITIONS_START

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (KeyError, ValueError, OSError):
            raise SettingError(
                f"{ENV_TIMEZONE}={self.timezone!r} is not a known timezone: use an IANA name such as "
                "UTC, Europe/Berlin or America/New_York"
            ) from None
        try:
            valid = bool(_DAY.fullmatch(self.partitions_start)) and date.fromisoformat(self.partitions_start)
        except ValueError:
            valid = False
        if not valid:
            raise SettingError(
                f"{ENV_PARTITIONS_START}={self.partitions_start!r} is not a date: use YYYY-MM-DD "
                f"(default {DEFAULT_PARTITIONS_START})"
            )


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings of this deployment from ``environ`` (default ``os.environ``); unset or blank means default."""
    env = os.environ if environ is None else environ
    return Settings(
        timezone=(env.get(ENV_TIMEZONE) or "").strip() or DEFAULT_TIMEZONE,
        partitions_start=(env.get(ENV_PARTITIONS_START) or "").strip() or DEFAULT_PARTITIONS_START,
    )
