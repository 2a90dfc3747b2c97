"""A plant's SuperNode that cannot reach the SuperLink ends, and the launcher says so in one line."""

import os
import sys
import time
from pathlib import Path

import pytest

from maxfl.errors import ProcessError
from launcher.processes import ProcessGroup, free_port


def test_supernode_that_cannot_reach_the_superlink_exits_and_is_reported(tmp_path):
    procs = ProcessGroup(tmp_path / "logs")
    exe = Path(sys.executable).parent / "maxfl-supernode"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "PATH": f"{exe.parent}{os.pathsep}{os.environ['PATH']}"}
    node = procs.start(
        "supernode-plant-1",
        [str(exe), "--insecure", "--superlink", f"127.0.0.1:{free_port()}", "--port", str(free_port()),
         "--node-config", 'plant-id="plant-1" data-dir="/nowhere"', "--max-wait-time", "2", "--isolation", "process"],
        env,
    )
    try:
        deadline = time.monotonic() + 90
        while node.popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert node.popen.returncode not in (None, 0)
        with pytest.raises(ProcessError) as exc:
            procs.check_alive()
        assert "supernode-plant-1 exited with code" in str(exc.value) and "\n" not in str(exc.value)
        assert "could not establish a connection to the SuperLink" in str(exc.value)
    finally:
        procs.stop_all()
    assert procs.alive() == []
