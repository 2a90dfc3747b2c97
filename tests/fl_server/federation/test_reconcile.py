"""The SuperLink's nodes against plants.json: nodes registered outside maxfl are reported, audited and unregistered."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from fl_server.run.config import RunConfig
from fl_server.federation.provision import PlantBook, PlantRecord, ProvisionError, SuperLinkUnreachable, init_federation
from fl_server.federation.reconcile import reconcile

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def _record(plant: str, node: int, status: str = "active") -> PlantRecord:
    return PlantRecord(plant_id=plant, key_fingerprint="f" * 64, public_key="ecdsa-sha2-nistp384 AAAA", node_id=node, status=status,
                       joined_at=NOW, revoked_at=NOW if status == "revoked" else None)


@pytest.fixture
def fed(tmp_path):
    federation = init_federation(tmp_path / "fed", "acme", "127.0.0.1:9092")
    federation.save_plants(PlantBook(plants={"plant-1": _record("plant-1", 11), "plant-2": _record("plant-2", 12),
                                             "plant-3": _record("plant-3", 13, "revoked")}))
    return federation


class FakeSuperLink:
    def __init__(self, nodes: dict[int, str], refuse: set[int] = frozenset()) -> None:
        self.nodes = dict(nodes)
        self.refuse = refuse
        self.unregistered: list[int] = []

    def ls(self, fed):
        return dict(self.nodes)

    def unregister(self, fed, node):
        if node in self.refuse:
            raise ProvisionError(f"`flwr supernode unregister` failed: node {node} is busy")
        self.unregistered.append(node)
        del self.nodes[node]


def _audit(fed):
    return [json.loads(line) for line in (fed.dir / "audit.jsonl").read_text().splitlines()]


def test_a_node_registered_outside_maxfl_is_reported_audited_and_unregistered(fed):
    link = FakeSuperLink({11: "online", 12: "online", 66: "registered"})
    result = reconcile(fed, lister=link.ls, unregister=link.unregister)
    assert link.unregistered == [66] and result.unregistered == [66]
    assert result.unknown == {66: "not in plants.json"} and result.missing == []
    (event,) = [e for e in _audit(fed) if e["event"] == "node.unknown"]
    assert event["details"] == {"node_id": 66, "status": "registered", "reason": "not in plants.json", "action": "unregistered"}
    assert "1 node(s) registered outside maxfl (66), 1 unregistered" in result.summary()


def test_report_only_leaves_the_node_registered(fed):
    link = FakeSuperLink({11: "online", 12: "online", 66: "online"})
    result = reconcile(fed, lister=link.ls, unregister=link.unregister, remove_unknown=False)
    assert link.unregistered == [] and result.unknown == {66: "not in plants.json"}
    assert [e["details"]["action"] for e in _audit(fed) if e["event"] == "node.unknown"] == ["reported"]


def test_a_revoked_plants_node_still_registered_is_unregistered(fed):
    link = FakeSuperLink({11: "online", 12: "online", 13: "offline"})
    result = reconcile(fed, lister=link.ls, unregister=link.unregister)
    assert link.unregistered == [13] and "plant-3 was revoked" in result.unknown[13]


def test_an_active_plant_unregistered_behind_maxfls_back_is_reported(fed):
    link = FakeSuperLink({11: "online"})
    result = reconcile(fed, lister=link.ls, unregister=link.unregister)
    assert result.missing == ["plant-2"] and not result.clean
    assert [e["details"] for e in _audit(fed) if e["event"] == "node.missing"] == [{"plant": "plant-2", "node_id": 12}]


def test_a_failed_unregistration_is_recorded_and_the_others_still_go(fed):
    link = FakeSuperLink({11: "online", 12: "online", 66: "online", 67: "online"}, refuse={66})
    result = reconcile(fed, lister=link.ls, unregister=link.unregister)
    assert link.unregistered == [67] and "busy" in result.failed[66]
    assert [e["details"]["action"] for e in _audit(fed) if e["event"] == "node.unknown"] == ["unregister failed", "unregistered"]


def test_the_serverapp_reconciles_at_the_start_of_a_run_and_audits_in_the_run_log(fed, tracker):
    from fl_server.run.server_app import reconcile_nodes

    link = FakeSuperLink({11: "online", 12: "online", 66: "online"})
    cfg = RunConfig(federation_dir=str(fed.dir))
    result = reconcile_nodes(cfg, tracker, lister=link.ls, unregister=link.unregister)
    assert result is not None and link.unregistered == [66]
    assert [e for e, _ in tracker.events] == ["node.unknown"]
    assert reconcile_nodes(RunConfig(), tracker) is None  # no federation folder (simulation, demos): nothing to compare


def test_an_unreachable_control_api_is_audited_and_does_not_stop_the_run(fed, tracker):
    from fl_server.run.server_app import reconcile_nodes

    def down(fed):
        raise SuperLinkUnreachable("the SuperLink's Control API at 127.0.0.1:9092 is not reachable")

    assert reconcile_nodes(RunConfig(federation_dir=str(fed.dir)), tracker, lister=down) is None
    assert tracker.events == [("node.reconcile_failed", {"reason": "the SuperLink's Control API at 127.0.0.1:9092 is not reachable"})]


def test_the_node_list_is_read_from_flowers_json_answer(fed, monkeypatch):
    import fl_server.federation.reconcile as module

    answer = {"success": True, "nodes": [{"node-id": "11", "status": "online"}, {"node-id": "66", "status": "unregistered"},
                                         {"node-id": "67", "status": "registered"}]}
    monkeypatch.setattr(module, "_flwr", lambda fed, args: answer if args == ["supernode", "ls"] else pytest.fail(str(args)))
    assert module.flwr_list_nodes(fed) == {11: "online", 67: "registered"}
    monkeypatch.setattr(module, "_flwr", lambda fed, args: {"success": True, "nodes": [{"id": 1}]})
    with pytest.raises(ProvisionError, match="cannot read"):
        module.flwr_list_nodes(fed)


@pytest.mark.e2e
def test_a_key_registered_behind_maxfls_back_is_unregistered_at_a_real_superlink(tmp_path):
    import os
    import socket
    import ssl
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from fl_client.join import keygen
    from fl_server.federation.provision import QUIET_ENV, add_plant, flwr_register, superlink_argv
    from fl_server.federation.reconcile import flwr_list_nodes

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fed = init_federation(tmp_path / "fed", "local", f"127.0.0.1:{port}", control_address=f"127.0.0.1:{port}")
    bin_dir = Path(sys.executable).parent
    argv = superlink_argv(fed, bin_dir, "127.0.0.1", port, tmp_path / "state.db")
    with (tmp_path / "superlink.log").open("w") as out:
        link = subprocess.Popen(argv, env={**os.environ, **QUIET_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}, stdout=out, stderr=subprocess.STDOUT)
    try:
        tls = ssl.create_default_context(cafile=str(fed.ca_cert))
        while link.poll() is None:
            try:
                urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=1, context=tls)
                break
            except OSError:
                time.sleep(0.2)
        assert link.poll() is None, (tmp_path / "superlink.log").read_text()[-2000:]
        (tmp_path / "p1").mkdir(), (tmp_path / "rogue").mkdir()
        plant, _ = add_plant(fed, "plant-1", keygen(tmp_path / "p1")[1])
        rogue = flwr_register(fed, keygen(tmp_path / "rogue")[1], "rogue")  # what an attacker with Control API access does
        assert set(flwr_list_nodes(fed)) == {plant.node_id, rogue}

        result = reconcile(fed)
        assert result.unknown == {rogue: "not in plants.json"} and result.unregistered == [rogue] and result.missing == []
        assert set(flwr_list_nodes(fed)) == {plant.node_id}
        assert [e["details"]["node_id"] for e in _audit(fed) if e["event"] == "node.unknown"] == [rogue]
    finally:
        link.terminate()
        try:
            link.wait(timeout=20)
        except subprocess.TimeoutExpired:
            link.kill()
            link.wait()
