"""The anchor's federation page: plants, runs, privacy budgets, model versions and what each plant's edge serves.

A small server-rendered Starlette app (Jinja2 templates, plain CSS, one small script that re-fetches the live
parts); nothing is fetched from elsewhere. Every path but `/healthz` needs the page's token
(maxfl.page_auth.TokenAuth): a browser opens the URL `maxfl federation page` prints, Prometheus scrapes `/metrics`
with `Authorization: Bearer`. Sources are read in worker threads and cached briefly (fl_server.federation.page.cached):
a source that is down or slow is one line on the page, never a 500, and no request waits longer than a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from fl_server.federation.page.cached import Cached, Fetched
from fl_server.federation.page.data import (
    RUN_ID, FederationView, MlflowReader, NodeState, PageSources, RunDetail, RunsView, federation_view, read_federation, recent_deployments,
    spend_record, superlink_nodes,
)
from fl_server.federation.page.metrics import Readings, page_registry
from fl_server.federation.page.plots import Chart, bar_chart, line_chart
from maxfl.errors import ConfigError
from maxfl.page_auth import TokenAuth, load_or_create_token

HERE = Path(__file__).parent
REQUEST_BOUND_S = 4.0  # the longest any request waits on its sources, all of them together
NODES_TTL_S = 10.0  # `flwr supernode ls` is a process start: at most one every this many seconds
RUN_DETAILS_KEPT = 16
NodeLister = Callable[[Path], dict[int, NodeState]]
# The page's own files only: no inline script or style, no other origin (the SVG charts are inline markup, not styles).
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
                                 b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


class PageState:
    """The page's sources, each behind its own cache, and the worker threads that read them."""

    def __init__(self, sources: PageSources, refresh_s: float, node_lister: NodeLister) -> None:
        self.sources = sources
        self.refresh_s = refresh_s
        self.executor = ThreadPoolExecutor(max_workers=6, thread_name_prefix="maxfl-page")
        self.reader = MlflowReader(sources)
        ex, fresh = self.executor, max(0.5, refresh_s / 2)
        folder = sources.federation_dir
        self.federation = Cached("the federation folder", lambda: read_federation(folder), ex, fresh, 2.0) if folder else None  # type: ignore[arg-type]
        self.nodes = Cached("the SuperLink", lambda: node_lister(folder), ex, NODES_TTL_S, 2.5) if folder else None  # type: ignore[arg-type]
        self.runs: Cached[RunsView] = Cached("MLflow", self.reader.runs, ex, fresh, 3.0)
        self.registry = Cached("MLflow's model registry", self.reader.registry, ex, max(fresh, 3.0), 3.0)
        watch, audit = sources.privacy_watch, sources.audit_log
        self.spend = Cached("the anchor's spend record", lambda: spend_record(watch), ex, max(fresh, 3.0), 2.0) if watch else None  # type: ignore[arg-type]
        self.deployments = Cached("the anchor's audit log", lambda: recent_deployments(audit), ex, max(fresh, 3.0), 2.0) if audit else None  # type: ignore[arg-type]
        self._details: OrderedDict[str, Cached[RunDetail]] = OrderedDict()
        self.followed: str | None = None  # the run id the page follows (RunsView.current) as of the last read

    def detail(self, run_id: str) -> Cached[RunDetail]:
        if run_id not in self._details:
            # a run's detail is one history read per plant: read once per refresh of the page at most
            self._details[run_id] = Cached("MLflow", lambda: self.reader.run(run_id), self.executor, max(1.0, self.refresh_s), 3.0)
            while len(self._details) > RUN_DETAILS_KEPT:
                self._details.popitem(last=False)
        self._details.move_to_end(run_id)
        return self._details[run_id]

    def warm(self) -> None:
        for cached in (self.federation, self.nodes, self.runs, self.registry, self.spend, self.deployments):
            if cached is not None:
                cached.refresh()

    async def federation_view(self) -> Fetched[FederationView] | None:
        if self.federation is None or self.nodes is None:
            return None
        fed, nodes = await asyncio.gather(self.federation.get(), self.nodes.get())
        if fed.value is None:
            return Fetched(None, fed.problem)
        info, book = fed.value
        view = federation_view(info, book, nodes.value if not nodes.problem else None, nodes.problem)
        return Fetched(view, fed.problem, fed.updated)

    async def current(self, runs: Fetched[RunsView], bound_s: float) -> Fetched[RunDetail] | None:
        followed = runs.value.current() if runs.value is not None else None
        self.followed = followed.run_id if followed else None
        if followed is None:
            return None
        return await self.detail(followed.run_id).get(max(0.2, bound_s))

    def readings(self) -> Readings:
        """The caches as they are (no fetching): what a scrape reports."""
        fed = None
        if self.federation is not None and self.nodes is not None:
            f, n = self.federation.current(), self.nodes.current()
            fed = Fetched(federation_view(*f.value, n.value if not n.problem else None, n.problem) if f.value else None, f.problem, f.updated)
        current = self.detail(self.followed).current() if self.followed else None
        return Readings(federation=fed, runs=self.runs.current(), current=current, spend=self.spend.current() if self.spend else None)


