"""The defect pipeline on real ELPV images (a small subsample of each plant)."""

import os

import numpy as np
import pytest
import torch

from maxfl.errors import ConfigError, DataError
from tasks import get_task, task_names
from tasks.base import DataProfile, SchemaMismatch, TaskOptions, TrainSettings
from tasks.defect import DefectSpec
from tasks.defect.data import SHARD_FILE

SPEC = DefectSpec(task="defect", model="cnn", num_classes=2)


@pytest.fixture(scope="module")
def plant_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plants")
    return get_task("defect").prepare_plants(2, root, seed=42, limit=60)


def test_registry_knows_defect_and_rejects_unknown_tasks():
    assert "defect" in task_names()
    with pytest.raises(KeyError, match="defect"):
        get_task("welding")


def test_plant_data_is_preprocessed_split_and_fingerprinted(plant_dirs):
    data = get_task("defect").load_plant_data(plant_dirs[0], 42, SPEC)
    assert data.x_train.shape[1:] == (1, 64, 64) and data.x_train.dtype == torch.float32
    assert len(data.y_train) + len(data.y_test) == 60
    assert set(data.y_train.unique().tolist()) <= {0, 1}
    assert len(data.fingerprint) == 64
    other = get_task("defect").load_plant_data(plant_dirs[1], 42, SPEC)
    assert other.fingerprint != data.fingerprint


def test_one_round_of_local_training_changes_the_weights_and_reports_metrics(plant_dirs):
    task = get_task("defect")
    data = task.load_plant_data(plant_dirs[0], 42, SPEC)
    torch.manual_seed(0)
    model = task.build_model(SPEC)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = task.train(model, data, TrainSettings(epochs=1, batch_size=16, learning_rate=0.05, seed=1), SPEC)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert np.isfinite(metrics["train_loss"]) and 0 <= metrics["train_accuracy"] <= 1
    result = task.evaluate(model, data, SPEC)
    assert 0 <= result["eval_auroc"] <= 1
    assert 0 <= result["eval_macro_f1"] <= 1 and 0 <= result["eval_accuracy"] <= 1


def test_missing_data_location_is_a_data_error_naming_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        get_task("defect").load_plant_data(tmp_path, 0, SPEC)


def test_corrupt_shard_is_a_data_error_not_a_crash(tmp_path):
    (tmp_path / SHARD_FILE).write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="not a readable defect shard"):
        get_task("defect").load_plant_data(tmp_path, 0, SPEC)


def test_shard_without_images_is_rejected(tmp_path):
    with open(tmp_path / SHARD_FILE, "wb") as fh:
        np.savez(fh, images=np.zeros((0, 8, 8), np.uint8), defect_proba=np.zeros(0, np.float32))
    with pytest.raises(DataError, match="no images"):
        get_task("defect").load_plant_data(tmp_path, 0, SPEC)


def test_replaced_shard_is_not_served_from_the_cache(plant_dirs, tmp_path):
    task = get_task("defect")
    shard = tmp_path / SHARD_FILE
    shard.write_bytes((plant_dirs[0] / SHARD_FILE).read_bytes())
    first = task.load_plant_data(tmp_path, 0, SPEC)
    shard.write_bytes((plant_dirs[1] / SHARD_FILE).read_bytes())
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    second = task.load_plant_data(tmp_path, 0, SPEC)
    assert first.fingerprint != second.fingerprint


def test_plants_profile_their_data_and_the_anchor_merges_a_spec(plant_dirs):
    task = get_task("defect")
    profiles = {f"plant-{k}": task.profile(d, 42) for k, d in enumerate(plant_dirs[:2], start=1)}
    assert all(p.examples > 0 and sum(p.class_counts.values()) == p.examples for p in profiles.values())
    spec = task.make_spec(profiles, TaskOptions(model="cnn"))
    assert spec == SPEC


def test_a_plant_with_data_for_another_task_is_named_before_training(plant_dirs):
    task = get_task("defect")
    profiles = {"plant-1": task.profile(plant_dirs[0], 42), "plant-2": DataProfile(task="table", fingerprint="x", examples=3)}
    with pytest.raises(SchemaMismatch) as err:
        task.make_spec(profiles, TaskOptions())
    assert list(err.value.problems) == ["plant-2"] and "table" in str(err.value)


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="no model 'resnet'"):
        get_task("defect").make_spec({}, TaskOptions(model="resnet"))
