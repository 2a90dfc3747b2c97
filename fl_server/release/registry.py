"""The anchor's model registry in MLflow: versions with their lineage and gate result, the `champion` and
`candidate` aliases, the release files of each version, and where each plant's edge store stands."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from maxfl.errors import UserError
from maxfl.release import MANIFEST_FILE, ONNX_FILE, ReleaseManifest, sha256_hex

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

CHAMPION = "champion"
CANDIDATE = "candidate"
RELEASE_DIR = "release"  # run artifacts: model.onnx, weights.npy, release.json
WEIGHTS_FILE = "weights.npy"
GATE_TAG = "maxfl.gate"  # passed | failed | promoted (by hand)
GATE_SUMMARY_TAG = "maxfl.gate.summary"
SHA_TAG = "maxfl.onnx.sha256"
SCHEMA_TAG = "maxfl.schema"  # tasks.base.schema_fingerprint of the data a version was trained on
CHAMPIONS_TAG = "maxfl.champion.history"  # registered-model tag: versions that were champion, oldest first
EDGE_TAG_PREFIX = "maxfl.edge."  # registered-model tag per plant: its EdgeRecord as JSON


class RegistryError(UserError):
    """The registry does not hold what was asked for (no such model or version, a damaged release)."""


class EdgeRecord(BaseModel):
    """Where one plant's edge store stands for this registered model, as last told by the plant."""

    model_config = ConfigDict(frozen=True)

    plant: str
    version: int  # the version pushed (pending: the one waiting for the plant)
    status: Literal["installed", "pending", "refused"]
    at: datetime
    detail: str = ""
    serving: int | None = None  # the version the plant's store has current, as it last reported


class VersionInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: int
    run_id: str
    aliases: list[str]
    gate: str
    gate_summary: str
    created: datetime
    tags: dict[str, str]


