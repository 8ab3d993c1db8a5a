"""gpool's commands in processes forked from a warm interpreter.

A fresh `python -m gpool.train` spends about 6 s of CPU importing torch, MLflow, Hydra and
torchvision before it reads its first override; the suite starts a few hundred of them. A
warm interpreter per test worker imports them once and forks a process per command, which
then runs as `python -m MODULE args` (or `python -c CODE args`) does: its own pid, session,
working folder, environment, standard streams and exit status, signals delivered to it, the
module run as `__main__` with `sys.argv` as Python sets it, and its end as the
interpreter's (run_and_exit). What a fork does not redo is the interpreter's start-up, the
imports and the teardown of every module at exit: tests/test_hardening.py's `--help` test
and the tests that pass interpreter flags start fresh interpreters.

Run as a script, this file is the warm interpreter: `python warm.py SOCKET` serves requests
on a Unix socket until its standard input closes (the test worker that started it ended).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import io
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

#: Every test process's torch threads: one, so that two xdist workers share two cores.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
#: What gpool's commands import once they run (their entry modules import Hydra alone):
#: imported once, in the warm interpreter.
PRELOAD = (
    "gpool.train",
    "gpool.training",
    "gpool.fusing",
    "gpool.decide",
    "gpool.search",
    "gpool.compare.cli",
    "gpool.compare.publish",
    "gpool.bench.cli",
)


# --- the warm interpreter ---------------------------------------------------------------


def serve(path: str) -> tuple[dict[str, Any], list[int]]:
    """Fork a process per request; report each one's pid, then its exit status, on the
    request's connection. Returns, in a forked process only, its request and streams."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    waiting: dict[int, socket.socket] = {}
    selector = selectors.DefaultSelector()
    for source in (listener, wake_r, sys.stdin):
        selector.register(source, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.fileobj is sys.stdin and not sys.stdin.buffer.read1(1):
                sys.exit(0)  # the test worker is gone
            if key.fileobj is wake_r:
                os.read(wake_r, 4096)
                reap(waiting)
            if key.fileobj is listener:
                conn, _ = listener.accept()
                request, fds = receive(conn)
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    for held in (listener, conn, *waiting.values()):
                        held.close()
                    os.close(wake_r), os.close(wake_w)
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    return request, fds
                for fd in fds:
                    os.close(fd)
                conn.sendall(f"{pid}\n".encode())
                waiting[pid] = conn
                reap(waiting)


def receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """A request: its JSON (one line) and its stdin, stdout and stderr."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while not data.endswith(b"\n"):
        data += conn.recv(1 << 16)
    return json.loads(data), fds


def reap(waiting: dict[int, socket.socket]) -> None:
    """Tell each ended process's requester its exit status, as Popen.returncode has it."""
    while waiting:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid)
        conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        conn.close()


def become(request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """In the forked process: the session, folder, environment and streams asked for."""
    if request["new_session"]:
        os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds) - {0, 1, 2}:
        os.close(fd)
    return request


def run_command(request: dict[str, Any]) -> None:
    """`python -m MODULE args` or `python -c CODE args`, as the interpreter runs them."""
    import runpy

    option, target, *args = request["argv"]
    if option == "-m":
        sys.modules.pop(target, None)  # run afresh as __main__, as python -m does
        sys.path[0] = os.getcwd()
        sys.argv = ["-m", *args]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path[0] = ""
        sys.argv = ["-c", *args]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})


def run_and_exit(request: dict[str, Any]) -> NoReturn:
    """run_command, then end as the interpreter ends: SystemExit's code (a message: printed,
    status 1), an uncaught exception's traceback and status 1, KeyboardInterrupt as death
    by SIGINT; after threading's exit hooks (executors shut down) and its non-daemon
    threads, atexit's functions and a flush of stdout and stderr. Without tearing down
    every module of the warm interpreter as its exit would: 0.4 s a command, each page it
    touches copied from the server's."""
    interrupted = False
    try:
        run_command(request)
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        interrupted, status = isinstance(sys.exc_info()[1], KeyboardInterrupt), 1
    threading._shutdown()  # what the interpreter calls: executors' hooks, then threads joined
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status & 0xFF)


# --- the tests' side ---------------------------------------------------------------------


class Server:
    """This test worker's warm interpreter, started at its first command."""

    def __init__(self, env: dict[str, str]) -> None:
        self.folder = tempfile.mkdtemp(prefix="gpool-warm-")
        self.path = str(Path(self.folder) / "socket")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, self.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # One torch thread, as every test process has: forked commands keep the
            # server's count, whichever test's environment came first.
            env={**env, **ONE_THREAD},
            text=True,
        )
        line = self.proc.stdout.readline()
        assert line == "ready\n", f"the warm interpreter did not start: {line!r}"
        atexit.register(self.close)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        Path(self.path).unlink(missing_ok=True)
        os.rmdir(self.folder)


