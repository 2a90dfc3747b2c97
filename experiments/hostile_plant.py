"""One hostile or broken plant of five: what FedAvg, update validation and the robust strategies make of it.

The real local federation (MLflow, SuperLink, one SuperNode per plant, `flwr run`), task `defect`, no DP
(run config `privacy="none"`, plants' `max-epsilon="inf"`), the same rounds, epochs, batch, learning rate and
seed in every arm. Plant-5 runs a fault drill (fl_client.fault_drill): its every update leaves scaled,
sign-flipped (both by `--scale`, default 10 as the drill's `fault-drill-scale`) or NaN. Arms per setting
(clean, then each attack):

- `fedavg`, norm checks off (`update-norm-factor=0`, `max-update-norm=0`): aggregation alone. The structural
  checks (keys, shapes, dtypes, finite values) cannot be turned off, so NaN updates are always dropped;
- `fedavg + norm check`: FedAvg with the default relative bound (an update over 10 x the round's median norm
  is dropped; `--norm-factor` tries another), against the scaled and sign-flipped plant only (against NaN it
  is the arm above); rejections of honest plants (false alarms) show in the table;
- the robust strategies (default: fedmedian, fedtrimmedavg, krum), norm checks off.

A run that stops (RunAborted: too few valid updates, or an aggregate that is not finite) counts as failed. The
final model is loaded back from MLflow and scored with the task's own evaluation on the held-out split of each
honest plant (plant-1 .. plant-4) and on their pooled held-out data.

    .venv/bin/python experiments/hostile_plant.py --rounds 15
    .venv/bin/python experiments/hostile_plant.py --settings scale,sign-flip --arms norm --norm-factor 5 --name hostile-plant-norm5

Prints a table, writes experiments/results/<name>.json and .md (default name hostile-plant). Every arm's
federated run is in MLflow (experiment `maxfl-hostile`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from baselines import score

from fl_client.config import PlantConfig
from maxfl.atomic import atomic_write_text
from maxfl.errors import ProcessError
from launcher.federation import FederationSettings, LocalFederation, find_app_dir
from tasks import get_task
from tasks.base import PlantData, Task, TaskOptions, TaskSpec

RESULTS = Path(__file__).parent / "results"
EXPERIMENT = "maxfl-hostile"
NORM_OFF = {"update-norm-factor": 0.0, "max-update-norm": 0.0, "persistent-norm-factor": 0.0}
POINTS = 0.02  # "within 2 points" of macro-F1


def arms(setting: str, args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """(label, run config overrides) of every arm for one setting."""
    out = [("fedavg", {"strategy": "fedavg", **NORM_OFF})] if "fedavg" in args.arms else []
    if "norm" in args.arms and setting in ("scale", "sign-flip"):  # NaN: the arm above; clean: see the attacks' false alarms
        out.append(("fedavg + norm check", {"strategy": "fedavg", "update-norm-factor": args.norm_factor, "max-update-norm": 0.0}))
    return out + ([(name, {"strategy": name, **NORM_OFF}) for name in args.robust] if "robust" in args.arms else [])


class DrillFederation(LocalFederation):
    """The demo federation, with the hostile plant's drill scaled by `scale` (its node config `fault-drill-scale`)."""

    def __init__(self, settings: FederationSettings, scale: float, echo: Callable[[str], None]) -> None:
        super().__init__(settings, echo)
        self.scale = scale

    def prepare_data(self, task_name: str, seed: int) -> list[PlantConfig]:
        plants = super().prepare_data(task_name, seed)
        return [p.model_copy(update={"fault_drill_scale": self.scale}) if p.fault_drill != "none" else p for p in plants]


