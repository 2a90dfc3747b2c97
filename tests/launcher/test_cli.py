"""Bad input through the real `maxfl` command: one line, a non-zero exit, no traceback, nothing left running."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fl_server.run.tracking import check_reachable
from maxfl.errors import ConfigError, DataError
from launcher.federation import FederationSettings, LocalFederation, find_app_dir
from launcher.processes import free_port

MAXFL = [sys.executable, "-m", "maxfl"]


def _maxfl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MAXFL, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def _assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_unknown_task_is_one_line_naming_the_allowed_tasks(tmp_path):
    result = _maxfl("federate", "--task", "welding", "--workdir", str(tmp_path))
    _assert_one_line_error(result, "'task'", "welding", "defect")
    assert not (tmp_path / "plants").exists()


def test_malformed_override_is_one_line(tmp_path):
    _assert_one_line_error(_maxfl("federate", "--set", "rounds", "--workdir", str(tmp_path)), "key=value")


def test_unknown_mode_is_one_line(tmp_path):
    _assert_one_line_error(_maxfl("federate", "--mode", "cloud", "--workdir", str(tmp_path)), "'mode'", "deployment", "simulation")


def test_zero_plants_is_one_line(tmp_path):
    _assert_one_line_error(_maxfl("federate", "--plants", "0", "--workdir", str(tmp_path)), "'plants'", "greater than or equal to 1")


def test_port_already_taken_is_one_line_and_nothing_is_started(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = _maxfl("federate", "--mlflow-port", str(port), "--workdir", str(tmp_path))
    _assert_one_line_error(result, f"port {port}", "MLflow", "--mlflow-port")
    assert not (tmp_path / "logs").exists()


def test_an_app_changed_after_the_federation_started_is_not_submitted(tmp_path):
    import shutil

    app = tmp_path / "app"
    shutil.copytree(find_app_dir(), app, ignore=shutil.ignore_patterns(".venv", ".git", ".maxfl*", "tests", "experiments", "*.pyc"))
    federation = LocalFederation(FederationSettings(app_dir=app, workdir=tmp_path / "work", plants=2, examples_per_plant=20),
                                 echo=lambda _: None)
    federation.prepare_data("defect", seed=42)  # allows the app as it is now
    (app / "fl_server" / "run" / "server_app.py").write_text((app / "fl_server" / "run" / "server_app.py").read_text() + "\n# edited\n")
    with pytest.raises(ConfigError, match=r"the app in .* changed after this federation started .*; start the federation again"):
        federation.submit(tmp_path, {})
    assert not (tmp_path / "work" / "run-overrides.toml").exists()  # nothing was submitted


def test_empty_data_location_is_reported_before_any_process_starts(tmp_path):
    settings = FederationSettings(app_dir=find_app_dir(), workdir=tmp_path, plants=2, examples_per_plant=20)
    federation = LocalFederation(settings, echo=lambda _: None)
    plants = federation.prepare_data("defect", seed=42)
    for f in plants[1].data_dir.iterdir():
        if f.is_file():
            f.unlink()
        else:
            import shutil

            shutil.rmtree(f)
    with pytest.raises(DataError, match="plant-2: data location .* is missing or empty"):
        federation.prepare_data("defect", seed=42)


def test_unreachable_mlflow_fails_before_training_in_one_line():
    with pytest.raises(ConfigError) as exc:
        check_reachable(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    assert "unreachable" in str(exc.value) and "\n" not in str(exc.value)


def test_check_data_shows_what_a_plant_would_send(tmp_path):
    _maxfl("prepare-data", "--task", "table", "--plants", "1", "--out", str(tmp_path), "--examples-per-plant", "60")
    result = _maxfl("check-data", "--task", "table", "--data-dir", str(tmp_path / "plant-1"))
    assert result.returncode == 0, result.stderr
    assert '"column:temperature_c": "numeric"' in result.stdout and "training examples for task table" in result.stdout


def test_check_data_warns_when_the_plant_has_a_single_class(tmp_path):
    _maxfl("prepare-data", "--task", "table", "--plants", "1", "--out", str(tmp_path), "--examples-per-plant", "60")
    csv = tmp_path / "plant-1" / "quality.csv"
    header, *rows = csv.read_text().splitlines()
    at = header.split(",").index("defect")
    csv.write_text("\n".join([header, *(",".join(v if i != at else "0" for i, v in enumerate(r.split(","))) for r in rows)]) + "\n")
    result = _maxfl("check-data", "--task", "table", "--data-dir", str(tmp_path / "plant-1"))
    assert result.returncode == 0, result.stderr  # it can still join: the other plants bring the other class
    assert "warning: one class only (0) among the training examples" in " ".join(result.stderr.split())


def test_check_data_on_a_table_without_its_target_is_one_line_naming_file_and_column(tmp_path):
    _maxfl("prepare-data", "--task", "table", "--plants", "1", "--out", str(tmp_path), "--examples-per-plant", "60")
    csv = tmp_path / "plant-1" / "quality.csv"
    header, *rows = csv.read_text().splitlines()
    csv.write_text("\n".join([header.replace("defect", "label"), *rows]) + "\n")
    _assert_one_line_error(_maxfl("check-data", "--task", "table", "--data-dir", str(tmp_path / "plant-1")), "quality.csv", "'defect'")


def test_unknown_model_for_the_task_is_one_line_before_anything_starts(tmp_path):
    result = _maxfl("federate", "--task", "table", "--set", "model=resnet", "--workdir", str(tmp_path))
    _assert_one_line_error(result, "no model 'resnet'", "mlp", "linear")
    assert not (tmp_path / "plants").exists()


def _ledger_with_two_rounds(path: Path) -> None:
    from privacy.budget import PlantPrivacy, authorize_round
    from privacy.ledger import Ledger
    from privacy.plan import PrivacyPlan

    plant = PlantPrivacy(ledger=Ledger(path, "plant-1"), max_epsilon=8.0, delta=1e-5)
    for r in (1, 2):
        authorize_round(plant, PrivacyPlan(target_epsilon=2.0), fingerprint="ab" * 32, task="defect", records=400, run_id=77,
                        server_round=r, epochs=1, batch_size=32, num_rounds=2)


def test_ledger_shows_what_the_plant_spent_against_its_ceiling(tmp_path):
    path = tmp_path / "plant-1.json"
    _ledger_with_two_rounds(path)
    node_config = f'plant-id="plant-1" data-dir="{tmp_path}" max-epsilon=8 ledger="{path}"'
    out = _maxfl("ledger", "--node-config", node_config)
    assert out.returncode == 0, out.stderr
    assert "abababababab" in out.stdout and "defect" in out.stdout and "77" in out.stdout
    data = json.loads(_maxfl("ledger", "--node-config", node_config, "--json").stdout)
    (data_set,) = data["data-sets"]
    assert data_set["rounds"] == 2 and data_set["max_epsilon"] == 8.0
    assert 1.9 <= data_set["epsilon"] <= 2.0 and data_set["remaining"] == pytest.approx(8.0 - data_set["epsilon"])


def test_ledger_edited_by_hand_is_one_line_saying_how_to_fix_it(tmp_path):
    path = tmp_path / "plant-1.json"
    _ledger_with_two_rounds(path)
    path.write_text(path.read_text().replace('"steps": ', '"steps": 1', 1))
    _assert_one_line_error(_maxfl("ledger", "--ledger", str(path)), "changed outside maxfl", "--repair-from-journal")


def test_ledger_without_a_plant_is_one_line():
    _assert_one_line_error(_maxfl("ledger"), "--node-config")


def test_a_deleted_ledger_is_refused_and_repaired_from_its_journal(tmp_path):
    path = tmp_path / "plant-1.json"
    _ledger_with_two_rounds(path)
    node_config = f'plant-id="plant-1" data-dir="{tmp_path}" max-epsilon=8 ledger="{path}"'
    before = json.loads(_maxfl("ledger", "--node-config", node_config, "--json").stdout)["data-sets"][0]["epsilon"]
    path.unlink()
    _assert_one_line_error(_maxfl("ledger", "--node-config", node_config), "does not exist", "--repair-from-journal")
    _assert_one_line_error(_maxfl("ledger", "--ledger", str(path), "--repair-from-journal"), "--node-config")
    out = _maxfl("ledger", "--node-config", node_config, "--repair-from-journal")
    assert out.returncode == 0, out.stderr
    assert "repaired" in out.stdout and "2 round(s)" in out.stdout
    after = json.loads(_maxfl("ledger", "--node-config", node_config, "--json").stdout)["data-sets"][0]["epsilon"]
    assert after == pytest.approx(before)


def test_a_model_that_cannot_be_exported_is_refused_before_anything_starts_when_it_would_be_released(tmp_path):
    result = _maxfl("federate", "--workdir", str(tmp_path / "w"), "--set", "model=scatnet")
    _assert_one_line_error(result, "cannot be exported to ONNX", "release=false")
    assert not (tmp_path / "w" / "plants").exists()  # nothing was prepared or started


def test_privacy_none_against_finite_ceilings_is_one_line_naming_the_flag_before_anything_starts(tmp_path):
    result = _maxfl("federate", "--set", "privacy=none", "--workdir", str(tmp_path / "w"))
    _assert_one_line_error(result, "privacy=none", "max-epsilon 10", "--max-epsilon inf")
    assert not (tmp_path / "w" / "plants").exists()


@pytest.mark.parametrize(("data", "needle"), [
    (["plant-a"], "give PLANT_ID=DIR"),
    (["plant-a=/nowhere/at/all"], "no such folder"),
    (["Plant A=."], "plant id 'Plant A'"),
])
def test_bad_own_data_options_are_one_line_before_anything_starts(tmp_path, data, needle):
    args = [a for item in data for a in ("--data", item)]
    result = _maxfl("federate", *args, "--workdir", str(tmp_path / "w"))
    _assert_one_line_error(result, needle)
    assert not (tmp_path / "w").exists()
