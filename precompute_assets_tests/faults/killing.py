"""SIGKILL a subprocess at a deterministic point: before (or after) the N-th call of any of a set of hooked functions.

``run_killed(code, hooks, at)`` runs ``code`` (Python source, argv in ``sys.argv``) in a process of its own whose
hooked functions (``"module:attribute.path"``) count their calls together; the call numbered ``at`` SIGKILLs the
process before it runs, as a power cut or the kernel's OOM killer would: no ``finally``, no ``atexit``. With ``at``
None nothing is killed and the result says how many hooked calls the whole run made, and what kind of step each one
was (``Outcome.kinds``), so a test can kill at every one of them in turn, or at ``boundaries(kinds)``: the first and
the last call of each run of consecutive calls of one kind, which still kills before every distinct kind of step and
on each side of every change from one kind to the next, at a fraction of the cost.

Hooking ``redis.connection.AbstractConnection.send_packed_command`` kills before any one round trip to Redis (a
pipeline, a MULTI/EXEC, a single command) leaves the process, which covers every state Redis can be left in. The kind
of such a call is its distinct command names in order (``MULTI HSET EXPIRE EXEC``), a script named by its SHA1; the
kind of any other hooked call is its hooked path.

That process is forked from a warm parent (``zygote.py``, one per test process, started at the first run) that has
imported ``PRELOAD`` and nothing else: a fresh interpreter spent most of each run importing them again (~1.2 s of
~990 modules). The child applies the hooks only after the fork, so each run counts its calls as a fresh one did; the
modules preloaded reach every hooked function through a module or a class attribute, which the hooks replace.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import redis

REDIS_SEND = "redis.connection:AbstractConnection.send_packed_command"
# What the killed programs of the fault tests import: they run without importing it again (others still import).
PRELOAD = (
    "precompute_assets.ml.embedder",
    "precompute_assets.serving",
    "precompute_assets.serving.admission",
    "precompute_assets.storage.documents",
    "precompute_assets.storage.embeddings",
    "precompute_assets.storage.lake",
    "precompute_assets.sync.embeddings",
    "precompute_assets.tools.cli",
    "pyarrow.parquet",
    "torch",  # the embedder imports it at its first batch: ~1.4 s of each sync run
)

PRELUDE = """
import hashlib, importlib, os, signal, sys, threading

def _install():
    at = os.environ.get("PRECOMPUTE_TEST_KILL_AT")
    at = int(at) if at else None
    after = os.environ.get("PRECOMPUTE_TEST_KILL_AFTER") == "1"
    tally = os.environ["PRECOMPUTE_TEST_KILL_TALLY"]
    kinds = os.environ["PRECOMPUTE_TEST_KILL_KINDS"] if at is None else None  # only a run nothing kills records them
    lock = threading.Lock()
    calls = [0]

    def redis_kind(packed):
        # The RESP arrays of one send (a pipeline packs many): each command's name, a script's SHA1 besides.
        data = packed if isinstance(packed, (bytes, str)) else b"".join(packed)
        data = data.encode() if isinstance(data, str) else data
        names, position = [], 0
        while position < len(data):
            end = data.index(b"\\r\\n", position)
            count, position = int(data[position + 1 : end]), end + 2
            words = []
            for _ in range(count):
                end = data.index(b"\\r\\n", position)
                size = int(data[position + 1 : end])
                words.append(data[end + 2 : end + 2 + min(size, 64)])
                position = end + 2 + size + 2
            name = words[0].decode().upper()
            if name in ("EVALSHA", "EVALSHA_RO") and len(words) > 1:
                name += "/" + words[1].decode()[:12]
            elif name in ("EVAL", "EVAL_RO", "SCRIPT") and len(words) > 1:
                name += "/" + hashlib.sha1(words[1]).hexdigest()[:12]
            names.append(name)
        return " ".join(dict.fromkeys(names))

    def kind_of(path, args):
        if path.endswith(":AbstractConnection.send_packed_command") and len(args) > 1:
            return redis_kind(args[1])
        return path

    def hook(path):
        module, _, attribute = path.partition(":")
        owner = importlib.import_module(module)
        *parents, name = attribute.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            with lock:
                calls[0] += 1
                number = calls[0]
                with open(tally, "w") as out:
                    out.write(str(number))
                if kinds:
                    with open(kinds, "a") as out:
                        out.write(kind_of(path, args) + "\\n")
            if number == at and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            if number == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(owner, name, counted)

    for path in filter(None, os.environ["PRECOMPUTE_TEST_KILL_HOOKS"].split(",")):
        hook(path)

