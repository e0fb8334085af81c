"""The contract with online services: key schema, codecs, read-through client and query logging.

Imports redis, numpy and the standard library only, so services can depend on it without Dagster.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cache import PredictionCache
    from .connection import connect
    from .events import ACTIONS, EventLogger
    from .keys import SCHEMA_VERSION, Experiment, KeySchema, Pointer, arm_of
    from .publish import PublishResult, publish_version
    from .querylog import QueryLogger, log_prediction_query, query_logger

# Each public name's module, imported on first use: every `precompute` command imports `serving.connection` (through
# `stack`), and importing all of them with numpy was half of `precompute --help`'s start.
_MODULES = {
    "PredictionCache": "cache",
    "connect": "connection",
    "ACTIONS": "events",
    "EventLogger": "events",
    "SCHEMA_VERSION": "keys",
    "Experiment": "keys",
    "KeySchema": "keys",
    "Pointer": "keys",
    "arm_of": "keys",
    "PublishResult": "publish",
    "publish_version": "publish",
    "QueryLogger": "querylog",
    "log_prediction_query": "querylog",
    "query_logger": "querylog",
}


def __getattr__(name: str) -> object:
    if name in _MODULES:
        value = getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # A submodule, as the README names them (``serving.invalidate.invalidate``): the eager imports made
        # ``invalidate``, ``publish``, ``querylog``... attributes of the package, and code used them so.
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    """The public names too, before their first use (``dir()``, completion in a REPL or notebook)."""
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "ACTIONS",
    "SCHEMA_VERSION",
    "EventLogger",
    "Experiment",
    "KeySchema",
    "Pointer",
    "PredictionCache",
    "PublishResult",
    "QueryLogger",
    "arm_of",
    "connect",
    "log_prediction_query",
    "publish_version",
    "query_logger",
]
