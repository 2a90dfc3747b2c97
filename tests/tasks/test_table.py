"""The table task on small real CSV and Parquet files: validation, federated statistics, encoding, training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from maxfl.errors import ConfigError, DataError
from tasks.base import SchemaMismatch, TaskOptions, TrainSettings
from tasks.manifest import MANIFEST_FILE, Manifest, dump_manifest
from tasks.table import TASK, TableSpec
from tasks.table.spec import MISSING, UNKNOWN

COLUMNS = {"temp": "numeric", "speed": "numeric", "shift": "categorical"}


def write_plant(
    data_dir: Path, table: str | pd.DataFrame, name: str = "quality.csv", columns: dict[str, str] = COLUMNS, **manifest: object
) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    file = data_dir / name
    if isinstance(table, str):
        file.write_text(table)
    else:
        table.to_parquet(file, index=False) if name.endswith(".parquet") else table.to_csv(file, index=False)
    fields = {"kind": "table", "path": name, "target": "defect", "columns": columns} | manifest
    (data_dir / MANIFEST_FILE).write_text(dump_manifest(Manifest.model_validate(fields)))
    return data_dir


GOOD = "temp,speed,shift,defect\n200,40,early,0\n210,41,late,1\n205,,night,0\n,39,,1\n198,42,early,0\n"


def spec_for(*dirs: Path, seed: int = 0, **options: object) -> TableSpec:
    spec = TASK.make_spec({f"plant-{i}": TASK.profile(d, seed) for i, d in enumerate(dirs)}, TaskOptions(**options))
    assert isinstance(spec, TableSpec)
    return spec


# ---- bad input: one line naming the file and the row or field ----------------------------------------------


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("", r"quality.csv is empty"),
        ("temp,speed,shift,defect\n", r"quality.csv has no data rows"),
        ("temp,speed,shift\n1,2,a\n", r"quality.csv has no target column 'defect' \(columns: temp, speed, shift\): set target"),
        ("temp,shift,defect\n1,a,0\n", r"quality.csv lacks column\(s\) 'speed' named in manifest.toml \(columns: temp, shift, defect\)"),
        ("temp,speed,shift,defect\n200,40,a,0\nhot,41,b,1\n", r"quality.csv row 2 \(line 3\): column 'temp' is numeric but holds 'hot'"),
        ("temp,speed,shift,defect\n200,inf,a,0\n", r"quality.csv row 1 \(line 2\): column 'speed' is numeric but holds 'inf'"),
        ("temp,speed,shift,defect\n200,40,a,0\n201,40,a,1\n202,40,a,\n", r"quality.csv row 3 \(line 4\): target 'defect' is empty"),
        ("temp,speed,shift,defect\n1,2,a,0,9,9\n", r"quality.csv is not a readable CSV file"),
        ("temp,speed,shift,defect\n1,2,a,0\n3,4,b,1,9\n", r"quality.csv is not a readable CSV file \(.*line 3"),
        ("temp,speed,shift,defect\n1,2,a,0\n", r"quality.csv has 1 data row"),
    ],
)
def test_bad_csv_is_one_line_naming_file_and_row_or_field(tmp_path: Path, table: str, message: str) -> None:
    write_plant(tmp_path, table)
    with pytest.raises(DataError, match=message) as info:
        TASK.profile(tmp_path, seed=0)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


EUROPEAN = "temp;speed;shift;defect\n200,5;40;early;0\n210,25;41,5;late;1\n205;;night;0\n;39;;1\n198,75;42;early;0\n"


def test_a_semicolon_csv_with_decimal_commas_is_read_as_its_locale_wrote_it(tmp_path: Path) -> None:
    from tasks.table import read_table
    from tasks.manifest import load_manifest

    write_plant(tmp_path, EUROPEAN)
    table = read_table(tmp_path, load_manifest(tmp_path, kind="table"), seed=0)
    np.testing.assert_allclose(table.numeric["temp"], [200.5, 210.25, 205.0, np.nan, 198.75])
    np.testing.assert_allclose(table.numeric["speed"], [40.0, 41.5, np.nan, 39.0, 42.0])
    assert list(table.categorical["shift"]) == ["early", "late", "night", None, "early"]
    # the same cells declared in the manifest read alike
    write_plant(tmp_path / "declared", EUROPEAN, delimiter=";", decimal=",")
    declared = read_table(tmp_path / "declared", load_manifest(tmp_path / "declared", kind="table"), seed=0)
    np.testing.assert_array_equal(declared.numeric["temp"], table.numeric["temp"])


@pytest.mark.parametrize(
    ("table", "manifest", "message"),
    [
        # the manifest's delimiter is not the file's: named, with the key that fixes it
        (EUROPEAN, {"delimiter": ","}, r"quality.csv is not a readable CSV file \(.*; read as ','-separated\); the header is ';'-separated, "
                                       r"not ',': set delimiter = ';' in manifest.toml$"),
        ("temp;speed;shift;defect\n1;2;a;0\n2;3;b;1\n", {"delimiter": "|"},
         r"no target column 'defect' \(columns: temp;speed;shift;defect\): set target in manifest.toml to one of them; the header is "
         r"';'-separated, not '\|': set delimiter = ';'"),
        # decimal commas in a file whose manifest says decimal points
        (EUROPEAN, {"decimal": "."}, r"row 2 \(line 3\): column 'speed' is numeric but holds '41,5'; they look like decimal commas: "
                                     r"set decimal = \",\" in manifest.toml$"),
        # decimal points where the manifest says commas
        ("temp;speed;shift;defect\n1.5;2;a;0\n2;3;b;1\n", {"decimal": ","}, r"holds '1.5'; manifest.toml says decimal = \",\" but"),
    ],
)
def test_a_delimiter_or_decimal_mark_that_does_not_fit_is_named(tmp_path: Path, table: str, manifest: dict, message: str) -> None:
    write_plant(tmp_path, table, **manifest)
    with pytest.raises(DataError, match=message) as info:
        TASK.profile(tmp_path, seed=0)
    assert "\n" not in str(info.value)


def test_every_bad_cell_of_a_column_is_counted_and_the_first_few_named(tmp_path: Path) -> None:
    rows = "".join(f"{'hot' if i % 2 else 200 + i},40,a,{i % 2}\n" for i in range(10))
    write_plant(tmp_path, "temp,speed,shift,defect\n" + rows)
    with pytest.raises(DataError, match=r"column 'temp' is numeric but 5 of its cells are not numbers: row 2 \(line 3\) 'hot', "
                                         r"row 4 \(line 5\) 'hot', row 6 \(line 7\) 'hot', and 2 more; fix the value"):
        TASK.profile(tmp_path, seed=0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"path": "quality.parquet", "delimiter": ";"}, "only for a CSV table"),
        ({"delimiter": ",", "decimal": ","}, "also the delimiter"),
    ],
)
def test_delimiter_and_decimal_keys_are_checked_in_the_manifest(fields: dict, message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        Manifest.model_validate({"kind": "table", "path": "quality.csv", "target": "defect", "columns": COLUMNS} | fields)


def test_regression_target_must_be_numeric(tmp_path: Path) -> None:
    write_plant(tmp_path, "temp,speed,shift,defect\n1,2,a,0.5\n1,2,a,high\n", problem="regression")
    with pytest.raises(DataError, match=r"quality.csv row 2 \(line 3\): target 'defect' is numeric but holds 'high'"):
        TASK.profile(tmp_path, seed=0)


def test_split_column_values_must_be_train_or_test(tmp_path: Path) -> None:
    write_plant(tmp_path, "temp,speed,shift,defect,set\n1,2,a,0,train\n1,2,a,1,TEST\n1,2,a,1,holdout\n", split_column="set")
    with pytest.raises(DataError, match=r"quality.csv row 3 \(line 4\): split column 'set' holds 'holdout'; use 'train' or 'test'"):
        TASK.profile(tmp_path, seed=0)


def test_parquet_problems_name_the_row_without_a_line(tmp_path: Path) -> None:
    frame = pd.DataFrame({"temp": ["1", "2", "warm"], "speed": [1.0, 2.0, 3.0], "shift": ["a", "b", "a"], "defect": [0, 1, 0]})
    write_plant(tmp_path, frame, name="quality.parquet")
    with pytest.raises(DataError, match=r"quality.parquet row 3: column 'temp' is numeric but holds 'warm'"):
        TASK.profile(tmp_path, seed=0)


def test_unreadable_parquet_is_a_data_error(tmp_path: Path) -> None:
    write_plant(tmp_path, "this is not parquet", name="quality.parquet")
    with pytest.raises(DataError, match=r"quality.parquet is not a readable Parquet file"):
        TASK.profile(tmp_path, seed=0)


def test_manifest_of_another_kind_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / MANIFEST_FILE).write_text('kind = "images"\npath = "images"\nimage-mode = "L"\nimage-size = [8, 8]\n')
    with pytest.raises(DataError, match=r"describes kind 'images', the run trains 'table'"):
        TASK.profile(tmp_path, seed=0)


# ---- profile -> spec -> plant data ---------------------------------------------------------------------------


def test_round_trip_on_a_csv_and_a_parquet_plant(tmp_path: Path) -> None:
    a = write_plant(tmp_path / "a", GOOD)
    b_rows = pd.DataFrame(
        {"temp": [190.0, 220.0, np.nan, 215.0], "speed": [38, 45, 44, 40], "shift": ["late", "weekend", "early", None], "defect": [1, 0, 1, 0]}
    )
    b = write_plant(tmp_path / "b", b_rows, name="quality.parquet")
    pa, pb = TASK.profile(a, seed=3), TASK.profile(b, seed=3)
    assert pa.schema_ == pb.schema_ == {"column:shift": "categorical", "column:speed": "numeric", "column:temp": "numeric", "target": "defect (classification)"}
    assert pa.examples == 3 and pb.examples == 2  # training rows only (stratified: each class keeps a test row)
    spec = TASK.make_spec({"a": pa, "b": pb}, TaskOptions())
    assert isinstance(spec, TableSpec)
    assert spec.model == "mlp" and spec.classes == ("0", "1") and spec.num_classes == 2  # Parquet ints and CSV text agree
    assert spec.categorical["shift"][-2:] == (MISSING, UNKNOWN)
    assert len(spec.features) == 2 * 2 + len(spec.categorical["shift"])
    assert TableSpec.model_validate_json(spec.model_dump_json()) == spec  # travels as JSON

    for data_dir, profile in ((a, pa), (b, pb)):
        data = TASK.load_plant_data(data_dir, seed=3, spec=spec)
        assert data.fingerprint == profile.fingerprint
        assert data.x_train.dtype == torch.float32 and data.x_train.shape[1] == len(spec.features)
        assert data.y_train.dtype == torch.int64 and len(data.y_train) == profile.examples
        assert len(data.y_test) >= 1
    model = TASK.build_model(spec)
    assert model(torch.from_numpy(TASK.input_example(spec))).shape == (2, 2)
    linear = TASK.build_model(spec.model_copy(update={"model": "linear"}))
    assert sum(p.numel() for p in linear.parameters()) == (len(spec.features) + 1) * 2


def test_missing_features_are_imputed_and_flagged_unseen_categories_are_unknown(tmp_path: Path) -> None:
    a = write_plant(tmp_path / "a", GOOD, split_column="set", columns=COLUMNS)
    text = "temp,speed,shift,defect,set\n200,40,early,0,train\n210,,late,1,train\n,42,,1,test\n205,40,weekend,0,test\n"
    (a / "quality.csv").write_text(text)
    spec = spec_for(a)
    data = TASK.load_plant_data(a, seed=0, spec=spec)
    row = dict(zip(spec.features, data.x_test[0].tolist(), strict=True))  # the test row with missing temp and shift
    assert row["temp"] == 0.0 and row["temp:missing"] == 1.0  # federated mean, flagged
    assert row[f"shift={MISSING}"] == 1.0 and sum(v for k, v in row.items() if k.startswith("shift=")) == 1.0
    unseen = dict(zip(spec.features, data.x_test[1].tolist(), strict=True))
    assert unseen[f"shift={UNKNOWN}"] == 1.0  # 'weekend' was only in the test rows: not in the vocabulary


def test_split_is_fixed_by_seed(tmp_path: Path) -> None:
    rows = "temp,speed,shift,defect\n" + "".join(f"{200 + i},{40 + i % 7},s{i % 3},{i % 2}\n" for i in range(40))
    spec = spec_for(write_plant(tmp_path, rows))
    first, again = TASK.load_plant_data(tmp_path, 1, spec), TASK.load_plant_data(tmp_path, 1, spec)
    other = TASK.load_plant_data(tmp_path, 2, spec)
    assert torch.equal(first.x_test, again.x_test) and not torch.equal(first.x_test, other.x_test)
    assert len(first.y_test) == 8 and first.y_test.sum() == 4  # 20 % and stratified by label


def test_federated_statistics_equal_pooled_statistics(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = []
    for k in range(3):
        n = 30 + 10 * k
        frame = pd.DataFrame(
            {
                "temp": rng.normal(200 + 10 * k, 5 + k, n).round(2),
                "speed": rng.normal(40, 3, n).round(1),
                "shift": rng.choice(["early", "late", f"only-{k}"], n),
                "defect": rng.integers(0, 2, n),
                "set": np.where(rng.random(n) < 0.25, "test", "train"),
            }
        )
        frame.loc[rng.random(n) < 0.1, "temp"] = np.nan
        frames.append(frame)
        write_plant(tmp_path / f"p{k}", frame, name="quality.parquet" if k == 1 else "quality.csv", split_column="set")
    spec = spec_for(*(tmp_path / f"p{k}" for k in range(3)))
    pooled = pd.concat(frames).query("set == 'train'")
    for column in ("temp", "speed"):
        assert spec.numeric[column].mean == pytest.approx(pooled[column].mean(), rel=1e-12)
        assert spec.numeric[column].std == pytest.approx(pooled[column].std(), rel=1e-9)
    assert spec.categorical["shift"] == (*sorted(pooled["shift"].unique()), MISSING, UNKNOWN)


def test_schema_mismatch_names_each_deviating_plant(tmp_path: Path) -> None:
    plants = {name: write_plant(tmp_path / name, GOOD) for name in ("a", "b", "c", "d")}
    write_plant(plants["b"], GOOD, columns={"temp": "categorical", "speed": "numeric", "shift": "categorical"})
    write_plant(plants["c"], GOOD, columns={"temp": "numeric", "shift": "categorical"})
    with pytest.raises(SchemaMismatch) as info:
        TASK.make_spec({name: TASK.profile(d, 0) for name, d in plants.items()}, TaskOptions())
    assert set(info.value.problems) == {"b", "c"}
    assert "column:temp is 'categorical'" in info.value.problems["b"][0]
    assert "column:speed is missing" in info.value.problems["c"][0]


def test_unknown_label_at_a_plant_names_row_and_label(tmp_path: Path) -> None:
    spec = spec_for(write_plant(tmp_path / "a", GOOD))
    b = write_plant(tmp_path / "b", GOOD.replace("198,42,early,0", "198,42,early,rework"))
    with pytest.raises(DataError, match=r"quality.csv row 5 \(line 6\): label 'rework' is not one of the federation's classes \(0, 1\)"):
        TASK.load_plant_data(b, seed=0, spec=spec)


def test_manifest_changed_after_the_spec_is_a_data_error(tmp_path: Path) -> None:
    spec = spec_for(write_plant(tmp_path, GOOD))
    write_plant(tmp_path, GOOD, columns={"temp": "numeric", "speed": "categorical", "shift": "categorical"})
    with pytest.raises(DataError, match=r"no longer matches the federation's spec \(column:speed is 'categorical', the spec has 'numeric'\)"):
        TASK.load_plant_data(tmp_path, seed=0, spec=spec)


def test_one_class_in_the_whole_federation_cannot_train_a_classifier(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"holds 1 class\(es\) \(0\)"):
        spec_for(write_plant(tmp_path, "temp,speed,shift,defect\n1,2,a,0\n2,3,b,0\n3,4,c,0\n"))


def test_model_choice(tmp_path: Path) -> None:
    write_plant(tmp_path, GOOD)
    assert spec_for(tmp_path, model="linear").model == "linear"
    with pytest.raises(ConfigError, match="no model 'tree'"):
        spec_for(tmp_path, model="tree")


# ---- training ------------------------------------------------------------------------------------------------


def test_regression_learns_and_reports_metrics_in_original_units(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    temp, speed = rng.normal(200, 10, 300), rng.normal(40, 5, 300)
    shift = rng.choice(["early", "late"], 300)
    y = 1000 + 3 * (temp - 200) - 2 * (speed - 40) + 15 * (shift == "late") + rng.normal(0, 2, 300)
    write_plant(tmp_path, pd.DataFrame({"temp": temp, "speed": speed, "shift": shift, "defect": y}), problem="regression")
    spec = spec_for(tmp_path)
    assert spec.num_classes == 1 and spec.target_scaling is not None and spec.target_scaling.mean == pytest.approx(1007.5, abs=5)
    data = TASK.load_plant_data(tmp_path, seed=0, spec=spec)
    assert data.y_train.dtype == torch.float32
    torch.manual_seed(0)
    model = TASK.build_model(spec)
    before = TASK.evaluate(model, data, spec)
    trained = TASK.train(model, data, TrainSettings(epochs=30, batch_size=32, learning_rate=0.01, seed=0), spec)
    after = TASK.evaluate(model, data, spec)
    assert {"train_loss", "train_time_s"} <= trained.keys()
    assert {"eval_loss", "eval_rmse", "eval_mae", "eval_r2", "eval_time_s"} <= after.keys()
    assert after["eval_loss"] < before["eval_loss"] and after["eval_r2"] > 0.9 and after["eval_rmse"] < 10


def test_demo_plants_are_non_iid_and_the_mlp_beats_the_majority_class(tmp_path: Path) -> None:
    dirs = TASK.prepare_plants(2, tmp_path, seed=42, limit=600)
    assert (dirs[0] / "quality.csv").is_file() and (dirs[1] / "quality.parquet").is_file()
    profiles = {d.name: TASK.profile(d, 42) for d in dirs}
    rates = [p.label_counts["1"] / p.examples for p in profiles.values()]
    assert all(0.1 < r < 0.5 for r in rates)
    assert all(p.numeric["humidity_pct"].missing > 0 for p in profiles.values())  # sensor dropouts
    means = [p.numeric["temperature_c"].sum / p.numeric["temperature_c"].count for p in profiles.values()]
    assert abs(means[0] - means[1]) > 5  # the plants run their moulds differently
    spec = TASK.make_spec(profiles, TaskOptions())
    data = TASK.load_plant_data(dirs[0], 42, spec)
    torch.manual_seed(0)
    model = TASK.build_model(spec)
    TASK.train(model, data, TrainSettings(epochs=15, batch_size=32, learning_rate=0.05, seed=0), spec)
    metrics = TASK.evaluate(model, data, spec)
    majority = max(data.y_test.float().mean().item(), 1 - data.y_test.float().mean().item())
    assert metrics["eval_auroc"] > 0.8 and metrics["eval_macro_f1"] > 0.65 and metrics["eval_accuracy"] > majority
