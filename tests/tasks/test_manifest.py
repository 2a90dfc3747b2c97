"""The plant manifest: valid files parse, every invalid one is one DataError line naming file and field."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from maxfl.errors import DataError
from tasks.manifest import MANIFEST_FILE, Manifest, dump_manifest, fingerprint, load_manifest

TABLE = """\
kind = "table"
path = "quality.csv"
target = "defect"

[columns]
temperature = "numeric"
shift = "categorical"
"""

IMAGES = """\
kind = "images"
path = "images"
image-mode = "RGB"
image-size = [32, 24]
test-fraction = 0.25
"""


def plant(tmp_path: Path, manifest: str, table: bool = True) -> Path:
    (tmp_path / MANIFEST_FILE).write_text(manifest)
    (tmp_path / "quality.csv").write_text("temperature,shift,defect\n1,a,0\n")
    (tmp_path / "images" / "ok").mkdir(parents=True)
    (tmp_path / "images" / "ok" / "a.png").write_bytes(b"png bytes")
    return tmp_path


def test_table_manifest_parses_with_defaults(tmp_path: Path) -> None:
    m = load_manifest(plant(tmp_path, TABLE))
    assert (m.kind, m.target, m.problem, m.test_fraction, m.split_column) == ("table", "defect", "classification", 0.2, None)
    assert m.columns == {"temperature": "numeric", "shift": "categorical"}
    assert m.data_path(tmp_path) == tmp_path / "quality.csv"


def test_images_manifest_parses_kebab_case_keys(tmp_path: Path) -> None:
    m = load_manifest(plant(tmp_path, IMAGES))
    assert (m.kind, m.image_mode, m.image_size, m.test_fraction) == ("images", "RGB", (32, 24), 0.25)


def test_dump_manifest_round_trips_including_quoted_keys() -> None:
    m = Manifest(kind="table", path="q.parquet", target="y", problem="regression", columns={"line speed": "numeric"}, split_column="set")
    assert Manifest.model_validate(tomllib.loads(dump_manifest(m))) == m


def test_missing_manifest_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"no manifest.toml in {tmp_path}: describe"):
        load_manifest(tmp_path)


def test_invalid_toml_names_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"manifest.toml is not valid TOML \(.*line 2"):
        load_manifest(plant(tmp_path, 'kind = "table"\npath = \n'))


@pytest.mark.parametrize(
    ("manifest", "field"),
    [
        (TABLE + 'colour = "red"\n', "'columns.colour'"),  # a key after [columns] is a column: an invalid type
        ('colour = "red"\n' + TABLE, "'colour'"),
        (TABLE.replace('"table"', '"video"'), "'kind'"),
        (TABLE.replace('target = "defect"', 'target = "defect"\ntest-fraction = 1.0'), "'test-fraction'"),
        (TABLE.replace('target = "defect"\n', ""), "'target'"),
        (TABLE.split("[columns]")[0], "'columns'"),
        (TABLE + 'defect = "categorical"\n', "'columns'"),
        (TABLE.replace("quality.csv", "quality.xlsx"), "'path'"),
        (TABLE.replace('target = "defect"', 'target = "defect"\nsplit-column = "shift"'), "'split-column'"),
        (TABLE.replace('target = "defect"', 'target = "defect"\nimage-mode = "L"'), "'image-mode'"),
        (IMAGES.replace("image-size = [32, 24]\n", ""), "'image-size'"),
        (IMAGES.replace("[32, 24]", "[32, 0]"), "'image-size.1'"),
        (IMAGES.replace('"RGB"', '"CMYK"'), "'image-mode'"),
        (IMAGES + 'target = "label"\n', "'target'"),
        (IMAGES + 'problem = "regression"\n', "'problem'"),
    ],
)
def test_invalid_field_is_one_line_naming_file_and_field(tmp_path: Path, manifest: str, field: str) -> None:
    with pytest.raises(DataError) as info:
        load_manifest(plant(tmp_path, manifest))
    message = str(info.value)
    assert message.startswith(f"invalid {tmp_path / MANIFEST_FILE}: ") and field in message and "\n" not in message


def test_every_invalid_field_is_named_at_once(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'kind'.*'test-fraction'|'test-fraction'.*'kind'"):
        load_manifest(plant(tmp_path, 'kind = "x"\npath = "p"\ntest-fraction = -1\n'))


def test_table_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"manifest.toml: path 'missing.csv' is not a file in"):
        load_manifest(plant(tmp_path, TABLE.replace("quality.csv", "missing.csv")))


def test_images_path_must_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"path 'quality.csv' is not a folder"):
        load_manifest(plant(tmp_path, IMAGES.replace('path = "images"', 'path = "quality.csv"')))


def test_fingerprint_covers_manifest_and_data_bytes(tmp_path: Path) -> None:
    data_dir = plant(tmp_path, TABLE)
    first = fingerprint(load_manifest(data_dir), data_dir)
    assert len(first) == 64 and first == fingerprint(load_manifest(data_dir), data_dir)
    (data_dir / "quality.csv").write_text("temperature,shift,defect\n2,a,0\n")
    second = fingerprint(load_manifest(data_dir), data_dir)
    (data_dir / MANIFEST_FILE).write_text(TABLE + "# a comment\n")
    third = fingerprint(load_manifest(data_dir), data_dir)
    assert len({first, second, third}) == 3


def test_image_folder_fingerprint_counts_paths_and_contents_not_hidden_files(tmp_path: Path) -> None:
    data_dir = plant(tmp_path, IMAGES)
    m = load_manifest(data_dir)
    first = fingerprint(m, data_dir)
    (data_dir / "images" / ".DS_Store").write_bytes(b"finder")
    (data_dir / "images" / "ok" / ".a.png.swp").write_bytes(b"editor")
    assert fingerprint(m, data_dir) == first
    (data_dir / "images" / "bad").mkdir()
    (data_dir / "images" / "ok" / "a.png").rename(data_dir / "images" / "bad" / "a.png")
    moved = fingerprint(m, data_dir)
    (data_dir / "images" / "bad" / "a.png").write_bytes(b"other bytes")
    assert len({first, moved, fingerprint(m, data_dir)}) == 3


def test_a_manifest_of_another_kind_than_the_task_trains(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"manifest.toml describes kind 'images', the run trains 'table'"):
        load_manifest(plant(tmp_path, IMAGES), kind="table")
