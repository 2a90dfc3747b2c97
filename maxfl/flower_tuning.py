"""Shorter waits inside Flower for federations on one site or a LAN.

Flower 1.41 waits for WAN links: a SuperNode with nothing to do sleeps 3 s before asking again, and
a message whose objects are not yet stored is retried after 1 s, then 2 s, ... These waits, not the
work, dominate a round on loopback (measured in experiments/round_overhead.py). Each function
here changes one wait of one Flower version and nothing else; on another Flower version it changes
nothing and returns False, so an upgrade can never silently run with a wrong patch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time as _time
from collections.abc import Callable, Iterator
from types import ModuleType

log = logging.getLogger("maxfl")

CHECKED_FLWR = "1.41."


_warned: set[str] = set()  # Flower versions already named in the log (object_pulls_within runs at every poll)


def _checked_version() -> bool:
    import flwr

    if flwr.__version__.startswith(CHECKED_FLWR):
        return True
    if flwr.__version__ not in _warned:
        _warned.add(flwr.__version__)
        log.warning("Flower %s is not %sx: keeping Flower's own poll intervals", flwr.__version__, CHECKED_FLWR)
    return False


def _object_pullers() -> tuple[Callable[..., object], ...]:
    """Flower's functions that pull a message's objects, retrying those not stored yet."""
    from flwr.supercore.inflatable import inflatable_utils

    return inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree


FLOWER_IDLE_POLL_S = 3.0  # Flower 1.41's SuperNode: the sleep after a poll of the SuperLink that found no message
QUIET_FRACTION = 20  # a quiet poller waits this fraction of the time it has been quiet


class QuietBackoff:
    """The wait before asking again: `floor_s` right after some work, then a twentieth of the time since, up to `cap_s`.

    A poller that has just had work asks quickly (the next message of a round comes within seconds of the last one);
    one left quiet asks less and less often, so that a federation's idle plants do not keep its processes busy
    answering them."""

    def __init__(self, floor_s: float, cap_s: float, clock: ModuleType = _time) -> None:
        self.floor_s, self.cap_s, self.clock = floor_s, max(floor_s, cap_s), clock
        self.busy_at = clock.monotonic()

    def worked(self) -> None:
        self.busy_at = self.clock.monotonic()

    def interval(self) -> float:
        return min(self.cap_s, max(self.floor_s, (self.clock.monotonic() - self.busy_at) / QUIET_FRACTION))


class _PacedSleep:
    """Stands in for the `time` module inside Flower's SuperNode loop, whose only sleeps are the idle poll (3 s) and the
    waits for its ClientApp's reply and objects (0.5 s steps).

    A wait for the plant's own reply (local, cheap) takes `reply_s`; it means a run is going on. An idle poll waits as
    `QuietBackoff(poll_s, idle_s)` says, counting from that wait: a plant waiting seconds for the others notices its next
    message within a small fraction of that wait, and the plants of an idle federation back off to Flower's 3 s.
    """

    def __init__(self, poll_s: float, reply_s: float, idle_s: float = FLOWER_IDLE_POLL_S, clock: ModuleType = _time) -> None:
        self.reply_s, self.clock = reply_s, clock
        self.backoff = QuietBackoff(poll_s, idle_s, clock)

    def interval(self, seconds: float) -> float:
        if seconds < FLOWER_IDLE_POLL_S:  # waiting on its own ClientApp: a run is going on
            self.backoff.worked()
            return min(seconds, self.reply_s)
        return self.backoff.interval()

    def sleep(self, seconds: float) -> None:
        self.clock.sleep(self.interval(seconds))

    def __getattr__(self, name: str) -> object:
        return getattr(self.clock, name)


def pace_supernode_sleeps(module: ModuleType, poll_s: float, reply_s: float, idle_s: float = FLOWER_IDLE_POLL_S) -> bool:
    """Pace the sleeps of Flower's SuperNode loop (`flwr.supernode.start_client_internal`) as `_PacedSleep` says."""
    if not _checked_version() or getattr(module, "time", None) is not _time:
        return False
    module.time = _PacedSleep(poll_s, reply_s, idle_s)  # type: ignore[attr-defined]
    return True


