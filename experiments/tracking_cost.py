"""The anchor's MLflow logging cost per round, SQLite against PostgreSQL, at 20 and 100 plants.

Reproduces what the ServerApp writes per completed round (fl_server.run.strategy.TrackedStrategy._finish_round):
first the round checkpoint (`CheckpointStore.save`: the global arrays of the default defect model - a head on frozen
EfficientNet-Lite0 features - with the round's metrics, uploaded as an artifact, then the commit tag), then the
round's metrics in one call (`RunTracker.log_metrics`): per plant what its train and evaluate replies carry
(`plant-k/...`, 23 keys under DP-SGD) and the aggregates. Both through the real classes, against an MLflow tracking
server process as `maxfl federate` runs it (`mlflow server --backend-store-uri ... --artifacts-destination ...`),
its store SQLite or PostgreSQL (launcher.postgres, durable: fsync on, as SQLite).

    .venv/bin/python experiments/tracking_cost.py                       # 10 rounds per configuration
    .venv/bin/python experiments/tracking_cost.py --rounds 20 --round-s 7.4

`logging` is what the round waits for: `RunTracker.log_metrics` writes in the background, one round deep, so the
round pays for queueing its metrics (and for the previous round's write, had it not finished during this round's
training: here it is waited for between rounds, as a round's training would). `metrics in store after` is the time
until MLflow has them all - the store's own work, which overlaps the next round and must stay under a round.
Each configuration gets its own MLflow run; one warm-up round is not counted. Logging as a share of a round uses
`--round-s`, default 7.4 s: the wall time per round measured with maxfl's defaults (docs/operating.md, Round overhead;
3 plants on the 2-core development machine - a round with more plants takes longer, so the share is an upper bound).
Prints a table; writes experiments/results/tracking-cost.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import mlflow
import numpy as np
from flwr.app import ArrayRecord
from mlflow import MlflowClient

from provenance import provenance

from fl_server.run.checkpoint import Checkpoint, CheckpointStore
from fl_server.run.config import RunConfig
from fl_server.run.tracking import tracked_run
from launcher.postgres import running
from launcher.processes import ProcessGroup, free_port
from maxfl.atomic import atomic_write_text
from maxfl.weights import pack
from tasks.features import FeatureHead

RESULTS = Path(__file__).parent / "results" / "tracking-cost.json"
TARGET_PERCENT = 2.0  # issue 17: MLflow logging <= 2% of a round at 20 plants on PostgreSQL
# What a plant's replies carry under DP-SGD (fl_client.client_app, privacy.budget), as TrackedStrategy._record logs it.
TRAIN_KEYS = ("num-examples", "train_time_s", "dp_epsilon", "dp_epsilon_run", "dp_rounds", "dp_epsilon_ceiling", "dp_delta",
              "dp_noise_multiplier", "dp_sample_rate", "dp_steps", "dp_max_grad_norm", "dp_batch_size")
EVAL_KEYS = ("eval_loss", "eval_accuracy", "eval_macro_f1", "eval_recall_class0", "eval_recall_class1", "eval_auroc", "eval_time_s",
             "eval_test_classes", "eval_predicted_classes", "eval_trivial_macro_f1", "onnx_max_abs_diff")  # num-examples: as train's
AGGREGATE_KEYS = ("eval_loss", "eval_accuracy", "eval_macro_f1", "eval_auroc", "train_time_s", "dp_epsilon_max", "round_train_wall_s",
                  "round_train_overhead_s", "round_eval_wall_s", "round_eval_overhead_s", "round_wall_s", "round_overhead_s")


def round_metrics(plants: int, server_round: int, rng: np.random.Generator) -> dict[str, float]:
    metrics = {f"plant-{p}/{k}": float(rng.random()) for p in range(1, plants + 1) for k in TRAIN_KEYS + EVAL_KEYS}
    return metrics | {k: float(rng.random()) + server_round for k in AGGREGATE_KEYS}


@contextmanager
def mlflow_server(backend: str, work: Path, procs: ProcessGroup) -> Iterator[str]:
    """An MLflow tracking server on a fresh store, as the launcher starts it; yields its URL."""
    with ExitStack() as stack:
        if backend == "sqlite":
            store = f"sqlite:///{work / 'mlflow.db'}"
        else:
            store = stack.enter_context(running(work / "postgres", work / "logs")).create_database("mlflow")
        port = free_port()
        env = {"PATH": str(Path(sys.executable).parent), "MLFLOW_BACKEND_STORE_URI": store, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        server = procs.start(f"mlflow-{backend}", [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                                                   "--port", str(port), "--workers", "1", "--artifacts-destination", str(work / "artifacts")], env)
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1.0).is_success
            except httpx.HTTPError:
                return False

        procs.wait_until(f"MLflow on {backend}", healthy, 180.0, server)
        try:
            yield url
        finally:
            server.popen.terminate()
            server.popen.wait(timeout=30)


def measure(url: str, backend: str, plants: int, rounds: int, arrays_params: int) -> dict[str, object]:
    """`rounds` rounds (after one warm-up) of checkpoint + metrics into one MLflow run; seconds per round."""
    cfg = RunConfig(tracking_uri=url, experiment_name=f"tracking-cost-{backend}-{plants}", num_server_rounds=rounds + 1)
    arrays = pack(FeatureHead(2560, 2)) if arrays_params <= 0 else ArrayRecord([np.zeros(arrays_params, np.float32)])
    rng = np.random.default_rng(plants)
    logging_s: list[float] = []
    checkpoint_s: list[float] = []
    written_s: list[float] = []
    with tracked_run(cfg, flwr_run_id=plants, fab_hash="tracking-cost") as tracker:
        tracker.note_plants([f"plant-{p}" for p in range(1, plants + 1)])
        store = CheckpointStore(MlflowClient(url), tracker.run_id)
        for r in range(rounds + 1):
            metrics = round_metrics(plants, r + 1, rng)
            started = time.perf_counter()
            store.save(Checkpoint(r + 1, arrays, metrics))
            saved = time.perf_counter()
            tracker.log_metrics(metrics, step=r + 1)
            queued = time.perf_counter()
            tracker.flush()  # the round's training, in a real run: the write has finished before the next round logs
            written = time.perf_counter()
            if r > 0:
                checkpoint_s.append(saved - started)
                logging_s.append(queued - saved)
                written_s.append(written - saved)
        run_id = tracker.run_id
    logged = MlflowClient(url).get_run(run_id).data.metrics
    assert len(logged) == len(metrics), (len(logged), len(metrics))  # every key arrived
    values = sum(a.size for a in arrays.to_numpy_ndarrays())
    return {"backend": backend, "plants": plants, "rounds": rounds, "metrics_per_round": len(metrics), "model_values": int(values),
            "logging_s": _stats(logging_s), "checkpoint_s": _stats(checkpoint_s), "metrics_written_s": _stats(written_s)}


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "mean": statistics.fmean(xs), "max": max(xs), "min": min(xs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per configuration (after one warm-up)")
    parser.add_argument("--plants", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    parser.add_argument("--round-s", type=float, default=7.4, help="reference round wall time (docs/operating.md: 7.4 s, maxfl defaults)")
    parser.add_argument("--model-params", type=int, default=0, help="checkpoint a vector of this many float32 values (0: the default "
                                                                       "defect model, a head on frozen EfficientNet-Lite0 features)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    rows = []
    work = Path(tempfile.mkdtemp(prefix="maxfl-tracking-cost-"))
    work.chmod(0o711)  # under root, PostgreSQL runs as 'nobody' and must reach its data folder
    procs = ProcessGroup(work / "logs")
    try:
        for backend in args.backends:
            (work / backend).mkdir()
            with mlflow_server(backend, work / backend, procs) as url:
                for plants in args.plants:
                    rows.append(row := measure(url, backend, plants, args.rounds, args.model_params))
                    print(f"measured {backend} {plants} plants: logging {row['logging_s']['median'] * 1e3:.1f} ms/round", flush=True)
    finally:
        mlflow.end_run()
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nMLflow cost per round ({args.rounds} rounds each, median; reference round {args.round_s:g} s)")
    print(f"{'backend':<11} {'plants':>6} {'metrics':>7} {'logging s/round':>16} {'checkpoint s/round':>19} {'logging % of round':>19} "
          f"{'both % of round':>16} {'metrics in store after s':>25}")
    for r in rows:
        log_s, ckpt_s, in_store = (r[k]["median"] for k in ("logging_s", "checkpoint_s", "metrics_written_s"))  # type: ignore[index]
        r["logging_percent_of_round"] = 100 * log_s / args.round_s
        r["logging_and_checkpoint_percent_of_round"] = 100 * (log_s + ckpt_s) / args.round_s
        print(f"{r['backend']:<11} {r['plants']:>6} {r['metrics_per_round']:>7} {log_s:>16.4f} {ckpt_s:>19.4f} "
              f"{r['logging_percent_of_round']:>18.2f}% {r['logging_and_checkpoint_percent_of_round']:>15.2f}% {in_store:>25.4f}")
    print("logging: what the round waits for (RunTracker.log_metrics; the write runs in the background, one round deep); "
          "metrics in store after: until MLflow has them all (overlaps the next round)")
    target = next((r for r in rows if r["backend"] == "postgresql" and r["plants"] == 20), None)
    if target is not None:
        verdict = "met" if target["logging_percent_of_round"] <= TARGET_PERCENT else "NOT met"
        print(f"target: MLflow logging <= {TARGET_PERCENT:g}% of a round at 20 plants on PostgreSQL: {verdict} "
              f"({target['logging_percent_of_round']:.2f}%)")
    result = {**provenance(), "command": "python experiments/tracking_cost.py " + " ".join(sys.argv[1:]), "round_s": args.round_s,
              "target_percent": TARGET_PERCENT, "mlflow": mlflow.__version__, "python": platform.python_version(),
              "cpu": platform.processor() or platform.machine(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
