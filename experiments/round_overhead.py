"""Round overhead and peak memory of the local federation in deployment mode.

Overhead of a round = wall time of its train and eval phases minus the slowest plant's own training
and evaluation time (both logged per round to MLflow by the ServerApp). Peak memory = the highest sum
of RSS over every process of the federation (MLflow, SuperLink, ServerApp, SuperNodes, ClientApps).

    .venv/bin/python experiments/round_overhead.py --plants 3 --rounds 4

Compares Flower's defaults (a new ClientApp process per message, 3 s polling) with maxfl's warm
executors and LAN-sized polling. Prints a table; writes experiments/results/round_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

from maxfl.atomic import atomic_write_text
from maxfl.local.federation import FederationSettings, LocalFederation, find_app_dir
from maxfl.local.processes import descendants

RESULTS = Path(__file__).parent / "results" / "round_overhead.json"


class RssSampler(threading.Thread):
    """Sums VmRSS over this process's descendants every `period_s`; keeps the peak."""

    def __init__(self, period_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period_s, self.peak_bytes, self._halt = period_s, 0, threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.period_s):
            total = 0
            for pid in descendants(os.getpid()):
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
                except OSError:
                    continue
            self.peak_bytes = max(self.peak_bytes, total)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def measure(name: str, workdir: Path, plants: int, rounds: int, warm: bool, poll_s: float) -> dict[str, object]:
    from mlflow.tracking import MlflowClient

    settings = FederationSettings(
        app_dir=find_app_dir(), workdir=workdir, plants=plants, warm=warm,
        run_overrides={"num-server-rounds": rounds, "poll-interval-s": poll_s, "min-plants": min(plants, 2)},
    )
    sampler = RssSampler()
    sampler.start()
    started = time.perf_counter()
    result = LocalFederation(settings, echo=lambda _line: None).run()
    total_s = time.perf_counter() - started
    sampler.stop()
    # The federation (MLflow server included) is stopped by now: read its store directly.
    client = MlflowClient(f"sqlite:///{workdir.resolve() / 'mlflow' / 'mlflow.db'}")
    per_round = []
    for step in range(1, rounds + 1):
        row = {}
        for key in ("round_train_overhead_s", "round_eval_overhead_s", "round_train_wall_s", "round_eval_wall_s"):
            values = [m.value for m in client.get_metric_history(result.mlflow_run_id, key) if m.step == step]
            row[key] = values[0]
        per_round.append(row)
    overheads = [r["round_train_overhead_s"] + r["round_eval_overhead_s"] for r in per_round]
    return {
        "setup": name, "plants": plants, "rounds": rounds, "warm_executors": warm, "server_poll_s": poll_s,
        "overhead_per_round_s_median": statistics.median(overheads),
        "overhead_per_round_s_max": max(overheads),
        "overhead_per_round_s_after_first_median": statistics.median(overheads[1:]) if rounds > 1 else None,
        "wall_per_round_s_median": statistics.median(r["round_train_wall_s"] + r["round_eval_wall_s"] for r in per_round),
        "peak_rss_mib": sampler.peak_bytes / 2**20,
        "total_s": total_s, "per_round": per_round, "mlflow_run_id": result.mlflow_run_id,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plants", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=Path(".maxfl-bench"))
    args = parser.parse_args()
    rows = [
        measure("flower defaults", args.workdir / "defaults", args.plants, args.rounds, warm=False, poll_s=3.0),
        measure("maxfl warm + LAN polling", args.workdir / "warm", args.plants, args.rounds, warm=True, poll_s=0.1),
    ]
    print(f"{'setup':<28} {'overhead/round median':>22} {'max':>7} {'wall/round':>11} {'peak RSS':>10}")
    for r in rows:
        print(f"{r['setup']:<28} {r['overhead_per_round_s_median']:>20.2f} s {r['overhead_per_round_s_max']:>5.1f} s"
              f" {r['wall_per_round_s_median']:>9.1f} s {r['peak_rss_mib']:>6.0f} MiB")
    atomic_write_text(RESULTS, json.dumps({"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}, indent=2))
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
