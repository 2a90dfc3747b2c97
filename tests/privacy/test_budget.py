import math
from dataclasses import replace

import pytest

from fl_client.config import PlantConfig
from maxfl.errors import ConfigError
from privacy.budget import CeilingReached, authorize_round
from privacy.plan import PrivacyPlan

FP = "cd" * 32


def _round(plant, plan=None, *, run_id=1, server_round=1, records=500, num_rounds=5, fingerprint=FP):
    return authorize_round(plant, plan or PrivacyPlan(target_epsilon=3.0), fingerprint=fingerprint, task="defect", records=records,
                           run_id=run_id, server_round=server_round, epochs=1, batch_size=32, num_rounds=num_rounds)


def test_planned_run_spends_its_target_and_reports_epsilon_every_round(plant):
    grants = [_round(plant, server_round=r) for r in range(1, 6)]
    eps = [g.metrics["dp_epsilon"] for g in grants]
    assert eps == sorted(eps) and 2.9 <= eps[-1] <= 3.0
    assert {g.metrics["dp_noise_multiplier"] for g in grants} == {grants[0].mechanism.noise_multiplier} and grants[0].private
    assert grants[-1].metrics["dp_epsilon_run"] == pytest.approx(eps[-1])


def test_runs_on_the_same_data_compose_until_the_ceiling_declines_a_round(plant):
    trained = 0
    with pytest.raises(CeilingReached, match=r"round \d would take epsilon on data set cdcdcdcdcdcd to \S+, over this plant's ceiling 8 .* in \d run\(s\)"):
        for run_id in range(1, 20):
            for r in range(1, 6):
                before = plant.ledger.path.read_bytes() if plant.ledger.path.exists() else b""
                _round(plant, run_id=run_id, server_round=r)
                trained += 1
    data_set = plant.ledger.read().data_sets[FP]
    assert len(data_set.runs()) > 2 and len(data_set.entries) == trained  # runs composed; the declined round left no record
    assert plant.ledger.path.read_bytes() == before
    assert data_set.spent(plant.delta) <= 8.0 < data_set.spent(plant.delta) + 1.0


def test_another_data_set_has_its_own_budget(plant):
    for r in range(1, 6):
        _round(plant, run_id=1, server_round=r)
    assert _round(plant, run_id=2, fingerprint="ef" * 32).metrics["dp_epsilon"] < 3.0


def test_the_anchor_cannot_ask_for_more_than_the_ceiling(plant):
    greedy = PrivacyPlan(target_epsilon=1000.0)
    with pytest.raises(CeilingReached):
        for r in range(1, 6):
            _round(plant, greedy, server_round=r)
    assert FP not in plant.ledger.read().data_sets  # its very first round would pass the ceiling: nothing trained


def test_missing_ceiling_refuses_to_train_and_says_how_to_set_it(plant):
    with pytest.raises(ConfigError, match="no privacy ceiling.*max-epsilon=8"):
        _round(replace(plant, max_epsilon=None))
    assert not plant.ledger.path.exists()


@pytest.mark.parametrize("bad", [0, -1.0, "lots"])
def test_zero_negative_or_unreadable_ceiling_is_rejected_in_the_node_config(bad):
    with pytest.raises(ConfigError, match="'max-epsilon'"):
        PlantConfig.from_flower({"plant-id": "plant-1", "data-dir": "/x", "max-epsilon": bad})


def test_delta_not_below_one_over_the_records_is_refused(plant):
    with pytest.raises(ConfigError, match=r"delta 0.05 is not below 1/50 .* at most 0.002"):
        _round(replace(plant, delta=0.05), records=50)


def test_a_run_without_dp_is_declined_by_a_plant_with_a_finite_ceiling(plant):
    with pytest.raises(CeilingReached, match="trains only with DP"):
        _round(plant, PrivacyPlan(privacy="none"))


def test_a_plant_that_allows_no_dp_records_infinite_epsilon(plant):
    grant = _round(replace(plant, max_epsilon=math.inf), PrivacyPlan(privacy="none"))
    assert not grant.private and math.isinf(grant.metrics["dp_epsilon"])
    with pytest.raises(CeilingReached):  # that data set is spent for good under any finite ceiling
        _round(plant, run_id=2)


def test_fixed_noise_multiplier_is_used_as_given(plant):
    grant = _round(plant, PrivacyPlan(target_epsilon=0.0, noise_multiplier=2.5))
    assert grant.mechanism.noise_multiplier == 2.5


def test_under_dp_training_loss_and_accuracy_stay_at_the_plant(plant):
    reported = _round(plant).report({"train_loss": 0.3, "train_accuracy": 0.9, "train_time_s": 1.0})
    assert "train_loss" not in reported and "train_accuracy" not in reported
    assert reported["train_time_s"] == 1.0 and "dp_epsilon" in reported


def test_a_plan_without_noise_is_rejected():
    with pytest.raises(ConfigError, match="target-epsilon"):
        PrivacyPlan.parse({"target-epsilon": 0, "noise-multiplier": 0})


@pytest.mark.parametrize("plan", [PrivacyPlan(target_epsilon=0.0, noise_multiplier=math.inf), PrivacyPlan(target_epsilon=0.0, noise_multiplier=1e300),
                                  PrivacyPlan(target_epsilon=math.inf), PrivacyPlan(target_epsilon=1e-12)])
def test_a_degenerate_plan_is_refused_in_one_line_and_records_nothing(plant, plan):
    with pytest.raises(ConfigError, match="target-epsilon cannot be planned|mechanism this plant cannot account for"):
        _round(plant, plan)
    assert not plant.ledger.path.exists()


def test_the_grant_names_its_data_set_and_its_lifetime_rounds_for_the_anchor(plant):
    grants = [_round(plant, server_round=r) for r in (1, 2)]
    assert [g.metrics["dp_rounds"] for g in grants] == [1.0, 2.0] and grants[0].fingerprint == FP
