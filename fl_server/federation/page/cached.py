"""A source's last answer, refreshed in the background: a request never waits on a slow source longer than a bound.

Each `Cached` runs its reader in a worker thread, one fetch at a time (a page full of requests makes one
`flwr supernode ls`, not one each), keeps the last value and, when a fetch fails or outlasts the bound, says so
in one line beside the last value it has. Futures are `concurrent.futures` ones, so any event loop may await them.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

from fl_server.federation.page.data import SourceDown

T = TypeVar("T")


@dataclass(frozen=True)
class Fetched(Generic[T]):
    """What a template gets: the value (None if there never was one), why it is missing or old, and from when."""

    value: T | None
    problem: str = ""
    updated: datetime | None = None

    @property
    def ok(self) -> bool:
        return self.value is not None and not self.problem


class Cached(Generic[T]):
    def __init__(self, what: str, fetch: Callable[[], T], executor: Executor, ttl_s: float, bound_s: float) -> None:
        self.what, self.fetch, self.executor, self.ttl_s, self.bound_s = what, fetch, executor, ttl_s, bound_s
        self._lock = threading.Lock()
        self._value: T | None = None
        self._problem = ""
        self._updated: datetime | None = None
        self._checked = -math.inf  # monotonic time of the last fetch that ended, well or not
        self._future: Future[None] | None = None

    def current(self) -> Fetched[T]:
        with self._lock:
            return Fetched(self._value, self._problem, self._updated)

    def _run(self) -> None:
        try:
            value = self.fetch()
        except SourceDown as exc:
            problem = str(exc)
        except Exception as exc:  # noqa: BLE001 - a page shows what went wrong; it never answers 500 for a source
            problem = f"{self.what} cannot be read: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        else:
            with self._lock:
                self._value, self._problem, self._updated = value, "", datetime.now(UTC)
                self._checked = time.monotonic()
            return
        with self._lock:
            self._problem = problem
            self._checked = time.monotonic()

    def refresh(self) -> Future[None]:
        """Start a fetch unless one is going; returns it."""
        with self._lock:
            if self._future is None or self._future.done():
                self._future = self.executor.submit(self._run)
            return self._future

    def fresh(self) -> bool:
        with self._lock:
            return time.monotonic() - self._checked < self.ttl_s

    async def get(self, bound_s: float | None = None) -> Fetched[T]:
        """The value, fetched again if older than the TTL. Once the source has answered (well or not), a stale answer
        is returned at once while the new one is fetched (the next view shows it); before that, this waits at most
        `bound_s` (default: this source's bound)."""
        if self.fresh():
            return self.current()
        future = self.refresh()
        with self._lock:
            answered = self._checked > -math.inf
        if answered:
            return self.current()
        bound = self.bound_s if bound_s is None else bound_s
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout=bound)
        except TimeoutError:
            got = self.current()
            waiting = f"{self.what} did not answer within {bound:g} s"
            return Fetched(got.value, f"{waiting} (showing what it said at {got.updated:%H:%M:%S} UTC)" if got.updated else waiting,
                           got.updated)
        return self.current()
