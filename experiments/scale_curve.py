"""How the local federation scales with the number of plants: round time, memory and bytes per plant.

The `table` task (a 5,890-parameter MLP on a quality table) with small plants keeps each plant's own work tiny,
so what grows with the plant count is the federation's own cost: 100 virtual plants x 10 rounds fit this 2-core box.
Simulation (Flower's Ray engine) at 1, 5, 20 and 100 plants; deployment (a real SuperNode and warm executor per
plant, TLS through the proxy) at 1, 5, 10 and 20 plants, fewer rounds.

    .venv/bin/python experiments/scale_curve.py                      # the whole curve (about 25 minutes here)
    .venv/bin/python experiments/scale_curve.py --only sim:5,dep:1   # some points

Per configuration:
- round time: median over rounds of MLflow's `round_wall_s` (first train message out to the round's last reply in; a
  round's train message also carries the previous round's evaluation) and of `round_overhead_s` (that, less the slowest
  plant's training), with its slope per added plant in deployment;
- memory: peak PSS per group of processes (sampled every second over the launcher's descendants): the anchor
  (MLflow, SuperLink, ServerApp, executor, proxy; in simulation flwr-simulation, which runs the ServerApp), the plants (deployment: SuperNode + warm executor + its forked
  ClientApps, per plant; simulation: the Ray workers in total, and / plants), Ray's own processes and Flower's
  simulation driver;
- bytes on the wire per plant per round, derived (the model's ArrayRecord payload: down with each train message and
  the final evaluation's once a run, up with the train reply) and measured from /proc/PID/io (rchar + wchar: bytes through
  read/write calls, sockets included) between the ends of round 1 and of the last round: of the proxy in deployment
  (it relays the plants' TLS link, so half its I/O is that link, polls and heartbeats included). Simulation has no
  wire: flwr-simulation runs the ServerApp in a thread and hands messages to the virtual plants via Ray's object store.

Prints a table; writes experiments/results/scale-curve.json (and scale-curve.png with matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from provenance import provenance

from launcher.federation import FederationSettings, LocalFederation, find_app_dir
from launcher.processes import descendants, free_port
from maxfl.atomic import atomic_write_text
from maxfl.errors import UserError

RESULTS = Path(__file__).parent / "results" / "scale-curve.json"
PLOT = RESULTS.with_suffix(".png")
EXAMPLES_PER_PLANT = 100  # rows per plant's demo table (80 train, 20 held out)
CURVE = [("simulation", n, 10) for n in (1, 5, 20, 100)] + [("deployment", n, 4) for n in (1, 5, 10, 20)]
# A point's plants do their own part of a round in well under a second: one local epoch on 80 rows, DP-SGD on.
RUN_CONFIG = {"task": "table", "local-epochs": 1, "release": False, "contribution": "off"}
RAY_CORE = ("raylet", "gcs_server", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "log_monitor", "dashboard", "monitor.py")


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


class Sampler(threading.Thread):
    """Every `period_s`: PSS per group of the federation's processes (peaks kept), and the bytes the process that
    relays the messages wrote and read (/proc/PID/io wchar, rchar: its sockets, plus its few log lines)."""

    def __init__(self, federation: LocalFederation, period_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.fed, self.period_s = federation, period_s
        self.peaks: dict[str, int] = {}
        self.per_plant_peak = 0  # KiB: the largest plant (deployment)
        self.series: list[tuple[float, int, int]] = []  # (epoch s, wchar, rchar) of the process the messages pass
        self._halt = threading.Event()

    def _group(self, pid: int, roots: dict[int, str]) -> str:
        chain, p = [], pid
        while p and p not in roots and len(chain) < 64:
            chain.append(p)
            p = _parent(p)
        root = roots.get(p, "other")
        if root.startswith(("supernode-", "warm-exec-")):
            return "plant:" + root.split("-", 2 if root.startswith("warm") else 1)[-1]
        if root == "superlink":
            lines = [_cmdline(q) for q in chain]
            if any("flwr-simulation" in c for c in lines):
                own = lines[0] if lines else ""
                if own.startswith("ray::") and not own.startswith(RAY_CORE):
                    return "ray-workers"
                return "sim-driver" if "flwr-simulation" in own else "ray-core"
            return "anchor"
        return "anchor" if root != "other" else "flwr-cli"  # `flwr run --stream`, following the run

    def _sample_memory(self) -> None:
        roots = {m.popen.pid: m.name for m in list(self.fed.procs.procs) + list(self.fed._pending.values())}
        totals: dict[str, int] = {}
        for pid in descendants(os.getpid()):
            group = self._group(pid, roots)
            totals[group] = totals.get(group, 0) + _pss_kib(pid)
        plants = [v for k, v in totals.items() if k.startswith("plant:")]
        summary = {k: v for k, v in totals.items() if not k.startswith("plant:")}
        summary["plants"] = sum(plants)
        summary["total"] = sum(totals.values())
        self.per_plant_peak = max([self.per_plant_peak, *plants])
        for k, v in summary.items():
            self.peaks[k] = max(self.peaks.get(k, 0), v)

    def _io_process(self) -> int | None:
        """The proxy: every byte between the plants and the SuperLink passes it (deployment; simulation has none)."""
        return next((m.popen.pid for m in list(self.fed.procs.procs) if m.name == "proxy"), None)

    def _sample_io(self) -> None:
        pid = self._io_process()
        try:
            io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines()) if pid else {}
        except OSError:
            io = {}
        if io:
            self.series.append((time.time(), int(io["wchar"]), int(io["rchar"])))

    def run(self) -> None:
        while not self._halt.wait(self.period_s):
            self._sample_io()
            self._sample_memory()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def bytes_between(self, t0: float, t1: float) -> tuple[int, int]:
        """(written, read) between two moments (the samples just after each)."""
        def at(t: float) -> tuple[int, int]:
            later = [(d, u) for ts, d, u in self.series if ts >= t]
            return later[0] if later else self.series[-1][1:] if self.series else (0, 0)
        (d0, u0), (d1, u1) = at(t0), at(t1)
        return d1 - d0, u1 - u0


def model_payload_bytes(plants_root: Path) -> int:
    """The bytes of the model's ArrayRecord payload (its arrays' buffers), as the plants' data makes the model."""
    from maxfl.weights import pack
    from tasks import get_task
    from tasks.base import TaskOptions

    task = get_task("table")
    profiles = {d.name: task.profile(d, 42) for d in sorted(plants_root.glob("plant-*"))[:3]}
    model = task.build_model(task.make_spec(profiles, TaskOptions(model="", image_size=64)))
    return sum(len(array.data) for array in pack(model).values())


