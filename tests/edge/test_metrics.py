"""The edge server's Prometheus metrics, scraped over real HTTP and parsed with prometheus_client's own parser:
requests by endpoint and status, latency, the served version and variant, swaps and rollbacks, admission
refusals; one registry per app."""

from __future__ import annotations

import threading

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from edge.store import EdgeStore
from tests.edge.conftest import WINDOW_SHAPE, in_process_server, plant, release, wait_for

WINDOW = np.zeros(WINDOW_SHAPE).tolist()


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of GET /metrics, keyed by name and labels."""
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(r.text) for s in family.samples}


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_requests_are_counted_by_endpoint_template_and_status(tmp_path, fake_tasks):
    cfg = plant(tmp_path)
    EdgeStore(cfg.edge_store_path()).install(*release("fake-window", 1))
    with in_process_server(cfg, None) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        before = scrape(url)
        assert client.post("/v1/predict", json={"instances": [WINDOW]}).status_code == 200
        assert client.post("/v1/predict", json={"instances": [WINDOW, WINDOW]}).status_code == 200
        assert client.post("/v1/predict", json={"instances": [[[1.0]]]}).status_code == 400
        v2 = {"inputs": [{"name": "window", "shape": [1, *WINDOW_SHAPE], "datatype": "FP32", "data": np.zeros(WINDOW_SHAPE).ravel().tolist()}]}
        assert client.post("/v2/models/maxfl-fake-window/infer", json=v2).status_code == 200
        assert client.get("/no/such/path/a1").status_code == 404 and client.get("/no/such/path/b2").status_code == 404
        after = scrape(url)

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("maxfl_edge_requests_total", endpoint="/v1/predict", code="200") == 2
    assert grew("maxfl_edge_requests_total", endpoint="/v1/predict", code="400") == 1
    assert grew("maxfl_edge_requests_total", endpoint="/v2/models/{name}/infer", code="200") == 1
    assert grew("maxfl_edge_requests_total", endpoint="other", code="404") == 2  # paths are never labels
    assert grew("maxfl_edge_request_duration_seconds_count", endpoint="/v1/predict") == 3
    assert grew("maxfl_edge_request_duration_seconds_bucket", endpoint="/v1/predict", le="+Inf") == 3
    assert sample(after, "maxfl_edge_request_duration_seconds_sum", endpoint="/v1/predict") > 0
    assert not any("/no/such" in str(labels) for _, labels in after)


def test_the_served_version_swaps_and_rollbacks_are_exported(tmp_path, fake_tasks):
    cfg = plant(tmp_path)
    store = EdgeStore(cfg.edge_store_path())
    v1 = release("fake-window", 1)[0]
    store.install(*release("fake-window", 1))
    with in_process_server(cfg, None) as (url, watcher):
        first = scrape(url)
        assert sample(first, "maxfl_edge_model_ready") == 1 and sample(first, "maxfl_edge_model_version", model="maxfl-fake-window") == 1
        assert sample(first, "maxfl_edge_model_info", model="maxfl-fake-window", version="1", variant="global", sha256=v1.sha256,
                      task="fake-window") == 1
        assert sample(first, "maxfl_edge_model_swaps_total", kind="update") == 0
        store.install(*release("fake-window", 2))
        wait_for("v2 to be served", lambda: watcher.runtime.manifest.version == 2)
        swapped = scrape(url)
        assert sample(swapped, "maxfl_edge_model_version", model="maxfl-fake-window") == 2
        assert sample(swapped, "maxfl_edge_model_swaps_total", kind="update") == 1
        assert sample(swapped, "maxfl_edge_model_swaps_total", kind="rollback") == 0
        assert not any(name == "maxfl_edge_model_info" and ("version", "1") in labels for name, labels in swapped)  # one info, the served one
        store.rollback()
        wait_for("the rollback to v1 to be served", lambda: watcher.runtime.manifest.version == 1)
        back = scrape(url)
        assert sample(back, "maxfl_edge_model_version", model="maxfl-fake-window") == 1
        assert sample(back, "maxfl_edge_model_swaps_total", kind="rollback") == 1
        assert sample(back, "maxfl_edge_model_swaps_total", kind="update") == 1
        assert sample(back, "maxfl_edge_model_load_failures_total") == 0


def test_admission_refusals_are_counted(tmp_path, fake_tasks):
    cfg = plant(tmp_path)
    EdgeStore(cfg.edge_store_path()).install(*release("fake-gate", 1))
    gate = tmp_path / "gate"
    answers: list[httpx.Response] = []
    with in_process_server(cfg, None, max_in_model=1, max_waiting=0, request_timeout_s=300.0) as (url, _):
        held = threading.Thread(target=lambda: answers.append(httpx.post(f"{url}/v1/predict", json={"instances": [str(gate)]}, timeout=300)))
        held.start()
        try:
            wait_for("a request in the model", lambda: sample(scrape(url), "maxfl_edge_requests_in_model") == 1, 60)
            busy = httpx.post(f"{url}/v1/predict", json={"instances": [str(gate)]}, timeout=60)
            assert busy.status_code == 503 and busy.json()["error"].startswith("busy"), busy.text
            samples = scrape(url)
            assert sample(samples, "maxfl_edge_admission_rejections_total", reason="busy") == 1
            assert sample(samples, "maxfl_edge_requests_total", endpoint="/v1/predict", code="503") == 1
        finally:
            gate.touch()
            held.join(timeout=300)
        assert [a.status_code for a in answers] == [200]


def test_each_app_counts_in_its_own_registry(tmp_path, fake_tasks):
    from prometheus_client import REGISTRY

    cfgs = [plant(tmp_path / name, name) for name in ("plant-a", "plant-b")]
    for cfg in cfgs:
        EdgeStore(cfg.edge_store_path()).install(*release("fake-window", 1))
    with in_process_server(cfgs[0], None) as (a, _), in_process_server(cfgs[1], None) as (b, _):
        for _ in range(3):
            assert httpx.post(f"{a}/v1/predict", json={"instances": [WINDOW]}).status_code == 200
        assert sample(scrape(a), "maxfl_edge_requests_total", endpoint="/v1/predict", code="200") == 3
        assert sample(scrape(b), "maxfl_edge_requests_total", endpoint="/v1/predict", code="200") == 0
    assert not any(name.startswith("maxfl_edge") for name in REGISTRY._names_to_collectors)  # noqa: SLF001 - the global registry stays clean


def test_the_quantile_estimate_follows_prometheus_histogram_quantile():
    from edge.metrics import quantile

    buckets = {0.01: 50.0, 0.1: 90.0, 1.0: 100.0, float("inf"): 100.0}
    assert quantile(0.5, buckets) == 0.01  # the 50th of 100 is the last in the first bucket
    assert abs(quantile(0.7, buckets) - (0.01 + 0.09 * 20 / 40)) < 1e-12  # linear within (0.01, 0.1]
    assert quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None
    assert quantile(0.99, {0.1: 1.0, float("inf"): 5.0}) == 0.1  # in +Inf: the highest finite bound
