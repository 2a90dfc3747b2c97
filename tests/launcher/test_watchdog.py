"""The launcher's watchdog: an anchor process dying stops the run; a plant dying does not."""

from __future__ import annotations

import subprocess
import sys
import time

from launcher.federation import _Watchdog
from launcher.processes import ProcessGroup


def _runner() -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], text=True)


def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_a_dead_plant_is_reported_once_and_the_run_goes_on(tmp_path):
    procs, said = ProcessGroup(tmp_path / "logs"), []
    procs.start("supernode-plant-3", [sys.executable, "-c", "raise SystemExit(9)"], {})
    runner = _runner()
    watchdog = _Watchdog(procs, runner, said.append)
    watchdog.start()
    try:
        _until(lambda: said)
        time.sleep(1.2)  # a few more checks: still reported only once
        assert len(said) == 1 and "supernode-plant-3 exited with code 9" in said[0] and "goes on without it" in said[0]
        assert runner.poll() is None and watchdog.error is None
    finally:
        watchdog.stop()
        runner.kill()
        runner.wait()
        procs.stop_all()


def test_a_dead_superlink_stops_the_run_with_one_line(tmp_path):
    procs = ProcessGroup(tmp_path / "logs")
    procs.start("superlink", [sys.executable, "-c", "raise SystemExit(2)"], {})
    runner = _runner()
    watchdog = _Watchdog(procs, runner, print)
    watchdog.start()
    try:
        _until(lambda: runner.poll() is not None)
        assert runner.poll() is not None
        assert watchdog.error is not None and "superlink exited with code 2" in str(watchdog.error)
    finally:
        watchdog.stop()
        runner.kill()
        runner.wait()
        procs.stop_all()
