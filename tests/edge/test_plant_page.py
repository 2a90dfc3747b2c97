"""The plant's page on the edge server: behind its token (and nothing else is), showing a real ledger written by
privacy/ledger.py, the apps allowed and refused in a real audit log written by fl_client/app_policy.py, the
served version across a swap and a rollback, and the request counts; files that are missing or fail
verification are messages on the page, and inference goes on."""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from edge.store import EdgeStore
from tests.edge.conftest import WINDOW_SHAPE, in_process_server, process_server, release, wait_for

TOKEN = "plant-page-token-for-tests-0123456789"
WINDOW = np.zeros(WINDOW_SHAPE).tolist()
ALLOWED = "a" * 64
REFUSED = "b" * 64


def _plant(tmp_path: Path, **fields: Any) -> Any:
    from fl_client.config import PlantConfig

    return PlantConfig(plant_id="plant-7", data_dir=tmp_path / "data", edge_store=tmp_path / "edge", ledger=tmp_path / "ledger.json",
                       audit_log=tmp_path / "audit.jsonl", max_epsilon=8.0, delta=1e-5, allowed_apps=ALLOWED, **fields)


class Elements(HTMLParser):
    """Every element with a data-testid: its attributes and its text (the text of the elements inside it included)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.found: list[dict[str, Any]] = []
        self._open: list[tuple[str, dict[str, Any] | None]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for _, outer in self._open:  # cells read apart, as a person reads them
            if outer is not None:
                outer["text"] += " "
        attributes = dict(attrs)
        element = {"tag": tag, **attributes, "text": "", "children": []} if "data-testid" in attributes else None
        if element is not None:
            for _, outer in reversed(self._open):
                if outer is not None:
                    outer["children"].append(element)
                    break
            self.found.append(element)
        if tag not in ("meta", "link", "br", "img", "input"):
            self._open.append((tag, element))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            name, _ = self._open.pop()
            if name == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, element in self._open:
            if element is not None:
                element["text"] += data

    def all(self, testid: str) -> list[dict[str, Any]]:
        return [e for e in self.found if e["data-testid"] == testid]

    def text(self, testid: str) -> str:
        (element,) = self.all(testid)
        return " ".join(element["text"].split())


def _page(client: httpx.Client) -> Elements:
    r = client.get("/plant", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), r.text
    assert "default-src 'none'" in r.headers["content-security-policy"] and r.headers["cache-control"] == "no-store"
    return Elements(r.text)


def _page_json(client: httpx.Client) -> Any:
    from edge.plant_page import PlantPage

    r = client.get("/plant.json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    return PlantPage.model_validate_json(r.text)


def _write_ledger(cfg: Any) -> None:
    """Two data sets, rounds over two runs, recorded as a training plant records them."""
    from privacy.accountant import Mechanism, epsilon
    from privacy.ledger import DataSetRecord, new_entry

    rounds = {"c" * 64: [(1, Mechanism(noise_multiplier=2.0, sample_rate=0.05, steps=20))] * 3 + [(2, Mechanism(noise_multiplier=1.5, sample_rate=0.05, steps=40))],
              "d" * 64: [(3, Mechanism(noise_multiplier=1.2, sample_rate=0.1, steps=10))]}
    for fingerprint, entries in rounds.items():
        for i, (run_id, mechanism) in enumerate(entries, 1):
            with cfg.privacy().ledger.transaction() as state:
                data_set = state.data_sets.setdefault(fingerprint, DataSetRecord(task="defect", records=800))
                after = epsilon([*data_set.mechanisms(), mechanism], cfg.delta)
                data_set.entries.append(new_entry(mechanism, run_id=run_id, server_round=i, delta=cfg.delta, max_grad_norm=1.0, epsilon_after=after))


def _write_audit(cfg: Any) -> None:
    """An app this plant allowed, then one it refused: fl_client.app_policy records both as a plant's node does."""
    from fl_client.app_policy import AppPolicy, AppRefused

    policy = AppPolicy.from_plant(cfg)
    policy.check(ALLOWED, "maxfl/maxfl", "0.1.0", run_id=11)
    with pytest.raises(AppRefused):
        policy.check(REFUSED, "someone/else", "9.9", run_id=12)


@pytest.fixture
def served(tmp_path, fake_tasks):
    cfg = _plant(tmp_path)
    EdgeStore(cfg.edge_store_path()).install(*release("fake-window", 1))
    with in_process_server(cfg, None, page_token=TOKEN) as (url, watcher), httpx.Client(base_url=url, timeout=30) as client:
        yield cfg, client, watcher


# ---- the token -------------------------------------------------------------------------------------------------


