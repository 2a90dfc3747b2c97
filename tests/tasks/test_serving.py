"""Serving adapters: a request built from a plant's own data must give the very tensors training used (no
train/serve skew), and bad requests must be a BadInput naming the instance, never a model input."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tasks import get_task
from tasks.base import BadInput, TaskOptions
from tasks.defect import DefectSpec
from tasks.defect.data import SHARD_FILE
from tasks.images import ImagesSpec
from tasks.manifest import MANIFEST_FILE, Manifest, dump_manifest, load_manifest
from tasks.process.simulate import load_recording
from tasks.process.task import RECORDING_FILE, ProcessSpec, detection_metrics
from tasks.process.windows import normal_statistics, windows
from tasks.table import TableSpec
from tasks.table.encode import encode_features, encode_target
from tasks.table.read import read_table
from tasks.table.spec import MISSING, UNKNOWN


def image_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def same_records(served: np.ndarray, trained: torch.Tensor) -> None:
    """Every training record is one of the served inputs and vice versa (a permutation; the split reorders)."""
    flat_served = torch.from_numpy(served).flatten(1).double()
    flat_trained = trained.flatten(1).double()
    match = torch.cdist(flat_trained, flat_served).argmin(1)
    assert sorted(match.tolist()) == list(range(len(served)))
    np.testing.assert_allclose(served[match.numpy()], trained.numpy(), rtol=1e-5, atol=1e-5)


# ---- defect ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def defect_plant(tmp_path_factory) -> Path:
    return get_task("defect").prepare_plants(1, tmp_path_factory.mktemp("defect"), 42, limit=40)[0]


def test_defect_requests_from_the_shard_give_the_training_tensors(defect_plant):
    task = get_task("defect")
    spec = DefectSpec(task="defect", model="cnn", num_classes=2)
    with np.load(defect_plant / SHARD_FILE) as npz:
        images = npz["images"]
    serving = task.serving(spec, defect_plant)
    assert serving.kind == "image"
    served = serving.batch([image_bytes(img) for img in images])
    assert served.dtype == np.float32 and served.shape == (len(images), 1, 64, 64)
    data = task.load_plant_data(defect_plant, 42, spec)
    same_records(served, torch.cat([data.x_train, data.x_test]))


def test_defect_takes_any_format_size_and_colour_and_answers_with_probabilities(defect_plant):
    serving = get_task("defect").serving(DefectSpec(task="defect", model="cnn", num_classes=2), defect_plant)
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (90, 120), dtype=np.uint8)
    colour = rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)
    files = [image_bytes(grey, "JPEG"), image_bytes(grey, "TIFF"), image_bytes(colour, "BMP"), image_bytes(colour, "PNG")]
    assert serving.batch(files).shape == (4, 1, 64, 64)
    answers = serving.answers(np.array([[2.0, 0.0], [-1.0, 3.0]], dtype=np.float32))
    assert [a["label"] for a in answers] == ["good", "defective"]
    assert answers[0]["probabilities"]["good"] == pytest.approx(1 / (1 + math.exp(-2)))
    assert sum(answers[1]["probabilities"].values()) == pytest.approx(1.0)


def test_defect_names_the_instance_that_is_not_a_readable_image(defect_plant):
    serving = get_task("defect").serving(DefectSpec(task="defect", model="cnn", num_classes=2), defect_plant)
    png = image_bytes(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(BadInput, match=r"^instance 1 is not a readable image \("):
        serving.batch([png, b"hello, not an image"])
    with pytest.raises(BadInput, match=r"^instance 0 is not a readable image \("):
        serving.batch([png[: len(png) // 2]])  # truncated
    with pytest.raises(BadInput, match="instance 0 is not an image file's bytes"):
        serving.batch(["a path.png"])
    with pytest.raises(BadInput, match="no instances"):
        serving.batch([])


# ---- images ----------------------------------------------------------------------------------------------


def write_image_plant(data_dir: Path, mode: str, size: tuple[int, int] = (20, 14)) -> Path:
    rng = np.random.default_rng(len(mode))
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    for c in ("ok", "scratch"):
        (data_dir / "images" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(data_dir / "images" / c / f"{i}.png")
    (data_dir / MANIFEST_FILE).write_text(f'kind = "images"\npath = "images"\nimage-mode = "{mode}"\nimage-size = [{size[0]}, {size[1]}]\n')
    return data_dir


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_images_requests_from_the_folder_give_the_training_tensors(tmp_path, mode):
    task = get_task("images")
    plant = write_image_plant(tmp_path / "plant", mode)
    spec = task.make_spec({"p": task.profile(plant, 0)}, TaskOptions(model="cnn", image_size=16))
    assert isinstance(spec, ImagesSpec)
    serving = task.serving(spec, plant)
    files = sorted((plant / "images").rglob("*.png"))
    served = serving.batch([f.read_bytes() for f in files])
    assert served.shape == (10, spec.channels, 16, 16) and served.dtype == np.float32
    data = task.load_plant_data(plant, 0, spec)
    same_records(served, torch.cat([data.x_train, data.x_test]))
    # other sizes and modes are converted to the federation's, not refused
    other = np.random.default_rng(1).integers(0, 256, (33, 21, 3), dtype=np.uint8)
    assert serving.batch([image_bytes(other, "JPEG")]).shape == (1, spec.channels, 16, 16)
    answers = serving.answers(np.array([[0.0, 1.0]], dtype=np.float32))
    assert answers[0]["label"] == "scratch" and set(answers[0]["probabilities"]) == {"ok", "scratch"}
    with pytest.raises(BadInput, match=r"instance 0 is not a readable image"):
        serving.batch([b"GIF89a but not really"])


# ---- process ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def process_plants(tmp_path_factory) -> list[Path]:
    # the same plants as test_process_task: their recordings are cached, not simulated again
    return get_task("process").prepare_plants(2, tmp_path_factory.mktemp("process"), seed=42, limit=120)


@pytest.fixture(scope="module")
def process_spec(process_plants) -> ProcessSpec:
    task = get_task("process")
    spec = task.make_spec({f"plant-{k}": task.profile(d, 42) for k, d in enumerate(process_plants, start=1)}, TaskOptions())
    assert isinstance(spec, ProcessSpec)
    return spec


def test_process_windows_from_the_recording_give_the_training_windows(process_plants, process_spec):
    task, plant, w = get_task("process"), process_plants[1], process_spec.window
    serving = task.serving(process_spec, plant)
    assert serving.kind == "window"
    rec = load_recording(plant / RECORDING_FILE)
    expected, labels, _ = windows(rec.train, *normal_statistics(rec.train), w)
    x = rec.train.x
    # [time step][variable] lists, as a historian would send them: the first window and the last (a faulty one)
    request = [x[:w].tolist(), x[-w:].tolist()]
    served = serving.batch(request)
    assert served.dtype == np.float32 and served.shape == (2, process_spec.variables, w)
    np.testing.assert_array_equal(served, expected[[0, -1]].numpy())
    assert labels[-1] != 0  # the last window is a fault: serving must not normalise by the request's own values
    data = task.load_plant_data(plant, 42, process_spec)
    np.testing.assert_array_equal(served, data.x_train[[0, -1]].numpy())


def test_process_answers_apply_the_alarm_rule_of_the_detection_metrics(process_plants, process_spec):
    serving = get_task("process").serving(process_spec, process_plants[0])
    k = process_spec.num_classes
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (64, k)).astype(np.float32)
    answers = serving.answers(logits)
    proba = torch.from_numpy(logits).softmax(1)
    alarms = [a["alarm"] for a in answers]
    assert alarms == (proba[:, 0] < process_spec.alarm_below).tolist()
    # the same rule as evaluation: with every window labelled normal, the false alarm rate is the alarm share
    metrics = detection_metrics(proba, torch.zeros(64, dtype=torch.long), process_spec)
    assert metrics["eval_false_alarm_rate"] == pytest.approx(sum(alarms) / 64)
    idv = process_spec.classes[1]
    top = serving.answers(np.eye(k, dtype=np.float32)[[0, 1]] * 10)
    assert top[0]["label"] == "normal" and top[0]["fault"] == 0 and top[0]["alarm"] is False
    assert top[1]["label"] == f"IDV{idv:02d}" and top[1]["fault"] == idv and top[1]["alarm"] is True
    assert list(top[1]["probabilities"]) == ["normal", *(f"IDV{c:02d}" for c in process_spec.classes[1:])]


def test_process_rejects_windows_of_the_wrong_shape_or_with_non_numbers(process_plants, process_spec):
    serving = get_task("process").serving(process_spec, process_plants[0])
    w, v = process_spec.window, process_spec.variables
    good = np.zeros((w, v)).tolist()
    with pytest.raises(BadInput, match=rf"instance 1 has shape {w - 1}x{v}; expected {w} time steps x {v} variables"):
        serving.batch([good, good[1:]])
    with pytest.raises(BadInput, match=rf"instance 0 has shape {v}x{w}; expected"):
        serving.batch([np.zeros((v, w)).tolist()])  # transposed
    with pytest.raises(BadInput, match="instance 0 is not a rectangular window"):
        serving.batch([[*good[:-1], good[-1][:-1]]])
    strings = [row[:] for row in good]
    strings[3][7] = "12.5"
    with pytest.raises(BadInput, match="instance 0 holds non-numeric values"):
        serving.batch([strings])
    nulls = [row[:] for row in good]
    nulls[0][0] = None
    with pytest.raises(BadInput, match="instance 0 holds non-numeric values"):
        serving.batch([nulls])
    nans = [row[:] for row in good]
    nans[5][5] = float("nan")
    with pytest.raises(BadInput, match="instance 2 holds non-finite values"):
        serving.batch([good, good, nans])


# ---- table -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table_plants(tmp_path_factory) -> list[Path]:
    return get_task("table").prepare_plants(2, tmp_path_factory.mktemp("table"), 42, limit=60)  # a CSV and a Parquet plant


@pytest.fixture(scope="module")
def table_spec(table_plants) -> TableSpec:
    task = get_task("table")
    spec = task.make_spec({p.name: task.profile(p, 42) for p in table_plants}, TaskOptions())
    assert isinstance(spec, TableSpec)
    return spec


def table_rows(plant: Path, typed: bool) -> list[dict[str, object]]:
    """The plant's rows as a client would send them: CSV text cells, or typed values (NaN/None where missing)."""
    file = next(plant.glob("quality.*"))
    if file.suffix == ".csv" and not typed:
        with open(file, newline="") as fh:
            return list(csv.DictReader(fh))
    frame = pd.read_csv(file) if file.suffix == ".csv" else pd.read_parquet(file)
    return frame.to_dict("records")


