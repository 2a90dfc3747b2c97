from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the most end-to-end tests first. `make test` hands whole files to its xdist workers in this order
    (--dist loadfile --no-loadscope-reorder): the long federations start at once and the many short files fill in
    behind them, instead of one worker starting a ten-minute file when the others are nearly done."""
    e2e: dict[str, int] = {}
    for item in items:
        e2e[item.nodeid.split("::")[0]] = e2e.get(item.nodeid.split("::")[0], 0) + bool(item.get_closest_marker("e2e"))
    items.sort(key=lambda item: -e2e[item.nodeid.split("::")[0]])  # stable: each file keeps its own order


# ---------------------------------------------------------------- PostgreSQL (launcher.postgres)
MLFLOW_TEMPLATE = "mlflow_template"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator:
    """One PostgreSQL for the test session (each xdist worker is a session): outside pytest's process tree, so the
    end-to-end tests' "nothing of ours is left" checks hold, and stopped when the session ends (or its process dies).
    The folder is not under pytest's tmp (0700 under root, where the server runs as 'nobody')."""
    from launcher.postgres import serve_detached

    base = Path(tempfile.mkdtemp(prefix="maxfl-pg-"))
    os.chmod(base, 0o711)
    server = serve_detached(base / "data", base / "logs")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_database(postgres_server) -> Callable[[], str]:
    """Makes a fresh database with MLflow's tables (copied from a template migrated once) and returns its URI."""
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    server = postgres_server.server()
    engine = sqlalchemy.create_engine(server.create_database(MLFLOW_TEMPLATE))
    _initialize_tables(engine)  # MLflow's migrations take seconds; CREATE DATABASE ... TEMPLATE copies them at once
    engine.dispose()  # a template may have no open connections

    def make() -> str:
        return server.create_database(f"t_{uuid.uuid4().hex[:16]}", template=MLFLOW_TEMPLATE)

    return make


@pytest.fixture
def postgres_uri(postgres_database) -> str:
    """This test's own MLflow database on the session's PostgreSQL: postgresql://postgres@127.0.0.1:PORT/t_..."""
    return postgres_database()
