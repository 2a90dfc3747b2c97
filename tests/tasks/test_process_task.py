"""The process task on small real Tennessee Eastman recordings (simulated once, then cached)."""

import numpy as np
import pytest
import torch

from maxfl.errors import DataError
from tasks import get_task
from tasks.base import DataProfile, SchemaMismatch, TaskOptions, TrainSettings
from tasks.process.simulate import ProcessSplit
from tasks.process.model import ProcessStatsNet, WindowStats
from tasks.process.task import DETECTABLE_FAULTS, RECORDING_FILE, TRAIN_REPEATS, ProcessSpec, detection_metrics, fault_mix, plant_spec
from tasks.process.windows import normal_statistics, windows


@pytest.fixture(scope="module")
def plant_dirs(tmp_path_factory):
    return get_task("process").prepare_plants(2, tmp_path_factory.mktemp("plants"), seed=42, limit=120)


@pytest.fixture(scope="module")
def spec(plant_dirs):
    task = get_task("process")
    return task.make_spec({f"plant-{k}": task.profile(d, 42) for k, d in enumerate(plant_dirs, start=1)}, TaskOptions())


def test_windows_never_cross_runs_and_take_the_label_of_their_last_sample():
    x = np.arange(10, dtype=np.float32)[:, None].repeat(2, axis=1)
    split = ProcessSplit(x=x, label=np.array([0, 0, 0, 0, 0, 0, 0, 7, 7, 7]), run=np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1], dtype=np.int32))
    w, labels, offsets = windows(split, mean=np.zeros(2), std=np.ones(2), length=3)
    assert w.shape == (2 + 4, 2, 3)
    firsts = w[:, 0, 0].tolist()
    assert firsts == [0, 1, 4, 5, 6, 7]  # no window starts at 2 or 3: it would span runs 0 and 1
    assert labels.tolist() == [0, 0, 0, 7, 7, 7]
    assert offsets.tolist() == [0, 1, 0, 1, 2, 3]  # a DP tiling takes offsets 0 and 3: [4,5,6] and [7,8,9]


def test_private_records_of_a_plant_share_no_raw_sample(plant_dirs, spec):
    data = get_task("process").load_plant_data(plant_dirs[0], 42, spec)
    tiles = data.x_train[data.private_records()]
    assert 0 < len(tiles) < 2 * len(data.y_train) / spec.window
    # windows are runs of consecutive samples; a tiling's windows never hold the same sample twice
    samples = tiles.permute(0, 2, 1).reshape(-1, spec.variables)
    assert len(torch.unique(samples, dim=0)) == len(samples)


def test_normalisation_uses_only_fault_free_samples():
    x = np.array([[1.0], [3.0], [100.0]], dtype=np.float32)
    split = ProcessSplit(x=x, label=np.array([0, 0, 5]), run=np.zeros(3, dtype=np.int32))
    mean, std = normal_statistics(split)
    assert mean.tolist() == [2.0] and std.tolist() == [1.0]


def test_detection_metrics_count_alarms_on_normal_windows_as_false():
    spec = ProcessSpec(task="process", model="cnn1d", num_classes=3, classes=(0, 1, 6), alarm_below=0.2)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    proba = torch.tensor([
        [0.9, 0.05, 0.05], [0.4, 0.5, 0.1], [0.3, 0.0, 0.7], [0.1, 0.0, 0.9],  # normal: only the last alarms
        [0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.1, 0.8, 0.1], [0.0, 0.0, 1.0],  # faults: one is missed
    ])
    m = detection_metrics(proba, y, spec)
    assert m["eval_false_alarm_rate"] == 0.25
    assert m["eval_detection_rate"] == 0.75  # 3 of 4 faulty windows fall below the alarm limit
    assert m["eval_fault_accuracy"] == 0.5  # 2 of 4 name the right fault (one argmax is a tie won by normal)
    assert m["eval_detection_idv01"] == 0.5 and m["eval_detection_idv06"] == 1.0
    # at most 5% false alarms among 4 normal windows means none: the limit drops below every normal P(normal)
    assert m["eval_detection_at_5pct_false_alarms"] == 0.5  # 0.0, 0.0 < 0.1 alarm; 0.5 and 0.1 do not


def test_every_detectable_fault_is_seen_by_at_least_two_of_three_plants():
    mixes = [set(fault_mix(k, 3)) for k in range(3)]
    for fault in DETECTABLE_FAULTS:
        assert sum(fault in mix for mix in mixes) == 2
    assert all(mixes[0] != m for m in mixes[1:])  # plants are non-IID


def test_plants_profile_and_agree_on_a_spec_with_the_union_of_their_faults(plant_dirs, spec):
    assert spec.classes[0] == 0 and len(spec.classes) >= 3
    task = get_task("process")
    profile = task.profile(plant_dirs[0], 42)
    assert profile.mode != task.profile(plant_dirs[1], 42).mode  # each plant its own operating mode
    assert len([k for k in profile.schema_ if k.startswith("var:")]) == 53


