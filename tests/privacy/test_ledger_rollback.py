"""The ledger cannot be rolled back: deleted, restored, re-digested, swapped or migrated twice, it is refused."""

import hashlib
import json
import logging
import shutil
import stat
from pathlib import Path

import pytest

from maxfl.errors import ConfigError
from privacy.accountant import Mechanism, epsilon
from privacy.journal import Journal
from privacy.ledger import _JOURNAL, _LEDGER, OLD_FORMAT, DataSetRecord, Ledger, LedgerBehind, LedgerCorrupt, _canonical, new_entry

M = Mechanism(noise_multiplier=1.0, sample_rate=0.1, steps=20)
FP = "ab" * 32


def _append(ledger: Ledger, rounds: int = 1, fingerprint: str = FP, run_id: int = 1) -> None:
    for _ in range(rounds):
        with ledger.transaction() as state:
            data_set = state.data_sets.setdefault(fingerprint, DataSetRecord(task="defect", records=500))
            after = epsilon([*data_set.mechanisms(), M], 1e-5)
            data_set.entries.append(new_entry(M, run_id=run_id, server_round=len(data_set.entries) + 1, delta=1e-5, max_grad_norm=1.0,
                                              epsilon_after=after))


def _spent(ledger: Ledger) -> float:
    return ledger.read().data_sets[FP].spent(1e-5)


def _journal_path(ledger: Ledger):
    return ledger.journal_paths[0]


def test_the_key_is_private_and_every_round_is_journaled(ledger):
    _append(ledger, 3)
    assert stat.S_IMODE(ledger.key.path.stat().st_mode) == 0o600
    lines = _journal_path(ledger).read_text().splitlines()
    assert [json.loads(line)["record"]["entry"]["server_round"] for line in lines] == [1, 2, 3]
    assert json.loads(ledger.path.read_text())["format"] == "maxfl-privacy-ledger/2"


def test_removing_rounds_and_recomputing_a_plain_digest_is_refused(ledger):
    """The attack of issue 15: drop the last rounds, recompute SHA-256, epsilon goes down."""
    _append(ledger, 3)
    payload = json.loads(ledger.path.read_text())
    payload.pop("hmac"), payload.pop("key_id")
    payload["data_sets"][FP]["entries"] = payload["data_sets"][FP]["entries"][:2]
    keyed = dict(payload, hmac=hashlib.sha256(_canonical(payload)).hexdigest(), key_id=json.loads(ledger.path.read_text())["key_id"])
    ledger.path.write_text(json.dumps(keyed))
    with pytest.raises(LedgerCorrupt, match="changed outside maxfl"):
        ledger.read()
    old = dict(payload, format=OLD_FORMAT)
    old["digest"] = hashlib.sha256(_canonical(old)).hexdigest()  # passed off as a not yet migrated ledger
    ledger.path.write_text(json.dumps(old))
    with pytest.raises(LedgerCorrupt, match="old unkeyed format .* already keeps a keyed ledger"):
        ledger.read()


def test_a_deleted_ledger_with_its_journal_is_refused_not_reset_to_zero(ledger):
    _append(ledger, 3)
    spent = _spent(ledger)
    ledger.path.unlink()
    with pytest.raises(LedgerBehind, match=r"records no round on data set abababababab where its journal .* records 3 .* does not exist.*--repair-from-journal"):
        ledger.read()
    with pytest.raises(LedgerBehind):
        _append(ledger)  # no round is trained on a zeroed budget
    assert not ledger.path.exists()
    lines = ledger.repair_from_journal()
    assert "3 round(s)" in lines[0] and "held nothing" in lines[0]
    assert _spent(ledger) == pytest.approx(spent)
    _append(ledger)
    assert len(ledger.read().data_sets[FP].entries) == 4


def test_a_ledger_restored_from_an_older_backup_is_refused_and_repair_restores_the_higher_spend(ledger, tmp_path):
    _append(ledger, 2)
    backup = tmp_path / "backup.json"
    shutil.copy(ledger.path, backup)
    _append(ledger, 3)
    spent = _spent(ledger)
    shutil.copy(backup, ledger.path)
    with pytest.raises(LedgerBehind, match=r"records 2 round\(s\) \(epsilon \S+\) on data set abababababab where its journal .* records 5 .*older copy"):
        ledger.read()
    ledger.repair_from_journal()
    assert len(ledger.read().data_sets[FP].entries) == 5 and _spent(ledger) == pytest.approx(spent)


