"""How many HTTP requests a round costs, by endpoint, at the SuperLink and at the plants' SuperNodes.

On a 2-core machine a deployed round is CPU-bound (experiments/round_overhead.py), and nearly all of that CPU is Flower's
per-request path: FastAPI/Starlette middleware in the SuperLink and in each SuperNode's Runtime API. This counts the
requests each of them serves, so a change to maxfl's waits and exchanges can be judged by what it removes.

Every SuperLink and SuperNode process of the federation loads a `sitecustomize` (put first on PYTHONPATH) that records
the path of each HTTP request its Starlette app receives, and writes them out every second and at exit. Rounds are told
apart by the ServerApp's `runtime/push-messages` (one per exchange); the first two rounds (data query, warm-up) and the
final evaluation exchange are left out.

    .venv/bin/python experiments/request_census.py --plants 5 --rounds 8

Prints a table; writes experiments/results/request-census.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

from launcher.federation import FederationSettings, LocalFederation, find_app_dir
from provenance import write_result

RESULTS = Path(__file__).parent / "results" / "request-census.json"

RECORDER = textwrap.dedent('''
    import atexit, json, os, sys, threading, time
    _argv = " ".join(sys.argv)
    _kind = "superlink" if "flower-superlink" in _argv else "supernode" if "supernode" in _argv else None
    if _kind is not None:
        _seen = []
        try:
            import starlette.applications as _apps
        except ImportError:
            _apps = None
        if _apps is not None:
            _call = _apps.Starlette.__call__

            async def _counted(self, scope, receive, send):
                if scope.get("type") == "http":
                    _seen.append((time.time(), scope.get("path")))
                return await _call(self, scope, receive, send)

            _apps.Starlette.__call__ = _counted

            def _dump():
                path = os.path.join(os.environ["MAXFL_CENSUS_DIR"], f"{_kind}-{os.getpid()}.json")
                with open(path + ".tmp", "w") as f:
                    json.dump(_seen, f)
                os.replace(path + ".tmp", path)

            def _every_second():
                while True:
                    time.sleep(1)
                    _dump()

            threading.Thread(target=_every_second, daemon=True).start()
            atexit.register(_dump)
''')


def per_round(records: list[tuple[float, str]], bounds: list[float]) -> dict[str, float]:
    """Requests per round by path, between the first and the last of `bounds` (round starts)."""
    counts = collections.Counter(path for when, path in records if bounds[0] <= when < bounds[-1])
    rounds = len(bounds) - 1
    return {path: round(n / rounds, 1) for path, n in counts.most_common()}


def measure(plants: int, rounds: int, workdir: Path, census: Path) -> dict[str, object]:
    settings = FederationSettings(app_dir=find_app_dir(), workdir=workdir, plants=plants,
                                  run_overrides={"num-server-rounds": rounds, "min-plants": min(plants, 2), "contribution": "off"})
    with LocalFederation(settings, echo=lambda line: None) as fed:
        fed.submit_run()
    superlinks = [json.loads(p.read_text()) for p in census.glob("superlink-*.json")]
    nodes = [json.loads(p.read_text()) for p in census.glob("supernode-*.json")]
    superlink = max(superlinks, key=len)
    # One push per exchange: the data query, rounds 1..N (evaluation rides on the next train message), the final evaluation.
    pushes = sorted(when for when, path in superlink if path == "/v1/runtime/push-messages")
    bounds = pushes[3:rounds + 1]  # rounds 3 .. N-1: steady state
    if len(bounds) < 2:
        raise SystemExit(f"only {len(pushes)} exchanges were seen; run more rounds")
    wall = (bounds[-1] - bounds[0]) / (len(bounds) - 1)
    at_nodes: collections.Counter[str] = collections.Counter()
    for records in nodes:
        at_nodes.update(per_round(records, bounds))
    return {"plants": plants, "rounds_counted": len(bounds) - 1, "round_wall_s": round(wall, 2),
            "superlink_per_round": per_round(superlink, bounds),
            "supernodes_per_round_all_plants": dict(at_nodes.most_common())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plants", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path(".maxfl-bench/census"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        site, census = Path(tmp) / "site", Path(tmp) / "census"
        site.mkdir()
        census.mkdir()
        (site / "sitecustomize.py").write_text(RECORDER)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
        os.environ["MAXFL_CENSUS_DIR"] = str(census)
        row = measure(args.plants, args.rounds, args.workdir, census)
    for where in ("superlink_per_round", "supernodes_per_round_all_plants"):
        table = row[where]
        assert isinstance(table, dict)
        print(f"{where} ({row['plants']} plants, round {row['round_wall_s']} s): {sum(table.values()):.0f} requests")
        for path, n in table.items():
            print(f"  {n:7.1f}  {path}")
    write_result(args.out, {"cpus": os.cpu_count(), "row": row})


if __name__ == "__main__":
    sys.exit(main())
