import sys
import time

from launcher.processes import ProcessGroup, descendants, free_port, pid_alive, port_is_free


def test_stop_all_ends_the_process_and_the_children_it_detached(tmp_path):
    procs = ProcessGroup(tmp_path)
    # The child starts a grandchild in its own session, as Flower's SuperLink does with its SuperExec.
    script = (
        "import subprocess, sys, time;"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True);"
        "time.sleep(600)"
    )
    parent = procs.start("tree", [sys.executable, "-c", script], env={})
    deadline = time.monotonic() + 10
    while not descendants(parent.popen.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    family = [parent.popen.pid, *descendants(parent.popen.pid)]
    assert len(family) == 2
    procs.stop_all(grace_s=5)
    assert not any(pid_alive(pid) for pid in family)


def test_process_that_ignores_sigterm_is_killed(tmp_path):
    procs = ProcessGroup(tmp_path)
    stubborn = procs.start("stubborn", [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"], env={})
    procs.wait_until("ready", lambda: "ready" in (tmp_path / "stubborn.log").read_text(), 10, stubborn)
    killed = procs.stop_all(grace_s=0.5)
    assert killed == [stubborn.popen.pid] and not pid_alive(stubborn.popen.pid)


def test_a_dead_process_is_reported_with_its_log_tail(tmp_path):
    procs = ProcessGroup(tmp_path)
    procs.start("failing", [sys.executable, "-c", "print('port 1234 already in use'); raise SystemExit(3)"], env={})
    time.sleep(1.0)
    try:
        procs.check_alive()
    except Exception as exc:  # noqa: BLE001
        assert "failing exited with code 3" in str(exc) and "already in use" in str(exc)
    else:
        raise AssertionError("check_alive did not notice the dead process")
    finally:
        procs.stop_all()


def test_free_port_is_free_and_a_bound_port_is_not():
    import socket

    port = free_port()
    assert port_is_free(port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert not port_is_free(port)


def test_files_a_started_process_writes_are_its_owners_only(tmp_path):
    procs = ProcessGroup(tmp_path)
    target = tmp_path / "state.db"
    writer = procs.start("writer", [sys.executable, "-c", f"open({str(target)!r}, 'w').write('weights')"], env={})
    writer.popen.wait(timeout=30)
    assert writer.popen.returncode == 0
    assert target.stat().st_mode & 0o077 == 0  # not readable by the group or others, whatever the launcher's umask
