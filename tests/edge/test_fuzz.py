"""Fuzzing the edge server's request bodies (hypothesis, in process through starlette's TestClient): whatever
the body and its Content-Type, the answer is never a 5xx, except 503 for "no model yet" or "busy"."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from edge.server import Limits, ModelWatcher, create_app
from edge.store import EdgeStore
from tests.edge.conftest import ROW_FIELDS, WINDOW_SHAPE, plant, png_bytes, png_header, release

CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "image/png", "image/jpeg", "application/octet-stream",
                 "text/plain", "", "multipart/form-data; boundary=x", "image/"]

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=25)
numbers = st.integers(min_value=-(10**400), max_value=10**400) | st.floats() | st.sampled_from([1e308, -1e308, 3.5e38, 1e-320])
windows = st.lists(st.lists(numbers | scalars, min_size=3, max_size=5), min_size=2, max_size=4)
rows = st.dictionaries(st.sampled_from([*ROW_FIELDS, "extra"]), numbers | values, max_size=4)


@st.composite
def mutated_pngs(draw: st.DrawFn) -> bytes:
    png = bytearray(png_bytes(12, seed=draw(st.integers(0, 3))))
    for _ in range(draw(st.integers(1, 8))):
        png[draw(st.integers(0, len(png) - 1))] = draw(st.integers(0, 255))
    return bytes(png[: draw(st.integers(8, len(png)))])


images = (
    st.binary(max_size=600)
    | st.builds(png_header, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1), st.sampled_from([0, 2, 3, 4, 6, 7]))
    | mutated_pngs()
    | st.just(png_bytes(16))
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["instances", "any-json", "huge-int", "nesting", "bytes", "image", "base64-images"]))
    if kind == "instances":
        instances = draw(st.lists(windows | rows | values, max_size=5) | values)
        payload = json.dumps({"instances": instances, **draw(st.dictionaries(st.text(max_size=5), values, max_size=2))})
    elif kind == "any-json":
        payload = json.dumps(draw(values))
    elif kind == "huge-int":  # past Python's 4300-digit limit for int(str)
        digits = "9" * draw(st.integers(4290, 6000))
        payload = draw(st.sampled_from(['{"instances": [%s]}', "%s", '{"instances": [[[%s, 1, 2, 3]]]}', '{"instances": %s}'])) % digits
    elif kind == "nesting":
        depth = draw(st.integers(1, 100_000))
        payload = '{"instances": ' + "[" * depth + "]" * draw(st.integers(0, depth)) + "}"
    elif kind == "bytes":
        return draw(st.binary(max_size=800))
    elif kind == "image":
        return draw(images)
    else:
        encoded = [base64.b64encode(b).decode() for b in draw(st.lists(images, min_size=1, max_size=3))]
        payload = json.dumps({"instances": encoded + draw(st.lists(values, max_size=1))})
    if draw(st.booleans()):  # a few bytes cut or changed: malformed JSON
        raw = bytearray(payload.encode())
        if raw and draw(st.booleans()):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return bytes(raw[: draw(st.integers(0, len(raw)))])
    return payload.encode()


@contextmanager
def _client(tmp_path_factory, task: str, **release_fields: Any) -> Iterator[TestClient]:
    cfg = plant(tmp_path_factory.mktemp(task or "empty"))
    if task:
        EdgeStore(cfg.edge_store_path()).install(*release(task, 1, **release_fields))
    watcher = ModelWatcher(EdgeStore(cfg.edge_store_path()), cfg, None)
    watcher.check(force=True)
    limits = Limits(max_batch=4, max_body_bytes=200_000, max_image_pixels=40_000, max_image_side=1_000)
    with TestClient(create_app(watcher, cfg.plant_id, limits), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def servers(tmp_path_factory, fake_tasks, defect_onnx) -> Iterator[dict[str, TestClient]]:
    from tasks import get_task

    spec = get_task("defect").spec_type(task="defect", model="cnn", num_classes=2)
    with ExitStack() as stack:
        yield {
            "fake-window": stack.enter_context(_client(tmp_path_factory, "fake-window")),
            "fake-row": stack.enter_context(_client(tmp_path_factory, "fake-row")),
            "defect": stack.enter_context(_client(tmp_path_factory, "defect", onnx=defect_onnx, model_name="maxfl-defect",
                                                  task_spec=spec.model_dump_json())),
            "no-model": stack.enter_context(_client(tmp_path_factory, "")),
        }


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(server=st.sampled_from(["fake-window", "fake-row", "defect", "no-model"]), body=bodies(), content_type=st.sampled_from(CONTENT_TYPES))
def test_no_request_body_gets_a_5xx_but_503_for_no_model_or_busy(servers, server, body, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    r = servers[server].post("/v1/predict", content=body, headers=headers)
    if r.status_code == 200:
        assert len(r.json()["predictions"]) >= 1
        return
    message = r.json()["error"]
    assert "\n" not in message and message, message
    if r.status_code >= 500:
        assert r.status_code == 503 and ("no model is installed" in message or message.startswith("busy")), (r.status_code, message)
    assert 400 <= r.status_code < 600


def test_integers_past_pythons_digit_limit_are_a_400(servers):
    for body in (b'{"instances": [' + b"9" * 5000 + b"]}", b"9" * 5000, b'{"instances": [[[' + b"1" * 4301 + b", 0, 0, 0]]]}"):
        r = servers["fake-window"].post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "cannot be read as a request (an integer of more than 4300 digits)" in r.json()["error"], r.text


def test_values_beyond_float32_are_a_400_naming_the_instance(servers):
    window = [[1e39] * WINDOW_SHAPE[1]] * WINDOW_SHAPE[0]
    ok = [[0.0] * WINDOW_SHAPE[1]] * WINDOW_SHAPE[0]
    r = servers["fake-window"].post("/v1/predict", json={"instances": [ok, window]})
    assert r.status_code == 400 and r.json()["error"].startswith("instance 1 holds values that are not finite"), r.text
    row = servers["fake-row"].post("/v1/predict", content=b'{"instances": [{"temperature": Infinity, "pressure": 1}]}',
                                   headers={"Content-Type": "application/json"})
    assert row.status_code == 400, row.text
