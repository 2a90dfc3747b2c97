"""The plant's edge model store: the approved models the anchor pushed, the one in use, and the ones before it.

Layout under `root`, per registered model name:

    <name>/<version>/model.onnx     the released model, verified against its manifest before it is written
    <name>/<version>/release.json   its ReleaseManifest
    <name>/current.json             {"version", "history", "updated_at"}: the version in use; the server watches it
    <name>/.lock                    every change holds an exclusive flock on it

`history` is the stack of versions that were made current, oldest first, ending with the current one: an
install or activation pushes, a rollback pops (so repeated rollbacks walk further back, and a rollback undoes
exactly the last change). A version folder is written beside its final place and renamed into it, and the
pointer is replaced atomically, so a reader never sees half a version; a damaged file is reported with a fix,
never silently overwritten. All versions are kept.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from maxfl.atomic import atomic_path, atomic_write_text, fsync_dir
from maxfl.errors import UserError, describe_validation_error
from maxfl.release import MANIFEST_FILE, MODEL_NAME_PATTERN, ONNX_FILE, ReleaseManifest, sha256_hex

log = logging.getLogger("maxfl.edge")

POINTER_FILE = "current.json"
LOCK_FILE = ".lock"
_TMP_PREFIX = ".incoming-"


class EdgeStoreError(UserError):
    """One-line reason an edge store operation was refused; nothing on disk changed."""


Variant = Literal["global", "personalised", "local"]
VARIANT_FILE = "variant.json"  # beside a version's model.onnx: the plant's own choice for this version (fl_client.personalise)
VARIANT_ONNX = "variant.onnx"


class VariantRecord(BaseModel):
    """What the plant serves instead of the released ONNX for this version, and why: its validation scores."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    variant: Literal["personalised", "local"]
    sha256: str
    size_bytes: int = Field(ge=1)
    metric: str
    scores: dict[str, float]  # validation score of every variant the plant built, the chosen one included
    created_at: datetime


class InstalledModel(BaseModel):
    model_config = ConfigDict(frozen=True)

    manifest: ReleaseManifest
    path: Path  # the ONNX file served: the version's model.onnx, or the plant's own variant of it
    variant: Variant = "global"
    variant_record: VariantRecord | None = None


class InstallOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    model_name: str
    version: int  # current after the operation
    previous: int | None  # current before it (None: the store had no current version of this model)
    status: Literal["installed", "activated", "already-current"]


