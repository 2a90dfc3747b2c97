"""A supplier's own data, as a new user brings it: `maxfl federate --data PLANT=DIR` on folders this repo never saw.

Real processes on loopback (MLflow, SuperLink, proxy, SuperNodes, edge servers). The folders are generated here,
in schemas unlike the demo's; after each run they are byte-identical to what the user put there.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from maxfl.atomic import atomic_write_text
from maxfl.errors import DataError
from launcher.federation import FederationSettings, LocalFederation, find_app_dir
from tasks.manifest import MANIFEST_FILE, Manifest, dump_manifest
from tests.e2e.test_local_federation import _assert_nothing_left

pytestmark = pytest.mark.e2e

# The gate's absolute floors are off: two short rounds on a few hundred rows are about the path, not the model.
LENIENT_GATE = {"gate-floor": -1e9, "gate-trivial-margin": -1.0}


def _press_table(folder: Path, rows: int, seed: int, labels: tuple[str, str] = ("ok", "fail")) -> Path:
    """A press line's log in its own schema: torque and cycle time decide failures; one plant's lots differ."""
    rng = np.random.default_rng(seed)
    torque = rng.normal(80, 10, rows)
    cycle = rng.normal(12, 2, rows)
    lots = rng.choice(np.array(["L1", "L2", "L3"]), rows)
    failed = (torque - 80) / 10 + (cycle - 12) / 2 + rng.normal(0, 0.5, rows) > 1.0
    frame = pd.DataFrame({"torque_nm": torque.round(2), "cycle_s": cycle.round(2), "supplier_lot": lots,
                          "result": np.where(failed, labels[1], labels[0])})
    folder.mkdir(parents=True)
    frame.to_csv(folder / "press.csv", index=False)
    manifest = Manifest(kind="table", path="press.csv", target="result",  # type: ignore[arg-type]
                        columns={"torque_nm": "numeric", "cycle_s": "numeric", "supplier_lot": "categorical"})
    atomic_write_text(folder / MANIFEST_FILE, dump_manifest(manifest))
    return folder


def _weld_images(folder: Path, per_class: int, seed: int) -> Path:
    """Grey 48x48 weld seams: a clean bead, or one with a dark pore; an image folder per class."""
    rng = np.random.default_rng(seed)
    for label in ("clean", "pore"):
        (folder / "images" / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.normal(150, 12, (48, 48))
            pixels[20:28, :] += 40  # the bead
            if label == "pore":
                y, x = rng.integers(18, 30), rng.integers(6, 42)
                pixels[y - 3:y + 3, x - 3:x + 3] = 40
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L").save(folder / "images" / label / f"{i:03d}.png")
    manifest = Manifest(kind="images", path="images", image_mode="L", image_size=(48, 48))  # type: ignore[arg-type]
    atomic_write_text(folder / MANIFEST_FILE, dump_manifest(manifest))
    return folder


def _contents(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_own_tables_train_release_and_reach_the_edge_as_a_first_release_beside_the_demo_champion(tmp_path):
    work = tmp_path / "work"
    # The demo first (simulation, same workdir and MLflow store): its champion holds the demo's schema.
    demo = LocalFederation(FederationSettings(app_dir=find_app_dir(), workdir=work, mode="simulation", plants=2, examples_per_plant=80,
                                              run_overrides={"task": "table", "num-server-rounds": 1, **LENIENT_GATE}), echo=print)
    assert demo.run().gate == "passed"
    data = {"site-a": _press_table(tmp_path / "mine" / "site-a", 300, 1), "site-b": _press_table(tmp_path / "mine" / "site-b", 240, 2)}
    before = {p: _contents(d) for p, d in data.items()}
    own = LocalFederation(FederationSettings(app_dir=find_app_dir(), workdir=work, data=data, plants=2, max_epsilon=50.0,
                                             run_overrides={"task": "table", "num-server-rounds": 2, **LENIENT_GATE}), echo=print)
    result = own.run()
    assert result.gate == "passed", result.gate_summary
    assert [r["plant"] for r in result.plants] == ["site-a", "site-b"]  # the user's plant ids
    assert all(0.0 <= r["eval_macro_f1"] <= 1.0 and 0.0 <= r["eval_auroc"] <= 1.0 and r["epsilon_run"] > 0 for r in result.plants)
    client = MlflowClient(f"sqlite:///{work / 'mlflow' / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("maxfl-table", "champion")
    assert str(champion.version) == "2" and champion.run_id == result.mlflow_run_id  # not gated against the demo's v1
    assert json.loads(champion.tags["maxfl.metrics"])["champion_aggregate"] is None  # other data: a first release
    assert all(r["served"] == "maxfl-table v2" or r["served"].startswith("maxfl-table v2 (") for r in result.plants), result.plants
    events = [json.loads(line) for line in own.audit_log.read_text().splitlines()]
    assert any(e["event"] == "release.other_data" and e["details"]["champion"] == 1 for e in events)
    assert {p: _contents(d) for p, d in data.items()} == before, "maxfl wrote into a user's data folder"
    _assert_nothing_left(own)


def test_plants_with_other_label_names_are_named_before_anything_starts(tmp_path):
    data = {"site-a": _press_table(tmp_path / "site-a", 120, 1), "site-b": _press_table(tmp_path / "site-b", 120, 2),
            "site-c": _press_table(tmp_path / "site-c", 120, 3, labels=("no", "yes"))}
    federation = LocalFederation(FederationSettings(app_dir=find_app_dir(), workdir=tmp_path / "work", data=data, plants=3,
                                                    run_overrides={"task": "table"}), echo=print)
    with pytest.raises(DataError) as exc:
        federation.__enter__()
    message = str(exc.value)
    assert "site-c: labels 'no', 'yes' are at no other plant (its labels: 'no', 'yes'; the others': 'fail', 'ok')" in message
    assert not (tmp_path / "work" / "mlflow").exists() and federation.procs.procs == []  # nothing was started


def test_a_folder_that_is_not_maxfls_demo_data_is_never_replaced(tmp_path):
    settings = FederationSettings(app_dir=find_app_dir(), workdir=tmp_path / "work", plants=2, examples_per_plant=40,
                                  run_overrides={"task": "table"})
    LocalFederation(settings, echo=print).prepare_data("table", seed=42)
    mine = tmp_path / "work" / "plants" / "plant-1"
    (mine / "quality.csv").write_text("my,own\n1,2\n")  # a user copies their data over the demo's
    with pytest.raises(DataError, match=r"plant-1 is not maxfl's demo data .* --data plant-1=DIR"):
        LocalFederation(settings.model_copy(update={"plants": 3}), echo=print).prepare_data("table", seed=42)
    assert (mine / "quality.csv").read_text() == "my,own\n1,2\n"


def test_own_image_folders_through_the_command_and_a_failed_gate_exits_non_zero(tmp_path):
    data = {"line-1": _weld_images(tmp_path / "line-1", 30, 1), "line-2": _weld_images(tmp_path / "line-2", 24, 2)}
    before = {p: _contents(d) for p, d in data.items()}
    out = tmp_path / "result.json"
    # No model scores a macro-F1 of 2: the gate must fail, and the command must say so with a non-zero exit.
    run = subprocess.run([sys.executable, "-m", "maxfl", "federate", "--task", "images", "--rounds", "1", "--workdir", str(tmp_path / "work"),
                          "--data", f"line-1={data['line-1']}", "--data", f"line-2={data['line-2']}", "--max-epsilon", "50",
                          "--set", "gate-floor=2.0", "--json", str(out)], capture_output=True, text=True, timeout=1500, check=False)
    assert run.returncode == 5, run.stdout[-3000:] + run.stderr[-3000:]
    assert "the model did not pass the gate, so nothing new was released" in run.stderr and "Traceback" not in run.stderr
    result = json.loads(out.read_text())
    assert result["gate"] == "failed" and [r["plant"] for r in result["plants"]] == ["line-1", "line-2"]
    assert all("eval_macro_f1" in r for r in result["plants"])
    assert "line-1" in run.stdout and "macro_f1" in run.stdout  # the per-plant table
    assert {p: _contents(d) for p, d in data.items()} == before
