"""Input files given by users: the one check every loader runs before it reads, the raw text of a rejected record,
and the lock file of loads that must take turns."""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import gzip
import zlib
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import IO

MAX_RAW_CHARS = 16 << 20  # a rejected row's raw text is cut here (a CSV quote never closed takes in the whole rest)


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


def first_bytes(path: str | Path, size: int = 1 << 16) -> bytes:
    """The file's first ``size`` bytes, decompressed when it is ``.gz`` (none when it cannot be read: reading it fails
    later, naming why)."""
    path = Path(path)
    with contextlib.suppress(OSError, EOFError, zlib.error), open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.suffix.lower() == ".gz" else raw
        return stream.read(size)
    return b""


def _parquet(path: Path, start: bytes) -> bool:
    """Whether the file starting with ``start`` is Parquet (``has_parquet_magic``). The end of a ``.gz`` file's content
    is not at hand: there a NUL byte in ``start``, which text never holds, stands for the magic at the end."""
    from ..ml.parquet_trace import has_parquet_magic

    if path.suffix.lower() == ".gz":
        return start.startswith(b"PAR1") and b"\x00" in start
    return has_parquet_magic(path)


def not_text_reason(path: str | Path, start: bytes, *, reads: Collection[str] = (".gz", ".parquet")) -> str | None:
    """Why a file that should be text but starts with ``start`` (``first_bytes``) is not, and what to do: compressed
    data without its suffix, a zip archive (an Excel workbook), Parquet or UTF-16 text; None for anything else. Read as
    text, such a file was refused for missing columns, its "header" a line of binary garbage. ``reads``: the suffixes
    of ``.gz`` and ``.parquet`` the loader reads, which the advice may then name."""
    from ..ml.replay import compression_kind  # here: the CLI imports this module for every command

    path = Path(path)
    if (compressed := compression_kind(start)) is not None:
        codec, suffix, command = compressed
        if codec == "gzip" and ".gz" in reads and path.suffix.lower() != ".gz":
            return f"the file is gzip-compressed: name it {path.name}.gz"
        return f"the file is {codec}-compressed: decompress it first ({command} FILE)"
    if start.startswith(b"PK\x03\x04"):
        return "the file is a zip archive (an Excel workbook?), not text: export or extract the CSV from it"
    if _parquet(path, start):
        if path.suffix.lower() == ".gz":
            return "the file is gzip-compressed Parquet, not text: decompress it first (gzip -dc FILE)"
        advice = f"name it {path.with_suffix('.parquet').name}" if ".parquet" in reads else "write it as text"
        return f"the file is Parquet, not text: {advice}"
    if start.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Windows' "Unicode" text, PowerShell's export
        return "the file is UTF-16 text (it starts with UTF-16's byte order mark): convert it to UTF-8"
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


def cut_raw(raw: str) -> str:
    """``raw`` (a rejected record's text) cut to ``MAX_RAW_CHARS``, saying how much more there was."""
    if len(raw) <= MAX_RAW_CHARS:
        return raw
    return f"{raw[:MAX_RAW_CHARS]}... [cut: {len(raw) - MAX_RAW_CHARS} more characters]"


def visible_line(line: bytes) -> str:
    """A line of a file as read, its line break dropped: bytes that are not UTF-8 as ``\\xff``, NUL as ``\\x00``."""
    return cut_raw(line.rstrip(b"\r\n").decode("utf-8", "backslashreplace").replace("\x00", "\\x00"))


def tapped_lines(stream: IO[str], record: list[str | None]) -> Iterator[str]:
    """The lines of ``stream``, each also appended to ``record`` (which the reader clears before each record) up to
    about ``MAX_RAW_CHARS``; then a None says that the record's further lines were not kept."""
    held = 0
    for line in stream:
        if not record:
            held = 0
        if held < MAX_RAW_CHARS:
            record.append(line)
            held += len(line)
        elif record[-1] is not None:
            record.append(None)
        yield line


def record_text(record: list[str | None]) -> str:
    """The raw text of a CSV or TSV record (``tapped_lines``) as read, its final line break dropped
    (``visible_line``)."""
    text = visible_line("".join(line for line in record if line is not None).encode("utf-8", "surrogateescape"))
    return f"{text}... [cut: the record's further lines are not kept]" if record and record[-1] is None else text
