"""PollingGrid keeps Flower's send_and_receive contract: every reply that came by the deadline is returned."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fl_server.run import grid as grid_module
from fl_server.run.grid import PollingGrid


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class ScriptedGrid:
    """Pushes give ids m0, m1, ...; each pull runs the next step of `pulls` (advance the clock, then reply to ids)."""

    def __init__(self, clock: Clock, pulls: list[tuple[float, list[str]]]) -> None:
        self.clock, self.pulls, self.pulled = clock, list(pulls), 0

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulled += 1
        took, answered = self.pulls.pop(0) if self.pulls else (0.0, [])
        self.clock.now += took
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=m)) for m in answered if m in set(message_ids)]


def _message(node: int):
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node))


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(grid_module, "time", clock)
    return clock


def test_replies_that_came_while_one_pull_outlasted_the_deadline_are_not_dropped(clock):
    # A plant died mid-upload: Flower retries its reply's objects for longer than the whole round (the first pull
    # ends past the deadline); the other plants answered meanwhile and one more pull brings their replies.
    inner = ScriptedGrid(clock, [(500.0, ["m2"]), (0.0, ["m0", "m1"])])
    replies = PollingGrid(inner, poll_interval_s=0.1).send_and_receive([_message(n) for n in (11, 12, 13)], timeout=120.0)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]


def test_past_the_deadline_it_pulls_once_more_and_stops(clock):
    inner = ScriptedGrid(clock, [(0.0, ["m0"])])  # m1 never answers
    replies = PollingGrid(inner, poll_interval_s=1.0).send_and_receive([_message(11), _message(12)], timeout=10.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert clock.now == 10.0 and inner.pulled == 11  # pulls at 0, 1, ..., 10 s: the one at the deadline is the last


def test_without_a_timeout_it_waits_for_every_reply(clock):
    inner = ScriptedGrid(clock, [(0.0, [])] * 50 + [(0.0, ["m0"])])
    replies = PollingGrid(inner, poll_interval_s=1.0).send_and_receive([_message(11)], timeout=None)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"] and inner.pulled == 51


def test_each_pull_waits_for_reply_objects_only_until_the_deadline_and_flowers_bound_is_restored(clock):
    # Without a bound, one dead plant's half-uploaded reply holds every pull for the SuperLink's 180 s push session.
    from flwr.supercore.inflatable import inflatable_utils

    flowers = inflatable_utils.pull_objects.__kwdefaults__["max_time"]
    bounds = []

    class Observed(ScriptedGrid):
        def pull_messages(self, message_ids):
            bounds.append(inflatable_utils.pull_objects.__kwdefaults__["max_time"])
            return super().pull_messages(message_ids)

    inner = Observed(clock, [(30.0, []), (95.0, []), (0.0, ["m0"])])
    PollingGrid(inner, poll_interval_s=1.0).send_and_receive([_message(11)], timeout=120.0)
    assert bounds == [120.0, 89.0, grid_module.LAST_PULL_GRACE_S]  # pulls at 0 s, 31 s, then past the deadline (126 s)
    assert inflatable_utils.pull_objects.__kwdefaults__["max_time"] == flowers
    PollingGrid(Observed(clock, [(0.0, ["m0"])]), poll_interval_s=1.0).send_and_receive([_message(11)], timeout=None)
    assert bounds[-1] == flowers  # no timeout: Flower's own bound
