"""The edge server's resources are bounded, against a real server process over real sockets: image bombs are
refused from their header with its memory unchanged, half-sent requests are closed by the server, a full
queue answers 503 with Retry-After, and a request past its time limit gets 504 with its model run stopped."""

from __future__ import annotations

import base64
import io
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from edge.store import EdgeStore
from tests.edge.conftest import WINDOW_SHAPE, plant, png_bytes, png_header, process_server, release, slow_onnx, wait_for

pytestmark = pytest.mark.e2e


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field}")


def _one_line_error(r: httpx.Response, status: int, fragment: str) -> str:
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert fragment in message and "\n" not in message, message
    return message


def _long_png() -> bytes:
    """A real, fully decodable 1 x 8,000,000 grey PNG of about 15 KB (the issue's first bomb)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 8_000_000)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def defect_process(tmp_path, defect_onnx) -> Iterator[tuple[str, Any]]:
    from tasks import get_task

    cfg = plant(tmp_path)
    spec = get_task("defect").spec_type(task="defect", model="cnn", num_classes=2)
    EdgeStore(cfg.edge_store_path()).install(*release("defect", 1, onnx=defect_onnx, model_name="maxfl-defect", task_spec=spec.model_dump_json()))
    with process_server(cfg, None, tmp_path / "logs") as served:
        yield served


def test_image_bombs_get_413_from_their_header_and_the_servers_memory_stays_put(defect_process):
    url, proc = defect_process
    pid = proc.popen.pid
    normal = png_bytes(300, seed=3)
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/v1/predict", content=normal, headers={"Content-Type": "image/png"}).status_code == 200  # warm
        idle_kb = _status_kb(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM (peak RSS) starts again from the current RSS
        long_png = _long_png()
        assert len(long_png) < 20_000
        bombs = {
            "1x8,000,000 real PNG": long_png,
            "100,000 x 100,000 RGBA (40 GB), past PIL's own bomb check": png_header(100_000, 100_000),
            "12,000 x 12,000 RGBA (576 MB), under PIL's check": png_header(12_000, 12_000),
            "9,000 x 9,000 grey, over the pixel limit only": png_header(9_000, 9_000, colour_type=0),
        }
        for what, data in bombs.items():
            raw = client.post("/v1/predict", content=data, headers={"Content-Type": "image/png"})
            _one_line_error(raw, 413, "instance 0")
            encoded = client.post("/v1/predict", json={"instances": [base64.b64encode(normal).decode(), base64.b64encode(data).decode()]})
            assert "instance 1" in _one_line_error(encoded, 413, "--max-image-"), what
        # Four bombs at once, and a normal request beside them, as in the issue: the normal one is answered.
        results: list[int] = []
        senders = [threading.Thread(target=lambda d=d: results.append(httpx.post(f"{url}/v1/predict", content=d, timeout=60,
                                                                                 headers={"Content-Type": "image/png"}).status_code))
                   for d in (long_png, bombs["12,000 x 12,000 RGBA (576 MB), under PIL's check"]) * 2]
        for t in senders:
            t.start()
        ok = client.post("/v1/predict", content=normal, headers={"Content-Type": "image/png"})
        for t in senders:
            t.join(timeout=60)
        assert ok.status_code == 200, ok.text
        assert sorted(results) == [413] * 4
        peak_kb = _status_kb(pid, "VmHWM")
    print(f"edge server RSS: idle {idle_kb / 1024:.0f} MB, peak over {2 * len(bombs) + 4} bombs {peak_kb / 1024:.0f} MB")
    assert peak_kb < 2 * idle_kb, f"peak RSS {peak_kb} kB is not under twice the idle {idle_kb} kB"


def _eof_after(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout fails the test otherwise)."""
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


@pytest.fixture
def window_process(tmp_path) -> Iterator[tuple[str, Any]]:
    cfg = plant(tmp_path)
    EdgeStore(cfg.edge_store_path()).install(*release("fake-window", 1))
    with process_server(cfg, None, tmp_path / "logs", limits={"head_timeout_s": 1.0, "body_timeout_s": 1.0, "keep_alive_s": 1}) as served:
        yield served