@pytest.mark.parametrize(("plant_index", "typed"), [(0, False), (0, True), (1, True)], ids=["csv-text", "csv-typed", "parquet"])
def test_table_rows_from_the_plant_give_the_training_rows(table_plants, table_spec, plant_index, typed):
    task, plant = get_task("table"), table_plants[plant_index]
    serving = task.serving(table_spec, plant)
    assert serving.kind == "row"
    rows = table_rows(plant, typed)
    served = serving.batch(rows)
    assert served.dtype == np.float32 and served.shape == (len(rows), len(table_spec.features))
    table = read_table(plant, load_manifest(plant, kind="table"), 42)
    np.testing.assert_array_equal(served, encode_features(table, table_spec))
    data = task.load_plant_data(plant, 42, table_spec)
    np.testing.assert_array_equal(served[table.train], data.x_train.numpy())
    np.testing.assert_array_equal(served[~table.train], data.x_test.numpy())
    assert served[:, table_spec.features.index("humidity_pct:missing")].any()  # the missing path was taken


def test_table_missing_values_extra_keys_and_unknown_categories(table_plants, table_spec):
    serving = get_task("table").serving(table_spec, table_plants[0])  # a CSV plant: "NA" is missing, as in its reader
    row = {"temperature_c": 211.5, "pressure_bar": "5.1", "line_speed_m_min": 40, "humidity_pct": None,
           "material_grade": "B", "shift": "night", "machine": "press-2", "defect": 1, "operator_note": "ignored"}
    features = table_spec.features
    x = serving.batch([row, row | {"humidity_pct": "NA", "machine": "press-9", "material_grade": ""}, row | {"humidity_pct": 50}])
    assert x[0, features.index("humidity_pct")] == 0.0 and x[0, features.index("humidity_pct:missing")] == 1.0
    changed = {features[j].split("=")[0] for j in np.flatnonzero(x[0] != x[1])}
    assert changed == {"machine", "material_grade"}  # "NA" is missing like null: the humidity features agree
    assert x[1, features.index("humidity_pct:missing")] == 1.0
    assert x[1, features.index(f"machine={UNKNOWN}")] == 1.0 and x[1, features.index(f"material_grade={MISSING}")] == 1.0
    scaling = table_spec.numeric["humidity_pct"]
    assert x[2, features.index("humidity_pct")] == pytest.approx((50 - scaling.mean) / scaling.std)
    assert x[2, features.index("humidity_pct:missing")] == 0.0
    answers = serving.answers(np.array([[0.0, 0.0], [-2.0, 1.0]], dtype=np.float32))
    assert answers[0]["probabilities"] == {"0": 0.5, "1": 0.5} and answers[1]["label"] == "1"


