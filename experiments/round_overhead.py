"""Round overhead and peak memory of the local federation in deployment mode.

Overhead of a round = its wall time (first train message out to the round's last reply aggregated and logged)
minus the slowest plant's local training time; the ServerApp logs both per round to MLflow. The phase
columns split it: each phase's wall time minus the slowest plant's own work in that phase. With maxfl's default
`evaluate-with-train`, a round is one exchange whose train message also has the plants evaluate the previous
round's model; the final round adds the final model's evaluation exchange: the mean over rounds counts it. Peak memory = the highest sum
of RSS over every process of the federation (MLflow, SuperLink, ServerApp, SuperNodes, ClientApps).

    .venv/bin/python experiments/round_overhead.py --plants 5 --rounds 4

Compares Flower's defaults (a new ClientApp process per message, 3 s polling, an evaluation exchange after every
training exchange) with maxfl's defaults (resident task processes, LAN-sized polling, evaluation with the next train
message), side by side in one run. Also: each plant's memory at rest (its
SuperNode and executor, PSS, before the run) and the bytes of its update per round against the model's fp32
size. Prints a table; writes experiments/results/round_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

from launcher.federation import FederationSettings, LocalFederation, find_app_dir
from launcher.processes import descendants
from provenance import write_result

RESULTS = Path(__file__).parent / "results" / "round_overhead.json"


def _kib(path: Path, field: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


class MemorySampler(threading.Thread):
    """Every `period_s`, sums RSS and PSS over this process's descendants; keeps the peaks.

    RSS counts a page once per process that maps it (forked ClientApps share torch's pages with their
    executor), PSS splits shared pages between them: the sum of PSS is the memory really in use.
    """

    def __init__(self, period_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period_s, self.peak_rss, self.peak_pss, self._halt = period_s, 0, 0, threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.period_s):
            rss = pss = 0
            for pid in descendants(os.getpid()):
                try:
                    rss += _kib(Path(f"/proc/{pid}/status"), "VmRSS:")
                    pss += _kib(Path(f"/proc/{pid}/smaps_rollup"), "Pss:")
                except OSError:
                    continue
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss * 1024), max(self.peak_pss, pss * 1024)

    def stop(self) -> None:
        self._halt.set()
        self.join()


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_kind(pid: int, plants: list[str]) -> str:
    """A federation process by what it is: the program Flower or maxfl runs (plants' processes pooled)."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return "?"
    if argv and Path(argv[0]).name.startswith("python") and len(argv) > 1:
        argv = argv[1:]
    program = Path(argv[0]).name if argv else "?"
    if program == "-m" and len(argv) > 1:
        program = argv[1]
    if program == "maxfl" and len(argv) > 1:
        program = f"maxfl {argv[1]}"
    pooled = " (all plants)" if any(p in " ".join(argv) for p in plants) else ""
    return program + pooled


def cpu_seconds(plants: list[str]) -> dict[int, tuple[str, float]]:
    """Every descendant's CPU time so far (user + system), with its kind."""
    out = {}
    for pid in descendants(os.getpid()):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (process_kind(pid, plants), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return out


def cpu_per_round(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], rounds: int) -> dict[str, float]:
    """CPU seconds per round by kind of process between two snapshots; processes that ended in between are not counted."""
    spent: dict[str, float] = {}
    for pid, (kind, cpu) in after.items():
        spent[kind] = spent.get(kind, 0.0) + (cpu - before.get(pid, (kind, 0.0))[1]) / rounds
    return dict(sorted(((k, round(v, 3)) for k, v in spent.items() if v >= 0.005), key=lambda kv: -kv[1]))


def _pss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += _kib(Path(f"/proc/{pid}/smaps_rollup"), "Pss:")
        except OSError:
            continue
    return total / 1024


def plant_pss_mib(fed: LocalFederation) -> dict[str, float]:
    """Each plant's SuperNode and executor (with whatever they forked), PSS in MiB."""
    out: dict[str, float] = {}
    for plant in fed.s.plant_ids:
        roots = [m.popen.pid for m in fed.procs.procs if m.name in (f"supernode-{plant}", f"warm-exec-{plant}")]
        out[plant] = _pss_mib(roots + [d for r in roots for d in descendants(r)])
    return out


def _round_metrics(client, run_id: str, rounds: int) -> list[dict[str, float]]:  # type: ignore[no-untyped-def]
    per_round = []
    for step in range(1, rounds + 1):
        row = {}
        for key in ("round_overhead_s", "round_wall_s", "round_train_overhead_s", "round_eval_overhead_s", "model_bytes"):
            # a round whose evaluation rode on the next train message has no evaluation phase of its own
            row[key] = next((m.value for m in client.get_metric_history(run_id, key) if m.step == step), None)
        sizes = [m.value for k in client.get_run(run_id).data.metrics if k.endswith("/update_bytes")
                 for m in client.get_metric_history(run_id, k) if m.step == step]
        row["update_bytes_max"] = max(sizes)
        per_round.append(row)
    return per_round


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def measure(name: str, workdir: Path, plants: int, rounds: int, warm: bool, poll_s: float, fold: bool, encoding: str) -> dict[str, object]:
    from mlflow.tracking import MlflowClient

    settings = FederationSettings(
        app_dir=find_app_dir(), workdir=workdir, plants=plants, warm=warm,
        run_overrides={"num-server-rounds": rounds, "poll-interval-s": poll_s, "min-plants": min(plants, 2), "update-encoding": encoding,
                       "evaluate-with-train": fold, "contribution": "off"},
    )
    sampler = MemorySampler()
    sampler.start()
    started = time.perf_counter()
    plant_ids = settings.plant_ids
    marks: dict[str, dict[int, tuple[str, float]]] = {}

    def watch(line: str) -> None:
        """CPU snapshots when round 1 is complete and when the run's last reply is in: rounds 2..N, steady state."""
        if "round 1/" in line and " train (" in line:
            marks.setdefault("from", cpu_seconds(plant_ids))
        if f"round {rounds}/{rounds} eval" in line:
            marks["to"] = cpu_seconds(plant_ids)

    with LocalFederation(settings, echo=watch) as fed:
        time.sleep(5)  # the plants settle: started, registered, nothing to do
        rest = plant_pss_mib(fed)
        result = fed.submit_run()
        after = plant_pss_mib(fed)
    total_s = time.perf_counter() - started
    sampler.stop()
    # The federation (MLflow server included) is stopped by now: read its store directly.
    client = MlflowClient(f"sqlite:///{workdir.resolve() / 'mlflow' / 'mlflow.db'}")
    per_round = _round_metrics(client, result.mlflow_run_id, rounds)
    overheads = [r["round_overhead_s"] for r in per_round]
    return {
        "setup": name, "plants": plants, "rounds": rounds, "warm_executors": warm, "server_poll_s": poll_s, "evaluate_with_train": fold,
        "update_encoding": encoding,
        "overhead_per_round_s_median": statistics.median(overheads),
        "overhead_per_round_s_max": max(overheads),
        "overhead_per_round_s_mean": statistics.mean(overheads),
        "overhead_per_round_s_after_first_median": statistics.median(overheads[1:]) if rounds > 1 else None,
        "wall_per_round_s_median": statistics.median(r["round_wall_s"] for r in per_round),
        "train_phase_overhead_s_median": _median([r["round_train_overhead_s"] for r in per_round]),
        "eval_phase_overhead_s_median": _median([r["round_eval_overhead_s"] for r in per_round]),
        "update_bytes_per_plant_round": max(r["update_bytes_max"] for r in per_round),
        "model_fp32_bytes": per_round[0]["model_bytes"],
        "plant_pss_at_rest_mib": rest, "plant_pss_after_run_mib": after,
        "peak_rss_sum_mib": sampler.peak_rss / 2**20,
        "peak_pss_sum_mib": sampler.peak_pss / 2**20,
        "total_s": total_s, "per_round": per_round, "mlflow_run_id": result.mlflow_run_id,
        # where a round's work goes (rounds 2..N: from round 1's train line to the run's last evaluation line)
        "cpu_s_per_round_by_process": cpu_per_round(marks["from"], marks["to"], rounds - 1) if len(marks) == 2 and rounds > 1 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plants", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=Path(".maxfl-bench"))
    parser.add_argument("--setups", default="defaults,warm", help="comma-separated: defaults, warm")
    parser.add_argument("--update-encoding", default="fp32", choices=("fp32", "fp16"))
    parser.add_argument("--commit", default="", help="the commit a copy of the tree (no .git) was made from")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped benchmark stops its federation too (LocalFederation.__exit__)
    setups = {  # Flower's defaults: a ClientApp process per message, 3 s polls, an evaluation exchange after every training one
        "defaults": ("flower defaults", False, 3.0, False),
        "warm": ("maxfl default", True, 0.1, True),
    }
    rows = [
        measure(name, args.workdir / key, args.plants, args.rounds, warm=warm, poll_s=poll_s, fold=fold, encoding=args.update_encoding)
        for key in args.setups.split(",")
        for name, warm, poll_s, fold in [setups[key]]
    ]
    print(f"{'setup':<30} {'overhead/round':>15} {'(mean)':>8} {'(max)':>7} {'train ph.':>10} {'eval ph.':>9} {'wall/round':>11}"
          f" {'plant PSS rest':>15} {'update/fp32':>12} {'peak PSS':>10}")
    for r in rows:
        rest = max(r["plant_pss_at_rest_mib"].values())
        ratio = r["update_bytes_per_plant_round"] / r["model_fp32_bytes"]
        print(f"{r['setup']:<30} {r['overhead_per_round_s_median']:>13.2f} s {r['overhead_per_round_s_mean']:>6.2f} s"
              f" {r['overhead_per_round_s_max']:>5.1f} s"
              f" {r['train_phase_overhead_s_median']:>8.2f} s {r['eval_phase_overhead_s_median'] or 0.0:>7.2f} s"
              f" {r['wall_per_round_s_median']:>9.1f} s {rest:>11.0f} MiB {ratio:>11.3f}x {r['peak_pss_sum_mib']:>6.0f} MiB")
    for r in rows:
        if r["cpu_s_per_round_by_process"]:
            cpu = r["cpu_s_per_round_by_process"]
            print(f"{r['setup']}: CPU s per round (rounds 2-{r['rounds']}), {sum(cpu.values()):.2f} in all: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in list(cpu.items())[:8]))
    print("median (and mean) over rounds; overhead = round wall time - slowest plant's local training time; eval ph.: the rounds "
          "with an evaluation exchange of their own; plant PSS: the largest plant's")
    if len(rows) == 2:
        print(f"overhead ratio, {rows[0]['setup']} / {rows[1]['setup']}: "
              f"{rows[0]['overhead_per_round_s_median'] / rows[1]['overhead_per_round_s_median']:.1f}x")
    write_result(args.out, {"cpus": os.cpu_count(), "rows": rows}, args.commit)


if __name__ == "__main__":
    main()
