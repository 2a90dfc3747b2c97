"""What the fp16 update encoding costs in model quality, and what it saves on the wire.

For each task, one local federation (real SuperNodes) runs the same training with `update-encoding` fp32 and
fp16, same seeds, without DP (so the only difference between the arms is the encoding, not the noise), and
reads from MLflow the final federated metric and the bytes each plant's update took per round.

    .venv/bin/python experiments/update_encoding.py --tasks defect,process --seeds 42,43 --rounds 5

Prints a table; writes experiments/results/update-encoding.json.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from launcher.federation import FederationSettings, LocalFederation, find_app_dir
from provenance import write_result

RESULTS = Path(__file__).parent / "results" / "update-encoding.json"
METRIC = {"defect": "eval_macro_f1", "process": "eval_detection_at_5pct_false_alarms"}


def _final(client, run_id: str, key: str) -> float:  # type: ignore[no-untyped-def]
    return max(client.get_metric_history(run_id, key), key=lambda m: m.step).value


def _update_ratio(client, run_id: str) -> float:  # type: ignore[no-untyped-def]
    """The largest update any plant sent in any round, over the model's fp32 size."""
    metrics = client.get_run(run_id).data.metrics
    sizes = [m.value for k in metrics if k.endswith("/update_bytes") for m in client.get_metric_history(run_id, k)]
    return max(sizes) / _final(client, run_id, "model_bytes")


def run_task(task: str, workdir: Path, plants: int, rounds: int, seeds: list[int]) -> list[dict[str, object]]:
    from mlflow import MlflowClient

    settings = FederationSettings(app_dir=find_app_dir(), workdir=workdir / task, plants=plants, max_epsilon=float("inf"),
                                  run_overrides={"task": task, "privacy": "none", "release": False, "num-server-rounds": rounds,
                                                 "contribution": "off"})
    rows = []
    with LocalFederation(settings, echo=lambda _line: None) as fed:
        client = MlflowClient(fed.tracking_uri)
        for seed in seeds:
            for encoding in ("fp32", "fp16"):
                result = fed.submit_run({"seed": seed, "update-encoding": encoding, "experiment-name": f"encoding-{task}"})
                row = {"task": task, "seed": seed, "encoding": encoding, "metric": METRIC[task],
                       "value": _final(client, result.mlflow_run_id, METRIC[task]),
                       "update_over_fp32": _update_ratio(client, result.mlflow_run_id), "mlflow_run_id": result.mlflow_run_id}
                rows.append(row)
                print(f"{task:8} seed {seed} {encoding}: {row['metric']} {row['value']:.4f}, update {row['update_over_fp32']:.3f} x fp32", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="defect,process")
    parser.add_argument("--seeds", default="42,43")
    parser.add_argument("--plants", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path(".maxfl-bench/encoding"))
    parser.add_argument("--commit", default="", help="the commit a copy of the tree (no .git) was made from")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [r for task in args.tasks.split(",") for r in run_task(task, args.workdir, args.plants, args.rounds, seeds)]
    summary = []
    print(f"\n{'task':8} {'metric':38} {'fp32':>8} {'fp16':>8} {'fp16 - fp32':>12} {'fp16 bytes':>11}")
    for task in args.tasks.split(","):
        by = {e: [r for r in rows if r["task"] == task and r["encoding"] == e] for e in ("fp32", "fp16")}
        diffs = [float(b["value"]) - float(a["value"]) for a, b in zip(by["fp32"], by["fp16"], strict=True)]
        line = {"task": task, "metric": METRIC[task], "fp32_mean": statistics.mean(float(r["value"]) for r in by["fp32"]),
                "fp16_mean": statistics.mean(float(r["value"]) for r in by["fp16"]), "paired_diff_mean": statistics.mean(diffs),
                "paired_diff_max_abs": max(abs(d) for d in diffs), "fp16_update_over_fp32": max(float(r["update_over_fp32"]) for r in by["fp16"]),
                "fp32_update_over_fp32": max(float(r["update_over_fp32"]) for r in by["fp32"])}
        summary.append(line)
        print(f"{task:8} {METRIC[task]:38} {line['fp32_mean']:>8.4f} {line['fp16_mean']:>8.4f} {line['paired_diff_mean']:>+12.4f}"
              f" {line['fp16_update_over_fp32']:>10.3f}x")
    write_result(args.out, {"plants": args.plants, "rounds": args.rounds, "seeds": seeds,
                            "privacy": "none (the arms differ in the encoding only)", "summary": summary, "runs": rows}, args.commit)


if __name__ == "__main__":
    main()
