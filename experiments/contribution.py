"""Does contribution per plant mean something? Five plants whose roles are known, a real local federation per seed and arm.

The plants (table task; rows from the demo's generator, tasks.table.demo.quality_table; each plant its own folder):
- large: 600 rows of process profile 0; small: 90 rows of the same profile          -> (c) large earns more than small
- twin-a, twin-b: the same 300 rows of profile 1, byte-identical copies              -> (b) the twins earn about the same
- shuffled: 300 rows of profile 2 with the defect labels permuted                     -> (a) shuffled earns about 0 or less
Every seed draws new rows. Each run: `maxfl federate` as a user runs it with --data (MLflow, SuperLink, one SuperNode per
plant; plain HTTP on loopback, to start faster), 3 rounds, release off; arms: DP-SGD at the default epsilon 3, and no DP.
The values are the ServerApp's own contribution report (exact Shapley + leave-one-out of the gate's macro-F1, summed over
rounds) read back from MLflow; the cost is its wall time against the run's own federated evaluation (round_eval_wall_s).

    .venv/bin/python experiments/contribution.py --seeds 42,43,44

Prints a table and writes experiments/results/contribution.json (provenance: experiments/provenance.write_result).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from provenance import write_result

from fl_server.run.contribution_view import load_report
from launcher.federation import FederationSettings, LocalFederation, find_app_dir
from maxfl.atomic import atomic_path, atomic_write_text
from tasks.manifest import MANIFEST_FILE, Manifest, dump_manifest
from tasks.table.demo import COLUMNS, TARGET, quality_table

RESULTS = Path(__file__).parent / "results" / "contribution.json"
PLANTS = ("large", "small", "twin-a", "twin-b", "shuffled")
ARMS: dict[str, dict[str, Any]] = {"dp": {}, "nodp": {"privacy": "none"}}


def write_plant(folder: Path, frame: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "quality.csv") as tmp:
        frame.to_csv(tmp, index=False)
    atomic_write_text(folder / MANIFEST_FILE, dump_manifest(Manifest(kind="table", path="quality.csv", target=TARGET, columns=COLUMNS)))  # type: ignore[arg-type]
    return folder


def make_plants(root: Path, seed: int, large: int, small: int, twin: int, shuffled: int) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    twins = quality_table(1, twin, rng)
    noise = quality_table(2, shuffled, rng)
    noise[TARGET] = rng.permutation(noise[TARGET].to_numpy())
    return {
        "large": write_plant(root / "large", quality_table(0, large, rng)),
        "small": write_plant(root / "small", quality_table(0, small, rng)),
        "twin-a": write_plant(root / "twin-a", twins),
        "twin-b": write_plant(root / "twin-b", twins),
        "shuffled": write_plant(root / "shuffled", noise),
    }


def one_run(args: argparse.Namespace, seed: int, arm: str) -> dict[str, Any]:
    work = args.workdir / f"seed-{seed}-{arm}"
    data = make_plants(work / "data", seed, args.large, args.small, args.twin, args.shuffled)
    overrides = {"task": "table", "num-server-rounds": args.rounds, "release": False, "seed": seed, **ARMS[arm]}
    settings = FederationSettings(app_dir=find_app_dir(), workdir=work / "federation", data=data, plants=len(data), insecure=True,
                                  max_epsilon=math.inf if arm == "nodp" else 10.0, run_overrides=overrides)
    started = time.perf_counter()
    with LocalFederation(settings, echo=lambda line: print(f"  {line}", flush=True) if "contribution" in line else None) as federation:
        result = federation.submit_run()
        report = load_report(result.tracking_uri, result.mlflow_run_id)
    if report is None:
        raise RuntimeError(f"seed {seed} {arm}: the run logged no contribution report")
    rows = {p.plant: p for p in report.plants}
    shapley = {p: rows[p].shapley for p in PLANTS}
    gain = report.utility_gain
    twins = (shapley["twin-a"], shapley["twin-b"])
    return {
        "seed": seed, "arm": arm, "mlflow_run": result.mlflow_run_id, "run_s": time.perf_counter() - started,
        "shapley": shapley, "loo": {p: rows[p].loo for p in PLANTS}, "share": {p: rows[p].share for p in PLANTS},
        "utility_gain": gain, "method": report.method, "rounds": [{"round": r.round, "status": r.status, "gain": r.gain} for r in report.rounds],
        "checks": {
            "a_shuffled_lowest": shapley["shuffled"] == min(shapley.values()),
            "a_shuffled_negative": shapley["shuffled"] < 0,
            "a_shuffled_share": rows["shuffled"].share,
            "b_twin_gap": abs(twins[0] - twins[1]),
            # the twins' difference against the spread of all five values (0: equal; 1: as far apart as the extremes)
            "b_twin_gap_over_spread": abs(twins[0] - twins[1]) / (max(shapley.values()) - min(shapley.values())),
            "c_large_minus_small": shapley["large"] - shapley["small"],
        },
        "cost": {"cost_s": report.cost_s, "eval_s": report.eval_s, "ratio": report.cost_ratio, "models_evaluated": report.models_evaluated,
                 "exchanges": report.exchanges},
        "notes": report.notes,
    }


def stat(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        out[arm] = {
            "shapley": {p: stat([r["shapley"][p] for r in mine]) for p in PLANTS},
            "loo": {p: stat([r["loo"][p] for r in mine]) for p in PLANTS},
            "share": {p: stat([r["share"][p] for r in mine]) for p in PLANTS},
            "a_shuffled_lowest": f"{sum(r['checks']['a_shuffled_lowest'] for r in mine)}/{len(mine)}",
            "a_shuffled_negative": f"{sum(r['checks']['a_shuffled_negative'] for r in mine)}/{len(mine)}",
            "b_twin_gap": stat([r["checks"]["b_twin_gap"] for r in mine]),
            "b_twin_gap_over_spread": stat([r["checks"]["b_twin_gap_over_spread"] for r in mine]),
            "c_large_over_small": f"{sum(r['checks']['c_large_minus_small'] > 0 for r in mine)}/{len(mine)}",
            "cost_ratio": stat([r["cost"]["ratio"] for r in mine if r["cost"]["ratio"] is not None]),
            "cost_s": stat([r["cost"]["cost_s"] for r in mine]),
            "eval_s": stat([r["cost"]["eval_s"] for r in mine]),
        }
    return out


def table(runs: list[dict[str, Any]]) -> str:
    head = "| arm | seed | " + " | ".join(PLANTS) + " | gain | twin gap / spread | cost s | eval s | ratio |"
    lines = [head, "|" + "---|" * (len(PLANTS) + 8)]
    for r in runs:
        c = r["cost"]
        lines.append(f"| {r['arm']} | {r['seed']} | " + " | ".join(f"{r['shapley'][p]:+.3f}" for p in PLANTS)
                     + f" | {r['utility_gain']:+.3f} | {r['checks']['b_twin_gap_over_spread']:.2f} | {c['cost_s']:.1f} | {c['eval_s']:.1f} | "
                     + f"{'-' if c['ratio'] is None else format(c['ratio'], '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--arms", default="dp,nodp", help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--large", type=int, default=600)
    parser.add_argument("--small", type=int, default=90)
    parser.add_argument("--twin", type=int, default=300)
    parser.add_argument("--shuffled", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=Path(".maxfl-bench") / "contribution")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    runs = []
    for arm in args.arms.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            print(f"seed {seed}, arm {arm}", flush=True)
            runs.append(one_run(args, seed, arm))
            print(table(runs[-1:]).splitlines()[-1], flush=True)
    print(table(runs))
    recorded = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("workdir", "out")}
    write_result(args.out, {"args": recorded, "plants": {
        "large": f"{args.large} rows of profile 0", "small": f"{args.small} rows of profile 0", "twin-a": f"{args.twin} rows of profile 1",
        "twin-b": "a byte-identical copy of twin-a", "shuffled": f"{args.shuffled} rows of profile 2, defect labels permuted"},
        "summary": summary(runs), "runs": runs})


if __name__ == "__main__":
    main(sys.argv[1:])
