"""A plant's own settings: its SuperNode's `--node-config`, which the anchor cannot change."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from maxfl.errors import ConfigError
from maxfl.settings import FlowerSettings

if TYPE_CHECKING:
    from flwr.app import Context

    from privacy.budget import PlantPrivacy

PLANT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def maxfl_home() -> Path:
    return Path(os.environ.get("MAXFL_HOME", Path.home() / ".maxfl"))


class PlantConfig(FlowerSettings, extra="ignore"):
    source: ClassVar[str] = "plant node config"

    plant_id: str = Field(pattern=PLANT_ID_PATTERN)
    data_dir: Path
    # The plant's privacy ceiling: the most epsilon any one data set may ever spend, over all runs. Not set:
    # the plant refuses to train. "inf": it also accepts runs without differential privacy.
    max_epsilon: float | None = Field(None, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    # The plant's privacy ledger; default $MAXFL_HOME/ledgers/<plant-id>.json (MAXFL_HOME: ~/.maxfl).
    ledger: Path | None = None
    # The secret that MACs the ledger and its journal (privacy.ledger_key); created 0600 on the first DP round.
    # Default <ledger>.key. Back it up with the ledger: without it the ledger cannot be verified.
    ledger_key: Path | None = None
    # A second copy of the ledger's journal (the first is <ledger>.journal), e.g. on another disk, so that
    # restoring the ledger's whole folder from an old backup is also caught. Default: none.
    ledger_mirror: Path | None = None
    # The plant's edge model store: approved models the anchor pushed, the one serving and the ones before it.
    # Default $MAXFL_HOME/edge/<plant-id>.
    edge_store: Path | None = None
    # A drill of the anchor's defences (fl_client.fault_drill): this plant corrupts every update it sends --
    # scaled, sign-flipped (both by fault-drill-scale) or NaN. For exercises and tests; "none" in production.
    fault_drill: Literal["none", "scale", "sign-flip", "nan"] = "none"
    fault_drill_scale: float = Field(10.0, gt=0.0)
    # After installing an approved model, fine-tune it and train a local-only model on this plant's training records,
    # and serve whichever scores best on validation records cut from them (fl_client.personalise); nothing leaves.
    personalise: Literal["on", "off"] = "on"
    # The apps this plant runs (fl_client.app_policy): comma-separated SHA-256 hashes of their FABs
    # (`maxfl app hash APP_DIR` prints one), or "any". Not set: the plant runs no app at all.
    allowed_apps: str | None = None
    # The plant's own audit log (apps it accepted or refused); default $MAXFL_HOME/audit/<plant-id>.jsonl.
    audit_log: Path | None = None

    @field_validator("allowed_apps", mode="before")
    @classmethod
    def _hash_list(cls, value: object) -> object:
        """FAB hashes, 64 hex digits each (case and spaces around commas do not matter), or "any"; empty: none."""
        if isinstance(value, list | tuple):
            value = ",".join(map(str, value))
        if not isinstance(value, str):
            return value
        items = [item.strip().lower() for item in value.split(",") if item.strip()]
        if items == ["any"]:
            return "any"
        for item in items:
            if item == "any":
                raise ValueError('"any" stands alone: it already allows every app')
            if not SHA256_PATTERN.match(item):
                raise ValueError(f"{item[:20]!r} is not a FAB's SHA-256 hash (64 hex digits); `maxfl app hash APP_DIR` prints one")
        return ",".join(dict.fromkeys(items)) or None

    @classmethod
    def from_flower(cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any] | None = None) -> PlantConfig:
        """Deployment: the SuperNode's node config. Simulation: derived from Flower's partition id and the
        run config's `sim-*` keys, which stand in for the node configs of virtual plants."""
        values = dict(node_config)
        if "plant-id" not in values and "partition-id" in values:
            run = run_config or {}
            root = str(run.get("sim-data-root", ""))
            if not root:
                raise ConfigError("simulation needs run config 'sim-data-root' (the folder holding plant-1, plant-2, ...)")
            plant_id = f"plant-{int(values['partition-id']) + 1}"
            values = {"plant-id": plant_id, "data-dir": str(Path(root) / plant_id), "ledger": str(Path(root) / "ledgers" / f"{plant_id}.json"),
                      "edge-store": str(Path(root) / "edge" / plant_id)}
            values |= {key: run[f"sim-{key}"] for key in ("max-epsilon", "delta") if f"sim-{key}" in run}
        return cls.parse(values)

    @classmethod
    def from_node_config(cls, text: str) -> PlantConfig:
        """From the `--node-config` string a plant gives its SuperNode (the plant-side commands take the same)."""
        from flwr.common.config import parse_config_args

        try:
            values = parse_config_args([text])
        except Exception as exc:  # noqa: BLE001 - Flower raises several kinds for a malformed string
            raise ConfigError(f"--node-config {text!r} is not a node config ({exc}); e.g. 'plant-id=\"plant-1\" data-dir=\"/data\"'") from None
        return cls.from_flower(values)

    @classmethod
    def from_context(cls, context: Context) -> PlantConfig:
        return cls.from_flower(context.node_config, context.run_config)

    def ledger_path(self) -> Path:
        return self.ledger or maxfl_home() / "ledgers" / f"{self.plant_id}.json"

    def edge_store_path(self) -> Path:
        return self.edge_store or maxfl_home() / "edge" / self.plant_id

    def audit_log_path(self) -> Path:
        return self.audit_log or maxfl_home() / "audit" / f"{self.plant_id}.jsonl"

    def privacy(self) -> PlantPrivacy:
        from privacy.budget import PlantPrivacy
        from privacy.ledger import Ledger

        ledger = Ledger(self.ledger_path(), self.plant_id, key=self.ledger_key, mirror=self.ledger_mirror)
        return PlantPrivacy(ledger=ledger, max_epsilon=self.max_epsilon, delta=self.delta)

    def as_node_config(self) -> str:
        """The `--node-config` string for `flower-supernode`."""
        parts = [f'plant-id="{self.plant_id}"', f'data-dir="{self.data_dir}"', f"delta={self.delta!r}"]
        if self.max_epsilon is not None:
            parts.append('max-epsilon="inf"' if self.max_epsilon == float("inf") else f"max-epsilon={self.max_epsilon!r}")
        if self.ledger is not None:
            parts.append(f'ledger="{self.ledger}"')
        if self.ledger_key is not None:
            parts.append(f'ledger-key="{self.ledger_key}"')
        if self.ledger_mirror is not None:
            parts.append(f'ledger-mirror="{self.ledger_mirror}"')
        if self.edge_store is not None:
            parts.append(f'edge-store="{self.edge_store}"')
        if self.fault_drill != "none":
            parts += [f'fault-drill="{self.fault_drill}"', f"fault-drill-scale={self.fault_drill_scale!r}"]
        if self.personalise != "on":
            parts.append(f'personalise="{self.personalise}"')
        if self.allowed_apps is not None:
            parts.append(f'allowed-apps="{self.allowed_apps}"')
        if self.audit_log is not None:
            parts.append(f'audit-log="{self.audit_log}"')
        return " ".join(parts)