def measure(mode: str, plants: int, rounds: int, workdir: Path) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    superlink_port, proxy_port = free_port(), free_port()
    settings = FederationSettings(
        app_dir=find_app_dir(), workdir=workdir, mode=mode, plants=plants, examples_per_plant=EXAMPLES_PER_PLANT,  # type: ignore[arg-type]
        superlink_port=superlink_port, proxy_port=proxy_port if mode == "deployment" else None,
        # a reply lost under load ends the round after 5 minutes, not Flower's 15
        run_overrides={**RUN_CONFIG, "num-server-rounds": rounds, "min-plants": min(plants, 2), "round-timeout-s": 300.0},
    )
    federation = LocalFederation(settings, echo=lambda line: print(f"  {line}"[:160], flush=True))
    sampler = Sampler(federation)
    sampler.start()
    started = time.perf_counter()
    try:
        result = federation.run()
    finally:
        sampler.stop()
    total_s = time.perf_counter() - started
    client = MlflowClient(f"sqlite:///{workdir.resolve() / 'mlflow' / 'mlflow.db'}")
    walls = sorted(client.get_metric_history(result.mlflow_run_id, "round_wall_s"), key=lambda m: m.step)
    ends = [m.timestamp / 1000 for m in walls]
    written, read = sampler.bytes_between(ends[0], ends[-1]) if rounds > 1 else (0, 0)
    per = max(1, (rounds - 1) * plants)
    # The proxy relays each byte twice (read from one side, written to the other): half its I/O crossed the plants' link.
    # The ServerApp's I/O is its own: messages to and replies from the SuperLink (and its MLflow calls).
    relayed = (written + read) / 2
    payload = model_payload_bytes(workdir / "plants")
    mib = {k: v / 1024 for k, v in sampler.peaks.items()}
    # Simulation: the ServerApp is a thread of flwr-simulation, which also drives Ray (counted with the anchor here).
    anchor = mib.get("anchor", 0.0) + (mib.get("sim-driver", 0.0) if mode == "simulation" else 0.0)
    row: dict[str, Any] = {
        "mode": mode, "plants": plants, "rounds": rounds,
        "round_wall_s_median": statistics.median(m.value for m in walls),
        # the round's wall time less the slowest plant's training (experiments/round_overhead.py's measure)
        "round_overhead_s_median": statistics.median(m.value for m in client.get_metric_history(result.mlflow_run_id, "round_overhead_s")),
        "round_wall_s": [m.value for m in walls],
        "total_s": total_s,
        "anchor_pss_mib": anchor,
        "peak_pss_mib_by_group": mib,
        "model_payload_bytes": payload,
        # down: the train message each round (which also has the plant evaluate the previous round's model) and the final
        # model's evaluation message once per run; up: the update
        "derived_bytes_per_plant_round": {"down": payload * (rounds + 1) / rounds, "up": payload},
        "measured_bytes_per_plant_round": relayed / per if mode == "deployment" else None,
        "measured_on": ("the proxy's /proc/PID/io (rchar + wchar) / 2: the plants' TLS link, polls and heartbeats included"
                        if mode == "deployment" else "nothing: flwr-simulation runs the ServerApp in a thread and hands the "
                        "messages to the virtual plants through Ray's object store, no socket"),
        "mlflow_run_id": result.mlflow_run_id,
    }
    if mode == "deployment":
        row["plant_pss_mib"] = sampler.per_plant_peak / 1024
        row["plants_pss_mib_total"] = mib.get("plants", 0.0)
    else:
        row["plant_pss_mib"] = mib.get("ray-workers", 0.0) / plants
        row["ray_workers_pss_mib"] = mib.get("ray-workers", 0.0)
        row["ray_core_pss_mib"] = mib.get("ray-core", 0.0)
        row["sim_driver_pss_mib"] = mib.get("sim-driver", 0.0)
    return row


