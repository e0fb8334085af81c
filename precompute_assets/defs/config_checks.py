"""Checks of a run's config before it reads anything: a bad value fails the step at once, in one line naming the field,
without retries and without recording a materialization (which would replace the day's good one)."""

import math

import dagster as dg


def at_least(config: dg.Config, least: int, *names: str) -> str | None:
    """Why the first of the fields ``names`` of ``config`` below ``least`` is refused, or None."""
    for name in names:
        if (value := getattr(config, name)) < least:
            return f"{name} must be at least {least}, got {value}"
    return None


def at_most(config: dg.Config, most: int, *names: str) -> str | None:
    """Why the first of the fields ``names`` of ``config`` above ``most`` is refused, or None."""
    for name in names:
        if (value := getattr(config, name)) > most:
            return f"{name} must be at most {most:,}, got {value:,}"
    return None


def positive(config: dg.Config, *names: str) -> str | None:
    """Why the first of the fields ``names`` that is not a finite number above 0 is refused, or None."""
    for name in names:
        if not (math.isfinite(value := getattr(config, name)) and value > 0):
            return f"{name} must be a number above 0, got {value}"
    return None


def fraction(config: dg.Config, name: str) -> str | None:
    """Why the field ``name``, a share strictly between 0 and 1, is refused, or None."""
    if not 0 < (value := getattr(config, name)) < 1:
        return f"{name} must be above 0 and below 1, got {value}"
    return None


def refuse(asset: str, *problems: str | None) -> None:
    """Fail the step of ``asset`` with the first of ``problems`` (each a check above, or None), at once."""
    if problem := next((problem for problem in problems if problem is not None), None):
        raise dg.Failure(description=f"{asset} config: {problem}", allow_retries=False)
