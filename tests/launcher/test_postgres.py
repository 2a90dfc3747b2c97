"""launcher.postgres: a real PostgreSQL from pgserver's binaries, as our own child process, stopped by PID."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from launcher.federation import FederationSettings, find_app_dir
from launcher.postgres import DRIVER, LocalPostgres, check_backend_uri, running
from launcher.processes import ProcessGroup, descendants, free_port, pid_alive
from maxfl.errors import ConfigError


@pytest.fixture
def base() -> Path:
    """Not pytest's tmp: under root the server runs as 'nobody', who cannot enter /tmp/pytest-of-root."""
    folder = Path(tempfile.mkdtemp(prefix="maxfl-pg-test-"))
    os.chmod(folder, 0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _select_one(uri: str) -> int:
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sqlalchemy.text("SELECT 1")).scalar_one())
    finally:
        engine.dispose()


def test_the_server_starts_accepts_a_connection_and_stops_leaving_no_process(base):
    with running(base / "data", base / "logs", durable=False) as pg:
        assert pg.managed is not None
        postmaster = pg.managed.popen.pid
        uri = pg.create_database("mlflow")
        assert uri == f"{DRIVER}://postgres@127.0.0.1:{pg.port}/mlflow"
        assert _select_one(uri) == 1
        assert check_backend_uri(uri) == uri
        workers = descendants(postmaster)  # checkpointer, WAL writer, ...
        assert workers
    assert not pid_alive(postmaster)
    assert [p for p in workers if pid_alive(p)] == []


def test_the_data_folder_is_initialised_once_and_keeps_its_databases(base):
    with running(base / "data", base / "logs", durable=False) as pg:
        pg.create_database("kept")
    version = (base / "data" / "PG_VERSION").stat().st_mtime_ns
    with running(base / "data", base / "logs", durable=False) as pg:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="kept")
        conn.close()
    assert (base / "data" / "PG_VERSION").stat().st_mtime_ns == version


def test_the_process_group_stops_it_even_with_a_client_still_connected(base):
    """What the launcher does: `stop_all` (SIGTERM, then the server's children), a session open."""
    import psycopg2

    procs = ProcessGroup(base / "logs")
    pg = LocalPostgres(base / "data", free_port(), durable=False)
    pg.start(procs)
    conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres")
    try:
        procs.stop_all()
        assert procs.alive() == []
    finally:
        conn.close()


@pytest.mark.parametrize(("uri", "needle"), [
    ("nonsense", "is not a database URI"),
    ("sqlite:///mlflow.db", "only PostgreSQL"),
    ("postgresql://postgres@127.0.0.1/", "names no database"),
])
def test_a_malformed_uri_is_one_line(uri, needle):
    with pytest.raises(ConfigError, match=needle) as exc:
        check_backend_uri(uri)
    assert "\n" not in str(exc.value) and "postgresql://USER" in str(exc.value)


def test_a_server_that_refuses_is_one_line_with_the_password_hidden():
    with pytest.raises(ConfigError, match="refused the connection") as exc:
        check_backend_uri(f"postgresql://maxfl:secret@127.0.0.1:{free_port()}/mlflow", timeout_s=2)
    assert "\n" not in str(exc.value) and "secret" not in str(exc.value) and "--backend-store-uri" in str(exc.value)


def test_settings_refuse_a_backend_uri_without_postgresql_and_a_backend_with_a_tracking_server(tmp_path):
    common = {"app_dir": find_app_dir(), "workdir": tmp_path}
    with pytest.raises(ValidationError, match="add --mlflow-backend postgresql"):
        FederationSettings(**common, backend_store_uri="postgresql://u@h/db")
    with pytest.raises(ValidationError, match="with --tracking-uri"):
        FederationSettings(**common, tracking_uri="http://127.0.0.1:5000", mlflow_backend="postgresql")


def test_federate_with_a_refusing_postgresql_is_one_line_and_starts_nothing(tmp_path):
    uri = f"postgresql://postgres@127.0.0.1:{free_port()}/mlflow"
    result = subprocess.run([sys.executable, "-m", "maxfl", "federate", "--mlflow-backend", "postgresql", "--backend-store-uri", uri,
                             "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "refused the connection" in lines[0], result.stderr
    assert not (tmp_path / "logs").exists() and not (tmp_path / "plants").exists()  # before data and processes
