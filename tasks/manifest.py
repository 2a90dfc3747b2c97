"""A plant's data manifest: `<data_dir>/manifest.toml` says what the data is, so tasks never guess.

The manifest is the plant operator's contract with the federation: the data's kind and location, for tables
the target and the feature schema, for images the mode and size every image must have. Cross-field rules are
field validators (not one model validator) so that an error names the offending key of the file.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, ValidationInfo, field_validator, model_validator

from maxfl.errors import DataError, describe_validation_error

MANIFEST_FILE = "manifest.toml"
TABLE_SUFFIXES = (".csv", ".parquet")

ColumnType = Literal["numeric", "categorical"]


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class Manifest(BaseModel):
    """What a plant's data is; keys are kebab-case in the file, like every other maxfl config."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, alias_generator=_kebab)

    # Field order matters: each validator sees the fields declared before it in `info.data`.
    kind: Literal["table", "images"]
    path: str = Field(min_length=1)
    target: str | None = Field(None, validate_default=True)
    problem: Literal["classification", "regression"] = Field("classification", validate_default=True)
    columns: dict[str, ColumnType] = Field(default_factory=dict, validate_default=True)
    split_column: str | None = Field(None, validate_default=True)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    image_mode: Literal["L", "RGB"] | None = Field(None, validate_default=True)
    image_size: tuple[PositiveInt, PositiveInt] | None = Field(None, validate_default=True)
    # CSV only; absent: detected from the file (the header's separator; decimal commas in numeric columns).
    delimiter: Literal[",", ";", "\t", "|"] | None = None
    decimal: Literal[".", ","] | None = None

    @model_validator(mode="before")
    @classmethod
    def _absent_keys_by_file_name(cls, data: Any) -> Any:
        """Pydantic names a defaulted field by its Python name in errors ('image_size'); give absent keys their file name."""
        if isinstance(data, dict):
            data = dict(data)
            for name, empty in (("target", None), ("columns", {}), ("split_column", None), ("image_mode", None), ("image_size", None)):
                if name not in data and _kebab(name) not in data:
                    data[_kebab(name)] = empty
        return data

    @field_validator("path")
    @classmethod
    def _table_suffix(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("kind") == "table" and Path(value).suffix.lower() not in TABLE_SUFFIXES:
            raise ValueError(f"a table must be a {' or '.join(TABLE_SUFFIXES)} file")
        return value

    @field_validator("target")
    @classmethod
    def _target(cls, value: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if kind == "table" and not value:
            raise ValueError("required for kind 'table': the column the model predicts")
        if kind == "images" and value is not None:
            raise ValueError("only for kind 'table'; an image's class is its folder name")
        return value

    @field_validator("problem")
    @classmethod
    def _problem(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("kind") == "images" and value != "classification":
            raise ValueError("images support 'classification' only")
        return value

    @field_validator("columns")
    @classmethod
    def _columns(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        kind = info.data.get("kind")
        if kind == "table" and not value:
            raise ValueError("required for kind 'table': list each feature column as numeric or categorical")
        if kind == "images" and value:
            raise ValueError("only for kind 'table'")
        if info.data.get("target") in value:
            raise ValueError(f"lists the target '{info.data['target']}'; list only the feature columns")
        return value

    @field_validator("split_column")
    @classmethod
    def _split_column(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        if info.data.get("kind") == "images":
            raise ValueError("only for kind 'table'")
        if value == info.data.get("target") or value in info.data.get("columns", {}):
            raise ValueError(f"'{value}' is the target or a feature; the split column must be a column of its own")
        return value

    @field_validator("image_mode", "image_size")
    @classmethod
    def _image_only(cls, value: Any, info: ValidationInfo) -> Any:
        kind = info.data.get("kind")
        if kind == "images" and value is None:
            raise ValueError("required for kind 'images': what every image must be")
        if kind == "table" and value is not None:
            raise ValueError("only for kind 'images'")
        return value

    @field_validator("delimiter", "decimal")
    @classmethod
    def _csv_only(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and (info.data.get("kind") != "table" or not str(info.data.get("path", "")).lower().endswith(".csv")):
            raise ValueError("only for a CSV table")
        if value is not None and value == info.data.get("delimiter"):
            raise ValueError(f"'{value}' is also the delimiter; a CSV whose decimal mark is ',' separates its cells with ';'")
        return value

    def data_path(self, data_dir: Path) -> Path:
        """The data the manifest describes; a relative `path` is relative to the manifest's folder."""
        return data_dir / self.path


def load_manifest(data_dir: Path, kind: str | None = None) -> Manifest:
    """Read and check `<data_dir>/manifest.toml`; every problem is one DataError line naming the file.

    `kind`: the kind the caller's task trains; a manifest of another kind is a DataError too.
    """
    file = data_dir / MANIFEST_FILE
    if not file.is_file():
        raise DataError(f"no {MANIFEST_FILE} in {data_dir}: describe the plant's data there, see docs/tasks.md")
    try:
        with open(file, "rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:  # its message names line and column
        raise DataError(f"{file} is not valid TOML ({exc}); fix the syntax") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise DataError(describe_validation_error(exc, str(file))) from None
    if kind is not None and manifest.kind != kind:
        raise DataError(f"{file} describes kind '{manifest.kind}', the run trains '{kind}'; set kind = \"{kind}\" or use another task")
    data = manifest.data_path(data_dir)
    if manifest.kind == "table" and not data.is_file():
        raise DataError(f"{file}: path '{manifest.path}' is not a file in {data_dir}; point it at the plant's table")
    if manifest.kind == "images" and not data.is_dir():
        raise DataError(f"{file}: path '{manifest.path}' is not a folder in {data_dir}; point it at the image folder")
    return manifest


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings, ints and floats are spelled alike in JSON and TOML


def dump_manifest(manifest: Manifest) -> str:
    """The manifest as TOML text, for demos and tests (tomllib only reads)."""
    values = manifest.model_dump(by_alias=True, exclude_none=True)
    columns = values.pop("columns", {})
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items()]
    if columns:
        lines += ["", "[columns]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in columns.items()]
    return "\n".join(lines) + "\n"


def visible_files(folder: Path) -> list[Path]:
    """Every file under `folder` whose path has no hidden part: .DS_Store, .cache and editors' files do not count."""
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _file_digest(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").digest()


def fingerprint(manifest: Manifest, data_dir: Path) -> str:
    """SHA-256 over the manifest's bytes and the data's bytes: any change to either gives a new fingerprint.

    An image folder counts by its sorted relative paths and each file's hash, so renaming an image into
    another class folder changes the fingerprint too.
    """
    digest = hashlib.sha256()
    digest.update(_file_digest(data_dir / MANIFEST_FILE))
    data = manifest.data_path(data_dir)
    if data.is_dir():
        for file in visible_files(data):
            digest.update(file.relative_to(data).as_posix().encode() + b"\0" + _file_digest(file))
    else:
        digest.update(_file_digest(data))
    return digest.hexdigest()