def test_repair_never_lowers_a_spend(ledger):
    _append(ledger, 4)
    spent = _spent(ledger)
    journal = _journal_path(ledger)
    journal.write_text("".join(journal.read_text().splitlines(keepends=True)[:2]))  # a journal cut short still verifies
    assert _spent(ledger) == pytest.approx(spent)  # a journal behind the ledger is no reason to refuse
    ledger.repair_from_journal()
    assert len(ledger.read().data_sets[FP].entries) == 4 and _spent(ledger) == pytest.approx(spent)
    assert len(journal.read_text().splitlines()) == 4  # and the journal caught up


def test_a_journal_left_behind_by_a_crash_catches_up_on_the_next_round(ledger, monkeypatch):
    _append(ledger, 1)

    def killed(self, records):
        raise KeyboardInterrupt  # the process dies after the ledger was replaced, before the journal line

    monkeypatch.setattr(Journal, "append", killed)
    with pytest.raises(KeyboardInterrupt):
        _append(ledger)
    monkeypatch.undo()
    assert len(ledger.read().data_sets[FP].entries) == 2  # over-counted, never under-counted
    _append(ledger)
    assert len(_journal_path(ledger).read_text().splitlines()) == 3


def test_a_torn_last_journal_line_is_dropped_and_replaced(ledger):
    _append(ledger, 2)
    with open(_journal_path(ledger), "ab") as fh:
        fh.write(b'{"seq": 3, "prev": "')  # killed mid-append
    assert len(ledger.read().data_sets[FP].entries) == 2
    _append(ledger)
    assert [json.loads(line)["seq"] for line in _journal_path(ledger).read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("edit", ["drop-middle", "change-epsilon", "swap"])
def test_an_edited_journal_is_refused(ledger, edit):
    _append(ledger, 3)
    journal = _journal_path(ledger)
    lines = journal.read_text().splitlines(keepends=True)
    if edit == "drop-middle":
        lines.pop(1)
    elif edit == "swap":
        lines[0], lines[1] = lines[1], lines[0]
    else:
        lines[1] = lines[1].replace('"epsilon": ', '"epsilon": 0.0', 1)
    journal.write_text("".join(lines))
    with pytest.raises(LedgerCorrupt, match="journal .* does not verify: line"):
        ledger.read()


def test_another_plants_ledger_is_refused_even_with_its_plant_id_edited(tmp_path, ledger):
    other = Ledger(tmp_path / "plant-2" / "plant-2.json", "plant-2")
    _append(other, 1)
    _append(ledger, 3)
    shutil.copy(other.path, ledger.path)
    with pytest.raises(ConfigError, match="belongs to plant-2, not plant-1"):
        ledger.read()
    ledger.path.write_text(other.path.read_text().replace('"plant_id": "plant-2"', '"plant_id": "plant-1"'))
    with pytest.raises(LedgerCorrupt, match="not written with this plant's ledger key"):
        ledger.read()
    shutil.copy(other.key.path, ledger.key.path)  # even with plant-2's key taken as well
    with pytest.raises(LedgerCorrupt):
        ledger.read()


def test_a_ledger_whose_key_is_missing_is_refused(ledger):
    _append(ledger, 1)
    ledger.key.path.unlink()
    with pytest.raises(LedgerCorrupt, match="key .* is missing.*restore the key file"):
        ledger.read()


def test_a_mirror_catches_a_restored_folder(tmp_path):
    folder = tmp_path / "ledgers"
    ledger = Ledger(folder / "plant-1.json", "plant-1", mirror=tmp_path / "edge" / "privacy-journal.jsonl")
    _append(ledger, 2)
    shutil.copytree(folder, tmp_path / "backup")
    _append(ledger, 2)
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "backup", folder)  # ledger, key and journal all from the older backup
    with pytest.raises(LedgerBehind, match="privacy-journal.jsonl records 4"):
        ledger.read()
    ledger.repair_from_journal()
    assert len(ledger.read().data_sets[FP].entries) == 4


