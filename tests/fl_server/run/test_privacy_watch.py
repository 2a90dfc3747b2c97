import math
import multiprocessing
import stat
from pathlib import Path

import pytest

from fl_server.run.privacy_watch import SpendWatch, WatchCorrupt, default_path

FP = "ab" * 32


@pytest.fixture
def watch(tmp_path) -> SpendWatch:
    return SpendWatch(default_path(tmp_path / "anchor"))


def test_a_growing_spend_is_accepted_and_recorded(watch):
    for r, eps in enumerate((0.8, 1.5, 2.99), start=1):
        assert watch.check("plant-1", FP, eps, delta=1e-5, rounds=r, run="run-a", server_round=r) is None
    spend = watch.read().plants["plant-1"][FP]
    assert (spend.epsilon, spend.rounds, spend.run, spend.server_round) == (2.99, 3, "run-a", 3)
    assert stat.S_IMODE(watch.path.stat().st_mode) == 0o600


def test_a_spend_that_went_down_is_refused_naming_plant_data_set_and_both_epsilons(watch):
    watch.check("plant-1", FP, 2.99, delta=1e-5, rounds=6, run="run-a", server_round=3)
    reason = watch.check("plant-1", FP, 2.55, delta=1e-5, run="run-b", server_round=1)
    assert reason is not None
    assert "plant-1" in reason and FP[:12] in reason and "2.99" in reason and "2.55" in reason and "run-a round 3" in reason
    assert "--repair-from-journal" in reason
    # refused reports are not recorded: the plant stays refused until its ledger holds the spend again
    assert watch.check("plant-1", FP, 2.6, delta=1e-5, run="run-b", server_round=2) is not None
    assert watch.check("plant-1", FP, 3.2, delta=1e-5, rounds=7, run="run-b", server_round=3) is None


def test_a_deleted_ledger_is_refused_even_behind_a_larger_delta(watch):
    watch.check("plant-1", FP, 2.99, delta=1e-5, rounds=6, run="a", server_round=3)
    # a fresh ledger at a larger delta reports less epsilon; its round count gives it away
    reason = watch.check("plant-1", FP, 0.5, delta=1e-4, rounds=1, run="b", server_round=1)
    assert reason is not None and "from 6 to 1 round(s)" in reason
    # a larger delta alone lowers epsilon legitimately
    assert watch.check("plant-1", FP, 2.5, delta=1e-4, rounds=7, run="b", server_round=2) is None


def test_plants_and_data_sets_are_watched_apart(watch):
    watch.check("plant-1", FP, 2.99, delta=1e-5, rounds=6)
    assert watch.check("plant-2", FP, 0.5, delta=1e-5, rounds=1) is None  # another plant
    assert watch.check("plant-1", "cd" * 32, 0.5, delta=1e-5, rounds=1) is None  # another data set of plant-1


def test_the_record_persists_across_anchor_restarts(watch):
    watch.check("plant-1", FP, 2.99, delta=1e-5, rounds=6)
    assert SpendWatch(watch.path).check("plant-1", FP, 1.0, delta=1e-5) is not None


def test_infinite_epsilon_stays_infinite(watch):
    assert watch.check("plant-1", FP, math.inf, delta=1e-5, rounds=1) is None
    assert SpendWatch(watch.path).read().plants["plant-1"][FP].epsilon == math.inf
    assert watch.check("plant-1", FP, 9.0, delta=1e-5) is not None


@pytest.mark.parametrize(("eps", "delta"), [(math.nan, 1e-5), (-1.0, 1e-5), (1.0, 0.0), (1.0, math.nan)])
def test_a_report_that_is_no_spend_is_refused(watch, eps, delta):
    assert "no spend" in watch.check("plant-1", FP, eps, delta=delta)
    assert not watch.path.exists()


def test_forget_is_the_operators_way_back(watch):
    watch.check("plant-1", FP, 2.99, delta=1e-5, rounds=6)
    watch.check("plant-1", "cd" * 32, 1.0, delta=1e-5, rounds=2)
    assert watch.forget("plant-1", FP) == 1
    assert watch.check("plant-1", FP, 0.5, delta=1e-5, rounds=1) is None
    assert watch.forget("plant-1") == 2 and "plant-1" not in watch.read().plants


def test_a_damaged_record_is_one_line_not_a_reset(watch):
    watch.check("plant-1", FP, 2.99, delta=1e-5, rounds=6)
    watch.path.write_text("{garbage")
    with pytest.raises(WatchCorrupt, match="is damaged .* restore it from backup"):
        watch.check("plant-1", FP, 0.1, delta=1e-5)
    assert watch.path.read_text() == "{garbage"


def _report(path: str, plant: str) -> None:
    for r in range(1, 11):
        assert SpendWatch(Path(path)).check(plant, FP, float(r), delta=1e-5, rounds=r, server_round=r) is None


def test_concurrent_reports_lose_no_plant(watch):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_report, args=(str(watch.path), f"plant-{k}")) for k in (1, 2, 3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert {p: s[FP].rounds for p, s in watch.read().plants.items()} == {"plant-1": 10, "plant-2": 10, "plant-3": 10}


def test_a_train_reply_is_checked_from_its_metrics_and_plant_record(watch):
    metrics = {"dp_epsilon": 2.99, "dp_delta": 1e-5, "dp_rounds": 6.0, "num-examples": 400}
    assert watch.check_reply("plant-1", FP, metrics, run="a", server_round=3) is None
    assert "went down" in watch.check_reply("plant-1", FP, metrics | {"dp_epsilon": 2.55, "dp_rounds": 4.0}, run="b", server_round=1)
    assert "no data set fingerprint" in watch.check_reply("plant-1", None, metrics)
    assert "no data set fingerprint" in watch.check_reply("plant-1", "../../etc", metrics)
    assert "no readable dp_epsilon" in watch.check_reply("plant-1", FP, {"num-examples": 400})
    assert "no readable dp_epsilon" in watch.check_reply("plant-1", FP, metrics | {"dp_rounds": math.inf})
