"""Plant side of onboarding: the plant's key pair, the anchor's join kit, and `maxfl plant join`.

A plant joins a federation with two things: its own EC key pair (`keygen`; the private key never leaves the
plant, the public key goes to the anchor) and the join kit the anchor sends back (the federation's CA
certificate and `kit.json`: where the SuperLink is, which plant and key the kit was issued to). `join` checks
all of it before it starts anything -- kit complete, CA valid, kit issued to this plant and this key, a real TLS
handshake with the SuperLink verified by the kit's CA -- then runs the plant's SuperNode (TLS + Flower's
SuperNode authentication) and its warm ClientApp executor in the foreground, and stops both by PID.

The certificate and key helpers here are shared with the anchor's provisioning (fl_server.federation.provision): the kit
format belongs to the side that has to read it, and a plant's install needs no server-side package.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fl_client.config import PLANT_ID_PATTERN, PlantConfig
from maxfl.atomic import atomic_path
from maxfl.errors import UserError, describe_validation_error

if TYPE_CHECKING:
    from launcher.processes import Managed

KIT_FILE = "kit.json"
KIT_CA = "ca.crt"
KIT_README = "README.md"
KIT_README_KO = "README.ko.md"  # the same for a Korean-speaking IT person (상생형 AI 팩토리 partner plants)
PRIVATE_KEY_NAME = "supernode.key"
PUBLIC_KEY_NAME = "supernode.pub"
# Flower's SuperNode reports this code (in its log; the process itself exits with status 1) when it cannot set up
# its connection: for a SuperLink that refuses the node's key as for one it cannot reach or verify.
SUPERNODE_CONNECTION_ERROR = 305
SUPERNODE_MAX_WAIT_S = 60.0
FEDERATION_NAME_PATTERN = PLANT_ID_PATTERN


class JoinError(UserError):
    """A plant cannot join: its kit, its key or its connection to the anchor is not right."""


class NotRegisteredError(JoinError):
    """The SuperLink refused the plant's key: never registered there, or revoked."""

    exit_code = 4


# ---------------------------------------------------------------- small crypto helpers (shared with the anchor)
def fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def short(fp: str) -> str:
    """A fingerprint as people compare it over the phone: the first 16 hex digits, in groups of four."""
    return ":".join(fp[i : i + 4] for i in range(0, 16, 4))


def cert_fingerprint(cert: x509.Certificate) -> str:
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