def notify_after_each_message(module: ModuleType, notify: Callable[[], None]) -> bool:
    """Call `notify()` each time Flower's SuperNode loop (`module`: `flwr.supernode.start_client_internal`) has pulled a
    message from the SuperLink and stored all of its objects: a task for its ClientApp is waiting (fl_client.task_wake)."""
    pull = getattr(module, "_pull_and_store_message", None)
    if not _checked_version() or not callable(pull):
        return False

    @functools.wraps(pull)
    def pull_and_store_message(*args: object, **kwargs: object) -> int | None:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            notify()
        return run_id

    module._pull_and_store_message = pull_and_store_message  # type: ignore[attr-defined]
    return True


def tune_object_pulls(initial_backoff_s: float, backoff_cap_s: float) -> bool:
    """Retry a not-yet-available message object after `initial_backoff_s` instead of 1 s (doubling, capped).

    Flower gives up on an object after 500 tries (at its 10 s cap: over an hour) or its `max_time`; at a cap of
    0.1 s, 500 tries are 50 s, which a loaded SuperNode storing twenty plants' messages can exceed. The tries are
    raised so that Flower's own `max_time`, not the shorter steps, bounds the wait.
    """
    if not _checked_version():
        return False
    for fn in _object_pullers():
        defaults = dict(fn.__kwdefaults__ or {})
        if not {"initial_backoff", "backoff_cap", "max_time", "max_tries_per_object"} <= set(defaults):
            return False
        tries = max(int(defaults["max_tries_per_object"] or 0), int((defaults["max_time"] or 0) / backoff_cap_s) + 1)
        defaults.update(initial_backoff=initial_backoff_s, backoff_cap=backoff_cap_s, max_tries_per_object=tries)
        fn.__kwdefaults__ = defaults
    return True


@contextlib.contextmanager
def object_pulls_within(max_time_s: float | None) -> Iterator[None]:
    """Flower's object pulls started in this block give up after `max_time_s` (None: Flower's own bound).

    A reply whose sender died after pushing the message but before its objects is retried until the SuperLink drops
    the upload (its 180 s push session), however short the round's timeout; bounded here, that reply becomes Flower's
    "objects unavailable" error reply when the round's time is up, and the others' replies are not held behind it.
    Not thread-safe: for a process whose pulls are made by one thread (the ServerApp's grid).
    """
    fns = _object_pullers()
    if max_time_s is None or not _checked_version() or not all("max_time" in (fn.__kwdefaults__ or {}) for fn in fns):
        yield
        return
    saved = [dict(fn.__kwdefaults__ or {}) for fn in fns]
    for fn, defaults in zip(fns, saved, strict=True):
        fn.__kwdefaults__ = {**defaults, "max_time": max_time_s}
    try:
        yield
    finally:
        for fn, defaults in zip(fns, saved, strict=True):
            fn.__kwdefaults__ = defaults


def tune_node_heartbeat(interval_s: float) -> bool:
    """Announce a `interval_s` heartbeat instead of Flower's 30 s, and keep it.

    The SuperLink counts a SuperNode offline after 2 missed intervals: with Flower's default a plant that dies
    is still sampled, and its authenticated key still refused on reconnect, for a minute. 10 s (Flower's
    minimum) notices it in 20 s, at the cost of one small request every ~4 s.
    """
    if not _checked_version():
        return False
    from flwr.common.constant import HEARTBEAT_MIN_INTERVAL
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    if not all(hasattr(m, "HEARTBEAT_DEFAULT_INTERVAL") for m in (heartbeat, fleet_http_connection)):
        return False
    interval_s = max(float(HEARTBEAT_MIN_INTERVAL), interval_s)
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = interval_s  # how often the sender beats
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = interval_s  # what the SuperNode tells the SuperLink
    return True


def exit_without_force_timer(module: ModuleType) -> bool:
    """`module`'s `flwr_exit` runs Flower's exit handlers and raises SystemExit, without arming the timer that
    `os._exit`s the process 5 s later: a resident ClientApp process (fl_client.warm_exec) runs another task after it."""
    if not _checked_version() or not callable(getattr(module, "flwr_exit", None)):
        return False
    from flwr.supercore.exit.exit_code import EXIT_CODE_HELP
    from flwr.supercore.exit.exit_handler import trigger_exit_handlers

    def flwr_exit(code: int, message: str | None = None, *args: object, **kwargs: object) -> None:
        if not 0 <= code < 100:
            log.error("ClientApp task: exit code %d %s %s", code, message or "", EXIT_CODE_HELP.get(code, ""))
        trigger_exit_handlers(run_before_force_exit=True)
        trigger_exit_handlers(run_before_force_exit=False)
        raise SystemExit(0 if 0 <= code < 100 else 1)

    module.flwr_exit = flwr_exit  # type: ignore[attr-defined]
    return True
