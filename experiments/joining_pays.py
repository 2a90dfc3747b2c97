"""Does joining pay? Per plant: what it could train alone vs what it serves after joining, at epsilon 3 and without DP.

For every seed (the seed sets the plants' split, the held-out splits, the initial model and the batches):
- local: each plant trains the task's model alone on its own training split, without DP (what it could do alone);
- federated: a real local federation (MLflow, SuperLink, one SuperNode per plant, `flwr run`), DP-SGD at every
  plant with its own ceiling = the target epsilon and fresh ledgers, and the same without DP;
- served: what each plant's deploy handler serves from that federated model: the best of {global, personalised,
  local-only} on a validation split cut from its training records (fl_client.personalise.choose, the same call).
Every model is scored on each plant's held-out test split; "pooled" pools the plants' test records, each scored by
the model that plant serves. Served vs local per plant: the difference in macro-F1 with a 95% paired-bootstrap
interval over the plant's test records.

    .venv/bin/python experiments/joining_pays.py --seeds 42,43,44
    .venv/bin/python experiments/joining_pays.py --task process --model stats --seeds 42,43,44 --rounds 5 --local-epochs 5 --learning-rate 0.2

For the process task every score also has the task's detection figures (detection where the alarm limit lets through
at most 5% false alarms, detection and false alarms at the spec's limit, detection per fault).

Prints a table, writes experiments/results/joining-pays-<task>.json and updates experiments/results/headline.json
(mean, sd, seeds, command and git commit per headline figure).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from baselines import federated_model, paired_bootstrap
from provenance import git_commit

from fl_client.personalise import PersonaliseSettings, choose
from maxfl.atomic import atomic_write_text
from launcher.federation import FederationSettings, LocalFederation, find_app_dir
from tasks import get_task
from tasks.base import PlantData, Task, TaskOptions, TaskSpec, TrainSettings
from tasks.classification import classification_metrics, predict_logits
from tasks.process.task import detection_metrics

RESULTS = Path(__file__).parent / "results"
DELTA = 1e-5
HEADLINE = RESULTS / "headline.json"


def train_local(task: Task, spec: TaskSpec, data: PlantData, plant: str, args: argparse.Namespace) -> torch.nn.Module:
    """The plant alone, without DP: the same model, epochs (rounds x local epochs) and schedule as the federation."""
    torch.manual_seed(args.seed)
    model = task.build_model(spec)
    for r in range(1, args.rounds + 1):
        settings = TrainSettings.for_round(args.local_epochs, args.local_batch_size, args.learning_rate, "cosine", args.seed, plant, r, args.rounds)
        task.train(model, data, settings, spec)
    return model


def _metrics(logits: torch.Tensor, y: torch.Tensor, spec: TaskSpec) -> dict[str, float]:
    out = classification_metrics(logits, y, spec.num_classes)
    if spec.task == "process":  # fault detection: alarms where the model gives normal operation little probability
        out |= detection_metrics(logits.softmax(1), y, spec)
    return out


def scored(models: dict[str, torch.nn.Module], datas: dict[str, PlantData], spec: TaskSpec) -> dict[str, dict[str, float]]:
    """Each plant's test split scored by its own model, and all test records pooled, each by its plant's model."""
    logits = {p: predict_logits(models[p], d.x_test) for p, d in datas.items()}
    out = {p: _metrics(logits[p], d.y_test, spec) for p, d in datas.items()}
    out["pooled"] = _metrics(torch.cat(list(logits.values())), torch.cat([d.y_test for d in datas.values()]), spec)
    return out


def one_seed(args: argparse.Namespace, seed: int, work: Path) -> dict[str, Any]:
    args.seed = seed
    task = get_task(args.task)
    seed_dir = work / f"seed-{seed}"
    anchor = LocalFederation(FederationSettings(app_dir=find_app_dir(), workdir=seed_dir, plants=args.plants,
                                                examples_per_plant=args.examples_per_plant))
    try:
        started = time.perf_counter()
        plants = anchor.prepare_data(args.task, seed)
        prepare_s = time.perf_counter() - started  # includes simulating any recording not yet cached
        spec = task.make_spec({p.plant_id: task.profile(p.data_dir, seed) for p in plants}, TaskOptions(model=args.model))
        datas = {p.plant_id: task.load_plant_data(p.data_dir, seed, spec) for p in plants}
        uri = anchor.start_mlflow(anchor.reserve_port())
        started = time.perf_counter()
        local = {p: train_local(task, spec, d, p, args) for p, d in datas.items()}
        timings = {"prepare_data_s": prepare_s, "local_s": time.perf_counter() - started}
        arms: dict[str, Any] = {"local": {"scores": scored(local, datas, spec)}}
        for name, eps in (("eps3", args.epsilon), ("nodp", math.inf)):
            ledgers = seed_dir / "ledgers" / name
            shutil.rmtree(ledgers, ignore_errors=True)  # every arm starts with nothing spent, and the anchor has seen nothing
            private = not math.isinf(eps)
            watch = {"privacy-watch": str(ledgers / "anchor-privacy-watch.json")}
            privacy = ({"privacy": "dp-sgd", "target-epsilon": eps, "max-grad-norm": args.max_grad_norm} if private else {"privacy": "none"}) | watch
            started = time.perf_counter()
            model, run_id = federated_model(task, spec, args, seed_dir, uri, privacy=privacy, max_epsilon=eps, delta=DELTA, ledger_dir=ledgers)
            timings[f"{name}_federation_s"] = time.perf_counter() - started
            arms[f"{name}/global"] = {"scores": scored({p: model for p in datas}, datas, spec), "mlflow_run": run_id}
            metric = headline_metric(args.task)
            if args.no_served:
                print(f"seed {seed} {name}: {metric} global {arms[f'{name}/global']['scores']['pooled'][metric]:.3f}, "
                      f"local {arms['local']['scores']['pooled'][metric]:.3f}", flush=True)
                continue
            started = time.perf_counter()
            defaults = task.training_defaults(spec)  # what the deploy handler uses (fl_client.client_app.personalise_release)
            settings = PersonaliseSettings(epochs=5 * defaults.local_epochs, learning_rate=defaults.learning_rate,
                                           folds=defaults.validation_folds, seed=seed)
            choices = {p: choose(task, spec, model, d, "eval_macro_f1", settings) for p, d in datas.items()}
            timings[f"{name}_personalise_s"] = time.perf_counter() - started
            arms[f"{name}/served"] = {
                "scores": scored({p: c.model for p, c in choices.items()}, datas, spec),
                "variants": {p: c.variant for p, c in choices.items()},
                "validation": {p: c.scores for p, c in choices.items()},
                "served_minus_local_macro_f1": {
                    p: dict(zip(("gap", "low", "high"), paired_bootstrap(choices[p].model, local[p], d, spec.num_classes, seed=seed), strict=True))
                    for p, d in datas.items()
                },
            }
            print(f"seed {seed} {name}: {metric} global {arms[f'{name}/global']['scores']['pooled'][metric]:.3f}, "
                  f"served {arms[f'{name}/served']['scores']['pooled'][metric]:.3f}, local {arms['local']['scores']['pooled'][metric]:.3f} "
                  f"({', '.join(f'{p} {c.variant}' for p, c in choices.items())})", flush=True)
        # training records: all, and those DP-SGD samples from (records that share no raw sample); test records
        records = {p: [len(d.y_train), len(d.private_records()), len(d.y_test)] for p, d in datas.items()}
        return {"seed": seed, "arms": arms, "timings_s": timings, "records": records}
    finally:
        anchor.procs.stop_all()


PROCESS_METRICS = ("eval_detection_at_5pct_false_alarms", "eval_detection_rate", "eval_false_alarm_rate")


def headline_metric(task: str) -> str:
    """What a plant of this task cares about most: detection at <= 5% false alarms for a process, macro-F1 otherwise."""
    return PROCESS_METRICS[0] if task == "process" else "eval_macro_f1"


def summary(seeds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and sd over seeds of the pooled figures and of how many plants' served model scored below local
    (at all, and with the paired-bootstrap interval below zero)."""
    def stat(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}

    pooled = seeds[0]["arms"]["local"]["scores"]["pooled"]
    metrics = ("eval_macro_f1", "eval_auroc", *(m for m in PROCESS_METRICS if m in pooled))
    out: dict[str, dict[str, float]] = {}
    for arm in seeds[0]["arms"]:
        for metric in metrics:
            out[f"{arm}/pooled/{metric}"] = stat([s["arms"][arm]["scores"]["pooled"][metric] for s in seeds])
        for metric in sorted(k for k in pooled if k.startswith("eval_detection_idv")):  # per fault, pooled
            out[f"{arm}/pooled/{metric}"] = stat([s["arms"][arm]["scores"]["pooled"].get(metric, math.nan) for s in seeds])
    for arm in (a for a in ("eps3/served", "nodp/served") if a in seeds[0]["arms"]):
        below = [sum(s["arms"][arm]["scores"][p]["eval_macro_f1"] < s["arms"]["local"]["scores"][p]["eval_macro_f1"]
                     for p in s["records"]) for s in seeds]
        out[f"{arm}/plants_below_local"] = stat([float(b) for b in below])
        # below with the 95% paired-bootstrap interval of served - local macro-F1 entirely under zero
        surely = [sum(v["high"] < 0 for v in s["arms"][arm]["served_minus_local_macro_f1"].values()) for s in seeds]
        out[f"{arm}/plants_significantly_below_local"] = stat([float(b) for b in surely])
    return out


