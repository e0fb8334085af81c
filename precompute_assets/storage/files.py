"""Input files given by users: the one check every loader runs before it reads; and the lock file of loads that
must take turns."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def exclusive_lock(path: str | Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing), waiting for it (``on_wait`` is called first when
    another holder has it); the kernel releases it when its process ends, also when it is killed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield
