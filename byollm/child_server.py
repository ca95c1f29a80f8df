"""An HTTP server in a child process: start it, wait until it answers, stop it.

A client that must meet a server the way production clients do (over HTTP, in another process) runs it through
`child_server`: the safety report's red team (`byollm serve` with guardrails off, then on), the capstone's
served check, and the serving benchmarks (byollm's server and llama.cpp's). Depends on nothing else in byollm
but `errors`: it never imports the server it starts.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from byollm.errors import ByollmError


class ServerStartError(ByollmError):
    """The child server exited, or did not answer, before it was ready."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (the OS picks it; the small race until the server binds
    it is harmless: that server fails to start and `child_server` says so)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    """Whether a GET of `url` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@contextlib.contextmanager
def child_server(cmd: Sequence[str], ready_url: str, log_file: str | Path, *, env: Mapping[str, str] | None = None,
                 cwd: str | Path | None = None, timeout: float = 180.0, stop: int = signal.SIGTERM,
                 poll_s: float = 0.5, name: str | None = None) -> Iterator[subprocess.Popen]:
    """Run `cmd` (an HTTP server) in a child process until `ready_url` answers 200, then yield the process; on the
    way out send it `stop` (SIGTERM or SIGINT: uvicorn shuts down gracefully on both) and kill it if it is still
    running 30 s later. Its stdout and stderr go to `log_file`. `env`: the child's whole environment (default:
    this process's). A child that exits first, or does not answer within `timeout` s, raises ServerStartError
    naming it (`name`, default the command's first words) and its log."""
    name = name or " ".join(cmd[:4]) + (" ..." if len(cmd) > 4 else "")
    with open(log_file, "w") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env=None if env is None else dict(env))
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise ServerStartError(f"{name} exited with {proc.returncode} before answering; see {log_file}")
                if answers(ready_url):
                    break
                if time.monotonic() > deadline:
                    raise ServerStartError(f"{name} did not answer {ready_url} within {timeout:.0f} s; "
                                           f"see {log_file}")
                time.sleep(poll_s)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(stop)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


__all__ = ["ServerStartError", "answers", "child_server", "free_port"]
