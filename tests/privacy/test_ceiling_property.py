"""Property: whatever the anchor asks and whenever the plant dies, the ceiling holds and nothing sent is missing."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privacy.accountant import epsilon
from privacy.budget import CeilingReached, PlantPrivacy, authorize_round
from privacy.ledger import Ledger
from privacy.plan import PrivacyPlan

FP = "ab" * 32

plans = st.one_of(
    st.builds(PrivacyPlan, target_epsilon=st.floats(0.3, 30.0)),
    st.builds(PrivacyPlan, target_epsilon=st.just(0.0), noise_multiplier=st.floats(0.3, 5.0)),
)
runs = st.lists(
    st.fixed_dictionaries({
        "plan": plans,
        "records": st.integers(60, 3000),
        "batch_size": st.integers(4, 256),
        "epochs": st.integers(1, 3),
        "rounds": st.integers(1, 6),
        # per round: what happens to the plant — it sends, dies after training, or dies while writing its ledger
        "fates": st.lists(st.sampled_from(["send", "send", "killed-before-send", "killed-while-recording"]), min_size=6, max_size=6),
    }),
    min_size=1, max_size=5,
)


def _mechanisms_on_disk(path) -> Counter:
    state = Ledger(path, "plant-1").read()  # verifies digest and every recorded epsilon
    return Counter(e.mechanism() for d in state.data_sets.values() for e in d.entries)


class _Killed(BaseException):
    pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(runs=runs, ceiling=st.floats(0.5, 20.0), delta_exp=st.integers(-8, -5))
def test_ceiling_is_never_exceeded_and_nothing_sent_is_missing(tmp_path_factory, runs, ceiling, delta_exp):
    path = tmp_path_factory.mktemp("plant") / "ledger.json"
    delta = 10.0**delta_exp
    sent: Counter = Counter()
    for run_id, run in enumerate(runs, start=1):
        for server_round in range(1, run["rounds"] + 1):
            fate = run["fates"][server_round - 1]
            plant = PlantPrivacy(ledger=Ledger(path, "plant-1"), max_epsilon=ceiling, delta=delta)  # a fresh process each round
            try:
                with mock.patch.object(os, "replace", side_effect=_Killed) if fate == "killed-while-recording" else contextlib.nullcontext():
                    grant = authorize_round(plant, run["plan"], fingerprint=FP, task="defect", records=run["records"], run_id=run_id,
                                            server_round=server_round, epochs=run["epochs"], batch_size=run["batch_size"],
                                            num_rounds=run["rounds"])
            except CeilingReached:
                continue
            except _Killed:
                continue  # died before training: nothing can have left
            if fate == "send":
                sent[grant.mechanism] += 1
            on_disk = _mechanisms_on_disk(path)
            assert not sent - on_disk, "an update left the plant without its record"
            assert epsilon(list(on_disk.elements()), delta) <= ceiling
    if path.exists():
        on_disk = _mechanisms_on_disk(path)
        assert epsilon(list(sent.elements()), delta) <= epsilon(list(on_disk.elements()), delta) <= ceiling