async def _optional(cached: Cached[Any] | None) -> Fetched[Any] | None:
    return None if cached is None else await cached.get()


# ---------------------------------------------------------------- rendering
def _when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(value: datetime | None) -> str:
    if value is None:
        return "-"
    seconds = max(0.0, (datetime.now(UTC) - value).total_seconds())
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if math.isnan(value):
        return "nan"
    return f"{value:.{digits}g}"


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True, default_for_string=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=_when, ago=_ago, num=_num)
    return env


def run_charts(detail: RunDetail) -> dict[str, Chart | None]:
    """The run's metric curve, each plant's epsilon against its ceiling, and the contributions' bars."""
    run = detail.run
    curve = line_chart([(run.metric, [(p.step, p.value) for p in detail.curve])], x_label="round", y_label=run.metric) if detail.curve else None
    series = [(e.plant, [(p.step, p.value) for p in e.points]) for e in detail.epsilon]
    rules = [(f"{e.plant} ceiling {_num(e.ceiling)}", e.ceiling, i) for i, e in enumerate(detail.epsilon) if e.ceiling is not None]
    epsilon = line_chart(series, rules, x_label="round", y_label="epsilon", y_floor=0.0) if any(e.points for e in detail.epsilon) else None
    rows = [(c.plant, c.shapley) for c in detail.contributions if c.shapley is not None]
    shapley = bar_chart(rows, x_label="Shapley value") if rows else None
    return {"curve": curve, "epsilon": epsilon, "shapley": shapley}


