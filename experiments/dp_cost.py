"""DP-SGD cost per local epoch on this CPU, against the same epoch without DP.

Each task's model trains through the same loop the plants run (`train_classifier`, with the defect task's
flip augmentation), on tensors of the task's real input shape and a realistic plant size, for the local epochs
its plants run in one round (one DP-SGD session: the head on frozen features trains 5, the end-to-end models 1),
so the per-round set-up (Opacus wrapping the model, optimizer and loader) is shared by those epochs as at a plant.
A session is timed after one warm-up session; the median of `--repeats` sessions, divided by its epochs, is
reported. Both arms see the same records (the cost of the mechanism), except in the "tiling" row: that is what
a process plant runs, DP-SGD over the windows that share no sample (1 in 20) against the non-private epoch over
all of them.

    .venv/bin/python experiments/dp_cost.py            # all models, batch sizes 32..256, every grad-sample mode
    .venv/bin/python experiments/dp_cost.py --quick    # batch 32 and 128, hooks and ghost

Prints a table; writes experiments/results/dp-cost.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

import torch
from torch import nn

from provenance import git_commit, provenance

from maxfl.atomic import atomic_write_text
from privacy.accountant import Mechanism, poisson_schedule
from privacy.dpsgd import DPSGD, grad_sample_mode_for
from tasks.base import HEAD_TRAINING, PlantData, TrainingDefaults, TrainSettings
from tasks.classification import train_classifier
from tasks.defect import flip_augment
from tasks.defect.model import DefectCNN
from tasks.features import FeatureHead
from tasks.process.model import ProcessCNN, ProcessMLP
from tasks.table.model import build_table_model

RESULTS = Path(__file__).parent / "results" / "dp-cost.json"


def _case(name: str, build: Callable[[], nn.Module], shape: tuple[int, ...], records: int, classes: int, augment: bool,
          tiling: int = 1, epochs: int = TrainingDefaults().local_epochs) -> dict:
    """`tiling` > 1: DP-SGD samples one record in `tiling` (the process task's windows that share no sample);
    `epochs`: the model's local epochs per round (`Task.training_defaults`), all in one session."""
    return {"name": name, "build": build, "shape": shape, "records": records, "classes": classes, "augment": augment, "tiling": tiling,
            "epochs": epochs}


CASES = [
    # what an image plant trains by default: a linear head on frozen EfficientNet-Lite0 features (tasks.features)
    _case("defect effnet-lite0 head (2560)", lambda: FeatureHead(2560, 2), (2560,), 420, 2, False, epochs=HEAD_TRAINING.local_epochs),
    _case("defect cnn (1x64x64)", lambda: DefectCNN(2), (1, 64, 64), 700, 2, True),
    _case("process cnn1d (53x20)", lambda: ProcessCNN(53, 17), (53, 20), 3000, 17, False),
    # what a process plant runs: DP-SGD over its tiling of windows vs the non-private epoch over all of them
    _case("process cnn1d, tiling", lambda: ProcessCNN(53, 17), (53, 20), 3000, 17, False, tiling=20),
    _case("process mlp (53x20)", lambda: ProcessMLP(53, 20, 17), (53, 20), 3000, 17, False),
    _case("table mlp (12)", lambda: build_table_model("mlp", 12, 2), (12,), 3000, 2, False),
]


def _epoch_seconds(case: dict, batch_size: int, modes: tuple[str, ...], repeats: int) -> dict[str, Any]:
    """Median seconds per epoch of a round's session, per arm (None = no DP). Arms take turns session by session,
    so a slow spell of the machine hits them all alike instead of whichever arm happened to run then."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case["records"], *case["shape"], generator=gen)
    y = torch.randint(0, case["classes"], (case["records"],), generator=gen)
    data = PlantData(x, y, x[:2], y[:2], fingerprint="bench", disjoint_train=torch.arange(0, case["records"], case["tiling"]))
    epochs = case["epochs"]
    q, steps = poisson_schedule(len(data.private_records()), batch_size, epochs)
    arms: list[str | None] = [None, *modes]
    torch.manual_seed(0)
    models = {arm: case["build"]() for arm in arms}
    times: dict[str | None, list[float]] = {arm: [] for arm in arms}
    for repeat in range(repeats + 1):
        for arm in arms:
            settings = TrainSettings(epochs=epochs, batch_size=batch_size, learning_rate=0.01, seed=repeat)
            if arm is not None:
                dp = DPSGD(Mechanism(noise_multiplier=1.0, sample_rate=q, steps=steps), 1.0, arm)  # type: ignore[arg-type]
                settings = TrainSettings(epochs, batch_size, 0.01, repeat, dp)
            started = time.perf_counter()
            train_classifier(models[arm], data, settings, case["classes"], augment=flip_augment if case["augment"] else None)
            if repeat:  # the first session warms up allocators and lazy imports
                times[arm].append((time.perf_counter() - started) / epochs)
    return {str(arm): statistics.median(t) for arm, t in times.items()} | {f"{arm}/epochs": t for arm, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", default="", help="run only the models whose name contains this")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--headline-batch", type=int, default=0,
                        help="record this batch size's hooks ratio of the first model as dp_epoch_cost_ratio in headline.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = (32, 128) if args.quick else (32, 64, 128, 256)
    modes = ("hooks", "ghost") if args.quick else ("hooks", "ew", "ghost", "functorch")
    rows = []
    print(f"{'model':24} {'batch':>5} {'no DP s':>8} " + " ".join(f"{m + ' x':>11}" for m in modes))
    for case in [c for c in CASES if args.only in c["name"]]:
        for batch_size in batches:
            seconds = _epoch_seconds(case, batch_size, modes, args.repeats)
            base = seconds["None"]
            row = {"model": case["name"], "records": case["records"], "epochs_per_session": case["epochs"], "batch_size": batch_size,
                   "plant_mode": grad_sample_mode_for(case["build"]()), "no_dp_s": base,
                   "modes": {m: {"epoch_s": seconds[m], "ratio": seconds[m] / base,
                                 "epoch_ratios": [d / n for d, n in zip(seconds[f"{m}/epochs"], seconds["None/epochs"], strict=True)]}
                             for m in modes}}
            rows.append(row)
            cells = " ".join(f"{row['modes'][m]['ratio']:>10.2f}x" for m in modes)
            print(f"{case['name']:24} {batch_size:>5} {base:>8.3f} {cells}", flush=True)
    result = {**provenance(), "command": "python experiments/dp_cost.py " + " ".join(sys.argv[1:]), "torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
              "repeats": args.repeats, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "rows": rows}
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    if args.headline_batch:
        headline_ratio(rows, args)


def headline_ratio(rows: list[dict], args: argparse.Namespace) -> None:
    """The default model's DP/no-DP epoch ratio at the batch its plants' recipe picks, in the grad-sample mode its
    plants use (privacy.dpsgd.grad_sample_mode_for), median over the repeats."""
    row = next(r for r in rows if r["batch_size"] == args.headline_batch)
    path = RESULTS.parent / "headline.json"
    headline = json.loads(path.read_text()) if path.is_file() else {}
    mode = row["plant_mode"]
    ratios = row["modes"][mode]["epoch_ratios"]  # one per interleaved pair of sessions
    headline["dp_epoch_cost_ratio"] = {"mean": statistics.fmean(ratios), "sd": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
                                       "median": row["modes"][mode]["ratio"], "seeds": list(range(len(ratios))), "model": row["model"],
                                       "grad_sample_mode": mode, "epochs_per_session": row["epochs_per_session"],
                                       "batch_size": row["batch_size"], "repeats": args.repeats,
                                       "command": "python experiments/dp_cost.py " + " ".join(sys.argv[1:]), "commit": git_commit()}
    atomic_write_text(path, json.dumps(dict(sorted(headline.items())), indent=2) + "\n")


if __name__ == "__main__":
    main()
