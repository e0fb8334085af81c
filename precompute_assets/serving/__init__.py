"""The contract with online services: key schema, codecs, read-through client and query logging.

Imports redis, numpy and the standard library only, so services can depend on it without Dagster.
"""

from .cache import PredictionCache
from .connection import connect
from .events import ACTIONS, EventLogger
from .keys import SCHEMA_VERSION, Experiment, KeySchema, Pointer, arm_of
from .publish import PublishResult, publish_version
from .querylog import QueryLogger, log_prediction_query, query_logger

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