_install()
del _install
"""


@dataclass(frozen=True)
class Outcome:
    killed: bool  # the process died of SIGKILL at the hooked call ``at``
    calls: int  # hooked calls made (the one it died at included)
    returncode: int
    stdout: str
    stderr: str
    kinds: tuple[str, ...] = ()  # the kind of step of each hooked call, in order (recorded only when ``at`` is None)


def boundaries(kinds: tuple[str, ...] | list[str]) -> list[int]:
    """The call numbers (from 1) that begin or end a run of consecutive calls of one kind: every distinct kind of step,
    and each side of every change of kind, without the calls in the middle of a run that only repeat its step."""
    return [
        number
        for number, kind in enumerate(kinds, start=1)
        if number == 1 or number == len(kinds) or kinds[number - 2] != kind or kinds[number] != kind
    ]


def snapshot(client: redis.Redis) -> list[tuple[bytes, int, bytes]]:
    """Every key of a private server: name, remaining TTL in ms (0: none), DUMP payload. A test that starts every kill
    point from the same state makes it once and ``restore``s it before each point instead of building it again."""
    names = list(client.scan_iter(count=10_000))
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.pttl(name)
        pipe.dump(name)
    meta = pipe.execute()
    return [(name, max(ttl, 0), payload) for name, ttl, payload in zip(names, meta[::2], meta[1::2], strict=True)]


def restore(client: redis.Redis, keys: list[tuple[bytes, int, bytes]]) -> None:
    """Empty the server and put back what ``snapshot`` took, with the TTLs it had."""
    client.flushall()
    pipe = client.pipeline(transaction=False)
    for name, ttl, payload in keys:
        pipe.restore(name, ttl, payload)
    pipe.execute()


class Zygote:
    """The warm parent process: ``run`` forks a child of it for one program and returns how the child ended."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD) -> None:
        source = (Path(__file__).with_name("zygote.py")).read_text()
        self.process = subprocess.Popen([sys.executable, "-c", source, *preload], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE)  # fmt: skip
        self.pending = b""  # what the zygote wrote past the last line read (its stdout is read with os.read only)
        ready = self._reply(timeout=300)
        if ready.get("ready") != 1:
            self.close()
            raise RuntimeError(f"the zygote has {ready.get('ready')} threads after its imports: forking it is unsafe")

    def _reply(self, timeout: float) -> dict:
        """The zygote's next line, read from its pipe directly (a buffered reader could hold it where select cannot
        see it); TimeoutExpired if none comes within ``timeout`` seconds."""
        while b"\n" not in self.pending:
            if not select.select([self.process.stdout], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired("zygote", timeout)
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the zygote ended ({self.process.wait()})")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return json.loads(line)

    def run(self, code: str, args: list[str], env: dict[str, str], folder: Path, timeout: float) -> tuple[int, int]:
        """Fork a child that runs ``code`` with ``args`` and exactly ``env``, its stdout and stderr in ``folder``;
        returns its pid and exit code (negative: the signal that ended it), or kills it after ``timeout`` seconds."""
        request = {"code": code, "args": args, "env": env, "cwd": os.getcwd(),
                   "stdout": str(folder / "stdout"), "stderr": str(folder / "stderr")}  # fmt: skip
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        pid = self._reply(timeout=60)["pid"]
        try:
            return pid, self._reply(timeout=timeout)["status"]
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            self._reply(timeout=60)
            raise subprocess.TimeoutExpired(["python", "-c", "...", *args], timeout) from None

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        """End the zygote: it exits when its stdin does."""
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.process.stdout.close()


_zygotes: list[Zygote] = []


def zygote() -> Zygote:
    """This test process's zygote, started at the first call (again if it ended), closed when the process exits."""
    if not _zygotes or not _zygotes[0].alive():
        _zygotes[:] = [Zygote()]
        atexit.register(_zygotes[0].close)
    return _zygotes[0]


def run_killed(
    code: str,
    args: list[str],
    hooks: list[str],
    at: int | None,
    *,
    after: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> Outcome:
    """Run ``code`` with ``args`` in a process of its own, SIGKILLed before the hooked call number ``at`` (None:
    never), or right after it returns with ``after``; ``env`` is added to this process's environment."""
    with tempfile.TemporaryDirectory(prefix="kill-") as folder:
        tally, kinds = Path(folder) / "calls", Path(folder) / "kinds"
        environment = {
            **os.environ,
            **(env or {}),
            "PRECOMPUTE_TEST_KILL_HOOKS": ",".join(hooks),
            "PRECOMPUTE_TEST_KILL_AT": "" if at is None else str(at),
            "PRECOMPUTE_TEST_KILL_AFTER": "1" if after else "",
            "PRECOMPUTE_TEST_KILL_TALLY": str(tally),
            "PRECOMPUTE_TEST_KILL_KINDS": str(kinds),
        }
        _, returncode = zygote().run(PRELUDE + code, args, environment, Path(folder), timeout)
        calls = int(tally.read_text() or 0) if tally.exists() else 0
        steps = tuple(kinds.read_text().splitlines()) if kinds.exists() else ()
        stdout, stderr = (Path(folder) / "stdout").read_text(), (Path(folder) / "stderr").read_text()
    killed = returncode == -signal.SIGKILL
    if not killed and returncode != 0:
        raise AssertionError(f"the run failed ({returncode}) instead of being killed:\n{stderr[-3000:]}")
    return Outcome(killed, calls, returncode, stdout, stderr, steps)
