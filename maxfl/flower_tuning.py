"""Shorter waits inside Flower for federations on one site or a LAN.

Flower 1.41 waits for WAN links: a SuperNode with nothing to do sleeps 3 s before asking again, and
a message whose objects are not yet stored is retried after 1 s, then 2 s, ... These waits, not the
work, dominate a round on loopback (measured in experiments/round_overhead.py). Each function
here changes one wait of one Flower version and nothing else; on another Flower version it changes
nothing and returns False, so an upgrade can never silently run with a wrong patch.
"""

from __future__ import annotations

import logging
import time as _time
from types import ModuleType

log = logging.getLogger("maxfl")

CHECKED_FLWR = "1.41."


def _checked_version() -> bool:
    import flwr

    if flwr.__version__.startswith(CHECKED_FLWR):
        return True
    log.warning("Flower %s is not %sx: keeping Flower's own poll intervals", flwr.__version__, CHECKED_FLWR)
    return False


class _CappedSleep:
    """Stands in for the `time` module inside one Flower module only."""

    def __init__(self, cap_s: float) -> None:
        self.cap_s = cap_s

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.cap_s))

    def __getattr__(self, name: str) -> object:
        return getattr(_time, name)


def cap_module_sleeps(module: ModuleType, cap_s: float) -> bool:
    """Cap every `time.sleep` made by `module` (a polling loop) at `cap_s` seconds."""
    if not _checked_version() or getattr(module, "time", None) is not _time:
        return False
    module.time = _CappedSleep(cap_s)  # type: ignore[attr-defined]
    return True


def tune_object_pulls(initial_backoff_s: float, backoff_cap_s: float) -> bool:
    """Retry a not-yet-available message object after `initial_backoff_s` instead of 1 s (doubling, capped).

    Flower gives up on an object after 500 tries (at its 10 s cap: over an hour) or its `max_time`; at a cap of
    0.1 s, 500 tries are 50 s, which a loaded SuperNode storing twenty plants' messages can exceed. The tries are
    raised so that Flower's own `max_time`, not the shorter steps, bounds the wait.
    """
    if not _checked_version():
        return False
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = dict(fn.__kwdefaults__ or {})
        if not {"initial_backoff", "backoff_cap", "max_time", "max_tries_per_object"} <= set(defaults):
            return False
        tries = max(int(defaults["max_tries_per_object"] or 0), int((defaults["max_time"] or 0) / backoff_cap_s) + 1)
        defaults.update(initial_backoff=initial_backoff_s, backoff_cap=backoff_cap_s, max_tries_per_object=tries)
        fn.__kwdefaults__ = defaults
    return True


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