def _old_format(ledger: Ledger, rounds: int) -> float:
    """A ledger as maxfl-privacy-ledger/1 wrote it (unkeyed SHA-256), made by writing /2 then converting."""
    _append(ledger, rounds)
    spent = _spent(ledger)
    payload = json.loads(ledger.path.read_text())
    payload.pop("hmac"), payload.pop("key_id")
    payload["format"] = OLD_FORMAT
    payload["digest"] = hashlib.sha256(_canonical(payload)).hexdigest()
    ledger.path.write_text(json.dumps(payload))
    for p in [*ledger.journal_paths, ledger.key.path]:
        p.unlink(missing_ok=True)
    return spent


def test_an_old_unkeyed_ledger_is_migrated_once(ledger, caplog):
    spent = _old_format(ledger, 2)
    with caplog.at_level(logging.WARNING, logger="privacy.ledger"):
        assert _spent(ledger) == pytest.approx(spent)
    assert "old unkeyed format" in caplog.text and "rewritten keyed" in caplog.text
    _append(ledger)
    assert json.loads(ledger.path.read_text())["format"] == "maxfl-privacy-ledger/2"
    assert len(_journal_path(ledger).read_text().splitlines()) == 3  # the migrated rounds and the new one


def test_an_old_ledger_whose_digest_does_not_verify_is_refused(ledger):
    _old_format(ledger, 2)
    ledger.path.write_text(ledger.path.read_text().replace('"steps": 20', '"steps": 2', 1))
    with pytest.raises(LedgerCorrupt, match="its digest"):
        ledger.read()


def _crafted(ledger: Ledger, **entry_fields: object) -> None:
    """A ledger with a degenerate entry, MACed with the plant's own key (the worst case: an insider)."""
    _append(ledger, 1)
    payload = json.loads(ledger.path.read_text())
    key_id = payload.pop("key_id")
    payload.pop("hmac")
    payload["data_sets"][FP]["entries"][0].update(entry_fields)
    payload["hmac"], payload["key_id"] = ledger.key.mac(_LEDGER, "plant-1", _canonical(payload)), key_id
    ledger.path.write_text(json.dumps(payload, allow_nan=True))
    for p in ledger.journal_paths:
        p.unlink()


@pytest.mark.parametrize("fields", [
    {"noise_multiplier": float("inf")}, {"noise_multiplier": float("nan")}, {"noise_multiplier": 1e300},
    {"noise_multiplier": 1e-300}, {"sample_rate": float("nan")}, {"sample_rate": 0.0}, {"steps": 10**18},
])
def test_a_ledger_with_a_degenerate_mechanism_is_refused_before_the_accountant_runs(ledger, fields, monkeypatch):
    _crafted(ledger, **fields)
    import privacy.accountant

    def must_not_run(*args):
        raise AssertionError("the accountant was asked about a degenerate mechanism")

    monkeypatch.setattr(privacy.accountant.rdp, "compute_rdp", must_not_run)
    privacy.accountant._rdp_per_step.cache_clear()
    with pytest.raises(LedgerCorrupt, match="does not match the ledger format"):
        ledger.read()


def test_the_journal_mac_is_not_the_ledger_mac(ledger):
    """Sub-keys per purpose and plant: a MAC made for one never verifies as another."""
    _append(ledger, 1)
    assert ledger.key.mac(_LEDGER, "plant-1", b"x") != ledger.key.mac(_JOURNAL, "plant-1", b"x") != ledger.key.mac(_JOURNAL, "plant-2", b"x")


def _writer(path: str) -> None:
    _append(Ledger(Path(path), "plant-1"), 15)


def test_a_reader_never_sees_a_round_half_recorded(ledger):
    """The ledger is replaced before the journal line is appended: a reader must not take that moment for a rollback."""
    import multiprocessing

    _append(ledger, 1)
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_writer, args=(str(ledger.path),)) for _ in range(2)]
    for w in writers:
        w.start()
    reads = 0
    while any(w.is_alive() for w in writers) or reads == 0:
        Ledger(ledger.path, None).read()  # raises LedgerBehind if it saw the ledger older than its journal
        reads += 1
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    assert len(ledger.read().data_sets[FP].entries) == 31
