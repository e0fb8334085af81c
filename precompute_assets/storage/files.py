"""Input files given by users: the one check every loader runs before it reads."""

from __future__ import annotations

from pathlib import Path


def unreadable_reason(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a file (missing, a folder, no permission), or None when it can."""
    path = Path(path)
    if not path.exists():
        return "no such file"
    if not path.is_file():
        return "not a file"
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        return f"cannot read ({error.strerror})"
    return None
