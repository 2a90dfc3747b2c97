"""How many requests the edge server lets into the model at once, and how many it lets wait.

The model's work (parsing, decoding, preprocessing, onnxruntime) runs on `running` daemon threads; a request
is admitted only while fewer than `running + waiting` are admitted, and otherwise answered 503 at once, so
neither memory nor latency grows with the number of clients. A thread is released when its work ends, not
when its request gave up: a request that timed out still counts until its work stops, so the bound holds.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any


class Busy(Exception):
    """No room: the model's threads are busy and the wait queue is full (or the wait ran out)."""


class Ticket:
    """One admitted request; it stops counting as waiting when it gets a model thread or leaves."""

    __slots__ = ("waiting",)

    def __init__(self) -> None:
        self.waiting = True


class Admission:
    """Admit, wait for a model thread, run on it; every counter is touched on the event loop only."""

    def __init__(self, running: int, waiting: int) -> None:
        self.max_running, self.max_waiting = running, waiting
        self.running = 0  # model threads busy, abandoned work included
        self.waiting = 0  # admitted requests without a thread yet (reading their body or queued)
        self._free = asyncio.Semaphore(running)
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Callable[[BaseException | None, Any], None]] | None] = queue.SimpleQueue()
        for k in range(running):
            threading.Thread(target=self._work, name=f"edge-model-{k}", daemon=True).start()

    def describe(self) -> dict[str, int]:
        return {"in_model": self.running, "waiting": self.waiting, "max_in_model": self.max_running, "max_waiting": self.max_waiting}

    def enter(self) -> Ticket:
        """Count the request in, or raise Busy if the model and its queue are full."""
        if self.running + self.waiting >= self.max_running + self.max_waiting:
            raise Busy
        self.waiting += 1
        return Ticket()

    def leave(self, ticket: Ticket) -> None:
        """The request is done (answered, refused or given up): it no longer waits, if it still did."""
        if ticket.waiting:
            ticket.waiting = False
            self.waiting -= 1

    async def run(self, ticket: Ticket, work: Callable[[], Any], wait_s: float) -> asyncio.Future[Any]:
        """Wait up to `wait_s` for a model thread (Busy after that) and start `work` on it; the future is its result.

        Call between enter() and leave(). The thread is freed when `work` returns, whoever still waits for it.
        """
        try:
            async with asyncio.timeout(max(wait_s, 0.0)):
                await self._free.acquire()
        except TimeoutError:
            raise Busy from None
        self.leave(ticket)
        self.running += 1
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()

        def finished(exc: BaseException | None, result: Any) -> None:  # on the loop
            self.running -= 1
            self._free.release()
            if not done.done():
                done.set_exception(exc) if exc is not None else done.set_result(result)

        def report(exc: BaseException | None, result: Any) -> None:  # on the model thread
            try:
                loop.call_soon_threadsafe(finished, exc, result)
            except RuntimeError:  # the loop closed meanwhile: the server is gone, and nobody waits
                pass

        self._jobs.put((work, report))
        return done

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            work, report = job
            try:
                result = work()
            except BaseException as exc:  # noqa: BLE001 - handed to the request, which decides what it means
                report(exc, None)
            else:
                report(None, result)
