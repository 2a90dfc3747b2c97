"""The anchor's provisioning: a federation's CA and SuperLink certificate, join kits, registering and revoking plants.

Layout of a federation folder (`maxfl federation init --dir D`):

    D/federation.json      FederationInfo: name, SuperLink address as plants reach it, CA fingerprint
    D/ca.crt               the federation's CA certificate
    D/superlink.crt        the SuperLink's TLS certificate (chain: leaf + CA)
    D/private/             every private key, 0700: ca.key (needed only to issue certificates), superlink.key,
                           superexec.secret (the SuperLink's ServerApp executor), admins/<name>/ (admins' bundles);
                           a container that must read the rest of D (the ServerApp's) gets an empty tmpfs here
    D/allowed-serverapps   the ServerApps the anchor runs: FAB hashes (fl_server.federation.serverapp_policy)
    D/flwr-home/           the anchor's Flower CLI config: the Control API over TLS, verified with the CA
    D/proxy/               the reverse proxy's (Caddy's) config and state: what plants reach (fl_server.federation.proxy)
    D/admins.json          remote admins: name, client-certificate fingerprint, expiry (`maxfl federation add-admin`)
    D/private/admins/<name>/  an admin's bundle: admin.crt/.key (mutual TLS to the proxy's admin listener), ca.crt, admin.json
    D/plants.json          every plant ever added: key fingerprint, Flower node id, active/revoked
    D/kits/<plant-id>/     the join kit sent to a plant: ca.crt, kit.json, README.md
    D/audit.jsonl          append-only audit log (maxfl.audit): plant.joined, plant.revoked, ...

Exposure: the SuperLink listens on loopback (`control_address`) and serves its Fleet, Control and Runtime APIs
there; plants reach it through the reverse proxy on the SuperLink address's port, which forwards the Fleet API
only (fl_server.federation.proxy). The anchor's own CLI talks to the SuperLink's loopback port directly.

Trust model: plants verify the SuperLink with the CA in their kit (TLS); the SuperLink admits only SuperNodes
whose public key the anchor registered (Flower's SuperNode authentication; the plant proves possession of
the private key on every request). Adding or revoking one plant changes that plant's registration, record and
kit only. Registration goes through Flower's Control API (`flwr supernode register/unregister`); the
functions that do it are parameters, so tests (and other transports) can stand in for them.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fl_client.config import PLANT_ID_PATTERN
from fl_server.federation.proxy import ProxyConfig
from fl_server.federation.serverapp_policy import ALLOWED_FILE, ALLOWED_HEADER
from fl_client.join import (
    FEDERATION_NAME_PATTERN, KIT_CA, KIT_FILE, KIT_README, KIT_README_KO, PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, JoinError, JoinKit, cert_fingerprint, describe_ca, is_ip,
    key_fingerprint, load_certificate, load_public_key, now_utc, short, split_address, write_file,
)
from maxfl.atomic import atomic_write_text, fsync_dir
from maxfl.audit import AuditLog
from maxfl.errors import UserError, describe_validation_error

FEDERATION_FILE = "federation.json"
PLANTS_FILE = "plants.json"
AUDIT_FILE = "audit.jsonl"
PRIVATE = "private"  # every private key and secret, and nothing else
CA_CERT, CA_KEY = "ca.crt", "private/ca.key"
SUPERLINK_CERT, SUPERLINK_KEY = "superlink.crt", "private/superlink.key"
SUPEREXEC_SECRET = "private/superexec.secret"
FLWR_HOME = "flwr-home"
KITS = "kits"
STATE_DB = "superlink-state.db"
ADMINS_FILE = "admins.json"
ADMINS = "private/admins"
ADMIN_CERT, ADMIN_KEY, ADMIN_INFO = "admin.crt", "admin.key", "admin.json"
PROXY_DIR = "proxy"
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


class ProvisionError(UserError):
    """The federation folder, a plant or the SuperLink is not in the state a provisioning command needs."""


class SuperLinkUnreachable(ProvisionError):
    exit_code = 3


class FederationInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=FEDERATION_NAME_PATTERN)
    superlink_address: str  # host:port, as the plants reach the SuperLink
    control_address: str  # host:port where the SuperLink itself listens (loopback); the anchor's own CLI reaches it there
    created: datetime
    ca_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    sans: list[str]
    contact: str = ""  # whom a plant's IT person contacts (printed in every kit's README)


class PlantRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    plant_id: str = Field(pattern=PLANT_ID_PATTERN)
    key_fingerprint: str
    public_key: str  # the OpenSSH line the plant sent
    node_id: int
    status: Literal["active", "revoked"]
    joined_at: datetime
    revoked_at: datetime | None = None


class AdminRecord(BaseModel):
    """A remote admin: the client certificate the proxy's admin listener lets in (and nothing else)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=PLANT_ID_PATTERN)
    cert_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    issued_at: datetime
    not_after: datetime


