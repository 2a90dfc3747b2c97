"""Baselines per task: local-only, centralized (pooled data, the upper bound) and federated.

All three arms train the same model with the same optimizer, batch size, learning rate and number of
epochs (rounds x local epochs) and are scored with the task's own evaluation on every plant's held-out
split and on the pooled held-out data. The federated arm is a real local federation (MLflow, SuperLink,
one SuperNode per plant, `flwr run`); its model is loaded back from MLflow.

    .venv/bin/python experiments/baselines.py --task defect --rounds 30
    .venv/bin/python experiments/baselines.py --task process --rounds 20

Prints a table per plant, writes experiments/results/baselines-<task>.json and .png, and logs an MLflow
parent run (experiment `maxfl-baselines`) with one nested run per arm, the table and the plot.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from maxfl.atomic import atomic_path, atomic_write_text
from launcher.federation import FederationSettings, LocalFederation, find_app_dir
from tasks import get_task
from tasks.base import PlantData, Task, TaskOptions, TaskSpec, TrainSettings
from tasks.classification import macro_f1, predict_logits

RESULTS = Path(__file__).parent / "results"
# What each task's table shows; higher is better unless listed in LOWER_IS_BETTER.
HEADLINE = {
    "defect": ["eval_macro_f1", "eval_auroc", "eval_accuracy"],
    "process": ["eval_detection_rate", "eval_false_alarm_rate", "eval_detection_at_5pct_false_alarms", "eval_fault_accuracy"],
    "table": ["eval_macro_f1", "eval_auroc", "eval_accuracy"],
    "images": ["eval_macro_f1", "eval_auroc", "eval_accuracy"],
}
LOWER_IS_BETTER = {"eval_false_alarm_rate", "eval_rmse", "eval_mae", "eval_loss"}


def pooled(datas: list[PlantData]) -> PlantData:
    return PlantData(
        torch.cat([d.x_train for d in datas]),
        torch.cat([d.y_train for d in datas]),
        torch.cat([d.x_test for d in datas]),
        torch.cat([d.y_test for d in datas]),
        fingerprint="pooled",
    )


def train_rounds(task: Task, spec: TaskSpec, data: PlantData, who: str, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    model = task.build_model(spec)
    for r in range(1, args.rounds + 1):
        settings = TrainSettings.for_round(
            args.local_epochs, args.batch_size, args.learning_rate, args.lr_schedule, args.seed, who, r, args.rounds
        )  # what the ClientApp uses, so every arm draws batches the same way
        task.train(model, data, settings, spec)
    return model


def score(task: Task, spec: TaskSpec, model: torch.nn.Module, datas: dict[str, PlantData]) -> dict[str, dict[str, float]]:
    everyone = {**datas, "pooled": pooled(list(datas.values()))}
    return {name: task.evaluate(model, data, spec) for name, data in everyone.items()}


def federated_model(task: Task, spec: TaskSpec, args: argparse.Namespace, work: Path, uri: str,
                    privacy: dict[str, Any] | None = None, **settings: Any) -> tuple[torch.nn.Module, str]:
    """Run the real federation against our MLflow server, then load its model back from MLflow.

    Without `privacy` the run is non-private, like the other arms: plants allow it (max-epsilon inf)."""
    import mlflow.pytorch

    overrides = {
        "task": args.task, "num-server-rounds": args.rounds, "local-epochs": args.local_epochs,
        "batch-size": args.batch_size, "learning-rate": args.learning_rate, "lr-schedule": args.lr_schedule,
        "seed": args.seed,
        "min-plants": args.plants, "model": args.model,
        **(privacy or {"privacy": "none"}),
    }
    settings.setdefault("max_epsilon", float("inf"))
    federation = FederationSettings(app_dir=find_app_dir(), workdir=work, plants=args.plants,
                                    examples_per_plant=args.examples_per_plant, run_overrides=overrides, tracking_uri=uri, **settings)
    result = LocalFederation(federation).run()
    mlflow.set_tracking_uri(uri)
    exported = mlflow.pytorch.load_model(f"runs:/{result.mlflow_run_id}/model")
    model = task.build_model(spec)
    task.deployable(spec, model).load_state_dict(exported.state_dict())  # MLflow holds what the edge serves; `model` is its trained part
    return model, result.mlflow_run_id


def paired_bootstrap(model_a: torch.nn.Module, model_b: torch.nn.Module, data: PlantData, num_classes: int,
                     seed: int, draws: int = 2000) -> tuple[float, float, float]:
    """macro-F1 of a minus b on the test split, with a 95% interval from resampling the same test examples."""
    pred_a, pred_b, y = predict_logits(model_a, data.x_test).argmax(1), predict_logits(model_b, data.x_test).argmax(1), data.y_test
    gen = torch.Generator().manual_seed(seed)

    def gap(idx: torch.Tensor) -> float:
        return macro_f1(pred_a[idx], y[idx], num_classes) - macro_f1(pred_b[idx], y[idx], num_classes)

    diffs = sorted(gap(torch.randint(len(y), (len(y),), generator=gen)) for _ in range(draws))
    return gap(torch.arange(len(y))), diffs[int(0.025 * draws)], diffs[int(0.975 * draws) - 1]


def table(task_name: str, results: dict[str, dict[str, dict[str, float]]]) -> tuple[str, list[dict[str, Any]]]:
    metrics = HEADLINE[task_name]
    arms = list(results)
    rows = []
    for who in results[arms[0]]:
        row: dict[str, Any] = {"data": who}
        for m in metrics:
            for arm in arms:
                row[f"{arm}/{m}"] = results[arm][who].get(m, float("nan"))
        rows.append(row)
    header = "| data | " + " | ".join(f"{arm} {m.removeprefix('eval_')}" for m in metrics for arm in arms) + " |"
    lines = [header, "|" + "---|" * (1 + len(metrics) * len(arms))]
    for row in rows:
        lines.append(f"| {row['data']} | " + " | ".join(f"{row[f'{arm}/{m}']:.3f}" for m in metrics for arm in arms) + " |")
    return "\n".join(lines), rows


def per_fault_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Detection rate per fault on the pooled held-out recordings, per arm."""
    arms = [a for a in results if a != "local"]  # local models have no pooled score of their own
    faults = sorted({k for a in arms for k in results[a]["pooled"] if k.startswith("eval_detection_idv")})
    lines = ["| fault | " + " | ".join(f"{a} detection" for a in arms) + " |", "|" + "---|" * (1 + len(arms))]
    for k in faults:
        lines.append(f"| IDV {int(k.removeprefix('eval_detection_idv'))} | " + " | ".join(f"{results[a]['pooled'][k]:.3f}" for a in arms) + " |")
    return "\n".join(lines)