def test_table_rejects_missing_columns_wrong_types_and_non_objects(table_plants, table_spec):
    serving = get_task("table").serving(table_spec, table_plants[1])
    row = {"temperature_c": 211.5, "pressure_bar": 5.1, "line_speed_m_min": 40, "humidity_pct": 40,
           "material_grade": "B", "shift": "night", "machine": "press-2"}
    without = {k: v for k, v in row.items() if k not in ("shift", "pressure_bar")}
    with pytest.raises(BadInput, match=r"instance 1 lacks column\(s\) 'pressure_bar', 'shift'"):
        serving.batch([row, without])
    with pytest.raises(BadInput, match=r"instance 2: column 'temperature_c' is numeric but holds 'abc'"):
        serving.batch([row, row, row | {"temperature_c": "abc"}])
    with pytest.raises(BadInput, match=r"instance 0: column 'line_speed_m_min' is numeric but holds True"):
        serving.batch([row | {"line_speed_m_min": True}])
    with pytest.raises(BadInput, match=r"instance 0: column 'machine' holds a list"):
        serving.batch([row | {"machine": ["press-2"]}])
    with pytest.raises(BadInput, match="instance 0 is not an object of column values"):
        serving.batch([[211.5, 5.1]])
    # Parquet plants read no "NA" texts as missing: here it is a number column's bad value
    with pytest.raises(BadInput, match=r"column 'humidity_pct' is numeric but holds 'NA'"):
        serving.batch([row | {"humidity_pct": "NA"}])


