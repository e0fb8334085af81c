"""The figure each fault test measures: printed as one ``FAULT-FIGURE {json}`` line (``pytest -s`` shows it) and
recorded as the test's ``fault_figure`` property (in the JUnit XML), so the README's table can be checked against
a run."""

from __future__ import annotations

import json
from typing import Any


def record(record_property, fault: str, **figure: Any) -> dict[str, Any]:
    row = {"fault": fault, **figure}
    line = json.dumps(row, sort_keys=True, default=str)
    print(f"FAULT-FIGURE {line}")
    record_property("fault_figure", line)
    return row