def _growth(rows: list[dict[str, Any]], mode: str, key: str) -> str:
    """How `key` changed from the smallest to the largest point of `mode`, against the plants' own factor, and what that
    shape is: flat (x1.25 or less), sublinear (less than 0.8 of the plants' factor), linear, or superlinear."""
    sel = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["plants"])
    if len(sel) < 2 or not sel[0][key]:
        return "n/a"
    lo, hi = sel[0], sel[-1]
    grew, plants = hi[key] / lo[key], hi["plants"] / lo["plants"]
    shape = "flat" if grew <= 1.25 else "sublinear" if grew < 0.8 * plants else "linear" if grew <= 1.25 * plants else "superlinear"
    return f"{shape}: x{grew:.1f} for x{plants:.0f} plants ({lo[key]:.1f} -> {hi[key]:.1f})"


def _per_added_plant(rows: list[dict[str, Any]]) -> str:
    """The deployment round overhead's least-squares slope over the plant counts measured."""
    sel = [r for r in rows if r["mode"] == "deployment"]
    if len(sel) < 2:
        return "n/a"
    xs, ys = [float(r["plants"]) for r in sel], [float(r["round_overhead_s_median"]) for r in sel]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return f"{sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs):+.3f}"


def notes(rows: list[dict[str, Any]]) -> list[str]:
    """What grows with the plants and how (from the rows), and what limits the next step."""
    for r in rows:
        r["plants_pss_mib_all"] = r["plant_pss_mib"] * r["plants"]
        measured = r.get("measured_bytes_per_plant_round")
        r["bytes_per_plant_round"] = measured if measured is not None else sum(r["derived_bytes_per_plant_round"].values())
    return [
        f"round time: simulation {_growth(rows, 'simulation', 'round_wall_s_median')}; deployment "
        f"{_growth(rows, 'deployment', 'round_wall_s_median')}; the deployment round's overhead (wall less the slowest plant's "
        f"training) {_growth(rows, 'deployment', 'round_overhead_s_median')}, {_per_added_plant(rows)} s per added plant.",
        f"anchor memory (MLflow, SuperLink, ServerApp; simulation: with flwr-simulation): simulation "
        f"{_growth(rows, 'simulation', 'anchor_pss_mib')}; deployment {_growth(rows, 'deployment', 'anchor_pss_mib')}.",
        f"all plants' memory: simulation {_growth(rows, 'simulation', 'plants_pss_mib_all')} MiB (Ray's workers are as many as "
        f"its actors, not plants); deployment {_growth(rows, 'deployment', 'plants_pss_mib_all')} MiB (a SuperNode and a warm "
        "executor holding torch per plant).",
        f"bytes per plant per round: deployment {_growth(rows, 'deployment', 'bytes_per_plant_round')} (measured at the proxy); "
        "the anchor's total is that times the plants.",
        "what limits the next step: CPU, two cores shared by every process (in simulation Flower's default client-resources "
        "num-cpus = 2 gives one Ray actor, so virtual plants train one at a time; in deployment each plant is two Python "
        "processes, and the SuperLink answers every plant's polls and object transfers in one process); in deployment memory "
        "next (see the plants' PSS).",
    ]