def test_table_regression_answers_in_the_targets_units(tmp_path):
    task = get_task("table")
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {"temp": rng.normal(200, 5, 30).round(1), "line": rng.choice(["a", "b"], 30), "thickness": rng.normal(2.0, 0.1, 30)}
    )
    plant = tmp_path / "plant"
    plant.mkdir()
    frame.to_csv(plant / "quality.csv", index=False)
    manifest = Manifest.model_validate(
        {"kind": "table", "path": "quality.csv", "target": "thickness", "problem": "regression",
         "columns": {"temp": "numeric", "line": "categorical"}}
    )
    (plant / MANIFEST_FILE).write_text(dump_manifest(manifest))
    spec = task.make_spec({"p": task.profile(plant, 0)}, TaskOptions())
    assert isinstance(spec, TableSpec) and spec.problem == "regression"
    serving = task.serving(spec, plant)
    table = read_table(plant, manifest, 0)
    np.testing.assert_array_equal(serving.batch(frame.to_dict("records")), encode_features(table, spec))
    # a model that predicts the standardised training target perfectly answers the target in its own units
    answers = serving.answers(encode_target(table, spec)[:, None])
    np.testing.assert_allclose([a["value"] for a in answers], frame["thickness"], rtol=1e-6)
    assert set(answers[0]) == {"value"}


def test_served_inputs_fit_the_tasks_models_and_their_outputs_make_answers(
    defect_plant, process_plants, process_spec, table_plants, table_spec
):
    """The adapters agree with input_example and build_model: batch -> model -> answers, one answer per instance."""
    defect_spec = DefectSpec(task="defect", model="cnn", num_classes=2)
    cases = [
        ("defect", defect_spec, defect_plant, [image_bytes(np.full((40, 40), 128, dtype=np.uint8))] * 3),
        ("process", process_spec, process_plants[0], [np.zeros((process_spec.window, process_spec.variables)).tolist()] * 3),
        ("table", table_spec, table_plants[0], table_rows(table_plants[0], typed=False)[:3]),
    ]
    for name, spec, plant, instances in cases:
        task = get_task(name)
        inputs = task.serving(spec, plant).batch(instances)
        assert inputs.shape[1:] == task.input_example(spec).shape[1:], name
        with torch.no_grad():
            outputs = task.build_model(spec).eval()(torch.from_numpy(inputs)).numpy()
        answers = task.serving(spec, plant).answers(outputs)
        assert len(answers) == 3 and all(sum(a["probabilities"].values()) == pytest.approx(1.0, abs=1e-5) for a in answers), name


