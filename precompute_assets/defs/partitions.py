"""The partitions of the project: hourly and daily, in one timezone, from one first day.

Assets are declared on ``DEFAULT_PARTITIONS`` (UTC from 2026-01-01), so importing a module reads no
environment and tests get the same partitions wherever they run. When Dagster loads the Definitions,
``definitions.py`` moves every asset onto the deployment's partitions (``Partitions.move``, from
``PRECOMPUTE_TIMEZONE`` and ``PRECOMPUTE_PARTITIONS_START``). So code that maps partition keys to time asks
for the partitions the asset runs in, ``Partitions.of(context)``, never for the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from functools import cached_property
from typing import TypeVar

import dagster as dg

from .settings import DEFAULT_PARTITIONS_START, DEFAULT_TIMEZONE, Settings, load_settings

AssetLike = TypeVar("AssetLike", dg.AssetsDefinition, dg.AssetSpec)


@dataclass(frozen=True)
class Partitions:
    """Hourly and daily partitions in ``timezone`` whose first day is ``start`` (``YYYY-MM-DD``)."""

    timezone: str = DEFAULT_TIMEZONE
    start: str = DEFAULT_PARTITIONS_START

    @classmethod
    def of_settings(cls, settings: Settings) -> Partitions:
        return cls(settings.timezone, settings.partitions_start)

    @classmethod
    def of(cls, context: dg.AssetExecutionContext) -> Partitions:
        """The partitions the running asset was defined with (the deployment's, inside the Definitions)."""
        definition = context.assets_def.partitions_def
        if not isinstance(definition, dg.TimeWindowPartitionsDefinition):
            raise TypeError(f"{context.assets_def.key.to_user_string()} is not time-partitioned")
        return cls(definition.timezone, definition.start.date().isoformat())

    @cached_property
    def hourly(self) -> dg.HourlyPartitionsDefinition:
        return dg.HourlyPartitionsDefinition(start_date=f"{self.start}-00:00", timezone=self.timezone)

    @cached_property
    def daily(self) -> dg.DailyPartitionsDefinition:
        return dg.DailyPartitionsDefinition(start_date=self.start, timezone=self.timezone)

    def hours_of(self, day: str) -> list[str]:
        """The hourly partition keys of the daily partition ``day`` (23 or 25 on DST days)."""
        return list(self.hourly.get_partition_keys_in_time_window(self.daily.time_window_for_partition_key(day)))

    def days_ending(self, day: str, n: int) -> list[str]:
        """The daily partition ``day`` and the ``n - 1`` days before it (none before the first), oldest first."""
        last, first = date.fromisoformat(day), date.fromisoformat(self.start)
        days = (last - timedelta(days=back) for back in range(n - 1, -1, -1))
        return [d.isoformat() for d in days if d >= first]

    def move(self, asset: AssetLike) -> AssetLike:
        """``asset`` moved from ``DEFAULT_PARTITIONS`` onto these partitions, with them in its metadata."""
        moves = {DEFAULT_PARTITIONS.hourly: self.hourly, DEFAULT_PARTITIONS.daily: self.daily}

        def moved(spec: dg.AssetSpec) -> dg.AssetSpec:
            if spec.partitions_def is None:
                return spec
            if spec.partitions_def not in moves:
                raise ValueError(f"{spec.key.to_user_string()} is not on the project's partitions")
            return spec.replace_attributes(partitions_def=moves[spec.partitions_def]).merge_attributes(
                metadata={"partitions_timezone": self.timezone, "partitions_start": self.start}
            )

        return asset.map_asset_specs(moved) if isinstance(asset, dg.AssetsDefinition) else moved(asset)


def deployment_partitions() -> Partitions:
    """The partitions the Definitions are built with in this environment (for tools outside Dagster)."""
    return Partitions.of_settings(load_settings())


DEFAULT_PARTITIONS = Partitions()