class Page:
    """The routes: full pages, their live parts (`/part/...`, what page.js re-fetches), `/metrics`, `/healthz`."""

    def __init__(self, state: PageState) -> None:
        self.state = state
        self.env = _environment()
        self.metrics = page_registry(state.readings)

    def _html(self, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        context |= {"sources": self.state.sources, "refresh_s": self.state.refresh_s, "now": datetime.now(UTC)}
        return HTMLResponse(self.env.get_template(template).render(**context), status_code=status_code)

    async def _overview(self) -> dict[str, Any]:
        started = time.monotonic()
        s = self.state
        fed, runs, registry, spend, deployments = await asyncio.gather(
            s.federation_view(), s.runs.get(), s.registry.get(), _optional(s.spend), _optional(s.deployments))
        current = await s.current(runs, REQUEST_BOUND_S - (time.monotonic() - started))
        return {"fed": fed, "runs": runs, "registry": registry, "spend": spend, "deployments": deployments, "current": current,
                "charts": run_charts(current.value) if current is not None and current.value is not None else {}}

    async def index(self, request: Request) -> Response:
        return self._html("index.html", **await self._overview())

    async def run(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        if not RUN_ID.match(run_id):
            return self._html("missing.html", 404, what=f"{run_id[:64]!r} is no MLflow run id (32 hex digits)")
        detail = await self.state.detail(run_id).get(REQUEST_BOUND_S)
        charts = run_charts(detail.value) if detail.value is not None else {}
        return self._html("run.html", current=detail, charts=charts, run_id=run_id)

    async def part(self, request: Request) -> Response:
        name = request.path_params["name"]
        s = self.state
        if name == "plants":
            return self._html("parts/plants.html", fed=await s.federation_view())
        if name == "runs":
            return self._html("parts/runs.html", runs=await s.runs.get())
        if name == "run":
            run_id = request.query_params.get("run", "")
            if run_id:
                if not RUN_ID.match(run_id):
                    return PlainTextResponse("run: 32 hex digits (an MLflow run id)\n", status_code=400)
                current = await s.detail(run_id).get(REQUEST_BOUND_S)
            else:
                started = time.monotonic()
                runs = await s.runs.get()
                current = await s.current(runs, REQUEST_BOUND_S - (time.monotonic() - started))
            charts = run_charts(current.value) if current is not None and current.value is not None else {}
            return self._html("parts/run.html", current=current, charts=charts, run_id=run_id)
        if name == "models":
            registry, deployments = await asyncio.gather(s.registry.get(), _optional(s.deployments))
            return self._html("parts/models.html", registry=registry, deployments=deployments)
        if name == "privacy":
            return self._html("parts/privacy.html", spend=await _optional(s.spend))
        return PlainTextResponse(f"no part {name[:40]!r}: plants, runs, run, models or privacy\n", status_code=404)

    async def prometheus(self, request: Request) -> Response:
        await self._overview()  # the same bounded refresh as a page view; the collector reads the caches
        return Response(generate_latest(self.metrics), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def not_found(self, request: Request, exc: Exception) -> Response:
        return self._html("missing.html", 404, what=f"nothing at {request.url.path[:80]}")


def _with_security_headers(app: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    async def wrapped(scope: dict, receive: Callable, send: Callable) -> None:
        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await app(scope, receive, send_with_headers if scope["type"] == "http" else send)

    return wrapped


def create_app(sources: PageSources, token: str, *, refresh_s: float = 2.0, node_lister: NodeLister = superlink_nodes,
               token_hint: str = "") -> Callable[..., Awaitable[None]]:
    """The page as an ASGI app: `/healthz` open, everything else behind the token."""
    state = PageState(sources, refresh_s, node_lister)
    page = Page(state)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.warm()  # the first page view finds MLflow imported and the sources read
        yield
        state.executor.shutdown(wait=False, cancel_futures=True)

    inner = Starlette(
        routes=[
            Route("/", page.index), Route("/runs/{run_id}", page.run), Route("/part/{name}", page.part),
            Route("/metrics", page.prometheus), Route("/healthz", page.healthz),
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        ],
        exception_handlers={404: page.not_found},
        lifespan=lifespan,
    )
    inner.state.page = state
    protected = TokenAuth(inner, token, ("/",), hint=token_hint)

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] == "/healthz":
            await inner(scope, receive, send)
        else:
            await protected(scope, receive, send)

    return _with_security_headers(app)


# ---------------------------------------------------------------- `maxfl federation page`
def resolve_sources(federation_dir: Path | None, workdir: Path | None, tracking_uri: str | None, mlflow_ui: str = "",
                    audit_log: Path | None = None, privacy_watch: Path | None = None) -> PageSources:
    """The page's sources from the command's options: a federation folder (`--dir`) and/or a `maxfl federate`
    workdir (its federation folder, audit log and spend record), the anchor's defaults for the rest."""
    from fl_client.config import maxfl_home
    from fl_server.federation.provision import FEDERATION_FILE, load_federation

    if federation_dir is not None:
        load_federation(federation_dir)  # not a federation folder: one line now, not a message on every page view
    elif workdir is not None and (workdir / "federation" / FEDERATION_FILE).is_file():
        federation_dir = workdir / "federation"
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise ConfigError("no MLflow tracking server: pass --tracking-uri (e.g. http://127.0.0.1:5000) or set MLFLOW_TRACKING_URI")
    anchor = workdir / "anchor" if workdir is not None else maxfl_home() / "anchor"
    watch = privacy_watch or (workdir / "plants" / "ledgers" / "anchor-privacy-watch.json" if workdir is not None else anchor / "privacy-watch.json")
    return PageSources(federation_dir=federation_dir.resolve() if federation_dir else None, tracking_uri=uri.rstrip("/"), mlflow_ui=mlflow_ui,
                       audit_log=(audit_log or anchor / "audit.jsonl"), privacy_watch=watch)


def default_token_file(sources: PageSources, workdir: Path | None) -> Path:
    """Beside the federation's other secrets (D/private/), else in the anchor's state folder."""
    from fl_client.config import maxfl_home

    if sources.federation_dir is not None:
        return sources.federation_dir / "private" / "page-token"
    return (workdir / "anchor" if workdir is not None else maxfl_home() / "anchor") / "page-token"


def page_url(host: str, port: int, token: str) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/?token={token}"


def serve(sources: PageSources, token_file: Path, host: str = "127.0.0.1", port: int = 8050, refresh_s: float = 2.0,
          echo: Callable[[str], None] = print) -> None:
    """Serve the page in the foreground until SIGINT/SIGTERM; prints one line: its URL with the token."""
    import uvicorn

    # A tracking server that is down must fail a read at once, not after MLflow's retries (minutes with backoff).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    token = load_or_create_token(token_file)
    if token.startswith("replace-"):  # compose/anchor/.env.example's placeholder: known to everyone who read it
        raise ConfigError(f"the page token in {token_file} is still the example's placeholder; set PAGE_TOKEN (e.g. `openssl rand -hex 32`)")
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise ConfigError(f"the federation page cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None
    app = create_app(sources, token, refresh_s=refresh_s, token_hint=f"the token is in {token_file}")
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", limit_concurrency=64, timeout_keep_alive=5,
                            timeout_graceful_shutdown=3, h11_max_incomplete_event_size=16 * 1024)
    echo(f"federation page: {page_url(host, sock.getsockname()[1], token)}")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT/SIGTERM it stopped on: for a server that is the normal end
        pass
