"""The federation page on crafted state: a real federation folder, a real MLflow store (SQLite) with a run going,
a registry with a champion and the plants' edge records, the anchor's audit log and spend record.

The SuperLink's node list is a stand-in where a test is about the page (its real reader is checked against a
SuperLink that is not there); the browser's view of a live federation is tests/e2e/test_pages_browser.py.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from fl_server.federation.page.app import create_app, default_token_file, page_url, resolve_sources
from fl_server.federation.page.data import NodeState, PageSources, federation_view, recent_deployments
from fl_server.federation.page.plots import bar_chart, line_chart, nice_ticks
from fl_server.federation.provision import PlantBook, PlantRecord, init_federation
from launcher.processes import free_port
from maxfl.audit import AuditLog
from maxfl.errors import ConfigError
from maxfl.page_auth import COOKIE_PREFIX

TOKEN = "p" * 43
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
FP = "a" * 64


@pytest.fixture(autouse=True)
def _mlflow_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """As `maxfl federation page` sets it: a tracking server that is down fails a read at once (no retries)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


# ---------------------------------------------------------------- reading what the page shows
class PageText(HTMLParser):
    """Every element with a data-testid: its attributes and its text (nested elements' text included)."""

    VOID = {"br", "img", "input", "meta", "link", "hr", "circle", "line", "rect", "path"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str], list[str]]] = []
        self._open: list[tuple[str, list[str] | None]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        text: list[str] | None = None
        if "data-testid" in a:
            text = []
            self.found.append((a["data-testid"], a, text))
        if tag not in self.VOID:
            self._open.append((tag, text))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "data-testid" in a:
            self.found.append((a["data-testid"], a, []))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, text in self._open:
            if text is not None:
                text.append(data)

    def all(self, testid: str) -> list[tuple[dict[str, str], str]]:
        return [(a, " ".join("".join(t).split())) for tid, a, t in self.found if tid == testid]

    def text(self, testid: str, **attrs: str) -> str:
        matches = [t for a, t in self.all(testid) if all(a.get(f"data-{k.replace('_', '-')}") == v for k, v in attrs.items())]
        assert len(matches) == 1, f"{testid} {attrs}: {len(matches)} found"
        return matches[0]


def _settled(client: TestClient, path: str) -> str:
    """The page once its sources answered: a first read (a store's first connection, a first `flwr` start) may
    outlast a request's bound, and the page then says so and shows what it has."""
    while "did not answer within" in (html := client.get(path, headers=AUTH).text):
        pass
    return html


def _rows(html: str, row: str, cell: str) -> dict[str, str]:
    """{data-plant (or data-version) of each `row` element: text of the `cell` element inside it}."""
    out: dict[str, str] = {}
    for chunk in re.findall(rf'<tr data-testid="{row}"(.*?)</tr>', html, re.S):
        key = re.search(r'data-(?:plant|version)="([^"]+)"', chunk)
        cell_text = re.search(rf'data-testid="{cell}"[^>]*>(.*?)</td>', chunk, re.S)
        if key and cell_text:
            out[key.group(1)] = " ".join(re.sub(r"<[^>]+>", "", cell_text.group(1)).split())
    return out


# ---------------------------------------------------------------- crafted state
@pytest.fixture(scope="module")
def federation_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("anchor") / "federation"
    port = free_port()  # the SuperLink's own port, where nothing listens: the real node reader finds it down
    fed = init_federation(folder, "acme", f"127.0.0.1:{port - 1 if port > 1024 else port + 1}", control_address=f"127.0.0.1:{port}")
    joined = NOW - timedelta(days=3)
    key = "ssh-ed25519 AAAA plant"
    fed.save_plants(PlantBook(plants={
        "plant-1": PlantRecord(plant_id="plant-1", key_fingerprint="1" * 64, public_key=key, node_id=11, status="active", joined_at=joined),
        "plant-2": PlantRecord(plant_id="plant-2", key_fingerprint="2" * 64, public_key=key, node_id=22, status="active", joined_at=joined),
        "plant-3": PlantRecord(plant_id="plant-3", key_fingerprint="3" * 64, public_key=key, node_id=33, status="revoked", joined_at=joined,
                               revoked_at=NOW - timedelta(days=1)),
    }))
    return folder


def nodes_stand_in(folder: Path) -> dict[int, NodeState]:
    """The SuperLink's node list: plant-1 online, plant-2 offline since an hour, and a node no plant of ours."""
    return {
        11: NodeState(node_id=11, status="online", online_at=NOW - timedelta(minutes=5)),
        22: NodeState(node_id=22, status="offline", online_at=NOW - timedelta(hours=2), offline_at=NOW - timedelta(hours=1)),
        99: NodeState(node_id=99, status="online", online_at=NOW),
    }


@pytest.fixture(scope="module")
def mlflow_state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An MLflow store as the ServerApp leaves it: a finished run with contributions and a release, a run going
    (round 2 of 4) whose plant-2 reports no ceiling, a push run; the registry's champion and edge records."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from fl_server.release.registry import CHAMPION, GATE_SUMMARY_TAG, GATE_TAG, EdgeRecord, Registry

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("maxfl", artifact_location=(folder / "artifacts").as_uri())
    t0 = int((NOW - timedelta(hours=2)).timestamp() * 1000)

    def run(name: str, rounds: int, done: int, contributions: bool, ceiling_2: bool, start: int) -> str:
        r = client.create_run(exp, start_time=start, run_name=name, tags={"maxfl.action": "train", "maxfl.task": "defect",
                                                                           "flwr.run_id": str(start), "maxfl.plants": "plant-1,plant-2"})
        rid = r.info.run_id
        client.log_batch(rid, params=[*(__import__("mlflow").entities.Param(k, v) for k, v in
                                        {"num-server-rounds": str(rounds), "task": "defect", "gate-metric": ""}.items())])
        metrics = []
        for step in range(1, done + 1):
            values = {"eval_macro_f1": 0.4 + 0.1 * step, "round_wall_s": 3.0, "plant-1/dp_epsilon": 0.5 * step, "plant-1/dp_epsilon_ceiling": 8.0,
                      "plant-1/dp_delta": 1e-5, "plant-2/dp_epsilon": 0.7 * step}
            if ceiling_2:
                values["plant-2/dp_epsilon_ceiling"] = math.inf
            metrics += [Metric(k, v, start + step, step) for k, v in values.items()]
        if contributions:
            metrics += [Metric("contribution/plant-1/shapley", 0.12, start, 0), Metric("contribution/plant-2/shapley", -0.03, start, 0),
                        Metric("contribution/plant-1/loo", 0.08, start, 0), Metric("contribution/plant-2/loo", 0.01, start, 0)]
        client.log_batch(rid, metrics=metrics)
        if contributions:
            client.log_dict(rid, {"plants": {"plant-1": 0.12, "plant-2": -0.03}}, "contribution/contributions.json")
        return rid

    finished = run("defect-flwr-1", 3, 3, contributions=True, ceiling_2=True, start=t0)
    client.set_tag(finished, "maxfl.gate", "passed: macro F1 0.700 (first model)")
    client.set_terminated(finished, "FINISHED", end_time=t0 + 60_000)
    going = run("defect-flwr-2", 4, 2, contributions=False, ceiling_2=False, start=t0 + 120_000)
    push = client.create_run(exp, start_time=t0 + 90_000, run_name="push-maxfl-defect-flwr-3", tags={"maxfl.action": "push"})
    client.set_terminated(push.info.run_id, "FINISHED")
    client.create_registered_model("maxfl-defect")
    client.create_model_version("maxfl-defect", source="file:///nowhere", run_id=finished,
                                tags={GATE_TAG: "passed", GATE_SUMMARY_TAG: "passed: macro F1 0.700 (first model)"})
    client.create_model_version("maxfl-defect", source="file:///nowhere", run_id=finished,
                                tags={GATE_TAG: "failed", GATE_SUMMARY_TAG: "failed: plant-2 worse by 0.05"})
    client.set_registered_model_alias("maxfl-defect", CHAMPION, "1")
    Registry(uri, "maxfl-defect").record_edge([
        EdgeRecord(plant="plant-1", version=1, status="installed", at=NOW, detail="installed", serving=1),
        EdgeRecord(plant="plant-2", version=1, status="pending", at=NOW, detail="not connected at push time; delivered when it is back"),
    ])
    return {"uri": uri, "finished": finished, "going": going, "push": push.info.run_id}


@pytest.fixture(scope="module")
def anchor_files(tmp_path_factory: pytest.TempPathFactory, mlflow_state: dict[str, str]) -> dict[str, Path]:
    from fl_server.run.privacy_watch import SpendWatch

    folder = tmp_path_factory.mktemp("state")
    audit = AuditLog(folder / "audit.jsonl")
    audit.record("run.started", "anchor", mlflow_run=mlflow_state["finished"])
    audit.record("model.deployed", "anchor", mlflow_run=mlflow_state["finished"], plant="plant-1", version=1, status="installed", serving=1, detail="installed")
    audit.record("model.deployed", "anchor", mlflow_run=mlflow_state["finished"], plant="plant-2", version=1, status="pending", serving=None,
                 detail="not connected at push time; delivered when it is back")
    watch = SpendWatch(folder / "privacy-watch.json")
    assert watch.check("plant-1", FP, 1.5, delta=1e-5, rounds=3, run=mlflow_state["finished"], server_round=3) is None
    assert watch.check("plant-2", "b" * 64, 2.1, delta=1e-5, rounds=3, run=mlflow_state["finished"], server_round=3) is None
    return {"audit": audit.path, "watch": watch.path}


@pytest.fixture
def sources(federation_dir: Path, mlflow_state: dict[str, str], anchor_files: dict[str, Path]) -> PageSources:
    return PageSources(federation_dir=federation_dir, tracking_uri=mlflow_state["uri"], mlflow_ui="http://mlflow.anchor.example",
                       audit_log=anchor_files["audit"], privacy_watch=anchor_files["watch"])


@pytest.fixture
def client(sources: PageSources) -> Iterator[TestClient]:
    with TestClient(create_app(sources, TOKEN, node_lister=nodes_stand_in), follow_redirects=False) as c:
        yield c


# ---------------------------------------------------------------- the token
@pytest.mark.parametrize("path", ["/", "/part/plants", "/part/run", "/metrics", "/static/page.css", "/static/page.js",
                                  "/runs/" + "0" * 32, "/nothing-here"])
def test_every_path_but_healthz_needs_the_token(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 401 and "needs its token" in r.text
    assert client.get(path, headers={"Authorization": "Bearer not-the-token"}).status_code == 401


def test_healthz_answers_without_the_token(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.text == "ok\n"


def test_the_printed_url_opens_the_page_once_and_leaves_a_cookie(client: TestClient) -> None:
    r = client.get(f"/?token={TOKEN}")
    assert r.status_code == 303 and r.headers["location"] == "/" and r.headers["set-cookie"].startswith(COOKIE_PREFIX)
    page = client.get("/")  # the cookie it set
    assert page.status_code == 200 and "acme" in page.text


def test_pages_carry_a_policy_that_allows_only_their_own_files(client: TestClient) -> None:
    r = client.get("/", headers=AUTH)
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "<script src=\"/static/page.js\"" in r.text and "http://" not in re.sub(r'href="http://mlflow\.anchor\.example[^"]*"', "", r.text.split("<footer>")[0])
    assert "style=" not in r.text and "<script>" not in r.text  # nothing inline: the policy would block it
    assert client.get("/static/page.js", headers=AUTH).status_code == 200
    assert client.get("/static/page.css", headers=AUTH).headers["content-type"].startswith("text/css")


# ---------------------------------------------------------------- what it shows
def test_the_plants_registered_connected_last_seen_and_revoked(client: TestClient) -> None:
    html = client.get("/", headers=AUTH).text
    page = PageText(html)
    assert page.text("federation-name") == "acme"
    assert page.text("plants-active") == "2" and page.text("plants-connected") == "1" and page.text("plants-revoked") == "1"
    assert _rows(html, "plant-row", "plant-connection") == {"plant-1": "online", "plant-2": "offline", "plant-3": "-"}
    assert _rows(html, "plant-row", "plant-registered")["plant-3"].startswith("revoked")
    last_seen = _rows(html, "plant-row", "plant-last-seen")
    assert last_seen["plant-1"] == "now" and last_seen["plant-2"].endswith("ago")
    assert "99 (online)" in page.text("strangers")


def test_the_run_going_is_followed_round_by_round_with_its_curve_and_a_link_to_mlflow(client: TestClient, mlflow_state: dict[str, str]) -> None:
    page = PageText(client.get("/", headers=AUTH).text)
    (current,) = page.all("current-run")
    assert current[0]["data-run-id"] == mlflow_state["going"]
    assert page.text("run-status") == "running"
    assert page.text("run-round-number") == "2" and page.text("run-rounds-planned") == "4"
    assert page.all("metric-curve") and page.text("metric-latest") == "0.6"
    (link,) = page.all("run-mlflow-link")
    assert link[0]["href"].startswith("http://mlflow.anchor.example/#/experiments/") and link[0]["href"].endswith(mlflow_state["going"])
    rows = {a["data-run-id"]: t for a, t in page.all("run-row")}
    assert set(rows) == {mlflow_state["going"], mlflow_state["finished"], mlflow_state["push"]}
    html = client.get("/", headers=AUTH).text
    assert _rows(html.replace("data-run-id", "data-version"), "run-row", "run-row-round")[mlflow_state["finished"]] == "3 of 3"


def test_each_plants_epsilon_against_its_ceiling_and_a_missing_ceiling_said(client: TestClient, mlflow_state: dict[str, str]) -> None:
    html = client.get("/part/run", headers=AUTH).text
    page = PageText(html)
    assert page.all("epsilon-chart")
    assert _rows(html, "epsilon-row", "epsilon-value") == {"plant-1": "1", "plant-2": "1.4"}
    ceilings = _rows(html, "epsilon-row", "epsilon-ceiling")
    assert ceilings == {"plant-1": "8", "plant-2": "not reported"}
    assert _rows(html, "epsilon-row", "epsilon-left")["plant-1"] == "7"
    assert page.text("ceiling-missing").startswith("plant-2 did not report a ceiling")
    # the finished run: plant-2 allows training without DP (an infinite ceiling), which is no line on the chart
    finished = client.get(f"/runs/{mlflow_state['finished']}", headers=AUTH).text
    assert _rows(finished, "epsilon-row", "epsilon-ceiling") == {"plant-1": "8", "plant-2": "∞"}
    assert "ceiling-missing" not in finished and finished.count('class="rule ') == 1


def test_contributions_are_shown_when_the_run_has_them_and_said_missing_otherwise(client: TestClient, mlflow_state: dict[str, str]) -> None:
    html = client.get(f"/runs/{mlflow_state['finished']}", headers=AUTH).text
    assert _rows(html, "contribution-row", "contribution-shapley") == {"plant-1": "0.12", "plant-2": "-0.03"}
    assert _rows(html, "contribution-row", "contribution-loo") == {"plant-1": "0.08", "plant-2": "0.01"}
    assert 'data-testid="contributions-chart"' in html and 'class="bar negative"' in html and "contribution/contributions.json" in html
    going = PageText(client.get("/part/run", headers=AUTH).text)
    assert going.text("contributions-missing") == "Contributions were not computed for this run."


def test_model_versions_with_gate_verdicts_and_what_each_plants_edge_serves(client: TestClient) -> None:
    html = client.get("/part/models", headers=AUTH).text
    page = PageText(html)
    assert page.text("champion-version") == "1"
    assert _rows(html, "version-row", "version-gate") == {"1": "passed", "2": "failed"}
    assert _rows(html, "version-row", "version-aliases") == {"1": "champion", "2": "-"}
    assert _rows(html, "edge-row", "edge-serving") == {"plant-1": "v1", "plant-2": "-"}
    assert _rows(html, "edge-row", "edge-status") == {"plant-1": "installed", "plant-2": "pending"}
    assert {a["data-plant"] for a, _ in page.all("deployment-row")} == {"plant-1", "plant-2"}


def test_the_anchors_spend_record(client: TestClient) -> None:
    html = client.get("/part/privacy", headers=AUTH).text
    assert _rows(html, "privacy-record-row", "privacy-record-epsilon") == {"plant-1": "1.5", "plant-2": "2.1"}


def test_the_live_parts_are_the_page_sections_it_refreshes(client: TestClient) -> None:
    html = client.get("/", headers=AUTH).text
    parts = re.findall(r'data-live="([^"]+)"', html)
    assert parts == ["/part/plants", "/part/run", "/part/runs", "/part/models", "/part/privacy"]
    for part in parts:
        r = client.get(part, headers=AUTH)
        assert r.status_code == 200 and "<html" not in r.text


# ---------------------------------------------------------------- Prometheus
def _metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_metrics_report_plants_runs_the_followed_round_and_epsilon(client: TestClient, mlflow_state: dict[str, str]) -> None:
    r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = _metrics(r.text)
    assert m[("maxfl_plants_registered", (("status", "active"),))] == 2 and m[("maxfl_plants_registered", (("status", "revoked"),))] == 1
    assert m[("maxfl_plants_connected", ())] == 1
    assert m[("maxfl_runs", (("status", "RUNNING"),))] == 1 and m[("maxfl_runs", (("status", "FINISHED"),))] == 2
    run = (("run_id", mlflow_state["going"]), ("run_name", "defect-flwr-2"))
    assert m[("maxfl_run_round", run)] == 2 and m[("maxfl_run_rounds_planned", run)] == 4 and m[("maxfl_run_running", run)] == 1
    assert m[("maxfl_plant_epsilon", (("plant", "plant-1"),))] == 1.0 and m[("maxfl_plant_epsilon", (("plant", "plant-2"),))] == pytest.approx(1.4)
    assert m[("maxfl_plant_epsilon_ceiling", (("plant", "plant-1"),))] == 8.0
    assert ("maxfl_plant_epsilon_ceiling", (("plant", "plant-2"),)) not in m  # not reported: not a zero
    assert m[("maxfl_plant_epsilon_recorded", (("data_set", FP[:12]), ("plant", "plant-1")))] == 1.5
    for source in ("mlflow", "federation", "superlink", "privacy_record"):
        assert m[("maxfl_page_source_up", (("source", source),))] == 1, source


def test_each_app_has_its_own_metrics_registry(sources: PageSources) -> None:
    with TestClient(create_app(sources, TOKEN, node_lister=nodes_stand_in)) as a, TestClient(create_app(sources, TOKEN, node_lister=lambda _: {})) as b:
        ma, mb = _metrics(a.get("/metrics", headers=AUTH).text), _metrics(b.get("/metrics", headers=AUTH).text)
    assert ma[("maxfl_plants_connected", ())] == 1 and mb[("maxfl_plants_connected", ())] == 0


# ---------------------------------------------------------------- bad state: a message, never a 500
def test_mlflow_down_is_one_line_on_the_page_and_source_down_in_the_metrics(sources: PageSources) -> None:
    down = sources.model_copy(update={"tracking_uri": f"http://127.0.0.1:{free_port()}"})
    with TestClient(create_app(down, TOKEN, node_lister=nodes_stand_in)) as c:
        r = c.get("/", headers=AUTH)
        assert r.status_code == 200
        page = PageText(r.text)
        problems = {a["data-source"]: t for a, t in page.all("source-problem")}
        assert set(problems) == {"mlflow"} and "MLflow at http://127.0.0.1:" in problems["mlflow"]
        assert _rows(r.text, "plant-row", "plant-connection")["plant-1"] == "online"  # the rest of the page is there
        assert c.get("/part/run", headers=AUTH).status_code == 200 and c.get(f"/runs/{'0' * 32}", headers=AUTH).status_code == 200
        m = _metrics(c.get("/metrics", headers=AUTH).text)
    assert m[("maxfl_page_source_up", (("source", "mlflow"),))] == 0 and not any(k[0] == "maxfl_runs" for k in m)


def test_a_superlink_that_is_not_there_leaves_the_plants_listed_with_unknown_connections(sources: PageSources) -> None:
    """The real node reader (`flwr supernode ls` through the Control API) against a port where nothing listens."""
    with TestClient(create_app(sources, TOKEN)) as c:
        html = _settled(c, "/part/plants")
    page = PageText(html)
    assert _rows(html, "plant-row", "plant-connection") == {"plant-1": "unknown", "plant-2": "unknown", "plant-3": "unknown"}
    problem = page.text("source-problem", source="superlink")
    assert "Connections unknown" in problem and "not reachable" in problem and "\n" not in problem
    assert page.text("plants-connected") == "?"


def test_a_slow_source_does_not_hold_a_request_past_its_bound(sources: PageSources) -> None:
    release = threading.Event()

    def hanging(folder: Path) -> dict[int, NodeState]:
        release.wait()
        return nodes_stand_in(folder)

    try:
        with TestClient(create_app(sources, TOKEN, node_lister=hanging)) as c:
            page = PageText(c.get("/part/plants", headers=AUTH).text)
            assert "the SuperLink did not answer within" in page.text("source-problem", source="superlink")
            assert len(page.all("plant-row")) == 3
            release.set()
    finally:
        release.set()


def test_no_runs_yet_says_so(sources: PageSources, tmp_path: Path) -> None:
    empty = sources.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path / 'empty.db'}"})
    with TestClient(create_app(empty, TOKEN, node_lister=nodes_stand_in)) as c:
        page = PageText(_settled(c, "/"))
    assert page.all("no-runs") and page.all("no-current-run") and page.all("no-models")
    assert not page.all("source-problem")


def test_a_damaged_federation_folder_is_a_message(sources: PageSources, tmp_path: Path) -> None:
    broken = tmp_path / "federation"
    broken.mkdir()
    (broken / "federation.json").write_text("{not json")
    with TestClient(create_app(sources.model_copy(update={"federation_dir": broken}), TOKEN, node_lister=nodes_stand_in)) as c:
        r = c.get("/", headers=AUTH)
    assert r.status_code == 200
    assert "cannot be read" in PageText(r.text).text("source-problem", source="federation")


@pytest.mark.parametrize(("path", "status"), [("/runs/not-a-run", 404), ("/runs/" + "f" * 32, 200), ("/part/nothing", 404),
                                              ("/part/run?run=../../etc", 400), ("/no/such/page", 404)])
def test_bad_requests_get_a_4xx_or_a_message(client: TestClient, path: str, status: int) -> None:
    r = client.get(path, headers=AUTH)
    assert r.status_code == status
    if path == "/runs/" + "f" * 32:
        assert "has no run" in PageText(r.text).text("source-problem", source="mlflow")


def test_changing_anything_is_not_allowed(client: TestClient) -> None:
    assert client.post("/", headers=AUTH).status_code == 405
    assert client.put("/metrics", headers=AUTH).status_code == 405


# ---------------------------------------------------------------- pieces
def test_the_round_probe_is_the_one_the_server_app_logs() -> None:
    from fl_server.federation.page import data
    from fl_server.run.tracking import ROUND_PROBE

    assert data.ROUND_PROBE == ROUND_PROBE


def test_the_page_reads_the_registry_tags_the_release_writes() -> None:
    from fl_server.federation.page.data import ROUNDS_PARAM
    from fl_server.run.config import RunConfig

    assert ROUNDS_PARAM in RunConfig().to_flower()


def test_a_revoked_plant_has_no_connection_and_an_active_one_without_a_node_is_gone(federation_dir: Path) -> None:
    from fl_server.federation.provision import load_federation

    fed = load_federation(federation_dir)
    view = federation_view(fed.info, fed.plants(), {11: NodeState(node_id=11, status="online")}, now=NOW)
    assert {p.plant: p.connection for p in view.plants} == {"plant-1": "online", "plant-2": "gone", "plant-3": "-"}
    assert view.connected() == 1
    assert federation_view(fed.info, fed.plants(), None, "down").connected() is None


def test_deployments_come_from_the_end_of_the_audit_log(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    for v in range(1, 400):
        audit.record("model.deployed", "anchor", mlflow_run="r", plant=f"plant-{v}", version=v, status="installed", serving=v, detail="x" * 900)
    found = recent_deployments(audit.path, limit=5)
    assert [d.version for d in found] == [399, 398, 397, 396, 395]
    assert recent_deployments(tmp_path / "none.jsonl") == []


def test_charts_keep_every_point_in_the_plot_and_leave_out_an_infinite_ceiling() -> None:
    c = line_chart([("a", [(1, 0.5), (2, 1.0), (3, 1.6)]), ("b", [(1, 0.2), (3, 0.9)])], [("a ceiling", 8.0, 0), ("b ceiling", math.inf, 1)],
                   y_floor=0.0)
    for line in c.lines:
        for d in line.dots:
            assert c.left <= d.x <= c.right and c.top <= d.y <= c.bottom
    assert [r.label for r in c.rules] == ["a ceiling"] and c.rules[0].y >= c.top
    assert [t.label for t in c.xticks] == ["1", "2", "3"]
    assert nice_ticks(0, 8) == [0, 2, 4, 6, 8] and nice_ticks(0.13, 0.61)[0] <= 0.13
    bars = bar_chart([("p1", 0.12), ("p2", -0.03)])
    assert bars.bars[0].x == bars.zero and bars.bars[1].x + bars.bars[1].width == pytest.approx(bars.zero) and bars.bars[1].negative


# ---------------------------------------------------------------- the command
def test_the_command_needs_a_tracking_server_and_a_real_federation_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fl_server.federation.provision import ProvisionError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="--tracking-uri"):
        resolve_sources(None, None, None)
    with pytest.raises(ProvisionError, match="not a federation folder"):
        resolve_sources(tmp_path, None, "http://127.0.0.1:5000")


def test_the_command_finds_a_local_federations_files_in_its_workdir(federation_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "federation").symlink_to(federation_dir, target_is_directory=True)
    s = resolve_sources(None, work, "http://127.0.0.1:5000/")
    assert s.federation_dir == federation_dir.resolve() and s.tracking_uri == "http://127.0.0.1:5000"
    assert s.audit_log == work / "anchor" / "audit.jsonl" and s.privacy_watch == work / "plants" / "ledgers" / "anchor-privacy-watch.json"
    assert default_token_file(s, work) == federation_dir.resolve() / "private" / "page-token"
    assert default_token_file(resolve_sources(None, tmp_path / "insecure", "http://x:1"), tmp_path / "insecure") == tmp_path / "insecure" / "anchor" / "page-token"
    assert page_url("0.0.0.0", 8050, "t") == "http://127.0.0.1:8050/?token=t"


@pytest.mark.e2e
def test_maxfl_federation_page_serves_until_sigterm(federation_dir: Path, mlflow_state: dict[str, str], tmp_path: Path) -> None:
    """The real command, as `maxfl federate` and the compose stack run it: one line with the URL, then the page."""
    import httpx

    port = free_port()
    token_file = tmp_path / "page-token"
    maxfl = Path(sys.executable).parent / "maxfl"
    proc = subprocess.Popen([str(maxfl), "federation", "page", "--dir", str(federation_dir), "--tracking-uri", mlflow_state["uri"],
                             "--token-file", str(token_file), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        token = token_file.read_text().strip()
        assert line == f"federation page: http://127.0.0.1:{port}/?token={token}"
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz", timeout=10).text == "ok\n"
        assert httpx.get(f"{base}/", timeout=10).status_code == 401
        opened = httpx.get(line.removeprefix("federation page: "), timeout=30, follow_redirects=True)
        assert opened.status_code == 200 and "acme" in opened.text
        assert httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["not a federation folder", "port taken"])
def test_maxfl_federation_page_refuses_in_one_line(case: str, federation_dir: Path, tmp_path: Path) -> None:
    import socket

    maxfl = Path(sys.executable).parent / "maxfl"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        folder = tmp_path if case == "not a federation folder" else federation_dir
        out = subprocess.run([str(maxfl), "federation", "page", "--dir", str(folder), "--tracking-uri", "http://127.0.0.1:1",
                              "--token-file", str(tmp_path / "page-token"), "--port", str(taken.getsockname()[1])],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Traceback" not in out.stdout + out.stderr
    message = (out.stdout + out.stderr).strip()
    assert case.split()[-1] in message or "cannot listen" in message
    assert len(message.splitlines()) == 1, message


def test_the_example_placeholder_is_no_token(tmp_path: Path) -> None:
    from fl_server.federation.page.app import serve

    token_file = tmp_path / "page_token"
    token_file.write_text("replace-with-a-third-openssl-rand-hex-32")
    with pytest.raises(ConfigError, match="placeholder"):
        serve(PageSources(tracking_uri="http://127.0.0.1:1"), token_file, port=0)


def test_a_source_that_answered_before_is_shown_at_once_while_its_next_answer_is_read() -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from fl_server.federation.page.cached import Cached

    answers, gate = iter([1, 2]), threading.Event()

    def read() -> int:
        value = next(answers)
        if value == 2:
            gate.wait()
        return value

    with ThreadPoolExecutor(2) as pool:
        cached = Cached("a source", read, pool, ttl_s=0.0, bound_s=30.0)
        assert asyncio.run(cached.get()).value == 1  # the first answer is waited for
        stale = asyncio.run(cached.get())  # the second read hangs: the last answer comes back at once, without a problem
        assert stale.value == 1 and not stale.problem
        gate.set()
        cached.refresh().result()
        assert cached.current().value == 2
