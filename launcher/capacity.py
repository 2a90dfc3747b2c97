"""Checks a local federation makes before it starts anything: the Ray cluster it attaches to answers, and its
plants fit in this machine's memory. Each fails in one line (`ConfigError`) with what to change."""

from __future__ import annotations

import socket
from pathlib import Path

from maxfl.errors import ConfigError

MAX_DEPLOYMENT_PLANTS = 32  # one SuperNode + warm executor per plant on this one machine
MAX_SIMULATION_PLANTS = 1000  # virtual plants share Ray's workers

# Peak PSS measured by experiments/scale_curve.py (experiments/results/scale-curve.json, 2-core box, table task):
# the anchor (MLflow, SuperLink, ServerApp, executor, proxy) stays under ANCHOR_MIB at every size; a deployment
# plant (SuperNode + warm executor + its forked ClientApp) under PLANT_MIB["deployment"]; Flower's simulation engine
# (driver, Ray's own processes, its workers) under SIMULATION_ENGINE_MIB whatever the plant count, plus
# PLANT_MIB["simulation"] per virtual plant (its data and records). Models bigger than the table MLP need more.
ANCHOR_MIB = 1150  # measured 1081-1114 MiB in deployment
PLANT_MIB = {"deployment": 650, "simulation": 2}  # deployment: 574-641 MiB at the peak (410 at rest)
SIMULATION_ENGINE_MIB = 1500  # driver 567-579, Ray's own processes 381-420, its workers 451-458 MiB
RAY_CONNECT_TIMEOUT_S = 2.0


def ray_host_port(address: str) -> tuple[str, int]:
    """`host:port` of a Ray cluster's GCS, as `ray start --head` prints it (e.g. 127.0.0.1:6379)."""
    host, sep, port = address.strip().rpartition(":")
    if "://" in address or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ray-address {address!r} is not HOST:PORT of a Ray cluster's GCS; give it as `ray start --head` "
                          "prints it, e.g. --ray-address 127.0.0.1:6379")
    return host.strip("[]"), int(port)


def check_ray_address(address: str, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> str:
    """The address, once its GCS port accepts a TCP connection; else one line saying how to fix it."""
    host, port = ray_host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__).lower()
        raise ConfigError(f"no Ray cluster answers at {host}:{port} ({reason} within {timeout_s:g}s): start one there "
                          f"(`ray start --head --port={port}`) or fix --ray-address") from None
    return f"{host}:{port}"


def memory_needed_mib(mode: str, plants: int, ray_attached: bool = False) -> int:
    """What the launch will hold at its peak on this machine; an attached Ray cluster runs the engine elsewhere."""
    engine = 0 if mode == "deployment" or ray_attached else SIMULATION_ENGINE_MIB
    return ANCHOR_MIB + engine + plants * PLANT_MIB[mode]


def available_mib(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable (what can be used without swapping); None where the kernel does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(mode: str, plants: int, ray_attached: bool = False, available: int | None = None) -> None:
    """Refuse a launch whose plants do not fit in the memory available now, before anything starts."""
    available = available_mib() if available is None else available
    needed = memory_needed_mib(mode, plants, ray_attached)
    if available is not None and needed > available:
        per = PLANT_MIB[mode]
        fit = max(0, (available - (needed - plants * per)) // per)
        hint = "; --mode simulation needs far less per plant" if mode == "deployment" else ""
        raise ConfigError(f"{plants} plants in {mode} mode need about {needed / 1024:.1f} GiB ({per} MiB per plant) and "
                          f"{available / 1024:.1f} GiB is available: use --plants {fit} or fewer{hint}")
