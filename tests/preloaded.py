"""`python -m MODULE ARGS` without paying for the imports each time.

A command of lmlab spends its first 4.5 s importing torch, Lightning and torchmetrics (which
imports scipy and transformers): most of a short run. The tests start a few hundred commands,
so each test worker keeps one server process that has done those imports, and runs each
command in a child forked from it: a fresh process as far as the command can tell (its own
working folder, environment, `sys.argv`, `__main__`, output files and process group), with
the imports already in memory.

The server starts with the test session's environment. A command may add variables that
nothing reads at import, and two that the child applies again: `OMP_NUM_THREADS` (torch's
threads) and `PYTHONPATH` (`sys.path`). Modules read some variables once, at import
(Lightning its rank), so a command that sets those needs a fresh interpreter.

Protocol, one JSON line each way: a request `{"module", "args", "cwd", "env", "stdout",
"stderr"}` gets `{"pid": N}` once the child runs and `{"status": S}` when it has ended (S as
`subprocess` gives it: the exit code, or minus the signal that ended it).
"""

from __future__ import annotations

import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def serve() -> None:
    """Reads requests from stdin until it closes; one child at a time."""
    import lightning.pytorch  # noqa: F401 - what takes the time
    import lmlab.run  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request)  # ends the child's interpreter; never returns
        answer({"pid": pid})
        _, status = os.waitpid(pid, 0)
        answer({"status": os.waitstatus_to_exitcode(status)})


def answer(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def run_child(request: dict) -> None:
    """As `python -m MODULE ARGS` would run, in the request's folder and environment; the
    interpreter then exits as such a process exits (atexit handlers included)."""
    os.setsid()  # a group of its own, which a timeout kills whole
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    redirect(0, os.devnull, os.O_RDONLY)
    for fd, name in ((1, "stdout"), (2, "stderr")):  # appended: both may be one file
        redirect(fd, request[name], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    if "OMP_NUM_THREADS" in request["env"]:  # read by torch at import
        import torch

        torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
    sys.argv = [request["module"], *request["args"]]
    # `python -m` puts the working folder first, then PYTHONPATH's folders
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:1] = [request["cwd"], *extra]
    sys.modules.pop(request["module"], None)  # run afresh as __main__, as `-m` runs it
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - printed and exit 1, as the interpreter does
        import traceback

        traceback.print_exc()
        sys.exit(1)
    sys.exit(0)


def redirect(fd: int, path: str, flags: int) -> None:
    opened = os.open(path, flags, 0o644)
    os.dup2(opened, fd)
    os.close(opened)


class Preloaded:
    """The client: a server started on first use, killed with the test session."""

    def __init__(self, env: dict):
        self.server = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, env=env, bufsize=0)

    def run(self, module: str, args: list[str], cwd: Path, env: dict, timeout: float,
            combined: bool = False) -> subprocess.CompletedProcess:
        """Like `subprocess.run(capture_output=True, text=True, timeout=timeout)`; with
        `combined`, stderr goes into stdout, as `stderr=subprocess.STDOUT` sends it."""
        command = [sys.executable, "-m", module, *args]
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "stdout"
            err = out if combined else Path(folder) / "stderr"
            request = {"module": module, "args": list(args), "cwd": str(cwd), "env": env,
                       "stdout": str(out), "stderr": str(err)}
            self.server.stdin.write((json.dumps(request) + "\n").encode())
            pid = self.receive(None)["pid"]
            deadline = time.monotonic() + timeout
            message = self.receive(deadline)
            if message is None:  # past its time: the whole group goes, as a hung run would
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended just now, and its status is on its way
                    pass
                self.receive(None)
                raise subprocess.TimeoutExpired(command, timeout, out.read_text(),
                                                err.read_text())
            return subprocess.CompletedProcess(command, message["status"], out.read_text(),
                                               err.read_text())

    def receive(self, deadline: float | None) -> dict | None:
        """The server's next message; None if the deadline passes first."""
        line = b""
        while not line.endswith(b"\n"):
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.server.stdout], [], [], wait)[0]:
                return None
            byte = self.server.stdout.read(1)
            if not byte:
                raise RuntimeError("the preloaded interpreter ended")
            line += byte
        return json.loads(line)

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=30)


if __name__ == "__main__":
    serve()