class AdminBook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    admins: dict[str, AdminRecord] = Field(default_factory=dict)


class AdminBundle(BaseModel):
    """admin.json in an admin's bundle: which federation, and where its admin listener is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    federation: str = Field(pattern=FEDERATION_NAME_PATTERN)
    name: str = Field(pattern=PLANT_ID_PATTERN)
    admin_address: str  # host:port of the proxy's admin listener, as the admin reaches it
    server_name: str  # a name in the SuperLink certificate the admin's side verifies


class PlantBook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plants: dict[str, PlantRecord] = Field(default_factory=dict)


@dataclass(frozen=True)
class Federation:
    dir: Path
    info: FederationInfo

    @property
    def ca_cert(self) -> Path:
        return self.dir / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.dir / CA_KEY

    @property
    def superlink_cert(self) -> Path:
        return self.dir / SUPERLINK_CERT

    @property
    def superlink_key(self) -> Path:
        return self.dir / SUPERLINK_KEY

    @property
    def superexec_secret(self) -> Path:
        return self.dir / SUPEREXEC_SECRET

    @property
    def allowed_serverapps(self) -> Path:
        return self.dir / ALLOWED_FILE

    @property
    def flwr_home(self) -> Path:
        return self.dir / FLWR_HOME

    @property
    def plants_file(self) -> Path:
        return self.dir / PLANTS_FILE

    @property
    def audit(self) -> AuditLog:
        return AuditLog(self.dir / AUDIT_FILE)

    def admin_dir(self, name: str) -> Path:
        return self.dir / ADMINS / name

    def admins(self) -> AdminBook:
        path = self.dir / ADMINS_FILE
        if not path.exists():
            return AdminBook()
        try:
            return AdminBook.model_validate_json(path.read_text(encoding="utf-8"))
        except ValidationError as exc:
            raise ProvisionError(describe_validation_error(exc, str(path))) from None

    def admin_certs(self) -> list[Path]:
        """The client certificates of every admin on record: the only ones the admin listener accepts."""
        return [self.admin_dir(name) / ADMIN_CERT for name in sorted(self.admins().admins)]

    def kit_dir(self, plant_id: str) -> Path:
        return self.dir / KITS / plant_id

    def plants(self) -> PlantBook:
        if not self.plants_file.exists():
            return PlantBook()
        try:
            return PlantBook.model_validate_json(self.plants_file.read_text(encoding="utf-8"))
        except ValidationError as exc:
            raise ProvisionError(describe_validation_error(exc, str(self.plants_file))) from None

    def save_plants(self, book: PlantBook) -> None:
        atomic_write_text(self.plants_file, book.model_dump_json(indent=2) + "\n")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One provisioning command at a time per federation folder (two add-plants must not lose a record)."""
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def load_federation(folder: Path) -> Federation:
    path = folder / FEDERATION_FILE
    if not path.is_file():
        raise ProvisionError(f"{folder} is not a federation folder (no {FEDERATION_FILE}); create one with `maxfl federation init --dir {folder}`")
    try:
        info = FederationInfo.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        raise ProvisionError(describe_validation_error(exc, str(path))) from None
    return Federation(folder.resolve(), info)