class CurrentPointer(BaseModel):
    """The content of `<name>/current.json`."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)
    history: list[int] = Field(min_length=1)  # versions made current, oldest first; the last is `version`
    updated_at: datetime

    @model_validator(mode="after")
    def _ends_with_current(self) -> CurrentPointer:
        if self.history[-1] != self.version:
            raise ValueError(f"history must end with the current version {self.version}, ends with {self.history[-1]}")
        return self


class SpecClasses(BaseModel):
    """The part of a release's TaskSpec the store checks against the ONNX outputs, read without importing the
    task (and torch: the deploy path stays light); the server validates the whole spec when it loads the version."""

    task: str
    num_classes: int = Field(ge=1)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class EdgeStore:
    """One plant's store. Every method that changes it takes the model's lock; readers need none."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ---- paths ---------------------------------------------------------------------------------------------

    def _model_dir(self, model_name: str) -> Path:
        if not re.match(MODEL_NAME_PATTERN, model_name):
            raise EdgeStoreError(f"{model_name!r} is not a model name (letters, digits, '_', '.', '-'; e.g. maxfl-defect)")
        return self.root / model_name

    def _version_dir(self, model_name: str, version: int) -> Path:
        return self._model_dir(model_name) / str(version)

    def pointer(self, model_name: str) -> Path:
        """`current.json` of the model: replaced atomically on every change, which the server watches."""
        return self._model_dir(model_name) / POINTER_FILE

    @contextmanager
    def _locked(self, model_name: str) -> Iterator[Path]:
        folder = self._model_dir(model_name)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Under the lock no one else is writing: any incoming folder is left over from a crash.
            for stale in folder.glob(f"{_TMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            yield folder

    # ---- reading -------------------------------------------------------------------------------------------

    def pointer_state(self, model_name: str) -> CurrentPointer | None:
        """The model's current version and history; None if no version was ever made current."""
        path = self.pointer(model_name)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise self._corrupt_pointer(model_name, path, f"is not readable ({exc})") from None
        try:
            return CurrentPointer.model_validate_json(text)
        except ValidationError as exc:
            why = describe_validation_error(exc, "pointer").removeprefix("invalid pointer: ")
            raise self._corrupt_pointer(model_name, path, f"is corrupt ({why})") from None

    def _corrupt_pointer(self, model_name: str, path: Path, why: str) -> EdgeStoreError:
        installed = ", ".join(str(v) for v in self._version_numbers(model_name)) or "none"
        return EdgeStoreError(
            f"edge store pointer {path} {why}; it is left as it is: remove it and run "
            f"`maxfl edge activate --model {model_name} --version N` (installed versions: {installed})"
        )

    def _version_numbers(self, model_name: str) -> list[int]:
        folder = self._model_dir(model_name)
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and (p / MANIFEST_FILE).exists())

    def _manifest(self, model_name: str, version: int) -> ReleaseManifest:
        folder = self._version_dir(model_name, version)
        path = folder / MANIFEST_FILE
        fix = f"remove {folder} and ask the anchor to push v{version} again"
        try:
            manifest = ReleaseManifest.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise EdgeStoreError(f"{model_name} v{version} is not installed at this plant (installed: "
                                 f"{', '.join(map(str, self._version_numbers(model_name))) or 'none'})") from None
        except OSError as exc:
            raise EdgeStoreError(f"release file {path} is not readable ({exc.strerror}); {fix}") from None
        except ValidationError as exc:
            why = describe_validation_error(exc, "release").removeprefix("invalid release: ")
            raise EdgeStoreError(f"release file {path} is corrupt ({why}); {fix}") from None
        if manifest.model_name != model_name or manifest.version != version:
            raise EdgeStoreError(f"release file {path} describes {manifest.label}, not {model_name} v{version}; {fix}")
        return manifest

    def _installed(self, model_name: str, version: int) -> InstalledModel:
        folder = self._version_dir(model_name, version)
        manifest = self._manifest(model_name, version)
        record = self._variant_record(folder)
        if record is None:
            return InstalledModel(manifest=manifest, path=folder / ONNX_FILE)
        return InstalledModel(manifest=manifest, path=folder / VARIANT_ONNX, variant=record.variant, variant_record=record)

    @staticmethod
    def _variant_record(folder: Path) -> VariantRecord | None:
        """The plant's variant of a version; an unreadable record is the released model's business, not a failure."""
        try:
            return VariantRecord.model_validate_json((folder / VARIANT_FILE).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            log.warning("%s is unreadable (%s); serving the released model of that version", folder / VARIANT_FILE, type(exc).__name__)
            return None

    def current(self, model_name: str) -> InstalledModel | None:
        return self.current_state(model_name)[1]

    def current_state(self, model_name: str) -> tuple[CurrentPointer | None, InstalledModel | None]:
        """The pointer and the version it names, from one read of the pointer (the server tells a rollback by its history)."""
        state = self.pointer_state(model_name)
        return state, None if state is None else self._installed(model_name, state.version)

    def models(self) -> list[str]:
        """Model names with at least one installed version or a pointer, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and re.match(MODEL_NAME_PATTERN, p.name) and ((p / POINTER_FILE).exists() or self._version_numbers(p.name))
        )

    def installed_versions(self, model_name: str) -> list[int]:
        """Version numbers with a release file, oldest first (their files are not checked)."""
        return self._version_numbers(model_name)

    def fallbacks(self, model_name: str, skip: int | None = None) -> Iterator[InstalledModel]:
        """Installed versions but `skip` whose release file reads, newest first: what a server may serve instead."""
        for version in reversed(self._version_numbers(model_name)):
            if version == skip:
                continue
            try:
                yield self._installed(model_name, version)
            except EdgeStoreError:
                continue

    def current_problem(self, model_name: str) -> str | None:
        """Why the current version cannot be served as it is on disk, with the fix; None if it can (or none is current)."""
        try:
            state = self.pointer_state(model_name)
        except EdgeStoreError as exc:
            return str(exc)
        if state is None:
            return None
        try:
            self.verified_bytes(self._installed(model_name, state.version))
        except EdgeStoreError as exc:
            push = "" if "push" in str(exc) else f"; ask the anchor to push v{state.version} again"
            back = f"; or run `maxfl edge rollback` to go back to v{state.history[-2]}" if len(state.history) > 1 else ""
            return f"current version: {exc}{push}{back}"
        return None

    def versions(self, model_name: str) -> list[InstalledModel]:
        """Installed versions of the model, oldest first."""
        return [self._installed(model_name, v) for v in self._version_numbers(model_name)]

    def verified_bytes(self, model: InstalledModel) -> bytes:
        """The model's ONNX bytes, checked against its manifest (a file damaged on disk is refused)."""
        m = model.manifest
        try:
            data = model.path.read_bytes()
        except OSError as exc:
            raise EdgeStoreError(f"{m.label} at {model.path} is not readable ({exc.strerror}); ask the anchor to push v{m.version} again") from None
        if model.variant_record is not None:
            v = model.variant_record
            if len(data) != v.size_bytes or sha256_hex(data) != v.sha256:
                raise EdgeStoreError(f"this plant's {v.variant} variant of {m.label} at {model.path} is damaged; remove "
                                     f"{model.path.parent / VARIANT_FILE} to serve the released model, or ask the anchor to push v{m.version} again")
            return data
        if len(data) != m.size_bytes or sha256_hex(data) != m.sha256:
            raise EdgeStoreError(f"{m.label} at {model.path} is damaged (its sha256 no longer matches the release); "
                                 f"ask the anchor to push v{m.version} again")
        return data

    # ---- changing ------------------------------------------------------------------------------------------

    def install(self, manifest: ReleaseManifest, onnx: bytes) -> InstallOutcome:
        """Verify the pushed model, write it as a new version and make it current.

        Every check that can refuse runs before anything is written; a refused install leaves the previous
        model current. A version already installed with the same bytes is activated instead.
        """
        label = manifest.label
        if len(onnx) != manifest.size_bytes:
            what = "truncated" if len(onnx) < manifest.size_bytes else "too long"
            raise EdgeStoreError(f"{label} is {what}: got {len(onnx)} bytes, the release says {manifest.size_bytes}; "
                                 "refusing; ask the anchor to push again")
        got = sha256_hex(onnx)
        if got != manifest.sha256:
            raise EdgeStoreError(f"{label} hash mismatch: sha256 {got[:12]}..., the release says {manifest.sha256[:12]}...; "
                                 "refusing; ask the anchor to push again")
        _check_loads(manifest, onnx)
        with self._locked(manifest.model_name) as folder:
            state = self.pointer_state(manifest.model_name)
            previous = state.version if state else None
            target = folder / str(manifest.version)
            if (target / MANIFEST_FILE).exists():
                existing = self._manifest(manifest.model_name, manifest.version)
                if existing.sha256 != manifest.sha256:
                    raise EdgeStoreError(
                        f"{label} is already installed with different bytes (sha256 {existing.sha256[:12]}..., pushed "
                        f"{manifest.sha256[:12]}...); a version number names one model: register a new version at the anchor")
                repaired = self._repair_if_damaged(self._installed(manifest.model_name, manifest.version), onnx)
                if previous == manifest.version:
                    if repaired and state is not None:  # rewritten, so that a server that fell back loads it again
                        self._write_pointer(manifest.model_name, state.version, state.history)
                    return InstallOutcome(model_name=manifest.model_name, version=manifest.version, previous=previous, status="already-current")
                self._push(manifest.model_name, state, manifest.version)
                return InstallOutcome(model_name=manifest.model_name, version=manifest.version, previous=previous, status="activated")
            if target.exists():  # a version folder without its release file: not ours to delete
                raise EdgeStoreError(f"{target} exists but holds no {MANIFEST_FILE}; remove it and ask the anchor to push again")
            self._write_version(folder, target, manifest, onnx)
            self._push(manifest.model_name, state, manifest.version)
        log.info("installed %s (sha256 %s), previous %s", label, manifest.sha256[:12], f"v{previous}" if previous else "none")
        return InstallOutcome(model_name=manifest.model_name, version=manifest.version, previous=previous, status="installed")

    def install_variant(self, manifest: ReleaseManifest, variant: Literal["personalised", "local"], onnx: bytes, metric: str,
                        scores: dict[str, float]) -> InstalledModel:
        """Serve the plant's own variant of an installed version instead of the released ONNX. It is checked like a
        pushed model before anything is written, and the record is written last: it is the commit point."""
        _check_loads(manifest, onnx)
        record = VariantRecord(variant=variant, sha256=sha256_hex(onnx), size_bytes=len(onnx), metric=metric, scores=scores,
                               created_at=datetime.now(UTC))
        with self._locked(manifest.model_name):
            folder = self._version_dir(manifest.model_name, manifest.version)
            self._manifest(manifest.model_name, manifest.version)  # installed, and its release file reads
            with atomic_path(folder / VARIANT_ONNX) as tmp:
                _write_synced(tmp, onnx)
            atomic_write_text(folder / VARIANT_FILE, record.model_dump_json(indent=2) + "\n")
            state = self.pointer_state(manifest.model_name)
            if state is not None and state.version == manifest.version:
                self._write_pointer(manifest.model_name, state.version, state.history)  # the server watches the pointer
        log.info("%s: serving this plant's %s variant (validation %s)", manifest.label, variant, scores)
        return self._installed(manifest.model_name, manifest.version)

    def clear_variant(self, model_name: str, version: int) -> None:
        """Serve the released ONNX of `version` again (a new global model was chosen over the plant's variants)."""
        with self._locked(model_name):
            folder = self._version_dir(model_name, version)
            if (folder / VARIANT_FILE).exists():
                (folder / VARIANT_FILE).unlink()
                fsync_dir(folder)
                state = self.pointer_state(model_name)
                if state is not None and state.version == version:
                    self._write_pointer(model_name, state.version, state.history)

    def activate(self, model_name: str, version: int) -> InstallOutcome:
        """Make an installed version current again (its bytes are re-verified first)."""
        with self._locked(model_name):
            state = self.pointer_state(model_name)
            previous = state.version if state else None
            self.verified_bytes(self._installed(model_name, version))
            if previous == version:
                return InstallOutcome(model_name=model_name, version=version, previous=previous, status="already-current")
            self._push(model_name, state, version)
        log.info("activated %s v%d, previous %s", model_name, version, f"v{previous}" if previous else "none")
        return InstallOutcome(model_name=model_name, version=version, previous=previous, status="activated")

    def rollback(self, model_name: str | None = None) -> InstallOutcome:
        """Back to the version that was current before the current one (its bytes are re-verified first)."""
        if model_name is None:
            names = self.models()
            if not names:
                raise EdgeStoreError(f"the edge store at {self.root} holds no model: nothing to roll back")
            if len(names) > 1:
                raise EdgeStoreError(f"the edge store at {self.root} holds several models ({', '.join(names)}): say which with --model")
            model_name = names[0]
        with self._locked(model_name):
            state = self.pointer_state(model_name)
            if state is None:
                raise EdgeStoreError(f"{model_name} has no current version at this plant: nothing to roll back")
            if len(state.history) < 2:
                raise EdgeStoreError(f"{model_name} v{state.version} is the first version this plant used: there is no earlier version to roll back to")
            target = state.history[-2]
            self.verified_bytes(self._installed(model_name, target))
            self._write_pointer(model_name, target, state.history[:-1])
        log.info("rolled back %s v%d -> v%d", model_name, state.version, target)
        return InstallOutcome(model_name=model_name, version=target, previous=state.version, status="activated")

    def _push(self, model_name: str, state: CurrentPointer | None, version: int) -> None:
        self._write_pointer(model_name, version, [*(state.history if state else []), version])

    def _write_pointer(self, model_name: str, version: int, history: list[int]) -> None:
        state = CurrentPointer(version=version, history=history, updated_at=datetime.now(UTC))
        atomic_write_text(self.pointer(model_name), state.model_dump_json(indent=2) + "\n")

    @staticmethod
    def _write_version(folder: Path, target: Path, manifest: ReleaseManifest, onnx: bytes) -> None:
        """Write the version into a folder beside its final place, then rename it in: all or nothing."""
        incoming = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{manifest.version}-", dir=folder))
        try:
            os.chmod(incoming, 0o755)
            _write_synced(incoming / ONNX_FILE, onnx)
            _write_synced(incoming / MANIFEST_FILE, (manifest.model_dump_json(indent=2) + "\n").encode())
            fsync_dir(incoming)
            os.rename(incoming, target)
            fsync_dir(folder)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)

    def _repair_if_damaged(self, installed: InstalledModel, onnx: bytes) -> bool:
        """The pushed bytes are verified against the same sha256: they may replace a copy damaged on disk."""
        try:
            self.verified_bytes(installed)
        except EdgeStoreError:
            log.warning("%s was damaged on disk; replaced it with the verified bytes just pushed", installed.manifest.label)
            with atomic_path(installed.path) as tmp:
                tmp.write_bytes(onnx)
            return True
        return False