def report(rows: list[dict[str, Any]], prov: dict[str, Any], measured_at: str, failed: list[dict[str, Any]]) -> None:
    """Print the table, the points that failed and the notes; write the JSON and the plot."""
    header = (f"{'mode':<11} {'plants':>6} {'rounds':>6} {'round s':>8} {'overhead s':>10} {'anchor MiB':>10} {'per plant MiB':>13}"
              f" {'KiB/plant/round derived':>23} {'measured':>9} {'total s':>8}")
    print(header)
    for r in rows:
        derived = sum(r["derived_bytes_per_plant_round"].values()) / 1024
        measured = "-" if r["measured_bytes_per_plant_round"] is None else f"{r['measured_bytes_per_plant_round'] / 1024:.1f}"
        print(f"{r['mode']:<11} {r['plants']:>6} {r['rounds']:>6} {r['round_wall_s_median']:>8.1f} {r['round_overhead_s_median']:>10.2f}"
              f" {r['anchor_pss_mib']:>10.0f}"
              f" {r['plant_pss_mib']:>13.0f} {derived:>23.1f} {measured:>9} {r['total_s']:>8.0f}")
    for f in failed:
        print(f"{f['mode']:<11} {f['plants']:>6} {f['rounds']:>6} FAILED: {f['failed']}")
    found = notes(rows) + [f"{f['mode']} at {f['plants']} plants did not finish on this machine: {f['failed']}" for f in failed]
    for note in found:
        print(f"- {note}")
    atomic_write_text(RESULTS, json.dumps({"measured_at": measured_at, "provenance": prov, "cpus": os.cpu_count(), "run_config": RUN_CONFIG,
                                           "examples_per_plant": EXAMPLES_PER_PLANT, "rows": rows, "failed": failed,
                                           "notes": found}, indent=2))
    print(f"results: {RESULTS}")
    _plot(rows)


def _plot(rows: list[dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for mode, marker in (("simulation", "o"), ("deployment", "s")):
        sel = [r for r in rows if r["mode"] == mode]
        if not sel:
            continue
        xs = [r["plants"] for r in sel]
        axes[0].plot(xs, [r["round_wall_s_median"] for r in sel], marker=marker, label=mode)
        axes[1].plot(xs, [r["anchor_pss_mib"] for r in sel], marker=marker, label=f"{mode}: anchor")
        axes[1].plot(xs, [r["plant_pss_mib"] * r["plants"] for r in sel], marker=marker, linestyle="--", label=f"{mode}: plants")
        if mode == "deployment":
            axes[2].plot(xs, [r["measured_bytes_per_plant_round"] / 1024 for r in sel], marker=marker, label=f"{mode}: measured")
    derived = sum(rows[0]["derived_bytes_per_plant_round"].values()) / 1024
    axes[2].axhline(derived, color="grey", linestyle=":", label="derived (model payload)")
    for ax, title in zip(axes, ("median round wall time (s)", "peak PSS (MiB)", "KiB per plant per round"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("plants")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)
    print(f"plot: {PLOT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".maxfl-bench/scale"))
    parser.add_argument("--only", default="", help="comma-separated points, e.g. sim:5,dep:1 (rounds as in the curve)")
    parser.add_argument("--commit", default="", help="the commit this tree is (a copy of the tree has no git)")
    parser.add_argument("--report", action="store_true", help="only print, note and plot the rows already in the results file")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(RESULTS.read_text())
        report(saved["rows"], saved["provenance"], saved["measured_at"], saved.get("failed", []))
        return
    wanted = {tuple(p.split(":")) for p in args.only.split(",") if p}
    points = [(m, n, r) for m, n, r in CURVE if not wanted or (m[:3], str(n)) in wanted]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped benchmark stops its federation too (LocalFederation.__exit__)
    rows, failed = [], []
    for mode, plants, rounds in points:
        print(f"{mode}, {plants} plants, {rounds} rounds", flush=True)
        try:
            rows.append(measure(mode, plants, rounds, args.workdir / f"{mode[:3]}-{plants}"))
        except UserError as exc:  # a point this machine cannot run is a result too: what stopped it
            print(f"  FAILED: {exc}", flush=True)
            failed.append({"mode": mode, "plants": plants, "rounds": rounds, "failed": str(exc)})
    prov = provenance()
    if args.commit:
        prov["commit"] = args.commit
    report(rows, prov, time.strftime("%Y-%m-%dT%H:%M:%S"), failed)


if __name__ == "__main__":
    main()
