"""Privacy vs utility: the federated model at epsilon 1, 3 and 8 per plant (delta 1e-5), and without DP.

Each arm is a real local federation (MLflow, SuperLink, one SuperNode per plant, `flwr run`) with the same
rounds, epochs, batch size and learning rate; only the privacy request differs. Every plant's ceiling is the
arm's epsilon and every arm starts from empty ledgers, so the arms are independent what-ifs on the same data.
The federated model is loaded back from MLflow and scored with the task's own evaluation per plant and pooled.

    .venv/bin/python experiments/privacy_utility.py --task defect --rounds 30 --local-epochs 2
    .venv/bin/python experiments/privacy_utility.py --task process --rounds 20 --local-epochs 2 --seed 7

Prints a table, writes experiments/results/privacy-utility-<task>.json and .png, and logs an MLflow parent run
(experiment `maxfl-privacy`) with one nested run per arm, the table and the plot of metric vs epsilon.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

from baselines import HEADLINE, LOWER_IS_BETTER, federated_model, score

from maxfl.atomic import atomic_path, atomic_write_text
from launcher.federation import FederationSettings, LocalFederation, find_app_dir
from privacy.ledger import Ledger
from tasks import get_task
from tasks.base import TaskOptions

RESULTS = Path(__file__).parent / "results"
EPSILONS = (1.0, 3.0, 8.0, math.inf)
DELTA = 1e-5


def _label(eps: float) -> str:
    return "no DP" if math.isinf(eps) else f"eps={eps:g}"


def spent(ledger_dir: Path, plants: list[str]) -> dict[str, dict[str, float]]:
    """Per plant, what its own ledger says the arm spent, and the noise multiplier it derived."""
    out = {}
    for plant in plants:
        state = Ledger(ledger_dir / f"{plant}.json", plant).read()
        (data_set,) = state.data_sets.values()
        out[plant] = {"epsilon": data_set.spent(DELTA), "noise_multiplier": data_set.entries[-1].noise_multiplier,
                      "rounds": len(data_set.entries)}
    return out


def plot(task_name: str, arms: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = HEADLINE[task_name][:3]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    finite = [a for a in arms.values() if not math.isinf(a["epsilon"])]
    for ax, metric in zip(axes, metrics, strict=True):
        for who in [*sorted(next(iter(arms.values()))["scores"])]:
            ys = [a["scores"][who].get(metric, float("nan")) for a in finite]
            ax.plot([a["epsilon"] for a in finite], ys, marker="o", lw=2.5 if who == "pooled" else 1, label=who)
        no_dp = next((a for a in arms.values() if math.isinf(a["epsilon"])), None)
        if no_dp is not None:
            ax.axhline(no_dp["scores"]["pooled"].get(metric, float("nan")), ls="--", color="grey", label="pooled, no DP")
        ax.set_xscale("log")
        ax.set_xticks([a["epsilon"] for a in finite], [f"{a['epsilon']:g}" for a in finite])
        ax.minorticks_off()
        ax.set_xlabel("epsilon per plant (delta 1e-5)")
        ax.set_title(metric.removeprefix("eval_") + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{task_name}: federated model vs privacy budget")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="defect", choices=["defect", "process", "table", "images"])
    parser.add_argument("--model", default="")
    parser.add_argument("--plants", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"])
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--epsilons", default="1,3,8,none", help="comma-separated; 'none' = no DP")
    parser.add_argument("--examples-per-plant", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=Path(".maxfl-bench"))
    parser.add_argument("--name", default="", help="results file name (default privacy-utility-<task>); for repeats")
    args = parser.parse_args()
    epsilons = [math.inf if e.strip() == "none" else float(e) for e in args.epsilons.split(",")]

    work = (args.workdir / f"privacy-{args.task}").resolve()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the cleanup below
    anchor = LocalFederation(FederationSettings(app_dir=find_app_dir(), workdir=work, plants=args.plants,
                                                examples_per_plant=args.examples_per_plant))
    try:
        run(args, epsilons, anchor, work)
    finally:
        anchor.procs.stop_all()


def run(args: argparse.Namespace, epsilons: list[float], anchor: LocalFederation, work: Path) -> None:
    task = get_task(args.task)
    plants = anchor.prepare_data(args.task, args.seed)
    spec = task.make_spec({p.plant_id: task.profile(p.data_dir, args.seed) for p in plants}, TaskOptions(model=args.model))
    datas = {p.plant_id: task.load_plant_data(p.data_dir, args.seed, spec) for p in plants}
    uri = anchor.start_mlflow(anchor.reserve_port())
    arms: dict[str, Any] = {}
    for eps in epsilons:
        ledgers = work / "ledgers" / _label(eps).replace("=", "-").replace(" ", "-")
        for old in ledgers.glob("plant-*"):
            old.unlink()  # each arm is its own what-if: plants start with nothing spent (ledger, key and journal)
        private = not math.isinf(eps)
        privacy = ({"privacy": "dp-sgd", "target-epsilon": eps, "max-grad-norm": args.max_grad_norm} if private else {"privacy": "none"}) | {
            "privacy-watch": "off"}  # arms reset the plants' ledgers on purpose
        started = time.perf_counter()
        model, run_id = federated_model(task, spec, args, work, uri, privacy=privacy, max_epsilon=eps, delta=DELTA, ledger_dir=ledgers)
        arms[_label(eps)] = {"epsilon": eps, "mlflow_run": run_id, "seconds": time.perf_counter() - started,
                             "scores": score(task, spec, model, datas),
                             "ledgers": spent(ledgers, list(datas)) if private else {}}
        print(f"{_label(eps)}: {arms[_label(eps)]['scores']['pooled']}", flush=True)

    text = table(args.task, arms)
    checks = targets(args.task, arms)
    print(text)
    for what, value, met in checks:
        print(f"{'PASS' if met else 'FAIL'}  {what}: {value:.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = args.name or f"privacy-utility-{args.task}"
    png = RESULTS / f"{name}.png"
    plot(args.task, arms, png)
    out = RESULTS / f"{name}.json"
    atomic_write_text(out, json.dumps({"task": args.task, "delta": DELTA, "args": {k: str(v) for k, v in vars(args).items()},
                                       "arms": arms, "targets": [{"what": w, "value": v, "met": m} for w, v, m in checks]},
                                      indent=2, default=str))
    log_to_mlflow(uri, args, arms, text, png, out)
    print(f"wrote {out} and {png}; MLflow {uri} experiment maxfl-privacy")


def table(task_name: str, arms: dict[str, Any]) -> str:
    metrics = HEADLINE[task_name]
    lines = [f"| arm | who | {' | '.join(m.removeprefix('eval_') for m in metrics)} | epsilon spent (ledger) | noise multiplier |",
             "|---|---|" + "---|" * (len(metrics) + 2)]
    for label, arm in arms.items():
        for who, scores in arm["scores"].items():
            ledger = arm["ledgers"].get(who, {})
            eps = f"{ledger['epsilon']:.3f}" if ledger else ("inf" if math.isinf(arm["epsilon"]) and who != "pooled" else "")
            sigma = f"{ledger['noise_multiplier']:.3f}" if ledger else ""
            lines.append(f"| {label} | {who} | " + " | ".join(f"{scores.get(m, float('nan')):.3f}" for m in metrics) + f" | {eps} | {sigma} |")
    return "\n".join(lines)


def targets(task_name: str, arms: dict[str, Any]) -> list[tuple[str, float, bool]]:
    if task_name != "defect" or "eps=3" not in arms or "no DP" not in arms:
        return []
    ratio = arms["eps=3"]["scores"]["pooled"]["eval_macro_f1"] / arms["no DP"]["scores"]["pooled"]["eval_macro_f1"]
    return [("defect federated macro-F1 at eps=3 / without DP >= 0.90", ratio, ratio >= 0.90)]


def log_to_mlflow(uri: str, args: argparse.Namespace, arms: dict[str, Any], text: str, png: Path, out: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("maxfl-privacy")
    with mlflow.start_run(run_name=f"privacy-utility-{args.task}", tags={"maxfl.task": args.task}):
        mlflow.log_params({k: str(v) for k, v in vars(args).items()})
        for label, arm in arms.items():
            with mlflow.start_run(run_name=label, nested=True, tags={"maxfl.federated_run": arm["mlflow_run"]}):
                mlflow.log_param("target_epsilon", "none" if math.isinf(arm["epsilon"]) else arm["epsilon"])
                mlflow.log_metrics({f"{who}/{k}": v for who, m in arm["scores"].items() for k, v in m.items() if v == v})
                mlflow.log_metrics({f"{who}/dp_epsilon": v["epsilon"] for who, v in arm["ledgers"].items()})
        mlflow.log_text(text, "privacy-utility.md")
        mlflow.log_artifact(str(png))
        mlflow.log_artifact(str(out))


if __name__ == "__main__":
    main()
