"""The warm executor's resident task processes: one per run, reused while idle, retired without leaving a process."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fl_client import warm_exec
from fl_client.warm_exec import Residents

RUN = (7, "fabhash")


def _wait_idle(residents: Residents, resident: warm_exec.Resident) -> None:
    deadline = time.monotonic() + 120  # a hang fails the test instead of the suite; no speed is asserted
    while resident.busy:
        assert time.monotonic() < deadline, "the resident never reported its task done"
        residents.poll()
        time.sleep(0.01)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Flower's task run is replaced by one that writes its token and pid: the resident's own loop runs for real."""
    out = tmp_path / "tasks.txt"

    def run_one(address: str, token: str, insecure: bool, certificates: bytes | None) -> int:
        with out.open("a") as f:
            f.write(f"{token} {os.getpid()}\n")
        return 3 if token == "fails" else 0

    monkeypatch.setattr(warm_exec, "_run_one", run_one)
    monkeypatch.setattr(warm_exec, "_enter_task_process", lambda threads: None)
    return out


def _start(residents: Residents, token: str, run: tuple[int, str] = RUN) -> warm_exec.Resident:
    return residents.start(run, token, lambda tokens, done: warm_exec._serve_run(tokens, done, token, "127.0.0.1:9", True, None, 1))  # noqa: SLF001


def test_a_run_s_tasks_share_one_process_and_it_ends_when_retired(recorded: Path) -> None:
    residents = Residents(max_runs=2, idle_s=3600)
    first = _start(residents, "t1")
    _wait_idle(residents, first)
    assert residents.idle_for(RUN) is first and residents.idle_for((8, "fabhash")) is None
    residents.give(first, "fails")  # a failed task does not end the resident
    _wait_idle(residents, first)
    residents.give(first, "t3")
    _wait_idle(residents, first)
    rows = [line.split() for line in recorded.read_text().splitlines()]
    assert [token for token, _ in rows] == ["t1", "fails", "t3"]
    assert {pid for _, pid in rows} == {str(first.pid)} and first.pid != os.getpid()
    residents.stop()
    assert residents.procs == [] and _gone(first.pid)


def test_a_busy_resident_takes_no_second_task_and_a_new_run_displaces_the_oldest_idle(recorded: Path) -> None:
    residents = Residents(max_runs=1, idle_s=3600)
    first = _start(residents, "a1", run=(1, "h"))
    assert residents.idle_for((1, "h")) is None and not residents.has_room((1, "h"))  # busy: that task runs one-shot
    _wait_idle(residents, first)
    assert residents.has_room((2, "h"))  # the idle resident of run 1 makes way
    assert _gone(first.pid) and residents.procs == []
    second = _start(residents, "b1", run=(2, "h"))
    _wait_idle(residents, second)
    residents.stop()
    assert _gone(second.pid)


def test_an_idle_resident_is_retired_after_its_idle_time(recorded: Path) -> None:
    residents = Residents(max_runs=2, idle_s=0.0)
    first = _start(residents, "t1")
    _wait_idle(residents, first)
    residents.poll()  # idle for longer than 0 s
    assert residents.procs == [] and _gone(first.pid)


def test_flower_exit_in_a_resident_runs_its_handlers_and_arms_no_timer() -> None:
    import types

    from flwr.supercore.exit.exit_handler import add_exit_handler

    from maxfl.flower_tuning import exit_without_force_timer

    module = types.SimpleNamespace(flwr_exit=lambda *a, **k: None)
    assert exit_without_force_timer(module)  # type: ignore[arg-type]
    ran: list[str] = []
    add_exit_handler(lambda: ran.append("handler"))
    threads = set(os.listdir(f"/proc/{os.getpid()}/task"))
    with pytest.raises(SystemExit) as exc:
        module.flwr_exit(0)
    assert exc.value.code == 0 and ran == ["handler"]
    assert set(os.listdir(f"/proc/{os.getpid()}/task")) == threads  # no force-exit thread was started
    with pytest.raises(SystemExit) as exc:
        module.flwr_exit(200, "boom")
    assert exc.value.code == 1


def test_the_executor_ends_when_its_supernode_dies_even_unreaped_and_while_its_task_poll_retries(tmp_path: Path):
    """A SuperNode killed outright (the plant's machine, an OOM kill) must not leave its executor polling a Runtime API
    that is gone: the executor, whose task poll is retrying against nothing, still ends."""
    import signal
    import subprocess
    import sys

    from launcher.processes import free_port

    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # stands in for the SuperNode
    executor = subprocess.Popen([str(Path(sys.executable).parent / "maxfl-warm-exec"), "--runtime-api-address",
                                 f"127.0.0.1:{free_port()}", "--insecure", "--parent-pid", str(supernode.pid)],
                                stdout=subprocess.DEVNULL, stderr=(tmp_path / "exec.log").open("wb"))
    try:
        time.sleep(1)  # a moment of polling nothing; not a speed the test asks for
        assert executor.poll() is None, (tmp_path / "exec.log").read_text()
        supernode.send_signal(signal.SIGKILL)  # and left unreaped: a zombie is a dead SuperNode too
        assert executor.wait(timeout=300) == 0
        assert "the SuperNode" in (tmp_path / "exec.log").read_text() and "is gone" in (tmp_path / "exec.log").read_text()
    finally:
        for proc in (executor, supernode):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