# ---- image size limits (the edge server's, read from the header) -------------------------------------------


def _png_asking_for(width: int, height: int) -> bytes:
    """A PNG header asking for width x height RGBA pixels, over a little data: nothing a decoder should start on."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1 << 16))) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("data", "fragment"), [
    pytest.param(image_bytes(np.zeros((8_000_000, 1), dtype=np.uint8)), "is 1x8000000 pixels; this server takes at most 10000 pixels a side", id="1x8M"),
    pytest.param(_png_asking_for(12_000, 12_000), "at most 10000 pixels a side", id="over-the-side-limit"),
    pytest.param(_png_asking_for(9_000, 9_000), "is 9000x9000 = 81,000,000 pixels; this server takes at most 25,000,000", id="over-the-pixel-limit"),
    pytest.param(_png_asking_for(200_000, 200_000), "asks for more pixels than this server takes", id="past-pils-own-bomb-check"),
])
def test_an_image_too_large_by_its_header_is_refused_before_decoding(defect_plant, data, fragment):
    from tasks.serving import ImageTooLarge

    serving = get_task("defect").serving(DefectSpec(task="defect", model="cnn", num_classes=2), defect_plant)
    with pytest.raises(ImageTooLarge, match=rf"^instance 1 .*{fragment}") as caught:
        serving.batch([image_bytes(np.zeros((32, 32), dtype=np.uint8)), data])
    assert isinstance(caught.value, BadInput) and "\n" not in str(caught.value)


def test_image_limits_are_the_servers_to_set(defect_plant):
    from dataclasses import replace

    from tasks.serving import ImageLimits, ImageTooLarge

    serving = get_task("defect").serving(DefectSpec(task="defect", model="cnn", num_classes=2), defect_plant)
    wide = image_bytes(np.zeros((10, 400), dtype=np.uint8))
    with pytest.raises(ImageTooLarge, match="at most 300 pixels a side"):
        replace(serving, limits=ImageLimits(max_side=300)).batch([wide])
    with pytest.raises(ImageTooLarge, match="at most 3,000"):
        replace(serving, limits=ImageLimits(max_pixels=3_000)).batch([wide])
    assert serving.batch([wide]).shape == (1, 1, 64, 64)


def test_a_huge_image_is_shrunk_on_its_8bit_pixels_before_the_tasks_preprocessing(defect_plant):
    """Its float32 copy is a few megapixels, not the whole image, and the model input barely changes."""
    from tasks.defect.data import preprocess
    from tasks.serving import WORKING_SIDE

    serving = get_task("defect").serving(DefectSpec(task="defect", model="cnn", num_classes=2), defect_plant)
    seen: list[tuple[int, ...]] = []

    def spy(pixels: np.ndarray) -> torch.Tensor:
        seen.append(pixels.shape)
        return serving.to_inputs(pixels)

    from dataclasses import replace

    yy, xx = np.mgrid[0:4500, 0:3000]
    pixels = (128 + 60 * np.sin(xx / 300) * np.cos(yy / 400) + np.random.default_rng(0).normal(0, 10, xx.shape)).clip(0, 255).astype(np.uint8)
    served = replace(serving, to_inputs=spy).batch([image_bytes(pixels)])
    assert seen == [(1, 2250, 1500)] and min(seen[0][1:]) >= WORKING_SIDE  # halved: 4x fewer pixels, still past the working side
    full = preprocess(pixels[None]).numpy()
    assert np.abs(served - full).max() < 0.05  # standardised units: a small fraction of one standard deviation
    small = image_bytes(pixels[:2000, :2000])
    assert replace(serving, to_inputs=spy).batch([small]).shape == (1, 1, 64, 64) and seen[-1] == (1, 2000, 2000)  # under 2x: untouched


def test_only_the_usual_image_formats_are_decoded(defect_plant):
    serving = get_task("defect").serving(DefectSpec(task="defect", model="cnn", num_classes=2), defect_plant)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(buf, format="EPS")  # PIL would hand EPS to Ghostscript
    with pytest.raises(BadInput, match="instance 0 is not a readable image"):
        serving.batch([buf.getvalue()])
