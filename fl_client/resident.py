"""What a ClientApp process keeps between the messages of one run: the plant's loaded data.

The warm executor (fl_client.warm_exec) runs every message of a run in one resident process, so the
second message of a round, and every later round, finds the plant's data already decoded, featurised and
fingerprinted instead of reading it again. The data are reused only while the plant's folder is unchanged
(every file's path, size and modification time), so a plant that adds or fixes files mid-run is read again.
"""

from __future__ import annotations

from pathlib import Path

from maxfl.cache import folder_digest
from tasks.base import PlantData, Task, TaskSpec

_loaded: dict[tuple[str, str, int, str], tuple[str, PlantData]] = {}


def plant_data(task: Task, data_dir: Path, seed: int, spec: TaskSpec) -> PlantData:
    """`task.load_plant_data`, once per (task, folder, seed, spec) while the folder's files stay the same."""
    key = (task.name, str(data_dir.resolve()), seed, spec.model_dump_json())
    digest = folder_digest(data_dir) if data_dir.is_dir() else ""
    if (hit := _loaded.get(key)) is not None and hit[0] == digest:
        return hit[1]
    data = task.load_plant_data(data_dir, seed, spec)
    _loaded.clear()  # one plant, one run at a time: keep the newest data only
    _loaded[key] = (digest, data)
    return data
