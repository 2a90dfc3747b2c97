"""The anchor's ServerApp: validate the run config, run the strategy, track it in MLflow, log the model."""

from __future__ import annotations

import logging

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fl_server.central_dp import with_central_dp
from fl_server.config import RunConfig
from fl_server.data_agreement import agree_on_data
from fl_server.grid import PollingGrid
from fl_server.strategy import TrackedStrategy, build_strategy
from fl_server.push import deliver_pending, push
from fl_server.registry import Registry, RegistryError
from fl_server.release import release_model
from fl_server.tracking import RunTracker, tracked_run
from maxfl.flower_tuning import tune_object_pulls
from maxfl.messages import TrainingPlan
from maxfl.weights import pack, unpack_into
from tasks import get_task

app = ServerApp()
log = logging.getLogger("maxfl")


def _log_to_stream() -> None:
    """maxfl's progress lines go to the ServerApp's output, which `flwr run --stream` shows."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_to_stream()
    cfg = RunConfig.from_flower(context.run_config)
    tune_object_pulls(initial_backoff_s=cfg.poll_interval_s / 2, backoff_cap_s=cfg.poll_interval_s)
    grid = PollingGrid(grid, cfg.poll_interval_s)
    with tracked_run(cfg, grid.run.run_id, grid.run.fab_hash) as tracker:
        registry = Registry(tracker.tracking_uri, cfg.model_name())
        deliver_pending(grid, cfg, registry)  # plants that were offline at a push get it first thing
        if cfg.action == "push":
            push_version(grid, cfg, registry, tracker)
        else:
            train(grid, cfg, tracker)


def push_version(grid: Grid, cfg: RunConfig, registry: Registry, tracker: RunTracker) -> None:
    """A push run: one registered version (default: the champion) to the plants' edge stores."""
    if cfg.push_version:
        version = cfg.push_version
    elif (champion := registry.champion()) is not None:
        version = champion.version
    else:
        raise RegistryError(f"'{registry.name}' has no champion to push; name a version with push-version")
    release = registry.load_release(version)
    targets = {p.strip() for p in cfg.push_plants.split(",") if p.strip()} or None
    log.info("push: %s v%d to %s", registry.name, version, ", ".join(sorted(targets)) if targets else "every plant")
    tracker.log_push(push(grid, cfg, registry, release.manifest, release.onnx, targets, wait_s=cfg.push_wait_s))


def train(grid: Grid, cfg: RunConfig, tracker: RunTracker) -> None:
    """Train, then gate, register and push the final model (release)."""
    task = get_task(cfg.task)
    log.info("MLflow run %s: %d rounds of %s on task %s", tracker.run_id, cfg.num_server_rounds, cfg.strategy, cfg.task)
    spec, profiles = agree_on_data(grid, cfg, task)
    tracker.log_data_agreement(spec, profiles)
    torch.manual_seed(cfg.seed)
    model = task.build_model(spec)
    plan = TrainingPlan(
        task=cfg.task,
        seed=cfg.seed,
        task_spec=spec.model_dump_json(),
        local_epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_schedule=cfg.lr_schedule,
        num_server_rounds=cfg.num_server_rounds,
        **cfg.privacy_fields(),
    ).to_flower()
    strategy = TrackedStrategy(
        with_central_dp(build_strategy(cfg), cfg, len(profiles)), tracker, cfg.min_plants, cfg.num_server_rounds, cfg.evaluate_every
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=pack(model),
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout_s,
        train_config=ConfigRecord(plan),
        evaluate_config=ConfigRecord(plan),
    )
    unpack_into(model, result.arrays)
    model_uri = tracker.log_model(model, task.input_example(spec))
    log.info("MLflow run %s: model logged as %s", tracker.run_id, model_uri)
    if cfg.release:
        release_model(grid, cfg, task, spec, model, result.arrays, plan, tracker, model_uri)
