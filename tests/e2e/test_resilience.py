"""Crashes with real processes: a plant killed mid-round, and the ServerApp killed mid-run then resumed."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fl_server.run.checkpoint import CHECKPOINT_TAG
from fl_server.run.tracking import FLWR_RUN_IDS_TAG
from maxfl.audit import AuditLog
from maxfl.errors import ProcessError
from launcher.federation import FederationSettings, LocalFederation
from launcher.processes import descendants

from .test_local_federation import _assert_nothing_left
from .test_secure_federation import _app_snapshot

pytestmark = pytest.mark.e2e

ROUNDS = 4
ROUND_TIMEOUT_S = 120.0


def _wait(what: str, ready, runner: threading.Thread, timeout_s: float = 180.0) -> None:
    """Until `ready()`; fails at once if the run (`runner`) ended first."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert runner.is_alive(), f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _kill(fed: LocalFederation, names: tuple[str, ...]) -> None:
    """SIGKILL, as a power cut would: no clean shutdown. Taken out of the federation's watch list first, so the
    launcher does not stop the run itself (a plant dying is the point)."""
    for managed in [m for m in fed.procs.procs if m.name in names]:
        fed.procs.procs.remove(managed)
        for pid in [*descendants(managed.popen.pid), managed.popen.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        managed.popen.wait(timeout=30)


def _rounds_in_ledger(fed: LocalFederation, plant_id: str) -> set[int]:
    plant = next(p for p in fed.plants if p.plant_id == plant_id)
    if not plant.ledger_path().exists():
        return set()
    return {e.server_round for ds in plant.privacy().ledger.read().data_sets.values() for e in ds.entries}


def _mlflow_run(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]) if exp else []
    return runs[0] if runs else None


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    work = tmp_path_factory.mktemp("resilience")
    settings = FederationSettings(
        app_dir=_app_snapshot(work / "app"), workdir=work / "work", plants=3, examples_per_plant=40,
        # A plant that dies mid-round holds its round no longer than this (Flower's default: 900 s); long enough
        # that a healthy round on a loaded machine never reaches it.
        run_overrides={"num-server-rounds": ROUNDS, "release": False, "round-timeout-s": ROUND_TIMEOUT_S},
    )
    with LocalFederation(settings, echo=print) as fed:
        yield fed
    _assert_nothing_left(fed)


def test_a_plant_killed_mid_round_does_not_stop_the_run_and_rejoins_later(federation):
    fed = federation
    client = MlflowClient(fed.tracking_uri)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=fed.submit_run({"experiment-name": "plant-crash"})))
    runner.start()
    # The ledger records a round before training starts: once round 2 is there, plant-3 is mid-round.
    _wait("plant-3 to start round 2", lambda: 2 in _rounds_in_ledger(fed, "plant-3"), runner)
    _kill(fed, ("supernode-plant-3", "warm-exec-plant-3"))
    # It comes back (same key, data and ledger) while the run goes on: once the SuperLink has counted the dead
    # SuperNode offline, the restart is accepted (restart_plant returns when it is connected).
    fed.restart_plant("plant-3")
    runner.join(timeout=400)
    assert not runner.is_alive() and "result" in outcome, outcome
    run = client.get_run(outcome["result"].mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags[CHECKPOINT_TAG] == str(ROUNDS)
    assert _steps(client, run.info.run_id, "round_wall_s") == list(range(1, ROUNDS + 1))
    trained = {p: set(_steps(client, run.info.run_id, f"{p}/train_time_s")) for p in ("plant-1", "plant-2", "plant-3")}
    assert trained["plant-1"] == trained["plant-2"] == set(range(1, ROUNDS + 1))
    assert 1 in trained["plant-3"] and 2 not in trained["plant-3"]  # died in round 2: its update never came
    # Whether it was back in time for round 3 or 4 depends on how fast the rounds go; the next run samples it.
    again = fed.submit_run({"experiment-name": "plant-crash", "num-server-rounds": 1, "target-epsilon": 0.5})
    assert _steps(client, again.mlflow_run_id, "plant-3/train_time_s") == [1], "plant-3 did not rejoin"


def test_the_serverapp_killed_mid_run_resumes_in_the_same_mlflow_run_with_no_round_lost_or_twice(federation):
    fed = federation
    client = MlflowClient(fed.tracking_uri)
    failed: dict = {}

    def first_attempt() -> None:
        try:
            fed.submit_run({"experiment-name": "server-crash"})
        except ProcessError as exc:
            failed["error"] = str(exc)

    runner = threading.Thread(target=first_attempt)
    runner.start()
    _wait("the first checkpoint", lambda: (r := _mlflow_run(client, "server-crash")) is not None
          and int(r.data.tags.get(CHECKPOINT_TAG, 0)) >= 1, runner)
    executor = next(m for m in fed.procs.procs if m.name == "superexec")  # the anchor's, which checked the app's hash
    serverapps = [p for p in descendants(executor.popen.pid) if b"maxfl-serverapp" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(serverapps) == 1
    os.kill(serverapps[0], signal.SIGKILL)
    runner.join(timeout=300)
    assert not runner.is_alive() and "failed" in failed.get("error", ""), failed
    crashed = _mlflow_run(client, "server-crash")
    done = int(crashed.data.tags[CHECKPOINT_TAG])
    assert 1 <= done < ROUNDS and crashed.info.status == "RUNNING"  # killed: nobody ended the MLflow run

    result = fed.submit_run({"experiment-name": "server-crash", "resume": crashed.info.run_id})
    assert result.mlflow_run_id == crashed.info.run_id  # the same MLflow run, not a new one
    run = client.get_run(crashed.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[CHECKPOINT_TAG] == str(ROUNDS)
    assert run.data.tags[FLWR_RUN_IDS_TAG].split(",")[-1] == str(result.flwr_run_id)
    assert len(run.data.tags[FLWR_RUN_IDS_TAG].split(",")) == 2
    for key in ("round_wall_s", "eval_macro_f1", "plant-1/train_time_s"):
        assert _steps(client, run.info.run_id, key) == list(range(1, ROUNDS + 1)), key  # every round, each once
    # The plants count the resumed run as one run (its noise plan carries over). A round the crash cut short
    # may have been trained and is counted again when it is redone: over-counted, never under-counted.
    first_flwr, second_flwr = (int(i) for i in run.data.tags[FLWR_RUN_IDS_TAG].split(","))
    for plant in fed.plants:
        (data_set,) = plant.privacy().ledger.read().data_sets.values()
        assert second_flwr not in data_set.runs()
        rounds = [e.server_round for e in data_set.entries if e.run_id == first_flwr]
        assert set(rounds) == set(range(1, ROUNDS + 1)) and len(rounds) <= ROUNDS + 1, rounds
        assert len({e.noise_multiplier for e in data_set.entries if e.run_id == first_flwr}) == 1
    events = [e.event for e in AuditLog(Path(run.data.params["audit-log"])).events()]
    assert "run.resumed" in events and "run.finished" in events
