"""The anchor's ServerApp: validate the run config, run the strategy, track it in MLflow, log the model."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fl_server.run.central_dp import with_central_dp
from fl_server.run.config import RunConfig
from fl_server.run.contribution_round import assess_contributions, record_rounds, round_store
from fl_server.run.data_agreement import agree_on_data, agreed_examples
from fl_server.run.encoding import DecodedUpdates
from fl_server.run.checkpoint import CheckpointStore
from fl_server.run.grid import PollingGrid
from fl_server.run.identity import PlantIdentities, use_identities
from fl_server.run.strategy import RunAborted, TrackedStrategy, build_strategy, without_addresses
from fl_server.federation.provision import PLANTS_FILE, ProvisionError, load_federation
from fl_server.release.push import deliver_pending, push
from fl_server.federation.reconcile import Reconciliation, reconcile
from fl_server.release.registry import Registry, RegistryError
from fl_server.release.chain import gate_rule, release_model
from fl_server.run.tracking import RunTracker, tracked_run
from fl_server.run.privacy_watch import SpendWatch
from fl_server.run.validation import SpendHook, UpdateRules, ValidatedStrategy, log_capped, log_rejection
from maxfl.audit import AuditLog
from maxfl.flower_tuning import tune_object_pulls
from maxfl.messages import FINGERPRINT_KEY, METRICS, PLANT, TrainingPlan
from maxfl.weights import pack, unpack_into
from tasks import get_task
from tasks.base import TaskSpec
from tasks.features import get_backbone

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
    os.umask(0o077)  # what this run writes (checkpoints, weights and profiles in a file-based MLflow store): owner only
    _log_to_stream()
    cfg = RunConfig.from_flower(context.run_config)
    tune_object_pulls(initial_backoff_s=cfg.poll_interval_s / 2, backoff_cap_s=cfg.poll_interval_s)
    grid = PollingGrid(grid, cfg.poll_interval_s)
    with tracked_run(cfg, grid.run.run_id, grid.run.fab_hash) as tracker:
        tracker.audit = AuditLog(cfg.audit_log_path())
        started = {"flwr_run": grid.run.run_id, "fab_hash": grid.run.fab_hash, "action": cfg.action, "task": cfg.task,
                   "strategy": cfg.strategy, "rounds": cfg.num_server_rounds}
        tracker.audit_event("run.resumed" if cfg.resume else "run.started", **started)
        try:
            use_identities(plant_identities(cfg, tracker))
            reconcile_nodes(cfg, tracker)
            registry = Registry(tracker.tracking_uri, cfg.model_name())
            tracker.audit_deployments(deliver_pending(grid, cfg, registry))  # plants offline at a push get it first thing
            if cfg.action == "push":
                push_version(grid, cfg, registry, tracker)
            else:
                train(grid, cfg, tracker)
        except Exception as exc:
            tracker.audit_event("run.failed", flwr_run=grid.run.run_id, reason=without_addresses(f"{type(exc).__name__}: {exc}"))
            raise
        tracker.audit_event("run.finished", flwr_run=grid.run.run_id)


def plant_identities(cfg: RunConfig, tracker: RunTracker) -> PlantIdentities:
    """Replies are attributed by node (fl_server.run.identity): from the federation's plants.json when there is one."""
    def spoofed(node: int, claimed: str, plant: str, kind: str) -> None:
        tracker.audit_event("reply.spoofed", node_id=node, claimed=claimed, plant=plant, message_type=kind)

    folder = cfg.federation_folder()
    plants_file = folder / PLANTS_FILE if folder is not None else None
    return PlantIdentities(plants_file, on_spoof=spoofed)


def reconcile_nodes(cfg: RunConfig, tracker: RunTracker, **hooks: Any) -> Reconciliation | None:
    """Nodes registered outside maxfl are reported and (by default) unregistered before the run (fl_server.federation.reconcile).

    Their replies are refused anyway (fl_server.run.identity), so a Control API that cannot be asked stops nothing: it
    is logged and audited (`node.reconcile_failed`). `hooks`: the lister and unregisterer, for tests.
    """
    if (folder := cfg.federation_folder()) is None:
        return None
    try:
        result = reconcile(load_federation(folder), remove_unknown=cfg.unknown_nodes == "unregister",
                           audit=tracker.audit_event, **hooks)
    except ProvisionError as exc:
        log.warning("node check skipped: %s", exc)
        tracker.audit_event("node.reconcile_failed", reason=str(exc))
        return None
    (log.info if result.clean else log.warning)("node check: %s", result.summary())
    return result


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
    tracker.log_push(push(grid, cfg, registry, release.manifest, release.onnx, targets, wait_s=cfg.push_wait_s, weights=release.weights))


