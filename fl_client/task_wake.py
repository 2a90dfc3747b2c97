"""A plant's SuperNode tells its warm executor that a task is waiting, so the executor need not keep asking.

Flower's executor learns of a task by polling its SuperNode's Runtime API (`AcquireTask`). Each poll is an HTTP
request the SuperNode answers through its FastAPI stack: polling every 50 ms after a task (so that a message starts
promptly), five plants' executors made 162 such requests a round, the largest share of their SuperNodes' CPU on two
cores (experiments/results/request-census-before-wake.json). Here `maxfl-supernode` sends one datagram once it has
pulled a message and stored its objects (so the task the executor then acquires finds all of them), and the executor
waits for that datagram, polling only as a fallback.

The channel is a Linux abstract Unix socket named by the Runtime API's port: a SuperNode and its executor on one
host find each other with no configuration, nothing is left on disk, and processes in other network namespaces
(another container) never hear it, so they simply keep polling. A wake carries no data; a stray one costs a poll.
"""

from __future__ import annotations

import logging
import select
import socket

log = logging.getLogger("maxfl.task_wake")


def channel(runtime_port: int) -> bytes:
    """The abstract socket address of the executor serving the SuperNode whose Runtime API is on `runtime_port`."""
    return f"\0maxfl-task-wake:{runtime_port}".encode()


class WakeListener:
    """The executor's end: `wait` returns as soon as a wake arrives (or after `timeout_s`)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.heard = False  # its SuperNode sends wakes: polls are a fallback only

    @classmethod
    def open(cls, runtime_port: int) -> WakeListener | None:
        """Listen for `runtime_port`'s SuperNode; None (keep polling) where the channel cannot be had."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(channel(runtime_port))
        except OSError as exc:  # another executor serves that port, or no abstract sockets here
            sock.close()
            log.warning("no task wake-ups for Runtime API port %d (%s): polling for tasks", runtime_port, exc)
            return None
        sock.setblocking(False)
        return cls(sock)

    def wait(self, timeout_s: float) -> bool:
        """Whether a wake came within `timeout_s`; every wake queued so far is consumed (they carry no data)."""
        if not select.select([self.sock], [], [], max(0.0, timeout_s))[0]:
            return False
        while True:
            try:
                self.sock.recv(16)
            except BlockingIOError:
                break
        self.heard = True
        return True

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


class WakeSender:
    """The SuperNode's end: `wake()` never blocks and never fails; with no executor listening it does nothing."""

    def __init__(self, runtime_port: int) -> None:
        self.address = channel(runtime_port)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def wake(self) -> None:
        try:
            self.sock.sendto(b"!", self.address)
        except OSError:  # nobody listening (no warm executor yet, or a stock one), or its queue is full: it polls
            pass
