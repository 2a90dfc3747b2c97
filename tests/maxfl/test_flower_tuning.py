import time
import types

import flwr

from maxfl import flower_tuning


def test_capped_sleep_shortens_only_the_patched_module():
    module = types.ModuleType("poller")
    module.time = time
    assert flower_tuning.cap_module_sleeps(module, 0.01)
    started = time.perf_counter()
    module.time.sleep(3)
    assert time.perf_counter() - started < 1.0
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
    assert not flower_tuning.cap_module_sleeps(module, 0.01)
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