def table(seeds: list[dict[str, Any]], metric: str = "eval_macro_f1") -> str:
    name = metric.removeprefix("eval_")
    lines = [f"| seed | arm | pooled {name} | pooled macro-F1 | pooled AUROC | per plant {name} |", "|---|---|---|---|---|---|"]
    for s in seeds:
        for arm, result in s["arms"].items():
            per = " / ".join(f"{result['scores'][p][metric]:.3f}" for p in s["records"])
            pooled = result["scores"]["pooled"]
            lines.append(f"| {s['seed']} | {arm} | {pooled[metric]:.3f} | {pooled['eval_macro_f1']:.3f} | {pooled['eval_auroc']:.3f} | {per} |")
    return "\n".join(lines)


def update_headline(values: dict[str, tuple[dict[str, float], list[int]]], command: str, commit: str, note: str = "") -> None:
    """Merge this script's figures into headline.json; other scripts' keys are kept."""
    headline = json.loads(HEADLINE.read_text()) if HEADLINE.is_file() else {}
    for key, (stat, seeds) in values.items():
        headline[key] = {"mean": stat["mean"], "sd": stat["sd"], "seeds": seeds, "command": command, "commit": commit} | ({"note": note} if note else {})
    atomic_write_text(HEADLINE, json.dumps(dict(sorted(headline.items())), indent=2) + "\n")


