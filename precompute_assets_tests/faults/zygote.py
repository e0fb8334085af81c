"""A warm parent that forks one child per program to run, for ``killing.run_killed``: it imports the modules named in
its argv once (no connection opened, no thread started), then forks a child for each request it reads, so a child
starts with those imports done instead of importing them again in a fresh interpreter.

Run as ``python -c <this source> MODULE...``. The protocol is one JSON object a line: stdin brings requests
(``code``, ``args``, ``env``, ``cwd``, ``stdout``, ``stderr``: file paths), stdout answers ``{"ready": threads}`` once,
then ``{"pid": ...}`` and ``{"status": ...}`` (``os.waitstatus_to_exitcode``: -9 for SIGKILL) for each request.
A child closes both pipes, takes the request's files as its stdout and stderr, its environment, working folder and
argv, and runs the code as ``__main__`` at the top level of this script: it exits as ``python -c`` would, running
``atexit`` and waiting for its threads unless it is killed.
"""

import importlib
import json
import os
import sys
import threading
import types


def serve(control_in, control_out) -> dict:
    """Fork a child for each request until stdin ends; returns (in the child only) the request it is to run."""
    for line in control_in:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            control_in.close()
            control_out.close()
            return request
        control_out.write(json.dumps({"pid": pid}) + "\n")
        control_out.flush()
        _, status = os.waitpid(pid, 0)
        control_out.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
        control_out.flush()
    sys.exit(0)


def become(request: dict) -> types.ModuleType:
    """Give this child the request's output files, environment, folder and argv; a fresh ``__main__`` to run in."""
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = ["-c", *request["args"]]
    if "numpy" in sys.modules:  # the zygote's global random state would otherwise be every child's
        sys.modules["numpy"].random.seed()
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    return main


def start() -> dict:
    """Keep the pipes apart from fds 0-2 (a child's program must not write on them), import, say ready, serve."""
    control_in = os.fdopen(os.dup(0), "r")
    control_out = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    for module in sys.argv[1:]:
        importlib.import_module(module)
    control_out.write(json.dumps({"ready": threading.active_count()}) + "\n")
    control_out.flush()
    if threading.active_count() != 1:  # a fork copies only the calling thread: the others' locks could stay held
        sys.exit(1)
    return serve(control_in, control_out)


if __name__ == "__main__":  # run by ``python -c``: never on import
    _request = start()
    _main = become(_request)
    exec(compile(_request["code"], "<string>", "exec"), _main.__dict__)
