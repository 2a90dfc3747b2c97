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
    finally:
        inflatable_utils.pull_objects.__kwdefaults__, inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__ = saved


def test_other_flower_versions_are_left_alone(monkeypatch):
    monkeypatch.setattr(flwr, "__version__", "9.0.0")
    module = types.ModuleType("poller")
    module.time = time
    assert not flower_tuning.cap_module_sleeps(module, 0.01)
    assert module.time is time
    assert not flower_tuning.tune_object_pulls(0.05, 0.5)