_server: Server | None = None


def server(env: dict[str, str]) -> Server:
    global _server
    if _server is None:
        _server = Server(env)
    return _server


class Forked:
    """A command forked from the warm interpreter, with the part of subprocess.Popen's
    interface the tests use (pid, stdout/stderr pipes, poll, wait, communicate, signals).
    stderr=subprocess.STDOUT merges the two streams, as Popen does."""

    def __init__(
        self,
        args: list[str],
        cwd: Path | str,
        env: dict[str, str],
        stderr: int = subprocess.PIPE,
        start_new_session: bool = False,
    ) -> None:
        self.args, self.returncode = args, None
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe() if stderr == subprocess.PIPE else (None, out_w)
        request = {
            "argv": args[1:],
            "cwd": str(cwd),
            "env": env,
            "new_session": start_new_session,
        }
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.connect(server(env).path)
        with open(os.devnull, "rb") as devnull:
            socket.send_fds(
                self.conn, [json.dumps(request).encode() + b"\n"], [devnull.fileno(), out_w, err_w]
            )
        for fd in {out_w, err_w}:
            os.close(fd)
        self.stdout = open(out_r)  # noqa: SIM115 - closed by communicate or with the object
        self.stderr = open(err_r) if err_r is not None else None  # noqa: SIM115
        self.status = io.BytesIO()
        self.pid = int(self._line(None))

    def _line(self, timeout: float | None) -> str | None:
        """The next line the warm interpreter sends about this process, or None when none
        came within `timeout` seconds."""
        self.conn.settimeout(timeout)
        while b"\n" not in self.status.getvalue():
            try:
                chunk = self.conn.recv(64)
            except (TimeoutError, BlockingIOError):
                return None
            assert chunk, "the warm interpreter ended"
            self.status.write(chunk)
        line, rest = self.status.getvalue().split(b"\n", 1)
        self.status = io.BytesIO()
        self.status.write(rest)
        return line.decode()

    def poll(self) -> int | None:
        if self.returncode is None and (line := self._line(0)) is not None:
            self.returncode = int(line)
            self.conn.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = int(line)
            self.conn.close()
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str | None]:
        """Everything left on stdout and stderr, once the process and whatever holds its
        pipes open have ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        streams = [s for s in (self.stdout, self.stderr) if s is not None]
        texts: dict[int, str] = {}

        def read(n: int) -> None:
            texts[n] = streams[n].read()

        readers = [threading.Thread(target=read, args=(n,), daemon=True) for n in range(2)]
        readers = readers[: len(streams)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(None if deadline is None else max(0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        for stream in streams:
            stream.close()
        self.wait(None if deadline is None else max(0, deadline - time.monotonic()))
        return texts[0], texts.get(1)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run(
    args: list[str], cwd: Path | str, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """subprocess.run(args, capture_output=True, text=True) for a forked command."""
    proc = Forked(args, cwd, env)
    try:
        out, err = proc.communicate(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def can_fork(args: list[str]) -> bool:
    """Whether args are `python -m MODULE ...` or `python -c CODE ...` with no other flag."""
    return len(args) >= 3 and args[0] == sys.executable and args[1] in ("-m", "-c")


def preload() -> None:
    """Import what every command imports, and what opening a sqlite store imports (MLflow's
    SQLAlchemy store, Alembic's migrations: a second a command)."""
    for module in PRELOAD:
        __import__(module)
    from gpool.store import open_store

    with tempfile.TemporaryDirectory() as folder:
        open_store(f"sqlite:///{folder}/warm.db", create=True)
        save_a_model(Path(folder) / "model")


def save_a_model(path: Path) -> None:
    """Save the default network as a run's end logs it (tracking.save_network): the first
    save in a process sets up 0.8 s of CPU of lazy state that later ones reuse."""
    import torch

    from gpool.config import compose_config
    from gpool.model import build_model
    from gpool.tracking import save_network

    save_network(build_model(compose_config()), torch.zeros(2, 1, 28, 28), path)


if __name__ == "__main__":
    preload()
    assert threading.active_count() == 1, "forking needs a warm interpreter of one thread"
    # Out of the collector's reach: a child's collections would walk every object of the
    # server's, copying each page they touch (2 s a command).
    gc.freeze()
    run_and_exit(become(*serve(sys.argv[1])))
