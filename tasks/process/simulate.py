"""Tennessee Eastman process recordings for one plant: normal operation plus faulted runs.

A plant's private data is a recording of its own process (one operating mode, its own noise) in
two splits, train and test. Each split has one fault-free run and, per fault, one run that starts
in normal operation and switches the fault on; the training split can hold several such repeats
(`train_repeats`, each with its own noise): the plant's longer history. Samples carry the 41 measurements and the 12
implemented manipulated variables, a label (0 normal, else the IDV number) and a run id, so that
time windows are never cut across two runs.

Generation is deterministic in the spec and cached as one .npz file keyed by the spec's
fingerprint; the same file format is what a plant reads as its data (`load_recording`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
from numpy.typing import ArrayLike

from maxfl.atomic import atomic_path
from maxfl.errors import DataError, describe_validation_error
from maxfl.progress import progress

# Bump whenever the generated numbers change for the same spec (simulation, seeding, layout):
# it is part of the fingerprint, so stale caches are never served.
GENERATOR_VERSION = "2"

CONTROL_INTERVAL_H = 0.0005  # the controller's and the kernel's design step
N_MEASUREMENTS = 41
N_MANIPULATED = 12
N_VARIABLES = N_MEASUREMENTS + N_MANIPULATED
N_IDV = 28
SPLITS: tuple[str, ...] = ("train", "test")
MODES: tuple[str, ...] = ("mode1", "mode2", "mode3", "mode4", "mode5", "mode6")

# Hours of closed-loop operation before the plant is stationary at each mode's setpoints.
# Measured (tep-studio 0.2.0, Ricker controller with mode setpoints, 160 h runs): time until the
# share of samples with any variable beyond +-3 sd of the run's last 40 h falls to its long-run
# level (~0.1). Even mode 1 drifts for ~28 h: the base state is not the controller's equilibrium.
WARMUP_HOURS: dict[str, float] = {
    "mode1": 30.0,
    "mode2": 50.0,
    "mode3": 60.0,
    "mode4": 45.0,
    "mode5": 65.0,
    "mode6": 60.0,
}

_ARRAYS = ("x", "label", "run")
_DTYPES: Mapping[str, np.dtype[Any]] = {"x": np.dtype(np.float32), "label": np.dtype(np.int64), "run": np.dtype(np.int32)}


class PlantProcessSpec(pydantic.BaseModel, frozen=True, extra="forbid"):
    """What one plant's recording is made of; equal specs give identical recordings."""

    mode: str
    seed: int
    faults: tuple[int, ...]
    hours_before_fault: float = pydantic.Field(default=2.0, ge=0.0)
    hours_after_fault: float = pydantic.Field(default=10.0, gt=0.0)
    normal_hours: float = pydantic.Field(default=24.0, gt=0.0)
    sample_minutes: float = pydantic.Field(default=3.0, gt=0.0)
    # History: the training split records the fault-free run and every fault run this many times, each with
    # its own noise (a plant's months of operation); the test split keeps one of each, so the held-out
    # recording is the same kind of thing whatever the history.
    train_repeats: int = pydantic.Field(default=1, ge=1, le=1000)

    @pydantic.field_validator("mode")
    @classmethod
    def _known_mode(cls, mode: str) -> str:
        if mode not in MODES:
            raise ValueError(f"unknown operating mode {mode!r}; expected one of {', '.join(MODES)}")
        return mode

    @pydantic.field_validator("faults")
    @classmethod
    def _valid_faults(cls, faults: tuple[int, ...]) -> tuple[int, ...]:
        if not faults:
            raise ValueError("at least one fault (IDV number 1..28) is needed")
        bad = [f for f in faults if not 1 <= f <= N_IDV]
        if bad:
            raise ValueError(f"fault numbers must be IDV 1..{N_IDV}, got {bad}")
        if len(set(faults)) != len(faults):
            raise ValueError(f"faults must be unique, got {list(faults)}")
        return tuple(sorted(faults))

    @pydantic.field_validator("sample_minutes")
    @classmethod
    def _whole_control_steps(cls, minutes: float) -> float:
        steps = minutes / 60.0 / CONTROL_INTERVAL_H
        if abs(steps - round(steps)) > 1e-6:
            raise ValueError(f"sample_minutes must be a multiple of the {CONTROL_INTERVAL_H * 60:g}-minute control step")
        return minutes

    @property
    def warmup_hours(self) -> float:
        """Settling time of the mode: recording starts only once the plant is stationary."""
        return WARMUP_HOURS[self.mode]

    def repeats(self, split: str) -> int:
        """How many times `split` records the fault-free run and each fault run."""
        return self.train_repeats if split == "train" else 1

    def runs(self, split: str) -> int:
        """Runs in `split`: per repeat, the fault-free run then one per fault."""
        return self.repeats(split) * (1 + len(self.faults))

    @property
    def record_every(self) -> int:
        """Control steps per recorded sample."""
        return round(self.sample_minutes / 60.0 / CONTROL_INTERVAL_H)

    def fingerprint(self) -> str:
        """SHA-256 over everything that determines the numbers: the spec, warm-up and generator version."""
        # train_repeats=1 is left out, so recordings made before the field existed keep their fingerprint
        payload = {
            "spec": self.model_dump(mode="json", exclude={"train_repeats"} if self.train_repeats == 1 else None),
            "warmup_hours": self.warmup_hours,
            "control_interval_h": CONTROL_INTERVAL_H,
            "generator_version": GENERATOR_VERSION,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ProcessSplit:
    """One split's samples, runs concatenated in order: per repeat r (train_repeats of them in the training split,
    one in the test split), run r * (1 + faults) is fault-free and the i-th fault's run follows it at offset i."""

    x: np.ndarray  # float32 (T, 53): 41 measurements then 12 implemented manipulated variables
    label: np.ndarray  # int64 (T,): 0 normal, else the IDV number active at that sample
    run: np.ndarray  # int32 (T,): run index, non-decreasing; windows must not cross a change


@dataclass(frozen=True)
class ProcessRecording:
    """A plant's train and test splits with the variable names and the spec that made them."""

    train: ProcessSplit
    test: ProcessSplit
    variable_names: list[str]
    spec: PlantProcessSpec
    generator_version: str = GENERATOR_VERSION

    def split(self, name: str) -> ProcessSplit:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; expected one of {SPLITS}")
        return self.train if name == "train" else self.test


def variable_names() -> list[str]:
    """The 53 column names: tep_studio's measurement names, then its manipulated-variable names."""
    from tep_studio.simulation.schema import TEP_SCHEMA

    return list(TEP_SCHEMA.names("measurements")) + list(TEP_SCHEMA.names("manipulated_variables"))


# ---- seeds -------------------------------------------------------------------------------------


def derive_seed(seed: int, mode: str, purpose: str) -> int:
    """A kernel noise seed for one purpose: the same seed would replay the same noise, so every run
    gets its own, and plants in different modes never share noise. Odd, because the kernel's
    generator is a multiplicative LCG modulo 2**32."""
    digest = hashlib.sha256(f"{seed}/{mode}/{purpose}".encode()).digest()
    return 2 * (int.from_bytes(digest[:8], "big") % (1 << 30)) + 1


# ---- simulation --------------------------------------------------------------------------------

# Controller attributes that make up its memory. tep_studio's reset() re-seeds them from Mode-1
# nominal values, which bumps a plant that already settled elsewhere; carrying them over from the
# warm-up makes the recorded run start bumplessly (measured: first hour within the warm-up's
# normal range, versus hundreds of standard deviations off with a freshly reset controller).
_CONTROLLER_MEMORY = ("_state", "_r1", "_r4", "_fp", "_ramped_production", "_ramped_pct_g", "_ramp_time")


@dataclass(frozen=True)
class SettledPlant:
    """Where warm-up ended: the 50-element plant state and the controller's memory (times relative to the end)."""

    state: np.ndarray
    controller_memory: dict[str, Any]


@dataclass(frozen=True)
class RunJob:
    """One recorded run; a picklable unit of work for a worker process."""

    mode: str
    seed: int
    hours: float
    fault: int  # 0 for the fault-free run
    onset_hours: float
    record_every: int
    start: SettledPlant | None


def _controller_memory(controller: Any, now: float) -> dict[str, Any]:
    missing = [name for name in _CONTROLLER_MEMORY if not hasattr(controller, name)]
    if missing:
        raise RuntimeError(f"tep_studio's controller lacks {missing}; this generator supports tep-studio 0.2")
    memory = {name: getattr(controller, name) for name in _CONTROLLER_MEMORY}
    memory["_state"] = {k: dataclasses.replace(v, last_update_time=v.last_update_time - now) for k, v in memory["_state"].items()}
    memory["_ramp_time"] = memory["_ramp_time"] - now
    return memory


def _make_controller(mode: str, memory: Mapping[str, Any] | None) -> Any:
    """The Ricker controller at the mode's setpoints, resuming `memory` on reset when given."""
    from tep_studio.control.controller import RickerMultiLoopController
    from tep_studio.simulation.modes import mode_setpoints

    class _ResumingController(RickerMultiLoopController):
        def reset(self, measurements: ArrayLike, *, time: float = 0.0) -> None:
            super().reset(measurements, time=time)
            if memory is not None:
                for name, value in memory.items():
                    setattr(self, name, dict(value) if isinstance(value, dict) else value)

    return _ResumingController(setpoints=mode_setpoints(mode))


def _warm_up(mode: str, seed: int, hours: float) -> SettledPlant | None:
    """Run the closed loop until the mode is stationary; None when no warm-up is configured."""
    if hours <= 0:
        return None
    from tep_studio.control.runner import ClosedLoopSimulation

    controller = _make_controller(mode, None)
    loop = ClosedLoopSimulation(controller=controller, control_interval=CONTROL_INTERVAL_H, horizon=hours)
    result = loop.run(seed=float(seed), mode=mode, record_every=max(1, round(hours / CONTROL_INTERVAL_H)))
    if result.terminated:
        raise RuntimeError(f"{mode} shut down during warm-up at {result.final_time:.2f} h (seed {seed})")
    return SettledPlant(state=loop.sim.state.copy(), controller_memory=_controller_memory(controller, loop.sim.time))


def _simulate_run(job: RunJob) -> tuple[np.ndarray, np.ndarray]:
    """Simulate one run and return (x float32 (T, 53), label int64 (T,)).

    A shutdown ends the run early; what was recorded up to the trip is kept.
    """
    from tep_studio.control.runner import ClosedLoopSimulation

    idv_off = np.zeros(N_IDV)
    idv_on = idv_off.copy()
    if job.fault:
        idv_on[job.fault - 1] = 1.0

    def schedule(t: float) -> np.ndarray:
        return idv_on if job.fault and t >= job.onset_hours - 1e-9 else idv_off

    memory = None if job.start is None else job.start.controller_memory
    loop = ClosedLoopSimulation(
        controller=_make_controller(job.mode, memory), control_interval=CONTROL_INTERVAL_H, horizon=job.hours
    )
    result = loop.run(
        seed=float(job.seed),
        mode=job.mode,
        initial_state=None if job.start is None else job.start.state,
        disturbance_schedule=schedule,
        record_every=job.record_every,
    )
    x = np.array([np.concatenate([r.measurements, r.implemented_action]) for r in result.results], dtype=np.float32)
    # The label is what the kernel actually ran each sample's step with.
    active = np.array([job.fault > 0 and r.disturbances[job.fault - 1] != 0.0 for r in result.results], dtype=bool)
    label = np.where(active, job.fault, 0).astype(np.int64)
    return x.reshape(-1, N_VARIABLES), label


def _jobs(spec: PlantProcessSpec, start: SettledPlant | None) -> list[tuple[str, int, RunJob]]:
    """Every run of both splits as (split, run index, job); seeds are derived and all distinct."""
    jobs: list[tuple[str, int, RunJob]] = []
    for split in SPLITS:
        for r in range(spec.repeats(split)):
            first = r * (1 + len(spec.faults))
            tag = "" if r == 0 else f"/repeat{r}"  # repeat 0 keeps the seeds recordings had before repeats existed
            seed = derive_seed(spec.seed, spec.mode, f"{split}/normal{tag}")
            jobs.append((split, first, RunJob(spec.mode, seed, spec.normal_hours, 0, 0.0, spec.record_every, start)))
            for i, fault in enumerate(spec.faults, start=1):
                hours = spec.hours_before_fault + spec.hours_after_fault
                seed = derive_seed(spec.seed, spec.mode, f"{split}/idv{fault:02d}{tag}")
                jobs.append((split, first + i, RunJob(spec.mode, seed, hours, fault, spec.hours_before_fault, spec.record_every, start)))
    seeds = [job.seed for _, _, job in jobs] + [derive_seed(spec.seed, spec.mode, "warmup")]
    if len(set(seeds)) != len(seeds):  # astronomically unlikely; never silently share noise
        raise RuntimeError(f"seed collision for plant seed {spec.seed}; choose another seed")
    return jobs


def simulate(spec: PlantProcessSpec, workers: int | None = None) -> ProcessRecording:
    """Simulate every run of `spec` (no cache). Runs are independent, so they go to a process pool."""
    start = _warm_up(spec.mode, derive_seed(spec.seed, spec.mode, "warmup"), spec.warmup_hours)
    jobs = _jobs(spec, start)
    n_workers = min(len(jobs), workers if workers is not None else (os.cpu_count() or 1))
    # Longest runs first so the pool does not end waiting on one long straggler.
    order = sorted(range(len(jobs)), key=lambda k: -jobs[k][2].hours)
    outputs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    hours = sum(job.hours for _, _, job in jobs)
    with progress(f"simulating {len(jobs)} Tennessee Eastman runs ({hours:.0f} plant hours, once per recording spec)", len(jobs)) as advance:
        if n_workers <= 1:
            for k in order:
                outputs[k] = _simulate_run(jobs[k][2])
                advance(1)
        else:
            with ProcessPoolExecutor(max_workers=n_workers) as pool:
                futures = {pool.submit(_simulate_run, jobs[k][2]): k for k in order}
                for future in as_completed(futures):
                    outputs[futures[future]] = future.result()
                    advance(1)
    parts: dict[str, ProcessSplit] = {}
    for split in SPLITS:
        ks = [k for k, (s, _, _) in enumerate(jobs) if s == split]
        parts[split] = ProcessSplit(
            x=np.concatenate([outputs[k][0] for k in ks]),
            label=np.concatenate([outputs[k][1] for k in ks]),
            run=np.concatenate([np.full(len(outputs[k][1]), jobs[k][1], dtype=np.int32) for k in ks]),
        )
    return ProcessRecording(train=parts["train"], test=parts["test"], variable_names=variable_names(), spec=spec)


def cache_path(spec: PlantProcessSpec, cache_dir: Path) -> Path:
    return cache_dir / f"tep-{spec.fingerprint()[:16]}.npz"


def generate(spec: PlantProcessSpec, cache_dir: Path, workers: int | None = None) -> ProcessRecording:
    """The recording for `spec`: from the cache when present and sound, otherwise simulated and cached.

    A damaged or mismatching cache file is deleted and regenerated: it is only a cache.
    """
    path = cache_path(spec, cache_dir)
    if path.exists():
        try:
            cached = load_recording(path)
            if cached.spec == spec and cached.generator_version == GENERATOR_VERSION:
                return cached
        except DataError:
            pass
        path.unlink(missing_ok=True)
    recording = simulate(spec, workers=workers)
    save_recording(recording, path)
    return recording


# ---- file format -------------------------------------------------------------------------------


def save_recording(rec: ProcessRecording, path: Path) -> None:
    """Write `rec` as one .npz atomically: a reader sees the old file or the complete new one."""
    arrays: dict[str, np.ndarray] = {
        "variable_names": np.asarray(rec.variable_names, dtype=str),
        "spec_json": np.asarray(rec.spec.model_dump_json()),
        "generator_version": np.asarray(rec.generator_version),
    }
    for split in SPLITS:
        part = rec.split(split)
        for name in _ARRAYS:
            arrays[f"{split}_{name}"] = np.ascontiguousarray(getattr(part, name), dtype=_DTYPES[name])
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a bare name
            np.savez_compressed(fh, **arrays)


_REQUIRED = ("variable_names", "spec_json", "generator_version") + tuple(f"{s}_{a}" for s in SPLITS for a in _ARRAYS)


def load_recording(path: Path) -> ProcessRecording:
    """Read and check a recording; every problem is a one-line DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no process recording at {path}: the file does not exist")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not a process recording: not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _REQUIRED if k not in npz.files]
            if missing:
                raise DataError(f"{path} is not a complete process recording: missing array(s) {', '.join(missing)}")
            arrays = {k: npz[k] for k in _REQUIRED}
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise DataError(f"{path} is not a readable process recording ({type(exc).__name__}: {exc})") from None

    try:
        spec = PlantProcessSpec.model_validate_json(str(arrays["spec_json"]))
    except pydantic.ValidationError as exc:
        raise DataError(f"{path}: {describe_validation_error(exc, 'spec_json')}") from None
    names = [str(n) for n in arrays["variable_names"].tolist()] if arrays["variable_names"].ndim == 1 else []
    if names != variable_names():
        raise DataError(f"{path}: 'variable_names' must be the {N_VARIABLES} TEP measurement and manipulated-variable names")

    allowed = np.array((0, *spec.faults))
    parts: dict[str, ProcessSplit] = {}
    for split in SPLITS:
        x, label, run = (arrays[f"{split}_{a}"] for a in _ARRAYS)
        for name, arr in zip(_ARRAYS, (x, label, run)):
            if arr.dtype != _DTYPES[name]:
                raise DataError(f"{path}: '{split}_{name}' must be {_DTYPES[name]}, got {arr.dtype}")
        if x.ndim != 2 or x.shape[1] != N_VARIABLES or x.shape[0] == 0:
            raise DataError(f"{path}: '{split}_x' must have shape (T>0, {N_VARIABLES}), got {x.shape}")
        if label.shape != (len(x),) or run.shape != (len(x),):
            shapes = f"got {label.shape} and {run.shape}"
            raise DataError(f"{path}: '{split}_label' and '{split}_run' must have shape ({len(x)},), {shapes}")
        if not np.isfinite(x).all():
            raise DataError(f"{path}: '{split}_x' holds {int((~np.isfinite(x)).sum())} non-finite value(s)")
        bad = np.setdiff1d(np.unique(label), allowed)
        if bad.size:
            raise DataError(f"{path}: '{split}_label' holds {bad.tolist()}, outside 0 and the spec's faults {list(spec.faults)}")
        if run.min() < 0 or run.max() >= spec.runs(split) or np.any(np.diff(run) < 0):
            raise DataError(f"{path}: '{split}_run' must be non-decreasing run indices in 0..{spec.runs(split) - 1}")
        parts[split] = ProcessSplit(x=x, label=label, run=run)
    return ProcessRecording(
        train=parts["train"],
        test=parts["test"],
        variable_names=names,
        spec=spec,
        generator_version=str(arrays["generator_version"]),
    )
