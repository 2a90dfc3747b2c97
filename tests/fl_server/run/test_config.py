import tomllib
from pathlib import Path

import pytest

from fl_server.run.config import RunConfig
from maxfl.errors import ConfigError

PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"


def test_pyproject_defaults_are_a_valid_run_config_with_the_same_keys():
    defaults = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    cfg = RunConfig.from_flower(defaults)
    assert set(cfg.to_flower()) == set(defaults)
    assert cfg.to_flower() == {**cfg.to_flower(), **defaults}


def test_unknown_task_names_the_field_and_the_allowed_values():
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_flower({"task": "welding"})
    message = str(exc.value)
    assert "'task'" in message and "welding" in message and "defect" in message
    assert "\n" not in message


def test_out_of_range_values_are_each_named():
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_flower({"num-server-rounds": 0, "learning-rate": -1.0})
    assert "'num-server-rounds'" in str(exc.value) and "'learning-rate'" in str(exc.value)


def test_unknown_key_is_rejected_instead_of_ignored():
    with pytest.raises(ConfigError, match="'num-rounds'"):
        RunConfig.from_flower({"num-rounds": 3})


def test_strategy_error_lists_the_allowed_strategies():
    with pytest.raises(ConfigError, match="fedavg"):
        RunConfig.from_flower({"strategy": "fedmagic"})
