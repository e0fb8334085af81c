"""SIGKILL a subprocess at a deterministic point: before (or after) the N-th call of any of a set of hooked functions.

``run_killed(code, hooks, at)`` runs ``code`` (Python source, argv in ``sys.argv``) in a fresh interpreter whose
hooked functions (``"module:attribute.path"``) count their calls together; the call numbered ``at`` SIGKILLs the
process before it runs, as a power cut or the kernel's OOM killer would: no ``finally``, no ``atexit``. With ``at``
None nothing is killed and the result says how many hooked calls the whole run made, so a test can kill at every
one of them in turn.

Hooking ``redis.connection.AbstractConnection.send_packed_command`` kills before any one round trip to Redis (a
pipeline, a MULTI/EXEC, a single command) leaves the process, which covers every state Redis can be left in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REDIS_SEND = "redis.connection:AbstractConnection.send_packed_command"

PRELUDE = """
import importlib, os, signal, sys, threading

def _install():
    at = os.environ.get("PRECOMPUTE_TEST_KILL_AT")
    at = int(at) if at else None
    after = os.environ.get("PRECOMPUTE_TEST_KILL_AFTER") == "1"
    tally = os.environ["PRECOMPUTE_TEST_KILL_TALLY"]
    lock = threading.Lock()
    calls = [0]

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
    """Run ``code`` with ``args`` in a fresh interpreter, SIGKILLed before the hooked call number ``at`` (None: never),
    or right after it returns with ``after``; ``env`` is added to this process's environment."""
    with tempfile.TemporaryDirectory(prefix="kill-") as folder:
        tally = Path(folder) / "calls"
        environment = {
            **os.environ,
            **(env or {}),
            "PRECOMPUTE_TEST_KILL_HOOKS": ",".join(hooks),
            "PRECOMPUTE_TEST_KILL_AT": "" if at is None else str(at),
            "PRECOMPUTE_TEST_KILL_AFTER": "1" if after else "",
            "PRECOMPUTE_TEST_KILL_TALLY": str(tally),
        }
        done = subprocess.run([sys.executable, "-c", PRELUDE + code, *args], env=environment, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip
        calls = int(tally.read_text() or 0) if tally.exists() else 0
    killed = done.returncode == -signal.SIGKILL
    if not killed and done.returncode != 0:
        raise AssertionError(f"the run failed ({done.returncode}) instead of being killed:\n{done.stderr[-3000:]}")
    return Outcome(killed, calls, done.returncode, done.stdout, done.stderr)
