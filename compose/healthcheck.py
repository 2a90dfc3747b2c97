#!/usr/bin/env python3
"""`maxfl-healthcheck URL`: the containers' HEALTHCHECK probe (stdlib only; grpcio for grpc://).

    maxfl-healthcheck http://127.0.0.1:5000/health                         MLflow
    maxfl-healthcheck https://superlink:9092/health --cafile /federation/ca.crt   the SuperLink, TLS verified
    maxfl-healthcheck http://127.0.0.1:8600/health --accept 503            an edge server (503: no model yet)
    maxfl-healthcheck grpc://127.0.0.1:9095                                gRPC health service (flower-superexec)

Exit 0 when the service answers as expected, 1 otherwise, with one line on stderr saying why
(Docker shows it in `docker inspect --format '{{json .State.Health}}' CONTAINER`).
"""

from __future__ import annotations

import argparse
import ssl
import sys
import urllib.error
import urllib.request


def check_http(url: str, accept: set[int], cafile: str | None, timeout_s: float) -> str | None:
    """None when `url` answers 2xx (or a status in `accept`); else why not."""
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https://") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as reply:  # noqa: S310 - http(s) only, checked in main
            return None if 200 <= reply.status < 300 or reply.status in accept else f"{url} answered {reply.status}"
    except urllib.error.HTTPError as exc:
        return None if exc.code in accept else f"{url} answered {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{url} did not answer ({reason})"


def check_grpc(target: str, timeout_s: float) -> str | None:
    """None when the gRPC health service at host:port says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            return f"grpc://{target} did not answer ({exc.code().name})"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"grpc://{target} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maxfl-healthcheck", description=__doc__.splitlines()[0])
    p.add_argument("url", help="http://, https:// or grpc://host:port")
    p.add_argument("--cafile", default=None, help="CA certificate that must have signed an https server's certificate")
    p.add_argument("--accept", type=int, action="append", default=[], help="another HTTP status that counts as healthy (repeatable)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.url.startswith("grpc://"):
        problem = check_grpc(args.url.removeprefix("grpc://"), args.timeout)
    elif args.url.startswith(("http://", "https://")):
        problem = check_http(args.url, set(args.accept), args.cafile, args.timeout)
    else:
        problem = f"{args.url}: only http://, https:// and grpc:// are probed"
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
