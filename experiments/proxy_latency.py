"""What the reverse proxy in front of the SuperLink costs: round wall time with and without it, and per request.

One secure local federation (TLS + SuperNode authentication). Its plants train through the proxy (the default
topology), or restarted pointed at the SuperLink's own loopback port (the proxy bypassed), in ABBA order,
`--pairs` times; each run logs `round_wall_s` and `round_overhead_s` per round to MLflow (the first round of
each run, which warms the executors, is left out). Per request: `GET /health` over one kept-alive TLS
connection, through the proxy and straight to the SuperLink.

    .venv/bin/python experiments/proxy_latency.py --plants 2 --rounds 3 --pairs 2

Prints a table; writes experiments/results/proxy_latency.json. Not a test: numbers, no assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from maxfl.atomic import atomic_write_text
from launcher.federation import FederationSettings, LocalFederation, find_app_dir

RESULTS = Path(__file__).parent / "results" / "proxy_latency.json"


def _round_metrics(fed: LocalFederation, mlflow_run_id: str) -> dict[str, list[float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(fed.tracking_uri)
    return {key: [m.value for m in sorted(client.get_metric_history(mlflow_run_id, key), key=lambda m: m.step)]
            for key in ("round_wall_s", "round_overhead_s")}


def _app_snapshot(dest: Path) -> Path:
    """The app as `flwr run` ships it now: edits to the working tree while this runs must not change the FAB's hash."""
    import io
    import zipfile

    from maxfl.fab import build_fab

    fab, _, _ = build_fab(find_app_dir())
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        archive.extractall(dest, [n for n in archive.namelist() if not n.startswith(".info/")])
    return dest


def _per_request_ms(address: str, ca: Path, n: int) -> float:
    tls = ssl.create_default_context(cafile=str(ca))
    with httpx.Client(verify=tls, timeout=10) as client:
        client.get(f"https://{address}/health")  # the handshake, outside the timing
        times = []
        for _ in range(n):
            started = time.perf_counter()
            client.get(f"https://{address}/health").raise_for_status()
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plants", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, list[float]]]] = {"proxy": [], "direct": []}
    with tempfile.TemporaryDirectory(prefix="proxy-latency-") as tmp:
        os.environ["MAXFL_HOME"] = str(Path(tmp) / "home")  # fresh ledgers: the anchor's record of spends starts fresh too
        settings = FederationSettings(app_dir=_app_snapshot(Path(tmp) / "app"), workdir=Path(tmp) / "work", plants=args.plants, examples_per_plant=80,
                                      run_overrides={"num-server-rounds": args.rounds, "release": False})
        with LocalFederation(settings, echo=lambda _line: None) as fed:
            assert fed.federation is not None
            per_request = {"proxy": _per_request_ms(fed.plants_address, fed.federation.ca_cert, args.requests),
                           "direct": _per_request_ms(fed.superlink, fed.federation.ca_cert, args.requests)}
            order = [("proxy", fed.plants_address), ("direct", fed.superlink)]
            for pair in range(args.pairs):
                for path, address in order if pair % 2 == 0 else order[::-1]:
                    for plant in fed.plants:
                        fed.stop_plant(plant.plant_id)
                    fed.start_plants(address, fed.plants)
                    result = fed.submit_run()
                    metrics = _round_metrics(fed, result.mlflow_run_id)
                    runs[path].append({k: v[1:] for k, v in metrics.items()})
    summary = {}
    for path, found in runs.items():
        walls = [w for r in found for w in r["round_wall_s"]]
        overheads = [o for r in found for o in r["round_overhead_s"]]
        summary[path] = {"rounds": len(walls), "round_wall_s_median": statistics.median(walls), "round_wall_s_mean": statistics.mean(walls),
                         "round_overhead_s_median": statistics.median(overheads), "health_request_ms_median": per_request[path]}
    summary["added_by_proxy"] = {
        "round_wall_s_median": summary["proxy"]["round_wall_s_median"] - summary["direct"]["round_wall_s_median"],
        "round_overhead_s_median": summary["proxy"]["round_overhead_s_median"] - summary["direct"]["round_overhead_s_median"],
        "health_request_ms_median": per_request["proxy"] - per_request["direct"],
    }
    out = {"plants": args.plants, "rounds_per_run": args.rounds, "pairs": args.pairs, "summary": summary, "runs": runs}
    atomic_write_text(RESULTS, json.dumps(out, indent=2) + "\n")
    print(f"{'path':8} {'rounds':>6} {'wall s (median)':>16} {'overhead s (median)':>20} {'GET /health ms':>15}")
    for path in ("proxy", "direct"):
        s = summary[path]
        print(f"{path:8} {s['rounds']:>6} {s['round_wall_s_median']:>16.3f} {s['round_overhead_s_median']:>20.3f} {s['health_request_ms_median']:>15.2f}")
    added = summary["added_by_proxy"]
    print(f"added by the proxy: {added['round_wall_s_median']:+.3f} s per round (wall, median), "
          f"{added['round_overhead_s_median']:+.3f} s (overhead), {added['health_request_ms_median']:+.2f} ms per request")
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