def test_the_page_and_its_json_need_the_token_and_nothing_else_does(served):
    _, client, _ = served
    for path in ("/plant", "/plant.json", "/plant/plant.css"):
        r = client.get(path)
        assert r.status_code == 401 and "needs its token (no token was sent)" in r.text, (path, r.text)
        assert client.get(path, headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
        assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
    assert client.get("/v2/health/live").status_code == 200 and client.get("/v2/models/maxfl-fake-window").status_code == 200
    assert client.post("/v1/predict", json={"instances": [WINDOW]}).status_code == 200


def test_the_token_in_the_url_sets_a_cookie_and_leaves_the_address(served):
    _, client, _ = served
    r = client.get(f"/plant?token={TOKEN}")
    assert r.status_code == 303 and r.headers["location"] == "/plant"
    assert "HttpOnly" in r.headers["set-cookie"] and TOKEN in r.headers["set-cookie"]
    page = client.get("/plant")  # the client keeps the cookie
    assert page.status_code == 200 and 'data-testid="served-version"' in page.text
    assert client.get("/plant.json").status_code == 200
    assert httpx.get(f"{str(client.base_url).rstrip('/')}/plant?token=not-the-token").status_code == 401


# ---- what it shows ---------------------------------------------------------------------------------------------


def test_the_page_shows_the_ledger_against_the_plants_ceiling(served):
    from privacy.report import spending

    cfg, client, _ = served
    _write_ledger(cfg)
    expected = {s.fingerprint: s for s in spending(cfg.privacy().ledger.read(), cfg.delta, cfg.max_epsilon)}
    page = _page(client)
    rows = page.all("ledger-row")
    assert len(rows) == 2 and {r["data-fingerprint"] for r in rows} == set(expected)
    for row in rows:
        spend = expected[row["data-fingerprint"]]
        cells = {c["data-testid"]: c for c in row["children"]}
        assert " ".join(cells["epsilon-spent"]["text"].split()) == f"{spend.epsilon:.3f}"
        assert float(cells["epsilon-spent"]["data-value"]) == spend.epsilon
        assert " ".join(cells["epsilon-ceiling"]["text"].split()) == "8.000"
        assert float(cells["epsilon-remaining"]["data-value"]) == pytest.approx(8.0 - spend.epsilon)
        assert 0 < spend.epsilon < 8.0
    facts = _page_json(client)
    assert facts.ledger.status == "ok" and facts.ledger.ceiling == 8.0 and facts.ledger.delta == 1e-5
    assert {r.fingerprint: r.epsilon_spent for r in facts.ledger.rows} == {fp: s.epsilon for fp, s in expected.items()}
    assert {r.fingerprint: r.runs for r in facts.ledger.rows} == {"c" * 64: [1, 2], "d" * 64: [3]}


def test_the_page_shows_the_apps_allowed_and_refused_newest_first(served):
    cfg, client, _ = served
    _write_audit(cfg)
    rows = _page(client).all("app-row")
    assert [r["data-decision"] for r in rows] == ["refused", "allowed"]
    refused, allowed = (" ".join(r["text"].split()) for r in rows)
    assert "12" in refused and "someone/else 9.9" in refused and REFUSED[:12] in refused and "not in this plant's allowed-apps" in refused
    assert "11" in allowed and "maxfl/maxfl 0.1.0" in allowed and ALLOWED[:12] in allowed
    facts = _page_json(client)
    assert (facts.apps.allowed, facts.apps.refused) == (1, 1)
    assert [(d.decision, d.run_id, d.fab_hash) for d in facts.apps.decisions] == [("refused", 12, REFUSED), ("allowed", 11, ALLOWED)]


def test_the_page_follows_the_served_version_across_a_swap_and_a_rollback(served):
    cfg, client, watcher = served
    store = EdgeStore(cfg.edge_store_path())
    page = _page(client)
    assert (page.text("served-model"), page.text("served-version"), page.text("served-variant")) == ("maxfl-fake-window", "1", "global")
    v2 = release("fake-window", 2)[0]
    store.install(*release("fake-window", 2))
    wait_for("v2 to be served", lambda: watcher.runtime.manifest.version == 2)
    page = _page(client)
    assert page.text("served-version") == "2" and page.text("served-sha256") == v2.sha256
    assert page.text("model-history") == "v1 → v2" and len(page.all("installed-version")) == 2
    assert [" ".join(r["text"].split()).split()[3:6] for r in page.all("swap-row")] == [["update", "v1", "v2"]]
    store.rollback()
    wait_for("the rollback to be served", lambda: watcher.runtime.manifest.version == 1)
    page = _page(client)
    assert page.text("served-version") == "1" and page.text("rollbacks") == "1" and page.text("model-history") == "v1"
    facts = _page_json(client)
    assert facts.model is not None and (facts.model.version, facts.model.variant) == (1, "global")
    assert [(s.kind, s.from_version, s.to_version) for s in facts.history.swaps] == [("rollback", 2, 1), ("update", 1, 2)]
    assert [(v.version, v.current) for v in facts.history.installed] == [(2, False), (1, True)]


def test_the_page_counts_requests_and_estimates_latency(served):
    _, client, _ = served
    assert _page(client).text("requests-total") == "0"
    for _ in range(3):
        assert client.post("/v1/predict", json={"instances": [WINDOW]}).status_code == 200
    assert client.post("/v1/predict", json={"instances": [[[1.0]]]}).status_code == 400
    body = {"inputs": [{"name": "window", "shape": [1, *WINDOW_SHAPE], "datatype": "FP32", "data": np.zeros(WINDOW_SHAPE).ravel().tolist()}]}
    assert client.post("/v2/models/maxfl-fake-window/infer", json=body).status_code == 200
    page = _page(client)
    assert page.text("requests-total") == "5"
    assert page.text("requests-by-status") == "200: 4 · 400: 1"
    assert re.fullmatch(r"p50 [0-9.]+ ms · p99 [0-9.]+ ms · mean [0-9.]+ ms", page.text("requests-latency")), page.text("requests-latency")
    stats = _page_json(client).requests
    assert stats.inference.total == 5 and stats.inference.by_code == {"200": 4, "400": 1}
    assert stats.inference.p50_ms is not None and stats.inference.p50_ms <= stats.inference.p99_ms


def test_missing_and_unverifiable_files_are_messages_and_inference_goes_on(served):
    cfg, client, _ = served
    page = _page(client)
    assert "there is no ledger at" in page.text("ledger-message") and not page.all("ledger-row")
    assert "there is no audit log at" in page.text("apps-message")
    _write_ledger(cfg)
    _write_audit(cfg)
    ledger = cfg.ledger_path()
    ledger.write_text(ledger.read_text().replace('"records": 800', '"records": 900', 1))  # edited outside maxfl
    audit = cfg.audit_log_path()
    lines = audit.read_text().splitlines()
    audit.write_text("\n".join([lines[0].replace("maxfl/maxfl", "maxfl/other"), *lines[1:]]) + "\n")  # the chain breaks
    page = _page(client)
    assert "the ledger fails verification" in page.text("ledger-message") and "changed outside maxfl" in page.text("ledger-message")
    assert not page.all("ledger-row")
    assert "the audit chain is broken" in page.text("apps-message")
    facts = _page_json(client)
    assert facts.ledger.status == "unverified" and facts.apps.status == "broken"
    assert client.post("/v1/predict", json={"instances": [WINDOW]}).status_code == 200
    ledger.unlink()
    ledger.mkdir()  # not even a file: still a message
    assert _page_json(client).ledger.status in ("unverified", "error")


def test_text_from_the_audit_log_is_escaped(served):
    """An app's name and version come from the FAB the anchor sent: the page must not run it."""
    from maxfl.audit import AuditLog

    cfg, client, _ = served
    AuditLog(cfg.audit_log_path()).record("app.refused", cfg.plant_id, fab_hash=REFUSED, fab_id="<script>alert(1)</script>", fab_version="1",
                                          run_id=5, reason="<b>bold</b>")
    r = client.get("/plant", headers={"Authorization": f"Bearer {TOKEN}"})
    assert "<script>alert(1)</script>" not in r.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
    assert "<b>bold</b>" not in r.text


# ---- `maxfl edge serve` --------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_edge_serve_prints_the_page_url_with_its_token_once(tmp_path):
    """The command prints one line with the page's URL and token; the token lives in the edge store, owner-only
    (maxfl.page_auth.load_or_create_token reads the same one on the next start)."""
    cfg = _plant(tmp_path)
    argv = [sys.executable, "-m", "edge.cli", "serve", "--node-config", cfg.as_node_config(), "--port", "{port}"]
    with process_server(cfg, None, tmp_path / "logs", argv=argv) as (url, proc):
        token_file = cfg.edge_store_path() / "page-token"
        token = token_file.read_text().strip()
        assert token_file.stat().st_mode & 0o777 == 0o600
        wait_for("the page URL to be printed", lambda: "plant page:" in proc.log_path.read_text(), 30)
        lines = [line for line in proc.log_path.read_text().splitlines() if "/plant?token=" in line]
        assert lines == [f"plant page: {url}/plant?token={token}"]
        page = httpx.get(lines[0].removeprefix("plant page: "), follow_redirects=True, timeout=30)
        assert page.status_code == 200 and 'data-testid="served-model"' in page.text
        r = httpx.get(f"{url}/plant", timeout=30)
        assert r.status_code == 401 and str(token_file) in r.text  # the 401 says where the token is
