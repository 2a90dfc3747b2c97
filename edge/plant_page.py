"""The plant's page, for its IT person: what this plant spent of its privacy ceiling, which apps it allowed or
refused, which model it serves and how it got there, and how its edge server is answering. Read-only.

Served by the edge server at `GET /plant` (HTML, Jinja2 templates in edge/templates/, no JavaScript; it reloads
itself every 15 s) and `GET /plant.json` (the same facts, `PlantPage`), both behind the page token
(maxfl.page_auth). Every fact is read when the page is asked for, on a worker thread: the ledger with the code of
`maxfl ledger` (the plant's own `Ledger`, `privacy.report.spending`), the audit log with its chain checked, the
edge store as `maxfl edge status` reads it. A file that is missing, unreadable or fails verification becomes a
message on the page, never an error of the server, and never touches inference.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from edge.metrics import RequestStats

if TYPE_CHECKING:
    from edge.metrics import EdgeMetrics
    from edge.server import ModelWatcher
    from fl_client.config import PlantConfig

log = logging.getLogger("maxfl.edge")

PROTECTED = ("/plant", "/plant.json")  # the page, its stylesheet and its JSON twin; nothing else needs the token
TEMPLATES = Path(__file__).parent / "templates"
APPS_SHOWN = 100  # newest app decisions on the page; the audit log keeps them all
REFRESH_S = 15
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


class _Facts(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="strings")  # an epsilon without DP is infinite: "Infinity" keeps the JSON strict


class LedgerRow(_Facts):
    """One data set of the plant, by fingerprint: what it spent over every run, against the plant's ceiling."""

    fingerprint: str
    task: str
    records: int
    rounds: int
    runs: list[int]
    epsilon_spent: float
    epsilon_ceiling: float | None  # None: the node config sets no ceiling (the plant refuses to train)
    epsilon_remaining: float | None
    delta: float
    last_used: datetime | None


class LedgerView(_Facts):
    path: str
    status: Literal["ok", "missing", "unverified", "error"]
    message: str | None = None
    ceiling: float | None
    delta: float
    rows: list[LedgerRow] = []


class AppDecision(_Facts):
    at: str  # the audit event's time, ISO 8601 UTC
    decision: Literal["allowed", "refused"]
    run_id: int | None
    fab_hash: str
    app: str
    reason: str | None


class AppsView(_Facts):
    path: str
    status: Literal["ok", "missing", "broken", "error"]
    message: str | None = None
    allowed: int = 0
    refused: int = 0
    decisions: list[AppDecision] = []  # newest first, at most APPS_SHOWN


class ServedModel(_Facts):
    name: str
    version: int
    variant: str
    sha256: str
    task: str
    serving_since: datetime  # when this server started serving it
    current_since: datetime | None  # when the edge store made it current


class InstalledVersion(_Facts):
    version: int
    sha256: str
    variant: str
    created_at: datetime
    current: bool


class SwapView(_Facts):
    at: datetime
    kind: str
    from_version: int
    to_version: int
    variant: str


class ModelHistory(_Facts):
    model: str | None
    installed: list[InstalledVersion] = []  # newest first
    history: list[int] = []  # the versions made current, oldest first; a rollback goes back one
    swaps: list[SwapView] = []  # while this server ran, newest first
    rollbacks: int = 0  # while this server ran
    message: str | None = None


class PlantPage(_Facts):
    plant_id: str
    generated_at: datetime
    status: Literal["serving", "degraded", "no-model"]
    problem: str | None
    model: ServedModel | None
    history: ModelHistory
    ledger: LedgerView
    apps: AppsView
    requests: RequestStats


