"""The plant side of onboarding without Flower processes: keys, kits, every pre-check of `maxfl plant join`.

The wrong-CA and wrong-name checks are real TLS handshakes against a tiny `ssl` server on 127.0.0.1 that
serves the federation's SuperLink certificate.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import stat
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from fl_client.join import (
    JoinError, JoinKit, cert_fingerprint, check_kit, keygen, load_kit, prepare_join, rejected_by_superlink, short, supernode_argv,
    tls_precheck, warm_exec_argv,
)
from fl_server.federation.provision import Federation, add_plant, init_federation, issue_server_cert, make_ca, write_kit
from launcher.processes import free_port


@contextmanager
def tls_server(cert_chain: Path, key: Path) -> Iterator[int]:
    """A TLS server on 127.0.0.1 (a free port) that completes handshakes and hangs up; stopped on exit."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert_chain), str(key))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate: that is what some tests want
            finally:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=120)  # a hang guard: a loaded machine may take its time
        listener.close()
    assert not thread.is_alive()


@pytest.fixture
def fed(tmp_path) -> Federation:
    return init_federation(tmp_path / "fed", "acme", f"127.0.0.1:{free_port()}")


@pytest.fixture
def plant(tmp_path, fed) -> dict:
    """plant-1 with its key pair and the kit the anchor issued it (registration stood in for)."""
    private, public, _ = keygen(tmp_path / "plant-1")
    _, kit = add_plant(fed, "plant-1", public, register=lambda *_: 4242, unregister=lambda *_: None)
    return {"key": private, "pub": public, "kit": kit, "node_config": f'plant-id="plant-1" data-dir="{tmp_path}"'}


def _rewrite_kit(kit: Path, **changes) -> None:
    info = json.loads((kit / "kit.json").read_text())
    info.update(changes)
    (kit / "kit.json").write_text(json.dumps(info))


# ---------------------------------------------------------------- keygen
def test_keygen_writes_keys_flower_accepts(tmp_path):
    private, public, fp = keygen(tmp_path / "keys")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and stat.S_IMODE(public.stat().st_mode) == 0o644
    # exactly the loaders `flwr supernode register` and `flower-supernode --auth-supernode-private-key` use
    from flwr.cli.supernode.register import try_load_public_key

    from flwr.supercore.primitives.asymmetric import bytes_to_public_key

    registered = bytes_to_public_key(try_load_public_key(public))
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    assert registered.public_numbers() == key.public_key().public_numbers() and key.curve.name == "secp384r1"
    from fl_client.join import key_fingerprint

    assert key_fingerprint(registered) == fp


def test_keygen_never_overwrites_a_key(tmp_path):
    private, _, _ = keygen(tmp_path / "keys")
    before = private.read_bytes()
    with pytest.raises(JoinError, match="already exists; not overwriting"):
        keygen(tmp_path / "keys")
    assert private.read_bytes() == before


# ---------------------------------------------------------------- the kit
def test_a_complete_kit_loads(plant, fed):
    kit = load_kit(plant["kit"])
    assert kit.info.plant_id == "plant-1" and kit.info.node_id == 4242 and cert_fingerprint(kit.ca) == fed.info.ca_fingerprint


@pytest.mark.parametrize(("damage", "needle"), [
    (lambda kit: shutil.rmtree(kit), "does not exist"),
    (lambda kit: (kit / "kit.json").unlink(), "not a complete join kit: kit.json missing"),
    (lambda kit: (kit / "ca.crt").unlink(), "not a complete join kit: ca.crt missing"),
    (lambda kit: (kit / "kit.json").write_text("{not json"), "invalid join kit"),
    (lambda kit: _rewrite_kit(kit, node_id="seven"), "'node_id'"),
    (lambda kit: (kit / "ca.crt").write_text("garbage"), "not a PEM certificate"),
])
def test_a_broken_kit_is_one_error(plant, damage, needle):
    damage(plant["kit"])
    with pytest.raises(JoinError, match=needle) as exc:
        load_kit(plant["kit"])
    assert "\n" not in str(exc.value)