def train(grid: Grid, cfg: RunConfig, tracker: RunTracker) -> None:
    """Train (or resume training after a crash), then gate, register and push the final model (release)."""
    from mlflow import MlflowClient

    task = get_task(cfg.task)
    checkpoints = CheckpointStore(MlflowClient(tracker.tracking_uri), tracker.run_id)
    checkpoint = checkpoints.load() if cfg.resume else None
    done = checkpoint.server_round if checkpoint else 0
    log.info("MLflow run %s: %d rounds of %s on task %s%s", tracker.run_id, cfg.num_server_rounds, cfg.strategy, cfg.task,
             f" (resumed after round {done})" if cfg.resume else "")
    spec, profiles = agree_on_data(grid, cfg, task)
    backbone = get_backbone(spec.model)  # None: an end-to-end model
    if cfg.release and backbone is not None and not backbone.exportable:
        raise RunAborted(f"model {spec.model} cannot be exported to ONNX for the edge, so it cannot be released: "
                         "set run config release=false (an experiment arm) or choose model effnet-lite0")
    if cfg.resume:
        check_same_spec(tracker, spec)
    tracker.log_data_agreement(spec, profiles)
    torch.manual_seed(cfg.seed)
    model = task.build_model(spec)
    defaults = task.training_defaults(spec)
    plan = TrainingPlan(
        task=cfg.task,
        seed=cfg.seed,
        task_spec=spec.model_dump_json(),
        local_epochs=cfg.local_epochs or defaults.local_epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate or defaults.learning_rate,
        lr_schedule=cfg.lr_schedule,
        update_encoding=cfg.update_encoding,
        num_server_rounds=cfg.num_server_rounds,
        run_series=tracker.run_series,
        **cfg.privacy_fields(),
    ).to_flower()
    rounds = round_store(cfg)  # every round's aggregated updates, for the contribution step (None: contribution off)
    strategy = TrackedStrategy(
        DecodedUpdates(ValidatedStrategy(
            record_rounds(with_central_dp(build_strategy(cfg), cfg, len(profiles)), rounds), UpdateRules.from_config(cfg), cfg.min_plants,
            on_reject=lambda r, plant, why: reject(strategy, r, plant, why), agreed_examples=agreed_examples(profiles),
            on_cap=lambda r, plant, claimed, agreed: cap(strategy, r, plant, claimed, agreed), check_spend=spend_check(cfg, tracker))),
        tracker, cfg.min_plants, cfg.num_server_rounds, cfg.evaluate_every, checkpoints, fold_evaluation=cfg.folds_evaluation(),
    )
    arrays = strategy.resume(checkpoint) if checkpoint else pack(model)
    if done < cfg.num_server_rounds:
        result = strategy.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=cfg.num_server_rounds - done,
            timeout=cfg.round_timeout_s,
            train_config=ConfigRecord(plan),
            evaluate_config=ConfigRecord(plan),
        )
        arrays = result.arrays if len(result.arrays) else arrays
    unpack_into(model, arrays)
    if backbone is not None and not backbone.exportable:
        # Never released (checked above), and torch.export of its backbone's graph costs the anchor a minute of CPU
        # per run (scatnet: 73 s): the trained head is logged, on the backbone's features (tag maxfl.model.input).
        features = np.zeros((2, backbone.dim), dtype=np.float32)
        model_uri = tracker.log_model(model, features, takes=f"{backbone.fingerprint()} features ({backbone.dim}): the trained head only")
    else:
        model_uri = tracker.log_model(task.deployable(spec, model), task.input_example(spec))
    log.info("MLflow run %s: model logged as %s", tracker.run_id, model_uri)
    contributions = assess_contributions(grid, cfg, rounds, tracker, plan, gate_rule(cfg, spec).metric, resumed_after=done)
    if cfg.release:
        release_model(grid, cfg, task, spec, model, arrays, plan, tracker, model_uri, contributions=contributions)


def reject(strategy: TrackedStrategy, server_round: int, plant: str, reason: str) -> None:
    """An update that failed validation: in the ServerApp's log, the round's metrics and the audit log."""
    log_rejection(server_round, plant, reason)
    strategy.note({f"{plant}/update_rejected": 1.0})
    strategy.reject(plant)
    strategy.tracker.audit_event("update.rejected", round=server_round, plant=plant, reason=reason)


def cap(strategy: TrackedStrategy, server_round: int, plant: str, claimed: float, agreed: int) -> None:
    """A reply claimed more examples than its plant agreed to: weighted by the agreed count, logged and audited."""
    log_capped(server_round, plant, claimed, agreed)
    strategy.note({f"{plant}/num_examples_capped": 1.0})
    strategy.tracker.audit_event("update.weight_capped", round=server_round, plant=plant, claimed=claimed, agreed=agreed)


def spend_check(cfg: RunConfig, tracker: RunTracker) -> SpendHook | None:
    """Refuse an update whose plant reports a lower lifetime privacy spend on its data than the anchor saw before."""
    path = cfg.privacy_watch_path()
    if path is None:
        return None
    watch = SpendWatch(path)

    def check(server_round: int, plant: str, msg: Message) -> str | None:
        fingerprint = msg.content[PLANT].get(FINGERPRINT_KEY) if PLANT in msg.content.config_records else None
        return watch.check_reply(plant, fingerprint, msg.content[METRICS], run=tracker.run_id, server_round=server_round)

    return check


def check_same_spec(tracker: RunTracker, spec: TaskSpec) -> None:
    """A resumed run goes on only with the data it started with: the plants' merged spec must not have changed."""
    started = tracker.logged_spec()
    if started is not None and started != spec.model_dump(mode="json"):
        raise RunAborted("resume: the plants' data no longer agree with the task spec the run started with (data/task-spec.json); "
                         "start a new run instead of resuming this one")
