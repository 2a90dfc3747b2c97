"""Simulation on a Ray cluster that is already running (`--ray-address`), and the launch's capacity checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from launcher.capacity import PLANT_MIB, check_memory, check_ray_address
from launcher.federation import FederationSettings, LocalFederation, find_app_dir
from launcher.processes import descendants, free_port, pid_alive
from maxfl.errors import ConfigError

RAY = Path(sys.executable).parent / "ray"


def _settings(tmp_path: Path, **options) -> FederationSettings:
    return FederationSettings(app_dir=find_app_dir(), workdir=tmp_path / "work", mode="simulation", plants=2, examples_per_plant=80,
                              run_overrides={"num-server-rounds": 1, "task": "table", "local-epochs": 1, "release": False}, **options)


def test_an_address_where_no_ray_answers_is_one_line_before_anything_starts(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ConfigError) as exc:
        LocalFederation(_settings(tmp_path, ray_address=address), echo=print).run()
    message = str(exc.value)
    assert "\n" not in message and f"no Ray cluster answers at {address}" in message and "ray start --head" in message
    assert not (tmp_path / "work").exists() and descendants(os.getpid()) == []


@pytest.mark.parametrize("address", ["ray://127.0.0.1:10001", "127.0.0.1", "localhost:port"])
def test_a_malformed_address_says_the_form(address):
    with pytest.raises(ConfigError, match="HOST:PORT"):
        check_ray_address(address)


def test_the_cli_says_it_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "maxfl", "federate", "--mode", "simulation", "--ray-address", f"127.0.0.1:{free_port()}",
                             "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and "no Ray cluster answers" in lines[0], result.stderr
    assert not (tmp_path / "plants").exists()


def test_a_ray_address_needs_simulation_and_deployment_is_capped(tmp_path):
    with pytest.raises(ValueError, match="add --mode simulation"):
        FederationSettings(app_dir=find_app_dir(), workdir=tmp_path, mode="deployment", ray_address="127.0.0.1:6379")
    with pytest.raises(ValueError, match="at most 32 plants"):
        FederationSettings(app_dir=find_app_dir(), workdir=tmp_path, mode="deployment", plants=33)
    assert FederationSettings(app_dir=find_app_dir(), workdir=tmp_path, mode="simulation", plants=100).plants == 100


def test_more_plants_than_memory_allows_is_refused_with_how_many_fit():
    check_memory("deployment", 5, available=8 * 1024)  # fits: nothing said
    with pytest.raises(ConfigError) as exc:
        check_memory("deployment", 30, available=8 * 1024)
    message = str(exc.value)
    assert "\n" not in message and "30 plants in deployment mode" in message and f"{PLANT_MIB['deployment']} MiB per plant" in message
    fit = int(message.split("--plants ")[1].split()[0])
    check_memory("deployment", fit, available=8 * 1024)
    with pytest.raises(ConfigError):
        check_memory("deployment", fit + 1, available=8 * 1024)


def test_a_federation_too_big_for_this_machine_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("launcher.capacity.available_mib", lambda: 1024)
    settings = FederationSettings(app_dir=find_app_dir(), workdir=tmp_path / "work", mode="deployment", plants=8)
    with pytest.raises(ConfigError, match="8 plants in deployment mode"):
        LocalFederation(settings, echo=print).run()
    assert not (tmp_path / "work").exists()


# ---------------------------------------------------------------- a real Ray cluster on loopback
def _ray_jobs(address: str) -> list[dict]:
    """The cluster's job table, straight from its GCS (no dashboard needed), in a process of its own."""
    code = ("import json, sys; from ray._raylet import GcsClient; "
            "jobs = GcsClient(address=sys.argv[1]).get_all_job_info(); "
            "print(json.dumps([{'id': info.job_id.hex(), 'dead': info.is_dead, 'entrypoint': info.entrypoint, "
            "'pid': info.driver_pid} for info in jobs.values() if not info.config.ray_namespace.startswith('_ray_internal')]))")
    out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def ray_head():
    """`ray start --head --block` on loopback, every port its own; stopped by PID (its processes by theirs)."""
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    ports = {flag: str(free_port()) for flag in ("--ray-client-server-port", "--dashboard-agent-listen-port",
                                                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
                                                 "--node-manager-port", "--object-manager-port")}
    argv = [str(RAY), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--block", "--num-cpus=2",
            "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}", *(f"{k}={v}" for k, v in ports.items())]
    log = open(temp / "ray-start.log", "w")
    head = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 300  # a bound on a hang, not a speed
        while True:
            try:
                check_ray_address(address, timeout_s=1.0)
                _ray_jobs(address)
                break
            except (ConfigError, subprocess.CalledProcessError):
                assert head.poll() is None, (temp / "ray-start.log").read_text()
                assert time.monotonic() < deadline, "ray start --head did not answer within 300 s"
                time.sleep(1.0)
        seen.update(descendants(head.pid))
        yield address
    finally:
        seen.update(descendants(head.pid))
        head.terminate()  # `ray start --block` stops the processes it started when it is told to stop
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        deadline = time.monotonic() + 30
        while (alive := [p for p in seen if pid_alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in alive:  # whatever it has not stopped yet, by its own PID
            subprocess.run(["kill", "-9", str(pid)], check=False)
        deadline = time.monotonic() + 60  # SIGKILL is delivered at once; this bounds only a process stuck in the kernel
        while (alive := [p for p in alive if pid_alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        assert not alive, f"ray start left processes behind: {alive}"


@pytest.mark.e2e
def test_simulation_runs_on_an_existing_ray_cluster(tmp_path, ray_head):
    before = _ray_jobs(ray_head)
    lines: list[str] = []
    result = LocalFederation(_settings(tmp_path, ray_address=ray_head), echo=lines.append).run()
    assert result.status == "finished:completed"
    assert f"simulation engine: the Ray cluster at {ray_head}" in lines
    # Flower's simulation driver ran as a job of this cluster (and is done): it attached instead of starting a Ray
    new = [job for job in _ray_jobs(ray_head) if job["id"] not in {j["id"] for j in before}]
    assert len(new) == 1 and new[0]["dead"], new
    assert "flwr-simulation" in new[0]["entrypoint"], new
