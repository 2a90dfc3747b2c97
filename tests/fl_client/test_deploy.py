"""The plant's deploy handler: verify, install atomically, keep the old model on refusal, tell the anchor."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from edge.store import EdgeStore
from fl_client.client_app import app
from fl_client.config import PlantConfig
from maxfl import onnx_model
from maxfl.messages import ACK, DEPLOY, ONNX, PLANT, RELEASE, DeployAck
from maxfl.release import ReleaseManifest, sha256_hex



@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 3, 1


@pytest.fixture(scope="module")
def onnx_versions() -> list[bytes]:
    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        out.append(onnx_model.export(torch.nn.Linear(4, 2), np.zeros((2, 4), np.float32)))
    return out


def manifest(onnx: bytes, version: int, **changes) -> ReleaseManifest:
    values = dict(model_name="maxfl-table", version=version, task="table", task_spec='{"task": "table", "num_classes": 2}', sha256=sha256_hex(onnx), size_bytes=len(onnx),
                  input_name=onnx_model.INPUT_NAME, output_name=onnx_model.OUTPUT_NAME, mlflow_run_id="run", flwr_run_id=7,
                  created_at=datetime.now(UTC))
    return ReleaseManifest(**(values | changes))


@pytest.fixture
def plant(tmp_path) -> PlantConfig:
    return PlantConfig(plant_id="plant-2", data_dir=tmp_path / "data", edge_store=tmp_path / "edge")


def deploy(plant: PlantConfig, release: ReleaseManifest, payload: bytes, targets: str = "") -> tuple[DeployAck, str]:
    from flwr.common.config import parse_config_args

    node_config = parse_config_args([plant.as_node_config()])
    context = Context(run_id=7, node_id=3, node_config=node_config, state=RecordDict(), run_config={})
    content = RecordDict({RELEASE: ConfigRecord({"manifest": release.model_dump_json(), "targets": targets}),
                          ONNX: ConfigRecord({"model": payload})})
    msg = Message(content=content, dst_node_id=3, message_type=f"query.{DEPLOY}")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    reply = app(msg, context)
    assert not reply.has_error(), reply.error
    return DeployAck.parse(reply.content[ACK]), str(reply.content[PLANT]["plant-id"])


def test_a_verified_model_is_installed_and_acknowledged(plant, onnx_versions):
    ack, who = deploy(plant, manifest(onnx_versions[0], 1), onnx_versions[0])
    assert (ack.status, ack.version, ack.serving, who) == ("installed", 1, 1, "plant-2")
    current = EdgeStore(plant.edge_store_path()).current("maxfl-table")
    assert current is not None and current.manifest.version == 1 and current.path.read_bytes() == onnx_versions[0]


@pytest.mark.parametrize("damage", ["hash", "truncated", "not-onnx"])
def test_a_damaged_model_is_refused_and_the_previous_one_keeps_serving(plant, onnx_versions, damage):
    deploy(plant, manifest(onnx_versions[0], 1), onnx_versions[0])
    good = onnx_versions[1]
    if damage == "hash":
        release, payload = manifest(good, 2), good[:-1] + bytes([good[-1] ^ 1])
    elif damage == "truncated":
        release, payload = manifest(good, 2), good[: len(good) // 2]
    else:  # the anchor's own hash of bytes that are no ONNX model
        payload = b"\x00" * 64
        release = manifest(payload, 2)
    ack, _ = deploy(plant, release, payload)
    assert ack.status == "refused" and ack.serving == 1 and ack.detail
    assert "\n" not in ack.detail
    store = EdgeStore(plant.edge_store_path())
    assert store.current("maxfl-table").manifest.version == 1
    assert [v.manifest.version for v in store.versions("maxfl-table")] == [1]


def test_a_plant_not_targeted_leaves_its_store_alone(plant, onnx_versions):
    ack, _ = deploy(plant, manifest(onnx_versions[0], 1), onnx_versions[0], targets="plant-1,plant-3")
    assert ack.status == "not-targeted" and ack.serving == 0
    assert EdgeStore(plant.edge_store_path()).current("maxfl-table") is None


def test_pushing_an_installed_version_again_makes_it_current(plant, onnx_versions):
    deploy(plant, manifest(onnx_versions[0], 1), onnx_versions[0])
    deploy(plant, manifest(onnx_versions[1], 2), onnx_versions[1])
    ack, _ = deploy(plant, manifest(onnx_versions[0], 1), onnx_versions[0])  # the anchor rolls this plant back
    assert ack.status == "activated" and ack.serving == 1


def test_a_damaged_store_refuses_with_its_reason_instead_of_failing(plant, onnx_versions):
    deploy(plant, manifest(onnx_versions[0], 1), onnx_versions[0])
    pointer = EdgeStore(plant.edge_store_path()).pointer("maxfl-table")
    pointer.write_text("{ not json")
    ack, _ = deploy(plant, manifest(onnx_versions[1], 2), onnx_versions[1])
    assert ack.status == "refused" and "current.json" in ack.detail and ack.serving == 0
    assert pointer.read_text() == "{ not json"  # never overwritten silently


@pytest.fixture(scope="module")
def defect_release(tmp_path_factory: pytest.TempPathFactory):
    """A real defect plant (60 cells) and an approved global model that always answers "good"."""
    from tasks import get_task
    from tasks.base import TaskOptions

    root = tmp_path_factory.mktemp("personalise")
    task = get_task("defect")
    (data_dir,) = task.prepare_plants(1, root, seed=5, limit=60)
    spec = task.make_spec({"plant-1": task.profile(data_dir, 42)}, TaskOptions(model="effnet-lite0"))
    head = task.build_model(spec)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.net[-1].bias[0] = 5.0
    from maxfl.weights import pack

    onnx = onnx_model.export(task.deployable(spec, head), task.input_example(spec), dynamo=False)
    release = manifest(onnx, 1, model_name="maxfl-defect", task="defect", task_spec=spec.model_dump_json(), seed=42)
    return data_dir, release, onnx, pack(head)


def deploy_with_weights(plant: PlantConfig, release: ReleaseManifest, payload: bytes, weights) -> DeployAck:  # type: ignore[no-untyped-def]
    from flwr.common.config import parse_config_args

    from maxfl.messages import ARRAYS

    context = Context(run_id=7, node_id=3, node_config=parse_config_args([plant.as_node_config()]), state=RecordDict(), run_config={})
    content = RecordDict({RELEASE: ConfigRecord({"manifest": release.model_dump_json(), "targets": ""}),
                          ONNX: ConfigRecord({"model": payload}), ARRAYS: weights})
    msg = Message(content=content, dst_node_id=3, message_type=f"query.{DEPLOY}")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    reply = app(msg, context)
    assert not reply.has_error(), reply.error
    return DeployAck.parse(reply.content[ACK])


def test_a_plant_serves_its_own_variant_when_the_global_model_is_useless_and_spends_nothing(defect_release, tmp_path, monkeypatch):
    monkeypatch.setenv("MAXFL_CACHE_DIR", str(tmp_path / "cache"))
    data_dir, release, onnx, weights = defect_release
    ledger = tmp_path / "ledger.json"
    plant = PlantConfig(plant_id="plant-1", data_dir=data_dir, edge_store=tmp_path / "edge", ledger=ledger)
    ack = deploy_with_weights(plant, release, onnx, weights)
    assert ack.status == "installed" and ack.serving == 1
    assert ack.variant in ("personalised", "local"), ack.detail
    current = EdgeStore(tmp_path / "edge").current("maxfl-defect")
    assert current is not None and current.variant == ack.variant
    session = onnx_model.session(EdgeStore(tmp_path / "edge").verified_bytes(current))
    assert onnx_model.run(session, np.zeros((3, 1, 160, 160), np.float32)).shape == (3, 2)
    assert not ledger.exists() and not list(tmp_path.glob("ledger*"))  # personalisation is not DP training: no ledger entry


def test_a_variant_that_cannot_be_exported_leaves_the_global_model_serving(defect_release, tmp_path, monkeypatch):
    monkeypatch.setenv("MAXFL_CACHE_DIR", str(tmp_path / "cache"))
    data_dir, release, onnx, weights = defect_release

    def broken_export(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(onnx_model, "export", broken_export)
    plant = PlantConfig(plant_id="plant-1", data_dir=data_dir, edge_store=tmp_path / "edge")
    ack = deploy_with_weights(plant, release, onnx, weights)
    assert ack.status == "installed" and ack.variant == "global"
    assert "personalisation failed: exporter crashed" in ack.detail
    current = EdgeStore(tmp_path / "edge").current("maxfl-defect")
    assert current is not None and current.variant == "global"
