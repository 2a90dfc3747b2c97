"""What the federation page shows, read from where the anchor keeps it: one pydantic model per thing shown.

Sources: the federation folder (plants.json: who is registered or revoked), the SuperLink's Control API
(`flwr supernode ls`: who is connected, since when), MLflow (runs and their per-round metrics, contributions,
the registry with gate verdicts and each plant's edge record), the anchor's spend record (SpendWatch) and its
audit log (deployments). Every reader here is synchronous and raises `SourceDown` with one line when its
source cannot be read; fl_server.federation.page.cached runs them off the event loop, each within a bound.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fl_server.federation.provision import Federation, FederationInfo, PlantBook, ProvisionError, _flwr, load_federation
from fl_server.release.registry import SHA_TAG, Registry
from fl_server.run.privacy_watch import SpendWatch, WatchCorrupt
from maxfl.messages import PRIVACY_PREFIX

# fl_server.run.tracking.ROUND_PROBE: every completed round logs it last (step = round). Not imported: that module
# pulls torch, which the page's process does not need (tests/fl_server/federation/test_page.py checks they agree).
ROUND_PROBE = "round_wall_s"
ROUNDS_PARAM = "num-server-rounds"  # RunConfig.num_server_rounds as MLflow's params hold it
GATE_METRIC_PARAM = "gate-metric"
DEFAULT_METRICS = ("eval_macro_f1", "eval_r2", "eval_accuracy", "eval_loss")  # the tasks' gate metrics first
CONTRIBUTION_PREFIX = "contribution/"  # contribution/<plant>/shapley, contribution/<plant>/loo; artifact contribution/contributions.json
CONTRIBUTION_FILE = "contribution/contributions.json"
DEPLOYED_EVENT = "model.deployed"  # RunTracker.audit_deployments
AUDIT_TAIL_BYTES = 256 * 1024  # the audit log only grows: the page reads its end
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MLFLOW_INF = 1.7976931348623157e308  # what MLflow's SQL stores write for an infinite metric


class SourceDown(Exception):
    """A source the page reads cannot be read right now; the message is the one line the page shows."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(message)
        self.source = source


class PageSources(BaseModel):
    """Where the page reads: the anchor's own files and servers (`maxfl federation page` resolves the defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    federation_dir: Path | None = None  # none: an insecure or simulated federation, no registered plants
    tracking_uri: str = Field(min_length=1)
    mlflow_ui: str = ""  # where a browser opens MLflow's UI; empty: the tracking URI when it is http(s)
    audit_log: Path | None = None  # the runs' audit log (deployments)
    privacy_watch: Path | None = None  # the anchor's spend record (fl_server.run.privacy_watch)
    runs_shown: int = Field(12, ge=1, le=200)
    runs_counted: int = Field(200, ge=1, le=1000)  # runs by status (Prometheus) over this many most recent runs

    def ui_base(self) -> str:
        base = self.mlflow_ui or (self.tracking_uri if self.tracking_uri.startswith(("http://", "https://")) else "")
        return base.rstrip("/")

    def run_url(self, experiment_id: str, run_id: str) -> str:
        return f"{self.ui_base()}/#/experiments/{experiment_id}/runs/{run_id}" if self.ui_base() else ""

    def version_url(self, model: str, version: int) -> str:
        return f"{self.ui_base()}/#/models/{quote(model)}/versions/{version}" if self.ui_base() else ""


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------- plants: plants.json and the SuperLink's node list
class NodeState(BaseModel):
    """One node as the SuperLink's Control API lists it (`flwr supernode ls --format json`)."""

    model_config = ConfigDict(frozen=True)

    node_id: int
    status: str  # online | offline | registered (never connected)
    online_at: datetime | None = None
    offline_at: datetime | None = None


class PlantRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    plant: str
    node_id: int | None
    registered: Literal["active", "revoked", "not registered"]
    joined_at: datetime | None = None
    revoked_at: datetime | None = None
    # online | offline | registered (never connected) | gone (the SuperLink no longer has its node) | unknown (not asked)
    connection: str
    online_since: datetime | None = None
    last_seen: datetime | None = None  # online: now; offline: when the SuperLink last counted it online