def _when(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _said(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500] or type(exc).__name__


def ledger_view(plant: PlantConfig) -> LedgerView:
    """The ledger as `maxfl ledger` reads it (verified, journal compared), per data set against the ceiling."""
    path, ceiling, delta = plant.ledger_path(), plant.max_epsilon, plant.delta
    base = {"path": str(path), "ceiling": ceiling, "delta": delta}
    try:
        from maxfl.errors import UserError
        from privacy.report import spending

        book = plant.privacy().ledger
        try:
            state = book.read()
        except UserError as exc:
            return LedgerView(**base, status="unverified", message=f"the ledger fails verification: {_said(exc)}")
        if not book.path.exists():
            return LedgerView(**base, status="missing", message=f"there is no ledger at {book.path} yet: this plant has not trained "
                              "with differential privacy")
        rows = [LedgerRow(fingerprint=s.fingerprint, task=s.task, records=s.records, rounds=s.rounds, runs=[r.run_id for r in s.runs],
                          epsilon_spent=s.epsilon, epsilon_ceiling=s.max_epsilon, epsilon_remaining=s.remaining, delta=s.delta,
                          last_used=s.last_used)
                for s in spending(state, delta, ceiling)]
        return LedgerView(**base, status="ok", rows=rows[::-1])  # the data set used last first
    except Exception as exc:  # noqa: BLE001 - whatever the ledger's folder holds, the page shows it as a message
        log.warning("plant page: the ledger %s cannot be read", path, exc_info=True)
        return LedgerView(**base, status="error", message=f"the ledger cannot be read: {_said(exc)}")


def apps_view(plant: PlantConfig) -> AppsView:
    """The apps this plant allowed and refused (`app.accepted`, `app.refused`), from its audit log, chain checked."""
    from maxfl.audit import AuditError, AuditLog

    path = plant.audit_log_path()
    if not path.exists():
        return AppsView(path=str(path), status="missing", message=f"there is no audit log at {path} yet: no app has asked to run on this node")
    shown: deque[AppDecision] = deque(maxlen=APPS_SHOWN)
    counts = {"allowed": 0, "refused": 0}
    status, message = "ok", None
    try:
        for event in AuditLog(path).events():
            if event.event not in ("app.accepted", "app.refused"):
                continue
            d = event.details
            decision = "allowed" if event.event == "app.accepted" else "refused"
            counts[decision] += 1
            run_id = d.get("run_id")
            shown.append(AppDecision(at=event.ts, decision=decision, run_id=run_id if isinstance(run_id, int) else None,
                                     fab_hash=str(d.get("fab_hash") or ""), app=f"{d.get('fab_id') or ''} {d.get('fab_version') or ''}".strip(),
                                     reason=None if d.get("reason") is None else str(d["reason"])))
    except AuditError as exc:
        status, message = "broken", f"{_said(exc)} (the decisions before it are shown)"
    except Exception as exc:  # noqa: BLE001 - an unreadable log is a message on the page
        log.warning("plant page: the audit log %s cannot be read", path, exc_info=True)
        status, message = "error", f"the audit log cannot be read: {_said(exc)}"
    return AppsView(path=str(path), status=status, message=message, decisions=list(shown)[::-1], **counts)  # type: ignore[arg-type]


def history_view(watcher: ModelWatcher) -> ModelHistory:
    """The model's versions in the edge store (as `maxfl edge status` reads them) and the swaps this server made."""
    recorded = tuple(watcher.swaps)  # one copy, made without yielding the GIL: the watcher thread may append meanwhile
    swaps = [SwapView(at=_when(s.at), kind=s.kind, from_version=s.from_version, to_version=s.to_version, variant=s.variant)
             for s in reversed(recorded)]
    rollbacks = watcher.swap_counts.get("rollback", 0)
    name = watcher.model_name
    if name is None:
        return ModelHistory(model=None, swaps=swaps, rollbacks=rollbacks, message="no model is installed in the edge store yet")
    try:
        store = watcher.store
        state = store.pointer_state(name)
        current = state.version if state else None
        installed = [InstalledVersion(version=v.manifest.version, sha256=v.manifest.sha256, variant=v.variant,
                                      created_at=v.manifest.created_at, current=v.manifest.version == current)
                     for v in store.fallbacks(name)]
        return ModelHistory(model=name, installed=installed, history=state.history if state else [], swaps=swaps, rollbacks=rollbacks,
                            message=store.current_problem(name))
    except Exception as exc:  # noqa: BLE001 - a damaged store is the store's message, not the page's failure
        return ModelHistory(model=name, swaps=swaps, rollbacks=rollbacks, message=f"the edge store cannot be read: {_said(exc)}")


def gather(watcher: ModelWatcher, plant_id: str, metrics: EdgeMetrics) -> PlantPage:
    """Every fact on the page, read now (on a worker thread: file reads and hashing stay off the event loop)."""
    rt, pointer = watcher.runtime, watcher.pointer
    model = None
    if rt is not None:
        m = rt.manifest
        model = ServedModel(name=m.model_name, version=m.version, variant=rt.variant, sha256=m.sha256, task=m.task,
                            serving_since=_when(rt.loaded_at),
                            current_since=pointer.updated_at if pointer is not None and pointer.version == m.version else None)
    status = "no-model" if rt is None else "degraded" if watcher.problem else "serving"
    return PlantPage(plant_id=plant_id, generated_at=datetime.now(UTC), status=status, problem=watcher.problem, model=model,
                     history=history_view(watcher), ledger=ledger_view(watcher.plant), apps=apps_view(watcher.plant),
                     requests=metrics.stats())


def _epsilon(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "∞"
    return f"{value:.3f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def routes(watcher: ModelWatcher, plant_id: str, metrics: EdgeMetrics) -> list[Route]:
    templates = Jinja2Templates(directory=TEMPLATES)
    templates.env.filters["epsilon"] = _epsilon
    templates.env.filters["ms"] = _ms
    templates.env.filters["short"] = lambda text, n=12: (text or "")[:n]
    templates.env.filters["when"] = lambda t: "-" if t is None else t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    stylesheet = (TEMPLATES / "plant.css").read_bytes()

    async def page(request: Request) -> Response:
        facts = await run_in_threadpool(gather, watcher, plant_id, metrics)
        return templates.TemplateResponse(request, "plant.html", {"page": facts, "refresh_s": REFRESH_S}, headers=HEADERS)

    async def page_json(request: Request) -> Response:
        facts = await run_in_threadpool(gather, watcher, plant_id, metrics)
        return Response(facts.model_dump_json(), media_type="application/json", headers=HEADERS)

    async def css(request: Request) -> Response:
        return Response(stylesheet, media_type="text/css", headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    return [
        Route("/plant", page, methods=["GET"]),
        Route("/plant.json", page_json, methods=["GET"]),
        Route("/plant/plant.css", css, methods=["GET"]),
    ]