def test_plant_data_are_normalised_windows_and_a_model_learns_them(plant_dirs, spec):
    task = get_task("process")
    data = task.load_plant_data(plant_dirs[0], 42, spec)
    assert data.x_train.shape[1:] == (53, 20) and data.x_train.dtype == torch.float32
    normal = data.x_train[data.y_train == 0]
    assert abs(normal[:, :, -1].mean().item()) < 0.5  # normal operation is centred by the plant's own statistics
    torch.manual_seed(0)
    model = task.build_model(spec)
    before = task.evaluate(model, data, spec)["eval_loss"]
    for r in range(3):
        task.train(model, data, TrainSettings(epochs=1, batch_size=32, learning_rate=0.05, seed=r), spec)
    after = task.evaluate(model, data, spec)
    assert after["eval_loss"] < before
    assert {"eval_detection_rate", "eval_false_alarm_rate", "eval_fault_accuracy", "eval_macro_f1"} <= set(after)


def test_a_fault_the_federation_does_not_know_is_a_data_error_naming_it(plant_dirs, spec):
    narrow = spec.model_copy(update={"classes": spec.classes[:2], "num_classes": 2})
    with pytest.raises(DataError, match=r"IDV \[\d+"):
        get_task("process").load_plant_data(plant_dirs[0], 42, narrow)


def test_a_plant_with_different_variables_is_named(plant_dirs):
    task = get_task("process")
    good = task.profile(plant_dirs[0], 42)
    odd_schema = {k: v for k, v in good.schema_.items() if k != "var:reactor_pressure"} | {"var:extra_sensor": "numeric"}
    odd = DataProfile(task="process", fingerprint="x", examples=1, schema=odd_schema)
    with pytest.raises(SchemaMismatch) as err:
        task.make_spec({"plant-1": good, "plant-2": good, "plant-3": odd}, TaskOptions())
    assert list(err.value.problems) == ["plant-3"]
    assert "var:reactor_pressure is missing" in str(err.value)


def test_a_corrupt_recording_is_a_data_error(tmp_path):
    (tmp_path / RECORDING_FILE).write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a process recording"):
        get_task("process").profile(tmp_path, 0)


def test_demo_plants_keep_a_long_history_and_the_small_demo_stays_small():
    full = [plant_spec(k, 5, 42, None) for k in range(5)]
    assert TRAIN_REPEATS > 1 and all(s.train_repeats == TRAIN_REPEATS for s in full)
    assert all(plant_spec(k, 5, 42, 120).train_repeats == 1 for k in range(5))


def test_window_statistics_are_level_spread_trend_recent_level_roughness_and_range():
    length, variables = 20, 3
    t = torch.arange(length, dtype=torch.float32)
    x = torch.stack([torch.full((length,), 2.0), t - t.mean(), torch.where(t < 10, -1.0, 1.0)]).unsqueeze(0)
    f = WindowStats(length)(x).reshape(WindowStats.STATISTICS, variables)
    raw = torch.sign(f) * torch.expm1(f.abs())  # undo the signed log1p
    mean, std, slope, recent, rough, spread = raw
    torch.testing.assert_close(mean, torch.tensor([2.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.tensor([0.0, float(t.std(unbiased=False)), 1.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(slope[:2], torch.tensor([0.0, float(length - 1)]), atol=1e-3, rtol=0)  # rise over the window
    assert slope[2] > 0
    torch.testing.assert_close(recent, torch.tensor([2.0, float((t[-5:] - t.mean()).mean()), 1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(rough, torch.tensor([0.0, 1.0, 2.0 / (length - 1)]), atol=1e-5, rtol=0)
    torch.testing.assert_close(spread, torch.tensor([0.0, float(length - 1), 2.0]), atol=1e-4, rtol=0)
    assert WindowStats(length).state_dict() == {}  # nothing to exchange or train


def test_the_default_model_is_a_small_head_dp_sgd_can_train_and_the_edge_can_serve(plant_dirs, spec):
    from maxfl import onnx_model
    from privacy.accountant import Mechanism
    from privacy.dpsgd import DPSGD, check_model
    from privacy.recipe import recipe_batch_size

    task = get_task("process")
    assert spec.model == "stats" and task.models[0] == "stats"
    assert task.training_defaults(spec).local_epochs > 1  # a head: several cheap epochs a round
    model = task.build_model(spec)
    assert isinstance(model, ProcessStatsNet)
    assert sum(p.numel() for p in model.parameters()) == (WindowStats.STATISTICS * spec.variables + 1) * spec.num_classes
    check_model(model)
    data = task.load_plant_data(plant_dirs[0], 42, spec)
    records = len(data.private_records())
    batch = recipe_batch_size(records)
    batches = -(-records // batch)
    settings = TrainSettings(epochs=1, batch_size=batch, learning_rate=0.2, seed=0,
                             local_training=DPSGD(Mechanism(noise_multiplier=1.0, sample_rate=1 / batches, steps=batches), 1.0))
    before = [p.detach().clone() for p in model.parameters()]
    task.train(model, data, settings, spec)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    session = onnx_model.session(onnx_model.export(task.deployable(spec, model), task.input_example(spec)))
    assert onnx_model.max_deviation(session, model, data.x_test[:16].numpy()) < 1e-4
