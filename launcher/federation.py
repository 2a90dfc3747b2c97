"""One command, a whole federation on loopback: MLflow, SuperLink, plant SuperNodes, then `flwr run`.

Deployment mode is secure by default, built with the anchor's and the plants' own onboarding code: a fresh
federation (CA, SuperLink certificate) under <workdir>/federation, the SuperLink with TLS and SuperNode
authentication, a key per demo plant (kept under its node home), each plant registered and given its join kit
(`add_plant`), and each SuperNode started from its kit exactly as `maxfl plant join` starts it. The topology is the
anchor's (`maxfl federation superlink`): the SuperLink on its own loopback port, the reverse proxy (Caddy,
fl_server.federation.proxy) on the plants' port forwarding the Fleet API only; the plants' kits name the proxy, and the
anchor's own Flower CLI config (`flwr run`, registration) names the SuperLink's port. Simulation mode
has no SuperNodes and nothing on the network but loopback between the SuperLink and its own processes: it stays
insecure. `FederationSettings.insecure` (`maxfl federate --insecure`) is the old plain-HTTP demo, with the plants
connected to the SuperLink directly (no proxy: nothing to protect without TLS and node authentication).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge.store import EdgeStore, EdgeStoreError, InstalledModel
from fl_client.config import PLANT_ID_PATTERN, PlantConfig
from fl_client.join import (
    PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, NotRegisteredError, keygen, node_id_from_log, not_registered_message, prepare_join,
    rejected_by_superlink, supernode_argv, warm_exec_argv,
)
from fl_server.federation.provision import Federation, add_plant, flwr_register, init_federation, proxy_config, superlink_argv
from fl_server.federation.proxy import caddy_argv, caddy_binary, caddy_env, healthy, write_config
from fl_server.federation.serverapp_policy import AUDIT_ENV, allow_serverapp, superexec_argv
from fl_server.run.config import RunConfig
from fl_server.run.tracking import check_reachable
from launcher.capacity import MAX_DEPLOYMENT_PLANTS, MAX_SIMULATION_PLANTS, check_memory, check_ray_address
from launcher.postgres import LocalPostgres, check_backend_uri
from launcher.processes import Managed, ProcessGroup, free_port, port_is_free, strip_ansi
from maxfl.atomic import atomic_write_text
from maxfl.audit import AuditLog
from maxfl.cache import folder_digest
from maxfl.errors import ConfigError, DataError, ProcessError, UserError
from maxfl.fab import fab_hash, stage_app
from maxfl.page_auth import load_or_create_token
from tasks import get_task
from tasks.base import TaskOptions, resolve_model
from tasks.features import get_backbone

log = logging.getLogger("maxfl")

STARTUP_TIMEOUT_S = 120.0
# A plant's processes (by name prefix): their death is the run's business (min-plants), not the launcher's.
PLANT_PROCESSES = ("supernode-", "warm-exec-", "edge-")
# Flower 1.41 counts a SuperNode online until 2 heartbeats are missed (maxfl-supernode: 2 x 10 s; the stock
# flower-supernode: 2 x 30 s); until then its key is refused to another SuperNode (a restart after a kill).
# Retried this long for plants the anchor lists as active.
STALE_NODE_S = 75.0
# Offline hygiene for every process we start: no telemetry, no update checks.
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class FederationSettings(BaseModel):
    """What `maxfl federate` was asked to do; every path lives under `workdir`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    app_dir: Path
    workdir: Path
    mode: Literal["deployment", "simulation"] = "deployment"
    plants: int = Field(3, ge=1, le=MAX_SIMULATION_PLANTS)  # deployment: at most MAX_DEPLOYMENT_PLANTS
    run_overrides: dict[str, Any] = Field(default_factory=dict)
    examples_per_plant: int | None = Field(None, ge=20)
    mlflow_port: int | None = Field(None, ge=1, le=65535)
    superlink_port: int | None = Field(None, ge=1, le=65535)  # the SuperLink's own port (loopback)
    proxy_port: int | None = Field(None, ge=1, le=65535)  # the plants' port: the proxy in front of the SuperLink (secure mode)
    keep_mlflow: bool = False
    # An MLflow server that is already running (the anchor's own); none: start one under workdir.
    tracking_uri: str | None = None
    # The store of the MLflow server started here: SQLite under workdir, or PostgreSQL (launcher.postgres) - a server
    # started under workdir/mlflow/postgres, or the anchor's own (`backend_store_uri`, postgresql://...).
    mlflow_backend: Literal["sqlite", "postgresql"] = "sqlite"
    backend_store_uri: str | None = None
    warm: bool = True
    # The demo plants' own privacy settings (their node configs); ledgers live under workdir and persist.
    max_epsilon: float = Field(10.0, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    ceilings: dict[str, float] = Field(default_factory=dict)  # plant id -> its own max-epsilon (deployment mode)
    ledger_dir: Path | None = None  # default: <workdir>/plants/ledgers
    fault_drills: dict[str, Literal["scale", "sign-flip", "nan"]] = Field(default_factory=dict)  # plant id -> its drill
    # No TLS, no SuperNode authentication (`maxfl federate --insecure`): the old plain-HTTP demo. Deployment mode
    # is otherwise TLS + node authentication; simulation mode has no SuperNodes and stays insecure on loopback.
    insecure: bool = False
    # The plants' own data (`--data PLANT=DIR`): plant id -> its folder, read and never written. Empty: demo data.
    data: dict[str, Path] = Field(default_factory=dict)
    # Simulation on a Ray cluster that is already running (its GCS, HOST:PORT); none: Flower starts its own.
    ray_address: str | None = None
    # The federation page (`maxfl federation page`) beside MLflow: `maxfl federate` starts it; benchmarks and tests that
    # read nothing of it leave the process (an MLflow client of its own, ~240 MiB) out.
    page: bool = False

    @model_validator(mode="after")
    def _ceilings_need_real_plants(self) -> FederationSettings:
        if (self.ceilings or self.ledger_dir or self.fault_drills or self.data) and self.mode == "simulation":
            raise ValueError("own data (--data), per-plant ceilings, ledger folders and fault drills need deployment mode "
                             "(virtual plants take demo data and the run config's sim-* keys)")
        if bad := [p for p in self.data if not re.fullmatch(PLANT_ID_PATTERN, p)]:
            raise ValueError(f"--data plant id {bad[0]!r}: lower-case letters, digits, '-' and '_' (e.g. plant-a=/data/plant-a)")
        return self

    @model_validator(mode="after")
    def _scale(self) -> FederationSettings:
        if self.mode == "deployment" and self.plants > MAX_DEPLOYMENT_PLANTS:
            raise ValueError(f"deployment runs a SuperNode per plant on this machine: at most {MAX_DEPLOYMENT_PLANTS} plants "
                             f"(--mode simulation takes up to {MAX_SIMULATION_PLANTS})")
        if self.ray_address is not None and self.mode != "simulation":
            raise ValueError("--ray-address runs Flower's simulation engine on that Ray cluster: add --mode simulation")
        return self

    @model_validator(mode="after")
    def _backend_store(self) -> FederationSettings:
        if self.backend_store_uri and self.mlflow_backend != "postgresql":
            raise ValueError("--backend-store-uri names a PostgreSQL server: add --mlflow-backend postgresql")
        if self.tracking_uri and (self.mlflow_backend != "sqlite" or self.backend_store_uri):
            raise ValueError("--mlflow-backend and --backend-store-uri choose the store of the MLflow server this command starts; "
                             "with --tracking-uri your server has its own store")
        return self

    @property
    def plant_ids(self) -> list[str]:
        return sorted(self.data) if self.data else [f"plant-{k}" for k in range(1, self.plants + 1)]


@dataclass(frozen=True)
class FederationResult:
    flwr_run_id: int
    mlflow_run_id: str
    mlflow_url: str
    tracking_uri: str
    status: str
    privacy: list[str]  # per plant, what its ledger says it has spent
    release: list[str]  # the gate's verdict, the champion, and what each plant's edge server serves
    gate: str = ""  # passed | failed ("" when nothing was gated)
    gate_summary: str = ""  # why, in one line
    # Per plant: its scores of this run's model on its held-out split (the gate's evaluation), the epsilon the run
    # spent there and in the data set's lifetime, and the version its edge server serves now.
    plants: list[dict[str, Any]] = dataclasses.field(default_factory=list)


# The scores `maxfl federate` shows per plant, where the task reports them (the gate's metric is always shown).
HEADLINE_METRICS = ("eval_macro_f1", "eval_auroc", "eval_accuracy", "eval_detection_at_5pct_false_alarms", "eval_false_alarm_rate",
                    "eval_r2", "eval_rmse")


def privacy_summary(plant: PlantConfig) -> str:
    """The plant's own ledger, as the plant would see it (`maxfl ledger`)."""
    from privacy.report import one_line, spending

    try:
        privacy = plant.privacy()
        return one_line(plant.plant_id, spending(privacy.ledger.read(), privacy.delta, privacy.max_epsilon))
    except UserError as exc:
        return f"{plant.plant_id}: {exc}"


def find_app_dir() -> Path:
    """The Flower app is the maxfl project itself: the folder whose pyproject declares `[tool.flwr.app]`."""
    for candidate in (Path(__file__).resolve().parents[1], Path.cwd()):
        pyproject = candidate / "pyproject.toml"
        if pyproject.is_file() and "flwr" in tomllib.loads(pyproject.read_text()).get("tool", {}):
            return candidate
    raise ConfigError("cannot find the maxfl Flower app (a pyproject.toml with [tool.flwr.app]); run from the project folder")


def app_run_config(app_dir: Path, overrides: dict[str, Any]) -> RunConfig:
    defaults = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return RunConfig.from_flower({**defaults, **overrides})


class LocalFederation:
    def __init__(self, settings: FederationSettings, echo: Callable[[str], None] = print) -> None:
        self.s = settings
        self.echo = echo
        self.work = settings.workdir.resolve()
        self.procs = ProcessGroup(self.work / "logs")
        bin_dir = str(Path(sys.executable).parent)
        self.env = {**os.environ, **QUIET_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.bin = Path(bin_dir)
        self._ports: set[int] = set()
        self._mlflow: Managed | None = None
        self._postgres: Managed | None = None  # the MLflow store's own PostgreSQL, when this launch started one
        self.backend_store_uri = ""  # the MLflow server's backend store, once it started
        self.last_server_error = ""
        self.plants: list[PlantConfig] = []
        self.edge_urls: dict[str, str] = {}
        self.page_url = ""  # the federation page, with its token (`start_page`)
        self.tracking_uri = ""
        self.base_overrides: dict[str, Any] = {}
        self.audit_log = self.work / "anchor" / "audit.jsonl"
        self.cli_home = self.work / "cli"
        self.superlink = ""  # the SuperLink's own address: the anchor's CLI (Control API) talks to it
        self.plants_address = ""  # where plants connect: the proxy (secure mode), else the SuperLink itself
        self.federation_dir = self.work / "federation"
        self.federation: Federation | None = None  # set while a secure federation runs
        self.kits: dict[str, Path] = {}  # plant id -> its join kit (secure mode)
        self._log_offsets: dict[str, int] = {}  # plant id -> where its SuperNode's latest start begins in its log
        self._launch: dict[str, tuple[list[str], dict[str, str], int]] = {}  # plant id -> SuperNode argv, env, runtime port
        self._pending: dict[str, Managed] = {}  # SuperNodes started but not connected yet (not watched)
        self.app_hash: str | None = None  # the FAB `flwr run` submits (deployment): the plants' and the anchor's allowed app

    @property
    def secure(self) -> bool:
        """TLS + SuperNode authentication: deployment mode unless `insecure` was asked for."""
        return self.s.mode == "deployment" and not self.s.insecure

    # ---------------------------------------------------------------- steps
    @property
    def plants_root(self) -> Path:
        """The plants' side of the launch: demo data (plant-1, ...), ledgers, edge stores, audit logs."""
        return self.work / "plants"

    def prepare_data(self, task_name: str, seed: int) -> list[PlantConfig]:
        """Each plant's node config: its own folder (`data`), else demo data that maxfl writes and owns."""
        root = self.plants_root
        folders = {pid: Path(d).expanduser().resolve() for pid, d in self.s.data.items()} or self._demo_data(task_name, seed)
        # The demo plants run exactly the app `flwr run` will submit from app_dir (simulation has no executor).
        app_hash = self.app_hash = fab_hash(self.s.app_dir) if self.s.mode == "deployment" else None
        plants = [
            PlantConfig(plant_id=pid, data_dir=folder, max_epsilon=self.s.ceilings.get(pid, self.s.max_epsilon),
                        allowed_apps=app_hash, audit_log=root / "audit" / f"{pid}.jsonl",
                        delta=self.s.delta, ledger=self.ledger_dir / f"{pid}.json",
                        edge_store=root / "edge" / pid, fault_drill=self.s.fault_drills.get(pid, "none"))
            for pid, folder in sorted(folders.items())
        ]
        for plant in plants:
            if not plant.data_dir.is_dir() or not any(plant.data_dir.iterdir()):
                hint = f"give a folder with the plant's data (--data {plant.plant_id}=DIR)" if self.s.data else f"delete {root / 'split.json'} to re-create it"
                raise DataError(f"{plant.plant_id}: data location {plant.data_dir} is missing or empty; {hint}")
        return plants

    @property
    def ledger_dir(self) -> Path:
        return self.s.ledger_dir or self.plants_root / "ledgers"

    def _demo_data(self, task_name: str, seed: int) -> dict[str, Path]:
        """The task's demo split under <workdir>/plants/plant-k, made once per task, plants, seed and size.

        Only folders maxfl wrote and nobody changed since are ever replaced: a folder that is not maxfl's demo data
        (someone copied their own data there, or edited it) stops the launch, with the flag that takes it as it is.
        """
        root = self.plants_root
        marker = root / "split.json"
        wanted = {"task": task_name, "plants": self.s.plants, "seed": seed, "examples-per-plant": self.s.examples_per_plant}
        recorded = json.loads(marker.read_text()) if marker.is_file() else {}
        dirs = {pid: root / pid for pid in self.s.plant_ids}
        if {k: recorded.get(k) for k in wanted} != wanted:
            written = recorded.get("folders")  # absent in markers of maxfl before 0.4: those folders are maxfl's
            for folder in sorted(root.glob("plant-*")):
                if folder.is_dir() and any(folder.iterdir()) and written is not None and written.get(folder.name) != folder_digest(folder):
                    raise DataError(f"{folder} is not maxfl's demo data (it changed since maxfl wrote it), so it is never replaced: to train "
                                    f"on it, move it out of {root} and pass --data {folder.name}=DIR; or use another --workdir")
            self.echo(f"preparing {task_name} data for {self.s.plants} plants under {root}")
            get_task(task_name).prepare_plants(self.s.plants, root, seed, self.s.examples_per_plant)
            atomic_write_text(marker, json.dumps({**wanted, "folders": {pid: folder_digest(d) for pid, d in dirs.items()}}))
        return dirs

    def check_own_data(self, cfg: RunConfig) -> None:
        """Own data, before any process starts: every plant's folder profiles as the task reads it, the plants agree
        on the schema and the labels (what the anchor checks again before training); warnings are shown."""
        from tasks.base import check_labels

        task = get_task(cfg.task)
        profiles = {}
        for plant in self.plants:
            try:
                profiles[plant.plant_id] = task.profile(plant.data_dir, cfg.seed)
            except UserError as exc:
                raise DataError(f"{plant.plant_id} ({plant.data_dir}): {exc}") from None
        task.make_spec(profiles, TaskOptions(model=cfg.model, image_size=cfg.image_size))
        for warning in check_labels(profiles):
            self.echo(f"warning: {warning}")
        summary = ", ".join(f"{p} {prof.examples}" for p, prof in sorted(profiles.items()))
        self.echo(f"own data: {len(profiles)} plants agree on the {cfg.task} schema and labels (training examples: {summary})")

    def reserve_port(self, wanted: int | None = None, what: str = "", flag: str = "") -> int:
        """A port for one of our servers; distinct from the ones already handed out in this launch."""
        if wanted is not None:
            if wanted in self._ports or not port_is_free(wanted):
                raise ConfigError(f"port {wanted} for {what} is already taken on 127.0.0.1; pick another with {flag} or leave it out")
            port = wanted
        else:
            while (port := free_port()) in self._ports:
                pass
        self._ports.add(port)
        return port

    def start_mlflow(self, port: int) -> str:
        uri = self.launch_mlflow(port)
        self.await_mlflow(uri)
        return uri

    def local_postgres(self) -> LocalPostgres:
        """The PostgreSQL this launch runs for MLflow's store (`mlflow_backend` postgresql without a URI of the anchor's)."""
        return LocalPostgres(self.work / "mlflow" / "postgres", port=0)

    def check_backend_store(self) -> None:
        """Before any process starts: the anchor's PostgreSQL answers, or ours can run here; one line if not."""
        if self.s.tracking_uri or self.s.mlflow_backend == "sqlite":
            return
        if self.s.backend_store_uri:
            check_backend_uri(self.s.backend_store_uri)
        else:
            self.local_postgres().check()

    def launch_mlflow(self, port: int) -> str:
        """Start MLflow without waiting for it (its start-up overlaps the SuperLink's and the plants')."""
        store = self.work / "mlflow"
        (store / "artifacts").mkdir(parents=True, exist_ok=True)
        env, backend = self.env, ["--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}"]
        self.backend_store_uri = backend[-1]
        if self.s.mlflow_backend == "postgresql":
            if self.s.backend_store_uri:  # the anchor's own server (checked again: it names the driver MLflow needs)
                uri = check_backend_uri(self.s.backend_store_uri)
            else:  # ours: started (and stopped) with the other processes, before MLflow, which needs it
                pg = dataclasses.replace(self.local_postgres(), port=self.reserve_port(None, "PostgreSQL", ""))
                self._postgres = pg.start(self.procs)
                uri = pg.create_database("mlflow")
            env, backend = {**self.env, "MLFLOW_BACKEND_STORE_URI": uri}, []  # a password stays out of `ps`
            self.backend_store_uri = uri
        self._mlflow = self.procs.start(
            "mlflow",
            [str(self.bin / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             *backend, "--artifacts-destination", str(store / "artifacts")],
            env,
        )
        return f"http://127.0.0.1:{port}"

    def await_mlflow(self, uri: str) -> None:
        self.procs.wait_until("MLflow to answer", lambda: _http_ok(f"{uri}/health"), STARTUP_TIMEOUT_S, self._mlflow)

    def provision(self, port: int, proxy_port: int) -> Federation:
        """A fresh federation for this launch (CA, SuperLink certificate, audit log) under <workdir>/federation.

        Plants reach the proxy's port; the SuperLink itself, and the anchor's CLI, use `port`."""
        shutil.rmtree(self.federation_dir, ignore_errors=True)
        self.kits = {}
        self.federation = init_federation(self.federation_dir, "local", f"127.0.0.1:{proxy_port}", ca_days=30, days=30,
                                          control_address=f"127.0.0.1:{port}")
        return self.federation

    def start_proxy(self, fed: Federation, superlink: str) -> str:
        """The reverse proxy on the plants' port: TLS with the SuperLink's certificate, the Fleet API only."""
        address = fed.info.superlink_address
        proxy = proxy_config(fed, address, upstream=superlink)
        proc = self.procs.start("proxy", caddy_argv(caddy_binary(), write_config(proxy)), caddy_env(proxy, self.env))
        self.procs.wait_until("the proxy to answer", lambda: healthy(address, fed.ca_cert), STARTUP_TIMEOUT_S, proc)
        return address

    def start_superlink(self, port: int, proxy_port: int | None = None) -> str:
        home = self.work / "superlink"
        home.mkdir(parents=True, exist_ok=True)
        # The SuperLink keeps its state in memory (Flower's default, no --database): each launch starts fresh, so nodes
        # of an earlier launch are never sampled, and no SQLite file serialises the plants' requests (on a file, SQLite
        # was half the SuperLink's CPU per round, and with 20 plants its lock timed out: 500s, lost replies).
        fed = self.provision(port, proxy_port or self.reserve_port()) if self.secure else None
        secret = fed.superexec_secret if fed is not None else None  # secure: ServerApps only via maxfl-superexec
        argv = superlink_argv(fed, self.bin, "127.0.0.1", port, None, simulation=self.s.mode == "simulation",
                              superexec_secret=secret)
        env = {**self.env, "FLWR_HOME": str(home / "flwr-home")}
        if self.s.ray_address:  # Flower's Ray backend calls ray.init() without an address: Ray then takes RAY_ADDRESS
            env["RAY_ADDRESS"] = self.s.ray_address  # (the SuperLink's flwr-simulation inherits it)
        proc = self.procs.start("superlink", argv, env)
        address = f"127.0.0.1:{port}"
        if fed is None:
            ready = lambda: _http_ok(f"http://{address}/health")  # noqa: E731
        else:
            tls = ssl.create_default_context(cafile=str(fed.ca_cert))
            ready = lambda: _http_ok(f"https://{address}/health", verify=tls)  # noqa: E731
        self.procs.wait_until("the SuperLink to answer", ready, STARTUP_TIMEOUT_S, proc)
        if fed is not None:
            self.start_executor(fed, address, proc)
        self.plants_address = address if fed is None else self.start_proxy(fed, address)
        return address

    def start_executor(self, fed: Federation, superlink: str, link: Managed) -> None:
        """The anchor's ServerApp executor, as `maxfl federation superlink` runs it: only the app this launch
        submits is on the allowed list (anything else `flwr run` sends is refused and audited)."""
        assert self.app_hash is not None
        with fed.locked():
            allow_serverapp(fed.dir, self.app_hash, fed.audit)
        argv = superexec_argv(self.bin, superlink, fed.superexec_secret, fed.dir, fed.ca_cert, parent_pid=link.popen.pid)
        self.procs.start("superexec", argv, {**self.env, AUDIT_ENV: str(self.audit_log)})

    def node_home(self, plant: PlantConfig) -> Path:
        return self.work / "nodes" / plant.plant_id

    def join_kits(self, plants: list[PlantConfig]) -> dict[str, Path]:
        """Each plant's key (made once, kept under its node home) registered with the SuperLink; their join kits.

        The registrations (`flwr supernode register`, one process each) run side by side; `add_plant` then
        checks, records and issues each kit as `maxfl federation add-plant` does.
        """
        fed = self.federation
        assert fed is not None
        new = [p for p in plants if p.plant_id not in self.kits]
        keys: dict[str, Path] = {}
        for plant in new:
            folder = self.node_home(plant) / "keys"
            if not (folder / PRIVATE_KEY_NAME).is_file():
                shutil.rmtree(folder, ignore_errors=True)
                keygen(folder, comment=f"{plant.plant_id}@maxfl-local")
            keys[plant.plant_id] = folder / PUBLIC_KEY_NAME
        with ThreadPoolExecutor(max_workers=max(1, len(new))) as pool:
            node_ids = dict(zip(keys, pool.map(lambda pid: flwr_register(fed, keys[pid], pid), keys), strict=True))
        for plant_id, public_key in keys.items():
            _, self.kits[plant_id] = add_plant(fed, plant_id, public_key, register=lambda *_, n=node_ids[plant_id]: n)
        return {p.plant_id: self.kits[p.plant_id] for p in plants}

    def start_plants(self, superlink: str, plants: list[PlantConfig]) -> None:
        """Each plant's SuperNode (and warm executor); secure: from its join kit, as `maxfl plant join` starts it.

        All SuperNodes start before any is waited for (their start-ups overlap); each warm executor starts once
        its SuperNode is connected, so a plant the SuperLink refuses fails fast, in one line, with nothing left.
        """
        kits = self.join_kits(plants) if self.secure else {}
        for plant in plants:
            home = self.node_home(plant)
            runtime_port = self.reserve_port()
            node_config = plant.as_node_config()
            if self.secure:
                plan = prepare_join(kits[plant.plant_id], home / "keys" / PRIVATE_KEY_NAME, node_config, federation="local")  # the plant's own checks
                argv = supernode_argv(self.bin, superlink, plan.kit.ca_path, plan.key_path, node_config, runtime_port, self.s.warm)
            else:
                argv = supernode_argv(self.bin, superlink, None, None, node_config, runtime_port, self.s.warm)
            env = {**self.env, "FLWR_HOME": str(home), "OMP_NUM_THREADS": str(self._threads_per_plant())}
            self._launch[plant.plant_id] = (argv, env, runtime_port)
            self._start_node(plant.plant_id)
        self.wait_connected([p.plant_id for p in plants])

    def _start_node(self, plant_id: str) -> Managed:
        """Start the plant's SuperNode; it joins the watched processes once connected (a refused attempt is no crash)."""
        argv, env, _ = self._launch[plant_id]
        name = f"supernode-{plant_id}"
        self._log_offsets[plant_id] = _size(self.procs.log_dir / f"{name}.log")
        node = self.procs.start(name, argv, env)
        self.procs.procs.remove(node)
        self._pending[plant_id] = node
        return node

    def _connected(self, plant_id: str) -> None:
        """The SuperNode is in: watch it, and start its warm executor (it talks to the SuperNode's Runtime API)."""
        node = self._pending.pop(plant_id)
        self.procs.procs.append(node)
        if self.s.warm:
            # The Runtime API is the SuperNode's own, on loopback, plain HTTP (Flower serves it with TLS only when
            # the SuperNode gets --ssl-certfile/--ssl-keyfile; the Fleet connection's TLS does not change it).
            _, env, runtime_port = self._launch[plant_id]
            self.procs.start(f"warm-exec-{plant_id}", warm_exec_argv(self.bin, runtime_port, node.popen.pid), env)

    def _node(self, plant_id: str) -> Managed:
        if plant_id in self._pending:
            return self._pending[plant_id]
        for managed in reversed(self.procs.procs):
            if managed.name == f"supernode-{plant_id}":
                return managed
        raise ProcessError(f"{plant_id}'s SuperNode is not running")

    def _node_log(self, plant_id: str) -> str:
        """What the plant's SuperNode logged since its latest start."""
        try:
            with open(self.procs.log_dir / f"supernode-{plant_id}.log", "rb") as fh:
                fh.seek(self._log_offsets.get(plant_id, 0))
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def _plant_failure(self, plant_id: str) -> UserError:
        """Why a plant's SuperNode stopped before it connected, in one line; it is taken out of the group."""
        node = self._node(plant_id)
        node.popen.wait(timeout=30)
        code, tail, log_path = node.popen.returncode, node.tail(), node.log_path
        self.stop_plant(plant_id)
        if rejected_by_superlink(self._node_log(plant_id)):
            return NotRegisteredError(not_registered_message(plant_id))
        return ProcessError(f"supernode-{plant_id} exited with code {code}: {tail} (log: {log_path})")

    def _active(self, plant_id: str) -> bool:
        record = self.federation.plants().plants.get(plant_id) if self.federation else None
        return record is not None and record.status == "active"

    def wait_connected(self, plant_ids: list[str] | None = None, timeout_s: float = STARTUP_TIMEOUT_S) -> dict[str, int]:
        """Each plant's Flower node id once its SuperNode is connected; a refused key: NotRegisteredError (one line).

        A plant whose previous SuperNode died without saying goodbye (killed, power cut) is refused with its own
        key until the SuperLink stops counting that one online (2 missed heartbeats: up to 60 s in Flower 1.41).
        For a plant the anchor lists as active, that refusal is retried until STALE_NODE_S has passed.
        """
        waiting = list(plant_ids if plant_ids is not None else [p.plant_id for p in self.plants])
        found: dict[str, int] = {}
        retried: set[str] = set()
        started = time.monotonic()
        while waiting:
            for plant_id in list(waiting):
                if (node_id := node_id_from_log(self._node_log(plant_id))) is not None:
                    found[plant_id] = node_id
                    waiting.remove(plant_id)
                    if plant_id in self._pending:
                        self._connected(plant_id)
                elif self._node(plant_id).popen.poll() is not None:
                    error = self._plant_failure(plant_id)
                    if isinstance(error, NotRegisteredError) and self._active(plant_id) and time.monotonic() - started < STALE_NODE_S:
                        if plant_id not in retried:
                            retried.add(plant_id)
                            self.echo(f"{plant_id}: refused while the SuperLink still counts its previous SuperNode online "
                                      f"(it stopped abruptly); retrying for up to {STALE_NODE_S:.0f}s")
                        time.sleep(2.0)
                        self._start_node(plant_id)
                        continue
                    raise error
            if waiting and time.monotonic() - started > max(timeout_s, STALE_NODE_S):
                raise ProcessError(f"timed out after {timeout_s:.0f}s waiting for {', '.join(waiting)} to connect to the SuperLink (logs: {self.procs.log_dir})")
            if waiting:
                time.sleep(0.1)
        return found

    def stop_plant(self, plant_id: str) -> None:
        """Take a plant's SuperNode (and its executor) offline, as a plant that loses its link would be."""
        pending = [self._pending.pop(plant_id)] if plant_id in self._pending else []
        for managed in pending + [m for m in self.procs.procs if m.name in (f"supernode-{plant_id}", f"warm-exec-{plant_id}")]:
            if managed.popen.poll() is None:
                managed.popen.terminate()
            managed.popen.wait(timeout=30)
            if managed in self.procs.procs:
                self.procs.procs.remove(managed)  # stopped on purpose: the watchdog must not take it for a crash

    def restart_plant(self, plant_id: str) -> None:
        """Start a stopped plant again (same key, same node id when secure); returns once it is connected."""
        self.start_plants(self.plants_address, [p for p in self.plants if p.plant_id == plant_id])

    def _threads_per_plant(self) -> int:
        """Plants on one machine share its cores: oversubscribed torch threads slow every plant down."""
        return max(1, (os.cpu_count() or 1) // len(self.s.plant_ids))

    def write_cli_config(self, superlink: str) -> Path:
        """The Flower CLI config `flwr run`/`maxfl model push` use: the Control API over TLS verified with the CA."""
        home = self.work / "cli"
        transport = f'root-certificates = "{self.federation.ca_cert}"' if self.secure and self.federation else "insecure = true"
        lines = ["[superlink]", 'default = "local"', "", "[superlink.local]", f'address = "{superlink}"', transport]
        if self.s.mode == "simulation":
            lines.append(f"options.num-supernodes = {self.s.plants}")
        atomic_write_text(home / "config.toml", "\n".join(lines) + "\n")
        return home

    def submit(self, cli_home: Path, overrides: dict[str, Any]) -> int:
        """`flwr run --stream`, echoing the ServerApp's progress; returns Flower's run id."""
        app = stage_app(self.s.app_dir, self.work / "app")  # the FAB's files only: Flower's build walks all it is given
        if self.app_hash is not None:
            if (now := fab_hash(app)) != self.app_hash:  # the anchor and the plants allowed the app as it was
                raise ConfigError(f"the app in {self.s.app_dir} changed after this federation started (FAB {now[:12]}, allowed "
                                  f"{self.app_hash[:12]}), so the anchor and the plants would refuse it; start the federation again")
        cfg_file = self.work / "run-overrides.toml"
        atomic_write_text(cfg_file, "".join(f"{k} = {json.dumps(v)}\n" for k, v in overrides.items()))
        env = {**self.env, "FLWR_HOME": str(cli_home)}
        argv = [str(self.bin / "flwr"), "run", str(app), "local", "--stream", "--run-config", str(cfg_file)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, start_new_session=True)
        watchdog = _Watchdog(self.procs, proc, self.echo)
        watchdog.start()
        run_id = None
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                line = strip_ansi(line.rstrip())
                if m := re.search(r"Successfully started run (\d+)", line):
                    run_id = int(m.group(1))
                    self.echo(f"Flower run {run_id} started")
                elif _is_progress(line):
                    self.echo(line)
                if m := _SERVER_ERROR.search(line):
                    self.last_server_error = m.group(1).strip()
        finally:
            watchdog.stop()
            if proc.poll() is None:  # interrupted: `flwr run --stream` would otherwise follow the run to its end
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if watchdog.error is not None:
            raise watchdog.error
        if run_id is None:
            raise ProcessError(f"`flwr run` did not start a run (exit code {proc.returncode}); see {self.work / 'logs'}")
        return run_id

    def run_status(self, cli_home: Path, run_id: int) -> str:
        out = subprocess.run([str(self.bin / "flwr"), "ls", "local", "--run-id", str(run_id), "--format", "json"],
                             capture_output=True, text=True, env={**self.env, "FLWR_HOME": str(cli_home)}, timeout=60)
        try:
            runs = json.loads(out.stdout)["runs"]
            return str(runs[0]["status"])
        except (ValueError, KeyError, IndexError):
            return "unknown"

    def start_page(self) -> str:
        """The federation page (`maxfl federation page`) on loopback, reading this launch's MLflow, federation folder,
        audit log and spend record; returns its URL with the token (kept under <workdir>/anchor)."""
        port = self.reserve_port()
        token_file = self.work / "anchor" / "page-token"
        token = load_or_create_token(token_file)
        argv = [str(self.bin / "maxfl"), "federation", "page", "--tracking-uri", self.tracking_uri, "--audit-log", str(self.audit_log),
                "--privacy-watch", str(self.base_overrides["privacy-watch"]), "--token-file", str(token_file), "--host", "127.0.0.1", "--port", str(port)]
        proc = self.procs.start("page", argv + (["--dir", str(self.federation.dir)] if self.secure and self.federation else []), self.env)
        self.procs.wait_until("the federation page", lambda: _http_ok(f"http://127.0.0.1:{port}/healthz"), STARTUP_TIMEOUT_S, proc)
        self.page_url = f"http://127.0.0.1:{port}/?token={token}"
        return self.page_url

    def start_edge_servers(self, plants: list[PlantConfig], model_name: str) -> None:
        """Each plant's edge model server, serving whatever its edge store holds (nothing yet on a first run); all
        start before any is waited for, so their start-ups overlap."""
        started = []
        for plant in plants:
            port = self.reserve_port()
            url = f"http://127.0.0.1:{port}"
            proc = self.procs.start(
                f"edge-{plant.plant_id}",
                [str(self.bin / "maxfl"), "edge", "serve", "--node-config", plant.as_node_config(), "--model", model_name,
                 "--host", "127.0.0.1", "--port", str(port)],
                {**self.env, "OMP_NUM_THREADS": "1"},
            )
            started.append((plant.plant_id, url, proc))
        for plant_id, url, proc in started:
            self.procs.wait_until(f"{plant_id}'s edge server", lambda u=url: _http_answers(f"{u}/health"), STARTUP_TIMEOUT_S, proc)
            self.edge_urls[plant_id] = url

    # ---------------------------------------------------------------- all together
    def __enter__(self) -> LocalFederation:
        """Start MLflow, the SuperLink, the plants (SuperNodes and edge servers); `submit_run` runs on them."""
        if self.s.ray_address:  # an attached cluster that does not answer: one line, before anything starts
            check_ray_address(self.s.ray_address)
        check_memory(self.s.mode, self.s.plants, ray_attached=self.s.ray_address is not None)
        cfg = app_run_config(self.s.app_dir, self.s.run_overrides)
        model = resolve_model(get_task(cfg.task), TaskOptions(model=cfg.model, image_size=cfg.image_size))  # fail before any process starts
        if cfg.release and (backbone := get_backbone(model)) is not None and not backbone.exportable:
            raise ConfigError(f"model {model} cannot be exported to ONNX for the edge, so it cannot be released: "
                              "add --set release=false (an experiment arm) or choose --set model=effnet-lite0")
        if self.s.tracking_uri and self.s.keep_mlflow:
            raise ConfigError("--keep-mlflow keeps the MLflow server this command starts; with --tracking-uri yours stays up anyway")
        mlflow_port = None if self.s.tracking_uri else self.reserve_port(self.s.mlflow_port, "MLflow", "--mlflow-port")
        superlink_port = self.reserve_port(self.s.superlink_port, "the SuperLink", "--superlink-port")
        proxy_port = self.reserve_port(self.s.proxy_port, "the proxy", "proxy_port") if self.secure else None
        if self.secure:
            caddy_binary()  # missing: one line naming the package, before any process starts
        self.check_backend_store()
        if cfg.privacy == "none" and self.s.mode == "deployment" and (finite := sorted(
                {self.s.ceilings.get(p, self.s.max_epsilon) for p in self.s.plant_ids} - {math.inf})):
            raise ConfigError(f"run config privacy=none trains without differential privacy, and a plant with a finite ceiling "
                              f"(max-epsilon {finite[0]:g}) refuses that: pass --max-epsilon inf for plants that allow it")
        self.plants = self.prepare_data(cfg.task, cfg.seed)
        if self.s.data:
            self.check_own_data(cfg)
        try:
            if self.s.tracking_uri:
                self.tracking_uri = self.s.tracking_uri.rstrip("/")
                check_reachable(self.tracking_uri)
                self.echo(f"MLflow tracking server: {self.tracking_uri}")
            else:
                assert mlflow_port is not None
                self.tracking_uri = self.launch_mlflow(mlflow_port)  # answers by the time the plants are up
            superlink = self.superlink = self.start_superlink(superlink_port, proxy_port)
            security = "TLS + SuperNode authentication" if self.secure else "INSECURE: no TLS, no node authentication"
            self.echo(f"SuperLink ({self.s.mode}, {security}): {superlink}")
            if self.s.ray_address:
                self.echo(f"simulation engine: the Ray cluster at {self.s.ray_address}")
            if self.plants_address != superlink:
                self.echo(f"proxy for plants (Fleet API only): {self.plants_address}")
            # The anchor's audit log persists across launches, like its MLflow store (the demo CA does not).
            # The anchor's record of the plants' privacy spend sits beside the demo ledgers: deleting them resets both sides.
            watch = self.ledger_dir / "anchor-privacy-watch.json"
            self.base_overrides = {**self.s.run_overrides, "tracking-uri": self.tracking_uri, "audit-log": str(self.audit_log),
                                   "privacy-watch": str(watch)}
            if self.secure:  # replies are attributed by node id -> registered key -> plant (fl_server.run.identity)
                self.base_overrides["federation-dir"] = str(self.federation_dir)
            if self.s.mode == "deployment":
                self.start_plants(self.plants_address, self.plants)
                joined = " (registered, joined with their kits)" if self.secure else ""
                self.echo(f"plants: {', '.join(p.plant_id for p in self.plants)} (SuperNodes connected){joined}")
            if not self.s.tracking_uri:
                self.await_mlflow(self.tracking_uri)
                self.echo(f"MLflow tracking server: {self.tracking_uri}")
            if self.s.page:
                self.echo(f"federation page: {self.start_page()}")
            if self.s.mode == "deployment":
                if cfg.release:
                    self.start_edge_servers(self.plants, cfg.model_name())
                    self.echo(f"edge servers: {', '.join(f'{p} {u}' for p, u in self.edge_urls.items())}")
            else:
                root = str(self.plants[0].data_dir.parent)
                self.base_overrides |= {"sim-data-root": root, "sim-max-epsilon": self.s.max_epsilon, "sim-delta": self.s.delta}
            self.cli_home = self.write_cli_config(superlink)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for plant_id in list(self._pending):
            self.stop_plant(plant_id)
        killed = self.procs.stop_all()
        if killed:
            log.warning("had to kill %d process(es) that ignored SIGTERM: %s", len(killed), killed)

    def submit_run(self, overrides: dict[str, Any] | None = None) -> FederationResult:
        """One Flower run on the started federation (training by default; `action = "push"` pushes a version)."""
        run_overrides = {**self.base_overrides, **(overrides or {})}
        cfg = app_run_config(self.s.app_dir, run_overrides)
        run_id = self.submit(self.cli_home, run_overrides)
        status = self.run_status(self.cli_home, run_id)
        if not status.endswith("completed"):
            reason = self.last_server_error or self._refusal(run_id) or "see the ServerApp's output above"
            raise ProcessError(f"Flower run {run_id} ended as '{status}': {reason} (logs: {self.work / 'logs'})")
        return self._result(cfg, run_id, status)

    def _refusal(self, run_id: int) -> str:
        """Why the anchor's executor refused this run's ServerApp, from its audit log; empty if it did not."""
        for event in AuditLog(self.audit_log).events():
            if event.event == "serverapp.refused" and event.details.get("run_id") == run_id:
                return f"the anchor refused the ServerApp: {event.details.get('reason', '')}"
        return ""

    def run(self) -> FederationResult:
        """`maxfl federate`: start everything, train (gate, register, push), show what the edge serves, stop."""
        with self:
            result = self.submit_run()
            if self.s.keep_mlflow:
                self._serve_mlflow_until_interrupted(result)
            return result

    def edge_health(self, plant: str) -> dict[str, Any]:
        return httpx.get(f"{self.edge_urls[plant]}/health", timeout=5.0, verify=False).json()  # plain HTTP on loopback

    def wait_for_edge(self, version: int | None, model_name: str = "", timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
        """Each edge server's health once it serves `version` (they pick up an install within a second); None: now.
        With `model_name`, also the variant the plant's store has current: the plant installs its personalised
        variant after the release itself, so a server seen on the release alone may be about to swap."""
        deadline = time.monotonic() + timeout_s
        health: dict[str, dict[str, Any]] = {}
        stores = {p.plant_id: EdgeStore(p.edge_store_path()) for p in self.plants}
        for plant in self.edge_urls:
            while True:
                health[plant] = self.edge_health(plant)
                model = health[plant].get("model") or {}
                current = _current(stores.get(plant), model_name)
                want = (version, current.variant) if current is not None and current.manifest.version == version else (version, None)
                if version is None or time.monotonic() > deadline or (
                        model.get("version") == want[0] and want[1] in (None, model.get("variant", "global"))):
                    break
                time.sleep(0.2)
        return health

    def _result(self, cfg: RunConfig, run_id: int, status: str) -> FederationResult:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        exp = client.get_experiment_by_name(cfg.experiment_name)
        runs = client.search_runs([exp.experiment_id], f"tags.`flwr.run_id` = '{run_id}'") if exp else []
        if not runs:
            raise ProcessError(f"Flower run {run_id} ({status}) left no MLflow run in experiment '{cfg.experiment_name}'; see {self.work / 'logs'}")
        mlflow_run = runs[0]
        url = f"{self.tracking_uri}/#/experiments/{mlflow_run.info.experiment_id}/runs/{mlflow_run.info.run_id}"
        tags = mlflow_run.data.tags
        served: dict[str, str] = {}
        release = self._release_lines(cfg, tags, served) if cfg.release or cfg.action == "push" else []
        summary = tags.get("maxfl.gate", "")
        rows = self._plant_rows(client, mlflow_run, served) if cfg.action == "train" else []
        return FederationResult(run_id, mlflow_run.info.run_id, url, self.tracking_uri, status,
                                [privacy_summary(p) for p in self.plants] if cfg.action == "train" else [], release,
                                gate="" if not summary else "passed" if summary.startswith("passed") else "failed", gate_summary=summary,
                                plants=rows)

    def _plant_rows(self, client: Any, mlflow_run: Any, served: dict[str, str]) -> list[dict[str, Any]]:
        """Per plant: the gate's evaluation of this run's model there, its epsilon, what its edge serves."""
        import tempfile

        from maxfl.messages import PRIVACY_PREFIX

        scores: dict[str, dict[str, float]] = {}
        with tempfile.TemporaryDirectory(prefix="maxfl-result-") as tmp:
            try:
                table = json.loads(Path(client.download_artifacts(mlflow_run.info.run_id, "gate/evaluation.json", tmp)).read_text())
            except Exception:  # noqa: BLE001 - no gate in this run (release off): no scores to show
                table = {"columns": [], "data": []}
        for values in table.get("data", []):
            row = dict(zip(table.get("columns", []), values, strict=False))
            if row.get("model") == "candidate":
                scores[str(row["plant"])] = {k: float(v) for k, v in row.items() if k in HEADLINE_METRICS and v is not None}
        metrics = mlflow_run.data.metrics
        out = []
        for plant in self.plants:
            pid = plant.plant_id
            out.append({"plant": pid, **scores.get(pid, {}),
                        "epsilon_run": metrics.get(f"{pid}/{PRIVACY_PREFIX}epsilon_run"),
                        "epsilon_lifetime": metrics.get(f"{pid}/{PRIVACY_PREFIX}epsilon"), "served": served.get(pid, "")})
        return out

    def _release_lines(self, cfg: RunConfig, tags: dict[str, str], served: dict[str, str]) -> list[str]:
        """The gate's verdict, and what each plant's edge server serves now (once it has the model this run pushed)."""
        from fl_server.release.registry import Registry

        lines = [f"gate {tags['maxfl.gate']}"] if "maxfl.gate" in tags else []
        champion = Registry(self.tracking_uri, cfg.model_name()).champion()
        if champion is not None:
            lines.append(f"champion: {cfg.model_name()} v{champion.version}")
        pushed = champion.version if champion is not None and tags.get("maxfl.gate", "").startswith("passed") else None
        for plant, health in self.wait_for_edge(pushed, cfg.model_name()).items():
            model = health.get("model") or {}
            serving = f"{model.get('name')} v{model.get('version')}" if model else "no model"
            served[plant] = serving + (f" ({model['variant']})" if model.get("variant") else "")  # the table says which variant
            lines.append(f"{plant} edge server {self.edge_urls[plant]} serves {serving}")
        return lines

    def _serve_mlflow_until_interrupted(self, result: FederationResult) -> None:
        self.echo(f"MLflow stays up for browsing at {result.mlflow_url} — press Ctrl-C to stop it")
        assert self._mlflow is not None
        for managed in self.procs.procs:
            if managed not in (self._mlflow, self._postgres):  # MLflow's PostgreSQL stays with it
                managed.popen.terminate()
        try:
            while self._mlflow.popen.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass  # the expected way to end browsing: the run itself succeeded


class _Watchdog(threading.Thread):
    """Stops `flwr run` when an anchor process (MLflow, the SuperLink) dies, so the run does not hang.

    A plant that dies does not stop the run: the ServerApp goes on without it for as long as `min-plants`
    remain (each round waits at most `round-timeout-s`). The watchdog reports it once and lets it go.
    """

    def __init__(self, procs: ProcessGroup, runner: subprocess.Popen[str], echo: Callable[[str], None]) -> None:
        super().__init__(daemon=True)
        self.procs, self.runner, self.echo = procs, runner, echo
        self.error: ProcessError | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.5):
            for managed in [m for m in self.procs.procs if m.popen.poll() is not None]:
                problem = f"{managed.name} exited with code {managed.popen.returncode}: {managed.tail()} (log: {managed.log_path})"
                if not managed.name.startswith(PLANT_PROCESSES):
                    self.error = ProcessError(problem)
                    self.runner.terminate()
                    return
                self.echo(f"WARNING: {problem}; the run goes on without it")
                self.procs.procs.remove(managed)  # reported once; stop_all still reaps what it left

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=2)


def _verify(url: str, verify: ssl.SSLContext | bool) -> ssl.SSLContext | bool:
    """No TLS settings for a plain-HTTP probe: httpx would build a new SSL context (the system's CA bundle) for every
    call, tens of milliseconds of a startup loop that probes five times a second."""
    return False if url.startswith("http://") else verify


def _http_answers(url: str) -> bool:
    """Any HTTP answer: an edge server with no model yet answers 503 and is up all the same."""
    try:
        httpx.get(url, timeout=1.0, verify=_verify(url, True))
        return True
    except httpx.HTTPError:
        return False


def _http_ok(url: str, verify: ssl.SSLContext | bool = True) -> bool:
    try:
        return httpx.get(url, timeout=1.0, verify=_verify(url, verify)).is_success
    except httpx.HTTPError:
        return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# The exception that ended a ServerApp, as Flower's log stream shows it: "...RunAborted: round 1: ..."
_SERVER_ERROR = re.compile(r"(?:maxfl\.errors\.\w+|RunAborted|\w+Error): (.+)$")


def _current(store: EdgeStore | None, model_name: str) -> InstalledModel | None:
    """The store's current installed model, or None (no name, no store, nothing current, a damaged store)."""
    try:
        return store.current(model_name) if store is not None and model_name else None
    except EdgeStoreError:
        return None


def _is_progress(line: str) -> bool:
    return "maxfl:" in line or "ERROR" in line or "Exception" in line