def run_setting(setting: str, args: argparse.Namespace, work: Path, uri: str, task: Task, spec: TaskSpec,
                datas: dict[str, PlantData]) -> list[dict[str, Any]]:
    """One federation with plant-N hostile (or none, "clean"), one Flower run per arm."""
    import mlflow.pytorch

    mlflow.set_tracking_uri(uri)
    hostile = f"plant-{args.plants}"
    lines: list[str] = []
    base = {"task": "defect", "num-server-rounds": args.rounds, "local-epochs": args.local_epochs, "batch-size": args.batch_size,
            "learning-rate": args.learning_rate, "lr-schedule": args.lr_schedule, "seed": args.seed, "privacy": "none",
            "min-plants": args.plants - 1, "num-malicious": 1, "release": False, "evaluate-every": args.rounds,
            "experiment-name": EXPERIMENT}
    settings = FederationSettings(app_dir=find_app_dir(), workdir=work, plants=args.plants, examples_per_plant=args.examples_per_plant,
                                  run_overrides=base, tracking_uri=uri, max_epsilon=float("inf"),
                                  fault_drills={hostile: setting} if setting != "clean" else {})
    results = []
    with DrillFederation(settings, args.scale, echo=lambda line: (lines.append(line), print(line, flush=True))) as federation:
        for label, overrides in arms(setting, args):
            lines.clear()
            federation.last_server_error = ""
            started = time.perf_counter()
            arm: dict[str, Any] = {"setting": setting, "arm": label, "overrides": overrides}
            print(f"=== {setting}: {label}", flush=True)
            try:
                result = federation.submit_run(overrides)
                exported = mlflow.pytorch.load_model(f"runs:/{result.mlflow_run_id}/model")
                model = task.build_model(spec)
                model.load_state_dict(exported.state_dict())
                honest = {p: d for p, d in datas.items() if p != hostile}
                arm |= {"status": "completed", "mlflow_run": result.mlflow_run_id, "scores": score(task, spec, model, honest),
                        "mlflow_eval": mlflow_eval(uri, result.mlflow_run_id, list(datas), args.rounds)}
            except ProcessError as exc:
                arm |= {"status": "failed", "reason": str(exc)}
            arm["seconds"] = time.perf_counter() - started
            rejected = [line for line in lines if "update rejected" in line]
            arm["rejections"] = dict(Counter(line.split("'s update rejected")[0].rsplit(" ", 1)[-1] for line in rejected))
            arm["first_rejection"] = rejected[0].split("update rejected: ", 1)[-1] if rejected else ""
            pooled = arm.get("scores", {}).get("pooled", {})
            print(f"--- {setting}: {label}: {arm['status']} macro-F1 {pooled.get('eval_macro_f1', float('nan')):.3f} "
                  f"accuracy {pooled.get('eval_accuracy', float('nan')):.3f} rejections {arm['rejections']} ({arm['seconds']:.0f}s)", flush=True)
            results.append(arm)
    return results


def mlflow_eval(uri: str, run_id: str, plants: list[str], last_round: int) -> dict[str, dict[str, float]]:
    """Each plant's own federated evaluation of the final model, as the ServerApp logged it (step = last round)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    out: dict[str, dict[str, float]] = {}
    for plant in plants:
        values = {}
        for key in ("eval_macro_f1", "eval_accuracy"):
            history = [m for m in client.get_metric_history(run_id, f"{plant}/{key}") if m.step == last_round]
            if history:
                values[key] = history[-1].value
        if values:
            out[plant] = values
    return out


def compare(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each arm's pooled macro-F1 against the clean run of the same strategy (FedAvg for the norm-check arms)
    and against clean FedAvg."""
    clean = {r["arm"]: r for r in results if r["setting"] == "clean" and r["status"] == "completed"}
    for r in results:
        f1 = r.get("scores", {}).get("pooled", {}).get("eval_macro_f1")
        same = clean.get(r["arm"].removesuffix(" + norm check"), {}).get("scores", {}).get("pooled", {}).get("eval_macro_f1")
        fedavg = clean.get("fedavg", {}).get("scores", {}).get("pooled", {}).get("eval_macro_f1")
        r["delta_vs_clean_same"] = None if f1 is None or same is None else f1 - same
        r["delta_vs_clean_fedavg"] = None if f1 is None or fedavg is None else f1 - fedavg
    return results


def _num(value: float | None, signed: bool = False) -> str:
    return "" if value is None else (f"{value:+.3f}" if signed else f"{value:.3f}")