def _check_loads(manifest: ReleaseManifest, onnx: bytes) -> None:
    """The model must load in onnxruntime, take and give what the manifest says, and give one output per class
    of its task spec, before it is written: a mismatch would otherwise be a 500 on every request."""
    from maxfl import onnx_model
    from tasks import task_names

    if manifest.task not in task_names():
        raise EdgeStoreError(f"{manifest.label} is for task {manifest.task!r}, which this plant does not know "
                             f"({', '.join(task_names())}); refusing; upgrade maxfl at this plant")
    try:
        spec = SpecClasses.model_validate_json(manifest.task_spec)
    except ValidationError as exc:
        why = describe_validation_error(exc, "task spec").removeprefix("invalid task spec: ")
        raise EdgeStoreError(f"{manifest.label}'s task spec cannot be read ({why}); refusing; "
                             "ask the anchor to register and push it again") from None
    try:
        sess = onnx_model.session(onnx)
    except ValueError as exc:
        raise EdgeStoreError(f"{manifest.label} is {exc}; refusing; ask the anchor to export and push it again") from None
    inputs = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]
    if inputs != [manifest.input_name]:
        raise EdgeStoreError(f"{manifest.label} takes input(s) {inputs}, the release says {manifest.input_name!r}; refusing")
    if manifest.output_name not in outputs:
        raise EdgeStoreError(f"{manifest.label} gives output(s) {outputs}, the release says {manifest.output_name!r}; refusing")
    width = _output_width(sess, manifest)
    if width != spec.num_classes:
        raise EdgeStoreError(f"{manifest.label} gives {width} output(s) per instance, its task spec says {spec.num_classes} "
                             f"class(es); refusing: this ONNX file is not the spec's model; ask the anchor to export and push it again")


