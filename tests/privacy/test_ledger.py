import json
import multiprocessing
import os
from pathlib import Path

import pytest

from maxfl.errors import ConfigError
from privacy.accountant import Mechanism, epsilon
from privacy.ledger import _LEDGER, DataSetRecord, Ledger, LedgerCorrupt, _canonical, new_entry

M = Mechanism(noise_multiplier=1.0, sample_rate=0.1, steps=20)


def _append(ledger: Ledger, fingerprint: str = "ab" * 32, run_id: int = 1, server_round: int = 1) -> None:
    with ledger.transaction() as state:
        data_set = state.data_sets.setdefault(fingerprint, DataSetRecord(task="defect", records=500))
        after = epsilon([*data_set.mechanisms(), M], 1e-5)
        data_set.entries.append(new_entry(M, run_id=run_id, server_round=server_round, delta=1e-5, max_grad_norm=1.0, epsilon_after=after))


def test_rounds_are_kept_across_runs_and_reads(ledger):
    for run_id in (1, 2):
        for r in (1, 2, 3):
            _append(ledger, run_id=run_id, server_round=r)
    state = Ledger(ledger.path, "plant-1").read()
    (data_set,) = state.data_sets.values()
    assert data_set.runs() == [1, 2] and len(data_set.entries) == 6
    assert data_set.spent(1e-5) == pytest.approx(epsilon([M] * 6, 1e-5))
    assert data_set.spent_in_run(2, 1e-5) == pytest.approx(epsilon([M] * 3, 1e-5))


def _edit(path, change) -> None:
    payload = json.loads(path.read_text())
    change(payload)
    path.write_text(json.dumps(payload))


def _remac(ledger: Ledger) -> None:
    """What only the key's holder can do: MAC the file's content as it now is."""
    payload = json.loads(ledger.path.read_text())
    payload.pop("hmac")
    key_id = payload.pop("key_id")
    payload["hmac"], payload["key_id"] = ledger.key.mac(_LEDGER, payload["plant_id"], _canonical(payload)), key_id
    ledger.path.write_text(json.dumps(payload))


def test_a_hand_edited_epsilon_is_refused(ledger):
    _append(ledger)
    _edit(ledger.path, lambda p: next(iter(p["data_sets"].values()))["entries"][0].update(epsilon=0.01))
    with pytest.raises(LedgerCorrupt, match="changed outside maxfl.*its MAC.*--repair-from-journal"):
        ledger.read()


def test_an_edit_by_someone_holding_the_key_is_still_refused_when_the_numbers_do_not_add_up(ledger):
    _append(ledger)
    _append(ledger, server_round=2)
    _edit(ledger.path, lambda p: next(iter(p["data_sets"].values()))["entries"][1].update(epsilon=0.5))
    _remac(ledger)
    with pytest.raises(LedgerCorrupt, match="records epsilon 0.5 .* entry 2 where its mechanisms give"):
        ledger.read()


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"format": "x"}', b"\xff\xfe"])
def test_unreadable_or_truncated_ledger_is_refused(ledger, content):
    _append(ledger)
    ledger.path.write_bytes(content if content else ledger.path.read_bytes()[:40])
    with pytest.raises(LedgerCorrupt, match="plant will not train"):
        ledger.read()


def test_a_refused_ledger_is_never_overwritten(ledger):
    _append(ledger)
    ledger.path.write_text("{garbage")
    with pytest.raises(LedgerCorrupt):
        _append(ledger)
    assert ledger.path.read_text() == "{garbage"


def test_another_plants_ledger_is_refused(ledger):
    _append(ledger)
    with pytest.raises(ConfigError, match="belongs to plant-1, not plant-9"):
        Ledger(ledger.path, "plant-9").read()


def test_a_write_interrupted_before_the_rename_leaves_the_previous_ledger(ledger, monkeypatch):
    _append(ledger)
    before = ledger.path.read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies between writing the new file and putting it in place

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _append(ledger, server_round=2)
    assert ledger.path.read_bytes() == before
    assert [p.name for p in ledger.path.parent.iterdir() if p.name.endswith(".tmp")] == []


def _worker(path: str, run_id: int) -> None:
    for r in range(1, 6):
        _append(Ledger(Path(path), "plant-1"), run_id=run_id, server_round=r)


def test_concurrent_rounds_on_one_plant_lose_no_record(ledger):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(str(ledger.path), run_id)) for run_id in (1, 2, 3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    (data_set,) = ledger.read().data_sets.values()
    assert len(data_set.entries) == 15