def table(results: list[dict[str, Any]], hostile: str, scale: float) -> str:
    lines = ["| plant-5 sends | strategy | norm check | status | pooled macro-F1 | pooled accuracy | vs clean, same strategy | vs clean FedAvg | "
             f"updates rejected ({hostile} / honest) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        pooled = r.get("scores", {}).get("pooled", {})
        strategy = r["arm"].removesuffix(" + norm check")
        norm = f"{r['overrides']['update-norm-factor']:g} x median" if r["overrides"]["update-norm-factor"] else "off"
        status = r["status"] if r["status"] == "completed" else f"failed: {r.get('reason', '')[:160]}"
        honest = sum(n for p, n in r["rejections"].items() if p != hostile)
        sends = "honest update" if r["setting"] == "clean" else r["setting"] + (f" x{scale:g}" if r["setting"] != "nan" else "")
        lines.append(f"| {sends} | {strategy} | {norm} | {status} | {_num(pooled.get('eval_macro_f1'))} | {_num(pooled.get('eval_accuracy'))} | "
                     f"{_num(r['delta_vs_clean_same'], True)} | {_num(r['delta_vs_clean_fedavg'], True)} | {r['rejections'].get(hostile, 0)} / {honest} |")
    return "\n".join(lines)


def verdicts(results: list[dict[str, Any]], robust: list[str], hostile: str, rounds: int) -> list[tuple[str, bool]]:
    """The issue's claim, per attack: FedAvg fails, and a robust option stays within 2 points of the clean run.

    NaN updates never reach any strategy (the finite check cannot be turned off), so for NaN the claim checked
    is that validation dropped every one of them and FedAvg kept within 2 points of its clean run.
    """
    def within(r: dict[str, Any] | None) -> bool:
        return r is not None and r["status"] == "completed" and r["delta_vs_clean_same"] is not None and r["delta_vs_clean_same"] >= -POINTS

    out = []
    for setting in sorted({r["setting"] for r in results} - {"clean"}):
        by_arm = {r["arm"]: r for r in results if r["setting"] == setting}
        fedavg = by_arm.get("fedavg")
        if fedavg is not None and setting == "nan":
            dropped = fedavg["rejections"].get(hostile, 0) == rounds
            out.append((f"nan: validation drops all {rounds} NaN updates and FedAvg stays within 2 points of its clean run", dropped and within(fedavg)))
        elif fedavg is not None:
            failed = fedavg["status"] == "failed" or (fedavg["delta_vs_clean_same"] is not None and fedavg["delta_vs_clean_same"] < -POINTS)
            out.append((f"{setting}: FedAvg (norm checks off) fails (stops, or loses more than 2 points of macro-F1)", failed))
        for name in robust:
            if name in by_arm:
                out.append((f"{setting}: {name} within 2 points of its clean run", within(by_arm[name])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plants", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--examples-per-plant", type=int, default=None)
    parser.add_argument("--scale", type=float, default=10.0, help="the hostile plant's fault-drill-scale (scale, sign-flip)")
    parser.add_argument("--settings", default="clean,scale,sign-flip,nan", help="comma-separated: clean, scale, sign-flip, nan")
    parser.add_argument("--robust", default="fedmedian,fedtrimmedavg,krum", help="comma-separated robust strategies")
    parser.add_argument("--norm-factor", type=float, default=10.0, help="update-norm-factor of the norm-check arms (default: the run config's)")
    parser.add_argument("--arms", default="fedavg,norm,robust", help="comma-separated subset of: fedavg, norm, robust")
    parser.add_argument("--workdir", type=Path, default=Path(".maxfl-bench"))
    parser.add_argument("--name", default="hostile-plant", help="results file name")
    args = parser.parse_args()
    args.robust = [s.strip() for s in args.robust.split(",") if s.strip()]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if unknown := set(args.arms) - {"fedavg", "norm", "robust"}:
        parser.error(f"--arms: unknown {', '.join(sorted(unknown))}; choose from fedavg, norm, robust")
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]

    work = (args.workdir / "hostile-plant").resolve()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the cleanup below
    # One LocalFederation prepares the plants' data and keeps an MLflow server up for every setting.
    anchor = LocalFederation(FederationSettings(app_dir=find_app_dir(), workdir=work, plants=args.plants,
                                                examples_per_plant=args.examples_per_plant))
    try:
        task = get_task("defect")
        plants = anchor.prepare_data("defect", args.seed)
        spec = task.make_spec({p.plant_id: task.profile(p.data_dir, args.seed) for p in plants}, TaskOptions())
        datas = {p.plant_id: task.load_plant_data(p.data_dir, args.seed, spec) for p in plants}
        uri = anchor.start_mlflow(anchor.reserve_port())
        started = time.perf_counter()
        results: list[dict[str, Any]] = []
        for setting in settings:
            results += run_setting(setting, args, work, uri, task, spec, datas)
        compare(results)
        hostile = f"plant-{args.plants}"
        text = table(results, hostile, args.scale)
        checks = verdicts(results, args.robust, hostile, args.rounds)
        print(text)
        for what, met in checks:
            print(f"{'PASS' if met else 'FAIL'}  {what}")
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"{args.name}.json"
        atomic_write_text(out, json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "hostile": hostile,
                                           "minutes": (time.perf_counter() - started) / 60, "arms": results,
                                           "checks": [{"what": w, "met": m} for w, m in checks]}, indent=2, default=str))
        atomic_write_text(RESULTS / f"{args.name}.md", text + "\n\n" + "\n".join(f"- {'PASS' if m else 'FAIL'} {w}" for w, m in checks) + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}; MLflow {uri} experiment {EXPERIMENT}")
    finally:
        anchor.procs.stop_all()


if __name__ == "__main__":
    main()