def _output_width(sess: object, manifest: ReleaseManifest) -> int | str:
    """The model's outputs per instance: the declared shape if it is fixed, else one run on zeros."""
    import numpy as np

    output = next(o for o in sess.get_outputs() if o.name == manifest.output_name)  # type: ignore[attr-defined]
    shape = output.shape
    if len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0:
        return shape[1]
    if len(shape) != 2 and all(isinstance(d, int) for d in shape):
        return f"shape {shape} (not batch x classes)"
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in sess.get_inputs()[0].shape]  # type: ignore[attr-defined]
    try:
        out = sess.run([manifest.output_name], {manifest.input_name: np.zeros(dims, dtype=np.float32)})[0]  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors: the model cannot run at all
        raise EdgeStoreError(f"{manifest.label} does not run on an input of shape {dims} ({type(exc).__name__}); refusing; "
                             "ask the anchor to export and push it again") from None
    return int(out.shape[1]) if out.ndim == 2 else f"shape {list(out.shape)} (not batch x classes)"


def describe(store: EdgeStore) -> list[dict[str, object]]:
    """Per model: current version, its sha256, history, installed versions and what is wrong with the current
    version on disk, if anything (for `maxfl edge status`)."""
    rows: list[dict[str, object]] = []
    for name in store.models():
        try:
            state = store.pointer_state(name)
        except EdgeStoreError:
            state = None
        versions = list(store.fallbacks(name))[::-1]  # those whose release file reads, oldest first
        current = next((v.manifest for v in versions if state and v.manifest.version == state.version), None)
        rows.append({
            "model": name,
            "current": state.version if state else None,
            "sha256": current.sha256 if current else None,
            "variant": next((v.variant for v in versions if state and v.manifest.version == state.version), None),
            "task": current.task if current else None,
            "history": state.history if state else [],
            "installed": [v.manifest.version for v in versions],
            "updated_at": state.updated_at.isoformat() if state else None,
            "problem": store.current_problem(name),
        })
    return rows
