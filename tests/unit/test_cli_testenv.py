"""``python -m spin_k8s.testing down``: each environment is stopped by its own directory, and ``down``
returns only once it has stopped. Stand-in environments: processes that take their time to shut down on
SIGTERM, as the real one does (~35 s) while it stops its servers."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spin_k8s.testing import __main__ as testenv

# Writes its pid where `up` would, then on SIGTERM takes a second to stop and removes it, as `up` does.
STAND_IN = """
import os, pathlib, signal, sys, time
pidfile = pathlib.Path(sys.argv[1]) / "testenv.pid"
def stop(*_):
    time.sleep(1)
    pidfile.unlink()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
pidfile.write_text(str(os.getpid()))
while True:
    time.sleep(0.1)
"""


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The stand-ins a test started: none outlives it, whatever it asserted."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()


def stand_in(root: Path, started: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    root.mkdir()
    # "spin_k8s.testing" on its command line: `down` checks that a pid is an environment's, not a reused one.
    proc = subprocess.Popen([sys.executable, "-c", STAND_IN, str(root), "spin_k8s.testing"])
    started.append(proc)
    threading.Thread(target=proc.wait, daemon=True).start()  # reaped as soon as it exits, as a shell would
    deadline = time.monotonic() + 30
    while testenv.running_pid(root) != proc.pid:
        assert time.monotonic() < deadline and proc.poll() is None, "the stand-in never started"
        time.sleep(0.05)
    return proc


def test_down_stops_the_environment_of_its_directory_and_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str],
                                                                started: list[subprocess.Popen[bytes]]) -> None:
    first, second = stand_in(tmp_path / "first", started), stand_in(tmp_path / "second", started)
    began = time.monotonic()
    assert testenv.main(["down", "--dir", str(tmp_path / "second")]) == 0
    # Returned once it had stopped: its pidfile (removed last thing before exit) is gone, after its 1 s shutdown.
    # (poll() is no witness: the reaper thread may hold the Popen lock while waiting, and poll() says None.)
    assert time.monotonic() - began >= 1 and not (tmp_path / "second" / testenv.PIDFILE).exists()
    assert second.wait(5) == 0
    assert first.poll() is None  # the other environment runs on
    assert capsys.readouterr().out.splitlines()[-1] == "stopped"
    assert testenv.main(["down", "--dir", str(tmp_path / "second")]) == 1  # nothing runs there any more
    # Without --dir: the one environment running in a temporary directory.
    monkeypatch.setattr(testenv, "TEMP_PREFIX", "fir")
    monkeypatch.setattr(testenv.tempfile, "gettempdir", lambda: str(tmp_path))
    assert testenv.main(["down"]) == 0 and not (tmp_path / "first" / testenv.PIDFILE).exists()
    assert first.wait(5) == 0
    assert testenv.main(["down"]) == 1
    assert "no test environment is running" in capsys.readouterr().err


def test_a_stale_pidfile_is_not_an_environment(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    (tmp_path / testenv.PIDFILE).write_text(done.stdout)  # a pid that exited (maybe reused by then)
    assert testenv.running_pid(tmp_path) is None
