from pathlib import Path

import pytest

from fl_client.config import PlantConfig
from maxfl.errors import ConfigError


def test_deployment_node_config_names_the_plant_and_its_data():
    plant = PlantConfig.from_flower({"plant-id": "plant-7", "data-dir": "/srv/line-3"})
    assert plant.plant_id == "plant-7" and plant.data_dir == Path("/srv/line-3")


def test_node_config_string_round_trips_through_flower_parser():
    from flwr.common.config import parse_config_args

    plant = PlantConfig(plant_id="plant-2", data_dir=Path("/data/plant 2"))
    assert PlantConfig.from_flower(parse_config_args([plant.as_node_config()])) == plant


def test_simulation_plant_is_derived_from_flower_partition_id():
    plant = PlantConfig.from_flower({"partition-id": 1, "num-partitions": 3}, {"sim-data-root": "/tmp/plants"})
    assert plant.plant_id == "plant-2" and plant.data_dir == Path("/tmp/plants/plant-2")


def test_simulation_without_data_root_says_which_setting_is_missing():
    with pytest.raises(ConfigError, match="sim-data-root"):
        PlantConfig.from_flower({"partition-id": 0, "num-partitions": 2})


@pytest.mark.parametrize("bad", ["Plant 1", "", "-x", "a" * 80])
def test_malformed_plant_id_is_rejected(bad):
    with pytest.raises(ConfigError, match="'plant-id'"):
        PlantConfig.from_flower({"plant-id": bad, "data-dir": "/x"})


def test_missing_data_dir_is_named():
    with pytest.raises(ConfigError, match="'data-dir'"):
        PlantConfig.from_flower({"plant-id": "plant-1"})


@pytest.mark.parametrize("ceiling", [8.0, float("inf"), None])
def test_privacy_settings_round_trip_through_the_node_config_string(tmp_path, ceiling):
    from flwr.common.config import parse_config_args

    plant = PlantConfig(plant_id="plant-2", data_dir=tmp_path, max_epsilon=ceiling, delta=1e-6, ledger=tmp_path / "l.json")
    assert PlantConfig.from_flower(parse_config_args([plant.as_node_config()])) == plant


def test_simulated_plants_take_their_ceiling_from_the_run_config_and_keep_ledgers_beside_the_data():
    plant = PlantConfig.from_flower({"partition-id": 0}, {"sim-data-root": "/d", "sim-max-epsilon": 4.0, "sim-delta": 1e-6})
    assert (plant.max_epsilon, plant.delta, plant.ledger_path()) == (4.0, 1e-6, Path("/d/ledgers/plant-1.json"))


def test_default_ledger_lives_under_maxfl_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MAXFL_HOME", str(tmp_path))
    assert PlantConfig.from_flower({"plant-id": "plant-4", "data-dir": "/x"}).ledger_path() == tmp_path / "ledgers" / "plant-4.json"
