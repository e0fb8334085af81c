"""Starting child processes that ignore Ctrl-C: the command's main process stops them and says so once."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def interrupts_ignored() -> Iterator[None]:
    """SIGINT ignored while the block starts processes: a spawned interpreter inherits the ignored signal through
    ``exec``, from its first instruction on. A terminal's Ctrl-C reaches every process of the command, and each worker
    printed its own KeyboardInterrupt traceback (most while still importing) under the command's one line. Only the
    main thread may set a handler: elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