class Release(BaseModel):
    """A registered version's release files, read back from its run's artifacts and verified."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    manifest: ReleaseManifest
    onnx: bytes
    weights: np.ndarray


def _info(mv: ModelVersion, aliases: list[str] | None = None) -> VersionInfo:
    tags = dict(mv.tags or {})
    return VersionInfo(
        version=int(mv.version), run_id=mv.run_id or "", aliases=sorted(mv.aliases or aliases or []), gate=tags.get(GATE_TAG, "-"),
        gate_summary=tags.get(GATE_SUMMARY_TAG, ""), created=datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC), tags=tags,
    )


class Registry:
    def __init__(self, tracking_uri: str, name: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.name = name

    # ------------------------------------------------------------------ reading
    def exists(self) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
            return True
        except MlflowException:
            return False

    def _require(self) -> None:
        if not self.exists():
            raise RegistryError(f"no registered model '{self.name}' yet: a training run that finishes registers its first version")

    def versions(self) -> list[VersionInfo]:
        self._require()
        found = self.client.search_model_versions(f"name = '{self.name}'")
        # Searches do not carry aliases on every backend; the registered model has them all.
        aliases: dict[str, list[str]] = {}
        for alias, version in self.client.get_registered_model(self.name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
        return sorted((_info(mv, aliases.get(str(mv.version))) for mv in found), key=lambda v: v.version)

    def version(self, version: int) -> VersionInfo:
        from mlflow.exceptions import MlflowException

        self._require()
        try:
            return _info(self.client.get_model_version(self.name, str(version)))
        except MlflowException:
            known = ", ".join(str(v.version) for v in self.versions()) or "none"
            raise RegistryError(f"'{self.name}' has no version {version} (versions: {known})") from None

    def alias(self, alias: str) -> VersionInfo | None:
        from mlflow.exceptions import MlflowException

        if not self.exists():
            return None
        try:
            return _info(self.client.get_model_version_by_alias(self.name, alias))
        except MlflowException:
            return None

    def champion(self) -> VersionInfo | None:
        return self.alias(CHAMPION)

    def load_release(self, version: int) -> Release:
        """The version's ONNX file, weights and manifest; the ONNX bytes must match the hash registered with it."""
        info = self.version(version)
        with tempfile.TemporaryDirectory(prefix="maxfl-release-") as tmp:
            try:
                local = Path(self.client.download_artifacts(info.run_id, RELEASE_DIR, tmp))
                manifest = ReleaseManifest.model_validate_json((local / MANIFEST_FILE).read_text())
                onnx = (local / ONNX_FILE).read_bytes()
                weights = np.load(local / WEIGHTS_FILE, allow_pickle=False)
            except (OSError, ValueError, ValidationError) as exc:
                raise RegistryError(f"{self.name} v{version}: its release files in run {info.run_id} are missing or unreadable "
                                    f"({type(exc).__name__}); register a new version") from None
        if sha256_hex(onnx) != manifest.sha256 or info.tags.get(SHA_TAG) != manifest.sha256:
            raise RegistryError(f"{self.name} v{version}: the stored ONNX file does not match the hash registered with it; "
                                "the artifact store was altered, register a new version")
        return Release(manifest=manifest, onnx=onnx, weights=weights)

    def edge(self) -> dict[str, EdgeRecord]:
        if not self.exists():
            return {}
        tags = self.client.get_registered_model(self.name).tags
        records = {}
        for key, value in tags.items():
            if key.startswith(EDGE_TAG_PREFIX):
                try:
                    record = EdgeRecord.model_validate_json(value)
                except ValidationError:
                    continue
                records[record.plant] = record
        return dict(sorted(records.items()))

    # ------------------------------------------------------------------ writing
    def register(self, model_uri: str, run_id: str, tags: Mapping[str, str]) -> int:
        if not self.exists():
            self.client.create_registered_model(self.name, description="Released by maxfl: trained federated, gated at every plant.")
        # MLflow 3: a logged model's version is created from its artifact location plus its id.
        model_id = model_uri.removeprefix("models:/")
        source = self.client.get_logged_model(model_id).artifact_location
        mv = self.client.create_model_version(self.name, source=source, run_id=run_id, tags=dict(tags), model_id=model_id)
        return int(mv.version)

    def tag(self, version: int, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, str(version), key, value)

    def _champions(self) -> list[int]:
        raw = self.client.get_registered_model(self.name).tags.get(CHAMPIONS_TAG, "")
        return [int(v) for v in raw.split(",") if v.strip().isdigit()]

    def make_champion(self, version: int) -> int | None:
        """Move `champion` to `version`; returns the version it left."""
        previous = self.champion()
        self.client.set_registered_model_alias(self.name, CHAMPION, str(version))
        history = [v for v in self._champions() if v != version] + [version]
        self.client.set_registered_model_tag(self.name, CHAMPIONS_TAG, ",".join(map(str, history)))
        if (cand := self.alias(CANDIDATE)) is not None and cand.version == version:
            self.client.delete_registered_model_alias(self.name, CANDIDATE)
        return None if previous is None else previous.version

    def make_candidate(self, version: int) -> None:
        self.client.set_registered_model_alias(self.name, CANDIDATE, str(version))

    def promote(self, version: int) -> int | None:
        """By hand: `version` becomes champion whatever its gate said (recorded on the version)."""
        info = self.version(version)
        if CHAMPION in info.aliases:
            raise RegistryError(f"{self.name} v{version} is already the champion")
        if info.gate != "passed":
            self.tag(version, {GATE_TAG: "promoted", GATE_SUMMARY_TAG: f"promoted by hand (gate: {info.gate_summary or info.gate})"})
        return self.make_champion(version)

    def demote(self) -> tuple[int, int | None]:
        """The champion steps down; the champion before it (if any) takes its place. Returns (old, new)."""
        current = self.champion()
        if current is None:
            raise RegistryError(f"'{self.name}' has no champion to demote")
        history = [v for v in self._champions() if v != current.version]
        self.client.set_registered_model_tag(self.name, CHAMPIONS_TAG, ",".join(map(str, history)))
        if history:
            self.client.set_registered_model_alias(self.name, CHAMPION, str(history[-1]))
        else:
            self.client.delete_registered_model_alias(self.name, CHAMPION)
        self.tag(current.version, {GATE_TAG: "demoted"})
        return current.version, (history[-1] if history else None)

    def record_edge(self, records: list[EdgeRecord]) -> None:
        for record in records:
            self.client.set_registered_model_tag(self.name, f"{EDGE_TAG_PREFIX}{record.plant}", record.model_dump_json())


def now() -> datetime:
    return datetime.now(UTC)