@pytest.mark.parametrize("sent", [
    pytest.param(b"", id="nothing"),
    pytest.param(b"POST /v1/predict HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n", id="half-sent-headers"),
    pytest.param(b"POST /v1/predict HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"inst", id="half-sent-body"),
])
def test_a_connection_that_does_not_send_its_request_is_closed_by_the_server(window_process, sent):
    url, _ = window_process
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(sent)
        answer = _eof_after(sock)  # the server closed it: recv gave EOF before the 60 s socket timeout
    if sent and b"\r\n\r\n" not in sent:
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"did not arrive within 1 s" in answer
    with httpx.Client(base_url=url, timeout=10) as client:  # and the server serves on
        assert client.post("/v1/predict", json={"instances": [np.zeros(WINDOW_SHAPE).tolist()]}).status_code == 200


def test_an_idle_kept_alive_connection_is_closed_after_its_answer(window_process):
    url, _ = window_process
    port = int(url.rsplit(":", 1)[1])
    body = b'{"instances": [[[0,0,0,0],[0,0,0,0],[0,0,0,0]]]}'
    request = b"POST /v1/predict HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request)
        answer = _eof_after(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"predictions"' in answer


def _health(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/health", timeout=10).json()


def test_a_full_queue_answers_503_with_retry_after_and_the_admitted_requests_finish(tmp_path):
    cfg = plant(tmp_path)
    EdgeStore(cfg.edge_store_path()).install(*release("fake-gate", 1))
    gate = tmp_path / "gate"
    answers: dict[str, httpx.Response] = {}

    def send(name: str) -> None:
        answers[name] = httpx.post(f"{url}/v1/predict", json={"instances": [str(gate)]}, timeout=120)

    limits = {"max_in_model": 1, "max_waiting": 1, "request_timeout_s": 300.0}
    with process_server(cfg, None, tmp_path / "logs", limits=limits) as (url, _):
        first = threading.Thread(target=send, args=("in-model",))
        first.start()
        wait_for("a request in the model", lambda: _health(url)["requests"]["in_model"] == 1, 60)
        second = threading.Thread(target=send, args=("waiting",))
        second.start()
        wait_for("a request waiting", lambda: _health(url)["requests"]["waiting"] == 1, 60)
        full = httpx.post(f"{url}/v1/predict", json={"instances": [str(gate)]}, timeout=60)
        _one_line_error(full, 503, "busy: 1 requests in the model and 1 waiting")
        assert full.headers["Retry-After"] == "1"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # health is never queued
        gate.touch()
        first.join(timeout=120)
        second.join(timeout=120)
        assert [answers[k].status_code for k in ("in-model", "waiting")] == [200, 200], [answers[k].text for k in answers]
        assert _health(url)["requests"] == {"in_model": 0, "waiting": 0, "max_in_model": 1, "max_waiting": 1}


def test_a_request_past_its_time_limit_gets_504_and_its_model_run_is_stopped(tmp_path):
    cfg = plant(tmp_path)
    EdgeStore(cfg.edge_store_path()).install(*release("fake-window", 1, onnx=slow_onnx()))
    days = np.full(WINDOW_SHAPE, 1e12 / np.prod(WINDOW_SHAPE)).tolist()  # 1e12 loop iterations
    with process_server(cfg, None, tmp_path / "logs", limits={"max_in_model": 1, "request_timeout_s": 1.0}) as (url, proc):
        late = httpx.post(f"{url}/v1/predict", json={"instances": [days]}, timeout=120)
        _one_line_error(late, 504, "did not answer within 1 s (--request-timeout-s)")
        # Terminated, not left running for days: the one model thread comes free and serves the next request.
        wait_for("the model thread to be freed", lambda: _health(url)["requests"]["in_model"] == 0, 60)
        quick = httpx.post(f"{url}/v1/predict", json={"instances": [np.zeros(WINDOW_SHAPE).tolist()]}, timeout=60)
        assert quick.status_code == 200, quick.text
    assert "Traceback" not in proc.log_path.read_text()


def test_a_request_head_growing_past_the_head_limit_gets_a_400_and_the_connection_closed(window_process):
    """Not buffered until the head timeout: h11 refuses an unfinished head past max_head_bytes (16 KB) at once."""
    url, _ = window_process
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: edge\r\n" + b"X-Pad: aaaaaaaaaaaaaaaaaaaaaa\r\n" * 2000)
        answer = _eof_after(sock)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
