import time
import types

import flwr
import pytest

from maxfl import flower_tuning


class _Clock:
    """A `time` module whose clock moves only when something sleeps."""

    def __init__(self) -> None:
        self.now, self.slept = 1000.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 3))
        self.now += seconds


def test_a_plant_in_a_run_polls_at_the_lan_pace_and_backs_off_to_flowers_once_quiet():
    clock = _Clock()
    paced = flower_tuning._PacedSleep(poll_s=0.2, reply_s=0.05, idle_s=3.0, clock=clock)
    paced.sleep(0.5)  # waiting for its ClientApp's reply: a run is going on
    assert clock.slept == [0.05]
    for _ in range(10):  # the others are still training: it asks for its next message every 0.2 s
        paced.sleep(3)
    assert clock.slept[1:] == [0.2] * 10
    clock.now += 40  # quiet for a while: a twentieth of the quiet time
    paced.sleep(3)
    assert clock.slept[-1] == pytest.approx((0.05 + 10 * 0.2 + 40) / 20, abs=1e-3)  # quiet since its reply came
    clock.now += 600  # an idle federation: Flower's own 3 s
    paced.sleep(3)
    assert clock.slept[-1] == 3.0
    paced.sleep(0.5)  # a message came: back at the LAN pace
    paced.sleep(3)
    assert clock.slept[-2:] == [0.05, 0.2]


def test_a_poller_asks_quickly_after_work_and_less_often_the_longer_it_is_quiet_up_to_its_cap():
    clock = _Clock()
    backoff = flower_tuning.QuietBackoff(floor_s=0.05, cap_s=1.0, clock=clock)
    assert backoff.interval() == 0.05
    clock.now += 4  # four quiet seconds: a twentieth of them
    assert backoff.interval() == pytest.approx(0.2)
    clock.now += 600
    assert backoff.interval() == 1.0
    backoff.worked()
    assert backoff.interval() == 0.05


def test_pacing_replaces_time_in_the_patched_module_only():
    module = types.ModuleType("poller")
    module.time = time
    assert flower_tuning.pace_supernode_sleeps(module, 0.2, 0.05)
    assert module.time.monotonic() > 0  # everything else is the real time module
    assert time.sleep is not module.time.sleep


def test_object_pull_backoff_defaults_are_lowered():
    from flwr.supercore.inflatable import inflatable_utils

    saved = dict(inflatable_utils.pull_objects.__kwdefaults__), dict(inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__)
    try:
        assert flower_tuning.tune_object_pulls(0.05, 0.5)
        assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == 0.05
        assert inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__["backoff_cap"] == 0.5
        # Shorter steps, the same patience: Flower's max_time still bounds the wait, not 500 tries of 0.5 s.
        for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
            defaults = fn.__kwdefaults__
            assert defaults["max_tries_per_object"] * 0.5 >= defaults["max_time"] == saved[0]["max_time"]
    finally:
        inflatable_utils.pull_objects.__kwdefaults__, inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__ = saved


def test_other_flower_versions_are_left_alone(monkeypatch):
    monkeypatch.setattr(flwr, "__version__", "9.0.0")
    module = types.ModuleType("poller")
    module.time = time
    assert not flower_tuning.pace_supernode_sleeps(module, 0.2, 0.05)
    assert module.time is time
    assert not flower_tuning.tune_object_pulls(0.05, 0.5)
    assert not flower_tuning.tune_node_heartbeat(10)


def test_node_heartbeat_is_announced_and_sent_at_the_tuned_interval_never_below_flowers_minimum(monkeypatch):
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    monkeypatch.setattr(heartbeat, "HEARTBEAT_DEFAULT_INTERVAL", 30)
    monkeypatch.setattr(fleet_http_connection, "HEARTBEAT_DEFAULT_INTERVAL", 30)
    assert flower_tuning.tune_node_heartbeat(12)
    assert heartbeat.HEARTBEAT_DEFAULT_INTERVAL == fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL == 12
    assert flower_tuning.tune_node_heartbeat(1)  # the SuperLink rejects intervals under its minimum (10 s)
    assert fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL == 10


def test_the_supernode_notifies_after_each_message_it_stored_and_not_after_an_empty_poll(monkeypatch):
    module = types.ModuleType("start_client_internal")
    pulls = iter([None, 7, None])
    module._pull_and_store_message = lambda **kwargs: next(pulls)
    notified = []
    assert flower_tuning.notify_after_each_message(module, lambda: notified.append(1))
    assert [module._pull_and_store_message(state=None) for _ in range(3)] == [None, 7, None]
    assert notified == [1]
    monkeypatch.setattr(flwr, "__version__", "9.0.0")
    other = types.ModuleType("start_client_internal")
    other._pull_and_store_message = print
    assert not flower_tuning.notify_after_each_message(other, lambda: None)
    assert other._pull_and_store_message is print


def test_flowers_supernode_loop_still_has_the_function_that_is_wrapped():
    from flwr.supernode import start_client_internal

    assert callable(start_client_internal._pull_and_store_message)


def test_object_pulls_are_bounded_inside_the_block_only_even_when_it_raises():
    from flwr.supercore.inflatable import inflatable_utils

    before = [dict(fn.__kwdefaults__) for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)]
    with pytest.raises(RuntimeError), flower_tuning.object_pulls_within(7.5):
        assert inflatable_utils.pull_objects.__kwdefaults__["max_time"] == 7.5
        assert inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__["max_time"] == 7.5
        raise RuntimeError
    with flower_tuning.object_pulls_within(None):
        pass
    assert [inflatable_utils.pull_objects.__kwdefaults__, inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__] == before


def test_an_unchecked_flower_version_is_named_once_not_at_every_poll(monkeypatch):
    monkeypatch.setattr(flwr, "__version__", "9.1.0")
    monkeypatch.setattr(flower_tuning, "_warned", set())
    warnings = []
    monkeypatch.setattr(flower_tuning.log, "warning", lambda *args: warnings.append(args))
    for _ in range(3):
        with flower_tuning.object_pulls_within(5.0):
            pass
    assert len(warnings) == 1 and "9.1.0" in warnings[0]
