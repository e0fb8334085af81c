"""Progress of the long CLI commands on stderr: a tqdm bar on a terminal; elsewhere (cron, CI, ``nohup``, a pipe) a
line every ``LOG_EVERY_S`` seconds while the work lasts, and one when it ends if any was said, so a log shows that a
replay of minutes is working (a bar, which redraws itself with carriage returns, printed nothing there: tqdm turned
itself off). Work shorter than that says nothing: a script reading a command's one-line error still finds only it."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

LOG_EVERY_S = 30.0


def progress(
    iterable: Iterable | None = None,
    *,
    desc: str,
    total: float | None = None,
    unit: str = "it",
    share: bool = False,
    stream: TextIO | None = None,
) -> Any:
    """A progress counter of ``desc``: ``update(n)``, ``n``, ``set_description_str``, ``close``, a context manager,
    and an iterator over ``iterable`` when given. ``share``: the total is 1.0 and the count a share of it (shown in
    %). ``stream`` defaults to stderr; a bar when it is a terminal, else ``LogProgress``."""
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm import tqdm

        shape = {"bar_format": "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"} if share else {}
        return tqdm(iterable, desc=desc, total=total, unit=unit, file=stream, leave=False, unit_scale=True, **shape)
    return LogProgress(iterable, desc=desc, total=total, unit=unit, share=share, stream=stream)


def heartbeat(desc: str, stream: TextIO | None = None) -> Any:
    """A context for work that counts nothing (a stage of Dagster runs): elsewhere than a terminal, ``LogProgress``'s
    line every ``LOG_EVERY_S`` while it lasts; on a terminal nothing, where the work's own output shows it going."""
    stream = stream or sys.stderr
    return contextlib.nullcontext() if stream.isatty() else LogProgress(desc=desc, stream=stream)


class LogProgress:
    """tqdm's counting part for a log: a thread says ``desc``, the count (of ``total``) and the time so far every
    ``LOG_EVERY_S``; ``close`` says how it ended, when anything was said before."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        desc: str,
        total: float | None = None,
        unit: str = "it",
        share: bool = False,
        stream: TextIO,
    ) -> None:
        self.iterable, self.desc, self.total, self.unit, self.share = iterable, desc, total, unit, share
        self.stream = stream
        self.n: float = 0
        self._started = time.monotonic()
        self._said = False
        self._over = threading.Event()
        self._every_s = LOG_EVERY_S
        self._thread = threading.Thread(target=self._heartbeat, name=f"progress of {desc}", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.n += 1
        except BaseException:
            self.close(ended="stopped")
            raise
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, failed: type | None, *exc: object) -> None:
        self.close(ended="done" if failed is None else "stopped")

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_description_str(self, desc: str) -> None:
        self.desc = desc

    def close(self, ended: str = "done") -> None:
        if self._over.is_set():
            return
        self._over.set()
        self._thread.join()
        if self._said:
            self._say(ended)

    def _heartbeat(self) -> None:
        while not self._over.wait(self._every_s):
            self._say()

    def _say(self, ended: str = "") -> None:
        self._said = True
        if self.share:
            count = f"{self.n:.0%} "
        elif self.total is None and not self.n:  # a stage that counts nothing yet: its name says enough
            count = ""
        else:
            count = f"{self.n:,.0f}" + (f" of {self.total:,.0f}" if self.total is not None else "") + f" {self.unit} "
        tail = f", {ended}" if ended else ""
        print(f"{self.desc}: {count}in {time.monotonic() - self._started:,.0f} s{tail}", file=self.stream, flush=True)