def key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the public key's DER SubjectPublicKeyInfo (the same key always gives the same fingerprint)."""
    return fingerprint(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def load_certificate(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise JoinError(f"{what} {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise JoinError(f"{what} {path} is not a PEM certificate ({_first_line(exc)})") from None


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A plant's public key as Flower's `flwr supernode register` takes it: OpenSSH format, EC on a NIST curve."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes().strip())
    except FileNotFoundError:
        raise JoinError(f"public key file {path} does not exist") from None
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        raise JoinError(f"{path} is not an OpenSSH public key ({_first_line(exc)}); send the .pub file `maxfl plant keygen` wrote") from None
    return _check_ec(key, path, "public")


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A plant's private key as `flower-supernode --auth-supernode-private-key` takes it: OpenSSH format, EC."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except FileNotFoundError:
        raise JoinError(f"private key file {path} does not exist") from None
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise JoinError(f"{path} is not an unencrypted OpenSSH private key ({_first_line(exc)}); use the key `maxfl plant keygen` wrote") from None
    return _check_ec(key, path, "private")


def _check_ec(key: object, path: Path, kind: str):  # noqa: ANN202 - EC public or private key
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    if not isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        raise JoinError(f"{path} is a {type(key).__name__.removesuffix('Key').removeprefix('_')} {kind} key; Flower's node authentication needs an EC key (`maxfl plant keygen`)")
    public = key if isinstance(key, ec.EllipticCurvePublicKey) else key.public_key()
    if not uses_nist_ec_curve(public):
        raise JoinError(f"{path} uses curve {public.curve.name}; Flower's node authentication needs a NIST curve (P-256, P-384, P-521)")
    return key


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomically, with `mode` set before the file appears under its name (a key is never readable by others)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        os.chmod(tmp, mode)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def now_utc() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------- keygen
def keygen(out_dir: Path, comment: str = "maxfl-plant") -> tuple[Path, Path, str]:
    """A P-384 key pair for Flower's SuperNode authentication; returns (private, public, public-key fingerprint)."""
    private_path, public_path = out_dir / PRIVATE_KEY_NAME, out_dir / PUBLIC_KEY_NAME
    for path in (private_path, public_path):
        if path.exists():
            raise JoinError(f"{path} already exists; not overwriting a plant key (the anchor registered its public half) -- "
                            "use another --out, or delete it first if you really mean to start over")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_file(private_path, private, 0o600)
    write_file(public_path, public + f" {comment}\n".encode(), 0o644)
    return private_path, public_path, key_fingerprint(key.public_key())


# ---------------------------------------------------------------- the join kit
class JoinKit(BaseModel):
    """kit.json: what the anchor issued to one plant. The CA certificate lies beside it (ca.crt)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    federation: str = Field(pattern=FEDERATION_NAME_PATTERN)
    ca_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")  # sha256 of ca.crt (DER)
    superlink_address: str  # host:port of the SuperLink's Fleet API, as this plant reaches it
    plant_id: str = Field(pattern=PLANT_ID_PATTERN)
    key_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")  # sha256 of the plant's public key (DER SPKI)
    node_id: int
    issued_at: datetime
    ca_not_after: datetime


@dataclass(frozen=True)
class Kit:
    folder: Path
    info: JoinKit
    ca_path: Path
    ca: x509.Certificate


def load_kit(folder: Path) -> Kit:
    """The kit in `folder`, complete and consistent (its ca.crt is the CA kit.json names), or one JoinError line."""
    if not folder.is_dir():
        raise JoinError(f"join kit folder {folder} does not exist; it is the folder the anchor sent (kit.json, ca.crt, README.md)")
    missing = [name for name in (KIT_FILE, KIT_CA) if not (folder / name).is_file()]
    if missing:
        raise JoinError(f"{folder} is not a complete join kit: {' and '.join(missing)} missing; ask the anchor to send the kit again")
    try:
        info = JoinKit.model_validate_json((folder / KIT_FILE).read_text(encoding="utf-8"))
    except ValidationError as exc:
        raise JoinError(describe_validation_error(exc, f"join kit {folder / KIT_FILE}")) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JoinError(f"cannot read {folder / KIT_FILE}: {_first_line(exc)}") from None
    ca = load_certificate(folder / KIT_CA, "the kit's CA certificate")
    if cert_fingerprint(ca) != info.ca_fingerprint:
        raise JoinError(f"{folder / KIT_CA} (sha256 {short(cert_fingerprint(ca))}) is not the CA this kit was issued with "
                        f"(sha256 {short(info.ca_fingerprint)}); ask the anchor to send the kit again")
    return Kit(folder, info, folder / KIT_CA, ca)


def check_kit(kit: Kit, key_path: Path, plant_id: str, federation: str | None = None, now: datetime | None = None) -> ec.EllipticCurvePrivateKey:
    """Everything a plant can check offline before it dials the anchor; returns the plant's private key."""
    now = now or now_utc()
    info = kit.info
    if federation is not None and federation != info.federation:
        raise JoinError(f"this kit is for federation '{info.federation}', not '{federation}'; use the kit the anchor of '{federation}' sent")
    if info.plant_id != plant_id:
        raise JoinError(f"this kit was issued to plant '{info.plant_id}', but the node config says plant-id '{plant_id}'; "
                        f"use {plant_id}'s own kit, or ask the anchor to run `maxfl federation add-plant {plant_id}`")
    if now >= kit.ca.not_valid_after_utc:
        raise JoinError(f"the federation CA in {kit.ca_path} expired on {kit.ca.not_valid_after_utc:%Y-%m-%d}; "
                        "ask the anchor for a new CA and a new join kit")
    if now < kit.ca.not_valid_before_utc:
        raise JoinError(f"the federation CA in {kit.ca_path} is valid only from {kit.ca.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
                        "check this machine's clock")
    key = load_private_key(key_path)
    got = key_fingerprint(key.public_key())
    if got != info.key_fingerprint:
        raise JoinError(f"wrong key: {key_path} (public key sha256 {short(got)}) is not the key registered for {info.plant_id} "
                        f"(sha256 {short(info.key_fingerprint)}); use the private key whose .pub file you sent the anchor")
    return key


# ---------------------------------------------------------------- TLS pre-check
def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    m = re.fullmatch(r"\[(?P<v6>[^\]]+)\]:(?P<p6>\d+)|(?P<host>[^:\s\[\]]+):(?P<port>\d+)", address.strip())
    port = int(m.group("p6") or m.group("port")) if m else 0
    if not m or not 0 < port < 65536:
        raise JoinError(f"SuperLink address {address!r} is not host:port (e.g. anchor.example.com:9092)")
    return m.group("v6") or m.group("host"), port


def _peer_certificate(host: str, port: int, timeout_s: float) -> x509.Certificate | None:
    """The certificate a server presents, not verified (only to say which one it is)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock, ctx.wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    return x509.load_der_x509_certificate(der) if der else None


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + [str(n) for n in san.get_values_for_type(x509.IPAddress)]


def _subject_cn(name: x509.Name) -> str:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else name.rfc4514_string()


def tls_precheck(address: str, ca_path: Path, timeout_s: float = 5.0, ca_fingerprint: str | None = None) -> None:
    """A real TLS handshake with the SuperLink, verified with the kit's CA and the address's host name."""
    host, port = split_address(address)
    ctx = ssl.create_default_context(cafile=str(ca_path))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise JoinError(f"cannot reach the SuperLink at {address} ({_first_line(exc)}); check that the anchor's SuperLink is up "
                        f"and that this machine may open TCP connections to {host} port {port}") from None
    try:
        with ctx.wrap_socket(sock, server_hostname=host):
            return
    except ssl.SSLCertVerificationError as exc:
        raise JoinError(_verify_failure(address, host, port, ca_path, ca_fingerprint, exc, timeout_s)) from None
    except ssl.SSLError as exc:
        raise JoinError(f"TLS handshake with the SuperLink at {address} failed ({exc.reason or _first_line(exc)}); "
                        "is it running without TLS (--insecure)? A plant joins only over TLS") from None
    except OSError as exc:  # reset or timed out mid-handshake
        raise JoinError(f"TLS handshake with the SuperLink at {address} failed ({_first_line(exc)}); is {address} the SuperLink's port?") from None
    finally:
        sock.close()


def _verify_failure(address: str, host: str, port: int, ca_path: Path, ca_fp: str | None, exc: ssl.SSLCertVerificationError,
                    timeout_s: float) -> str:
    reason = exc.verify_message or exc.reason or "certificate verify failed"
    peer = _peer_certificate(host, port, timeout_s)
    if exc.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        names = ", ".join(_names(peer)) if peer else "unknown"
        return (f"the SuperLink's certificate is not valid for {host} (it names: {names}); the kit's address must be one of "
                "these -- ask the anchor to re-issue the SuperLink certificate with that name (`maxfl federation init --san`)")
    if exc.verify_code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        when = f" on {peer.not_valid_after_utc:%Y-%m-%d}" if peer else ""
        return f"the SuperLink's certificate at {address} expired{when}; ask the anchor to renew it (`maxfl federation renew`)"
    if peer is None:
        return f"the SuperLink at {address} failed TLS verification with the kit's CA ({reason}); ask the anchor for a new kit"
    ours = ca_fp or cert_fingerprint(load_certificate(ca_path, "the kit's CA certificate"))
    return (f"wrong CA: the SuperLink at {address} presents certificate sha256 {short(cert_fingerprint(peer))} issued by "
            f"'{_subject_cn(peer.issuer)}', which this kit's CA (sha256 {short(ours)}) did not sign ({reason}); "
            "the kit is for another SuperLink or the anchor re-created its CA -- ask the anchor for a new kit")


# ---------------------------------------------------------------- the processes (shared with launcher)
def supernode_argv(bin_dir: Path, superlink: str, ca_path: Path | None, key_path: Path | None, node_config: str, runtime_port: int,
                   warm: bool = True, max_wait_s: float = SUPERNODE_MAX_WAIT_S) -> list[str]:
    """A plant's SuperNode: TLS with the federation's CA and Flower's node authentication with the plant's key.

    `ca_path=None` is the explicit insecure mode of local demos (no TLS, no node authentication). With `warm`,
    `maxfl-supernode` runs in process isolation and `maxfl-warm-exec` executes the ClientApps; otherwise
    Flower's own `flower-supernode` starts a ClientApp process per message.
    """
    argv = [str(bin_dir / ("maxfl-supernode" if warm else "flower-supernode"))]
    if ca_path is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(ca_path)]
        if key_path is not None:
            argv += ["--auth-supernode-private-key", str(key_path)]
    argv += ["--superlink", superlink, "--node-config", node_config, "--port", str(runtime_port), "--max-wait-time", f"{max_wait_s:g}"]
    if warm:
        argv += ["--isolation", "process"]
    return argv


def warm_exec_argv(bin_dir: Path, runtime_port: int, supernode_pid: int) -> list[str]:
    """The warm executor talks to its own SuperNode's Runtime API on loopback: plain HTTP inside one plant."""
    return [str(bin_dir / "maxfl-warm-exec"), "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--insecure",
            "--parent-pid", str(supernode_pid)]


_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
# Flower 1.41 logs "Exit Code: 305 ... [code: 2004] Failed to activate SuperNode." (and exits with status 1) when the
# SuperLink knows no active registration for the node's public key: never registered, revoked, or that key is
# already online in another SuperNode.
_ACTIVATION_FAILED = re.compile(r"\[code: 2004\]|Failed to activate SuperNode")


def rejected_by_superlink(log_text: str) -> bool:
    """The SuperNode stopped because the SuperLink refused its key (not because of the network or TLS)."""
    return f"Exit Code: {SUPERNODE_CONNECTION_ERROR}" in log_text and bool(_ACTIVATION_FAILED.search(log_text))


def not_registered_message(plant_id: str) -> str:
    return (f"the SuperLink refused {plant_id}'s key: it is not registered at the anchor, or was revoked (or this key's previous "
            "SuperNode is still online, or stopped abruptly less than a minute ago: then retry in a minute); "
            f"send the anchor your {PUBLIC_KEY_NAME} and ask them to run `maxfl federation add-plant {plant_id}`")


def node_id_from_log(log_text: str) -> int | None:
    m = _NODE_ID.search(log_text)
    return int(m.group(1)) if m else None


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class JoinPlan:
    """What `maxfl plant join` checked and is about to start."""

    kit: Kit
    plant: PlantConfig
    key_path: Path


def prepare_join(kit_dir: Path, key_path: Path, node_config: str, federation: str | None = None, tls_timeout_s: float = 5.0) -> JoinPlan:
    """Every check of `maxfl plant join`, in order, before any process starts."""
    plant = PlantConfig.from_node_config(node_config)
    kit = load_kit(kit_dir)
    check_kit(kit, key_path, plant.plant_id, federation)
    tls_precheck(kit.info.superlink_address, kit.ca_path, tls_timeout_s, kit.info.ca_fingerprint)
    return JoinPlan(kit, plant, key_path)


def run_plant(plan: JoinPlan, node_config: str, warm: bool = True, runtime_port: int | None = None, log_dir: Path | None = None,
              echo: Callable[[str], None] = print, env: dict[str, str] | None = None, stop_after_s: float | None = None) -> int:
    """Run the plant's SuperNode (and warm executor) in the foreground until Ctrl-C/SIGTERM; both stopped by PID.

    Returns 0 after `stop_after_s` (tests); Ctrl-C/SIGTERM (KeyboardInterrupt in `maxfl`) stops both and goes
    on up. Raises NotRegisteredError when the SuperLink refuses or drops the key, ProcessError when a process
    dies for another reason.
    """
    from fl_client.config import maxfl_home
    from maxfl.errors import ProcessError
    from launcher.processes import ProcessGroup, free_port

    bin_dir = Path(sys.executable).parent
    port = runtime_port or free_port()
    logs = log_dir or maxfl_home() / "logs" / plan.plant.plant_id
    procs = ProcessGroup(logs)
    # Flower's SuperNode starts `flower-superexec` by name (--no-warm): the environment's bin folder goes on PATH.
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    argv = supernode_argv(bin_dir, plan.kit.info.superlink_address, plan.kit.ca_path, plan.key_path, node_config, port, warm)
    name = f"supernode-{plan.plant.plant_id}"
    offset = _size(logs / f"{name}.log")  # logs are appended to: read only what this start writes
    started = time.monotonic()
    try:
        node = procs.start(name, argv, env)
        echo(f"{plan.plant.plant_id}: SuperNode started (pid {node.popen.pid}), joining '{plan.kit.info.federation}' at "
             f"{plan.kit.info.superlink_address}; log: {node.log_path}")
        connected = False
        while stop_after_s is None or time.monotonic() - started < stop_after_s:
            if not connected and (node_id := node_id_from_log(_read(node.log_path, offset))) is not None:
                connected = True
                echo(f"{plan.plant.plant_id}: connected as node {node_id}; Ctrl-C stops it")
                if warm:  # started once the SuperLink accepted the key: a refused plant loads no torch
                    executor = procs.start(f"warm-exec-{plan.plant.plant_id}", warm_exec_argv(bin_dir, port, node.popen.pid), env)
                    echo(f"{plan.plant.plant_id}: warm executor started (pid {executor.popen.pid})")
            if node.popen.poll() is not None:
                raise _node_failure(plan.plant.plant_id, node, offset, connected)
            for managed in procs.procs:
                if managed is not node and managed.popen.poll() is not None and node.popen.poll() is None:
                    raise ProcessError(f"{managed.name} exited with code {managed.popen.returncode}: {managed.tail()} (log: {managed.log_path})")
            time.sleep(0.2)
        return 0
    finally:
        procs.stop_all()


def _node_failure(plant_id: str, node: Managed, offset: int, connected: bool) -> UserError:
    """Why the SuperNode stopped, as one line: refused or dropped by the SuperLink, or some other failure."""
    from maxfl.errors import ProcessError

    node.popen.wait()
    text = _read(node.log_path, offset)
    if rejected_by_superlink(text):
        return NotRegisteredError(not_registered_message(plant_id))
    if node.popen.returncode == 0 and connected:  # Flower ends the SuperNode "gracefully" when the SuperLink drops its key
        return NotRegisteredError(f"the SuperLink ended {plant_id}'s session: its key was revoked at the anchor (or the SuperLink "
                                  "was reset); ask the anchor before joining again")
    return ProcessError(f"{node.name} exited with code {node.popen.returncode}: {node.tail()} (log: {node.log_path})")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read(path: Path, offset: int = 0) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def describe_ca(cert: x509.Certificate) -> str:
    return f"{_subject_cn(cert.subject)} (sha256 {short(cert_fingerprint(cert))}, valid until {cert.not_valid_after_utc:%Y-%m-%d})"

