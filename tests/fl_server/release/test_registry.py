"""The registry on a real MLflow store: versions, aliases, promote/demote, release files, edge records."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_server.run.config import RunConfig
from fl_server.release.registry import CANDIDATE, CHAMPION, GATE_TAG, SHA_TAG, EdgeRecord, Registry, RegistryError
from fl_server.run.tracking import tracked_run
from maxfl import onnx_model
from maxfl.release import ReleaseManifest, sha256_hex
from maxfl.weights import pack

NAME = "maxfl-table"


def _release(uri: str, version_hint: int, registry: Registry, passed: bool) -> int:
    """One tracked run that logs a model and its release files and registers it, as the ServerApp does."""
    cfg = RunConfig(task="table", tracking_uri=uri, experiment_name="registry-test")
    model = torch.nn.Linear(4, 2)
    example = np.zeros((2, 4), np.float32)
    with tracked_run(cfg, flwr_run_id=version_hint, fab_hash="fab") as tracker:
        model_uri = tracker.log_model(model, example)
        onnx = onnx_model.export(model, example)
        version = registry.register(model_uri, tracker.run_id, {SHA_TAG: sha256_hex(onnx), GATE_TAG: "passed" if passed else "failed"})
        manifest = ReleaseManifest(model_name=NAME, version=version, task="table", task_spec="{}", sha256=sha256_hex(onnx), size_bytes=len(onnx),
                                   input_name="input", output_name="logits", mlflow_run_id=tracker.run_id, flwr_run_id=version_hint,
                                   created_at=datetime.now(UTC))
        tracker.log_release(manifest, onnx, pack(model).to_numpy_ndarrays()[0])
    (registry.make_champion if passed else registry.make_candidate)(version)
    return version


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def registry(request, tmp_path_factory) -> Registry:
    """The same registry on MLflow's SQLite store and on PostgreSQL (the production store); artifacts in a folder."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_database")()
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("registry-test", artifact_location=str(root / "artifacts"))
    reg = Registry(uri, NAME)
    assert not reg.exists() and reg.champion() is None and reg.edge() == {}
    with pytest.raises(RegistryError, match="no registered model 'maxfl-table' yet"):
        reg.versions()
    for hint, passed in ((1, True), (2, True), (3, False)):
        _release(uri, hint, reg, passed)
    return reg


def test_aliases_follow_the_gate(registry):
    assert [(v.version, v.aliases, v.gate) for v in registry.versions()] == [
        (1, [], "passed"), (2, [CHAMPION], "passed"), (3, [CANDIDATE], "failed"),
    ]


def test_release_files_come_back_verified(registry):
    release = registry.load_release(2)
    assert release.manifest.version == 2 and sha256_hex(release.onnx) == release.manifest.sha256
    assert release.weights.shape == (10,)  # Linear(4, 2): 8 weights + 2 biases, packed


def test_a_tampered_release_file_is_refused(registry):
    info = registry.version(1)
    # the artifact store is a folder here: alter the stored file in place
    target = Path(registry.client.get_run(info.run_id).info.artifact_uri.removeprefix("file://")) / "release" / "model.onnx"
    original = target.read_bytes()
    try:
        target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(RegistryError, match="does not match the hash registered with it"):
            registry.load_release(1)
    finally:
        target.write_bytes(original)
    assert registry.load_release(1).manifest.version == 1


def test_unknown_version_names_the_known_ones(registry):
    with pytest.raises(RegistryError, match=r"has no version 9 \(versions: 1, 2, 3\)"):
        registry.version(9)


def test_promote_by_hand_then_demote_returns_the_previous_champion(registry):
    assert registry.promote(3) == 2
    info = registry.version(3)
    assert CHAMPION in info.aliases and info.gate == "promoted" and "promoted by hand" in info.gate_summary
    assert registry.alias(CANDIDATE) is None  # the candidate became champion
    assert registry.demote() == (3, 2)
    assert registry.champion().version == 2 and registry.version(3).gate == "demoted"
    with pytest.raises(RegistryError, match="already the champion"):
        registry.promote(2)


def test_edge_records_round_trip(registry):
    at = datetime.now(UTC)
    registry.record_edge([EdgeRecord(plant="plant-1", version=2, status="installed", at=at, serving=2),
                          EdgeRecord(plant="plant-2", version=2, status="pending", at=at, detail="offline")])
    registry.record_edge([EdgeRecord(plant="plant-2", version=2, status="installed", at=at, serving=2)])
    edge = registry.edge()
    assert list(edge) == ["plant-1", "plant-2"] and edge["plant-2"].status == "installed"
