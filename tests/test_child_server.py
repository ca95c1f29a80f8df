"""byollm.child_server against real child processes: Python's own http.server as the server that starts, a
`python -c` that exits at once as the one that does not, and one that never listens for the timeout."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import pytest

from byollm.child_server import ServerStartError, child_server, free_port
from byollm.errors import ByollmError
from byollm.token_ids import shared_prefix_length


def test_yields_once_the_server_answers_and_stops_it_after(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "server.log"
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    with child_server(cmd, f"http://127.0.0.1:{port}/", log, poll_s=0.1) as proc:
        assert proc.poll() is None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server.log", timeout=5) as r:
            assert r.status == 200
    assert proc.returncode is not None  # stopped (SIGTERM) on the way out
    assert "GET /" in log.read_text()  # its stderr went to the log


def test_a_server_that_exits_first_names_its_log(tmp_path: Path) -> None:
    log = tmp_path / "dies.log"
    cmd = [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"]
    with pytest.raises(ServerStartError, match=r"exited with 3 before answering; see .*dies\.log") as e:
        with child_server(cmd, f"http://127.0.0.1:{free_port()}/", log, poll_s=0.1, name="fake serve"):
            pytest.fail("yielded without a server")
    assert isinstance(e.value, ByollmError) and str(e.value).startswith("fake serve ")
    assert log.read_text() == "no model here\n"


def test_a_silent_server_times_out(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    url = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(ServerStartError, match=rf"did not answer {url} within 1 s"):
        with child_server(cmd, url, tmp_path / "silent.log", timeout=1, poll_s=0.1):
            pytest.fail("yielded without a server")


@pytest.mark.parametrize(("a", "b", "n"), [([1, 2, 3], [1, 2, 4], 2), ([1, 2], [1, 2, 3], 2), ([], [1], 0),
                                           ([5], [6], 0), ([7, 8], [7, 8], 2)])
def test_shared_prefix_length_by_hand(a: list[int], b: list[int], n: int) -> None:
    assert shared_prefix_length(a, b) == n == shared_prefix_length(b, a)
