"""Tennessee Eastman recordings: layout, labels, determinism, the cache and the file checks.

Uses a tiny spec with a shortened warm-up so the whole file runs in seconds on two cores.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydantic
import pytest

from maxfl.errors import DataError
from tasks.process import simulate as sim
from tasks.process.simulate import PlantProcessSpec, ProcessRecording, generate, load_recording

TINY = dict(mode="mode1", seed=7, faults=(1, 6), hours_before_fault=0.5, hours_after_fault=1.0, normal_hours=1.0)
SAMPLES_PER_HOUR = 20  # 3-minute sampling


@pytest.fixture(scope="module", autouse=True)
def short_warmup() -> Iterator[None]:
    """Warm-up takes tens of simulated hours in real use; a quarter hour exercises the same path."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sim.WARMUP_HOURS, "mode1", 0.25)
        yield


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ProcessRecording]:
    cache_dir = tmp_path_factory.mktemp("tep-cache")
    return cache_dir, generate(PlantProcessSpec(**TINY), cache_dir, workers=2)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


# ---- spec ----------------------------------------------------------------------------------------


def test_spec_normalises_and_rejects() -> None:
    assert PlantProcessSpec(**{**TINY, "faults": (6, 1)}).faults == (1, 6)
    for bad in ({"mode": "mode7"}, {"faults": ()}, {"faults": (0,)}, {"faults": (29,)}, {"faults": (2, 2)},
                {"sample_minutes": 1.0}, {"normal_hours": 0.0}, {"train_repeats": 0}, {"unknown": 1}):
        with pytest.raises(pydantic.ValidationError):
            PlantProcessSpec(**{**TINY, **bad})


