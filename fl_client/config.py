"""A plant's own settings: its SuperNode's `--node-config`, which the anchor cannot change."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from maxfl.errors import ConfigError
from maxfl.settings import FlowerSettings

if TYPE_CHECKING:
    from flwr.app import Context

PLANT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class PlantConfig(FlowerSettings, extra="ignore"):
    source: ClassVar[str] = "plant node config"

    plant_id: str = Field(pattern=PLANT_ID_PATTERN)
    data_dir: Path

    @classmethod
    def from_flower(cls, node_config: Mapping[str, Any], sim_data_root: str = "") -> PlantConfig:
        """Deployment: the SuperNode's node config. Simulation: derived from Flower's partition id."""
        values = dict(node_config)
        if "plant-id" not in values and "partition-id" in values:
            if not sim_data_root:
                raise ConfigError("simulation needs run config 'sim-data-root' (the folder holding plant-1, plant-2, ...)")
            plant_id = f"plant-{int(values['partition-id']) + 1}"
            values = {"plant-id": plant_id, "data-dir": str(Path(sim_data_root) / plant_id)}
        return cls.parse(values)

    @classmethod
    def from_context(cls, context: Context) -> PlantConfig:
        return cls.from_flower(context.node_config, str(context.run_config.get("sim-data-root", "")))

    def as_node_config(self) -> str:
        """The `--node-config` string for `flower-supernode`."""
        return f'plant-id="{self.plant_id}" data-dir="{self.data_dir}"'
