"""The images task on small real PNG folders and the ELPV demo: validation, spec, cache, training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from maxfl.errors import DataError
from tasks.base import SchemaMismatch, TaskOptions, TrainSettings
from tasks.classification import class_weights, predict_logits
from tasks.images import TASK, ImagesSpec
from tasks.manifest import MANIFEST_FILE


def save_image(path: Path, mode: str = "L", size: tuple[int, int] = (16, 12), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def write_plant(
    data_dir: Path, classes: dict[str, int] | None = None, mode: str = "L", size: tuple[int, int] = (16, 12), seed: int = 0
) -> Path:
    for c, n in (classes or {"ok": 5, "scratch": 5}).items():
        for i in range(n):
            save_image(data_dir / "images" / c / f"{i}.png", mode, size, seed=seed + 100 * i + len(c))
    (data_dir / MANIFEST_FILE).write_text(f'kind = "images"\npath = "images"\nimage-mode = "{mode}"\nimage-size = [{size[0]}, {size[1]}]\n')
    return data_dir


def spec_for(*dirs: Path, image_size: int = 16) -> ImagesSpec:
    spec = TASK.make_spec({d.name: TASK.profile(d, 0) for d in dirs}, TaskOptions(model="cnn", image_size=image_size))
    assert isinstance(spec, ImagesSpec)
    return spec


# ---- bad input: one line naming the file -----------------------------------------------------------------------


def expect_error(data_dir: Path, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern) as info:
        TASK.profile(data_dir, seed=0)
    assert "\n" not in str(info.value)


def test_bytes_that_are_not_an_image(tmp_path: Path) -> None:
    bad = write_plant(tmp_path) / "images" / "ok" / "notes.png"
    bad.write_bytes(b"inspection notes, not pixels")
    expect_error(tmp_path, rf"{bad} is not a readable image \(cannot identify image file")


def test_truncated_image(tmp_path: Path) -> None:
    bad = write_plant(tmp_path) / "images" / "scratch" / "3.png"
    bad.write_bytes(bad.read_bytes()[:-40])
    expect_error(tmp_path, rf"{bad} is not a readable image \(")


def test_stray_non_image_file_in_a_class_folder(tmp_path: Path) -> None:
    stray = write_plant(tmp_path) / "images" / "ok" / "README.txt"
    stray.write_text("taken on line 3")
    expect_error(tmp_path, rf"{stray} is not a readable image")


def test_image_of_another_mode_names_both_modes(tmp_path: Path) -> None:
    bad = save_image(write_plant(tmp_path) / "images" / "ok" / "colour.png", mode="RGB")
    expect_error(tmp_path, rf"{bad} is RGB 16x12, but manifest.toml says image-mode L and image-size 16x12")


def test_image_of_another_size_names_both_sizes(tmp_path: Path) -> None:
    bad = save_image(write_plant(tmp_path) / "images" / "ok" / "big.png", size=(32, 32))
    expect_error(tmp_path, rf"{bad} is L 32x32, but manifest.toml says image-mode L and image-size 16x12")


def test_empty_class_folder(tmp_path: Path) -> None:
    (write_plant(tmp_path) / "images" / "dent").mkdir()
    expect_error(tmp_path, rf"class folder {tmp_path / 'images' / 'dent'} holds no images")


def test_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / MANIFEST_FILE).write_text('kind = "images"\npath = "images"\nimage-mode = "L"\nimage-size = [8, 8]\n')
    expect_error(tmp_path, rf"{tmp_path / 'images'} has no class folders")


def test_stray_file_beside_the_class_folders(tmp_path: Path) -> None:
    stray = save_image(write_plant(tmp_path) / "images" / "loose.png")
    expect_error(tmp_path, rf"{stray} is a stray file beside the class folders")


def test_folder_inside_a_class_folder(tmp_path: Path) -> None:
    save_image(write_plant(tmp_path) / "images" / "ok" / "old" / "1.png")
    expect_error(tmp_path, rf"{tmp_path / 'images' / 'ok' / 'old'} is a folder inside class folder 'ok'")


def test_hidden_files_are_ignored(tmp_path: Path) -> None:
    write_plant(tmp_path)
    (tmp_path / "images" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "images" / "ok" / "._0.png").write_bytes(b"AppleDouble")
    assert TASK.profile(tmp_path, seed=0).examples == 8


# ---- profile -> spec -> plant data ---------------------------------------------------------------------------


def test_round_trip_with_the_union_of_classes(tmp_path: Path) -> None:
    a = write_plant(tmp_path / "a")
    b = write_plant(tmp_path / "b", {"ok": 4, "dent": 3, "scratch": 3}, seed=7)
    pa, pb = TASK.profile(a, 0), TASK.profile(b, 0)
    assert pa.schema_ == {"image-mode": "L", "image-size": "16x12"} == pb.schema_
    assert pa.class_counts == {"ok": 4, "scratch": 4} and pb.examples == 7  # training split only
    spec = TASK.make_spec({"a": pa, "b": pb}, TaskOptions(model="cnn", image_size=24))
    assert isinstance(spec, ImagesSpec)
    assert (spec.classes, spec.channels, spec.image_size, spec.num_classes, spec.model) == (("dent", "ok", "scratch"), 1, 24, 3, "cnn")
    data = TASK.load_plant_data(a, 0, spec)
    assert data.x_train.shape == (8, 1, 24, 24) and data.x_test.shape == (2, 1, 24, 24) and data.fingerprint == pa.fingerprint
    assert set(data.y_train.tolist()) == {1, 2}  # ok, scratch by the spec's order
    flat = data.x_train.flatten(1)
    assert torch.allclose(flat.mean(1), torch.zeros(8), atol=1e-5) and torch.allclose(flat.std(1), torch.ones(8), atol=1e-3)
    model = TASK.build_model(spec)
    assert model(torch.from_numpy(TASK.input_example(spec))).shape == (2, 3)


def test_rgb_images_give_three_channels(tmp_path: Path) -> None:
    spec = spec_for(write_plant(tmp_path / "a", mode="RGB"), write_plant(tmp_path / "b", mode="RGB", seed=3))
    assert spec.channels == 3
    data = TASK.load_plant_data(tmp_path / "a", 0, spec)
    assert data.x_train.shape == (8, 3, 16, 16)
    assert TASK.build_model(spec)(data.x_train).shape == (8, 2)


def test_schema_mismatch_names_the_deviating_plant(tmp_path: Path) -> None:
    dirs = [write_plant(tmp_path / "a"), write_plant(tmp_path / "b", size=(20, 20)), write_plant(tmp_path / "c", seed=5)]
    with pytest.raises(SchemaMismatch) as info:
        spec_for(*dirs)
    assert list(info.value.problems) == ["b"] and "image-size is '20x20'" in info.value.problems["b"][0]


def test_unknown_class_at_a_plant_names_the_folder(tmp_path: Path) -> None:
    spec = spec_for(write_plant(tmp_path / "a"))
    write_plant(tmp_path / "b", {"ok": 3, "crack": 3})
    with pytest.raises(DataError, match=rf"class folder {tmp_path / 'b' / 'images' / 'crack'} is not one of the federation's classes \(ok, scratch\)"):
        TASK.load_plant_data(tmp_path / "b", 0, spec)


def test_preprocessed_tensors_are_cached_by_fingerprint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = spec_for(write_plant(tmp_path))
    first = TASK.load_plant_data(tmp_path, 0, spec)
    cache = list((tmp_path / ".cache").glob("*.pt"))
    assert len(cache) == 1 and first.fingerprint in cache[0].name
    monkeypatch.setattr("tasks.images.read_folder", lambda *_: pytest.fail("decoded again despite the cache"))
    assert torch.equal(TASK.load_plant_data(tmp_path, 0, spec).x_train, first.x_train)
    monkeypatch.undo()
    save_image(tmp_path / "images" / "ok" / "0.png", seed=99)  # a changed image: a new fingerprint, a new entry
    second = TASK.load_plant_data(tmp_path, 0, spec)
    assert second.fingerprint != first.fingerprint and [p.name for p in (tmp_path / ".cache").glob("*.pt")] == [f"images-v1-16-{second.fingerprint}.pt"]


def test_read_only_data_location_works_without_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = spec_for(write_plant(tmp_path))

    def read_only(path: Path) -> None:
        raise PermissionError(13, "Read-only file system", str(path))

    monkeypatch.setattr("tasks.images.cache.atomic_path", read_only)
    assert len(TASK.load_plant_data(tmp_path, 0, spec).y_train) == 8
    assert not list(tmp_path.glob(".cache/*.pt"))


# ---- the ELPV demo -------------------------------------------------------------------------------------------


def test_demo_plants_are_elpv_image_folders_and_training_lowers_the_loss(tmp_path: Path) -> None:
    dirs = TASK.prepare_plants(2, tmp_path, seed=42, limit=120)
    for d in dirs:
        folders = sorted(p.name for p in (d / "images").iterdir())
        assert set(folders) <= {"good", "minor", "defective"} and "good" in folders
        assert sum(1 for _ in (d / "images").rglob("*.png")) == 120
    with Image.open(next((dirs[0] / "images" / "good").iterdir())) as img:
        assert (img.mode, img.size) == ("L", (96, 96))
    profiles = {d.name: TASK.profile(d, 42) for d in dirs}
    assert profiles["plant-1"].fingerprint != profiles["plant-2"].fingerprint
    spec = TASK.make_spec(profiles, TaskOptions(image_size=32))
    data = TASK.load_plant_data(dirs[0], 42, spec)
    torch.manual_seed(0)
    model = TASK.build_model(spec)

    weights = class_weights(data.y_train, spec.num_classes)  # the loss training minimises: rare classes weigh more

    def train_loss() -> float:
        return F.cross_entropy(predict_logits(model, data.x_train), data.y_train, weight=weights).item()

    before = train_loss()
    metrics = TASK.train(model, data, TrainSettings(epochs=40, batch_size=16, learning_rate=0.01, seed=0), spec)
    assert train_loss() < 0.9 * before and np.isfinite(metrics["train_loss"])
    assert 0 <= TASK.evaluate(model, data, spec)["eval_accuracy"] <= 1