def test_fingerprint_tracks_spec_and_warmup(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = PlantProcessSpec(**TINY)
    assert spec.fingerprint() == PlantProcessSpec(**TINY).fingerprint()
    assert spec.fingerprint() != PlantProcessSpec(**{**TINY, "seed": 8}).fingerprint()
    before = spec.fingerprint()
    monkeypatch.setitem(sim.WARMUP_HOURS, "mode1", 1.0)
    assert spec.fingerprint() != before


def test_derived_seeds_are_distinct_and_odd() -> None:
    spec = PlantProcessSpec(**{**TINY, "faults": tuple(range(1, 29))})
    seeds = [job.seed for _, _, job in sim._jobs(spec, None)]
    assert len(set(seeds)) == len(seeds) == 2 * 29
    assert all(s % 2 == 1 for s in seeds)
    assert sim.derive_seed(7, "mode1", "train/normal") != sim.derive_seed(7, "mode4", "train/normal")


# ---- generated recording -------------------------------------------------------------------------


def test_layout_labels_and_runs(cached: tuple[Path, ProcessRecording]) -> None:
    _, rec = cached
    assert rec.variable_names == sim.variable_names() and len(rec.variable_names) == 53
    per_fault_run = int((TINY["hours_before_fault"] + TINY["hours_after_fault"]) * SAMPLES_PER_HOUR)
    onset = int(TINY["hours_before_fault"] * SAMPLES_PER_HOUR)
    normal = int(TINY["normal_hours"] * SAMPLES_PER_HOUR)
    for part in (rec.train, rec.test):
        assert part.x.dtype == np.float32 and part.label.dtype == np.int64 and part.run.dtype == np.int32
        assert part.x.shape[1] == 53 and np.isfinite(part.x).all()
        assert len(part.x) == len(part.label) == len(part.run)
        np.testing.assert_array_equal(np.unique(part.run), [0, 1, 2])
        assert np.all(np.diff(part.run) >= 0)  # runs are contiguous blocks
        assert np.all(part.label[part.run == 0] == 0) and (part.run == 0).sum() == normal
        for run, fault in enumerate(TINY["faults"], start=1):
            labels = part.label[part.run == run]
            assert len(labels) <= per_fault_run  # IDV6 may shut the plant down early: kept as recorded
            np.testing.assert_array_equal(labels[:onset], 0)
            np.testing.assert_array_equal(labels[onset:], fault)
        assert np.ptp(part.x[:, -1]) == 0  # the agitator speed is constant
    # Train and test, and the runs within a split, each have their own noise.
    assert not np.array_equal(rec.train.x[rec.train.run == 0], rec.test.x[rec.test.run == 0])
    assert not np.array_equal(rec.train.x[rec.train.run == 1][:onset], rec.train.x[rec.train.run == 2][:onset])


def test_same_spec_is_identical_serial_or_parallel(cached: tuple[Path, ProcessRecording], tmp_path: Path) -> None:
    _, rec = cached
    again = generate(PlantProcessSpec(**TINY), tmp_path, workers=1)
    for name in ("train", "test"):
        a, b = rec.split(name), again.split(name)
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_array_equal(a.run, b.run)


def test_other_seed_gives_other_data(cached: tuple[Path, ProcessRecording], tmp_path: Path) -> None:
    _, rec = cached
    other = generate(PlantProcessSpec(**{**TINY, "seed": 8}), tmp_path)
    assert other.train.x.shape[1] == 53
    assert not np.array_equal(rec.train.x[rec.train.run == 0], other.train.x[other.train.run == 0])


def test_second_call_hits_the_cache(cached: tuple[Path, ProcessRecording], monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir, rec = cached
    assert [p.name for p in cache_dir.iterdir()] == [sim.cache_path(rec.spec, cache_dir).name]  # no temp files left

    def boom(*_: object, **__: object) -> None:
        raise AssertionError("simulated although the recording is cached")

    monkeypatch.setattr(sim, "simulate", boom)
    monkeypatch.setattr(sim, "_simulate_run", boom)
    monkeypatch.setattr(sim, "_warm_up", boom)
    hit = generate(PlantProcessSpec(**TINY), cache_dir)
    np.testing.assert_array_equal(hit.train.x, rec.train.x)
    assert hit.spec == rec.spec


def test_corrupt_cache_is_regenerated(cached: tuple[Path, ProcessRecording], tmp_path: Path) -> None:
    _, rec = cached
    path = sim.cache_path(rec.spec, tmp_path)
    path.write_bytes(b"PK\x03\x04 truncated")
    again = generate(PlantProcessSpec(**TINY), tmp_path)
    np.testing.assert_array_equal(again.test.x, rec.test.x)
    assert load_recording(path).spec == rec.spec


# ---- reading a plant's file ----------------------------------------------------------------------


def test_round_trip(cached: tuple[Path, ProcessRecording], tmp_path: Path) -> None:
    _, rec = cached
    sim.save_recording(rec, tmp_path / "plant.npz")
    back = load_recording(tmp_path / "plant.npz")
    np.testing.assert_array_equal(back.test.label, rec.test.label)
    assert back.spec == rec.spec and back.variable_names == rec.variable_names


def test_missing_and_non_npz_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_recording(tmp_path / "absent.npz")
    (tmp_path / "notes.npz").write_text("not an archive")
    with pytest.raises(DataError, match="not an .npz archive"):
        load_recording(tmp_path / "notes.npz")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("train_label"), "missing array.*train_label"),
        (lambda a: a.update(test_x=a["test_x"].astype(np.float64)), "'test_x' must be float32"),
        (lambda a: a.update(train_x=a["train_x"][:, :41]), r"'train_x' must have shape"),
        (lambda a: a.update(train_run=a["train_run"][:-1]), "must have shape"),
        (lambda a: a["train_x"].__setitem__((3, 5), np.nan), "non-finite"),
        (lambda a: a["test_label"].__setitem__(0, 3), r"holds \[3\]"),
        (lambda a: a.update(spec_json=np.asarray("{}")), "spec_json"),
        (lambda a: a["test_run"].__setitem__(-1, 3), r"run indices in 0\.\.2"),  # one repeat of 1 + 2 runs
    ],
)
def test_malformed_recording(cached: tuple[Path, ProcessRecording], tmp_path: Path, change, message: str) -> None:
    cache_dir, rec = cached
    arrays = _arrays(sim.cache_path(rec.spec, cache_dir))
    change(arrays)
    bad = tmp_path / "bad.npz"
    with open(bad, "wb") as fh:
        np.savez(fh, **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_recording(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_copied_recording_is_readable_elsewhere(cached: tuple[Path, ProcessRecording], tmp_path: Path) -> None:
    """A plant receives the file under any name: nothing ties it to the cache location."""
    cache_dir, rec = cached
    target = tmp_path / "plant-1" / "process.npz"
    target.parent.mkdir()
    shutil.copy(sim.cache_path(rec.spec, cache_dir), target)
    assert load_recording(target).spec == rec.spec


# ---- training history ----------------------------------------------------------------------------


def test_history_repeats_only_the_training_runs(cached: tuple[Path, ProcessRecording], tmp_path: Path) -> None:
    """More history appends training runs with their own noise: the shorter history is its prefix, and the
    held-out split is the same recording whatever the history."""
    _, rec = cached
    longer = generate(PlantProcessSpec(**TINY, train_repeats=2), tmp_path, workers=2)
    runs = 1 + len(TINY["faults"])
    first = longer.train.run < runs
    for name in ("x", "label", "run"):
        np.testing.assert_array_equal(getattr(longer.train, name)[first], getattr(rec.train, name))
        np.testing.assert_array_equal(getattr(longer.test, name), getattr(rec.test, name))
    np.testing.assert_array_equal(np.unique(longer.train.run), np.arange(2 * runs))
    again = longer.train.run == runs  # the second fault-free run
    assert np.all(longer.train.label[again] == 0) and again.sum() == (longer.train.run == 0).sum()
    assert not np.array_equal(longer.train.x[again], longer.train.x[longer.train.run == 0])
    for offset, fault in enumerate(TINY["faults"], start=1):
        np.testing.assert_array_equal(np.unique(longer.train.label[longer.train.run == runs + offset]), [0, fault])
    assert load_recording(sim.cache_path(longer.spec, tmp_path)).spec.train_repeats == 2
    seeds = [job.seed for _, _, job in sim._jobs(longer.spec, None)]
    assert len(set(seeds)) == len(seeds) == 3 * runs


def test_one_repeat_keeps_the_fingerprint_recordings_had_before_repeats() -> None:
    """Caches made before train_repeats existed stay valid: the default is left out of the fingerprint."""
    import hashlib
    import json

    spec = PlantProcessSpec(**TINY)
    before = {"spec": {k: v for k, v in spec.model_dump(mode="json").items() if k != "train_repeats"},
              "warmup_hours": spec.warmup_hours, "control_interval_h": sim.CONTROL_INTERVAL_H, "generator_version": sim.GENERATOR_VERSION}
    assert spec.fingerprint() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert PlantProcessSpec(**TINY, train_repeats=2).fingerprint() != spec.fingerprint()
    assert spec.runs("train") == spec.runs("test") == 3 and PlantProcessSpec(**TINY, train_repeats=4).runs("train") == 12