# ---------------------------------------------------------------- certificates
def _ski(key: ec.EllipticCurvePublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(name: str, days: int, now: datetime | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    now = now or now_utc()
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "maxfl"), x509.NameAttribute(NameOID.COMMON_NAME, f"maxfl federation {name} CA")])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(_ski(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def _san_entry(host: str) -> x509.GeneralName:
    return x509.IPAddress(ipaddress.ip_address(host)) if is_ip(host) else x509.DNSName(host)


def server_names(superlink_address: str, extra: Sequence[str] = ()) -> list[str]:
    """The SuperLink certificate's names: the address's host, loopback (the anchor's own CLI and ServerApp), --san."""
    host, _ = split_address(superlink_address)
    names: list[str] = []
    for name in (host, "127.0.0.1", "localhost", *extra):
        name = name.strip().lower()
        if name and name not in names:
            names.append(name)
    return names


def issue_server_cert(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: Sequence[str], days: int,
                      now: datetime | None = None, not_before: datetime | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A TLS server certificate for the SuperLink, signed by the CA, never outliving it."""
    now = now or now_utc()
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + timedelta(days=days), ca.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "maxfl"),
                                                          x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(minutes=5)).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_san_entry(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_ski(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)  # type: ignore[arg-type]
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def issue_client_cert(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, name: str, days: int,
                      now: datetime | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A TLS client certificate (clientAuth only) for a remote admin, signed by the CA, never outliving it."""
    now = now or now_utc()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "maxfl"),
                                                          x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admin"),
                                                          x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(min(now + timedelta(days=days), ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(_ski(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)  # type: ignore[arg-type]
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def add_admin(fed: Federation, name: str, admin_address: str, days: int = 397, now: datetime | None = None) -> tuple[AdminRecord, Path]:
    """A client certificate from the federation CA for a remote admin, in D/admins/NAME/; recorded and audited.

    The proxy's admin listener (`maxfl federation superlink --admin-port`) lets in only the admins on record;
    restart it after adding one. The bundle holds the admin's private key: hand it over as a secret.
    """
    now = now or now_utc()
    if not re.fullmatch(PLANT_ID_PATTERN, name):
        raise ProvisionError(f"admin name {name!r} is not allowed: lower-case letters, digits, '-' and '_' (e.g. alice)")
    if days < 1:
        raise ProvisionError("--days must be at least 1")
    try:
        host, _ = split_address(admin_address)
    except JoinError as exc:
        raise ProvisionError(str(exc).replace("SuperLink address", "admin address")) from None
    ca = load_certificate(fed.ca_cert, "the federation's CA certificate")
    try:
        ca_key = serialization.load_pem_private_key(fed.ca_key.read_bytes(), None)
    except FileNotFoundError:
        raise ProvisionError(f"{fed.ca_key} is missing: only the CA key can issue an admin's certificate") from None
    if now >= ca.not_valid_after_utc:
        raise ProvisionError(f"the federation CA expired on {ca.not_valid_after_utc:%Y-%m-%d}; a new federation is needed")
    with fed.locked():
        book = fed.admins()
        if name in book.admins:
            raise ProvisionError(f"admin '{name}' already exists (certificate sha256 {short(book.admins[name].cert_fingerprint)}); pick another name")
        cert, key = issue_client_cert(ca, ca_key, name, days, now)  # type: ignore[arg-type]
        folder = fed.admin_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        write_file(folder / ADMIN_KEY, _pem_key(key), 0o600)
        write_file(folder / ADMIN_CERT, _pem(cert), 0o644)
        shutil.copyfile(fed.ca_cert, folder / CA_CERT)
        server_name = host if host in fed.info.sans else fed.info.sans[0]
        bundle = AdminBundle(federation=fed.info.name, name=name, admin_address=admin_address, server_name=server_name)
        atomic_write_text(folder / ADMIN_INFO, bundle.model_dump_json(indent=2) + "\n")
        record = AdminRecord(name=name, cert_fingerprint=cert_fingerprint(cert), issued_at=now, not_after=cert.not_valid_after_utc)
        book.admins[name] = record
        atomic_write_text(fed.dir / ADMINS_FILE, book.model_dump_json(indent=2) + "\n")
        fed.audit.record("admin.added", "anchor", admin=name, cert_sha256=record.cert_fingerprint, not_after=record.not_after.isoformat(),
                         admin_address=admin_address)
    return record, folder


def remove_admin(fed: Federation, name: str) -> AdminRecord:
    """Take an admin off the record: the admin listener refuses their certificate once the SuperLink command restarts."""
    with fed.locked():
        book = fed.admins()
        record = book.admins.pop(name, None)
        if record is None:
            raise ProvisionError(f"no admin '{name}' in this federation (admins: {', '.join(sorted(book.admins)) or 'none'})")
        atomic_write_text(fed.dir / ADMINS_FILE, book.model_dump_json(indent=2) + "\n")
        fed.audit.record("admin.removed", "anchor", admin=name, cert_sha256=record.cert_fingerprint)
    return record


def load_admin_bundle(folder: Path) -> AdminBundle:
    path = folder / ADMIN_INFO
    if not path.is_file():
        raise ProvisionError(f"{folder} is not an admin bundle (no {ADMIN_INFO}); the anchor makes one with `maxfl federation add-admin NAME`")
    try:
        return AdminBundle.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        raise ProvisionError(describe_validation_error(exc, str(path))) from None


def _write_superlink_cert(folder: Path, ca: x509.Certificate, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    write_file(folder / SUPERLINK_KEY, _pem_key(key), 0o600)
    write_file(folder / SUPERLINK_CERT, _pem(cert) + _pem(ca), 0o644)  # the chain: plants see which CA signed it


def flwr_config_text(info: FederationInfo, ca_path: Path) -> str:
    """The anchor's Flower CLI config: the Control API over TLS, the certificate checked with the federation's CA."""
    return (f'[superlink]\ndefault = "{info.name}"\n\n[superlink.{info.name}]\naddress = "{info.control_address}"\n'
            f'root-certificates = "{ca_path.resolve()}"\n')


def default_superlink_port(plants_port: int) -> int:
    """The SuperLink's own (loopback) port: beside the plants' port, which the proxy holds on every address."""
    return plants_port + 1 if plants_port < 65535 else plants_port - 1


def init_federation(folder: Path, name: str, superlink_address: str, sans: Sequence[str] = (), ca_days: int = 3650, days: int = 397,
                    control_address: str | None = None, contact: str = "", now: datetime | None = None) -> Federation:
    """A new CA, the SuperLink's certificate, the anchor's Flower CLI config and an empty audit log in `folder`.

    Refuses a folder that already holds a federation (or the remains of one). Files appear in one step each,
    federation.json last, so an interrupted init leaves no federation.json behind.
    """
    now = now or now_utc()
    folder = folder.resolve()
    if (folder / FEDERATION_FILE).exists():
        existing = load_federation(folder).info
        raise ProvisionError(f"{folder} already holds federation '{existing.name}' (created {existing.created:%Y-%m-%d}); "
                             "it is not overwritten -- use another --dir")
    if (folder / CA_KEY).exists():
        raise ProvisionError(f"{folder} holds a CA key but no {FEDERATION_FILE} (an interrupted init?); it is not overwritten -- "
                             "delete the folder to start over, or use another --dir")
    if ca_days < 1 or days < 1:
        raise ProvisionError("--ca-days and --days must be at least 1")
    try:
        host, port = split_address(superlink_address)
        control = control_address or f"127.0.0.1:{default_superlink_port(port)}"
        split_address(control)
    except JoinError as exc:
        raise ProvisionError(str(exc).replace("SuperLink address", "address")) from None
    try:
        names = server_names(superlink_address, sans)
        for n in names:
            _san_entry(n)
    except ValueError as exc:
        raise ProvisionError(f"--san: {exc}") from None
    ca, ca_key = make_ca(name, ca_days, now)
    cert, key = issue_server_cert(ca, ca_key, names, days, now)
    try:
        info = FederationInfo(name=name, superlink_address=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                              control_address=control, created=now, ca_fingerprint=cert_fingerprint(ca), sans=names, contact=contact)
    except ValidationError as exc:
        raise ProvisionError(describe_validation_error(exc, "federation")) from None
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    (folder / PRIVATE).mkdir(mode=0o700, exist_ok=True)
    write_file(folder / CA_KEY, _pem_key(ca_key), 0o600)
    write_file(folder / SUPEREXEC_SECRET, secrets.token_hex(32).encode(), 0o600)
    atomic_write_text(folder / ALLOWED_FILE, ALLOWED_HEADER)
    write_file(folder / CA_CERT, _pem(ca), 0o644)
    _write_superlink_cert(folder, ca, cert, key)
    atomic_write_text(folder / FLWR_HOME / "config.toml", flwr_config_text(info, folder / CA_CERT))
    fed = Federation(folder, info)
    fed.audit.record("federation.created", "anchor", federation=name, superlink=info.superlink_address, ca_sha256=info.ca_fingerprint,
                     superlink_names=names, ca_not_after=ca.not_valid_after_utc.isoformat(), superlink_not_after=cert.not_valid_after_utc.isoformat())
    atomic_write_text(folder / FEDERATION_FILE, info.model_dump_json(indent=2) + "\n")
    return fed


def renew_superlink(fed: Federation, days: int = 397, now: datetime | None = None) -> x509.Certificate:
    """A fresh SuperLink certificate from the same CA and names (plants' kits stay valid); restart the SuperLink."""
    ca = load_certificate(fed.ca_cert, "the federation's CA certificate")
    try:
        ca_key = serialization.load_pem_private_key(fed.ca_key.read_bytes(), None)
    except FileNotFoundError:
        raise ProvisionError(f"{fed.ca_key} is missing: only the CA key can issue a SuperLink certificate") from None
    now = now or now_utc()
    if now >= ca.not_valid_after_utc:
        raise ProvisionError(f"the federation CA expired on {ca.not_valid_after_utc:%Y-%m-%d}; a new federation (and new kits) is needed")
    cert, key = issue_server_cert(ca, ca_key, fed.info.sans, days, now)  # type: ignore[arg-type]
    _write_superlink_cert(fed.dir, ca, cert, key)
    fed.audit.record("superlink.renewed", "anchor", not_after=cert.not_valid_after_utc.isoformat(), sha256=cert_fingerprint(cert))
    return cert


# ---------------------------------------------------------------- the SuperLink
def superlink_argv(fed: Federation | None, bin_dir: Path, host: str, port: int, database: Path | None, simulation: bool = False,
                   superexec_secret: Path | None = None) -> list[str]:
    """`flower-superlink` with TLS from the federation and SuperNode authentication; `fed=None`: insecure (demos only).

    With `superexec_secret`, ServerApps run in process isolation: only an executor holding the same secret
    (`maxfl-superexec`, fl_server.federation.serverapp_policy) may pick them up from the Runtime API, which Flower 1.41 serves
    on the SuperLink's one port (subprocess isolation ignores the secret).
    """
    argv = [str(bin_dir / "flower-superlink")]
    if fed is None:
        argv.append("--insecure")
    else:
        argv += ["--ssl-certfile", str(fed.superlink_cert), "--ssl-keyfile", str(fed.superlink_key), "--ssl-ca-certfile", str(fed.ca_cert)]
        if not simulation:
            argv.append("--enable-supernode-auth")
    argv += ["--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if database is not None:
        argv += ["--database", str(database)]
    if simulation:
        argv.append("--simulation")
    if superexec_secret is not None:
        argv += ["--isolation", "process", "--superexec-auth-secret-file", str(superexec_secret)]
    return argv


def proxy_config(fed: Federation, plants_listen: str, upstream: str | None = None, admin_listen: str | None = None,
                 admin_certs: Sequence[Path] = ()) -> ProxyConfig:
    """The reverse proxy in front of `fed`'s SuperLink: plants' TLS with the SuperLink certificate, upstream over TLS."""
    return ProxyConfig(plants_listen=plants_listen, upstream=upstream or fed.info.control_address, cert=fed.superlink_cert,
                       key=fed.superlink_key, ca=fed.ca_cert, state_dir=fed.dir / PROXY_DIR, admin_listen=admin_listen,
                       admin_certs=tuple(admin_certs))


# ---------------------------------------------------------------- registering with the SuperLink (Control API)
Register = Callable[["Federation", Path, str], int]
Unregister = Callable[["Federation", int], None]


def _flwr(fed: Federation, args: list[str], options: Sequence[str] = (), timeout_s: float = 60.0) -> dict:
    """One `flwr` CLI call against the federation's Control API (FLWR_HOME = D/flwr-home); its JSON answer."""
    argv = [str(Path(sys.executable).parent / "flwr"), *args, fed.info.name, *options, "--format", "json"]
    env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(fed.flwr_home)}
    try:
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise SuperLinkUnreachable(f"the SuperLink's Control API at {fed.info.control_address} did not answer within {timeout_s:.0f}s; "
                                   f"is it running (`maxfl federation superlink --dir {fed.dir}`)?") from None
    answer = _last_json(out.stdout)
    if out.returncode == 0 and answer.get("success"):
        return answer
    message = str(answer.get("error-message") or answer.get("error") or out.stderr.strip() or out.stdout.strip() or f"exit code {out.returncode}")
    message = re.sub(r"^Using SuperLink: .*?\)\s*", "", " ".join(message.split()))
    lowered = message.lower()
    if any(s in lowered for s in ("connect", "unreachable", "refused", "timed out", "timeout", "name or service", "nodename")):
        raise SuperLinkUnreachable(f"the SuperLink's Control API at {fed.info.control_address} is not reachable ({message}); "
                                   f"start it with `maxfl federation superlink --dir {fed.dir}`")
    if any(s in lowered for s in ("certificate", "ssl", "tls")):
        raise SuperLinkUnreachable(f"TLS to the SuperLink's Control API at {fed.info.control_address} failed ({message}); "
                                   f"is that SuperLink running with {fed.superlink_cert}?")
    raise ProvisionError(f"`flwr {' '.join(args[:2])}` failed: {message}")


def _last_json(stdout: str) -> dict:
    for line in reversed([ln.strip() for ln in stdout.splitlines() if ln.strip()]):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    try:  # pretty-printed JSON spread over several lines
        start = stdout.index("{")
        value = json.loads(stdout[start:])
        return value if isinstance(value, dict) else {}
    except ValueError:
        return {}


def flwr_register(fed: Federation, public_key: Path, plant_id: str) -> int:
    """`flwr supernode register KEY <federation> --name PLANT --format json`: the Flower node id."""
    answer = _flwr(fed, ["supernode", "register", str(public_key)], ["--name", plant_id])
    try:
        return int(answer["node-id"])
    except (KeyError, TypeError, ValueError):
        raise ProvisionError(f"`flwr supernode register` answered without a node id: {answer}") from None


def flwr_unregister(fed: Federation, node_id: int) -> None:
    """`flwr supernode unregister NODE_ID <federation> --format json`."""
    _flwr(fed, ["supernode", "unregister", str(node_id)])


# ---------------------------------------------------------------- plants: add, revoke, list
def add_plant(fed: Federation, plant_id: str, public_key: Path, register: Register = flwr_register, unregister: Unregister = flwr_unregister,
              now: datetime | None = None) -> tuple[PlantRecord, Path]:
    """Register the plant's public key with the SuperLink, issue its join kit, record it; other plants untouched.

    Returns the plant's record and its kit folder. Nothing is written unless the SuperLink accepted the key; if
    writing the kit or the record fails after that, the registration is withdrawn again.
    """
    now = now or now_utc()
    if not re.fullmatch(PLANT_ID_PATTERN, plant_id):
        raise ProvisionError(f"plant id {plant_id!r} is not allowed: lower-case letters, digits, '-' and '_', at most 63, "
                             "starting with a letter or digit (e.g. plant-7)")
    try:
        key = load_public_key(public_key)
    except JoinError as exc:
        raise ProvisionError(str(exc)) from None
    fp = key_fingerprint(key)
    ca = load_certificate(fed.ca_cert, "the federation's CA certificate")
    if now >= ca.not_valid_after_utc:
        raise ProvisionError(f"the federation CA expired on {ca.not_valid_after_utc:%Y-%m-%d}; a kit issued now would not work")
    with fed.locked():
        book = fed.plants()
        current = book.plants.get(plant_id)
        if current is not None and current.status == "active":
            raise ProvisionError(f"plant '{plant_id}' is already active (node {current.node_id}, key sha256 {short(current.key_fingerprint)}); "
                                 f"revoke it first (`maxfl federation revoke {plant_id}`) to give it a new key")
        for other in book.plants.values():
            if other.key_fingerprint == fp:
                if other.plant_id != plant_id:
                    raise ProvisionError(f"this key (sha256 {short(fp)}) is already used by plant '{other.plant_id}'; every plant needs its own key "
                                         "(`maxfl plant keygen` at the plant)")
                raise ProvisionError(f"this key (sha256 {short(fp)}) was revoked for '{plant_id}' on {other.revoked_at:%Y-%m-%d}; "
                                     "a revoked key stays revoked -- the plant makes a new one (`maxfl plant keygen`)")
        node_id = register(fed, public_key, plant_id)
        try:
            record = PlantRecord(plant_id=plant_id, key_fingerprint=fp, public_key=public_key.read_text(encoding="utf-8").strip(),
                                 node_id=node_id, status="active", joined_at=now)
            kit = JoinKit(federation=fed.info.name, ca_fingerprint=fed.info.ca_fingerprint, superlink_address=fed.info.superlink_address,
                          plant_id=plant_id, key_fingerprint=fp, node_id=node_id, issued_at=now, ca_not_after=ca.not_valid_after_utc)
            kit_dir = write_kit(fed, kit)
            book.plants[plant_id] = record
            fed.save_plants(book)
        except BaseException:
            _try(lambda: unregister(fed, node_id))
            raise
        fed.audit.record("plant.joined", "anchor", plant=plant_id, node_id=node_id, key_sha256=fp, kit=str(kit_dir),
                         superlink=fed.info.superlink_address)
    return record, kit_dir


def _try(action: Callable[[], object]) -> None:
    try:
        action()
    except Exception:  # noqa: BLE001 - best effort while another error is on its way up
        pass


def revoke_plant(fed: Federation, plant_id: str, unregister: Unregister = flwr_unregister, now: datetime | None = None) -> PlantRecord:
    """Withdraw the plant's key at the SuperLink (a connected SuperNode is dropped within seconds); others untouched."""
    now = now or now_utc()
    with fed.locked():
        book = fed.plants()
        record = book.plants.get(plant_id)
        if record is None:
            known = ", ".join(sorted(book.plants)) or "none yet"
            raise ProvisionError(f"no plant '{plant_id}' in this federation (plants: {known})")
        if record.status == "revoked":
            raise ProvisionError(f"plant '{plant_id}' was already revoked on {record.revoked_at:%Y-%m-%d %H:%M} UTC")
        unregister(fed, record.node_id)
        revoked = record.model_copy(update={"status": "revoked", "revoked_at": now})
        book.plants[plant_id] = revoked
        fed.save_plants(book)
        fed.audit.record("plant.revoked", "anchor", plant=plant_id, node_id=record.node_id, key_sha256=record.key_fingerprint)
    return revoked


def write_kit(fed: Federation, kit: JoinKit) -> Path:
    """D/kits/<plant-id>/ (ca.crt, kit.json, README.md), replaced as a whole: a reader never sees half a kit."""
    target = fed.kit_dir(kit.plant_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{kit.plant_id}.", dir=target.parent))
    try:
        shutil.copyfile(fed.ca_cert, staging / KIT_CA)
        (staging / KIT_FILE).write_text(kit.model_dump_json(indent=2) + "\n", encoding="utf-8")
        (staging / KIT_README).write_text(kit_readme(fed, kit), encoding="utf-8")
        (staging / KIT_README_KO).write_text(kit_readme_ko(fed, kit), encoding="utf-8")
        for f in staging.iterdir():
            os.chmod(f, 0o644)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(staging, 0o755)
        old = None
        if target.exists():
            old = target.with_name(f".{kit.plant_id}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(staging, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def kit_readme(fed: Federation, kit: JoinKit) -> str:
    contact = fed.info.contact or "the anchor's federation team (the people who sent you this kit)"
    ca = load_certificate(fed.ca_cert, "the federation's CA certificate")
    host, port = split_address(kit.superlink_address)
    return f"""# Join kit: {kit.plant_id} in federation `{kit.federation}`

Issued {kit.issued_at:%Y-%m-%d %H:%M} UTC by the anchor of `{kit.federation}`. For the IT person of plant
`{kit.plant_id}`. Nothing in this folder is secret; the plant's private key never leaves the plant and is not
part of it.

## What each file is
| file | what it is |
| --- | --- |
| `ca.crt` | the federation's CA certificate: your SuperNode trusts the anchor's SuperLink only if its certificate was signed by this CA. Fingerprint (SHA-256): `{kit.ca_fingerprint}`; valid until {kit.ca_not_after:%Y-%m-%d}. |
| `kit.json` | connection settings: federation `{kit.federation}`, SuperLink `{kit.superlink_address}`, this plant's id `{kit.plant_id}`, the fingerprint of the public key the anchor registered for you (`{kit.key_fingerprint}`), your node id `{kit.node_id}`. |
| `README.md` | this file (`README.ko.md`: the same in Korean). |

Your private key is the `{PRIVATE_KEY_NAME}` that `maxfl plant keygen` wrote next to the `{PUBLIC_KEY_NAME}` you sent
the anchor. Keep it on this machine, readable only by the account that runs the SuperNode.

## Network
This machine opens one outbound TCP connection (HTTPS) to `{host}` port `{port}`. Nothing needs to reach this
machine from outside.

## The two commands
```
# 1. check everything without starting anything: kit, key, CA, and a real TLS handshake with the SuperLink
maxfl plant join --kit <this folder> --key <path to {PRIVATE_KEY_NAME}> --federation {kit.federation} --check \\
    --node-config 'plant-id="{kit.plant_id}" data-dir="/path/to/your/data" max-epsilon=8.0'

# 2. join: runs the plant's SuperNode (and its ClientApp executor) until Ctrl-C or SIGTERM
maxfl plant join --kit <this folder> --key <path to {PRIVATE_KEY_NAME}> --federation {kit.federation} \\
    --node-config 'plant-id="{kit.plant_id}" data-dir="/path/to/your/data" max-epsilon=8.0'
```
`--node-config` is yours: your data folder, your privacy ceiling (`max-epsilon`), your ledger. The anchor
cannot change it.

## How to check the connection
- `--check` ends with `ok: ... TLS handshake with {kit.superlink_address} verified by the federation CA`.
- `maxfl plant join` prints `connected as node {kit.node_id}` once the SuperLink accepted your key.
- The anchor sees your plant as online in `flwr supernode ls` / `maxfl federation plants`.

If a check fails, the command says what is wrong in one line: a wrong key, a kit for another plant or another
federation, an expired CA, a SuperLink that cannot be reached or presents a certificate this CA did not sign,
or a key the SuperLink does not know (not registered yet, or revoked).

## Whom to contact
{contact}. Quote the federation (`{kit.federation}`), your plant id (`{kit.plant_id}`) and the CA fingerprint
above. The CA ({describe_ca(ca)}) expires on {kit.ca_not_after:%Y-%m-%d}; the anchor sends a new kit before that.
"""


def kit_readme_ko(fed: Federation, kit: JoinKit) -> str:
    """`kit_readme` in Korean: the same commands and flags (tests/fl_server/federation/test_provision.py checks it)."""
    contact = fed.info.contact or "이 키트를 보낸 앵커 기업의 연합 운영팀"
    ca = load_certificate(fed.ca_cert, "the federation's CA certificate")
    host, port = split_address(kit.superlink_address)
    return f"""# 참여 키트: 연합 `{kit.federation}`의 {kit.plant_id}

{kit.issued_at:%Y-%m-%d %H:%M} UTC에 `{kit.federation}`의 앵커 기업이 발급했습니다. 플랜트 `{kit.plant_id}`의 IT 담당자를 위한
안내입니다. 이 폴더에는 비밀 정보가 없습니다. 플랜트의 개인키는 플랜트를 떠나지 않으며 이 키트에 포함되지 않습니다.
(English: `README.md`)

## 파일 설명
| 파일 | 내용 |
| --- | --- |
| `ca.crt` | 연합의 CA 인증서: 이 CA가 서명한 인증서를 가진 앵커 SuperLink만 SuperNode가 신뢰합니다. 지문(SHA-256): `{kit.ca_fingerprint}`; {kit.ca_not_after:%Y-%m-%d}까지 유효. |
| `kit.json` | 접속 설정: 연합 `{kit.federation}`, SuperLink `{kit.superlink_address}`, 플랜트 id `{kit.plant_id}`, 앵커가 등록한 공개키의 지문(`{kit.key_fingerprint}`), 노드 id `{kit.node_id}`. |
| `README.md` / `README.ko.md` | 이 안내 (영어 / 한국어). |

개인키는 `maxfl plant keygen`이 앵커에 보낸 `{PUBLIC_KEY_NAME}` 옆에 만든 `{PRIVATE_KEY_NAME}`입니다. 이 컴퓨터에 두고, SuperNode를
실행하는 계정만 읽을 수 있게 하세요.

## 네트워크
이 컴퓨터는 `{host}`의 `{port}` 포트로 나가는 TCP 연결(HTTPS) 하나만 엽니다. 외부에서 이 컴퓨터로 들어오는 연결은 필요 없습니다.

## 두 가지 명령
```
# 1. 아무것도 실행하지 않고 점검: 키트, 키, CA, 그리고 SuperLink와의 실제 TLS 핸드셰이크
maxfl plant join --kit <이 폴더> --key <{PRIVATE_KEY_NAME} 경로> --federation {kit.federation} --check \\
    --node-config 'plant-id="{kit.plant_id}" data-dir="/path/to/your/data" max-epsilon=8.0'

# 2. 참여: Ctrl-C 또는 SIGTERM까지 플랜트의 SuperNode(와 ClientApp 실행기)를 실행
maxfl plant join --kit <이 폴더> --key <{PRIVATE_KEY_NAME} 경로> --federation {kit.federation} \\
    --node-config 'plant-id="{kit.plant_id}" data-dir="/path/to/your/data" max-epsilon=8.0'
```
`--node-config`는 플랜트의 것입니다: 데이터 폴더, 프라이버시 한도(`max-epsilon`), 원장(ledger). 앵커는 이것을 바꿀 수 없습니다.

## 연결 확인
- `--check`는 `ok: ... TLS handshake with {kit.superlink_address} verified by the federation CA`로 끝납니다.
- SuperLink가 키를 받아들이면 `maxfl plant join`이 `connected as node {kit.node_id}`를 출력합니다.
- 앵커는 `flwr supernode ls` / `maxfl federation plants`에서 이 플랜트를 온라인으로 봅니다.

점검이 실패하면 무엇이 잘못되었는지 한 줄로 알려 줍니다: 잘못된 키, 다른 플랜트나 다른 연합의 키트, 만료된 CA, 연결할 수 없거나 이
CA가 서명하지 않은 인증서를 제시하는 SuperLink, 또는 SuperLink가 모르는 키(아직 등록되지 않았거나 해지됨).

## 문의처
{contact}. 연합(`{kit.federation}`), 플랜트 id(`{kit.plant_id}`), 위의 CA 지문을 알려 주세요. CA({describe_ca(ca)})는
{kit.ca_not_after:%Y-%m-%d}에 만료되며, 앵커가 그 전에 새 키트를 보냅니다.
"""


# ---------------------------------------------------------------- expiry
@dataclass(frozen=True)
class CertExpiry:
    what: str
    path: Path
    subject: str
    not_after: datetime
    days_left: int  # whole days, truncated toward zero (negative: days since it expired)
    expired: bool


def expiry(fed: Federation, now: datetime | None = None) -> list[CertExpiry]:
    """Every certificate the federation depends on -- CA, SuperLink, the CA copy in each kit -- soonest first."""
    now = now or now_utc()
    found: list[tuple[str, Path]] = [("CA", fed.ca_cert), ("SuperLink", fed.superlink_cert)]
    kits = fed.dir / KITS
    if kits.is_dir():
        found += [(f"kit {d.name} CA", d / KIT_CA) for d in sorted(kits.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    rows = []
    for what, path in found:
        try:
            cert = load_certificate(path, f"{what} certificate")
        except JoinError as exc:
            raise ProvisionError(str(exc)) from None
        left = cert.not_valid_after_utc - now
        rows.append(CertExpiry(what, path, describe_subject(cert), cert.not_valid_after_utc, int(left.total_seconds() / 86400), left.total_seconds() <= 0))
    return sorted(rows, key=lambda r: (r.not_after, r.what))


def describe_subject(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.subject.rfc4514_string()
