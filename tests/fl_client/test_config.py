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
    plant = PlantConfig.from_flower({"partition-id": 1, "num-partitions": 3}, sim_data_root="/tmp/plants")
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