def test_a_kit_whose_ca_was_swapped_is_refused(plant, tmp_path):
    other = make_ca("other", 30)[0]
    (plant["kit"] / "ca.crt").write_bytes(other.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(JoinError, match="is not the CA this kit was issued with"):
        load_kit(plant["kit"])


def test_check_kit_accepts_the_right_plant_and_key(plant):
    key = check_kit(load_kit(plant["kit"]), plant["key"], "plant-1", "acme")
    assert key.curve.name == "secp384r1"


def test_a_kit_for_another_federation_is_refused(plant):
    with pytest.raises(JoinError, match="this kit is for federation 'acme', not 'globex'"):
        check_kit(load_kit(plant["kit"]), plant["key"], "plant-1", "globex")


def test_a_kit_for_another_plant_is_refused(plant):
    with pytest.raises(JoinError, match="issued to plant 'plant-1', but the node config says plant-id 'plant-2'"):
        check_kit(load_kit(plant["kit"]), plant["key"], "plant-2")


def test_the_wrong_key_is_refused_naming_both_fingerprints(plant, tmp_path):
    other, _, other_fp = keygen(tmp_path / "other")
    kit = load_kit(plant["kit"])
    with pytest.raises(JoinError, match="^wrong key") as exc:
        check_kit(kit, other, "plant-1")
    assert short(other_fp) in str(exc.value) and short(kit.info.key_fingerprint) in str(exc.value)


def test_a_key_that_is_no_key_is_refused(plant, tmp_path):
    (tmp_path / "bad.key").write_text("hello")
    with pytest.raises(JoinError, match="not an unencrypted OpenSSH private key"):
        check_kit(load_kit(plant["kit"]), tmp_path / "bad.key", "plant-1")
    with pytest.raises(JoinError, match="does not exist"):
        check_kit(load_kit(plant["kit"]), tmp_path / "none.key", "plant-1")


def test_an_expired_ca_is_refused(tmp_path):
    """A federation whose CA ended yesterday: its kit is refused before anything dials the anchor."""
    long_ago = datetime.now(UTC) - timedelta(days=20)
    fed = init_federation(tmp_path / "old", "acme", "127.0.0.1:9092", ca_days=19, days=10, now=long_ago)
    private, public, _ = keygen(tmp_path / "k")
    _, kit_dir = add_plant(fed, "plant-1", public, register=lambda *_: 1, now=long_ago)
    with pytest.raises(JoinError, match="federation CA .* expired on .*ask the anchor for a new CA"):
        check_kit(load_kit(kit_dir), private, "plant-1")
    # the same kit was fine while the CA was valid
    check_kit(load_kit(kit_dir), private, "plant-1", now=long_ago + timedelta(days=1))


# ---------------------------------------------------------------- TLS pre-check against a real TLS server
def test_the_handshake_succeeds_with_the_federations_ca(fed, plant):
    with tls_server(fed.superlink_cert, fed.superlink_key) as port:
        tls_precheck(f"127.0.0.1:{port}", plant["kit"] / "ca.crt")
        tls_precheck(f"localhost:{port}", plant["kit"] / "ca.crt")


def test_a_wrong_ca_fails_the_handshake_naming_both_fingerprints(fed, plant, tmp_path):
    other = init_federation(tmp_path / "other", "globex", "127.0.0.1:9092")
    with tls_server(other.superlink_cert, other.superlink_key) as port:
        with pytest.raises(JoinError, match="^wrong CA") as exc:
            tls_precheck(f"127.0.0.1:{port}", plant["kit"] / "ca.crt")
    message = str(exc.value)
    served = x509_leaf(other.superlink_cert)
    assert short(cert_fingerprint(served)) in message and short(fed.info.ca_fingerprint) in message
    assert "maxfl federation globex CA" in message and "ask the anchor for a new kit" in message and "\n" not in message


def x509_leaf(chain: Path):
    from cryptography import x509

    return x509.load_pem_x509_certificates(chain.read_bytes())[0]


def test_a_certificate_for_another_name_fails_the_handshake(fed, plant, tmp_path):
    ca = load_kit(plant["kit"]).ca
    ca_key = serialization.load_pem_private_key(fed.ca_key.read_bytes(), None)
    cert, key = issue_server_cert(ca, ca_key, ["anchor.example.com"], days=5)
    (tmp_path / "s.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "s.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with tls_server(tmp_path / "s.crt", tmp_path / "s.key") as port:
        with pytest.raises(JoinError, match="not valid for 127.0.0.1 \\(it names: anchor.example.com\\)"):
            tls_precheck(f"127.0.0.1:{port}", plant["kit"] / "ca.crt")


def test_an_expired_superlink_certificate_fails_the_handshake(fed, plant, tmp_path):
    ca = load_kit(plant["kit"]).ca
    ca_key = serialization.load_pem_private_key(fed.ca_key.read_bytes(), None)
    past = datetime.now(UTC) - timedelta(days=3)
    cert, key = issue_server_cert(ca, ca_key, ["127.0.0.1"], days=1, now=past)
    (tmp_path / "s.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "s.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with tls_server(tmp_path / "s.crt", tmp_path / "s.key") as port:
        with pytest.raises(JoinError, match="certificate at .* expired on .*maxfl federation renew"):
            tls_precheck(f"127.0.0.1:{port}", plant["kit"] / "ca.crt")


def test_nothing_listening_is_one_line(plant):
    port = free_port()
    with pytest.raises(JoinError, match=f"cannot reach the SuperLink at 127.0.0.1:{port}.*port {port}"):
        tls_precheck(f"127.0.0.1:{port}", plant["kit"] / "ca.crt", timeout_s=2)


def test_a_server_without_tls_is_named(plant):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def answer_plain_http() -> None:
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        conn.close()

    thread = threading.Thread(target=answer_plain_http, daemon=True)
    thread.start()
    try:
        with pytest.raises(JoinError, match="is it running without TLS"):
            tls_precheck(f"127.0.0.1:{listener.getsockname()[1]}", plant["kit"] / "ca.crt", timeout_s=5)
    finally:
        thread.join(timeout=5)
        listener.close()


def test_prepare_join_runs_every_check_in_order(fed, plant):
    with tls_server(fed.superlink_cert, fed.superlink_key) as port:
        _rewrite_kit(plant["kit"], superlink_address=f"127.0.0.1:{port}")
        plan = prepare_join(plant["kit"], plant["key"], plant["node_config"], federation="acme")
    assert plan.plant.plant_id == "plant-1" and plan.kit.info.superlink_address == f"127.0.0.1:{port}"
    # a bad node config is caught before the kit is even read
    from maxfl.errors import ConfigError

    with pytest.raises(ConfigError, match="plant_id|plant-id"):
        prepare_join(plant["kit"], plant["key"], 'plant-id="Bad Id" data-dir="/x"')


# ---------------------------------------------------------------- the SuperNode's command line
def test_supernode_argv_is_tls_with_node_authentication_and_flower_parses_it(plant):
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    argv = supernode_argv(Path("/venv/bin"), "anchor.example.com:9092", plant["kit"] / "ca.crt", plant["key"], plant["node_config"], 9101)
    assert argv[0] == "/venv/bin/maxfl-supernode" and "--insecure" not in argv
    args = _parse_args_run_supernode().parse_args(argv[1:])
    assert args.root_certificates == str(plant["kit"] / "ca.crt") and args.auth_supernode_private_key == str(plant["key"])
    assert args.superlink == "anchor.example.com:9092" and args.isolation == "process" and args.port == 9101 and not args.insecure
    cold = _parse_args_run_supernode().parse_args(supernode_argv(Path("/b"), "h:1", None, None, "x=1", 9, warm=False)[1:])
    assert cold.insecure and cold.root_certificates is None and cold.auth_supernode_private_key is None and cold.isolation == "subprocess"
    assert warm_exec_argv(Path("/b"), 9101, 77) == ["/b/maxfl-warm-exec", "--runtime-api-address", "127.0.0.1:9101", "--insecure", "--parent-pid", "77"]


# What Flower 1.41's SuperNode logged (and exited 1 after) in these cases, verbatim apart from colour codes.
_NOT_REGISTERED = """INFO :      Starting Flower SuperNode
ERROR :     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[code: 2004] Failed to activate SuperNode.
The SuperNode could not establish a connection to the SuperLink.
"""
_WRONG_CA = """ERROR :     SSL/TLS handshake error detected.
ERROR :     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate in certificate chain (_ssl.c:1006)
The SuperNode could not establish a connection to the SuperLink.
"""


def test_a_refused_key_is_told_apart_from_a_network_or_tls_failure():
    assert rejected_by_superlink(_NOT_REGISTERED)
    assert not rejected_by_superlink(_WRONG_CA) and not rejected_by_superlink("SuperNode ID: 1\n")


# ---------------------------------------------------------------- the command line: one line per mistake
def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from fl_client import plant_cli
    from launcher import cli

    monkeypatch.setattr(signal, "signal", lambda *a: None)  # main() installs handlers meant for a process of its own
    monkeypatch.setattr(sys, "argv", ["maxfl", *args])
    monkeypatch.setattr(plant_cli.console, "width", 250)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def _one_line(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_cli_keygen_then_keygen_again(tmp_path, monkeypatch, capsys):
    code, out, _ = _main(monkeypatch, capsys, "plant", "keygen", "--out", str(tmp_path / "k"))
    assert code == 0 and "supernode.pub" in out and "send this file to the anchor" in out
    code, _, err = _main(monkeypatch, capsys, "plant", "keygen", "--out", str(tmp_path / "k"))
    _one_line(code, err, "already exists")


def test_cli_join_checks_each_give_one_line(fed, plant, tmp_path, monkeypatch, capsys):
    base = ["plant", "join", "--kit", str(plant["kit"]), "--key", str(plant["key"]), "--node-config", plant["node_config"], "--check"]
    other_key = keygen(tmp_path / "other")[0]
    cases = [
        (["--federation", "globex"], "this kit is for federation 'acme'"),
        (["--key", str(other_key)], "wrong key"),
        (["--node-config", f'plant-id="plant-2" data-dir="{tmp_path}"'], "issued to plant 'plant-1'"),
        (["--kit", str(tmp_path / "nowhere")], "does not exist"),
        ([], "cannot reach the SuperLink"),  # the kit's SuperLink is not running
    ]
    for extra, needle in cases:
        code, _, err = _main(monkeypatch, capsys, *base, *extra)
        _one_line(code, err, needle)
    other = init_federation(tmp_path / "other-fed", "globex", "127.0.0.1:9092")
    with tls_server(other.superlink_cert, other.superlink_key) as port:
        _rewrite_kit(plant["kit"], superlink_address=f"127.0.0.1:{port}")
        code, _, err = _main(monkeypatch, capsys, *base)
        _one_line(code, err, "wrong CA", short(fed.info.ca_fingerprint))
    with tls_server(fed.superlink_cert, fed.superlink_key) as port:
        _rewrite_kit(plant["kit"], superlink_address=f"127.0.0.1:{port}")
        code, out, _ = _main(monkeypatch, capsys, *base, "--federation", "acme")
    assert code == 0 and out.startswith("ok: kit for plant-1 in 'acme', key matches") and "verified by the federation CA" in out


def test_a_kit_rewritten_in_place_is_whole(fed, plant):
    """write_kit replaces the kit folder in one rename: the old kit or the new one, never a mix."""
    info = JoinKit.model_validate_json((plant["kit"] / "kit.json").read_text())
    write_kit(fed, info.model_copy(update={"node_id": 7}))
    assert JoinKit.model_validate_json((plant["kit"] / "kit.json").read_text()).node_id == 7
    assert sorted(p.name for p in plant["kit"].iterdir()) == ["README.ko.md", "README.md", "ca.crt", "kit.json"]
    assert [p.name for p in plant["kit"].parent.iterdir()] == ["plant-1"]