def plot(task_name: str, results: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = HEADLINE[task_name][:2]
    arms = list(results)
    who = list(results[arms[0]])
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5))
    for ax, m in zip(axes, metrics, strict=True):
        width = 0.8 / len(arms)
        for i, arm in enumerate(arms):
            ax.bar([x + i * width for x in range(len(who))], [results[arm][w].get(m, 0.0) for w in who], width, label=arm)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(who))], who)
        ax.set_title(f"{task_name}: {m.removeprefix('eval_')}")
        ax.set_ylim(0, 1)
    axes[0].legend(loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def targets(task_name: str, results: dict[str, dict[str, dict[str, float]]]) -> list[tuple[str, float, bool]]:
    """The issue's targets, as (description, measured value, met)."""
    fed, central, local = results["federated"], results["centralized"], results["local"]
    checks = []
    if task_name == "defect":
        for m in ("eval_macro_f1", "eval_auroc"):
            ratio = fed["pooled"][m] / central["pooled"][m]
            checks.append((f"federated / centralized pooled {m.removeprefix('eval_')} >= 0.95", ratio, ratio >= 0.95))
        for who in fed:
            if who != "pooled":
                gap = fed[who]["eval_macro_f1"] - local[who]["eval_macro_f1"]
                checks.append((f"{who}: federated - local macro_f1 >= 0", gap, gap >= 0))
    if task_name == "process":
        det, far = fed["pooled"]["eval_detection_rate"], fed["pooled"]["eval_false_alarm_rate"]
        checks.append(("federated detection rate >= 0.90 (detectable faults)", det, det >= 0.90))
        checks.append(("federated false alarm rate <= 0.05", far, far <= 0.05))
        at5 = fed["pooled"]["eval_detection_at_5pct_false_alarms"]
        checks.append(("federated detection rate >= 0.90 where the alarm limit allows <= 5% false alarms", at5, at5 >= 0.90))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="defect")
    parser.add_argument("--model", default="")
    parser.add_argument("--plants", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--examples-per-plant", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=Path(".maxfl-bench"))
    args = parser.parse_args()

    work = (args.workdir / f"baselines-{args.task}").resolve()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the cleanup below
    # One LocalFederation prepares the plants' data and keeps an MLflow server up for all arms.
    anchor = LocalFederation(FederationSettings(app_dir=find_app_dir(), workdir=work, plants=args.plants,
                                                examples_per_plant=args.examples_per_plant))
    try:
        run(args, anchor, work)
    finally:
        anchor.procs.stop_all()


def run(args: argparse.Namespace, anchor: LocalFederation, work: Path) -> None:
    task = get_task(args.task)
    plants = anchor.prepare_data(args.task, args.seed)
    spec = task.make_spec({p.plant_id: task.profile(p.data_dir, args.seed) for p in plants}, TaskOptions(model=args.model))
    datas = {p.plant_id: task.load_plant_data(p.data_dir, args.seed, spec) for p in plants}
    timings: dict[str, float] = {}

    results: dict[str, dict[str, dict[str, float]]] = {"local": {}}
    local_models = {}
    started = time.perf_counter()
    for plant, data in datas.items():
        local_models[plant] = train_rounds(task, spec, data, plant, args)
        results["local"][plant] = task.evaluate(local_models[plant], data, spec)
    timings["local_s"] = time.perf_counter() - started
    # local models are scored on their own plant; "pooled" = examples-weighted mean of the plants' scores
    n_test = {p: len(d.y_test) for p, d in datas.items()}
    common = set.intersection(*(set(results["local"][p]) for p in datas))  # e.g. recall of a class every plant has
    results["local"]["pooled"] = {
        k: sum(results["local"][p][k] * n_test[p] for p in datas) / sum(n_test.values()) for k in sorted(common)
    }

    started = time.perf_counter()
    results["centralized"] = score(task, spec, train_rounds(task, spec, pooled(list(datas.values())), "pooled", args), datas)
    timings["centralized_s"] = time.perf_counter() - started

    started = time.perf_counter()
    uri = anchor.start_mlflow(anchor.reserve_port())
    fed_model, fed_run_id = federated_model(task, spec, args, work, uri)
    results["federated"] = score(task, spec, fed_model, datas)
    timings["federated_s"] = time.perf_counter() - started

    # Is federated vs local on a plant a real difference or test-set noise? Paired bootstrap over its test split.
    # Two classes only: with many rare classes, macro-F1 over the classes present changes with each resample.
    gaps = {}
    if spec.num_classes == 2:
        gaps = {plant: paired_bootstrap(fed_model, local_models[plant], data, spec.num_classes, seed=args.seed) for plant, data in datas.items()}
    text, rows = table(args.task, results)
    if args.task == "process":
        text += "\n\n" + per_fault_table(results)
    checks = targets(args.task, results)
    print(text)
    for what, value, met in checks:
        print(f"{'PASS' if met else 'FAIL'}  {what}: {value:.3f}")
    for plant, (gap, low, high) in gaps.items():
        print(f"{plant}: federated - local macro_f1 = {gap:+.3f}, 95% paired-bootstrap interval [{low:+.3f}, {high:+.3f}]")

    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"baselines-{args.task}.png"
    plot(args.task, results, png)
    report = {"task": args.task, "args": {k: str(v) for k, v in vars(args).items()}, "spec": spec.model_dump(mode="json"),
              "results": results, "rows": rows, "targets": [{"what": w, "value": v, "met": m} for w, v, m in checks],
              "timings_s": timings, "federated_mlflow_run": fed_run_id,
              "federated_minus_local_macro_f1": {p: {"gap": g, "ci95": [lo, hi]} for p, (g, lo, hi) in gaps.items()}}
    out = RESULTS / f"baselines-{args.task}.json"
    atomic_write_text(out, json.dumps(report, indent=2))
    log_to_mlflow(uri, args, results, text, png, out, fed_run_id)
    print(f"wrote {out} and {png}; MLflow {uri} experiment maxfl-baselines")


def log_to_mlflow(uri: str, args: argparse.Namespace, results: dict[str, dict[str, dict[str, float]]], text: str,
                  png: Path, out: Path, fed_run_id: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("maxfl-baselines")
    with mlflow.start_run(run_name=f"baselines-{args.task}", tags={"maxfl.task": args.task, "maxfl.federated_run": fed_run_id}):
        mlflow.log_params({k: str(v) for k, v in vars(args).items()})
        for arm, per in results.items():
            with mlflow.start_run(run_name=arm, nested=True):
                mlflow.log_metrics({f"{who}/{k}": v for who, m in per.items() for k, v in m.items() if v == v})
        mlflow.log_text(text, "baselines.md")
        mlflow.log_artifact(str(png))
        mlflow.log_artifact(str(out))


if __name__ == "__main__":
    main()
