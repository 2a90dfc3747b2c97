"""A synthetic but plausible quality table per plant: process settings, materials, shifts -> defective or not.

Defects follow a process window: parts fail when the mould runs too hot or too cold (a U-shape a linear
model cannot fit), when the line runs fast for its pressure, with grade-C material in humid air, on the night
shift and on one worn press. Plants differ in their settings, material mix, machines and base defect rate
(non-IID), some sensor readings and grades are missing, and the second plant writes Parquet instead of CSV.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from maxfl.atomic import atomic_path, atomic_write_text
from tasks.manifest import MANIFEST_FILE, Manifest, dump_manifest

ROWS_PER_PLANT = 800
COLUMNS = {
    "temperature_c": "numeric",
    "pressure_bar": "numeric",
    "line_speed_m_min": "numeric",
    "humidity_pct": "numeric",
    "material_grade": "categorical",
    "shift": "categorical",
    "machine": "categorical",
}
TARGET = "defect"


def quality_table(plant: int, rows: int, rng: np.random.Generator) -> pd.DataFrame:
    """Plant `plant` (0-based) of the demo: its own settings and mixes around one shared defect mechanism."""
    temp = rng.normal(210 + (-6, 5, 0, 8, -3)[plant % 5], 7, rows)
    pressure = rng.normal(5.0 + 0.25 * (plant % 3), 0.7, rows)
    speed = rng.normal(42 + 4 * ((plant % 4) - 1.5), 6, rows)
    humidity = np.clip(rng.normal(45 + 8 * ((plant % 3) - 1), 12, rows), 5, 95)
    grades = np.array(["A", "B", "C"])[rng.choice(3, rows, p=np.roll([0.55, 0.3, 0.15], plant))]
    shifts = rng.choice(np.array(["early", "late", "night"]), rows, p=[0.4, 0.35, 0.25])
    presses = np.array(["press-1", "press-2", "press-3", "press-4"])
    machines = presses[rng.choice(4, rows, p=rng.dirichlet(np.full(4, 2.0)))]

    t, s, p, h = (temp - 210) / 7, (speed - 42) / 6, (pressure - 5.1) / 0.7, (humidity - 45) / 12
    logit = (
        -4.4
        + 0.2 * (plant % 3)
        + 1.2 * t**2
        + 1.5 * np.maximum(s - p, 0)
        + 0.9 * (grades == "C")
        + 0.3 * (grades == "B")
        + 1.0 * ((grades == "C") & (h > 0.8))
        + 0.6 * (shifts == "night")
        + 0.9 * (machines == "press-4")
    )
    defect = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)

    frame = pd.DataFrame(
        {
            "temperature_c": temp.round(1),
            "pressure_bar": pressure.round(2),
            "line_speed_m_min": speed.round(1),
            "humidity_pct": humidity.round(0),
            "material_grade": grades.astype(object),
            "shift": shifts,
            "machine": machines,
            TARGET: defect,
        }
    )
    for column, rate in (("temperature_c", 0.03), ("humidity_pct", 0.08), ("material_grade", 0.02)):
        frame.loc[rng.random(rows) < rate, column] = None  # sensor dropouts, unrecorded lots
    return frame


def write_quality_plants(root: Path, n_plants: int, seed: int, limit: int | None = None) -> list[Path]:
    dirs = []
    for k in range(n_plants):
        plant_dir = root / f"plant-{k + 1}"
        frame = quality_table(k, limit or ROWS_PER_PLANT, np.random.default_rng([seed, k]))
        file = plant_dir / ("quality.parquet" if k % 2 == 1 else "quality.csv")
        with atomic_path(file) as tmp:
            if file.suffix == ".parquet":
                frame.to_parquet(tmp, index=False)
            else:
                frame.to_csv(tmp, index=False)
        manifest = Manifest(kind="table", path=file.name, target=TARGET, columns=COLUMNS)  # type: ignore[arg-type]
        atomic_write_text(plant_dir / MANIFEST_FILE, dump_manifest(manifest))
        dirs.append(plant_dir)
    return dirs
