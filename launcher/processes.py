"""Start processes and stop every one of them, children included, by PID."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from maxfl.errors import ProcessError

log = logging.getLogger("maxfl")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def strip_ansi(text: str) -> str:
    """Flower colours its log lines; our one-line messages and filters want plain text."""
    return _ANSI.sub("", text)


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _children() -> dict[int, list[int]]:
    """Parent PID -> its running children. A zombie runs nothing and has no children left: it is not counted."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state != "Z":
            tree.setdefault(int(ppid), []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """All running descendants of `pid`; Flower detaches some children into their own sessions."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """Kernel start time of `pid`: with the PID it names one process, even after PID reuse."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def pid_alive(pid: int, started: int | None = None) -> bool:
    """True while `pid` runs (zombies count as ended) and, if given, is still the process started at `started`."""
    fields = _stat(pid)
    if fields is None or fields[0] == "Z":
        return False
    return started is None or int(fields[19]) == started


@dataclass
class Managed:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, lines: int = 4) -> str:
        """The process's last error from its log (or its last lines), on one line."""
        try:
            text = [strip_ansi(ln).strip() for ln in self.log_path.read_text(errors="replace").splitlines()]
        except OSError:
            return ""
        text = [ln for ln in text if ln]
        errors = [i for i, ln in enumerate(text) if "ERROR" in ln or "Error:" in ln]
        shown = text[errors[-1] : errors[-1] + lines] if errors else text[-lines:]
        return " ".join(shown)


class ProcessGroup:
    """Owns the processes it starts; `stop_all` ends them and their descendants, newest first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Managed] = []
        self.pids_seen: dict[int, int | None] = {}  # pid -> start time

    def start(self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path | None = None) -> Managed:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as out:
            try:
                popen = subprocess.Popen(
                    list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env, cwd=cwd, start_new_session=True,
                    umask=0o077,  # the SuperLink's state.db, MLflow's artifacts (weights, profiles), ledgers: owner only
                )
            except OSError as exc:
                raise ProcessError(f"cannot start {name} ({argv[0]}): {exc.strerror}; is the environment installed?") from None
        managed = Managed(name, popen, log_path)
        self.procs.append(managed)
        self.pids_seen[popen.pid] = start_time(popen.pid)
        log.debug("started %s pid=%d", name, popen.pid)
        return managed

    def check_alive(self) -> None:
        for p in self.procs:
            if p.popen.poll() is not None:
                raise ProcessError(f"{p.name} exited with code {p.popen.returncode}: {p.tail()} (log: {p.log_path})")

    def wait_until(self, what: str, ready: Callable[[], bool], timeout_s: float, proc: Managed | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.popen.poll() is not None:
                raise ProcessError(f"{proc.name} exited with code {proc.popen.returncode} before {what}: {proc.tail()} (log: {proc.log_path})")
            if ready():
                return
            time.sleep(0.2)
        hint = f" (log: {proc.log_path})" if proc else ""
        raise ProcessError(f"timed out after {timeout_s:.0f}s waiting for {what}{hint}")

    def remember_descendants(self) -> None:
        for p in self.procs:
            for pid in descendants(p.popen.pid):
                self.pids_seen.setdefault(pid, start_time(pid))

    def alive(self) -> list[int]:
        return [pid for pid, started in sorted(self.pids_seen.items()) if pid_alive(pid, started)]

    def stop_all(self, grace_s: float = 10.0) -> list[int]:
        """SIGTERM the processes we started, then their orphans, SIGKILL after `grace_s`; returns the killed PIDs."""
        self.remember_descendants()
        for p in reversed(self.procs):
            _signal(p.popen.pid, signal.SIGTERM)
        started = time.monotonic()
        orphans_signalled = False
        while time.monotonic() - started < grace_s and self.alive():
            for p in self.procs:
                p.popen.poll()
            self.remember_descendants()
            if not orphans_signalled and time.monotonic() - started > min(2.0, grace_s / 2):
                for pid in self.alive():  # children that outlived their parent (detached sessions)
                    _signal(pid, signal.SIGTERM)
                orphans_signalled = True
            time.sleep(0.1)
        killed = self.alive()
        for pid in killed:
            _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.alive() and time.monotonic() < deadline:
            for p in self.procs:
                p.popen.poll()
            time.sleep(0.05)
        for p in self.procs:
            try:
                p.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return killed


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