class FederationView(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    superlink_address: str
    control_address: str
    plants: list[PlantRow]
    strangers: list[NodeState] = Field(default_factory=list)  # nodes the SuperLink has that plants.json lacks
    superlink_asked: bool  # False: the SuperLink's node list was not available, connections are unknown
    superlink_problem: str = ""  # why not, in one line

    @property
    def active(self) -> int:
        return sum(p.registered == "active" for p in self.plants)

    @property
    def revoked(self) -> int:
        return sum(p.registered == "revoked" for p in self.plants)

    def connected(self) -> int | None:
        """Active plants online now; None when the SuperLink could not be asked."""
        if not self.superlink_asked:
            return None
        return sum(p.connection == "online" for p in self.plants if p.registered == "active")


def read_federation(folder: Path) -> tuple[FederationInfo, PlantBook]:
    try:
        fed = load_federation(folder)
        return fed.info, fed.plants()
    except (ProvisionError, OSError) as exc:
        raise SourceDown("federation", f"the federation folder {folder} cannot be read: {_one_line(exc)}") from None


def _when(value: object) -> datetime | None:
    if not isinstance(value, str) or not value.strip() or value.strip() == "N/A":
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def superlink_nodes(folder: Path, timeout_s: float = 20.0) -> dict[int, NodeState]:
    """The SuperLink's nodes (unregistered ones left out) through its Control API, with the anchor's certificate
    config (D/flwr-home): `flwr supernode ls` as fl_server.federation.reconcile.flwr_list_nodes asks it, keeping
    when each node came online or went offline."""
    try:
        fed: Federation = load_federation(folder)
        answer = _flwr(fed, ["supernode", "ls"], timeout_s=timeout_s)
    except (ProvisionError, OSError) as exc:
        raise SourceDown("superlink", _one_line(exc)) from None
    nodes: dict[int, NodeState] = {}
    for item in answer.get("nodes", []):
        try:
            node = int(item["node-id"])
        except (KeyError, TypeError, ValueError):
            continue
        status = str(item.get("status", ""))
        if status in ("unregistered", "deleted"):
            continue
        nodes[node] = NodeState(node_id=node, status=status, online_at=_when(item.get("online-at")), offline_at=_when(item.get("offline-at")))
    return nodes


def federation_view(info: FederationInfo, book: PlantBook, nodes: Mapping[int, NodeState] | None, superlink_problem: str = "",
                    now: datetime | None = None) -> FederationView:
    """plants.json joined with the SuperLink's nodes (None: the SuperLink could not be asked, `superlink_problem` says why)."""
    now = now or datetime.now(UTC)
    rows = []
    for record in sorted(book.plants.values(), key=lambda r: r.plant_id):
        node = nodes.get(record.node_id) if nodes is not None else None
        if nodes is None:
            connection = "unknown"
        elif node is None:
            connection = "gone" if record.status == "active" else "-"
        else:
            connection = node.status or "unknown"
        online = node is not None and node.status == "online"
        rows.append(PlantRow(
            plant=record.plant_id, node_id=record.node_id, registered=record.status, joined_at=record.joined_at, revoked_at=record.revoked_at,
            connection=connection, online_since=node.online_at if online and node else None,
            last_seen=now if online else (node.offline_at if node is not None else None),
        ))
    known = {r.node_id for r in book.plants.values()}
    strangers = [n for n_id, n in sorted((nodes or {}).items()) if n_id not in known]
    return FederationView(name=info.name, superlink_address=info.superlink_address, control_address=info.control_address,
                          plants=rows, strangers=strangers, superlink_asked=nodes is not None,
                          superlink_problem=superlink_problem if nodes is None else "")


# ---------------------------------------------------------------- runs (MLflow)
class Point(BaseModel):
    model_config = ConfigDict(frozen=True)

    step: int
    value: float


class RunRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str
    experiment_id: str
    name: str
    status: str  # MLflow's: RUNNING, FINISHED, FAILED, KILLED, SCHEDULED
    action: str  # train | push
    task: str
    flwr_run_id: str
    started: datetime | None
    ended: datetime | None
    rounds_planned: int | None
    round: int  # the last round whose metrics are in MLflow (0: none yet)
    metric: str  # the curve's metric: the run's gate metric
    metric_value: float | None
    gate: str  # the run's gate verdict (its summary line), if it was gated
    url: str  # the run in MLflow's UI

    @property
    def running(self) -> bool:
        return self.status == "RUNNING"


class RunsView(BaseModel):
    model_config = ConfigDict(frozen=True)

    runs: list[RunRow]  # newest first, `runs_shown` of them
    counts: dict[str, int]  # MLflow status -> runs among the `window` most recent
    window: int

    def current(self) -> RunRow | None:
        """The run the page follows: the newest training run still going, else the newest training run."""
        training = [r for r in self.runs if r.action == "train"]
        return next((r for r in training if r.running), training[0] if training else None)


class PlantEpsilon(BaseModel):
    """A plant's lifetime epsilon on its data set after each round of the run, as it reported it, and its ceiling."""

    model_config = ConfigDict(frozen=True)

    plant: str
    points: list[Point]
    ceiling: float | None  # None: the plant did not report one; inf: it allows training without DP
    delta: float | None

    @property
    def latest(self) -> float | None:
        return self.points[-1].value if self.points else None

    @property
    def remaining(self) -> float | None:
        if self.ceiling is None or self.latest is None or math.isinf(self.ceiling):
            return None
        return self.ceiling - self.latest


class Contribution(BaseModel):
    model_config = ConfigDict(frozen=True)

    plant: str
    shapley: float | None
    loo: float | None


class RunDetail(BaseModel):
    model_config = ConfigDict(frozen=True)

    run: RunRow
    curve: list[Point]
    epsilon: list[PlantEpsilon]
    contributions: list[Contribution]  # empty: not computed for this run
    contributions_file: bool  # contribution/contributions.json is among the run's artifacts
    plants: list[str]


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _mlflow_down(uri: str, exc: BaseException) -> SourceDown:
    return SourceDown("mlflow", f"MLflow at {uri} cannot be read: {_one_line(exc)}")


def _ms(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value / 1000, UTC) if value else None


def _curve_metric(params: Mapping[str, str], metrics: Mapping[str, float]) -> str:
    wanted = params.get(GATE_METRIC_PARAM, "")
    if wanted:
        return wanted
    return next((m for m in DEFAULT_METRICS if m in metrics), next((m for m in sorted(metrics) if m.startswith("eval_")), ""))


def _unclamped(value: float | None) -> float | None:
    """MLflow's SQL stores keep an infinite metric as the largest float (a plant without DP: an infinite ceiling)."""
    if value is not None and abs(value) >= MLFLOW_INF:
        return math.copysign(math.inf, value)
    return value


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class MlflowReader:
    """The runs and the registry in one tracking server. Finished runs do not change: their round is kept."""

    def __init__(self, sources: PageSources) -> None:
        self.sources = sources
        self.uri = sources.tracking_uri
        self._rounds: dict[str, int] = {}  # run id -> last round, for runs that ended

    def _history(self, client: Any, run_id: str, key: str) -> list[Point]:
        found = {int(m.step): float(m.value) for m in client.get_metric_history(run_id, key)}
        return [Point(step=s, value=_unclamped(v)) for s, v in sorted(found.items())]  # type: ignore[arg-type]

    def _round(self, client: Any, run: Any) -> int:
        run_id = run.info.run_id
        if run_id in self._rounds:
            return self._rounds[run_id]
        if ROUND_PROBE not in run.data.metrics:
            last = 0
        else:
            last = max((p.step for p in self._history(client, run_id, ROUND_PROBE)), default=0)
        if run.info.status not in ("RUNNING", "SCHEDULED"):
            if len(self._rounds) > 10 * self.sources.runs_counted:
                self._rounds.clear()
            self._rounds[run_id] = last
        return last

    def _row(self, client: Any, run: Any) -> RunRow:
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        metric = _curve_metric(params, metrics)
        return RunRow(
            run_id=run.info.run_id, experiment_id=str(run.info.experiment_id), name=run.info.run_name or run.info.run_id[:8],
            status=str(run.info.status), action=tags.get("maxfl.action", params.get("action", "train")), task=tags.get("maxfl.task", params.get("task", "")),
            flwr_run_id=tags.get("flwr.run_id", ""), started=_ms(run.info.start_time), ended=_ms(run.info.end_time),
            rounds_planned=_int(params.get(ROUNDS_PARAM)), round=self._round(client, run), metric=metric,
            metric_value=_unclamped(metrics.get(metric)), gate=tags.get("maxfl.gate", ""),
            url=self.sources.run_url(str(run.info.experiment_id), run.info.run_id),
        )

    def _search(self, client: Any, limit: int) -> list[Any]:
        experiments = [e.experiment_id for e in client.search_experiments(max_results=1000)]
        if not experiments:
            return []
        return list(client.search_runs(experiments, max_results=limit, order_by=["attributes.start_time DESC"]))

    def runs(self) -> RunsView:
        try:
            client = _client(self.uri)
            found = self._search(client, max(self.sources.runs_counted, self.sources.runs_shown))
            counts: dict[str, int] = {}
            for run in found:
                counts[str(run.info.status)] = counts.get(str(run.info.status), 0) + 1
            rows = [self._row(client, run) for run in found[: self.sources.runs_shown]]
        except Exception as exc:  # noqa: BLE001 - MLflow raises its own, requests', sqlalchemy's: all mean "cannot read"
            raise _mlflow_down(self.uri, exc) from None
        return RunsView(runs=rows, counts=counts, window=len(found))

    def run(self, run_id: str) -> RunDetail:
        if not RUN_ID.match(run_id):
            raise SourceDown("mlflow", f"{run_id!r} is no MLflow run id (32 hex digits)")
        try:
            from mlflow.exceptions import MlflowException

            client = _client(self.uri)
            try:
                run = client.get_run(run_id)
            except MlflowException as exc:
                if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower():
                    raise SourceDown("mlflow", f"MLflow at {self.uri} has no run {run_id}") from None
                raise
            row = self._row(client, run)
            metrics = run.data.metrics
            curve = self._history(client, run_id, row.metric) if row.metric in metrics else []
            suffix = f"/{PRIVACY_PREFIX}epsilon"
            plants = sorted({k[: -len(suffix)] for k in metrics if k.endswith(suffix) and "/" not in k[: -len(suffix)]})
            tagged = [p for p in run.data.tags.get("maxfl.plants", "").split(",") if p]
            epsilon = [PlantEpsilon(plant=p, points=self._history(client, run_id, f"{p}{suffix}"),
                                    ceiling=_unclamped(metrics.get(f"{p}/{PRIVACY_PREFIX}epsilon_ceiling")), delta=metrics.get(f"{p}/{PRIVACY_PREFIX}delta"))
                       for p in plants]
            contributions = _contributions(metrics)
            has_file = bool(contributions) and any(a.path == CONTRIBUTION_FILE for a in client.list_artifacts(run_id, "contribution"))
        except SourceDown:
            raise
        except Exception as exc:  # noqa: BLE001 - as in runs()
            raise _mlflow_down(self.uri, exc) from None
        return RunDetail(run=row, curve=curve, epsilon=epsilon, contributions=contributions, contributions_file=has_file,
                         plants=sorted(set(plants) | set(tagged)))

    def registry(self, limit: int = 20, versions_shown: int = 10) -> RegistryView:
        try:
            client = _client(self.uri)
            names = sorted(m.name for m in client.search_registered_models(max_results=limit))
            models = []
            for name in names:
                registry = Registry(self.uri, name)
                versions = sorted(registry.versions(), key=lambda v: v.version, reverse=True)[:versions_shown]
                rows = [VersionRow(model=name, version=v.version, run_id=v.run_id, aliases=v.aliases, gate=v.gate, gate_summary=v.gate_summary,
                                   created=v.created, sha256=v.tags.get(SHA_TAG, ""), url=self.sources.version_url(name, v.version))
                        for v in versions]
                edge = [EdgeRow(model=name, plant=r.plant, version=r.version, status=r.status, serving=r.serving, at=r.at, detail=r.detail)
                        for r in registry.edge().values()]
                models.append(ModelView(name=name, versions=rows, edge=edge))
        except Exception as exc:  # noqa: BLE001 - as in runs()
            raise _mlflow_down(self.uri, exc) from None
        return RegistryView(models=models)


def _contributions(metrics: Mapping[str, float]) -> list[Contribution]:
    found: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith(CONTRIBUTION_PREFIX):
            parts = key[len(CONTRIBUTION_PREFIX):].rsplit("/", 1)
            if len(parts) == 2 and parts[1] in ("shapley", "loo") and parts[0]:
                found.setdefault(parts[0], {})[parts[1]] = value
    return [Contribution(plant=p, shapley=v.get("shapley"), loo=v.get("loo")) for p, v in sorted(found.items())]


# ---------------------------------------------------------------- the registry and the plants' edges (MLflow)
class VersionRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str
    version: int
    run_id: str
    aliases: list[str]  # champion, candidate
    gate: str  # passed | failed | promoted | demoted | -
    gate_summary: str
    created: datetime
    sha256: str
    url: str  # the version in MLflow's UI (it links to its run)


class EdgeRow(BaseModel):
    """Where one plant's edge store stands for a registered model, as the plant's last deploy ack said."""

    model_config = ConfigDict(frozen=True)

    model: str
    plant: str
    version: int  # the version pushed (pending: waiting for the plant)
    status: Literal["installed", "pending", "refused"]
    serving: int | None  # the version its store has current
    at: datetime
    detail: str


class ModelView(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    versions: list[VersionRow]  # newest first
    edge: list[EdgeRow]

    @property
    def champion(self) -> VersionRow | None:
        return next((v for v in self.versions if "champion" in v.aliases), None)


class RegistryView(BaseModel):
    model_config = ConfigDict(frozen=True)

    models: list[ModelView]


# ---------------------------------------------------------------- the anchor's files: deployments, spend record
class Deployment(BaseModel):
    model_config = ConfigDict(frozen=True)

    ts: datetime
    plant: str
    version: int | None
    status: str
    serving: int | None
    detail: str
    mlflow_run: str


def recent_deployments(path: Path, limit: int = 20) -> list[Deployment]:
    """The last `model.deployed` events of the anchor's audit log (its end only: the log only grows), newest first.

    The page shows them; `maxfl audit` is what checks the log's chain."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            start = max(0, size - AUDIT_TAIL_BYTES)
            fh.seek(start)
            data = fh.read()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise SourceDown("audit", f"the audit log {path} cannot be read ({exc.strerror})") from None
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first is cut
    found: list[Deployment] = []
    for line in reversed(lines):
        if len(found) >= limit:
            break
        try:
            event = json.loads(line)
            if event.get("event") != DEPLOYED_EVENT:
                continue
            d = event.get("details", {})
            found.append(Deployment(ts=event["ts"], plant=str(d.get("plant", "")), version=d.get("version"), status=str(d.get("status", "")),
                                    serving=d.get("serving"), detail=str(d.get("detail") or ""), mlflow_run=str(d.get("mlflow_run", ""))))
        except (ValueError, KeyError, TypeError, AttributeError, ValidationError):
            continue  # a cut or foreign line: the page shows what it can read
    return found


class SpendRow(BaseModel):
    """The highest lifetime spend a plant reported on one data set, as the anchor recorded it."""

    model_config = ConfigDict(frozen=True)

    plant: str
    data_set: str  # the data set's fingerprint
    epsilon: float
    delta: float
    rounds: int
    run: str
    server_round: int
    recorded_at: datetime


def spend_record(path: Path) -> list[SpendRow]:
    try:
        state = SpendWatch(path).read()
    except WatchCorrupt as exc:
        raise SourceDown("privacy", str(exc)) from None
    return [SpendRow(plant=plant, data_set=fp, epsilon=s.epsilon, delta=s.delta, rounds=s.rounds, run=s.run, server_round=s.server_round,
                     recorded_at=s.recorded_at)
            for plant, sets in sorted(state.plants.items()) for fp, s in sorted(sets.items())]
