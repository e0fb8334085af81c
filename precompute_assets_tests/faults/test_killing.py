"""``run_killed`` itself: each run is a process of its own, forked from the warm zygote, and dies of SIGKILL at its
kill point as a fresh interpreter did (no ``finally``, no ``atexit``), with the hooks, argv and environment it asked
for, and nothing shared with the zygote but the imports."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from precompute_assets_tests.faults.killing import PRELOAD, Zygote, run_killed, zygote

REPORT = """
import json, os, sys
import numpy
fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))
print(json.dumps({"pid": os.getpid(), "parent": os.getppid(), "argv": sys.argv, "env": os.environ.get("KILL_TEST"),
                  "cwd": os.getcwd(), "fds": fds, "random": int(numpy.random.randint(1 << 30)),
                  "main": __name__, "loaded": [m for m in PRELOAD if m in sys.modules]}))
"""

MARKED = """
import atexit, sys
from pathlib import Path
atexit.register(lambda: Path(sys.argv[1], "atexit").write_text(""))
try:
    for step in range(3):
        Path(sys.argv[1], f"step{step}").touch()  # the hooked call
finally:
    Path(sys.argv[1], "finally").write_text("")
"""


def report(args: list[str] | None = None, env: dict[str, str] | None = None) -> dict:
    code = f"PRELOAD = {PRELOAD!r}\n{REPORT}"
    return json.loads(run_killed(code, args or [], [], None, env=env).stdout)


def test_each_run_is_a_child_of_the_warm_zygote_with_its_imports_done_and_its_own_argv_env_and_folder(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    first, second = report(["a", "b c"], {"KILL_TEST": "1"}), report([], {"KILL_TEST": "2"})
    assert first["loaded"] == list(PRELOAD)  # imported before the code ran: by the zygote
    assert first["parent"] == second["parent"] == zygote().process.pid != os.getpid()
    assert len({first["pid"], second["pid"], first["parent"], os.getpid()}) == 4
    assert first["argv"] == ["-c", "a", "b c"] and second["argv"] == ["-c"]
    assert (first["env"], second["env"]) == ("1", "2") and first["main"] == "__main__"
    assert first["cwd"] == str(tmp_path)
    assert first["fds"] == [0, 1, 2]  # no pipe or socket of the zygote's, nor of this process's
    assert first["random"] != second["random"]  # numpy's global state is not the zygote's, copied


def test_a_run_killed_at_a_hooked_call_dies_of_sigkill_without_finally_or_atexit(tmp_path):
    hook = "pathlib:Path.touch"
    clean = run_killed(MARKED, [str(tmp_path)], [hook], None)
    assert not clean.killed and clean.returncode == 0 and clean.calls == 3
    assert clean.kinds == (hook,) * 3
    assert {path.name for path in tmp_path.iterdir()} == {"step0", "step1", "step2", "finally", "atexit"}

    for after, left in ((False, {"step0"}), (True, {"step0", "step1"})):
        folder = tmp_path / f"after-{after}"
        folder.mkdir()
        killed = run_killed(MARKED, [str(folder)], [hook], 2, after=after)
        assert killed.killed and killed.returncode == -9 and killed.calls == 2 and killed.kinds == ()
        assert {path.name for path in folder.iterdir()} == left  # with after, the second call is made


def test_a_run_that_fails_raises_with_its_stderr():
    with pytest.raises(AssertionError, match=r"failed \(1\)(.|\n)*ValueError: no good"):
        run_killed("raise ValueError('no good')", [], [], None)
    with pytest.raises(AssertionError, match=r"failed \(3\)"):
        run_killed("import sys\nsys.exit(3)", [], [], None)
    assert run_killed("import sys\nprint('bye')\nsys.exit(0)", [], [], None).stdout == "bye\n"


def test_a_zygote_whose_imports_start_a_thread_refuses_to_fork(tmp_path: Path, monkeypatch):
    thread = "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()"
    (tmp_path / "threaded_module.py").write_text(f"import threading, time\n{thread}\n")
    monkeypatch.chdir(tmp_path)  # the zygote finds the module in its working folder, as ``python -c`` does
    with pytest.raises(RuntimeError, match="2 threads"):
        Zygote(("threaded_module",))


def test_the_embedders_lazy_torch_import_is_done_by_the_zygote():
    """The embedder imports torch at its first batch, not at import: each killed sync spent ~1.4 s importing it."""
    code = "import sys\nbefore = set(sys.modules)\nfrom precompute_assets.ml.embedder import _torch\n_torch()\n"
    code += "print(sorted(set(sys.modules) - before))"
    assert run_killed(code, [], [], None).stdout == "[]\n"
