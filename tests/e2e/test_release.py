"""The release chain with real processes: train -> gate -> register -> push -> the edge serves it -> roll back."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from fl_server.release.registry import CANDIDATE, CHAMPION, Registry
from launcher.federation import FederationSettings, LocalFederation, find_app_dir
from maxfl.release import sha256_hex

from .test_local_federation import _assert_nothing_left

pytestmark = pytest.mark.e2e

MODEL = "maxfl-defect"
MAXFL = str(Path(sys.executable).parent / "maxfl")


def _real_cell_png(plant_dir: Path) -> bytes:
    """A real ELPV cell from the plant's own shard, as the PNG file a line camera would send."""
    with np.load(plant_dir / "defect.npz") as shard:
        pixels = shard["images"][0]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _predict(fed: LocalFederation, plant: str, png: bytes) -> dict:
    r = httpx.post(f"{fed.edge_urls[plant]}/v1/predict", content=png, headers={"content-type": "image/png"}, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-model-version"] == f"{MODEL}/{body['model']['version']}"
    assert set(body["predictions"][0]["probabilities"]) == {"good", "defective"}
    return body


def _serves(fed: LocalFederation, plant: str, version: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (fed.edge_health(plant).get("model") or {}).get("version") != version:
        assert time.monotonic() < deadline, f"{plant} does not serve v{version}: {fed.edge_health(plant)}"
        time.sleep(0.2)


def _maxfl(*args: str, flwr_home: Path | None = None) -> str:
    env = {**os.environ, **({"FLWR_HOME": str(flwr_home)} if flwr_home else {})}
    out = subprocess.run([MAXFL, *args], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_train_gate_register_push_serve_and_roll_back(tmp_path):
    settings = FederationSettings(
        app_dir=find_app_dir(), workdir=tmp_path / "work", plants=2, examples_per_plant=80,
        # One DP round on 80 cells may or may not beat a constant answer (DP noise): the trivial-baseline rule is
        # off here (tests/fl_server/release/test_gate.py checks it), so the release path is what this test decides.
        run_overrides={"num-server-rounds": 1, "gate-trivial-margin": -1.0},
    )
    fed = LocalFederation(settings, echo=print)
    with fed:
        png = _real_cell_png(fed.plants[0].data_dir)
        anchor = ("--model", MODEL, "--tracking-uri", fed.tracking_uri)
        registry = Registry(fed.tracking_uri, MODEL)

        # a first model: no champion to beat, no floor by default -> champion, pushed, served everywhere
        first = fed.submit_run()
        assert "champion: maxfl-defect v1" in first.release
        for plant in ("plant-1", "plant-2"):
            assert f"{plant} edge server {fed.edge_urls[plant]} serves {MODEL} v1" in first.release
            assert _predict(fed, plant, png)["model"]["version"] == 1

        # a second model the gate refuses: registered as `candidate` with its lineage, never pushed
        # (any per-plant regression is tolerated, so the margin is the one reason it fails)
        second = fed.submit_run({"gate-margin": 1.0, "gate-tolerance": 1.0})
        v2 = registry.version(2)
        assert v2.aliases == [CANDIDATE] and v2.gate == "failed" and "below the margin 1" in v2.gate_summary
        assert registry.champion().version == 1
        assert _predict(fed, "plant-2", png)["model"]["version"] == 1
        tags = v2.tags
        assert v2.run_id == tags["maxfl.run_id"] == second.mlflow_run_id and tags["flwr.run_id"] == str(second.flwr_run_id)
        assert tags["maxfl.rounds"] == "1" and tags["maxfl.plants"] == "plant-1,plant-2"
        for plant in fed.plants:
            run_epsilon, lifetime = float(tags[f"maxfl.epsilon.{plant.plant_id}"]), float(tags[f"maxfl.epsilon-lifetime.{plant.plant_id}"])
            assert 0 < run_epsilon <= 3.0 < lifetime  # this model's own spend; the data set's over both runs
            assert len(tags[f"maxfl.data.{plant.plant_id}"]) == 64
        table = json.loads(tags["maxfl.metrics"])
        assert [row["plant"] for row in table["plants"]] == ["plant-1", "plant-2"]
        assert all(row["onnx_max_abs_diff"] < 1e-4 and row["champion"] is not None for row in table["plants"])
        report = Path(registry.client.download_artifacts(second.mlflow_run_id, "gate/report.md", str(tmp_path))).read_text()
        assert report.startswith("# Release gate: FAILED") and "| plant-2 |" in report and "## Why it failed" in report

        # plant-2 goes offline; the anchor overrules the gate by hand and pushes through the federation:
        # plant-1 installs v2, plant-2 is left pending and still serves what it had
        fed.stop_plant("plant-2")
        assert "champion v1 -> v2" in _maxfl("model", "promote", "2", *anchor)
        out = _maxfl("model", "push", "--federation", "local", *anchor, flwr_home=fed.cli_home)
        assert "plant-1: v2 installed" in out and "plant-2: v2 pending" in out
        _serves(fed, "plant-1", 2)
        status = json.loads(_maxfl("model", "status", "--json", *anchor))
        assert {p["plant"]: (p["version"], p["status"]) for p in status["plants"]} == {"plant-1": (2, "installed"), "plant-2": (2, "pending")}
        assert _predict(fed, "plant-2", png)["model"]["version"] == 1

        # back online, plant-2 receives it first thing in the anchor's next run
        fed.restart_plant("plant-2")
        _maxfl("model", "push", "--federation", "local", *anchor, flwr_home=fed.cli_home)
        _serves(fed, "plant-2", 2)
        assert registry.edge()["plant-2"].status == "installed"
        for plant in fed.plants:
            stored = (plant.edge_store_path() / MODEL / "2" / "model.onnx").read_bytes()
            assert sha256_hex(stored) == tags["maxfl.onnx.sha256"]  # the bytes at the edge are the ones registered
        assert _predict(fed, "plant-1", png)["model"]["version"] == 2

        # the plant rolls back on its own, in one command; its edge server follows within a second
        assert "v2 -> v1" in _maxfl("edge", "rollback", "--node-config", fed.plants[0].as_node_config())
        _serves(fed, "plant-1", 1)
        assert _predict(fed, "plant-1", png)["model"]["version"] == 1
        assert _predict(fed, "plant-2", png)["model"]["version"] == 2

        # the anchor rolls plant-2 back through the federation: v1 to plant-2 only
        assert "plant-2: v1 installed" in _maxfl("model", "push", "--version", "1", "--plant", "plant-2", "--federation", "local",
                                                 *anchor, flwr_home=fed.cli_home)
        _serves(fed, "plant-2", 1)
        edge = registry.edge()
        assert (edge["plant-2"].version, edge["plant-2"].status, edge["plant-2"].serving) == (1, "installed", 1)

    # the anchor's CLI reads the same registry when the federation is down
    uri = f"sqlite:///{tmp_path / 'work' / 'mlflow' / 'mlflow.db'}"
    listing = _maxfl("model", "list", "--model", MODEL, "--tracking-uri", uri, "--json")
    assert [(v["version"], v["gate"], v["aliases"]) for v in json.loads(listing)] == [(1, "passed", []), (2, "promoted", [CHAMPION])]
    status = json.loads(_maxfl("model", "status", "--model", MODEL, "--tracking-uri", uri, "--json"))
    assert status["champion"] == 2 and status["candidate"] is None
    # plant-1 rolled back by itself and has not told the anchor since; plant-2 acknowledged v1
    assert {p["plant"]: p["serving"] for p in status["plants"]} == {"plant-1": 2, "plant-2": 1}
    assert "champion v2 -> v1" in _maxfl("model", "demote", "--model", MODEL, "--tracking-uri", uri)
    _assert_nothing_left(fed)