UNRECORDED = ("commit", "note", "resume", "seeds", "workdir")  # bookkeeping: runs that differ only here measure the same thing


def resumable(out: Path, recorded: dict[str, str]) -> dict[int, dict[str, Any]]:
    """The seeds an earlier run wrote to `out` with the same experiment arguments; none if they differ."""
    if not out.is_file():
        return {}
    earlier = json.loads(out.read_text())
    if {k: v for k, v in earlier.get("args", {}).items() if k not in UNRECORDED} != recorded:
        print(f"{out} holds a run with other arguments; every seed runs again", flush=True)
        return {}
    return {int(s["seed"]): s for s in earlier.get("seeds", [])}


def recorded_arguments(argv: list[str]) -> list[str]:
    """The command line without --commit, --note and --resume (bookkeeping, not the experiment), in either spelling."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--commit", "--note"):
            skip = True
        elif arg != "--resume" and not arg.startswith(("--commit=", "--note=")):
            kept.append(arg)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="defect", choices=["defect", "images", "process"])
    parser.add_argument("--model", default="", help="the task's model (default: its first, effnet-lite0)")
    parser.add_argument("--plants", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="without DP; under DP each plant's recipe picks its own")
    parser.add_argument("--local-batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.5)
    parser.add_argument("--lr-schedule", default="cosine")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--examples-per-plant", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=Path(".maxfl-bench"))
    parser.add_argument("--commit", default="", help="the commit to record (default: git rev-parse HEAD here; for runs from a copy of the tree)")
    parser.add_argument("--no-served", action="store_true",
                        help="score the federated model as released only, without the plants' personalisation (the served arm)")
    parser.add_argument("--resume", action="store_true", help="keep the seeds the results file already holds for the same arguments")
    parser.add_argument("--note", default="", help="recorded with the results and headline figures (e.g. uncommitted changes in the tree)")
    args = parser.parse_args()
    command = "python experiments/joining_pays.py " + " ".join(recorded_arguments(sys.argv[1:]))
    commit = args.commit or git_commit()
    work = (args.workdir / f"joining-pays-{args.task}").resolve()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through each seed's cleanup
    seed_list = [int(s) for s in args.seeds.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"joining-pays-{args.task}.json"
    recorded = {k: str(v) for k, v in vars(args).items() if k not in UNRECORDED}
    done = resumable(out, recorded) if args.resume else {}
    seeds: list[dict[str, Any]] = []
    for seed in seed_list:
        if seed in done:
            print(f"seed {seed}: kept from {out} ({done[seed].get('command', 'an earlier run')})", flush=True)
            seeds.append(done[seed])
            continue
        seeds.append(one_seed(args, seed, work) | {"command": command, "commit": commit})
        # written after every seed, so a long run that stops keeps what it measured (--resume picks it up)
        atomic_write_text(out, json.dumps({"command": command, "commit": commit, "note": args.note, "args": recorded,
                                           "summary": summary(seeds), "seeds": seeds}, indent=2, default=str) + "\n")
    stats = summary(seeds)
    print(table(seeds, headline_metric(args.task)))
    for key, stat in stats.items():
        print(f"{key}: {stat['mean']:.3f} +- {stat['sd']:.3f}")
    if args.task == "defect":
        update_headline({
            "defect_eps3_served_macro_f1": (stats["eps3/served/pooled/eval_macro_f1"], seed_list),
            "defect_eps3_served_auroc": (stats["eps3/served/pooled/eval_auroc"], seed_list),
            "defect_eps3_plants_below_local": (stats["eps3/served/plants_below_local"], seed_list),
            "defect_eps3_plants_significantly_below_local": (stats["eps3/served/plants_significantly_below_local"], seed_list),
            "defect_nodp_best_macro_f1": (stats["nodp/served/pooled/eval_macro_f1"], seed_list),
        }, command, commit, args.note)
    if args.task == "process":
        update_headline({
            "process_eps3_detection_at_5pct_fa": (stats["eps3/global/pooled/eval_detection_at_5pct_false_alarms"], seed_list),
            "process_nodp_detection_at_5pct_fa": (stats["nodp/global/pooled/eval_detection_at_5pct_false_alarms"], seed_list),
            "process_local_detection_at_5pct_fa": (stats["local/pooled/eval_detection_at_5pct_false_alarms"], seed_list),
        } | ({"process_eps3_served_detection_at_5pct_fa": (stats["eps3/served/pooled/eval_detection_at_5pct_false_alarms"], seed_list)}
             if "eps3/served/pooled/eval_detection_at_5pct_false_alarms" in stats else {}), command, commit, args.note)
    print(f"wrote {out} and {HEADLINE}")


if __name__ == "__main__":
    main()
