"""The anchor's MLflow on PostgreSQL: a real federation whose run, metrics and registered model land in PostgreSQL."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fl_server.release.registry import Registry
from launcher.federation import FederationSettings, LocalFederation, find_app_dir
from launcher.processes import pid_alive

from .test_local_federation import _assert_nothing_left

pytestmark = pytest.mark.e2e


@pytest.fixture
def workdir() -> Path:
    """Not pytest's tmp: under root PostgreSQL runs as 'nobody', who cannot enter /tmp/pytest-of-root."""
    base = Path(tempfile.mkdtemp(prefix="maxfl-pg-e2e-"))
    os.chmod(base, 0o711)
    yield base / "work"
    shutil.rmtree(base, ignore_errors=True)


def test_one_round_with_mlflow_on_its_own_postgresql_tracks_and_registers_there(workdir):
    settings = FederationSettings(app_dir=find_app_dir(), workdir=workdir, plants=2, examples_per_plant=40, insecure=True,  # not about TLS
                                  mlflow_backend="postgresql", run_overrides={"num-server-rounds": 1})
    with LocalFederation(settings, echo=print) as fed:
        assert fed._postgres is not None and fed.backend_store_uri.startswith("postgresql+psycopg2://postgres@127.0.0.1:")
        postmaster = fed._postgres.popen.pid
        result = fed.submit_run()
        assert result.status == "finished:completed"
        # Straight from PostgreSQL, not through the MLflow server: the run, its rounds' metrics, the registered model.
        client = MlflowClient(fed.backend_store_uri)
        run = client.get_run(result.mlflow_run_id)
        assert run.info.status == "FINISHED" and run.data.tags["maxfl.plants"] == "plant-1,plant-2"
        for key in ("round_wall_s", "eval_accuracy", "plant-1/dp_epsilon", "plant-2/num-examples"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1], key
        versions = Registry(fed.backend_store_uri, "maxfl-defect").versions()
        assert [v.run_id for v in versions] == [run.info.run_id]
        import sqlalchemy

        engine = sqlalchemy.create_engine(fed.backend_store_uri)
        with engine.connect() as conn:
            assert engine.dialect.name == "postgresql"
            assert conn.execute(sqlalchemy.text("SELECT count(*) FROM runs WHERE run_uuid = :r"), {"r": run.info.run_id}).scalar_one() == 1
        engine.dispose()
    assert not pid_alive(postmaster)
    _assert_nothing_left(fed)
